"""The Common Recommender REST API (users, items, events, predictions, recommendations,
statistics) under /v1/crr; see `serving.crr.resources` (mounted from `serving.routes`)."""

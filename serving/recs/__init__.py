"""The /v1/recs surface: durable events and feedback that close the loop, experiments, seeds,
and the runtime routes built on the serving engine (mounted from `serving.routes`)."""

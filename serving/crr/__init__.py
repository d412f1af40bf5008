"""The Common Recommender REST API (users, items, events, predictions, recommendations,
statistics) under /v1/crr; see `serving.crr.resources`."""

from __future__ import annotations

import falcon

from serving.config import ServingConfig
from serving.crr.records import RecordStore
from serving.crr.resources import CrrEventResources, CrrResources
from serving.events_log import EventLogs

PREFIX = "/v1/crr"


def register(
    app: falcon.App, config: ServingConfig, *, service, store, event_logs: EventLogs
) -> None:
    """Mount every /v1/crr route."""
    records = RecordStore(config.data_root)
    r = CrrResources(records, event_logs, service, store)
    ev = CrrEventResources(records, event_logs, service, store)
    routes = {
        "/users": "users",
        "/users/{uid}": "user",
        "/users/{uid}/statistics": "user_statistics",
        "/users/{uid}/predictions": "predictions",
        "/users/{uid}/recommendations": "recommendations",
        "/users/{uid}/events": "user_events",
        "/users/{uid}/events/{event_type}": "user_events_of",
        "/users/{uid}/currentRatings": "current_ratings",
        "/items": "items",
        "/items/{iid}": "item",
        "/items/{iid}/statistics": "item_statistics",
        "/items/{iid}/events": "item_events",
        "/items/{iid}/events/{event_type}": "item_events_of",
        "/events/{eid}": "event",
        "/statistics": "statistics",
    }
    for path, suffix in routes.items():
        app.add_route(
            PREFIX + path, ev if suffix in ("user_events_of", "event") else r, suffix=suffix
        )

"""Typed query parameters and bodies of the Common Recommender routes (/v1/crr)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from serving.recs.schemas import Cursor, Object, Query
from serving.schemas import Id

__all__ = ["Object", "EventsQuery", "UserEventsQuery", "ItemEventsQuery"]

PageLimit = Annotated[int, Meta(ge=1, le=10_000)]


class EventsQuery(Query):
    history: Annotated[
        str,
        Meta(
            pattern=r"^(all|current|[0-9]{1,6}(s|min|h|d|w|m|y))$",
            description="all, current, or a window <n><unit> (unit s, min, h, d, w, m, y)",
        ),
    ] = "all"
    null: bool = True
    limit: PageLimit = 1000
    cursor: Cursor = 0


class UserEventsQuery(EventsQuery):
    item: list[Id] | Id | None = None


class ItemEventsQuery(EventsQuery):
    user: list[Id] | Id | None = None


class PredictionsQuery(Query):
    item: list[Id] | Id | None = None
    useStoredRatings: bool = False  # noqa: N815 (the CRR's own parameter name)
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 100


class RecommendationsQuery(Query):
    count: Annotated[int, Meta(ge=1, description="clamped to the tenant's k limit")] | None = None
    surface: Id | None = None

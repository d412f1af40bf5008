"""Typed query parameters and bodies of the /v1/recs routes (see `serving.schemas` for the
conventions: a Struct validates and documents; semantic checks answer 422)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from serving.schemas import Id

#: A JSON object not described further yet (its handler checks its fields).
Object = dict[str, Any]

Limit = Annotated[int, Meta(ge=1, le=1000)]
Cursor = Annotated[int, Meta(ge=0, description="offset of the next page")]


class Query(msgspec.Struct, omit_defaults=True):
    """Query parameters (unknown ones are ignored, as HTTP clients expect)."""


class FeedbackQuery(Query):
    user_id: Id | None = None
    item_id: Id | None = None
    label: Id | None = None
    source: Id | None = None
    limit: Limit = 100
    cursor: Cursor = 0


class UserQuery(Query):
    limit: Limit | None = None
    strategy: Id | None = None
    model: Id | None = None
    fresh: bool = False


class RelatedQuery(Query):
    limit: Limit | None = None
    strategy: Id = "blend"


class ExperimentsQuery(Query):
    status: Id | None = None
    surface: Id | None = None


class AssignmentQuery(Query):
    user_id: Id


class ResultsQuery(Query):
    alpha: Annotated[float, Meta(gt=0, lt=0.5)] | None = None

"""Typed query parameters, bodies and replies of the Common Recommender routes (/v1/crr).

The API (RecSysWiki's Common Recommender REST API, from the MyMediaLite and LensKit projects)
names users `uid`, items `iid`, events `eid` and revisions `rid`; timestamps are seconds since
the Unix epoch. Conventions are `serving.schemas`'s: a `Body` forbids unknown fields (400), a
`Reply` documents what the handler sends; the replies below also forbid unknown fields, so a
field the handler adds without declaring it fails the spec tests. What a schema cannot state
is the handlers' second pass, answered 422: the contract's own checks of a record or an event
(lengths in bytes, a price that is not finite, a timestamp out of range), and an id in the body
that differs from the URL's.

Record fields a body leaves out are `UNSET` (not stored, not echoed back); an explicit `null`
is stored as null.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from recsys.contract import BUILTIN_EVENT_TYPES, MAX_TITLE_LENGTH, PATTERN_END
from serving.recs.schemas import Query
from serving.schemas import MAX_ID_LENGTH, Body, Id, IdList, Reply, ResponseMeta, TagList, Warning

__all__ = [
    "EventsQuery",
    "UserEventsQuery",
    "ItemEventsQuery",
    "PredictionsQuery",
    "RecommendationsQuery",
    "EventTypeName",
    "CrrNewEvent",
    "CrrUserEvent",
    "CrrNewEvents",
    "CrrUserRecord",
    "CrrItemRecord",
    "CrrUserReply",
    "CrrItemReply",
    "CrrUserDeleted",
    "CrrItemDeleted",
    "CrrEventOutcome",
    "CrrEventsAdded",
    "CrrEvent",
    "CrrEventPage",
    "CrrEventDeleted",
    "CrrCurrentRatings",
    "CrrPrediction",
    "CrrPredictions",
    "CrrRecommendation",
    "CrrRecommendations",
    "CrrUserStatistics",
    "CrrItemStatistics",
    "CrrSystemStatistics",
]

PageLimit = Annotated[int, Meta(ge=1, le=10_000)]
#: Blanks: Unicode White_Space plus what Python's or ECMA-262's \s adds (not left to \S,
#: which differs between the two).
_BLANKS = r" \t\n\x0b\x0c\r\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
#: A user, item or event id a client names: no blank at either end (the contract trims ids,
#: so " a " would be stored under one id and landed under another).
RecordId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        pattern=f"^[^{_BLANKS}]([\\s\\S]*[^{_BLANKS}])?{PATTERN_END}",
        description="an id (no blank at either end)",
    ),
]
#: Events in one request (an array POST, a user's `events`).
MAX_EVENTS_PER_REQUEST = 1000

#: An event type in a path or a body: a built-in type, or its plural (`purchases`, `ratings`).
EventTypeName = Literal[
    tuple(t for base in BUILTIN_EVENT_TYPES for t in (base, base + "s"))  # type: ignore[misc]
]
_TIME = (
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?"
    r"(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])" + PATTERN_END
)
#: Month and day (February up to the 29th: a 29th of a common year is the contract's 422).
_DATE = (
    r"-((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
    r"|02-(0[1-9]|[12][0-9]))"
)
#: Epoch numbers: seconds, milliseconds or microseconds, told apart by size (as imports are).
_EPOCH = "seconds since the Unix epoch (milliseconds and microseconds told apart by size)"
EventTime = Annotated[
    Annotated[float, Meta(ge=631_152_000, lt=1e17, description=_EPOCH + ", from 1990")]
    | Annotated[
        str,
        Meta(pattern=f"^(199[0-9]|20[0-9]{{2}}){_DATE}{_TIME}", description="RFC 3339, from 1990"),
    ],
    Meta(description="events before 1990 or more than a day ahead are refused (422)"),
]
CatalogueTime = (
    Annotated[float, Meta(ge=0, lt=1e17, description=_EPOCH)]
    | Annotated[str, Meta(pattern=f"^[1-9][0-9]{{3}}{_DATE}{_TIME}", description="RFC 3339")]
)
#: A page offset (bounded so that it stays a machine integer).
EventCursor = Annotated[int, Meta(ge=0, le=2**31 - 1, description="offset of the next page")]
Attributes = Annotated[dict[str, Any], Meta(description="free-form attributes (<= 16 KiB)")]
Context = Annotated[dict[str, Any], Meta(description="free-form context (<= 16 KiB)")]


# --- queries ------------------------------------------------------------------------------
class EventsQuery(Query):
    history: Annotated[
        str,
        Meta(
            pattern=r"^(all|current|[0-9]{1,6}(s|min|h|d|w|m|y))" + PATTERN_END,
            description="all, current (the latest event per user, item and type), or a window "
            "<n><unit> back from now (unit s, min, h, d, w, m = 30 days, y = 365 days)",
        ),
    ] = "all"
    null: Annotated[bool, Meta(description="false drops events without a value")] = True
    limit: PageLimit = 1000
    cursor: EventCursor = 0


class UserEventsQuery(EventsQuery):
    item: IdList | Id | None = None


class ItemEventsQuery(EventsQuery):
    user: IdList | Id | None = None


class PredictionsQuery(Query):
    item: IdList | Id | None = None
    useStoredRatings: bool = False  # noqa: N815 (the CRR's own parameter name)
    usedStoredRatings: Annotated[  # noqa: N815 (the spelling of the CRR's own example)
        bool, Meta(description="the same as useStoredRatings")
    ] = False
    limit: Annotated[int, Meta(ge=1, le=10_000)] = 100


class RecommendationsQuery(Query):
    count: Annotated[int, Meta(ge=1, description="clamped to the tenant's k limit")] | None = None
    surface: Id | None = None


# --- request bodies --------------------------------------------------------------------------
class CrrNewEvent(Body):
    """An event of the type the path names (POST /users/{uid}/events/{event_type})."""

    iid: RecordId
    eid: (
        Annotated[RecordId, Meta(description="generated from the event's fields when absent")]
        | None
    ) = None
    timestamp: Annotated[EventTime, Meta(description="the receipt time when absent")] | None = None
    value: float | None = None
    session_id: Id | None = None
    context: Context | None = None


class CrrUserEvent(CrrNewEvent, kw_only=True):
    """An event in a user's body (POST/PUT /users): it names its type."""

    type: EventTypeName  # type: ignore[valid-type]


CrrNewEvents = CrrNewEvent | Annotated[list[CrrNewEvent], Meta(max_length=MAX_EVENTS_PER_REQUEST)]


class CrrUserRecord(Body):
    """A user (POST /users: `uid` optional, generated when absent; PUT: it must equal the
    URL's). `rid` names the revision an update replaces (or send If-Match)."""

    uid: RecordId | UnsetType = UNSET
    rid: Id | None = None
    segment: Id | None | UnsetType = UNSET
    country: Id | None | UnsetType = UNSET
    attributes: Attributes | None | UnsetType = UNSET
    events: Annotated[list[CrrUserEvent], Meta(max_length=MAX_EVENTS_PER_REQUEST)] = []


class CrrItemRecord(Body):
    """An item (POST /items: `iid` optional, generated when absent; PUT: it must equal the
    URL's). `rid` names the revision an update replaces (or send If-Match)."""

    iid: RecordId | UnsetType = UNSET
    rid: Id | None = None
    title: Annotated[str, Meta(max_length=MAX_TITLE_LENGTH)] | None | UnsetType = UNSET
    category: Id | None | UnsetType = UNSET
    brand: Id | None | UnsetType = UNSET
    price: Annotated[float, Meta(ge=0)] | None | UnsetType = UNSET
    tags: TagList | None | UnsetType = UNSET
    available: bool | None | UnsetType = UNSET
    created_at: (
        Annotated[CatalogueTime, Meta(description="when the item joined the catalogue")]
        | None
        | UnsetType
    ) = UNSET
    attributes: Attributes | None | UnsetType = UNSET


# --- replies ------------------------------------------------------------------------------
class CrrEventOutcome(Reply, forbid_unknown_fields=True):
    """What became of one submitted event (its `eid` is null when it was rejected unread)."""

    eid: str | None
    status: Literal["accepted", "duplicate", "rejected"]
    reason: str | None
    detail: str | None


class CrrEventsAdded(Reply, forbid_unknown_fields=True):
    """One event sent: its `eid` and `status` (201 accepted, 200 duplicate; a rejected one is
    422). An array sent (200): `events`, one outcome per event, in order."""

    eid: str | UnsetType = UNSET
    status: Literal["accepted", "duplicate"] | UnsetType = UNSET
    events: list[CrrEventOutcome] | UnsetType = UNSET


class _CrrRecord(Reply, forbid_unknown_fields=True, kw_only=True):
    rid: str
    created_at: Annotated[str, Meta(description="when the record was created (RFC 3339)")]
    updated_at: Annotated[str, Meta(description="its last change (RFC 3339)")]
    generated_id: Annotated[bool, Meta(description="true when the server chose the id")] = False
    events: Annotated[
        list[CrrEventOutcome], Meta(description="outcomes of the body's events, in order")
    ] = []
    attributes: dict[str, Any] | None | UnsetType = UNSET
    features: (
        Annotated[
            dict[str, Any],
            Meta(description="feature-store values beyond the catalogue's columns"),
        ]
        | UnsetType
    ) = UNSET
    sources: (
        Annotated[
            list[Literal["snapshot", "pipeline", "record", "features"]],
            Meta(description="what the view was built from (GET): the live snapshot, the record"),
        ]
        | UnsetType
    ) = UNSET


class CrrUserReply(_CrrRecord, kw_only=True):
    """A user record (fields the user was stored without are absent)."""

    uid: str
    segment: str | None | UnsetType = UNSET
    country: str | None | UnsetType = UNSET


class CrrItemReply(_CrrRecord, kw_only=True):
    """An item record (fields the item was stored without are absent)."""

    iid: str
    title: str | None | UnsetType = UNSET
    category: str | None | UnsetType = UNSET
    brand: str | None | UnsetType = UNSET
    price: float | None | UnsetType = UNSET
    tags: list[str] | None | UnsetType = UNSET
    available: bool | None | UnsetType = UNSET


class CrrUserDeleted(Reply, forbid_unknown_fields=True):
    uid: str
    rid: Annotated[str, Meta(description="the revision that was deleted")]
    status: Literal["deleted"]


class CrrItemDeleted(Reply, forbid_unknown_fields=True):
    iid: str
    rid: Annotated[str, Meta(description="the revision that was deleted")]
    status: Literal["deleted"]


class CrrEvent(Reply, forbid_unknown_fields=True):
    eid: str
    type: str
    uid: str
    iid: str
    timestamp: Annotated[float, Meta(description="seconds since the Unix epoch")]
    time: Annotated[str, Meta(description="the same instant in RFC 3339 (UTC)")]
    value: float | None
    session_id: str | None
    context: (
        Annotated[
            dict[str, Any] | str,
            Meta(description="an object; an imported event's text when it is not one"),
        ]
        | None
    )


class CrrEventPage(Reply, forbid_unknown_fields=True):
    events: list[CrrEvent]
    total: Annotated[int, Meta(ge=0, description="events matching the filters")]
    next_cursor: Annotated[str, Meta(description="the cursor of the next page")] | None


class CrrEventDeleted(Reply, forbid_unknown_fields=True):
    eid: str
    status: Literal["deleted", "already_deleted"]


class CrrCurrentRatings(Reply, forbid_unknown_fields=True):
    uid: str
    ratings: Annotated[dict[str, float], Meta(description="item id -> its latest rating")]


class CrrPrediction(Reply, forbid_unknown_fields=True):
    iid: str
    value: float | None
    source: Literal["rating", "factors", "candidates"] | None
    known: (
        Annotated[bool, Meta(description="for an asked-for item: whether the snapshot has it")]
        | UnsetType
    ) = UNSET


class CrrPredictions(Reply, forbid_unknown_fields=True):
    uid: str
    predictions: list[CrrPrediction]
    model: str
    snapshot_id: str
    truncated: bool


class CrrRecommendation(Reply, forbid_unknown_fields=True):
    iid: str
    rank: Annotated[int, Meta(ge=1)]
    score: float


class CrrRecommendations(Reply, forbid_unknown_fields=True):
    uid: str
    recommendations: list[CrrRecommendation]
    meta: ResponseMeta
    warnings: list[Warning]


class _CrrEventStatistics(Reply, forbid_unknown_fields=True):
    events: Annotated[int, Meta(ge=0)]
    events_by_type: dict[str, int]
    ratings: Annotated[int, Meta(ge=0, description="rating events with a value")]
    mean_rating: float | None
    first_event: Annotated[str, Meta(description="RFC 3339")] | None
    last_event: Annotated[str, Meta(description="RFC 3339")] | None


class CrrUserStatistics(_CrrEventStatistics):
    uid: str
    has_record: bool
    in_snapshot: bool
    candidates: Annotated[int, Meta(ge=0)]
    seen_in_training: Annotated[int, Meta(ge=0)]
    segment: str | None
    distinct_items: Annotated[int, Meta(ge=0)]


class CrrItemStatistics(_CrrEventStatistics):
    iid: str
    has_record: bool
    in_catalogue: bool
    available: bool | None
    distinct_users: Annotated[int, Meta(ge=0)]


class CrrRecordCounts(Reply, forbid_unknown_fields=True):
    users: Annotated[int, Meta(ge=0)]
    items: Annotated[int, Meta(ge=0)]


class CrrSnapshotSummary(Reply, forbid_unknown_fields=True):
    snapshot_id: str
    model: str
    users: Annotated[int, Meta(ge=0)]
    items: Annotated[int, Meta(ge=0)]


class CrrSystemStatistics(_CrrEventStatistics):
    tenant_id: str
    records: CrrRecordCounts
    snapshot: CrrSnapshotSummary
    distinct_users: Annotated[int, Meta(ge=0)]
    distinct_items: Annotated[int, Meta(ge=0)]


def given(struct: msgspec.Struct, fields: tuple[str, ...]) -> dict[str, Any]:
    """The `fields` of a decoded body that were sent (not `UNSET`)."""
    return {f: v for f in fields if (v := getattr(struct, f)) is not UNSET}

"""The data contract: the one place that says what events, items and users look like.

Every reader, validator, model and server in the project imports its column names, types and
event-type weights from here.
"""

from __future__ import annotations

import polars as pl

DEFAULT_TENANT = "default"

#: Built-in event types and their default weight in the interaction confidence. A tenant may
#: declare more types (with weights) in its config; negative weights count against an item.
DEFAULT_EVENT_WEIGHTS: dict[str, float] = {
    "impression": 0.0,
    "view": 1.0,
    "click": 1.5,
    "like": 3.0,
    "add_to_cart": 4.0,
    "rating": 3.0,
    "purchase": 8.0,
    "dislike": -4.0,
    # a returned purchase (retail exports: negative quantity or a cancelled invoice)
    "return": -8.0,
}
BUILTIN_EVENT_TYPES: tuple[str, ...] = tuple(DEFAULT_EVENT_WEIGHTS)
#: The end of a pattern that must match a whole text, alike under Python's `re` (with which
#: msgspec and our own checks match: its `$` also matches before a final newline, so
#: "abc\n" would pass `^[a-z]+$`) and ECMA-262 (what the OpenAPI spec's clients match with).
PATTERN_END = r"$(?!\n)"
#: The name of an event type a tenant declares (its config's `event_types`, with its weight):
#: lowercase, as event types compare case-insensitively.
EVENT_TYPE_PATTERN = "^[a-z][a-z0-9_]{0,63}" + PATTERN_END

#: Upper bounds on free-text fields; longer values are rejected as oversize, not truncated.
MAX_ID_LENGTH = 256
MAX_CONTEXT_BYTES = 16_384
MAX_TITLE_LENGTH = 1_024

UTC_TS = pl.Datetime("us", "UTC")

EVENT_SCHEMA: dict[str, pl.DataType] = {
    "event_id": pl.String,
    "tenant": pl.String,
    "user_id": pl.String,
    "item_id": pl.String,
    "event_type": pl.String,
    "timestamp": UTC_TS,
    "value": pl.Float64,
    "session_id": pl.String,
    "context": pl.String,
}

#: The name ending of a landing file's sidecar of rejects (rows its writer could not read:
#: `recsys import`, connectors), beside the file it belongs to; the ingest folds it in.
REJECTED_SUFFIX = ".rejected.parquet"

REJECTED_SCHEMA: dict[str, pl.DataType] = {
    "source_file": pl.String,
    "row_number": pl.Int64,
    "reason": pl.String,
    "detail": pl.String,
    "raw": pl.String,
}

ITEM_SCHEMA: dict[str, pl.DataType] = {
    "item_id": pl.String,
    "title": pl.String,
    "category": pl.String,
    "brand": pl.String,
    "price": pl.Float64,
    "tags": pl.List(pl.String),
    "available": pl.Boolean,
    "created_at": UTC_TS,
    "attributes": pl.String,
}

USER_SCHEMA: dict[str, pl.DataType] = {
    "user_id": pl.String,
    "segment": pl.String,
    "country": pl.String,
    "attributes": pl.String,
}

SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "events": EVENT_SCHEMA,
    "items": ITEM_SCHEMA,
    "users": USER_SCHEMA,
}

#: Columns without which a row cannot be used at all.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "events": ("user_id", "item_id", "event_type", "timestamp"),
    "items": ("item_id",),
    "users": ("user_id",),
}

#: Reasons a row can be rejected with (kept in `rejected_events.reason`).
REJECT_REASONS: tuple[str, ...] = (
    "unparsable",
    "missing_id",
    "bad_timestamp",
    "unknown_event_type",
    "oversize_field",
    "bad_value",
    "bad_encoding",
    "wrong_tenant",
)


def empty_frame(kind: str) -> pl.DataFrame:
    """An empty DataFrame with the validated schema of `kind` (events, items or users)."""
    return pl.DataFrame(schema=SCHEMAS[kind])

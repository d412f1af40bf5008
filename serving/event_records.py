"""The API's events as log records: what a client may send, how a body becomes a contract row
(`to_raw_row`), how rows are validated by the contract (`validate_rows`) into compact log
records, and how records are read back (`record_to_event`, `records_frame`,
`payloads_frame`, `event_id_of`).

An event record is ``{"k": "e", "id", "u", "i", "t", "ts", "v", "s", "c"}`` (event id, user,
item, type, timestamp in epoch microseconds, value, session, context as JSON text); the key
order is fixed, which `event_id_of` relies on. The log itself is `serving.segment_log`.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import polars as pl

from recsys.contract import EVENT_SCHEMA
from recsys.validation import check_event_rows, validate_events
from serving.routing import encodable

#: Fields an API event may carry; `type` and `metadata` are the /v1/recs spellings of
#: `event_type` and `context`.
EVENT_FIELDS = frozenset(
    {
        "event_id",
        "user_id",
        "item_id",
        "event_type",
        "type",
        "timestamp",
        "value",
        "session_id",
        "context",
        "metadata",
        "tenant",
    }
)

#: How every event record's payload begins (`_record`: orjson keeps the key order) and what
#: follows its id: a reader that only needs the id takes it from the bytes (`event_id_of`).
EVENT_HEAD = b'{"k":"e","id":"'
_EVENT_ID_END = b'","u":'


def event_id_of(payload: bytes) -> str | None:
    """The id of an event record's payload without parsing the JSON, or None when the
    payload is not an event record or its id is escaped (then parse it)."""
    if not payload.startswith(EVENT_HEAD):
        return None
    end = payload.find(_EVENT_ID_END, 15)
    if end < 0:
        return None
    raw = payload[15:end]
    if b"\\" in raw or b'"' in raw:
        return None
    return raw.decode()


@dataclass
class ItemResult:
    """The outcome of one submitted event."""

    status: str  # accepted | duplicate | rejected
    event_id: str | None = None
    reason: str | None = None
    detail: str | None = None


_ALIASES = {"type": "event_type", "metadata": "context"}


def to_raw_row(body: Any, now: Callable[[], str]) -> dict[str, Any] | ItemResult:
    """An API event object as a raw contract row (strings; validation does the typing), or a
    rejected result when it is not even an object of known fields. An event without a
    timestamp gets `now()` (the receipt time)."""
    if type(body) is not dict:
        return ItemResult("rejected", reason="unparsable", detail="an event must be a JSON object")
    if not body.keys() <= EVENT_FIELDS:
        unknown = ", ".join(sorted(set(body) - EVENT_FIELDS))
        return ItemResult("rejected", reason="unparsable", detail=f"unknown field(s): {unknown}")
    row: dict[str, Any] = {}
    for key, value in body.items():
        key = _ALIASES.get(key, key)
        if key in row:
            return ItemResult(
                "rejected",
                reason="unparsable",
                detail=f"'{key}' is given twice (under both of its names)",
            )
        kind = type(value)
        if key == "context" and value is not None:
            if kind is not dict:
                return ItemResult(
                    "rejected", reason="unparsable", detail="context/metadata must be an object"
                )
            if not encodable(value):
                return ItemResult(
                    "rejected",
                    reason="unparsable",
                    detail="context/metadata holds an integer beyond 64 bits or nests too deep",
                )
            row[key] = orjson.dumps(value).decode()
        elif kind is str or value is None:
            row[key] = value
        elif kind is int or kind is float:
            row[key] = str(value)
        else:
            return ItemResult(
                "rejected",
                reason="bad_value" if key == "value" else "unparsable",
                detail=f"{key} must be a string or a number",
            )
    if row.get("timestamp") is None:
        row["timestamp"] = now()  # the receipt time (send one for idempotent retries)
    return row


_RAW_COLUMNS = (
    "event_id",
    "tenant",
    "user_id",
    "item_id",
    "event_type",
    "timestamp",
    "value",
    "session_id",
    "context",
)


def _record(event: dict[str, Any]) -> dict[str, Any]:
    """The log record of a validated event (`check_event_rows` form: timestamp in epoch us)."""
    return {
        "k": "e",
        "id": event["event_id"],
        "u": event["user_id"],
        "i": event["item_id"],
        "t": event["event_type"],
        "ts": event["timestamp"],
        "v": event["value"],
        "s": event["session_id"],
        "c": event["context"],
    }


def validate_rows(
    rows: list[dict[str, Any]], tenant: str, extra_event_types: Iterable[str] = ()
) -> list[dict[str, Any] | tuple[str, str | None]]:
    """Per raw row (`to_raw_row`), its log record or (reason, detail) of its rejection, by the
    contract (with the tenant's declared `extra_event_types` beside the built-in ones):
    `check_event_rows` in plain Python (microseconds a row), and the rows it leaves undecided
    through `validate_events` (milliseconds a pass, however few the rows)."""
    out = check_event_rows(rows, tenant=tenant, extra_event_types=extra_event_types)
    undecided = [k for k, o in enumerate(out) if o is None]
    if undecided:
        raw = pl.DataFrame(
            {c: [rows[k].get(c) for k in undecided] for c in _RAW_COLUMNS},
            schema={c: pl.String for c in _RAW_COLUMNS},
        )
        good, rejects = validate_events(
            raw, tenant=tenant, source="api", extra_event_types=extra_event_types, dedupe=False
        )
        rejected = {
            rn - 1: (reason, detail)
            for rn, reason, detail in rejects.select("row_number", "reason", "detail").iter_rows()
        }
        events = good.with_columns(pl.col("timestamp").dt.epoch("us")).iter_rows(named=True)
        for j, k in enumerate(undecided):
            out[k] = rejected[j] if j in rejected else next(events)
    return [o if type(o) is tuple else _record(o) for o in out]  # type: ignore[arg-type]


def record_to_event(rec: dict[str, Any], tenant: str) -> dict[str, Any]:
    """A log record as a contract event (JSON-friendly: ISO timestamp)."""
    ts = datetime.fromtimestamp(rec["ts"] / 1e6, UTC)
    return {
        "event_id": rec["id"],
        "tenant": tenant,
        "user_id": rec["u"],
        "item_id": rec["i"],
        "event_type": rec["t"],
        "timestamp": ts.isoformat().replace("+00:00", "Z"),
        "value": rec["v"],
        "session_id": rec["s"],
        "context": orjson.loads(rec["c"]) if rec["c"] else None,
    }


def records_frame(records: Iterable[dict[str, Any]], tenant: str) -> pl.DataFrame:
    """Event log records as a DataFrame in EVENT_SCHEMA."""
    recs = list(records)
    df = pl.DataFrame(
        {
            "event_id": [r["id"] for r in recs],
            "tenant": [tenant] * len(recs),
            "user_id": [r["u"] for r in recs],
            "item_id": [r["i"] for r in recs],
            "event_type": [r["t"] for r in recs],
            "timestamp": [r["ts"] for r in recs],
            "value": [r["v"] for r in recs],
            "session_id": [r["s"] for r in recs],
            "context": [r["c"] for r in recs],
        },
        schema_overrides={
            "timestamp": pl.Int64,
            "value": pl.Float64,
            "event_id": pl.String,
            "tenant": pl.String,
            "user_id": pl.String,
            "item_id": pl.String,
            "event_type": pl.String,
            "session_id": pl.String,
            "context": pl.String,
        },
    )
    return df.with_columns(
        pl.col("timestamp").cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    ).select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])


#: Event records as Polars reads their JSON (`_record`'s keys).
_RECORD_SCHEMA = {
    "k": pl.String,
    "id": pl.String,
    "u": pl.String,
    "i": pl.String,
    "t": pl.String,
    "ts": pl.Int64,
    "v": pl.Float64,
    "s": pl.String,
    "c": pl.String,
}


def payloads_frame(payloads: list[bytes], tenant: str) -> pl.DataFrame:
    """Event record payloads (JSON bytes) as a DataFrame in EVENT_SCHEMA: `records_frame` of
    the parsed records, parsed by Polars in one pass instead of one `orjson.loads` each."""
    if not payloads:
        return records_frame([], tenant)
    df = pl.read_ndjson(io.BytesIO(b"\n".join(payloads)), schema=_RECORD_SCHEMA)
    return df.select(
        pl.col("id").alias("event_id"),
        pl.lit(tenant, dtype=pl.String).alias("tenant"),
        pl.col("u").alias("user_id"),
        pl.col("i").alias("item_id"),
        pl.col("t").alias("event_type"),
        pl.col("ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias("timestamp"),
        pl.col("v").alias("value"),
        pl.col("s").alias("session_id"),
        pl.col("c").alias("context"),
    ).select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])

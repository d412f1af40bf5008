"""Validation of raw rows against the data contract: typed good rows out, every bad row kept.

All checks are vectorised Polars expressions, so validation runs at millions of rows a second.
A row is rejected with the first reason that applies, in the order of REJECT_REASONS; nothing
valid is dropped.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import orjson
import polars as pl

from recsys.contract import (
    BUILTIN_EVENT_TYPES,
    EVENT_SCHEMA,
    ITEM_SCHEMA,
    MAX_CONTEXT_BYTES,
    MAX_ID_LENGTH,
    MAX_TITLE_LENGTH,
    REJECTED_SCHEMA,
    USER_SCHEMA,
    UTC_TS,
)
from recsys.readers import MAX_RAW_CHARS

#: Events before this instant are taken as corrupt clocks (epoch zero, two-digit years...).
EARLIEST_EVENT = datetime(1990, 1, 1, tzinfo=UTC)
#: Events may be a little in the future (clock skew), not more.
MAX_CLOCK_SKEW = timedelta(days=1)

# Details of rejected events (`{}`: filled in per row), shared by `validate_events` and
# `check_event_rows`.
MISSING_USER = "user_id is missing"
MISSING_ITEM = "item_id is missing"
OVERSIZE_EVENT_FIELD = (
    f"a field exceeds its limit ({MAX_ID_LENGTH} bytes for ids, {MAX_CONTEXT_BYTES} for context)"
)
WRONG_TENANT = "row is for tenant '{}', file landed for '{}'"
UNPARSABLE_TIMESTAMP = "timestamp is not ISO-8601 or epoch seconds/milliseconds"
MISSING_TIMESTAMP = "timestamp is missing"
TIMESTAMP_OUT_OF_RANGE = "timestamp {} is outside the possible range"
UNDECLARED_EVENT_TYPE = (
    "event type '{}' is neither built in nor declared in the tenant config's event_types"
)
BAD_EVENT_VALUE = "value is not a finite number"

_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%:z",
    "%Y-%m-%dT%H:%M:%S%:z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S",
    "%Y-%m-%d %H:%M:%S%.f%:z",
    "%Y-%m-%d %H:%M:%S%:z",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S",
    "%Y-%m-%d",
)


def parse_timestamp(col: str, dtype: pl.DataType) -> pl.Expr:
    """An expression turning `col` (ISO-8601 text, epoch s/ms/us numbers, or datetimes) into
    UTC microsecond datetimes; anything unparsable becomes null."""
    c = pl.col(col)
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is None:
            return c.dt.replace_time_zone("UTC").dt.cast_time_unit("us")
        return c.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if isinstance(dtype, pl.Date):
        return c.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    if dtype.is_numeric():
        return _epoch_to_datetime(c.cast(pl.Float64, strict=False))
    text = c.cast(pl.String).str.strip_chars()
    numeric = text.cast(pl.Float64, strict=False)
    iso = text.str.replace(r"[Zz]$", "+00:00")
    parsed = [
        iso.str.to_datetime(fmt, strict=False, time_unit="us", time_zone="UTC")
        if "%:z" in fmt
        else iso.str.to_datetime(fmt, strict=False, time_unit="us").dt.replace_time_zone("UTC")
        for fmt in _ISO_FORMATS
    ]
    return (
        pl.when(numeric.is_not_null())
        .then(_epoch_to_datetime(numeric))
        .otherwise(pl.coalesce(parsed))
    )


def _epoch_to_datetime(num: pl.Expr) -> pl.Expr:
    """Epoch numbers to UTC datetimes, telling seconds, milliseconds and microseconds apart by
    magnitude (seconds stay below 1e11 until the year 5138)."""
    micros = (
        pl.when(num.abs() < 1e11)
        .then(num * 1e6)
        .when(num.abs() < 1e14)
        .then(num * 1e3)
        .otherwise(num)
    )
    micros = pl.when(micros.is_finite() & (micros.abs() < 1e17)).then(micros)
    return micros.cast(pl.Int64, strict=False).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")


def _as_text_columns(raw: pl.DataFrame, lists: tuple[str, ...] = ()) -> pl.DataFrame:
    """`raw` with the columns no cast turns into text made text, as a landing file written by
    `recsys import` holds them: nested values (lists, structs: a Parquet file of tags as a
    list) as compact JSON, durations as ISO 8601, bytes (strings written without their UTF-8
    annotation) as UTF-8 with undecodable bytes replaced. Without this, one such column
    stopped a whole run. The columns `lists` stay lists when they are lists of scalars."""
    text = {}
    for name, dtype in raw.schema.items():
        if name in lists and isinstance(dtype, pl.List) and not dtype.inner.is_nested():
            continue
        if dtype.is_nested():
            try:  # ({"v": value} as JSON, then the value's part of it)
                encoded = pl.struct(pl.col(name).alias("v")).struct.json_encode()
                value = encoded.str.strip_prefix('{"v":').str.strip_suffix("}")
                text[name] = raw.select(pl.when(pl.col(name).is_not_null()).then(value))[name]
            except pl.exceptions.PolarsError:  # (a struct of bytes, say: value by value)
                text[name] = pl.Series(
                    [None if v is None else _json_text(v) for v in raw[name].to_list()],
                    dtype=pl.String,
                )
        elif isinstance(dtype, pl.Duration):  # (no cast to text: ISO 8601, "P1DT3S")
            text[name] = raw[name].dt.to_string("iso")
        elif dtype == pl.Binary:
            try:
                text[name] = raw[name].cast(pl.String)
            except pl.exceptions.PolarsError:  # (invalid UTF-8 in some value)
                text[name] = pl.Series(
                    [None if v is None else v.decode("utf-8", "replace") for v in raw[name]],
                    dtype=pl.String,
                )
    return raw.with_columns(**text) if text else raw


def _json_text(value: Any) -> str:
    return orjson.dumps(
        value, default=lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    ).decode()


def _text(df: pl.DataFrame, col: str) -> pl.Expr:
    """Column as trimmed text with empty strings as null; null literal if absent."""
    if col not in df.columns:
        return pl.lit(None, dtype=pl.String)
    c = pl.col(col)
    if df.schema[col] != pl.String:
        c = c.cast(pl.String, strict=False)
    c = c.str.strip_chars()
    return pl.when(c.str.len_chars() > 0).then(c)


def _number(df: pl.DataFrame, col: str) -> pl.Expr:
    """Column as Float64 (null where absent or unparsable; NaN in numeric input means missing)."""
    if col not in df.columns:
        return pl.lit(None, dtype=pl.Float64)
    if df.schema[col].is_numeric():
        return pl.col(col).cast(pl.Float64).fill_nan(None)
    return _text(df, col).cast(pl.Float64, strict=False)


def _given(df: pl.DataFrame, col: str) -> pl.Expr:
    """Whether the source row carries a value in `col` (NaN in numeric input counts as none)."""
    if col not in df.columns:
        return pl.lit(False)
    if df.schema[col].is_numeric():
        c = pl.col(col)
        return c.is_not_null() & ~c.cast(pl.Float64).is_nan()
    return _text(df, col).is_not_null()


def _first_reason(checks: Iterable[tuple[pl.Expr, str, pl.Expr | str]]) -> tuple[pl.Expr, pl.Expr]:
    """(reason, detail) expressions: the first failing check of each row, or null."""
    checks = list(checks)
    reason: pl.Expr = pl.lit(None, dtype=pl.String)
    detail: pl.Expr = pl.lit(None, dtype=pl.String)
    for failed, name, why in reversed(checks):
        why_expr = pl.lit(why) if isinstance(why, str) else why
        reason = pl.when(failed).then(pl.lit(name)).otherwise(reason)
        detail = pl.when(failed).then(why_expr).otherwise(detail)
    return reason, detail


def _rejects(df: pl.DataFrame, source_cols: list[str], source: str) -> pl.DataFrame:
    """Rejected rows in REJECTED_SCHEMA, with the original fields as a JSON object in `raw`."""
    bad = df.filter(pl.col("_reason").is_not_null())
    if bad.height == 0:
        return pl.DataFrame(schema=REJECTED_SCHEMA)
    cols = [c for c in source_cols if c in bad.columns]
    raw = (
        pl.struct([pl.col(c).cast(pl.String, strict=False) for c in cols]).struct.json_encode()
        if cols
        else pl.lit("{}")
    )
    return bad.select(
        pl.lit(source, dtype=pl.String).alias("source_file"),
        pl.col("_row").cast(pl.Int64).alias("row_number"),
        pl.col("_reason").alias("reason"),
        pl.col("_detail").alias("detail"),
        raw.str.slice(0, MAX_RAW_CHARS).alias("raw"),
    )


_VECTORISED_MD5_FROM = 20_000  # rows; below this a Python loop is faster than DuckDB
#: Joins the fields of a derived event id's key (a byte no field contains).
_KEY_SEP = "\x1f"


def _md5_event_id(key: str) -> str:
    return "e" + hashlib.md5(key.encode()).hexdigest()


def derive_event_ids(df: pl.DataFrame) -> pl.Series:
    """Deterministic event ids from the event's content (stable across versions and machines:
    md5 of the canonical fields), so re-ingesting the same data never duplicates it."""
    key = df.select(
        pl.concat_str(
            [
                pl.col("tenant"),
                pl.col("user_id"),
                pl.col("item_id"),
                pl.col("event_type"),
                pl.col("timestamp").dt.epoch("us").cast(pl.String),
                pl.col("value").cast(pl.String).fill_null(""),
                pl.col("session_id").fill_null(""),
            ],
            separator=_KEY_SEP,
        ).alias("k")
    )
    if key.height < _VECTORISED_MD5_FROM:
        # small batches (API requests): hashlib beats opening a DuckDB connection (~15 ms)
        ids = [_md5_event_id(k) for k in key["k"].to_list()]
        return pl.Series("event_id", ids, dtype=pl.String)
    con = duckdb.connect()
    try:
        con.register("keys", key.to_arrow())
        out = con.sql("SELECT 'e' || md5(k) AS event_id FROM keys").pl()
    finally:
        con.close()
    return out["event_id"]


def validate_events(
    raw: pl.DataFrame,
    *,
    tenant: str,
    source: str,
    extra_event_types: Iterable[str] = (),
    now: datetime | None = None,
    dedupe: bool = True,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split raw event rows into (valid events in EVENT_SCHEMA, rejects in REJECTED_SCHEMA).

    `raw` has contract column names (any subset) plus `_row`; `now` bounds future timestamps.
    Valid events are deduplicated by event_id (first occurrence kept) unless `dedupe` is False
    (the ingest step deduplicates per day itself).
    """
    if "_row" not in raw.columns:
        raw = raw.with_row_index("_row", offset=1).with_columns(pl.col("_row").cast(pl.Int64))
    raw = _as_text_columns(raw)
    now = now or datetime.now(UTC)
    known = sorted(set(BUILTIN_EVENT_TYPES) | {t.lower() for t in extra_event_types})
    source_cols = [c for c in raw.columns if c != "_row"]
    ts_dtype = raw.schema.get("timestamp", pl.String)
    # one lazy plan: Polars fuses the parsing, the checks and the split into a single pass
    lf = raw.lazy().with_columns(
        _text(raw, "user_id").alias("user_id"),
        _text(raw, "item_id").alias("item_id"),
        _text(raw, "event_type").str.to_lowercase().alias("event_type"),
        _text(raw, "session_id").alias("session_id"),
        _text(raw, "event_id").alias("event_id"),
        _text(raw, "tenant").fill_null(tenant).alias("tenant"),
        _text(raw, "context").alias("context"),
        (
            parse_timestamp("timestamp", ts_dtype)
            if "timestamp" in raw.columns
            else pl.lit(None, dtype=UTC_TS)
        ).alias("_ts"),
        (
            _text(raw, "timestamp").is_not_null() if "timestamp" in raw.columns else pl.lit(False)
        ).alias("_ts_given"),
        _number(raw, "value").alias("_value"),
        _given(raw, "value").alias("_value_given"),
    )
    ts = pl.col("_ts")
    oversize = (
        (pl.col("user_id").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("item_id").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("event_id").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("session_id").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("event_type").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("context").str.len_bytes() > MAX_CONTEXT_BYTES)
    ).fill_null(False)
    reason, detail = _first_reason(
        [
            (
                pl.col("user_id").is_null() | pl.col("item_id").is_null(),
                "missing_id",
                pl.when(pl.col("user_id").is_null())
                .then(pl.lit(MISSING_USER))
                .otherwise(pl.lit(MISSING_ITEM)),
            ),
            (
                oversize,
                "oversize_field",
                OVERSIZE_EVENT_FIELD,
            ),
            (
                pl.col("tenant") != tenant,
                "wrong_tenant",
                pl.format(WRONG_TENANT, pl.col("tenant"), pl.lit(tenant)),
            ),
            (
                ts.is_null(),
                "bad_timestamp",
                pl.when(pl.col("_ts_given"))
                .then(pl.lit(UNPARSABLE_TIMESTAMP))
                .otherwise(pl.lit(MISSING_TIMESTAMP)),
            ),
            (
                (ts < EARLIEST_EVENT) | (ts > now + MAX_CLOCK_SKEW),
                "bad_timestamp",
                pl.format(TIMESTAMP_OUT_OF_RANGE, ts.cast(pl.String)),
            ),
            (
                pl.col("event_type").is_null() | ~pl.col("event_type").is_in(known),
                "unknown_event_type",
                pl.format(UNDECLARED_EVENT_TYPE, pl.col("event_type")),
            ),
            (
                pl.col("_value_given")
                & (pl.col("_value").is_null() | ~pl.col("_value").is_finite()),
                "bad_value",
                pl.lit(BAD_EVENT_VALUE),
            ),
        ]
    )
    df = (
        lf.with_columns(reason.alias("_reason"), detail.alias("_detail"))
        .select(
            *[c for c in source_cols if c not in EVENT_SCHEMA],
            *[c for c in EVENT_SCHEMA if c != "timestamp" and c != "value"],
            # (the raw timestamp and value as sent, for a reject's `raw`, when the file has them)
            *[c for c in ("timestamp", "value") if c in source_cols],
            "_ts",
            "_value",
            "_row",
            "_reason",
            "_detail",
        )
        .collect()
    )
    rejects = _rejects(df, source_cols, source)
    good = df.filter(pl.col("_reason").is_null()).select(
        pl.col("event_id"),
        pl.col("tenant"),
        pl.col("user_id"),
        pl.col("item_id"),
        pl.col("event_type"),
        pl.col("_ts").alias("timestamp"),
        pl.col("_value").alias("value"),
        pl.col("session_id"),
        pl.col("context"),
    )
    if good.height and good["event_id"].null_count():
        derived = derive_event_ids(good)
        good = good.with_columns(pl.coalesce(pl.col("event_id"), derived).alias("event_id"))
    if dedupe:
        good = good.unique(subset="event_id", keep="first", maintain_order=True)
    return good.select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()]), rejects


# --- the same checks row by row, for the few rows of an API request ---------------------------
# A pass of `validate_events` costs milliseconds however few its rows (plan building); the
# event intake validates a handful of rows at a time. `check_event_rows` applies the same
# checks, in the same order, with the same details, in plain Python, and hands back every row
# whose outcome it cannot be sure of (text Polars may parse differently: exotic number or
# date spellings, non-ASCII event types, years outside 1..9999) for `validate_events` to
# decide. tests/recsys/test_event_row_checks.py compares both on many valid and invalid rows.

#: What Polars' `str.strip_chars()` strips (Rust's White_Space); Python's `str.strip()` would
#: also strip U+001C..U+001F.
_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
#: Decimal numbers that Python's float() and Polars' String -> Float64 cast read alike.
_DECIMAL = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
#: ISO-8601 spellings of `_ISO_FORMATS` (T or space; optional fraction and offset; a date).
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,6}))?([Zz]|[+-]\d{2}:\d{2})?)?"
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class _Undecided(Exception):
    """A row `check_event_rows` leaves to `validate_events`."""


def _strip(value: str | None) -> str | None:
    """`_text`: trimmed text, empty as None."""
    return value.strip(_WHITESPACE) or None if value is not None else None


def _oversize(text: str | None, limit: int) -> bool:
    """More than `limit` UTF-8 bytes (no encoding needed below limit / 4 characters)."""
    return text is not None and len(text) * 4 > limit and len(text.encode()) > limit


def _decimal(text: str) -> float:
    """Text Polars casts to this float (`_Undecided` for anything but plain decimals)."""
    if _DECIMAL.fullmatch(text) is None:
        raise _Undecided
    return float(text)


def _timestamp_us(text: str) -> int:
    """`parse_timestamp` of stripped text, as epoch microseconds."""
    if _DECIMAL.fullmatch(text) is not None:
        # `_epoch_to_datetime`: s / ms / us told apart by magnitude, truncated to whole us
        num = float(text)
        size = abs(num)
        micros = num * 1e6 if size < 1e11 else num * 1e3 if size < 1e14 else num
        if not (math.isfinite(micros) and abs(micros) < 1e17):
            raise _Undecided  # null: "not ISO-8601" (rare; let Polars say so)
        return int(micros)
    m = _ISO.fullmatch(text)
    if m is None:
        raise _Undecided
    year, month, day, hh, mm, ss, frac, offset = m.groups()
    if hh is not None and (int(hh) > 23 or int(mm) > 59 or int(ss) > 59):
        raise _Undecided
    try:
        at = datetime(
            int(year),
            int(month),
            int(day),
            int(hh or 0),
            int(mm or 0),
            int(ss or 0),
            int((frac or "0").ljust(6, "0")),
            tzinfo=UTC,
        )
    except ValueError:
        raise _Undecided from None
    us = (at - _EPOCH) // timedelta(microseconds=1)
    if offset and offset not in "Zz":
        oh, om = int(offset[1:3]), int(offset[4:6])
        if oh > 23 or om > 59:
            raise _Undecided
        us -= (1 if offset[0] == "+" else -1) * (oh * 3600 + om * 60) * 1_000_000
    return us


def _check_event_row(
    row: dict[str, str | None], tenant: str, known: frozenset[str], latest_us: int
) -> dict[str, Any] | tuple[str, str | None]:
    """One raw row: the validated event (timestamp as epoch us) or (reason, detail), with the
    first failing check of `validate_events`; raises `_Undecided`."""
    get = row.get
    user, item = _strip(get("user_id")), _strip(get("item_id"))
    if user is None or item is None:
        return "missing_id", MISSING_USER if user is None else MISSING_ITEM
    event_type = _strip(get("event_type"))
    if event_type is not None:
        if not event_type.isascii():
            raise _Undecided  # Unicode lower-casing: leave it to Polars
        event_type = event_type.lower()
    event_id, session = _strip(get("event_id")), _strip(get("session_id"))
    context = _strip(get("context"))
    row_tenant = _strip(get("tenant")) or tenant
    if (
        _oversize(user, MAX_ID_LENGTH)
        or _oversize(item, MAX_ID_LENGTH)
        or _oversize(event_id, MAX_ID_LENGTH)
        or _oversize(session, MAX_ID_LENGTH)
        or _oversize(event_type, MAX_ID_LENGTH)
        or _oversize(context, MAX_CONTEXT_BYTES)
    ):
        return "oversize_field", OVERSIZE_EVENT_FIELD
    if row_tenant != tenant:
        return "wrong_tenant", WRONG_TENANT.format(row_tenant, tenant)
    ts_text = _strip(get("timestamp"))
    if ts_text is None:
        return "bad_timestamp", MISSING_TIMESTAMP
    ts = _timestamp_us(ts_text)
    if ts < _EARLIEST_US or ts > latest_us:
        at = _EPOCH + timedelta(microseconds=ts)  # OverflowError outside years 1..9999
        text = at.strftime("%Y-%m-%d %H:%M:%S.%f+00:00")
        if not 1 <= at.year <= 9999 or len(text) != 32:
            raise _Undecided
        return "bad_timestamp", TIMESTAMP_OUT_OF_RANGE.format(text)
    if event_type is None:
        return "unknown_event_type", None
    if event_type not in known:
        return "unknown_event_type", UNDECLARED_EVENT_TYPE.format(event_type)
    value_text = _strip(get("value"))
    value = None
    if value_text is not None:
        value = _decimal(value_text)
        if not math.isfinite(value):
            return "bad_value", BAD_EVENT_VALUE
    if event_id is None:
        if value is None:
            value_key = ""
        else:
            value_key = repr(value)
            if "e-" in value_key:
                raise _Undecided  # Polars writes small floats without an exponent
        event_id = _md5_event_id(
            _KEY_SEP.join((tenant, user, item, event_type, str(ts), value_key, session or ""))
        )
    return {
        "event_id": event_id,
        "tenant": tenant,
        "user_id": user,
        "item_id": item,
        "event_type": event_type,
        "timestamp": ts,
        "value": value,
        "session_id": session,
        "context": context,
    }


_EARLIEST_US = (EARLIEST_EVENT - _EPOCH) // timedelta(microseconds=1)


def check_event_rows(
    rows: Sequence[dict[str, str | None]],
    *,
    tenant: str,
    extra_event_types: Iterable[str] = (),
    now: datetime | None = None,
) -> list[dict[str, Any] | tuple[str, str | None] | None]:
    """`validate_events` (with dedupe=False) for a few raw text rows, row by row in plain
    Python: per row the validated event (EVENT_SCHEMA keys; `timestamp` in epoch
    microseconds), or (reason, detail) of its rejection, or None where only `validate_events`
    can decide (give it those rows)."""
    now = now or datetime.now(UTC)
    latest_us = (now + MAX_CLOCK_SKEW - _EPOCH) // timedelta(microseconds=1)
    known = frozenset(BUILTIN_EVENT_TYPES) | {t.lower() for t in extra_event_types}
    out: list[dict[str, Any] | tuple[str, str | None] | None] = []
    for row in rows:
        try:
            out.append(_check_event_row(row, tenant, known, latest_us))
        except (_Undecided, OverflowError):
            out.append(None)
    return out


_TAG_LIST = pl.List(pl.String)
NOT_A_TAG_LIST = "tags is not a JSON list of tags"


def _parse_tags(df: pl.DataFrame) -> pl.DataFrame:
    """`_tags`: from a list, a JSON list, or text separated by '|' or ','; trimmed, empty ones
    dropped. `_tags_bad`: the text starts like a JSON list but is not one of scalars (`[broken`,
    `[[1]]`: the row is rejected; such a value used to stop the whole build)."""
    n = df.height
    if "tags" not in df.columns:
        tags = pl.Series([[]] * n, dtype=_TAG_LIST)
        return pl.DataFrame({"_tags": tags, "_tags_bad": pl.repeat(False, n, eager=True)})
    if isinstance(df.schema["tags"], pl.List):  # (of scalars: `_as_text_columns` keeps it)
        tags = df.select(pl.col("tags").cast(_TAG_LIST))["tags"]
        bad = pl.repeat(False, n, eager=True)
    else:
        text = pl.col("tags").cast(pl.String).str.strip_chars()
        is_json = text.str.starts_with("[").fill_null(False)
        split = (
            text.str.split(pl.lit("|"))
            .list.eval(pl.element().str.split(","))
            .list.eval(pl.element().explode())
        )
        try:
            decoded = text.str.json_decode(_TAG_LIST)
            tags = df.select(pl.when(is_json).then(decoded).otherwise(split).alias("t"))["t"]
            bad = pl.repeat(False, n, eager=True)
        except pl.exceptions.PolarsError:  # (a value is not a JSON list of scalars: by value)
            found = df.select(text.alias("text"), is_json.alias("is_json"), split.alias("split"))
            decoded = pl.Series(
                [_json_tags(v) if j else None for v, j in zip(*found[:, :2], strict=True)],
                dtype=_TAG_LIST,
            )
            tags = found.select(pl.when("is_json").then(decoded).otherwise("split").alias("t"))["t"]
            bad = found["is_json"] & decoded.is_null()
    tags = tags.list.eval(
        pl.element().str.strip_chars().filter(pl.element().str.len_chars() > 0)
    ).fill_null(pl.lit([], dtype=_TAG_LIST))
    return pl.DataFrame({"_tags": tags, "_tags_bad": bad})


def _json_tags(text: str) -> list[str | None] | None:
    """A JSON list of scalars as text values (None: not one)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(value, list) or any(isinstance(v, list | dict) for v in value):
        return None
    return [v if v is None or isinstance(v, str) else orjson.dumps(v).decode() for v in value]


_TRUE = ["1", "true", "yes", "y", "t", "in_stock", "available"]
_FALSE = ["0", "false", "no", "n", "f", "out_of_stock", "unavailable"]


def validate_items(raw: pl.DataFrame, *, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split raw item rows into (valid items in ITEM_SCHEMA, rejects). Later rows for the same
    item_id replace earlier ones (the catalog is an upsert table)."""
    if "_row" not in raw.columns:
        raw = raw.with_row_index("_row", offset=1).with_columns(pl.col("_row").cast(pl.Int64))
    raw = _as_text_columns(raw, lists=("tags",))
    source_cols = [c for c in raw.columns if c != "_row"]
    avail_text = _text(raw, "available").str.to_lowercase()
    df = raw.with_columns(
        _text(raw, "item_id").alias("item_id"),
        _text(raw, "title").alias("title"),
        _text(raw, "category").alias("category"),
        _text(raw, "brand").alias("brand"),
        _text(raw, "attributes").alias("attributes"),
        _number(raw, "price").alias("_price"),
        _given(raw, "price").alias("_price_given"),
        pl.when(avail_text.is_null())
        .then(True)
        .when(avail_text.is_in(_TRUE))
        .then(True)
        .when(avail_text.is_in(_FALSE))
        .then(False)
        .alias("_available"),
        (
            parse_timestamp("created_at", raw.schema["created_at"])
            if "created_at" in raw.columns
            else pl.lit(None, dtype=UTC_TS)
        ).alias("_created"),
        (
            _text(raw, "created_at").is_not_null() if "created_at" in raw.columns else pl.lit(False)
        ).alias("_created_given"),
    )
    df = df.hstack(_parse_tags(df))
    oversize = (
        (pl.col("item_id").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("title").str.len_chars() > MAX_TITLE_LENGTH)
        | (pl.col("category").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("brand").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("attributes").str.len_bytes() > MAX_CONTEXT_BYTES)
        | (pl.col("_tags").list.len() > 256)
    ).fill_null(False)
    price = pl.col("_price")
    reason, detail = _first_reason(
        [
            (pl.col("item_id").is_null(), "missing_id", "item_id is missing"),
            (oversize, "oversize_field", "a field exceeds its limit"),
            (
                pl.col("_created_given") & pl.col("_created").is_null(),
                "bad_timestamp",
                "created_at is not a timestamp",
            ),
            (
                pl.col("_price_given") & (price.is_null() | ~price.is_finite() | (price < 0)),
                "bad_value",
                "price is not a non-negative number",
            ),
            (pl.col("_available").is_null(), "bad_value", "available is not a boolean"),
            (pl.col("_tags_bad"), "bad_value", NOT_A_TAG_LIST),
        ]
    )
    df = df.with_columns(reason.alias("_reason"), detail.alias("_detail"))
    rejects = _rejects(df, source_cols, source)
    good = (
        df.filter(pl.col("_reason").is_null())
        .select(
            "item_id",
            "title",
            "category",
            "brand",
            pl.col("_price").alias("price"),
            pl.col("_tags").alias("tags"),
            pl.col("_available").alias("available"),
            pl.col("_created").alias("created_at"),
            "attributes",
        )
        .unique(subset="item_id", keep="last", maintain_order=True)
    )
    return good.select([pl.col(c).cast(t) for c, t in ITEM_SCHEMA.items()]), rejects


def validate_users(raw: pl.DataFrame, *, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split raw user rows into (valid users in USER_SCHEMA, rejects); later rows win."""
    if "_row" not in raw.columns:
        raw = raw.with_row_index("_row", offset=1).with_columns(pl.col("_row").cast(pl.Int64))
    raw = _as_text_columns(raw)
    source_cols = [c for c in raw.columns if c != "_row"]
    df = raw.with_columns(
        _text(raw, "user_id").alias("user_id"),
        _text(raw, "segment").alias("segment"),
        _text(raw, "country").alias("country"),
        _text(raw, "attributes").alias("attributes"),
    )
    oversize = (
        (pl.col("user_id").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("segment").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("country").str.len_bytes() > MAX_ID_LENGTH)
        | (pl.col("attributes").str.len_bytes() > MAX_CONTEXT_BYTES)
    ).fill_null(False)
    reason, detail = _first_reason(
        [
            (pl.col("user_id").is_null(), "missing_id", "user_id is missing"),
            (oversize, "oversize_field", "a field exceeds its limit"),
        ]
    )
    df = df.with_columns(reason.alias("_reason"), detail.alias("_detail"))
    rejects = _rejects(df, source_cols, source)
    good = (
        df.filter(pl.col("_reason").is_null())
        .select(list(USER_SCHEMA))
        .unique(subset="user_id", keep="last", maintain_order=True)
    )
    return good.select([pl.col(c).cast(t) for c, t in USER_SCHEMA.items()]), rejects

"""`check_event_rows` (plain Python, for the few rows of an API request) against the contract
validator `validate_events`: on every row it decides, the same accepted event (same id, same
typed values) or the same rejection reason and detail; the rows it leaves undecided are the
unusual spellings only."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import polars as pl
import pytest

from recsys.contract import REJECT_REASONS
from recsys.validation import check_event_rows, validate_events

NOW = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
COLUMNS = (
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

TIMESTAMPS = [
    "1735689600",
    "1735689600.5",
    "1735689600.1234567",
    "1735689600123",
    "1735689600123456",
    "1735689600123456789",
    "-1.5",
    "0",
    "1e9",
    "+1735689600",
    " 1735689600 ",
    "1772452800",  # NOW + 1 day + a bit: in the future
    "1772366400",
    "2025-01-01T10:00:00Z",
    "2025-01-01T10:00:00z",
    "2025-01-01T10:00:00.5Z",
    "2025-01-01T10:00:00.123456+02:00",
    "2025-01-01T10:00:00-05:30",
    "2025-01-01 10:00:00",
    "2025-01-01 10:00:00.25",
    "2025-01-01T10:00:00",
    "2025-01-01",
    "1989-12-31T23:59:59Z",
    "1990-01-01T00:00:00Z",
    "2027-01-01T00:00:00Z",
    "2025-02-30T10:00:00Z",
    "2025-13-01",
    "2025-01-01T24:00:00Z",
    "2025-01-01T10:00:60Z",
    "2025-01-01T10:00Z",
    "2025-1-1",
    "2025-01-01T10:00:00.1234567Z",
    "2025-01-01T10:00:00+25:00",
    "0600-01-01",
    "yesterday",
    "inf",
    "nan",
    "1_735_689_600",
    "\u30001735689600",
    "\x1c1735689600",
    "",
    "   ",
    None,
]
VALUES = [None, "3", "4.5", "-2", "1e20", "1e-05", "0.0001", "+3", "3.", ".5", "inf", "nan"]
VALUES += ["NaN", "abc", "", " 2 ", "1_0", "1e400", "-0"]
EVENT_TYPES = ["click", "CLICK", " Purchase ", "add_to_cart", "custom", "promo", "teleport"]
EVENT_TYPES += ["İmpression", "", None, "x" * 257]
IDS = ["u1", " u2 ", "", "   ", None, "x" * 256, "x" * 257, "ü" * 128, "ü" * 129, "\x1cu3"]
TENANTS = [None, "acme", " acme ", "globex", ""]
CONTEXTS = [None, '{"page":"home"}', "{}", '{"p":"' + "y" * 16_400 + '"}']
SESSIONS = [None, "s1", "", "s" * 257]
EVENT_IDS = [None, "e-1", " e-2 ", "", "e" * 257]


def _compare(rows: list[dict[str, str | None]], extra=("promo",)) -> int:
    """Assert both validators agree on every row `check_event_rows` decides; returns how many
    rows it left undecided."""
    raw = pl.DataFrame(
        {c: [r.get(c) for r in rows] for c in COLUMNS}, schema={c: pl.String for c in COLUMNS}
    )
    good, rejects = validate_events(
        raw, tenant="acme", source="api", extra_event_types=extra, now=NOW, dedupe=False
    )
    rejected = {
        rn - 1: (reason, detail)
        for rn, reason, detail in rejects.select("row_number", "reason", "detail").iter_rows()
    }
    assert {reason for reason, _ in rejected.values()} <= set(REJECT_REASONS)
    good_rows = iter(good.with_columns(pl.col("timestamp").dt.epoch("us")).iter_rows(named=True))
    expected = [rejected[i] if i in rejected else next(good_rows) for i in range(len(rows))]
    checked = check_event_rows(rows, tenant="acme", extra_event_types=extra, now=NOW)
    assert len(checked) == len(rows)
    for row, want, got in zip(rows, expected, checked, strict=True):
        if got is not None:
            assert got == want, row
    return sum(got is None for got in checked)


def _row(**fields: str | None) -> dict[str, str | None]:
    base = {"user_id": "u1", "item_id": "i1", "event_type": "click", "timestamp": "1735689600"}
    return {**base, **fields}


@pytest.mark.parametrize(
    "field, values",
    [
        ("timestamp", TIMESTAMPS),
        ("value", VALUES),
        ("event_type", EVENT_TYPES),
        ("user_id", IDS),
        ("item_id", IDS),
        ("tenant", TENANTS),
        ("context", CONTEXTS),
        ("session_id", SESSIONS),
        ("event_id", EVENT_IDS),
    ],
)
def test_each_field_alone_gets_the_contract_answer(field, values):
    _compare([_row(**{field: v}) for v in values])


def test_random_rows_with_several_faults_get_the_first_failing_reason():
    rng = random.Random(7)
    pools = {
        "event_id": EVENT_IDS,
        "tenant": TENANTS,
        "user_id": IDS,
        "item_id": IDS,
        "event_type": EVENT_TYPES,
        "timestamp": TIMESTAMPS,
        "value": VALUES,
        "session_id": SESSIONS,
        "context": CONTEXTS,
    }
    # each field is usual (that of `_row`, or absent) 3 times in 4, else any of its pool
    rows = [
        {c: rng.choice(p) if rng.random() < 0.25 else _row().get(c) for c, p in pools.items()}
        for _ in range(3_000)
    ]
    undecided = _compare(rows)
    assert undecided < len(rows) // 6  # most rows, even from these odd pools, are decided
    outcomes = {
        c if c is None else c[0] if isinstance(c, tuple) else "ok"
        for c in check_event_rows(rows, tenant="acme", extra_event_types=("promo",), now=NOW)
    }
    assert outcomes >= {
        "ok",
        "missing_id",
        "oversize_field",
        "wrong_tenant",
        "bad_timestamp",
        "unknown_event_type",
        "bad_value",
        None,
    }


def test_usual_api_events_are_all_decided_with_derived_ids_as_the_contract():
    rows = [
        _row(
            user_id=f"u{n}",
            item_id=f"i{n % 7}",
            event_type=("view", "click", "purchase", "rating")[n % 4],
            timestamp=str(1_735_689_600 + n * 37)
            if n % 2
            else f"2025-01-0{1 + n % 9}T10:00:0{n % 10}Z",
            value=(None, "5", "2.5", str(n * 0.1))[n % 4],
            session_id=None if n % 3 else f"s{n}",
            context=None if n % 5 else '{"page":"home"}',
            event_id=None if n % 2 else f"ev-{n}",
        )
        for n in range(400)
    ]
    assert _compare(rows) == 0
    checked = check_event_rows(rows, tenant="acme", now=NOW)
    assert all(isinstance(c, dict) for c in checked)

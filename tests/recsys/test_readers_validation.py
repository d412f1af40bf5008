"""Readers and validation on small inputs whose right answer is known row by row."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import polars as pl
import pytest

from recsys.errors import EmptyInputError, RecsysError
from recsys.readers import TextLayout, read_raw
from recsys.validation import (
    derive_event_ids,
    validate_events,
    validate_items,
    validate_users,
)

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def _write(tmp_path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_csv_keeps_good_lines_and_rejects_ragged_and_badly_encoded(tmp_path):
    data = (
        b"user_id,item_id,event_type,timestamp\n"
        b"u1,i1,view,2026-10-01T10:00:00Z\n"
        b"u2,i2,view\n"  # too few fields
        b"u3,i3,purchase,1727776800\n"
        b"u\xff4,i4,view,1727776800\n"  # not UTF-8
        b"u5,i5,click,1727776800000,extra\n"  # too many fields
    )
    rows, rejects = read_raw(_write(tmp_path, "e.csv", data))
    assert rows["user_id"].to_list() == ["u1", "u3"]
    assert rows["_row"].to_list() == [2, 4]
    assert sorted(zip(rejects["row_number"], rejects["reason"], strict=True)) == [
        (3, "unparsable"),
        (5, "bad_encoding"),
        (6, "unparsable"),
    ]


def test_empty_and_header_only_files_are_clear_errors(tmp_path):
    with pytest.raises(EmptyInputError):
        read_raw(_write(tmp_path, "empty.csv", b""))
    with pytest.raises(EmptyInputError):
        read_raw(_write(tmp_path, "header.csv", b"user_id,item_id\n"))
    with pytest.raises(RecsysError, match="cannot tell the format"):
        read_raw(_write(tmp_path, "events.xlsx", b"x"))


def test_ndjson_lines_that_are_not_objects_are_rejected(tmp_path):
    data = b'{"user_id": "u1", "item_id": 7, "context": {"page": "home"}}\n[1,2]\n{bad json\n'
    rows, rejects = read_raw(_write(tmp_path, "e.ndjson", data))
    assert rows.select("user_id", "item_id", "context").row(0) == ("u1", "7", '{"page":"home"}')
    assert rejects["reason"].to_list() == ["unparsable", "unparsable"]
    assert rejects["row_number"].to_list() == [2, 3]


def test_timestamps_in_every_documented_form_parse_to_the_same_instant():
    expected = datetime(2024, 10, 1, 10, 0, tzinfo=UTC)
    raw = pl.DataFrame(
        {
            "user_id": ["u"] * 5,
            "item_id": [f"i{i}" for i in range(5)],
            "event_type": ["view"] * 5,
            "timestamp": [
                "2024-10-01T10:00:00Z",
                "2024-10-01T12:00:00+02:00",
                "1727776800",
                "1727776800000",
                "2024-10-01 10:00:00",
            ],
        }
    )
    good, rejects = validate_events(raw, tenant="default", source="t", now=NOW)
    assert rejects.height == 0
    assert good["timestamp"].to_list() == [expected] * 5


def test_each_kind_of_bad_row_gets_its_reason_and_good_rows_survive():
    raw = pl.DataFrame(
        {
            "user_id": ["u1", None, "u3", "u4", "u5", "u6", "u7", "u8", "u9"],
            "item_id": ["i1", "i2", "i3", "i4", "x" * 300, "i6", "i7", "i8", "i9"],
            "event_type": [
                "view",
                "view",
                "view",
                "hover",
                "view",
                "purchase",
                "VIEW",
                "view",
                "rating",
            ],
            "timestamp": [
                "2026-10-01T00:00:00Z",
                "2026-10-01T00:00:00Z",
                "yesterday",
                "2026-10-01T00:00:00Z",
                "2026-10-01T00:00:00Z",
                "0",
                "2026-10-02T00:00:00Z",
                "2099-01-01T00:00:00Z",
                "2026-10-01T00:00:00Z",
            ],
            "value": [None, None, None, None, None, None, None, None, "five"],
            "tenant": [None, None, None, None, None, None, None, "other", None],
        }
    )
    good, rejects = validate_events(raw, tenant="default", source="t", now=NOW)
    assert good["user_id"].to_list() == ["u1", "u7"]
    assert good["event_type"].to_list() == ["view", "view"]  # types are case-insensitive
    reasons = dict(zip(rejects["row_number"].to_list(), rejects["reason"].to_list(), strict=True))
    assert reasons == {
        2: "missing_id",
        3: "bad_timestamp",
        4: "unknown_event_type",
        5: "oversize_field",
        6: "bad_timestamp",
        8: "wrong_tenant",
        9: "bad_value",
    }
    assert '"user_id":"u3"' in rejects.filter(pl.col("row_number") == 3)["raw"][0]


def test_tenant_declared_event_types_are_accepted():
    raw = pl.DataFrame(
        {"user_id": ["u"], "item_id": ["i"], "event_type": ["wishlist"], "timestamp": [1727776800]}
    )
    assert validate_events(raw, tenant="t", source="s", now=NOW)[0].height == 0
    good, _ = validate_events(raw, tenant="t", source="s", now=NOW, extra_event_types=["wishlist"])
    assert good.height == 1


def test_derived_event_ids_are_deterministic_and_deduplicate():
    raw = pl.DataFrame(
        {
            "user_id": ["u1", "u1", "u2"],
            "item_id": ["i1", "i1", "i1"],
            "event_type": ["view"] * 3,
            "timestamp": [1727776800] * 3,
        }
    )
    good, _ = validate_events(raw, tenant="default", source="s", now=NOW)
    assert good.height == 2  # the repeated row is the same event
    again, _ = validate_events(raw.reverse(), tenant="default", source="s", now=NOW)
    assert set(good["event_id"]) == set(again["event_id"])
    # a stable hash: fixed input, fixed id, whatever the library versions
    assert derive_event_ids(good.head(1))[0] == good["event_id"][0]
    assert good["event_id"][0].startswith("e") and len(good["event_id"][0]) == 33


def test_items_parse_tags_prices_and_availability_and_reject_bad_rows():
    raw = pl.DataFrame(
        {
            "item_id": ["a", "b", "c", None, "a"],
            "price": ["9.5", "-1", "x", "3", "10"],
            "tags": ['["brand:acme", "sale"]', "category:shoes|sale", "", "t", "brand:acme,new"],
            "available": ["yes", "0", None, "1", "maybe"],
        }
    )
    good, rejects = validate_items(raw, source="s")
    assert good["item_id"].to_list() == ["a"]
    assert good.row(0, named=True)["tags"] == ["brand:acme", "sale"]
    assert dict(zip(rejects["row_number"], rejects["reason"], strict=True)) == {
        2: "bad_value",
        3: "bad_value",
        4: "missing_id",
        5: "bad_value",
    }


def test_text_layout_without_header_uses_given_names(tmp_path):
    path = _write(tmp_path, "u.data", b"1\t10\t5\t881250949\n2\t20\t3\t881250950\n")
    rows, _ = read_raw(path, "tsv", TextLayout("\t", False, ("user_id", "item_id", "r", "t")))
    assert rows.columns == ["user_id", "item_id", "r", "t", "_row"]
    assert rows["item_id"].to_list() == ["10", "20"]


def test_event_ids_are_the_same_on_the_small_and_the_vectorised_path(monkeypatch):
    from recsys import validation

    raw = pl.DataFrame(
        {
            "user_id": [f"u{i}" for i in range(50)],
            "item_id": ["i"] * 50,
            "event_type": ["view"] * 50,
            "timestamp": [1727776800 + i for i in range(50)],
            "value": [None] * 25 + [1.5] * 25,
        }
    )
    small, _ = validate_events(raw, tenant="default", source="s", now=NOW)
    monkeypatch.setattr(validation, "_VECTORISED_MD5_FROM", 0)
    large, _ = validate_events(raw, tenant="default", source="s", now=NOW)
    assert small["event_id"].to_list() == large["event_id"].to_list()


def test_values_no_cast_reads_are_rejects_or_text_not_a_crash():
    """Each of these stopped the whole build with a Polars error: a tags text that starts like
    a JSON list and is not one, a Parquet column of lists or structs where the contract has
    text, bytes that are not UTF-8, an event file without a timestamp column."""
    raw = pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "d", "e"],
            "tags": ["[broken", "[[1]]", '["x", {"y": 1}]', "[1, true]", "p|q"],
        }
    )
    good, rejects = validate_items(raw, source="s")
    assert good.select("item_id", "tags").rows() == [("d", ["1", "true"]), ("e", ["p", "q"])]
    assert rejects.select("row_number", "reason", "detail").rows() == [
        (n, "bad_value", "tags is not a JSON list of tags") for n in (1, 2, 3)
    ]
    # nested columns become the JSON text `recsys import` lands; bytes become UTF-8 text
    raw = pl.DataFrame(
        {
            "item_id": [["a", "1"], None, ["c"]],
            "title": [b"caf\xc3\xa9", b"\xff ok", None],
            "tags": [["t1", None], None, []],  # (a list of scalars: tags as they are)
            "attributes": [{"color": "red"}, None, {"color": None}],
        },
    )
    good, rejects = validate_items(raw, source="s")
    assert good.select("item_id", "title", "tags", "attributes").rows() == [
        ('["a","1"]', "café", ["t1"], '{"color":"red"}'),
        ('["c"]', None, [], '{"color":null}'),
    ]
    assert rejects.select("row_number", "reason").rows() == [(2, "missing_id")]
    assert '"title":"\ufffd ok"' in rejects["raw"][0]
    events = pl.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "event_type": ["view"]})
    good, rejects = validate_events(events, tenant="default", source="s")
    assert good.height == 0
    assert rejects.select("reason", "detail").rows() == [("bad_timestamp", "timestamp is missing")]


_ANY_DTYPE = {  # (a value and a null of each type a Parquet file can hold)
    "int": pl.Series([1, None], dtype=pl.Int64),
    "uint8": pl.Series([1, None], dtype=pl.UInt8),
    "float": pl.Series([1.5, float("nan")]),
    "bool": pl.Series([True, None]),
    "str": pl.Series(["x", None]),
    "date": pl.Series([date(2026, 1, 1), None]),
    "datetime": pl.Series([datetime(2026, 1, 1), None]),
    "datetime_tz": pl.Series([datetime(2026, 1, 1, tzinfo=UTC), None]),
    "time": pl.Series([time(10, 0), None]),
    "duration": pl.Series([timedelta(days=1, seconds=3), None]),
    "decimal": pl.Series([Decimal("1.5"), None]),
    "binary": pl.Series([b"\xff", None]),
    "list": pl.Series([[1], None]),
    "list_str": pl.Series([["a"], None]),
    "struct": pl.Series([{"a": 1}, None]),
    "array": pl.Series([[1, 2], None], dtype=pl.Array(pl.Int64, 2)),
    "null": pl.Series([None, None], dtype=pl.Null),
    "categorical": pl.Series(["a", None], dtype=pl.Categorical),
}


@pytest.mark.parametrize("kind", ["events", "items", "users"])
def test_a_column_of_any_parquet_type_gives_rows_or_rejects(kind):
    """Every contract column of every kind, as each type a Parquet file can hold: each of the
    two rows is a valid row of the contract's schema or a reject, never an error."""
    from recsys.contract import SCHEMAS

    base = {
        "events": {
            "user_id": ["u1", "u2"],
            "item_id": ["i1", "i2"],
            "event_type": ["view", "view"],
            "timestamp": ["2026-10-01T00:00:00Z"] * 2,
        },
        "items": {"item_id": ["a", "b"]},
        "users": {"user_id": ["a", "b"]},
    }[kind]
    validate = {
        "events": lambda df: validate_events(df, tenant="default", source="s", now=NOW),
        "items": lambda df: validate_items(df, source="s"),
        "users": lambda df: validate_users(df, source="s"),
    }[kind]
    for column in SCHEMAS[kind]:
        for name, values in _ANY_DTYPE.items():
            good, rejects = validate(pl.DataFrame(base).with_columns(values.alias(column)))
            assert good.height + rejects.height == 2, (column, name)
            assert good.schema == pl.Schema(SCHEMAS[kind]), (column, name)

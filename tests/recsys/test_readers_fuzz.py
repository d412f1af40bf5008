"""Readers never crash: any bytes give rows plus rejects with reasons, or a one-line
`RecsysError` when the input as a whole cannot be read (empty, no header, a corrupt Parquet
footer). Anything else raised is a crash. Bounded hypothesis runs (seeded through
`derandomize`, so CI runs the same examples) over CSV, TSV, NDJSON, Parquet, stream messages
and the whole `recsys import` path; plus the known cases, starting with the unterminated quote
that used to end `recsys import events bad.csv` with a Polars ShapeError.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.contract import REJECT_REASONS, REJECTED_SCHEMA
from recsys.errors import RecsysError
from recsys.ingest import import_file
from recsys.readers import TextLayout, read_bytes, read_messages, read_raw
from recsys.storage import Storage

FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HEADER = b"user_id,item_id,event_type,timestamp,value\n"
GOOD = b"u1,i1,view,2024-03-01T10:00:00Z,1\n"
# characters that matter to a CSV parser, a JSON parser and a decoder
TRICKY = st.sampled_from(
    [",", '"', "\t", "\n", "\r", "\r\n", ";", "\\", " ", "\x00", "\x0b", "\x85", "\u2028",
     "é", "{", "}", "[", "]", ":", "null", "NA", "_row", "'", "\ufeff"]
)  # fmt: skip
TEXT = st.lists(st.one_of(TRICKY, st.text(min_size=0, max_size=6)), min_size=0, max_size=60).map(
    "".join
)
ENCODED = st.one_of(
    TEXT.map(lambda t: t.encode("utf-8", errors="surrogatepass")),
    st.binary(max_size=400),
    st.tuples(TEXT, st.binary(max_size=20)).map(lambda p: p[0].encode("utf-8", "replace") + p[1]),
)


def check_result(result: tuple[pl.DataFrame, pl.DataFrame]) -> None:
    rows, rejects = result
    assert isinstance(rows, pl.DataFrame) and isinstance(rejects, pl.DataFrame)
    assert "_row" in rows.columns and rows.schema["_row"] == pl.Int64
    assert dict(rejects.schema) == dict(REJECTED_SCHEMA)
    assert rejects["reason"].null_count() == 0 and rejects["detail"].null_count() == 0
    assert set(rejects["reason"]) <= set(REJECT_REASONS)  # (the contract's list of reasons)
    numbers = rows["_row"].to_list() + rejects["row_number"].to_list()
    assert None not in numbers and len(set(numbers)) == len(numbers)  # each line once


def read_or_refuse(read, *args) -> None:
    """Call a reader: rows + rejects, or a RecsysError; any other exception fails the test."""
    try:
        result = read(*args)
    except RecsysError as exc:
        assert str(exc) and "\n" not in str(exc).strip() or len(str(exc)) < 5000
        return
    check_result(result)


# --- known cases ---------------------------------------------------------------------------------
def test_unterminated_quote_is_one_reject_and_the_lines_after_it_land():
    data = HEADER + GOOD + b'u2,"i2,view,2024-03-01T10:00:00Z,1\n' + b"u3,i3,view,2024,1\n"
    rows, rejects = read_bytes(data, "csv", None, "bad.csv")
    assert rows["user_id"].to_list() == ["u1", "u3"] and rows["_row"].to_list() == [2, 4]
    assert rejects["row_number"].to_list() == [3]
    assert rejects["reason"].to_list() == ["unparsable"]
    assert "unexpected end of data" in rejects["detail"][0]


def test_quoted_delimiters_and_short_lines():
    data = HEADER + b'u1,"i,1",view,2024-03-01T10:00:00Z,1\nu2,i2\n"u3",i3,click,2024,\n'
    rows, rejects = read_bytes(data, "csv")
    assert rows["item_id"].to_list() == ["i,1", "i3"] and rows["_row"].to_list() == [2, 4]
    assert rejects["row_number"].to_list() == [3] and "expected 5" in rejects["detail"][0]


def test_ndjson_and_messages_keep_good_records_around_bad_ones():
    data = b'{"user_id":"u1","item_id":"i1"}\n[1,2]\n{"user_id": \n{"user_id":"u2","_row":5}\n'
    rows, rejects = read_bytes(data + b'{"user_id":"u3"}\n', "ndjson")
    assert rows["user_id"].to_list() == ["u1", "u3"] and rows["_row"].to_list() == [1, 5]
    assert rejects["row_number"].to_list() == [2, 3, 4]
    rows, rejects = read_messages([b'{"user_id":"u1"}', b"\xff\xfe", b"not json", b'{"a":1}'])
    assert rows["_row"].to_list() == [1, 4]
    assert rejects["reason"].to_list() == ["bad_encoding", "unparsable"]


def test_corrupt_parquet_row_group_becomes_rejects(tmp_path):
    table = pa.table({"user_id": [f"u{i}" for i in range(30)], "item_id": ["i"] * 30})
    path = tmp_path / "x.parquet"
    pq.write_table(table, path, row_group_size=10, compression="none")
    rows, rejects = read_raw(str(path))
    assert rows.height == 30 and rejects.height == 0
    data = bytearray(path.read_bytes())
    meta = pq.ParquetFile(path).metadata
    col = meta.row_group(1).column(0)
    start = col.dictionary_page_offset or col.data_page_offset
    data[start : start + col.total_compressed_size] = b"\xff" * col.total_compressed_size
    path.write_bytes(bytes(data))
    try:
        rows, rejects = read_raw(str(path))
    except RecsysError:
        pytest.fail("a corrupt row group should be rejects, not a whole-file error")
    check_result((rows, rejects))
    assert rows["_row"].to_list() == [*range(1, 11), *range(21, 31)]
    assert rejects.height == 10 and set(rejects["reason"]) == {"unparsable"}


def test_recsys_import_of_an_unterminated_quote_lands_the_good_rows(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(HEADER + GOOD + b'u2,"i2,view,2024-03-01T10:00:00Z,1\n' + GOOD)
    cmd = [sys.executable, "-m", "recsys.cli", "--data-root", str(tmp_path / "data")]
    out = subprocess.run(
        [*cmd, "import", "events", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    assert "1 unparsable" in out.stdout + out.stderr or "unparsable" in out.stdout + out.stderr


# --- fuzzing --------------------------------------------------------------------------------------
@FUZZ
@given(body=ENCODED, header=st.booleans(), fmt=st.sampled_from(["csv", "tsv"]))
def test_fuzz_delimited(body, header, fmt):
    data = (HEADER.replace(b",", b"\t") if fmt == "tsv" else HEADER) if header else b""
    read_or_refuse(read_bytes, data + body, fmt, None, "fuzz")


@FUZZ
@given(
    body=ENCODED,
    delimiter=st.sampled_from([",", ";", "|", "\t", "::", "", '"', "x"]),
    quoted=st.booleans(),
    encoding=st.sampled_from(["utf-8", "latin-1", "utf-16", "no-such-codec"]),
)
def test_fuzz_layouts(body, delimiter, quoted, encoding):
    layout = TextLayout(
        delimiter=delimiter,
        has_header=False,
        column_names=("user_id", "item_id", "event_type"),
        encoding=encoding,
        quoted=quoted,
    )
    read_or_refuse(read_bytes, body, "csv", layout, "fuzz")


JSON_LINE = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(
    lines=st.lists(
        st.one_of(
            JSON_LINE.map(lambda v: __import__("json").dumps(v).encode()),
            ENCODED,
            st.just(b'{"user_id": "u", "item_id": 1e999}'),
            st.just(b'{"a": 123456789012345678901234567890}'),
            st.just(b"[" * 2000),
        ),
        max_size=12,
    )
)
def test_fuzz_ndjson_and_messages(lines):
    read_or_refuse(read_bytes, b"\n".join(lines), "ndjson", None, "fuzz")
    read_or_refuse(read_messages, lines)


def _parquet_bytes() -> bytes:
    table = pa.table(
        {
            "user_id": [f"u{i}" for i in range(40)],
            "item_id": [f"i{i % 7}" for i in range(40)],
            "value": [float(i) for i in range(40)],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=10, compression="none")
    return buf.getvalue()


PARQUET = _parquet_bytes()


@FUZZ
@given(
    cuts=st.lists(
        st.tuples(st.integers(0, len(PARQUET) - 1), st.binary(min_size=1, max_size=8)),
        max_size=4,
    ),
    truncate=st.one_of(st.none(), st.integers(0, len(PARQUET))),
)
def test_fuzz_parquet(cuts, truncate):
    data = bytearray(PARQUET)
    for at, junk in cuts:
        data[at : at + len(junk)] = junk
    if truncate is not None:
        data = data[:truncate]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f.parquet")
        with open(path, "wb") as f:
            f.write(data)
        read_or_refuse(read_raw, path)


@settings(FUZZ, max_examples=60)
@given(body=ENCODED, kind=st.sampled_from(["events", "items", "users"]))
def test_fuzz_the_import_path(body, kind):
    """`recsys import` end to end (read, validate, land) on fuzzed CSV after a good header."""
    header = {
        "events": HEADER,
        "items": b"item_id,title,price,tags\n",
        "users": b"user_id,segment\n",
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.csv")
        with open(path, "wb") as f:
            f.write(header[kind] + body)
        try:
            result = import_file(Storage(os.path.join(tmp, "data")), kind, path, tenant="t1")
        except RecsysError:
            return
        assert result.rows >= 1
        assert set(result.would_reject) <= set(REJECT_REASONS)

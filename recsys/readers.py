"""Reading CSV, TSV, NDJSON and Parquet files into raw string tables, row by row tolerant.

A malformed line never stops a read: it is kept in a rejects table with its reason and line
number while every good line is returned. Types are not decided here; the validation step does
that against the data contract.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
from fsspec.core import url_to_fs

from recsys.contract import REJECTED_SCHEMA
from recsys.errors import EmptyInputError, RecsysError

FORMATS = ("csv", "tsv", "ndjson", "parquet")
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "ndjson",
    ".parquet": "parquet",
    ".pq": "parquet",
}
MAX_RAW_CHARS = 2_000  # how much of an offending line a reject keeps


@dataclass(frozen=True)
class TextLayout:
    """How a delimited text file is laid out."""

    delimiter: str = ","
    has_header: bool = True
    column_names: tuple[str, ...] | None = None
    encoding: str = "utf-8"
    quoted: bool = True


def detect_format(path: str) -> str:
    """The format named by the file's extension (.csv, .tsv, .ndjson/.jsonl, .parquet)."""
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst"):
        name = name.removesuffix(suffix)
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise RecsysError(
            f"cannot tell the format of {path!r} from its extension; pass --format "
            f"(one of {', '.join(FORMATS)})"
        )
    return _EXTENSIONS[ext]


def rejects_frame(rows: list[dict]) -> pl.DataFrame:
    """A rejects table (recsys.contract.REJECTED_SCHEMA) from a list of dicts."""
    if not rows:
        return pl.DataFrame(schema=REJECTED_SCHEMA)
    return pl.DataFrame(rows, schema=REJECTED_SCHEMA)


def read_raw(
    path: str, fmt: str | None = None, layout: TextLayout | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read one file into (rows, rejects).

    rows: one column per source field (strings for text formats, native types for Parquet) plus
    `_row` (1-based line or row number). rejects: REJECTED_SCHEMA rows for lines that could not be
    decoded or parsed.
    """
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise RecsysError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    fs, fpath = url_to_fs(path)
    if not fs.exists(fpath):
        raise RecsysError(f"no such file: {path}")
    if fmt == "parquet":
        try:
            df = pl.read_parquet(fs.open(fpath, "rb"))
        except Exception as exc:  # a corrupt Parquet file is one whole unparsable input
            raise RecsysError(f"{path} is not a readable Parquet file: {exc}") from exc
        if df.height == 0:
            raise EmptyInputError(f"{path} holds no rows")
        return df.with_row_index("_row", offset=1).with_columns(pl.col("_row").cast(pl.Int64)), (
            rejects_frame([])
        )
    with fs.open(fpath, "rb", compression="infer") as fh:
        data = fh.read()
    if not data.strip():
        raise EmptyInputError(f"{path} is empty")
    layout = layout or TextLayout(delimiter="\t" if fmt == "tsv" else ",")
    text_lines, rejects = _decode_lines(data, layout.encoding, path)
    if fmt == "ndjson":
        rows, more = _parse_ndjson(text_lines, path)
    else:
        rows, more = _parse_delimited(text_lines, layout, path)
    rejects.extend(more)
    return rows, rejects_frame(rejects)


def _decode_lines(data: bytes, encoding: str, path: str) -> tuple[list[tuple[int, str]], list]:
    """Split into (line number, text) pairs; lines that do not decode become rejects."""
    rejects: list[dict] = []
    try:
        text = data.decode(encoding)
        lines = list(enumerate(text.splitlines(), start=1))
    except UnicodeDecodeError:
        lines = []
        for n, raw in enumerate(data.splitlines(), start=1):
            try:
                lines.append((n, raw.decode(encoding)))
            except UnicodeDecodeError as exc:
                rejects.append(
                    {
                        "source_file": path,
                        "row_number": n,
                        "reason": "bad_encoding",
                        "detail": f"not valid {encoding}: {exc.reason} at byte {exc.start}",
                        "raw": raw.decode(encoding, errors="replace")[:MAX_RAW_CHARS],
                    }
                )
    return [(n, t) for n, t in lines if t.strip()], rejects


def _parse_delimited(
    lines: list[tuple[int, str]], layout: TextLayout, path: str
) -> tuple[pl.DataFrame, list]:
    if not lines:
        raise EmptyInputError(f"{path} has no readable lines")
    if layout.has_header:
        header_no, header = lines[0]
        names = next(csv.reader([header], delimiter=layout.delimiter))
        names = [n.strip() for n in names]
        body = lines[1:]
    else:
        names = list(layout.column_names or [])
        body = lines
    if layout.column_names and layout.has_header:
        names = list(layout.column_names)
    if not names:
        raise RecsysError(f"{path}: no column names (pass a header or a column mapping)")
    if len(set(names)) != len(names):
        raise RecsysError(f"{path}: duplicate column names in header: {names}")
    if not body:
        raise EmptyInputError(f"{path} has a header but no rows")
    line_numbers = [n for n, _ in body]
    rejects: list[dict] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        # row.number counts lines within the buffer we hand pyarrow (1-based).
        idx = (row.number or 0) - 1
        src_line = line_numbers[idx] if 0 <= idx < len(line_numbers) else None
        rejects.append(
            {
                "source_file": path,
                "row_number": src_line,
                "reason": "unparsable",
                "detail": f"expected {row.expected_columns} fields, got {row.actual_columns}",
                "raw": (row.text or "")[:MAX_RAW_CHARS],
            }
        )
        return "skip"

    buf = ("\n".join(t for _, t in body) + "\n").encode("utf-8")
    table = pacsv.read_csv(
        io.BytesIO(buf),
        read_options=pacsv.ReadOptions(column_names=names, use_threads=False),  # row numbers
        parse_options=pacsv.ParseOptions(
            delimiter=layout.delimiter,
            quote_char='"' if layout.quoted else False,
            invalid_row_handler=on_invalid,
            newlines_in_values=False,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
        ),
    )
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    skipped = {r["row_number"] for r in rejects}
    kept_numbers = [n for n in line_numbers if n not in skipped]
    df = df.with_columns(pl.Series("_row", kept_numbers, dtype=pl.Int64))
    return df, rejects


def _parse_ndjson(lines: list[tuple[int, str]], path: str) -> tuple[pl.DataFrame, list]:
    records: list[dict] = []
    numbers: list[int] = []
    rejects: list[dict] = []
    for n, text in lines:
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            rejects.append(_reject(path, n, "unparsable", f"invalid JSON: {exc}", text))
            continue
        if not isinstance(obj, dict):
            rejects.append(_reject(path, n, "unparsable", "line is not a JSON object", text))
            continue
        records.append(obj)
        numbers.append(n)
    if not records:
        return pl.DataFrame({"_row": pl.Series([], dtype=pl.Int64)}), rejects
    columns: dict[str, list] = {}
    for i, rec in enumerate(records):
        for key in rec:
            if key not in columns:
                columns[key] = [None] * i
        for key, col in columns.items():
            col.append(_as_text(rec.get(key)))
    df = pl.DataFrame({k: pl.Series(k, v, dtype=pl.String) for k, v in columns.items()})
    return df.with_columns(pl.Series("_row", numbers, dtype=pl.Int64)), rejects


def _as_text(value: object) -> str | None:
    """Scalars as text, lists/objects as compact JSON (tags and context stay structured)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if isinstance(value, float) else str(value)
    return orjson.dumps(value).decode()


def _reject(path: str, n: int, reason: str, detail: str, raw: str) -> dict:
    return {
        "source_file": path,
        "row_number": n,
        "reason": reason,
        "detail": detail,
        "raw": raw[:MAX_RAW_CHARS],
    }

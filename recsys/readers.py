"""Reading CSV, TSV, NDJSON and Parquet files into raw string tables, row by row tolerant.

A malformed line never stops a read: it is kept in a rejects table with its reason and line
number while every good line is returned. Types are not decided here; the validation step does
that against the data contract.

Any bytes give rows plus rejects, or -- when the input as a whole cannot be read (empty, no
header, a corrupt Parquet footer, an unknown encoding) -- a `RecsysError` with a one-line
message; never another exception (`tests/recsys/test_readers_fuzz.py` fuzzes every reader).
Delimited text goes through pyarrow's parser, except lines whose quotes do not pair up (an
unterminated quote would swallow the lines after it): those are parsed one by one with Python's
`csv` module (strict), and a read whose rows and rejects do not account for every line is
parsed again that way. Parquet is read row group by row group: an unreadable group becomes
rejects of its rows. Stream messages (`read_messages`) are JSON objects, one per message.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
from dataclasses import dataclass

import orjson
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from recsys.contract import REJECTED_SCHEMA
from recsys.errors import EmptyInputError, RecsysError
from recsys.features import landing_text

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
ROW_COLUMN = "_row"  # the 1-based line (row, message) number every reader adds
_NULLS = frozenset(pacsv.ConvertOptions().null_values)  # what pyarrow reads as null


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
        return _read_parquet(fs, fpath, path)
    try:
        with fs.open(fpath, "rb", compression="infer") as fh:
            data = fh.read()
    except (OSError, EOFError, ValueError, RuntimeError) as exc:  # a corrupt .gz / .bz2 / .zst
        raise RecsysError(f"{path} cannot be decompressed: {exc}") from exc
    return read_bytes(data, fmt, layout, path)


def read_bytes(
    data: bytes, fmt: str, layout: TextLayout | None = None, source: str = "<bytes>"
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`read_raw` of text formats (csv, tsv, ndjson) on bytes already in memory."""
    if fmt not in ("csv", "tsv", "ndjson"):
        raise RecsysError(f"read_bytes reads csv, tsv or ndjson, not {fmt!r}")
    if not data.strip():
        raise EmptyInputError(f"{source} is empty")
    layout = layout or TextLayout(delimiter="\t" if fmt == "tsv" else ",")
    _check_layout(layout)
    text_lines, rejects = _decode_lines(data, layout.encoding, source)
    if fmt == "ndjson":
        rows, more = _parse_ndjson(text_lines, source)
    else:
        rows, more = _parse_delimited(text_lines, layout, source)
    rejects.extend(more)
    return rows, rejects_frame(rejects)


def read_messages(
    messages: list[bytes], source: str = "stream", numbers: list[int] | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Stream messages (each one JSON object, as bytes) as (rows, rejects) like NDJSON lines:
    `_row` is the message's number (`numbers`, e.g. stream sequence numbers; else its position
    from 1); a message that is not UTF-8 or not a JSON object becomes a reject with its reason,
    and the good messages around it are kept."""
    lines: list[tuple[int, str]] = []
    rejects: list[dict] = []
    for n, raw in zip(numbers or range(1, len(messages) + 1), messages, strict=True):
        try:
            lines.append((n, bytes(raw).decode("utf-8")))
        except UnicodeDecodeError as exc:
            rejects.append(
                _reject(
                    source,
                    n,
                    "bad_encoding",
                    f"not valid utf-8: {exc.reason} at byte {exc.start}",
                    bytes(raw).decode("utf-8", errors="replace"),
                )
            )
    rows, more = _parse_ndjson(lines, source)
    rejects.extend(more)
    return rows, rejects_frame(rejects)


def _check_layout(layout: TextLayout) -> None:
    if len(layout.delimiter) != 1 or layout.delimiter in '\r\n"':
        raise RecsysError(
            f"the delimiter must be one character other than a quote or a line break, "
            f"not {layout.delimiter!r}"
        )
    try:
        codecs.lookup(layout.encoding)
    except LookupError as exc:
        raise RecsysError(f"unknown encoding {layout.encoding!r}") from exc


def _read_parquet(fs, fpath: str, path: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Row group by row group: a group that cannot be read becomes rejects of its rows (or of
    the group, when even its row count is unknown); a file whose footer cannot be read is one
    whole unparsable input (RecsysError)."""
    with fs.open(fpath, "rb") as fh:
        try:
            pf = pq.ParquetFile(fh, pre_buffer=False)
        except Exception as exc:  # a corrupt footer: the file as a whole is unreadable
            raise RecsysError(f"{path} is not a readable Parquet file: {exc}") from exc
        try:
            frames, rejects = _row_groups(pf, path)
        finally:
            pf.close()
    if not frames and not rejects:
        raise EmptyInputError(f"{path} holds no rows")
    try:
        rows = pl.concat(frames, how="vertical_relaxed") if frames else _no_rows()
    except Exception as exc:  # row groups of incompatible types
        raise RecsysError(f"{path}: its row groups do not share one schema: {exc}") from exc
    if rows.height == 0 and not rejects:
        raise EmptyInputError(f"{path} holds no rows")
    return rows, rejects_frame(rejects)


def _row_groups(pf: pq.ParquetFile, path: str) -> tuple[list[pl.DataFrame], list[dict]]:
    try:
        names = pf.schema_arrow.names
        groups = pf.metadata.num_row_groups
    except Exception as exc:  # a schema pyarrow cannot map
        raise RecsysError(f"{path} is not a readable Parquet file: {exc}") from exc
    if ROW_COLUMN in names:
        raise RecsysError(f"{path}: the column name {ROW_COLUMN!r} is reserved")
    frames: list[pl.DataFrame] = []
    rejects: list[dict] = []
    start = 1
    for g in range(groups):
        try:
            n = max(int(pf.metadata.row_group(g).num_rows), 1)
        except Exception:  # unreadable group metadata: one reject for the group
            n = 1
        try:
            frame = pl.from_arrow(pf.read_row_group(g, use_threads=False))
            assert isinstance(frame, pl.DataFrame)
            frames.append(
                frame.with_columns(
                    pl.Series(ROW_COLUMN, range(start, start + frame.height), dtype=pl.Int64)
                )
            )
            start += frame.height
        except Exception as exc:  # a corrupt page, an undecodable value, an odd type
            detail = f"row group {g} unreadable: {type(exc).__name__}: {exc}"[:MAX_RAW_CHARS]
            rejects.extend(_reject(path, start + i, "unparsable", detail, "") for i in range(n))
            start += n
    return frames, rejects


def _no_rows() -> pl.DataFrame:
    return pl.DataFrame({ROW_COLUMN: pl.Series([], dtype=pl.Int64)})


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
        _, header = lines[0]
        try:
            names = next(csv.reader([header], delimiter=layout.delimiter, strict=True))
        except (csv.Error, StopIteration) as exc:
            raise RecsysError(f"{path}: the header line cannot be parsed: {exc}") from exc
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
    if ROW_COLUMN in names:
        raise RecsysError(f"{path}: the column name {ROW_COLUMN!r} is reserved")
    if not body:
        raise EmptyInputError(f"{path} has a header but no rows")
    quote = '"' if layout.quoted else None
    if quote is None:
        fast, slow = body, []
    else:  # a line with an unpaired quote would run on into the next lines under pyarrow
        odd = [i for i, (_, t) in enumerate(body) if t.count(quote) & 1]
        if odd:
            unpaired = set(odd)
            slow = [body[i] for i in odd]
            fast = [line for i, line in enumerate(body) if i not in unpaired]
        else:
            fast, slow = body, []
    try:
        df, rejects = _pyarrow_lines(fast, names, layout, path) if fast else (None, [])
    except (pa.ArrowException, ValueError, IndexError):  # e.g. a value over pyarrow's limits
        df, rejects = None, None
    if df is None and fast:
        df, rejects = _python_lines(fast, names, layout, path)
    if slow:
        more, more_rejects = _python_lines(slow, names, layout, path)
        df = more if df is None else pl.concat([df, more]).sort(ROW_COLUMN)
        rejects = sorted([*rejects, *more_rejects], key=lambda r: r["row_number"])
    assert df is not None and rejects is not None
    return df, rejects


def _pyarrow_lines(
    body: list[tuple[int, str]], names: list[str], layout: TextLayout, path: str
) -> tuple[pl.DataFrame | None, list]:
    """Lines parsed by pyarrow, or (None, []) when its rows and rejects do not account for
    every line one to one (then the caller parses them with `_python_lines`)."""
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

    buf = ("\n".join(t for _, t in body) + "\n").encode("utf-8", errors="surrogatepass")
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
    skipped = [r["row_number"] for r in rejects]
    if (
        None in skipped
        or len(set(skipped)) != len(skipped)
        or table.num_rows + len(skipped) != len(body)
        or any("\n" in (r["raw"] or "") for r in rejects)
    ):
        return None, []
    df = pl.from_arrow(table)
    assert isinstance(df, pl.DataFrame)
    gone = set(skipped)
    kept_numbers = [n for n in line_numbers if n not in gone]
    return df.with_columns(pl.Series(ROW_COLUMN, kept_numbers, dtype=pl.Int64)), rejects


def _python_lines(
    body: list[tuple[int, str]], names: list[str], layout: TextLayout, path: str
) -> tuple[pl.DataFrame, list]:
    """Each line parsed on its own by Python's csv module (strict quoting): a line that does
    not parse, or has another number of fields than the header, is a reject."""
    columns: list[list[str | None]] = [[] for _ in names]
    numbers: list[int] = []
    rejects: list[dict] = []
    quoting = csv.QUOTE_MINIMAL if layout.quoted else csv.QUOTE_NONE
    for n, text in body:
        try:
            fields = next(
                csv.reader([text], delimiter=layout.delimiter, strict=True, quoting=quoting)
            )
        except (csv.Error, StopIteration) as exc:
            rejects.append(_reject(path, n, "unparsable", f"cannot parse the line: {exc}", text))
            continue
        if len(fields) != len(names):
            detail = f"expected {len(names)} fields, got {len(fields)}"
            rejects.append(_reject(path, n, "unparsable", detail, text))
            continue
        for col, value in zip(columns, fields, strict=True):
            col.append(None if value in _NULLS else value)
        numbers.append(n)
    df = pl.DataFrame(
        {
            **{
                name: pl.Series(name, col, dtype=pl.String)
                for name, col in zip(names, columns, strict=True)
            },
            ROW_COLUMN: pl.Series(ROW_COLUMN, numbers, dtype=pl.Int64),
        }
    )
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
        if ROW_COLUMN in obj:
            detail = f"the field name {ROW_COLUMN!r} is reserved"
            rejects.append(_reject(path, n, "unparsable", detail, text))
            continue
        records.append(obj)
        numbers.append(n)
    if not records:
        return _no_rows(), rejects
    columns: dict[str, list] = {}
    for i, rec in enumerate(records):
        for key in rec:
            if key not in columns:
                columns[key] = [None] * i
        for key, col in columns.items():
            col.append(landing_text(rec.get(key)))
    df = pl.DataFrame(
        {
            **{k: pl.Series(k, v, dtype=pl.String) for k, v in columns.items()},
            ROW_COLUMN: pl.Series(ROW_COLUMN, numbers, dtype=pl.Int64),
        }
    )
    return df, rejects


def _reject(path: str, n: int, reason: str, detail: str, raw: str) -> dict:
    return {
        "source_file": path,
        "row_number": n,
        "reason": reason,
        "detail": detail,
        "raw": raw[:MAX_RAW_CHARS],
    }

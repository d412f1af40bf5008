"""Crash-safe writes: write a temporary file in the target's folder, fsync it, rename it over
the target (atomic on POSIX), fsync the folder so the rename itself survives a crash.

Every durable document of the project (tenant config and rules, experiments, seeds, record
stores, the snapshot `CURRENT` pointer and manifest, ingest state, training metadata) is
written by `write_atomic`, and every Parquet file another process may pick up (landing files
of imports, the demo, the API's event log and CRR records, tombstones, warehouse parts, staged
shards) by `write_parquet_atomic`; `fsync_dir` makes a new or removed name in a folder
durable. Both writers take the fsspec filesystem of a `recsys.storage.Storage` root: on an
object store the temporary object is moved into place (an object appears whole; there is
nothing to fsync). A batch of files that only matters once a later record points at them (the
warehouse parts of an ingest run, then its state) is written with `sync=False` and made durable
at once by `sync_all` before that record: one flush instead of two fsyncs a file (on a busy
disk an fsync can take 100 ms).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterable
from typing import IO, Any


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in folder `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, fs: Any = None, *, sync: bool = True) -> None:
    """Replace `path` with `data` so a reader (or a crash) sees the old or the new content,
    never a mix; returns once both the content and the rename are on disk (with `sync=False`:
    once a reader sees it; then `sync_all` before anything relies on it surviving a crash)."""
    _replace(path, fs, lambda f: f.write(data), sync)


def write_parquet_atomic(
    df: Any, path: str, fs: Any = None, *, sync: bool = True, **options: Any
) -> None:
    """Write the Polars DataFrame `df` as Parquet at `path` so that a reader (a sensor, another
    process, a restart after a crash) finds no file or the whole file, never part of one.
    `options` go to `DataFrame.write_parquet` (compression defaults to zstd); `sync` as for
    `write_atomic`."""
    options.setdefault("compression", "zstd")
    _replace(path, fs, lambda f: df.write_parquet(f, **options), sync)


def write_parquet_parts_atomic(
    parts: Iterable[Any], path: str, fs: Any = None, *, sync: bool = True
) -> int:
    """`write_parquet_atomic` of the Polars DataFrames `parts` one after another (the same
    schema), holding one part at a time: the file holds their rows in order, as one frame of
    them all would, each part one row group (an empty part too). At least one part. Returns
    the number of rows written."""
    import pyarrow.parquet as pq

    rows = 0

    def write(f: IO[bytes]) -> None:
        nonlocal rows
        writer = None
        try:
            for part in parts:
                table = part.to_arrow()
                if writer is None:
                    writer = pq.ParquetWriter(f, table.schema, compression="zstd")
                writer.write_table(table, row_group_size=max(1, table.num_rows))
                rows += table.num_rows
            if writer is None:
                raise ValueError("write_parquet_parts_atomic needs at least one part")
        finally:
            if writer is not None:
                writer.close()

    _replace(path, fs, write, sync)
    return rows


def sync_all(fs: Any = None) -> None:
    """Make every file written so far durable at once (files written with `sync=False`, and
    their renames): `os.sync()` on a local root, nothing on an object store."""
    if fs is None or "file" in _protocols(fs):
        os.sync()


def _replace(path: str, fs: Any, write: Callable[[IO[bytes]], Any], sync: bool) -> None:
    """`write` into a temporary file beside `path`, then move it over `path` durably."""
    if path.startswith("file://"):
        path = path[len("file://") :]
    elif fs is not None and "file" not in _protocols(fs):
        folder, name = path.rsplit("/", 1)
        tmp = f"{folder}/.{name}.{uuid.uuid4().hex}.tmp"
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, path)
        return
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if sync:
        fsync_dir(folder)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)

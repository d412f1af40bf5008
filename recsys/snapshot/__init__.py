"""Versioned serving snapshots: format, writer, reader, publication store and scoring kernel.

Dagster-free and Falcon-free; see docs/snapshot-format.md.
"""

from recsys.snapshot.format import REASON_CODES, REASONS, SCHEMA_VERSION, SIGNALS
from recsys.snapshot.reader import Snapshot, SnapshotError, open_snapshot, verify_checksums
from recsys.snapshot.store import DiffReport, SnapshotInfo, SnapshotStore, diff_snapshots

_WRITER_NAMES = ("SnapshotWriter", "connect_duckdb", "write_snapshot")


def __getattr__(name: str):
    # The writer pulls in Polars, PyArrow and DuckDB; server workers only read snapshots, so it
    # is imported on first use (about 40 MB and 150 ms less per gunicorn worker).
    if name in _WRITER_NAMES:
        from recsys.snapshot import writer

        return getattr(writer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "REASONS",
    "REASON_CODES",
    "SCHEMA_VERSION",
    "SIGNALS",
    "DiffReport",
    "Snapshot",
    "SnapshotError",
    "SnapshotInfo",
    "SnapshotStore",
    "SnapshotWriter",
    "connect_duckdb",
    "diff_snapshots",
    "open_snapshot",
    "verify_checksums",
    "write_snapshot",
]

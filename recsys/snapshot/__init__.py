"""Versioned serving snapshots: format, writer, reader, publication store and scoring kernel.

Dagster-free and Falcon-free; see docs/snapshot-format.md.
"""

from recsys.snapshot.format import REASON_CODES, REASONS, SCHEMA_VERSION, SIGNALS
from recsys.snapshot.reader import Snapshot, SnapshotError, open_snapshot, verify_checksums
from recsys.snapshot.store import DiffReport, SnapshotInfo, SnapshotStore, diff_snapshots
from recsys.snapshot.writer import SnapshotWriter, connect_duckdb, write_snapshot

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

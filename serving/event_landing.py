"""The flush of an event log to landing: closed segments become contract Parquet for ingest.

``flush_tenant`` turns each closed segment of ``serving/events/<tenant>/wal/`` into
``landing/<tenant>/events/api-<segment>-<folder tag>.parquet`` (written whole by
`recsys.durable.write_parquet_atomic`; a deterministic name, so a flush interrupted before the
segment is deleted lands it once), then deletes the segment. Deleted events still in the
segment are dropped; the segment's tombstones are written to
``serving/events/<tenant>/tombstones/`` for ingest to apply to events that had already landed
(`read_tombstones`). A ``flush.lock`` flock serialises flushers of all processes. The landing
sensor picks the files up like imported files.
"""

from __future__ import annotations

import fcntl
import os
import zlib

import orjson
import polars as pl

from recsys.durable import fsync_dir, write_parquet_atomic
from recsys.storage import Storage
from recsys.tenancy import check_tenant
from serving.event_records import EVENT_HEAD, payloads_frame
from serving.segment_log import frames, list_segments, segment_name


def log_dir(data_root: str, tenant: str) -> str:
    """The event log folder of `tenant` (`ValueError` for an id that is not a tenant id)."""
    return os.path.join(data_root, "serving", "events", check_tenant(tenant))


def flush_tenant(data_root: str, tenant: str, blocking: bool = False) -> list[str]:
    """Land every closed segment of `tenant` as Parquet and delete it; returns the landed paths.

    Safe to run from any process at any time (a `flush.lock` flock serialises flushers; with
    `blocking=False` a flush already running elsewhere makes this return []).
    """
    directory = log_dir(data_root, tenant)
    wal_dir = os.path.join(directory, "wal")
    segs = list_segments(wal_dir)
    if len(segs) < 2:
        return []
    os.makedirs(directory, exist_ok=True)
    fd = os.open(os.path.join(directory, "flush.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            return []
        storage = Storage(data_root)
        landing = storage.landing_dir(tenant, "events")
        os.makedirs(landing, exist_ok=True)
        tomb_dir = storage.tombstones_dir(tenant)
        os.makedirs(tomb_dir, exist_ok=True)
        deleted = read_tombstones(data_root, tenant)
        landed = []
        for seg in list_segments(wal_dir)[:-1]:  # never the newest: it is (or becomes) active
            path = os.path.join(wal_dir, segment_name(seg))
            with open(path, "rb") as f:
                payloads, _ = frames(f.read())
            if not payloads or orjson.loads(payloads[-1][1]).get("k") != "end":
                break  # the active segment (or one being written): stop here, keep order
            tombs: dict[str, int] = {}
            event_payloads = []
            for _, payload in payloads:
                if payload.startswith(EVENT_HEAD):  # parsed together by Polars below
                    event_payloads.append(payload)
                    continue
                rec = orjson.loads(payload)
                if rec.get("k") == "t":
                    tombs[rec["id"]] = rec["at"]
                elif rec.get("k") == "e":
                    event_payloads.append(payload)
            deleted.update(tombs)
            events = payloads_frame(event_payloads, tenant)
            if deleted and events.height:
                events = events.filter(~pl.col("event_id").is_in(list(deleted)))
            stem = f"api-{segment_name(seg)[:-4]}-{_dir_tag(directory)}"
            if tombs:
                tdf = pl.DataFrame(
                    {"event_id": list(tombs), "deleted_at": list(tombs.values())},
                    schema={"event_id": pl.String, "deleted_at": pl.Int64},
                )
                write_parquet_atomic(
                    tdf.with_columns(
                        pl.col("deleted_at").cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
                    ),
                    os.path.join(tomb_dir, stem + ".parquet"),
                )
            if events.height:
                target = os.path.join(landing, stem + ".parquet")
                if not os.path.exists(target):
                    write_parquet_atomic(events, target)
                landed.append(target)
            os.unlink(path)
            fsync_dir(wal_dir)
        return landed
    finally:
        os.close(fd)


def _dir_tag(directory: str) -> str:
    """A short stable tag of the log folder (so two data roots never produce one file name)."""
    return format(zlib.crc32(os.path.abspath(directory).encode()), "08x")


def read_tombstones(data_root: str, tenant: str) -> dict[str, int]:
    """Deleted event ids of `tenant` that were flushed (event_id -> deleted_at, epoch us); the
    ingest step drops landed events with these ids."""
    tomb_dir = Storage(data_root).tombstones_dir(tenant)
    try:
        files = sorted(
            os.path.join(tomb_dir, f)
            for f in os.listdir(tomb_dir)
            if f.endswith(".parquet") and not f.startswith(".")
        )
    except FileNotFoundError:
        return {}
    if not files:
        return {}
    df = pl.read_parquet(files)
    return dict(
        zip(df["event_id"].to_list(), df["deleted_at"].dt.epoch("us").to_list(), strict=True)
    )

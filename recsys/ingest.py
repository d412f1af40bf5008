"""Getting data in: landing imported files, then turning landing files into validated tables.

`import_file` is what `recsys import` does: read any supported file (through an adapter or a
column mapping) and land it as Parquet under landing/<tenant>/<kind>/, with the lines that could
not even be parsed kept beside it. `ingest_events`, `build_items` and `build_users` are what the
Dagster ingest assets do: validate landing files against the contract into the warehouse.

Events are processed in bounded memory: each landing batch is validated and staged by day, then
each day is deduplicated (by event_id, against what the warehouse already holds for that day)
and appended as one new part file. A deterministic event_id maps to one timestamp and so to one
day, which makes per-day deduplication exact.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import time
import uuid
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import accumulate

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from recsys.adapters import read_source
from recsys.contract import (
    DEFAULT_TENANT,
    EVENT_SCHEMA,
    REJECTED_SCHEMA,
    REJECTED_SUFFIX,
    empty_frame,
)
from recsys.durable import sync_all, write_atomic, write_parquet_atomic, write_parquet_parts_atomic
from recsys.errors import RecsysError
from recsys.readers import MAX_RAW_CHARS, TextLayout
from recsys.storage import Storage, modified_s
from recsys.tenancy import is_valid_tenant
from recsys.validation import validate_events, validate_items, validate_users

#: An event file that cannot be read and was modified less than this many seconds ago may still
#: be being copied into the landing folder: it stays pending instead of becoming a reject.
LANDING_SETTLE_S = 60.0
BATCH_ROWS = 2_000_000  # rows validated at a time; bounds ingest memory
#: A day's parts of one tier are merged into one part of the next tier once there are more than
#: this many: each ingest run adds a part (tier 0) to each day it writes, and the API's files
#: start a run every 30 s. So a day of n runs keeps at most 8 parts a tier, log9(n) tiers (<= 32
#: parts for a day of 2,880 runs), and each row is rewritten once a tier (<= 3 times for such a
#: day; merging the whole day each time rewrote a row ~90 times on average).
DAY_PARTS_MAX = 8
#: How long the parts a merge replaced stay on disk (left out of every new listing) for the
#: readers that listed them before it: a training step reads its parts again.
MERGED_PARTS_KEEP_S = 6 * 3600.0


# --- landing -----------------------------------------------------------------------------------
@dataclass
class ImportResult:
    kind: str
    tenant: str
    source: str
    landed: str | None
    rows: int
    unparsable: int
    would_reject: dict[str, int]
    already_landed: bool = False
    #: Is the landed file still in landing, waiting for ingest? (False once ingest has moved
    #: it out: the same content imported again after it was ingested)
    pending: bool = True


def import_file(
    storage: Storage,
    kind: str,
    path: str,
    *,
    tenant: str = DEFAULT_TENANT,
    adapter: str | None = None,
    fmt: str | None = None,
    layout: TextLayout | None = None,
    mapping: dict[str, str] | None = None,
    extra_event_types: Iterable[str] = (),
) -> ImportResult:
    """Land one file as Parquet for the ingest assets; idempotent (the landing name carries a
    hash of the content, so importing the same file twice lands it once).

    Also dry-runs validation so the caller can say how many rows will be rejected and why.
    """
    raw, unparsable = read_source(
        path, kind, adapter=adapter, fmt=fmt, layout=layout, mapping=mapping
    )
    source = os.path.basename(path)
    if raw.height == 0:
        reasons = ", ".join(
            f"{k}: {v}" for k, v in sorted(Counter(unparsable["reason"].to_list()).items())
        )
        raise RecsysError(f"no readable rows in {path}: every line was rejected ({reasons})")
    if kind == "events":
        _, rejects = validate_events(
            raw, tenant=tenant, source=source, extra_event_types=extra_event_types
        )
    else:
        validate = validate_items if kind == "items" else validate_users
        _, rejects = validate(raw, source=source)
    would_reject = Counter(rejects["reason"].to_list())
    data = raw.drop("_row")
    digest = hashlib.sha256()
    digest.update(data.hash_rows(seed=0).to_numpy().tobytes())
    digest.update(json.dumps(data.schema, default=str, sort_keys=True).encode())
    stem = os.path.splitext(source)[0].replace(".", "_")
    name = f"{stem}-{digest.hexdigest()[:12]}"
    landing_dir = storage.landing_dir(tenant, kind)
    storage.makedirs(landing_dir)
    target = posixpath.join(landing_dir, name + ".parquet")
    # (import's own record of the names it landed: ingest moves files out of landing, and a
    # look for the name among the moved files is a listing of all of them, ~2 s a month in)
    record = posixpath.join(landing_dir, ".imported")
    with _locked(storage, record):  # (two imports at once each keep the other's name)
        imported = storage.fs.cat_file(record).decode().split() if storage.exists(record) else []
        pending = storage.exists(target)
        existed = pending or name in imported
        if not existed:
            write_parquet_atomic(data, target, storage.fs)
            if unparsable.height:
                write_parquet_atomic(
                    unparsable, posixpath.join(landing_dir, name + REJECTED_SUFFIX), storage.fs
                )
            record_text = "".join(f"{n}\n" for n in [*imported, name])
            write_atomic(record, record_text.encode(), storage.fs)
            pending = True
    return ImportResult(
        kind=kind,
        tenant=tenant,
        source=path,
        landed=target,
        rows=raw.height,
        unparsable=unparsable.height,
        would_reject=dict(would_reject),
        already_landed=existed,
        pending=pending,
    )


def tenants_with_landing(storage: Storage) -> list[str]:
    """Tenants that have a landing folder."""
    root = storage.path("landing")
    if not storage.exists(root):
        return []
    return sorted(
        posixpath.basename(p.rstrip("/"))
        for p in storage.fs.ls(root, detail=False)
        if storage.fs.isdir(p)
        and not posixpath.basename(p).startswith(".")
        and is_valid_tenant(posixpath.basename(p.rstrip("/")))
    )


def landing_data_files(storage: Storage, tenant: str, kind: str) -> list[str]:
    return [f for f in storage.landing_files(tenant, kind) if not f.endswith(REJECTED_SUFFIX)]


def _file_key(storage: Storage, path: str, info: dict | None = None) -> str:
    info = info or storage.fs.info(path)
    return f"{posixpath.basename(path)}:{info.get('size')}"


def pending_files(storage: Storage, tenant: str, kind: str = "events") -> list[str]:
    """Landing files of `kind` not yet ingested (what the sensor and the assets act on)."""
    return [path for path, _, _ in landing_entries(storage, tenant, kind, pending=True)]


def landing_entries(
    storage: Storage, tenant: str, kind: str, pending: bool
) -> list[tuple[str, str, float]]:
    """(path, key, modification time) of the landing data files of `kind` (only those not yet
    ingested when `pending`), from one listing of the folder. The key (name and size) is what
    the ingest state records as done."""
    done = set(load_state(storage, tenant).get(kind, {}).get("files", [])) if pending else ()
    keyed = [
        (path, _file_key(storage, path, info), modified_s(info))
        for path, info in storage.landing_listing(tenant, kind)
        if not path.endswith(REJECTED_SUFFIX)
    ]
    return [entry for entry in keyed if entry[1] not in done]


def load_state(storage: Storage, tenant: str) -> dict:
    p = storage.ingest_state_path(tenant)
    if not storage.exists(p):
        return {}
    return json.loads(storage.fs.cat_file(p))


def save_state(storage: Storage, tenant: str, kind: str, entry: dict) -> None:
    """Record the ingest state of `kind` durably, after every warehouse file written before it
    (they are written with `sync=False` and flushed here at once: the state points at them).
    The other kinds' entries are read again first: the events, items and users assets of one
    run may run at once, each saving its own kind."""
    p = storage.ingest_state_path(tenant)
    storage.makedirs(posixpath.dirname(p))
    sync_all(storage.fs)
    with _locked(storage, p):  # (on an object store: no lock, a window of one read and write)
        state = load_state(storage, tenant)
        state[kind] = entry
        write_atomic(p, json.dumps(state, indent=1, sort_keys=True).encode(), storage.fs)


@contextmanager
def _locked(storage: Storage, path: str) -> Iterator[None]:
    """An exclusive `flock` on ``<path>.lock`` while the block runs, on a local root."""
    if not storage.is_local:
        yield
        return
    fd = os.open(path.removeprefix("file://") + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- events -------------------------------------------------------------------------------------
@dataclass
class IngestReport:
    tenant: str
    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    rows_valid: int = 0
    rows_new: int = 0
    duplicates: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    deleted: int = 0  # events dropped because the API deleted them (tombstones)
    deferred: list[str] = field(default_factory=list)  # unreadable, landed < LANDING_SETTLE_S ago
    days_written: list[str] = field(default_factory=list)
    days_merged: list[str] = field(default_factory=list)  # (rewritten as one part: `_merge_days`)
    rejects_merged: bool = False  # (the rejected rows' parts merged: `_merge_rejects`)
    min_timestamp: str | None = None
    max_timestamp: str | None = None
    seconds: float = 0.0

    @property
    def reject_rate(self) -> float:
        return self.rejected / self.rows_read if self.rows_read else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d["reject_rate"] = self.reject_rate
        return d


def _batches(storage: Storage, path: str) -> Iterator[pl.DataFrame]:
    """A landing Parquet file in batches of whole row groups (up to BATCH_ROWS rows, decoded
    with threads), with 1-based `_row` numbers."""
    with storage.fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        meta = pf.metadata
        groups: list[list[int]] = [[]]
        rows = 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if groups[-1] and rows + n > BATCH_ROWS:
                groups.append([])
                rows = 0
            groups[-1].append(i)
            rows += n
        offset = 1
        for group in groups:
            if not group:
                continue
            df = pl.from_arrow(pf.read_row_groups(group, use_threads=True))
            assert isinstance(df, pl.DataFrame)
            yield df.with_columns(
                pl.int_range(offset, offset + df.height, dtype=pl.Int64).alias("_row")
            )
            offset += df.height


#: An event file of at most this many rows is read together with its neighbours (`_event_batches`).
SMALL_FILE_ROWS = BATCH_ROWS // 8


def _event_batches(
    storage: Storage, paths: list[str], unreadable: Callable[[str, Exception], None]
) -> Iterator[tuple[list[str], list[int], pl.DataFrame]]:
    """The landing event files `paths`, in order, as batches of at most BATCH_ROWS rows: (the
    batch's files, each file's row count, the rows with `_row` numbers counted from 1 across
    the batch). A large file comes alone, in batches of whole row groups (`_batches`, numbered
    within the file); consecutive small files (the API lands one every 30 s a worker) come
    together, a run of one schema at a time (`landing_runs`), validated in one pass. A file
    that cannot be read goes to `unreadable` (a large one after the batches read before the
    damage)."""
    group: list[str] = []
    rows = 0

    def runs() -> Iterator[tuple[list[str], list[int], pl.DataFrame]]:
        for run, sizes, joined in landing_runs(storage, group, unreadable):
            yield (
                run,
                sizes,
                joined.with_row_index("_row", offset=1).with_columns(pl.col("_row").cast(pl.Int64)),
            )

    for path in paths:
        try:
            with storage.fs.open(path, "rb") as fh:
                n = pq.read_metadata(fh).num_rows
        except READ_ERRORS as exc:
            unreadable(path, exc)
            continue
        if n > SMALL_FILE_ROWS:
            yield from runs()
            group, rows = [], 0
            try:
                for batch in _batches(storage, path):
                    yield [path], [n], batch
            except READ_ERRORS as exc:
                unreadable(path, exc)
            continue
        if rows + n > BATCH_ROWS:
            yield from runs()
            group, rows = [], 0
        group.append(path)
        rows += n
    yield from runs()


def ingest_events(
    storage: Storage,
    tenant: str,
    *,
    full_refresh: bool = False,
    extra_event_types: Iterable[str] = (),
    now: datetime | None = None,
) -> IngestReport:
    """Validate pending landing event files into warehouse/<tenant>/events (partitioned by day)
    and warehouse/<tenant>/rejected_events. Re-running with nothing new changes nothing."""
    started = time.perf_counter()
    now = now or datetime.now(UTC)
    report = IngestReport(tenant=tenant)
    events_dir, rejected_dir = storage.events_dir(tenant), storage.rejected_dir(tenant)
    state = load_state(storage, tenant)
    if full_refresh:
        for d in (events_dir, rejected_dir):
            if storage.exists(d):
                storage.fs.rm(d, recursive=True)
        state.pop("events", None)
    run_id = _run_id()
    _move_ingested(storage, tenant, "events", state, run_id)  # (a run stopped before its moves)
    keyed = landing_entries(storage, tenant, "events", pending=not full_refresh)
    if full_refresh:  # (read first: they landed before what is still in landing)
        moved, _ = ingested_files(storage, tenant, "events")
        keyed = [(path, "", mtime) for mtime, path in moved] + keyed
    files = [path for path, _, _ in keyed]
    report.files = files
    orphans = _orphan_sidecars(storage, tenant, "events", state, full_refresh)
    tomb_files, deleted = _tombstones(storage, tenant)
    done_tombs = set(state.get("events", {}).get("tombstone_files", []))
    new_tombs = [f for f in tomb_files if _file_key(storage, f) not in done_tombs]
    _finish_compaction(storage, tenant, state)
    _finish_merges(storage, tenant, state)
    span = _stored_span(storage, tenant, state)
    if new_tombs and not full_refresh:
        report.deleted += _drop_deleted(storage, tenant, state, deleted, run_id)
        if report.deleted:
            span = _span(scan_events(storage, tenant))
    if not files and not orphans:
        entry = state.setdefault("events", {})
        known = "time_range" in entry
        entry["time_range"] = span
        if new_tombs:
            _record_tombstones(storage, tenant, state, new_tombs)
        elif not known or report.deleted:
            save_state(storage, tenant, "events", entry)
        report.min_timestamp, report.max_timestamp = _iso(span)
        report.days_merged = _merge_days(storage, tenant, state, run_id)
        report.rejects_merged = _merge_rejects(storage, tenant, state, run_id)
        report.seconds = time.perf_counter() - started
        return report
    staging = storage.path("warehouse", tenant, f"_staging-{run_id}")
    storage.makedirs(staging)
    storage.makedirs(rejected_dir)
    reasons: Counter[str] = Counter()
    days: set[str] = set()
    deferred: list[str] = []
    try:
        for i, path in enumerate(files):
            sidecar = path[: -len(".parquet")] + REJECTED_SUFFIX
            if storage.exists(sidecar):  # lines `recsys import` could not parse at all
                unparsable = pl.read_parquet(storage.fs.open(sidecar, "rb"))
                _append_rejects(storage, rejected_dir, unparsable, f"{run_id}-{i}-u")
                reasons.update(unparsable["reason"].to_list())
                report.rows_read += unparsable.height
        for i, (sidecar, _) in enumerate(orphans):  # (a batch of malformed messages only)
            unparsable = pl.read_parquet(storage.fs.open(sidecar, "rb"))
            _append_rejects(storage, rejected_dir, unparsable, f"{run_id}-{i}-o")
            reasons.update(unparsable["reason"].to_list())
            report.rows_read += unparsable.height
        unreadable: list[pl.DataFrame] = []
        modified = {path: mtime for path, _, mtime in keyed}

        def unreadable_file(path: str, exc: Exception) -> None:
            if time.time() - modified[path] < LANDING_SETTLE_S:
                deferred.append(path)  # (maybe still being copied in: left for a later run)
            else:
                unreadable.append(unreadable_reject(path, exc))

        batches = _event_batches(storage, files, unreadable_file)
        for k, (paths, sizes, raw) in enumerate(batches):
            report.rows_read += raw.height
            good, rejects = validate_events(
                raw,
                tenant=tenant,
                source=landing_name(paths[0]),
                extra_event_types=extra_event_types,
                now=now,
                dedupe=False,
            )
            if rejects.height:
                if len(paths) > 1:
                    rejects = rejects_by_file(rejects, paths, sizes).drop("_file")
                _append_rejects(storage, rejected_dir, rejects, f"{run_id}-{k}")
                reasons.update(rejects["reason"].to_list())
            if deleted:
                before = good.height
                good = good.filter(~pl.col("event_id").is_in(deleted))
                report.deleted += before - good.height
            report.rows_valid += good.height
            good = good.with_columns(pl.col("timestamp").dt.date().cast(pl.String).alias("_day"))
            for (day,), part in good.partition_by("_day", as_dict=True).items():
                days.add(day)
                d = posixpath.join(staging, f"date={day}")
                storage.makedirs(d)
                with storage.fs.open(posixpath.join(d, f"{k:06d}.parquet"), "wb") as fh:
                    part.drop("_day").write_parquet(
                        fh, compression="uncompressed", statistics=False
                    )
        if unreadable:  # (kept as done: a file landed again whole has another size)
            rejects = pl.concat(unreadable)
            _append_rejects(storage, rejected_dir, rejects, f"{run_id}-unreadable")
            reasons.update(rejects["reason"].to_list())
        for day in sorted(days):
            new, written = _merge_day(
                storage,
                state.get("events", {}),
                posixpath.join(staging, f"date={day}"),
                posixpath.join(events_dir, f"date={day}"),
                run_id,
            )
            span = _widen(span, written)
            report.rows_new += new
            if new:
                report.days_written.append(day)
    finally:
        if storage.exists(staging):
            storage.fs.rm(staging, recursive=True)
    report.duplicates = report.rows_valid - report.rows_new
    report.rejected = sum(reasons.values())
    report.rejected_by_reason = dict(sorted(reasons.items()))
    report.min_timestamp, report.max_timestamp = _iso(span)
    done = state.setdefault("events", {}).setdefault("files", [])
    state["events"]["time_range"] = span
    report.deferred = deferred
    done.extend(key for path, key, _ in keyed if key and path not in deferred)
    done.extend(key for _, key in orphans if key)
    state["events"]["tombstone_files"] = [_file_key(storage, f) for f in tomb_files]
    report.seconds = time.perf_counter() - started
    # (the files' count: their keys are in `files` above, and a full refresh of the API's
    # small files would otherwise write every path again into each state)
    state["events"]["last_report"] = {**report.as_dict(), "files": len(files)}
    save_state(storage, tenant, "events", state["events"])
    _move_ingested(storage, tenant, "events", state, run_id)
    report.days_merged = _merge_days(storage, tenant, state, run_id)
    report.rejects_merged = _merge_rejects(storage, tenant, state, run_id)
    return report


def _run_id() -> str:
    """An ingest run's id: its UTC start time, then a random tag (names its part files)."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def _read_files(storage: Storage, paths: list[str]) -> pl.DataFrame:
    """The Parquet files `paths` as one frame: read by Polars from a local folder, through
    the filesystem's files on an object store."""
    return pl.read_parquet(paths if storage.is_local else [storage.fs.open(f, "rb") for f in paths])


def ingested_files(
    storage: Storage, tenant: str, kind: str
) -> tuple[list[tuple[float, str]], set[str]]:
    """The landing files of `kind` that ingest has moved out of landing (`_move_ingested`):
    (landing time, path) in landing order, and their import sidecars. What a full refresh,
    a rebuild of the catalogue and its history read again before the landing folder."""
    files, sidecars = [], set()
    for path in storage.glob(posixpath.join(storage.ingested_landing_dir(tenant, kind), "*", "*")):
        if path.endswith(REJECTED_SUFFIX):
            sidecars.add(path)
        elif path.endswith(".parquet"):
            stamp = posixpath.basename(path).split("~", 1)[0]
            landed = datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC).timestamp()
            files.append((landed, path))
    return sorted(files), sidecars


_STAMP = "%Y%m%dT%H%M%S.%fZ"  # (a moved file's landing time, first in its name)
_MOVED_NAME = re.compile(r"\d{8}T\d{6}\.\d{6}Z~(?P<stem>.*?)(?:~\d{8}T\d{6}-[0-9a-f]{8})?\.parquet")


def landing_name(path: str) -> str:
    """The name a landing file had in landing, moved out (`_move_ingested`) or not: what
    rejects name as their source file."""
    name = posixpath.basename(path)
    if (moved := _MOVED_NAME.fullmatch(name)) and posixpath.basename(
        posixpath.dirname(path)
    ).startswith("date="):
        return moved["stem"] + ".parquet"
    return name


def _orphan_sidecars(
    storage: Storage, tenant: str, kind: str, state: dict, every: bool
) -> list[tuple[str, str]]:
    """(path, key) of the import sidecars in landing that have no data file beside them and
    are not ingested yet (a connector batch of malformed messages only lands its rejects);
    with `every`, those ingest moved out too (key ""), first."""
    done = set() if every else set(state.get(kind, {}).get("files", []))
    listing = storage.landing_listing(tenant, kind)
    names = {posixpath.basename(path) for path, _ in listing}
    found = [
        (path, _file_key(storage, path, info))
        for path, info in listing
        if path.endswith(REJECTED_SUFFIX)
        and posixpath.basename(path)[: -len(REJECTED_SUFFIX)] + ".parquet" not in names
    ]
    found = [(path, key) for path, key in found if key not in done]
    if every:
        moved, sidecars = ingested_files(storage, tenant, kind)
        with_data = {path[: -len(".parquet")] + REJECTED_SUFFIX for _, path in moved}
        found = [(path, "") for path in sorted(sidecars - with_data)] + found
    return found


def _move_ingested(storage: Storage, tenant: str, kind: str, state: dict, run_id: str) -> None:
    """Move the landing files of `kind` the state records as ingested (`state[kind]["files"]`,
    with their import sidecars) to ``ingested_landing/<kind>/date=<landing day>/<landing
    time>~<name>``, then forget their keys. Landing then holds only what is pending, so the
    sensor's listing and the state stay the size of one run's files, not of every file ever
    landed (the API lands ~5,800 event files a day, and a catalogue file a record write).
    The time in the name keeps the landing order on an object store, where a move is a copy
    with a new time. Stopped midway, the next run moves the rest first: a key stays in the
    state until its file has moved."""
    done = set(state.get(kind, {}).get("files", []))
    if not done:
        return
    listing = storage.landing_listing(tenant, kind)
    names = {posixpath.basename(path) for path, _ in listing}
    for path, info in listing:
        if _file_key(storage, path, info) not in done:
            continue
        orphan = path.endswith(REJECTED_SUFFIX)  # (a sidecar moves with its data file)
        suffix = REJECTED_SUFFIX if orphan else ".parquet"
        if orphan and posixpath.basename(path)[: -len(suffix)] + ".parquet" in names:
            continue
        landed = datetime.fromtimestamp(modified_s(info), UTC)
        folder = posixpath.join(
            storage.ingested_landing_dir(tenant, kind), f"date={landed:%Y-%m-%d}"
        )
        storage.makedirs(folder)
        stem = posixpath.basename(path)[: -len(suffix)]
        target = posixpath.join(folder, f"{landed:{_STAMP}}~{stem}")
        if storage.exists(target + suffix):  # (landed again with its time: keep both)
            target += f"~{run_id}"
        if not orphan and stem + REJECTED_SUFFIX in names:
            storage.fs.mv(path[: -len(".parquet")] + REJECTED_SUFFIX, target + REJECTED_SUFFIX)
        storage.fs.mv(path, target + suffix)
    state[kind]["files"] = []
    save_state(storage, tenant, kind, state[kind])


def _tombstones(storage: Storage, tenant: str) -> tuple[list[str], list[str]]:
    """(tombstone files, deleted event ids) of a tenant."""
    d = storage.tombstones_dir(tenant)
    if not storage.exists(d):
        return [], []
    files = sorted(
        f
        for f in storage.fs.ls(d, detail=False)
        if f.endswith(".parquet") and not posixpath.basename(f).startswith(".")
    )
    if not files:
        return [], []
    ids = pl.concat(
        [pl.read_parquet(storage.fs.open(f, "rb"), columns=["event_id"]) for f in files]
    )["event_id"]
    return files, ids.unique().to_list()


def _record_tombstones(storage: Storage, tenant: str, state: dict, files: list[str]) -> None:
    keys = state.setdefault("events", {}).setdefault("tombstone_files", [])
    keys.extend(_file_key(storage, f) for f in files)
    save_state(storage, tenant, "events", state["events"])


def _drop_deleted(
    storage: Storage, tenant: str, state: dict, deleted: list[str], run_id: str
) -> int:
    """Rewrite the day partitions that hold deleted event ids without them. Crash-safe: the
    compacted part is written first, the old parts to remove are recorded in the ingest state,
    then removed (`_finish_compaction` completes an interrupted removal). Returns rows dropped."""
    scan = scan_events(storage, tenant)
    hit = scan.filter(pl.col("event_id").is_in(deleted)).select("date").unique().collect()
    dropped = 0
    for day in sorted(hit["date"].to_list()):
        day_dir = posixpath.join(storage.events_dir(tenant), f"date={day.isoformat()}")
        old = storage.glob(posixpath.join(day_dir, "*.parquet"))  # (merged-away parts too)
        live = _live_parts(state.get("events", {}), old)
        rows = _read_files(storage, live)
        kept = rows.filter(~pl.col("event_id").is_in(deleted))
        dropped += rows.height - kept.height
        if kept.height:  # (the day in one part, of its top tier: not merged again soon)
            part = posixpath.join(day_dir, f"part-{run_id}-c{max(map(part_tier, live))}.parquet")
            write_parquet_atomic(kept, part, storage.fs, sync=False)
        entry = state.setdefault("events", {})
        entry["compacting"] = old
        entry["merges"] = [m for m in entry.get("merges", []) if m["new"] not in old]
        save_state(storage, tenant, "events", entry)
        _finish_compaction(storage, tenant, state)
    return dropped


def _finish_compaction(storage: Storage, tenant: str, state: dict) -> None:
    """Remove the old parts of a day rewrite, if a run recorded some (idempotent)."""
    old = state.get("events", {}).pop("compacting", None)
    if not old:
        return
    for f in old:
        if storage.exists(f):
            storage.fs.rm(f)
    save_state(storage, tenant, "events", state["events"])


def _merge_day(
    storage: Storage, entry: dict, staged_dir: str, day_dir: str, run_id: str
) -> tuple[int, list[int] | None]:
    """Deduplicate one day's staged rows against themselves and the warehouse's live parts of
    the day (`_live_parts` of the events state `entry`); append the rest as a part. Returns
    the rows appended and their time span (`_span`)."""
    staged = pl.read_parquet(
        storage.fs.glob(posixpath.join(staged_dir, "*.parquet"))
        if not storage.is_local
        else posixpath.join(staged_dir, "*.parquet")
    )
    # rows with one event_id are the same event, so which copy survives does not matter
    staged = staged.unique(subset="event_id", keep="any", maintain_order=False)
    live = _live_parts(entry, storage.glob(posixpath.join(day_dir, "*.parquet")))
    if live:
        existing = pl.scan_parquet(live).select("event_id").collect()
        staged = staged.join(existing, on="event_id", how="anti")
    if staged.height == 0:
        return 0, None
    storage.makedirs(day_dir)
    part = posixpath.join(day_dir, f"part-{run_id}.parquet")
    write_parquet_atomic(staged, part, storage.fs, sync=False)  # durable by save_state
    return staged.height, _span(staged.lazy())


def _append_rejects(storage: Storage, rejected_dir: str, rejects: pl.DataFrame, name: str) -> None:
    rejects = rejects.select([pl.col(c).cast(t) for c, t in REJECTED_SCHEMA.items()])
    rejects = rejects.with_columns(pl.lit(datetime.now(UTC)).alias("rejected_at"))
    path = posixpath.join(rejected_dir, f"{name}.parquet")
    write_parquet_atomic(rejects, path, storage.fs, sync=False)  # durable by save_state


def event_parts(storage: Storage, tenant: str) -> list[str]:
    """The part files of a tenant's validated events as they are now, sorted. Parts are never
    rewritten: an ingest adds new ones; a merge (`_merge_days`) writes one part for a day's
    and leaves those on disk for MERGED_PARTS_KEEP_S, out of this listing; a deletion writes
    a compacted part and removes the old ones. So a scan of these files reads the same events
    again later (for those hours, after a merge)."""
    d = storage.events_dir(tenant)
    if not storage.exists(d):
        return []
    listed = storage.glob(posixpath.join(d, "date=*", "*.parquet"))
    # (the state is read after the listing: a merge is recorded before its part is written)
    return _live_parts(load_state(storage, tenant).get("events", {}), listed)


def _live_parts(entry: dict, listed: list[str]) -> list[str]:
    """The parts of `listed` that no merge of the events state `entry` has replaced with a
    part that is in `listed` (a merge's part, once written, holds its days' parts' rows)."""
    present = set(listed)
    replaced = {p for m in entry.get("merges", []) if m["new"] in present for p in m["old"]}
    return [p for p in listed if p not in replaced]


def _merge_days(storage: Storage, tenant: str, state: dict, run_id: str) -> list[str]:
    """Merge the parts of each day, tier by tier (`_merge_tiers`). Without it the API's files,
    an ingest run every 30 s, leave thousands of parts a day, which every read of the events
    opens; merging the whole day instead rewrites its old rows at every merge. Returns the days
    merged."""
    by_day: dict[str, list[str]] = {}
    for part in event_parts(storage, tenant):
        by_day.setdefault(posixpath.dirname(part), []).append(part)
    merged = [
        day_dir
        for day_dir, parts in sorted(by_day.items())
        if _merge_tiers(storage, tenant, state["events"], day_dir, parts, run_id)
    ]
    return [posixpath.basename(d).removeprefix("date=") for d in merged]


def _merge_rejects(storage: Storage, tenant: str, state: dict, run_id: str) -> bool:
    """Merge the parts of the rejected rows tier by tier (`_merge_tiers`), as a day of events:
    each run that rejects rows writes a part, and a stream with a steady trickle of malformed
    messages would otherwise leave thousands a day for every read of the rejects to open."""
    folder, parts = storage.rejected_dir(tenant), rejected_parts(storage, tenant)
    return _merge_tiers(storage, tenant, state["events"], folder, parts, run_id)


def _merge_tiers(
    storage: Storage, tenant: str, entry: dict, folder: str, parts: list[str], run_id: str
) -> bool:
    """Merge the live `parts` of `folder` (a day of events, or the rejected rows) tier by tier
    (`part_tier`): once a tier holds more than DAY_PARTS_MAX parts, they are rewritten as one
    part of the next tier (read BATCH_ROWS rows at a time), which may fill that tier in turn.
    So a folder keeps at most DAY_PARTS_MAX parts a tier and a row is rewritten once a tier. A
    merge is recorded in the events state `entry` before its part is written, so no listing
    holds both (`_live_parts`); the parts it replaced are removed after MERGED_PARTS_KEEP_S
    (`_finish_merges`). Returns whether anything was merged."""
    tiers: dict[int, list[str]] = {}
    for part in parts:
        tiers.setdefault(part_tier(part), []).append(part)
    merged = False
    tier = min(tiers, default=0)
    while tier <= max(tiers, default=-1):
        group = tiers.get(tier, [])
        if len(group) > DAY_PARTS_MAX:
            new = posixpath.join(folder, f"part-{run_id}-m{tier + 1}.parquet")
            entry.setdefault("merges", []).append({"old": group, "new": new, "at": time.time()})
            save_state(storage, tenant, "events", entry)
            write_parquet_parts_atomic(_read_parts(storage, group), new, storage.fs)
            tiers.setdefault(tier + 1, []).append(new)
            merged = True
        tier += 1
    return merged


#: (after the run id's 8-hex-digit tag, which may itself read as "c1234567")
_TIER = re.compile(r"-[0-9a-f]{8}-[mc](\d*)\.parquet$")


def part_tier(path: str) -> int:
    """The merge tier of an events part file, from its name: 0 for an ingest run's part
    (``part-<run>.parquet``), t for a merge's (``part-<run>-m<t>.parquet``) or a deletion's
    rewrite of a day (``part-<run>-c<t>.parquet``); 1 for a whole day's part of an older
    version (``-m`` or ``-c`` without a tier)."""
    found = _TIER.search(path)
    return 0 if found is None else int(found.group(1) or 1)


def _read_parts(storage: Storage, parts: list[str]) -> Iterator[pl.DataFrame]:
    """The rows of the part files `parts`, in order, up to BATCH_ROWS rows a frame."""
    group: list[str] = []
    rows = 0
    for path in parts:
        with storage.fs.open(path, "rb") as fh:
            n = pq.read_metadata(fh).num_rows
        if group and rows + n > BATCH_ROWS:
            yield _read_files(storage, group)
            group, rows = [], 0
        group.append(path)
        rows += n
    if group:
        yield _read_files(storage, group)


def _finish_merges(storage: Storage, tenant: str, state: dict) -> None:
    """Remove the parts merges replaced MERGED_PARTS_KEEP_S ago, and forget those merges; forget
    a merge whose part was never written (its run stopped: the day's parts hold its rows)."""
    entry = state.get("events", {})
    merges = entry.get("merges", [])
    kept = []
    for merge in merges:
        if not storage.exists(merge["new"]):
            continue
        if time.time() - merge["at"] < MERGED_PARTS_KEEP_S:
            kept.append(merge)
            continue
        for path in merge["old"]:
            if storage.exists(path):
                storage.fs.rm(path)
    if len(kept) != len(merges):
        entry["merges"] = kept
        save_state(storage, tenant, "events", entry)


def scan_events(storage: Storage, tenant: str, parts: list[str] | None = None) -> pl.LazyFrame:
    """The validated events of a tenant as a lazy frame (with the `date` partition column):
    every part file, or those of `parts` (:func:`event_parts` taken earlier)."""
    parts = event_parts(storage, tenant) if parts is None else parts
    if not parts:
        return pl.LazyFrame(schema={**EVENT_SCHEMA, "date": pl.Date})
    return pl.scan_parquet(parts, hive_partitioning=True, hive_schema={"date": pl.Date})


def read_events(storage: Storage, tenant: str) -> pl.DataFrame:
    """All validated events of a tenant in EVENT_SCHEMA (what the training assets read)."""
    return scan_events(storage, tenant).select(list(EVENT_SCHEMA)).collect()


def rejected_parts(storage: Storage, tenant: str) -> list[str]:
    """The part files of a tenant's rejected event rows as they are now, sorted: a file for
    each ingest run that rejected rows, merged by tier like a day of events (`_merge_tiers`;
    the parts a merge replaced are out of this listing, as in `event_parts`)."""
    d = storage.rejected_dir(tenant)
    if not storage.exists(d):
        return []
    listed = storage.glob(posixpath.join(d, "*.parquet"))
    return _live_parts(load_state(storage, tenant).get("events", {}), listed)


def scan_rejected(storage: Storage, tenant: str) -> pl.LazyFrame:
    """The rejected event rows of a tenant (REJECTED_SCHEMA and `rejected_at`), lazily."""
    parts = rejected_parts(storage, tenant)
    if not parts:
        return pl.LazyFrame(schema={**REJECTED_SCHEMA, "rejected_at": pl.Datetime("us", "UTC")})
    return pl.scan_parquet(parts)


def events_time_range(storage: Storage, tenant: str) -> tuple[str | None, str | None]:
    """(oldest, newest) time of a tenant's stored events, ISO 8601 (None, None without events):
    the span each ingest run keeps in the state (`_stored_span`), not a scan of every part."""
    return _iso(_stored_span(storage, tenant, load_state(storage, tenant)))


def _iso(span: list[int] | None) -> tuple[str | None, str | None]:
    if span is None:
        return None, None
    lo, hi = (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=us) for us in span)
    return lo.isoformat(), hi.isoformat()


def _span(events: pl.LazyFrame) -> list[int] | None:
    """[oldest, newest] event time of `events` in epoch microseconds; None when there are none."""
    ts = pl.col("timestamp").dt.epoch("us")
    lo, hi = events.select(ts.min().alias("lo"), ts.max().alias("hi")).collect().row(0)
    return None if lo is None else [lo, hi]


def _widen(span: list[int] | None, other: list[int] | None) -> list[int] | None:
    if span is None or other is None:
        return other if span is None else span
    return [min(span[0], other[0]), max(span[1], other[1])]


def _stored_span(storage: Storage, tenant: str, state: dict) -> list[int] | None:
    """The span of the stored events: the state's ``time_range``, which each run widens by
    what it wrote and a deletion recomputes; a scan of every part only for a warehouse an
    older version wrote (each run scanned every part: ~2.9 GB of timestamps at 365M events)."""
    entry = state.get("events", {})
    if "time_range" in entry:
        return entry["time_range"]
    return _span(scan_events(storage, tenant))


# --- landing files read a run at a time (events, items, users) ---------------------------------
#: What reading a damaged Parquet file raises (pyarrow's ArrowInvalid is a ValueError).
READ_ERRORS = (OSError, ValueError, pl.exceptions.PolarsError)


def landing_runs(
    storage: Storage, paths: list[str], unreadable: Callable[[str, Exception], None] | None = None
) -> Iterator[tuple[list[str], list[int], pl.DataFrame]]:
    """The landing files `paths`, in order, as runs of consecutive files of one schema: (the
    run's paths, each file's row count, the run's rows together, in file order). On a local
    folder each run is read in one call, after a look at each file's schema (Polars reads the
    files of a run in parallel: ~0.11 ms a one-row file against ~0.45 ms read alone); on an
    object store file by file.

    A file that cannot be read (truncated, not Parquet, a damaged page) is passed to
    `unreadable` with the error and left out of the runs (without `unreadable`, the error is
    raised); the other files of its run are read one at a time."""

    def failed(path: str, exc: Exception) -> None:
        if unreadable is None:
            raise exc
        unreadable(path, exc)

    if storage.is_local:
        readable, schemas = [], []
        for path in paths:
            try:
                schemas.append(list(pl.read_parquet_schema(path).items()))
                readable.append(path)
            except READ_ERRORS as exc:
                failed(path, exc)
        start = 0
        while start < len(readable):
            end = start + 1
            while end < len(readable) and schemas[end] == schemas[start]:
                end += 1
            run = readable[start:end]
            start = end
            try:
                joined = pl.read_parquet(run, include_file_paths=_FILE_COLUMN)
            except READ_ERRORS as exc:
                if len(run) == 1:
                    failed(run[0], exc)
                else:  # (a file damaged past its footer: find it)
                    for path in run:
                        yield from landing_runs(storage, [path], unreadable)
                continue
            rows = Counter(joined[_FILE_COLUMN].to_list())
            yield run, [rows.get(path, 0) for path in run], joined.drop(_FILE_COLUMN)
        return
    run: list[tuple[str, pl.DataFrame]] = []
    for path in paths:
        try:
            raw = pl.read_parquet(storage.fs.open(path, "rb"))
        except READ_ERRORS as exc:
            failed(path, exc)
            continue
        if run and raw.schema != run[0][1].schema:
            yield [p for p, _ in run], [r.height for _, r in run], pl.concat([r for _, r in run])
            run = []
        run.append((path, raw))
    if run:
        yield [p for p, _ in run], [r.height for _, r in run], pl.concat([r for _, r in run])


def unreadable_reject(path: str, exc: Exception) -> pl.DataFrame:
    """The reject of a landing file that cannot be read: one row, without a row number."""
    detail = f"file unreadable: {type(exc).__name__}: {exc}"[:MAX_RAW_CHARS]
    row = {"source_file": landing_name(path), "row_number": None, "reason": "unparsable"}
    return pl.DataFrame([{**row, "detail": detail, "raw": ""}], schema=REJECTED_SCHEMA)


_FILE_COLUMN = "_landing_file"  # (`landing_runs`' column of each row's file while it reads)


def rejects_by_file(bad: pl.DataFrame, paths: list[str], sizes: list[int]) -> pl.DataFrame:
    """Rejects of the files `paths` validated together (`sizes`: each file's rows; their rows
    numbered from 1 across the files) named by their file and numbered within it, with the
    file's index in `_file`."""
    starts = list(accumulate(sizes, initial=0))  # (file i: rows starts[i] + 1 .. starts[i + 1])
    file_of = [bisect_left(starts, n) - 1 for n in bad["row_number"].to_list()]
    return bad.with_columns(
        source_file=pl.Series([landing_name(paths[i]) for i in file_of], dtype=pl.String),
        row_number=pl.col("row_number") - pl.Series([starts[i] for i in file_of], dtype=pl.Int64),
        _file=pl.Series(file_of, dtype=pl.Int64),
    )


# --- items and users ----------------------------------------------------------------------------
def _fold_rows(table: pl.DataFrame, rows: pl.DataFrame, carried: list[str]) -> pl.DataFrame:
    """`table` (one row an id, the id first) with the validated `rows` of a later file whose
    source had the columns `carried`: known ids change in those columns only (an explicit
    null clears a value), new ids are added whole, the last row of an id wins."""
    key = table.columns[0]
    if len(carried) == len(table.columns):  # (every column: whole rows, as they were)
        return pl.concat([table, rows]).unique(subset=key, keep="last", maintain_order=True)
    known = rows[key].is_in(table[key].implode())
    changes = rows.filter(known).select(carried).unique(subset=key, keep="last")
    table = table.update(changes, on=key, how="left", include_nulls=True)
    return pl.concat([table, rows.filter(~known)]).unique(
        subset=key, keep="last", maintain_order=True
    )


def _fold_files(
    storage: Storage,
    validate: Callable[..., tuple[pl.DataFrame, pl.DataFrame]],
    table: pl.DataFrame,
    run: tuple[list[str], list[int], pl.DataFrame],
    sidecars: set[str],
    rejects: list[pl.DataFrame],
) -> pl.DataFrame:
    """`table` with the landing files of `run` (paths, row counts, rows: one schema, so one set
    of carried columns; `landing_runs`) folded in, validated in one pass (one call a file cost
    ~5 ms, so a folder of API records landed one a file took minutes). Each file's rejects,
    numbered within the file, then its reader's sidecar (when `sidecars`, the folder's, holds
    one), go to `rejects` in file order."""
    paths, sizes, joined = run
    joined = joined.with_row_index("_row", offset=1).with_columns(pl.col("_row").cast(pl.Int64))
    good, bad = validate(joined, source="")
    bad = rejects_by_file(bad, paths, sizes)
    for i, path in enumerate(paths):
        if bad.height:
            rejects.append(bad.filter(pl.col("_file") == i).drop("_file"))
        sidecar = path[: -len(".parquet")] + REJECTED_SUFFIX
        if sidecar in sidecars:
            rejects.append(pl.read_parquet(storage.fs.open(sidecar, "rb")))
    carried = [c for c in table.columns if c in joined.columns]
    return _fold_rows(table, good, carried)


@dataclass
class TableReport:
    tenant: str
    kind: str
    files: list[str] = field(default_factory=list)  # (those folded, in order)
    files_folded: int = 0
    incremental: bool = False  # (folded onto the last build's table; else every file ever landed)
    deferred: list[str] = field(default_factory=list)  # unreadable, landed < LANDING_SETTLE_S ago
    rows_read: int = 0
    rows: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    path: str = ""


def build_table(
    storage: Storage, tenant: str, kind: str, *, rebuild: bool = False
) -> tuple[pl.DataFrame, TableReport]:
    """Build the items or users table from the landing files of that kind, folded in landing
    order (file modification time): a later row of an id replaces the columns its file
    carries and leaves the others as they were (a price feed of `item_id,price` changes prices
    only); an id seen for the first time gets the contract's defaults for the columns its file
    lacks. A file with every column replaces whole rows. The table is sorted by id.

    Landing is an inbox: a build folds the files in landing onto the warehouse's table and
    rejects, then moves them out (`_move_ingested`; the CRR API lands a file per record
    write, so reading every file again made each run slower than the last). A file landed
    with a time before the last build's latest (a copy that kept its time), a table of another
    schema or rejects that are not the last build's, or `rebuild`, fold every file again, the
    moved ones and landing's, in landing order (`catalogue_files`). A file that cannot be read
    is a reject, or stays in landing for a later build while it changed less than
    LANDING_SETTLE_S ago (it may still be being copied in), as for events."""
    validate = validate_items if kind == "items" else validate_users
    run_id = _run_id()
    state = load_state(storage, tenant)
    _move_ingested(storage, tenant, kind, state, run_id)  # (a build stopped before its moves)
    listing = storage.landing_listing(tenant, kind)  # (one listing: data files and sidecars)
    sidecars = {f for f, _ in listing if f.endswith(REJECTED_SUFFIX)}
    landed_here = [(modified_s(info), f) for f, info in listing if f not in sidecars]
    keys = [_file_key(storage, f, info) for f, info in listing if f not in sidecars]
    landed = sorted(landed_here)
    report = TableReport(tenant=tenant, kind=kind, path=storage.table_path(tenant, kind))
    rejected_path = storage.table_path(tenant, f"rejected_{kind}")
    table, rejects = empty_frame(kind), []
    last = {} if rebuild else state.get(kind, {})
    incremental = False
    if (
        "folded_until" in last
        and all(t >= last["folded_until"] for t, _ in landed)
        and storage.exists(report.path)
        and storage.exists(rejected_path)
    ):
        before = pl.read_parquet(storage.fs.open(report.path, "rb"))
        rejected_before = pl.read_parquet(storage.fs.open(rejected_path, "rb"))
        # (a build that wrote its tables and crashed before its state: folding its files
        # again gives the same table, but would repeat their rejects)
        if before.schema == table.schema and rejected_before.height == last.get("rejected"):
            table, incremental = before, True
            rejects.append(rejected_before)
    if not incremental:
        moved, moved_sidecars = ingested_files(storage, tenant, kind)
        landed = sorted(moved + landed)
        sidecars |= moved_sidecars
    files = [f for _, f in landed]
    report.files, report.files_folded, report.incremental = files, len(files), incremental
    time_of = {f: t for t, f in landed}

    def unreadable(path: str, exc: Exception) -> None:
        if time.time() - time_of[path] < LANDING_SETTLE_S:
            report.deferred.append(path)  # (maybe still being copied in: left for a later build)
        else:
            rejects.append(unreadable_reject(path, exc))

    runs = landing_runs(storage, files, unreadable)
    held = []  # (each folded file's ids: `files_holding`)
    for run in runs:
        report.rows_read += run[2].height
        table = _fold_files(storage, validate, table, run, sidecars, rejects)
        held.append(_ids_by_file(run, table.columns[0], time_of))
    orphans = _orphan_sidecars(storage, tenant, kind, state, every=not incremental)
    rejects.extend(pl.read_parquet(storage.fs.open(path, "rb")) for path, _ in orphans)
    # (one order whatever the folds: incremental, or every file at once, where validation
    # keeps an id's last row of the files it checks together)
    table = table.sort(table.columns[0])
    rejected = pl.concat(rejects) if rejects else pl.DataFrame(schema=REJECTED_SCHEMA)
    report.rows = table.height
    report.rejected = rejected.height
    report.rejected_by_reason = dict(Counter(rejected["reason"].to_list()))
    storage.makedirs(posixpath.dirname(report.path))
    write_parquet_atomic(table, report.path, storage.fs, sync=False)  # durable by save_state
    write_parquet_atomic(rejected, rejected_path, storage.fs, sync=False)
    held_dir = _held_ids_dir(storage, tenant, kind)
    if not incremental and storage.exists(held_dir):
        storage.fs.rm(held_dir, recursive=True)
    if held:
        storage.makedirs(held_dir)
        held_part = posixpath.join(held_dir, f"part-{run_id}.parquet")
        write_parquet_atomic(pl.concat(held), held_part, storage.fs, sync=False)
        parts = storage.glob(posixpath.join(held_dir, "*.parquet"))
        if len(parts) > HELD_PARTS_MAX:  # (merged first, then removed: a reader never misses)
            merged = pl.concat([pl.read_parquet(storage.fs.open(p, "rb")) for p in parts])
            held_part = posixpath.join(held_dir, f"part-{run_id}-m.parquet")
            write_parquet_atomic(merged.unique(), held_part, storage.fs, sync=False)
            for part in parts:
                storage.fs.rm(part)
    until = max([t for t, _ in landed] + [last.get("folded_until", 0.0) if incremental else 0.0])
    keys = [key for key, (_, f) in zip(keys, landed_here, strict=True) if f not in report.deferred]
    keys += [key for _, key in orphans if key]
    state[kind] = {"files": keys, "folded_until": until, "rejected": rejected.height}
    save_state(storage, tenant, kind, state[kind])
    _move_ingested(storage, tenant, kind, state, run_id)
    return table, report


def _held_ids_dir(storage: Storage, tenant: str, kind: str) -> str:
    return posixpath.join(posixpath.dirname(storage.table_path(tenant, kind)), f"{kind}_held_ids")


_HELD_SCHEMA = {"id": pl.String, "file": pl.String, "landed_us": pl.Int64}
HELD_IDS_MAX = 10_000  # a file of more rows is not recorded (read whole: a full feed holds all)
HELD_PARTS_MAX = 16  # the held-ids parts (one a build) are merged into one past this many


def _file_mark(path: str, landed: float) -> tuple[str, int]:
    """A file as the held-ids index names it: its landing name and landing time in whole
    microseconds, as a moved file's name keeps it (`datetime.fromtimestamp`'s rounding: the
    float's own `* 1e6` can land one off)."""
    since = datetime.fromtimestamp(landed, UTC) - datetime.fromtimestamp(0, UTC)
    return landing_name(path), since // timedelta(microseconds=1)


def _ids_by_file(
    run: tuple[list[str], list[int], pl.DataFrame], key: str, time_of: dict[str, float]
) -> pl.DataFrame:
    """The ids each file of a folded run holds, one row a (id, file), and a row with a null id
    for each file (it was read: an id it lacks, it does not hold)."""
    paths, sizes, joined = run
    marks = [_file_mark(path, time_of[path]) for path in paths]
    files = pl.DataFrame(
        {
            "file": [m[0] for m in marks],
            "landed_us": [m[1] for m in marks],
            "_i": range(len(paths)),
            "_rows": sizes,
        },
        schema={"file": pl.String, "landed_us": pl.Int64, "_i": pl.Int64, "_rows": pl.Int64},
    ).filter(pl.col("_rows") <= HELD_IDS_MAX)  # (a larger file is read whole: not recorded)
    rows = [files.with_columns(id=pl.lit(None, dtype=pl.String))]
    if key in joined.columns and joined.height:
        index = pl.Series("_i", np.repeat(np.arange(len(sizes)), sizes), dtype=pl.Int64)
        ids = joined.select(pl.col(key).cast(pl.String).alias("id"), index).unique()
        rows.append(ids.join(files, on="_i"))
    return pl.concat([r.select(list(_HELD_SCHEMA)) for r in rows])


def files_holding(
    storage: Storage, tenant: str, kind: str, files: list[tuple[float, str]], ids: set[str]
) -> list[tuple[float, str]]:
    """Of `files` ((landing time, path), `catalogue_files`), those that may hold a row of one
    of `ids`: the files a build folded and recorded as holding one (`_ids_by_file`), and every
    file no build recorded (landed since, or a record lost in a crash: read whole, never
    skipped). What `recsys.features.catalogue_as_of` reads instead of every file."""
    held_dir = _held_ids_dir(storage, tenant, kind)
    parts = storage.glob(posixpath.join(held_dir, "*.parquet")) if storage.exists(held_dir) else []
    if not parts:
        return files
    try:
        held = pl.concat([pl.read_parquet(storage.fs.open(p, "rb")) for p in parts])
    except READ_ERRORS:  # (a part merged away since the listing)
        return files  # (every file: what no record allows to skip)
    marks = [_file_mark(f, t) for t, f in files]
    wanted = pl.DataFrame(
        {"file": [m[0] for m in marks], "landed_us": [m[1] for m in marks]},
        schema={"file": pl.String, "landed_us": pl.Int64},
    ).with_row_index("_n")
    on = ["file", "landed_us"]
    hits = held.filter(pl.col("id").is_in(list(ids))).select(on)
    keep = pl.concat(
        [
            wanted.join(held.select(on).unique(), on=on, how="anti"),
            wanted.join(hits, on=on, how="semi"),
        ]
    )
    return [files[n] for n in sorted(set(keep["_n"].to_list()))]


def catalogue_files(storage: Storage, tenant: str, kind: str) -> list[tuple[float, str]]:
    """Every items or users file ever landed, moved out of landing or not, as (landing time,
    path) in landing order: what `build_table` folds when it folds everything, and what the
    catalogue's history is read from (`recsys.features.catalogue_as_of`)."""
    moved, _ = ingested_files(storage, tenant, kind)
    listing = storage.landing_listing(tenant, kind)
    return sorted(
        moved + [(modified_s(info), f) for f, info in listing if not f.endswith(REJECTED_SUFFIX)]
    )

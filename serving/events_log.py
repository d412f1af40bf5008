"""Durable event intake: the API's events of each tenant in an fsync'd segment log, landed
as Parquet for the ingest sensor.

Layout under ``<data root>/serving/events/<tenant>/`` (feedback labels use the same log under
``serving/feedback/<tenant>/``, `serving.feedback_log`)::

    wal/seg-*.log          the segment log (`serving.segment_log`: framing, recovery)
    append.lock            flock held while appending (all gunicorn workers, all hosts on NFS)
    flush.lock             flock held while flushing closed segments to landing
    tombstones/*.parquet   deleted event ids (event_id, deleted_at) of flushed segments

The parts: `serving.segment_log` (the generic log and its group commit),
`serving.event_records` (API event -> contract row -> validated log record, and back),
`serving.event_landing` (closed segments -> landing Parquet), this module (a tenant's event
log: duplicate index, tombstones, reads; every tenant's log in a process and its flush timer).

Guarantees:

* An append returns only after the records were written *and* fsync'd (the HTTP 201/200 is sent
  after that), so an acknowledged event survives kill -9 of any process and power loss.
* Group commit: concurrent requests of one worker (`recsys serve --threads`) are validated
  together by the contract (`validate_rows`: `recsys.validation.check_event_rows` row by row,
  the rows it cannot decide through the vectorised `validate_events`) and written with one
  write and one fsync. Under load the committer waits (at most `linger_s`, 2 ms) until as
  many requests are queued as were in flight during the previous batch, and the fsync runs in
  a second thread while the next batch is validated. Every request (duplicates included) is
  answered only after an fsync that started after its batch was written.
* Idempotent by event_id (derived like the contract when absent) while the event is in the
  log: a repeated id is answered as a duplicate and not written again. Once flushed to landing,
  ingest deduplicates by event_id against the warehouse, so an event is stored once either way.
* Deleting an event appends a tombstone record. The flusher drops tombstoned events that are
  still in the log and writes the tombstones to ``tombstones/``; events that had already
  landed must be dropped by ingest from that list (`read_tombstones`).
* Flushing (on segment roll, on a timer, or `flush_events(data_root)`) lands closed segments
  (`serving.event_landing.flush_tenant`).
* A tenant id that is not one (`recsys.tenancy`) is refused with `ValueError` before any path
  is built from it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
import polars as pl

from recsys.contract import EVENT_SCHEMA
from recsys.storage import Storage
from recsys.tenancy import check_tenant, describe, is_valid_tenant
from serving.event_landing import flush_tenant, log_dir, read_tombstones
from serving.event_records import (
    ItemResult,
    event_id_of,
    record_to_event,
    records_frame,
    to_raw_row,
    validate_rows,
)
from serving.segment_log import (
    DEFAULT_LINGER_S,
    DEFAULT_SEGMENT_BYTES,
    GroupCommit,
    Pending,
    SegmentLog,
    list_segments,
    read_segment,
    segment_name,
)

log = logging.getLogger("recsys.serving")


class TenantEventLog:
    """The event log of one tenant in this process: group commit, index, tombstones, flush."""

    def __init__(
        self,
        data_root: str,
        tenant: str,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_batch_rows: int = 20_000,
        linger_s: float = DEFAULT_LINGER_S,
        admit: Callable[[str, int], None] | None = None,
        event_types: Callable[[str], Iterable[str]] | None = None,
    ) -> None:
        """admit: the tenant's events-per-day quota (`EventLogs.admit`); event_types: the
        event types the tenant declared beside the built-in ones (`EventLogs.event_types`)."""
        self.tenant = tenant
        self.data_root = data_root
        self._admit = admit
        self._event_types = event_types
        self.dir = log_dir(data_root, tenant)
        self._index: dict[str, tuple[int, int]] = {}  # event_id -> (segment, offset)
        self._by_segment: dict[int, list[str]] = {}
        self._deleted: dict[str, int] = {}  # event_id -> deleted_at (us)
        self.log = SegmentLog(
            self.dir, self._on_record, self._on_removed, segment_bytes, self._on_payload
        )
        self._load_tombstones()
        self._commits = GroupCommit(
            f"event-log-{tenant}", self._commit, max_batch_rows=max_batch_rows, linger_s=linger_s
        )
        self.batches = 0
        self.log.refresh()

    # -- view
    def _on_record(self, seg: int, offset: int, rec: dict) -> None:
        kind = rec.get("k")
        if kind == "e":
            self._index.setdefault(rec["id"], (seg, offset))
            self._by_segment.setdefault(seg, []).append(rec["id"])
        elif kind == "t":
            self._deleted[rec["id"]] = rec["at"]

    def _on_payload(self, seg: int, offset: int, payload: bytes) -> bool:
        """An event record read back is indexed from its bytes (its id is all the view needs);
        any other record is left to `_on_record`."""
        eid = event_id_of(payload)
        if eid is None:
            return False
        self._index.setdefault(eid, (seg, offset))
        self._by_segment.setdefault(seg, []).append(eid)
        return True

    def _on_removed(self, seg: int) -> None:
        for eid in self._by_segment.pop(seg, ()):
            if self._index.get(eid, (None,))[0] == seg:
                del self._index[eid]

    def _load_tombstones(self) -> None:
        for eid, at in read_tombstones(self.data_root, self.tenant).items():
            self._deleted.setdefault(eid, at)

    # -- group commit
    def submit(self, bodies: list[Any], timeout_s: float = 30.0) -> list[ItemResult]:
        """Validate and durably append `bodies` (API event objects); one result per body, in
        order. Returns after the accepted ones are fsync'd. The log's `admit` (the tenant's
        events-per-day quota) may refuse them all first, with a Problem."""
        if self._admit is not None and bodies:
            self._admit(self.tenant, len(bodies))
        received: list[str] = []

        def now() -> str:  # one receipt time per request, taken only when an event needs it
            if not received:
                received.append(datetime.now(UTC).isoformat())
            return received[0]

        return self._commits.submit([to_raw_row(b, now) for b in bodies], timeout_s)

    def _commit(self, batch: list[Pending]) -> int | None:
        """Validate `batch` and write its new events (not yet fsync'd); returns the fd to fsync
        before answering, or None when nothing was appended."""
        flat: list[dict[str, Any]] = []
        slots: list[tuple[Pending, int]] = []
        for p in batch:
            p.results = [None] * len(p.rows)  # type: ignore[list-item]
            for j, row in enumerate(p.rows):
                if isinstance(row, ItemResult):
                    p.results[j] = row
                else:
                    flat.append(row)
                    slots.append((p, j))
        if not flat:
            return None
        good_slots: list[tuple[Pending, int]] = []
        records: list[dict[str, Any]] = []
        declared = self._event_types(self.tenant) if self._event_types is not None else ()
        outcomes = validate_rows(flat, self.tenant, declared)
        for slot, outcome in zip(slots, outcomes, strict=True):
            if type(outcome) is tuple:
                slot[0].results[slot[1]] = ItemResult(
                    "rejected", reason=outcome[0], detail=outcome[1]
                )
            else:
                good_slots.append(slot)
                records.append(outcome)
        if not good_slots:
            return None

        def prepare() -> list[dict]:
            out, fresh = [], set()
            for rec, (p, j) in zip(records, good_slots, strict=True):
                eid = rec["id"]
                if eid in self._index or eid in fresh:
                    p.results[j] = ItemResult("duplicate", event_id=eid)
                else:
                    fresh.add(eid)
                    out.append(rec)
                    p.results[j] = ItemResult("accepted", event_id=eid)
            return out

        # duplicates are answered after the fsync too: the first copy may still be unsynced
        closed, fd = self.log.append_unsynced(prepare)
        self.batches += 1
        if closed:
            self.flush_async()
        return fd

    def delete(self, event_id: str) -> bool:
        """Append a tombstone for `event_id` (fsync'd); False when it was already deleted."""
        at = int(time.time() * 1_000_000)
        outcome = {}

        def prepare() -> list[dict]:
            if event_id in self._deleted:
                outcome["new"] = False
                return []
            outcome["new"] = True
            return [{"k": "t", "id": event_id, "at": at}]

        self.log.append(prepare)
        return outcome["new"]

    # -- reads
    def get(self, event_id: str) -> tuple[dict[str, Any] | None, int | None]:
        """(event, deleted_at_us): the event from the log, the API's files flushed to landing
        and not yet ingested, or the warehouse (any source, once ingested)."""
        from recsys.ingest import scan_events  # the ingest module is heavy; only readers need it

        self.log.refresh()
        deleted = self._deleted.get(event_id)
        loc = self._index.get(event_id)
        if loc is not None:
            rec = self.log.read_at(*loc)
            if rec is not None:
                return record_to_event(rec, self.tenant), deleted
        storage = Storage(self.data_root)
        files = landed_api_files(storage, self.tenant)
        for frame in ([pl.scan_parquet(files)] if files else []) + [
            scan_events(storage, self.tenant)
        ]:
            hit = frame.select(list(EVENT_SCHEMA)).filter(pl.col("event_id") == event_id)
            found = hit.head(1).collect()
            if found.height:
                row = found.row(0, named=True)
                row["timestamp"] = row["timestamp"].isoformat().replace("+00:00", "Z")
                row["context"] = orjson.loads(row["context"]) if row["context"] else None
                return row, deleted
        return None, deleted

    def is_deleted(self, event_id: str) -> bool:
        return event_id in self._deleted

    def logged_frame(self) -> pl.DataFrame:
        """Events still in the log (not yet flushed) as a DataFrame in EVENT_SCHEMA."""
        self.log.refresh()
        recs = []
        for seg in list_segments(self.log.wal_dir):
            try:
                records, _, _ = read_segment(os.path.join(self.log.wal_dir, segment_name(seg)))
            except FileNotFoundError:
                continue
            recs.extend(rec for _, rec in records if rec.get("k") == "e")
        return records_frame(recs, self.tenant)

    # -- flushing
    def roll(self) -> list[int]:
        """Close the active segment if it holds anything (so the flusher can take it)."""
        return self.log.append(lambda: [], roll=True)

    def flush_async(self) -> None:
        threading.Thread(target=self._flush_quietly, daemon=True).start()

    def _flush_quietly(self) -> None:
        try:
            flush_tenant(self.data_root, self.tenant)
        except Exception:
            log.exception(
                "flushing the event log of %s failed; retried on the next timer", self.tenant
            )


def flush_events(
    data_root: str, tenants: Iterable[str] | None = None, roll: bool = True
) -> dict[str, list[str]]:
    """Land the logged events of `tenants` (default: every tenant with a log) now.

    With `roll`, the active segments are closed first, so everything acknowledged so far lands.
    Callable from `recsys` (a CLI command or an asset) without a running server.
    """
    base = os.path.join(data_root, "serving", "events")
    if tenants is None:
        tenants = []
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if is_valid_tenant(name):
                tenants.append(name)
            else:
                log.warning("%s/%s is not a tenant's event log; not flushed", base, describe(name))
    out = {}
    for tenant in map(check_tenant, tenants):
        if roll:
            tlog = TenantEventLog(data_root, tenant)
            tlog.roll()
            tlog.log.close()
        out[tenant] = flush_tenant(data_root, tenant, blocking=True)
    return out


class EventLogs:
    """The event logs of every tenant in this process, plus the timer that flushes them.

    `admit(tenant, n)`, when set (by `serving.app.create_app`, before the first request), is
    asked before `n` events of a tenant are written: the events-per-day quota
    (`serving.control.access.charge_events`). `event_types(tenant)`, when set (likewise), names
    the event types the tenant declared in its config beside the built-in ones."""

    admit: Callable[[str, int], None] | None = None
    event_types: Callable[[str], Iterable[str]] | None = None

    def __init__(
        self,
        data_root: str,
        flush_interval_s: float = 30.0,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        self.data_root = data_root
        self._interval = flush_interval_s
        self._segment_bytes = segment_bytes
        self._linger_s = linger_s
        self._logs: dict[str, TenantEventLog] = {}
        self._lock = threading.Lock()
        self._timer_pid = 0

    def tenant(self, tenant: str) -> TenantEventLog:
        tlog = self._logs.get(tenant)
        if tlog is None:
            with self._lock:
                tlog = self._logs.get(tenant)
                if tlog is None:
                    tlog = self._logs[tenant] = TenantEventLog(
                        self.data_root,
                        tenant,
                        self._segment_bytes,
                        linger_s=self._linger_s,
                        admit=self.admit,
                        event_types=self.event_types,
                    )
        if self._interval > 0 and self._timer_pid != os.getpid():
            self._start_timer()
        return tlog

    def _start_timer(self) -> None:
        with self._lock:
            if self._timer_pid == os.getpid():
                return
            self._timer_pid = os.getpid()
            threading.Thread(target=self._timer, daemon=True, name="event-log-flusher").start()

    def _timer(self) -> None:
        while True:
            time.sleep(self._interval)
            for tlog in list(self._logs.values()):
                try:
                    if tlog.log.active_age_s() >= self._interval and tlog.log.active_bytes():
                        tlog.roll()
                    flush_tenant(self.data_root, tlog.tenant)
                except Exception:
                    log.exception("timed flush of %s failed; retried next time", tlog.tenant)


# --- reading every known event of a tenant -----------------------------------------------------
def landed_api_files(storage: Storage, tenant: str) -> list[str]:
    """The API's event files in landing (``api-*``): flushed from the log, not yet ingested."""
    return [
        f
        for f in storage.landing_files(tenant, "events")
        if os.path.basename(f).startswith("api-") and f.endswith(".parquet")
    ]


def scan_all_events(
    data_root: str, tenant: str, tlog: TenantEventLog | None = None
) -> pl.LazyFrame:
    """Every event of `tenant` the server can see, in EVENT_SCHEMA, each event_id once: the
    validated warehouse (`recsys.ingest.scan_events`), the API's files flushed to landing and
    not yet ingested (ingest moves them out: `landed_api_files`) and, with `tlog`, the events
    still in the log.
    Deleted (tombstoned) events are left out. Imported landing files that ingest has not
    validated yet are not read (they may hold rows that will be rejected)."""
    from recsys.ingest import scan_events  # the ingest module is heavy; only readers need it

    storage = Storage(data_root)
    cols = list(EVENT_SCHEMA)
    parts = [scan_events(storage, tenant).select(cols)]
    api_files = landed_api_files(storage, tenant)
    if api_files:
        parts.append(pl.scan_parquet(api_files).select(cols))
    deleted = set(read_tombstones(data_root, tenant))
    if tlog is not None:
        parts.append(tlog.logged_frame().lazy())
        deleted |= set(tlog._deleted)
    lf = pl.concat(
        [p.select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()]) for p in parts],
        how="vertical",
    ).unique(subset="event_id", keep="first", maintain_order=True)
    if deleted:
        lf = lf.filter(~pl.col("event_id").is_in(list(deleted)))
    return lf

"""Durable event intake: an append-only, fsync'd write-ahead log per tenant, flushed to landing.

Layout under ``<data root>/serving/events/<tenant>/`` (feedback labels use the same log under
``serving/feedback/<tenant>/``)::

    wal/seg-00000001.log   closed segment (its last record is an END marker)
    wal/seg-00000002.log   the active segment (highest number): every worker appends here
    append.lock            flock held while appending (all gunicorn workers, all hosts on NFS)
    flush.lock             flock held while flushing closed segments to landing
    tombstones/*.parquet   deleted event ids (event_id, deleted_at) of flushed segments

Record framing: ``<u32 length><u32 crc32(payload)><payload>``, little-endian, payload = JSON.
A reader stops at the first frame that is incomplete or whose CRC does not match; the appender
truncates such a torn tail of the active segment (under the lock) before writing after it, so a
crash in the middle of a write never corrupts a later record.

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
* Flushing (on segment roll, on a timer, or `flush_events(data_root)`) converts closed segments
  into ``landing/<tenant>/events/api-<segment>.parquet`` (temporary name, then atomic rename;
  deterministic name, so a flush interrupted before the segment is deleted lands it once),
  then deletes the segment. The landing sensor picks the files up like imported files.
"""

from __future__ import annotations

import fcntl
import io
import logging
import os
import re
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import polars as pl

from recsys.contract import EVENT_SCHEMA
from recsys.storage import Storage
from recsys.validation import check_event_rows, validate_events

log = logging.getLogger("recsys.serving")

_HEADER = struct.Struct("<II")
_SEGMENT = re.compile(r"^seg-(\d{8})\.log$")
END = {"k": "end"}
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
#: Longest a group commit waits for the requests of the previous batch to come back (see
#: `TenantEventLog._take_batch`); only under concurrent load, never for a lone request.
DEFAULT_LINGER_S = 0.002
#: Fields an API event may carry; `type` and `metadata` are the /v1/recs spellings of
#: `event_type` and `context`.
EVENT_FIELDS = frozenset(
    {
        "event_id",
        "user_id",
        "item_id",
        "event_type",
        "type",
        "timestamp",
        "value",
        "session_id",
        "context",
        "metadata",
        "tenant",
    }
)


# --- framing -------------------------------------------------------------------------------------
def frame(record: dict[str, Any]) -> bytes:
    """One record as a length + CRC framed byte string."""
    payload = orjson.dumps(record)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def frames(data: bytes | memoryview, start: int = 0) -> tuple[list[tuple[int, bytes]], int]:
    """Payloads `(offset, payload)` of the frames of `data` from `start` whose CRC matches, and
    the offset after the last of them (where a torn tail begins); the payloads unparsed."""
    out: list[tuple[int, bytes]] = []
    append, unpack, crc32 = out.append, _HEADER.unpack_from, zlib.crc32
    view = memoryview(data)
    pos, n = start, len(data)
    while pos + 8 <= n:
        length, crc = unpack(data, pos)
        end = pos + 8 + length
        if end > n:
            break
        payload = bytes(view[pos + 8 : end])
        if crc32(payload) != crc:
            break
        append((pos, payload))
        pos = end
    return out, pos


def read_frames(data: bytes | memoryview, start: int = 0) -> tuple[list[tuple[int, dict]], int]:
    """Records `(offset, record)` of `data` from `start`, and the offset after the last good one.

    Stops at an incomplete or corrupt frame (a torn tail): the returned offset is where the
    valid prefix ends.
    """
    payloads, end = frames(data, start)
    out: list[tuple[int, dict]] = []
    for pos, payload in payloads:
        try:
            out.append((pos, orjson.loads(payload)))
        except orjson.JSONDecodeError:
            return out, pos
    return out, end


#: How every event record's payload begins (`_record`: orjson keeps the key order) and what
#: follows its id: a reader that only needs the id takes it from the bytes (`event_id_of`).
_EVENT_HEAD = b'{"k":"e","id":"'
_EVENT_ID_END = b'","u":'


def event_id_of(payload: bytes) -> str | None:
    """The id of an event record's payload without parsing the JSON, or None when the
    payload is not an event record or its id is escaped (then parse it)."""
    if not payload.startswith(_EVENT_HEAD):
        return None
    end = payload.find(_EVENT_ID_END, 15)
    if end < 0:
        return None
    raw = payload[15:end]
    if b"\\" in raw or b'"' in raw:
        return None
    return raw.decode()


def segment_name(number: int) -> str:
    return f"seg-{number:08d}.log"


def list_segments(wal_dir: str) -> list[int]:
    """Segment numbers present in `wal_dir`, ascending."""
    try:
        names = os.listdir(wal_dir)
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_SEGMENT.match, names) if m)


def read_segment(path: str) -> tuple[list[tuple[int, dict]], int, int]:
    """(records, valid bytes, file bytes) of one segment file."""
    with open(path, "rb") as f:
        data = f.read()
    records, end = read_frames(data)
    return records, end, len(data)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- the shared segment log ------------------------------------------------------------------
class SegmentLog:
    """An append-only log in numbered segment files, shared by processes through `flock`.

    Every process keeps an in-memory view (`on_record` is called once per record, in log order,
    for records written by any process; with `on_event_id`, an event record read back from
    the file is handed to it as its id alone, without parsing the JSON) and catches up with
    the others' writes under the lock before appending, so a duplicate check made under the
    lock sees every committed record.
    """

    def __init__(
        self,
        directory: str,
        on_record: Callable[[int, int, dict], None],
        on_segment_removed: Callable[[int], None] | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        on_event_id: Callable[[int, int, str], None] | None = None,
    ) -> None:
        self.dir = directory
        self._on_event_id = on_event_id
        self.wal_dir = os.path.join(directory, "wal")
        os.makedirs(self.wal_dir, exist_ok=True)
        self._on_record = on_record
        self._on_removed = on_segment_removed or (lambda seg: None)
        self._segment_bytes = segment_bytes
        self._lock_path = os.path.join(directory, "append.lock")
        self._mutex = threading.Lock()  # this process's threads; flock orders the processes
        self._seg = 0  # segment this process has read up to (and appends to)
        self._offset = 0  # bytes of _seg already read
        self._known: set[int] = set()
        self._fd: int | None = None
        self._fd_seg = 0
        self._opened_at = time.time()

    # -- locking
    def _flock(self, path: str, blocking: bool = True):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    @staticmethod
    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def _path(self, seg: int) -> str:
        return os.path.join(self.wal_dir, segment_name(seg))

    # -- reading other processes' writes
    def _catch_up(self, repair: bool) -> None:
        """Read every record appended since the last call (caller holds `_mutex`; `repair`
        only with the append flock held: truncates a torn tail of the active segment)."""
        segs = list_segments(self.wal_dir)
        for gone in sorted(self._known - set(segs)):  # flushed (deleted) by some process
            self._known.discard(gone)
            self._on_removed(gone)
        if not segs:
            if not repair:
                return
            self._create(1)
            segs = [1]
        if self._seg not in segs:
            # first call, or our segment was flushed: continue with the next one that exists
            # (the flusher never deletes the newest segment, so there always is one)
            later = [s for s in segs if s > self._seg]
            self._seg, self._offset = (later[0] if later else segs[-1]), 0
            self._opened_at = time.time()
        while True:
            path = self._path(self._seg)
            self._known.add(self._seg)
            try:
                with open(path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:  # flushed while we read; move on
                data = b""
            payloads, end = frames(data)
            ended = False
            on_id = self._on_event_id
            for off, payload in payloads:
                if on_id is not None:  # the id is all the view needs of an event record
                    eid = event_id_of(payload)
                    if eid is not None:
                        on_id(self._seg, self._offset + off, eid)
                        continue
                try:
                    rec = orjson.loads(payload)
                except orjson.JSONDecodeError:  # corrupt in spite of its CRC: stop here
                    end = off
                    break
                if rec.get("k") == "end":
                    ended = True
                    break
                self._on_record(self._seg, self._offset + off, rec)
            later = [s for s in segs if s > self._seg]
            if ended or (later and not data[end:]):
                if not later:
                    if not repair:
                        self._offset += end
                        return
                    self._create(self._seg + 1)
                    later = [self._seg + 1]
                self._seg, self._offset = later[0], 0
                self._opened_at = time.time()
                continue
            if end < len(data):
                if later:
                    log.error(
                        "segment %s has %d unreadable bytes after offset %d; skipped",
                        path,
                        len(data) - end,
                        self._offset + end,
                    )
                    self._seg, self._offset = later[0], 0
                    continue
                if repair:  # torn tail of the active segment: never acknowledged, cut it
                    log.warning("truncating a torn tail of %d bytes in %s", len(data) - end, path)
                    with open(path, "r+b") as f:
                        f.truncate(self._offset + end)
                        os.fsync(f.fileno())
            self._offset += end
            return

    def _create(self, seg: int) -> None:
        fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.close(fd)
        _fsync_dir(self.wal_dir)
        self._opened_at = time.time()

    def refresh(self) -> None:
        """Catch up with records other processes appended (reads only)."""
        with self._mutex:
            self._catch_up(repair=False)

    # -- writing
    def append(self, prepare: Callable[[], list[dict]], roll: bool = False) -> Any:
        """Under the lock: catch up, call `prepare()` (which decides what to write from the
        now complete view and returns the records), append them, roll the segment if it is
        full (or `roll`), then fsync. Returns the segment numbers closed by a roll."""
        closed, fd = self.append_unsynced(prepare, roll)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return closed

    def append_unsynced(
        self, prepare: Callable[[], list[dict]], roll: bool = False
    ) -> tuple[list[int], int]:
        """`append` without its final fsync: returns (closed segments, fd) where `fd` is a
        private duplicate of the segment file written to; the caller must `os.fsync(fd)` (and
        close it) before acknowledging anything `prepare` decided. (A roll, or a switch to
        another segment, fsyncs the file it leaves at once.) This lets a group commit validate
        the next batch while the previous one is being fsync'd."""
        with self._mutex:
            lock = self._flock(self._lock_path)
            try:
                self._catch_up(repair=True)
                records = prepare()
                fd = self._active_fd()
                closed: list[int] = []
                if records:
                    frames = [frame(r) for r in records]
                    buf = b"".join(frames)
                    os.write(fd, buf)
                    pos = self._offset
                    for r, fr in zip(records, frames, strict=True):
                        self._on_record(self._seg, pos, r)
                        pos += len(fr)
                    self._offset = pos
                if (roll or self._offset >= self._segment_bytes) and self._offset:
                    os.write(fd, frame(END))
                    closed.append(self._seg)
                    self._create(self._seg + 1)
                    self._seg, self._offset = self._seg + 1, 0
                if closed:
                    os.fsync(fd)  # the closed segment is complete and durable before it is left
            finally:
                self._unlock(lock)
            dup = os.dup(fd)
            if closed:
                os.close(self._fd)
                self._fd = None
            return closed, dup

    def _active_fd(self) -> int:
        if self._fd is None or self._fd_seg != self._seg:
            if self._fd is not None:
                os.fsync(self._fd)
                os.close(self._fd)
            self._fd = os.open(self._path(self._seg), os.O_WRONLY | os.O_APPEND)
            self._fd_seg = self._seg
        return self._fd

    def active_age_s(self) -> float:
        return time.time() - self._opened_at

    def active_bytes(self) -> int:
        return self._offset

    def read_at(self, seg: int, offset: int) -> dict | None:
        """The record at (segment, offset), or None when that segment was flushed meanwhile."""
        try:
            with open(self._path(seg), "rb") as f:
                f.seek(offset)
                head = f.read(_HEADER.size)
                length, crc = _HEADER.unpack(head)
                payload = f.read(length)
        except (FileNotFoundError, struct.error):
            return None
        if zlib.crc32(payload) != crc:
            return None
        return orjson.loads(payload)

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# --- events --------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    """The outcome of one submitted event."""

    status: str  # accepted | duplicate | rejected
    event_id: str | None = None
    reason: str | None = None
    detail: str | None = None


class _Pending:
    """One submit() call waiting for its batch: `done()` releases the waiting thread (a held
    lock: the cheapest thing to block on, cheaper than a threading.Event)."""

    __slots__ = ("rows", "results", "error", "_lock")

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows
        self.results: list[ItemResult] | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._lock.acquire()

    def done(self) -> None:
        self._lock.release()

    def wait(self, timeout_s: float) -> bool:
        return self._lock.acquire(timeout=timeout_s)


_ALIASES = {"type": "event_type", "metadata": "context"}


def to_raw_row(body: Any, now: Callable[[], str]) -> dict[str, Any] | ItemResult:
    """An API event object as a raw contract row (strings; validation does the typing), or a
    rejected result when it is not even an object of known fields. An event without a
    timestamp gets `now()` (the receipt time)."""
    if type(body) is not dict:
        return ItemResult("rejected", reason="unparsable", detail="an event must be a JSON object")
    if not body.keys() <= EVENT_FIELDS:
        unknown = ", ".join(sorted(set(body) - EVENT_FIELDS))
        return ItemResult("rejected", reason="unparsable", detail=f"unknown field(s): {unknown}")
    row: dict[str, Any] = {}
    for key, value in body.items():
        key = _ALIASES.get(key, key)
        if key in row:
            return ItemResult(
                "rejected",
                reason="unparsable",
                detail=f"'{key}' is given twice (under both of its names)",
            )
        kind = type(value)
        if key == "context" and value is not None:
            if kind is not dict:
                return ItemResult(
                    "rejected", reason="unparsable", detail="context/metadata must be an object"
                )
            row[key] = orjson.dumps(value).decode()
        elif kind is str or value is None:
            row[key] = value
        elif kind is int or kind is float:
            row[key] = str(value)
        else:
            return ItemResult(
                "rejected",
                reason="bad_value" if key == "value" else "unparsable",
                detail=f"{key} must be a string or a number",
            )
    if row.get("timestamp") is None:
        row["timestamp"] = now()  # the receipt time (send one for idempotent retries)
    return row


_RAW_COLUMNS = (
    "event_id",
    "tenant",
    "user_id",
    "item_id",
    "event_type",
    "timestamp",
    "value",
    "session_id",
    "context",
)


def _record(event: dict[str, Any]) -> dict[str, Any]:
    """The log record of a validated event (`check_event_rows` form: timestamp in epoch us)."""
    return {
        "k": "e",
        "id": event["event_id"],
        "u": event["user_id"],
        "i": event["item_id"],
        "t": event["event_type"],
        "ts": event["timestamp"],
        "v": event["value"],
        "s": event["session_id"],
        "c": event["context"],
    }


def validate_rows(
    rows: list[dict[str, Any]], tenant: str
) -> list[dict[str, Any] | tuple[str, str | None]]:
    """Per raw row (`to_raw_row`), its log record or (reason, detail) of its rejection, by the
    contract: `check_event_rows` in plain Python (microseconds a row), and the rows it leaves
    undecided through `validate_events` (milliseconds a pass, however few the rows)."""
    out = check_event_rows(rows, tenant=tenant)
    undecided = [k for k, o in enumerate(out) if o is None]
    if undecided:
        raw = pl.DataFrame(
            {c: [rows[k].get(c) for k in undecided] for c in _RAW_COLUMNS},
            schema={c: pl.String for c in _RAW_COLUMNS},
        )
        good, rejects = validate_events(raw, tenant=tenant, source="api", dedupe=False)
        rejected = {
            rn - 1: (reason, detail)
            for rn, reason, detail in rejects.select("row_number", "reason", "detail").iter_rows()
        }
        events = good.with_columns(pl.col("timestamp").dt.epoch("us")).iter_rows(named=True)
        for j, k in enumerate(undecided):
            out[k] = rejected[j] if j in rejected else next(events)
    return [o if type(o) is tuple else _record(o) for o in out]  # type: ignore[arg-type]


def record_to_event(rec: dict[str, Any], tenant: str) -> dict[str, Any]:
    """A log record as a contract event (JSON-friendly: ISO timestamp)."""
    ts = datetime.fromtimestamp(rec["ts"] / 1e6, UTC)
    return {
        "event_id": rec["id"],
        "tenant": tenant,
        "user_id": rec["u"],
        "item_id": rec["i"],
        "event_type": rec["t"],
        "timestamp": ts.isoformat().replace("+00:00", "Z"),
        "value": rec["v"],
        "session_id": rec["s"],
        "context": orjson.loads(rec["c"]) if rec["c"] else None,
    }


def records_frame(records: Iterable[dict[str, Any]], tenant: str) -> pl.DataFrame:
    """Event log records as a DataFrame in EVENT_SCHEMA."""
    recs = list(records)
    df = pl.DataFrame(
        {
            "event_id": [r["id"] for r in recs],
            "tenant": [tenant] * len(recs),
            "user_id": [r["u"] for r in recs],
            "item_id": [r["i"] for r in recs],
            "event_type": [r["t"] for r in recs],
            "timestamp": [r["ts"] for r in recs],
            "value": [r["v"] for r in recs],
            "session_id": [r["s"] for r in recs],
            "context": [r["c"] for r in recs],
        },
        schema_overrides={
            "timestamp": pl.Int64,
            "value": pl.Float64,
            "event_id": pl.String,
            "tenant": pl.String,
            "user_id": pl.String,
            "item_id": pl.String,
            "event_type": pl.String,
            "session_id": pl.String,
            "context": pl.String,
        },
    )
    return df.with_columns(
        pl.col("timestamp").cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    ).select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])


#: Event records as Polars reads their JSON (`_record`'s keys).
_RECORD_SCHEMA = {
    "k": pl.String,
    "id": pl.String,
    "u": pl.String,
    "i": pl.String,
    "t": pl.String,
    "ts": pl.Int64,
    "v": pl.Float64,
    "s": pl.String,
    "c": pl.String,
}


def payloads_frame(payloads: list[bytes], tenant: str) -> pl.DataFrame:
    """Event record payloads (JSON bytes) as a DataFrame in EVENT_SCHEMA: `records_frame` of
    the parsed records, parsed by Polars in one pass instead of one `orjson.loads` each."""
    if not payloads:
        return records_frame([], tenant)
    df = pl.read_ndjson(io.BytesIO(b"\n".join(payloads)), schema=_RECORD_SCHEMA)
    return df.select(
        pl.col("id").alias("event_id"),
        pl.lit(tenant, dtype=pl.String).alias("tenant"),
        pl.col("u").alias("user_id"),
        pl.col("i").alias("item_id"),
        pl.col("t").alias("event_type"),
        pl.col("ts").cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias("timestamp"),
        pl.col("v").alias("value"),
        pl.col("s").alias("session_id"),
        pl.col("c").alias("context"),
    ).select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])


class TenantEventLog:
    """The event log of one tenant in this process: group commit, index, tombstones, flush."""

    def __init__(
        self,
        data_root: str,
        tenant: str,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        max_batch_rows: int = 20_000,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        self.tenant = tenant
        self.data_root = data_root
        self.dir = os.path.join(data_root, "serving", "events", tenant)
        self._index: dict[str, tuple[int, int]] = {}  # event_id -> (segment, offset)
        self._by_segment: dict[int, list[str]] = {}
        self._deleted: dict[str, int] = {}  # event_id -> deleted_at (us)
        self.log = SegmentLog(
            self.dir, self._on_record, self._on_removed, segment_bytes, self._on_event_id
        )
        self._load_tombstones()
        self._queue: list[_Pending] = []
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._max_batch = max_batch_rows
        self._linger_s = linger_s
        self._inflight = 0  # submit() calls of this process not yet returned
        self._peak = 0  # most of them at once since the current batch was taken
        self._target = 1  # requests a batch waits (up to linger_s) to gather
        self._synced: list[tuple[list[_Pending], int]] = []  # written, waiting for the fsync
        self._sync_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._syncer: threading.Thread | None = None
        self._pid = 0
        self.batches = 0
        self.batched_rows = 0
        self.log.refresh()

    # -- view
    def _on_record(self, seg: int, offset: int, rec: dict) -> None:
        kind = rec.get("k")
        if kind == "e":
            self._index.setdefault(rec["id"], (seg, offset))
            self._by_segment.setdefault(seg, []).append(rec["id"])
        elif kind == "t":
            self._deleted[rec["id"]] = rec["at"]

    def _on_event_id(self, seg: int, offset: int, eid: str) -> None:
        self._index.setdefault(eid, (seg, offset))
        self._by_segment.setdefault(seg, []).append(eid)

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
        order. Returns after the accepted ones are fsync'd."""
        received: list[str] = []

        def now() -> str:  # one receipt time per request, taken only when an event needs it
            if not received:
                received.append(datetime.now(UTC).isoformat())
            return received[0]

        rows: list[Any] = [to_raw_row(b, now) for b in bodies]
        pending = _Pending(rows)
        self._ensure_thread()
        with self._cond:
            self._queue.append(pending)
            self._queued_rows += len(rows)
            self._inflight += 1
            if self._inflight > self._peak:
                self._peak = self._inflight
            if (
                len(self._queue) == 1
                or len(self._queue) >= self._target
                or self._queued_rows >= self._max_batch
            ):
                self._cond.notify()
        try:
            if not pending.wait(timeout_s):
                raise TimeoutError("the event log did not commit in time")
        finally:
            with self._cond:
                self._inflight -= 1
        if pending.error is not None:
            raise pending.error
        assert pending.results is not None
        return pending.results

    def _ensure_thread(self) -> None:
        pid = os.getpid()
        if (
            self._thread is None
            or self._pid != pid
            or not self._thread.is_alive()
            or not self._syncer.is_alive()
        ):
            with self._cond:
                if (
                    self._thread is None
                    or self._pid != pid
                    or not self._thread.is_alive()
                    or not self._syncer.is_alive()
                ):
                    if self._pid != pid:  # forked: the parent's queues are not ours
                        self._pid = pid
                        self._queue, self._queued_rows, self._synced = [], 0, []
                        self._inflight = self._peak = 0
                        self._target = 1
                        self._sync_cond = threading.Condition()
                    if self._syncer is None or not self._syncer.is_alive() or self._pid != pid:
                        self._syncer = threading.Thread(
                            target=self._sync_loop, daemon=True, name=f"event-sync-{self.tenant}"
                        )
                        self._syncer.start()
                    if self._thread is None or not self._thread.is_alive():
                        self._thread = threading.Thread(
                            target=self._run, daemon=True, name=f"event-log-{self.tenant}"
                        )
                        self._thread.start()

    def _take_batch(self) -> list[_Pending]:
        """The next batch (caller holds `_cond`). Under load it waits up to `linger_s` until as
        many requests are queued as were in flight at once during the previous batch: the
        requests just answered come back while the clients turn around, and one validation
        pass and one fsync then serve all of them instead of every other half."""
        while not self._queue:
            self._cond.wait()
        if self._linger_s > 0 and self._target > 1:
            deadline = time.monotonic() + self._linger_s
            while len(self._queue) < self._target and self._queued_rows < self._max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        batch, rows = [], 0
        while self._queue and (not batch or rows + len(self._queue[0].rows) <= self._max_batch):
            p = self._queue.pop(0)
            batch.append(p)
            rows += len(p.rows)
        self._queued_rows -= rows
        # the concurrency seen while this batch was gathering sets what the next one waits for
        self._target, self._peak = self._peak, self._inflight
        return batch

    def _run(self) -> None:
        """Validate and write batches; the fsync (and the answers) happen in `_sync_loop`, so
        the next batch is validated while the previous one is being fsync'd."""
        while True:
            with self._cond:
                batch = self._take_batch()
            try:
                fd = self._commit(batch)
            except BaseException as e:  # handed to every waiting request (-> 500 there)
                log.exception("event log commit failed")
                for p in batch:
                    p.error = e
                fd = None
            if fd is None:  # nothing was written (every row rejected) or the commit failed
                for p in batch:
                    p.done()
                continue
            with self._sync_cond:
                self._synced.append((batch, fd))
                self._sync_cond.notify()

    def _sync_loop(self) -> None:
        """fsync what `_run` wrote, then release its requests: one fsync serves every batch
        written since the previous one (the fds of one segment file share its inode)."""
        while True:
            with self._sync_cond:
                while not self._synced:
                    self._sync_cond.wait()
                items, self._synced = self._synced, []
            error: BaseException | None = None
            try:
                # every fd of a segment file syncs that file: one fsync per distinct file
                seen: set[tuple[int, int]] = set()
                for _, fd in items:
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        os.fsync(fd)
            except BaseException as e:
                log.exception("event log fsync failed")
                error = e
            for batch, fd in items:
                os.close(fd)
                for p in batch:
                    if error is not None:
                        p.error = error
                    p.done()

    def _commit(self, batch: list[_Pending]) -> int | None:
        """Validate `batch` and write its new events (not yet fsync'd); returns the fd to fsync
        before answering, or None when nothing was appended."""
        flat: list[dict[str, Any]] = []
        slots: list[tuple[_Pending, int]] = []
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
        good_slots: list[tuple[_Pending, int]] = []
        records: list[dict[str, Any]] = []
        for slot, outcome in zip(slots, validate_rows(flat, self.tenant), strict=True):
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
        self.batched_rows += len(flat)
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
        """(event, deleted_at_us): the event from the log or from flushed landing files."""
        self.log.refresh()
        deleted = self._deleted.get(event_id)
        loc = self._index.get(event_id)
        if loc is not None:
            rec = self.log.read_at(*loc)
            if rec is not None:
                return record_to_event(rec, self.tenant), deleted
        storage = Storage(self.data_root)
        files = [
            f
            for f in storage.landing_files(self.tenant, "events")
            if os.path.basename(f).startswith("api-")
        ]
        if files:
            hit = pl.scan_parquet(files).filter(pl.col("event_id") == event_id).head(1).collect()
            if hit.height:
                row = hit.row(0, named=True)
                row["timestamp"] = row["timestamp"].isoformat().replace("+00:00", "Z")
                row["context"] = orjson.loads(row["context"]) if row["context"] else None
                return row, deleted
        return None, deleted

    def is_deleted(self, event_id: str) -> bool:
        return event_id in self._deleted

    def pending_events(self) -> Iterator[dict[str, Any]]:
        """Events still in the log (not yet flushed), as contract dicts, in log order."""
        self.log.refresh()
        for seg in list_segments(self.log.wal_dir):
            try:
                records, _, _ = read_segment(os.path.join(self.log.wal_dir, segment_name(seg)))
            except FileNotFoundError:
                continue
            for _, rec in records:
                if rec.get("k") == "e":
                    yield record_to_event(rec, self.tenant)

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


def flush_tenant(data_root: str, tenant: str, blocking: bool = False) -> list[str]:
    """Land every closed segment of `tenant` as Parquet and delete it; returns the landed paths.

    Safe to run from any process at any time (a `flush.lock` flock serialises flushers; with
    `blocking=False` a flush already running elsewhere makes this return []).
    """
    directory = os.path.join(data_root, "serving", "events", tenant)
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
        tomb_dir = Storage(data_root).tombstones_dir(tenant)
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
                if payload.startswith(_EVENT_HEAD):  # parsed together by Polars below
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
                _atomic_write(
                    tdf.with_columns(
                        pl.col("deleted_at").cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
                    ),
                    os.path.join(tomb_dir, stem + ".parquet"),
                )
            if events.height:
                target = os.path.join(landing, stem + ".parquet")
                if not os.path.exists(target):
                    _atomic_write(events, target)
                landed.append(target)
            os.unlink(path)
            _fsync_dir(wal_dir)
        return landed
    finally:
        os.close(fd)


def _dir_tag(directory: str) -> str:
    """A short stable tag of the log folder (so two data roots never produce one file name)."""
    return format(zlib.crc32(os.path.abspath(directory).encode()), "08x")


def _atomic_write(df: pl.DataFrame, path: str) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        df.write_parquet(f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


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


def flush_events(
    data_root: str, tenants: Iterable[str] | None = None, roll: bool = True
) -> dict[str, list[str]]:
    """Land the logged events of `tenants` (default: every tenant with a log) now.

    With `roll`, the active segments are closed first, so everything acknowledged so far lands.
    Callable from `recsys` (a CLI command or an asset) without a running server.
    """
    base = os.path.join(data_root, "serving", "events")
    if tenants is None:
        tenants = sorted(os.listdir(base)) if os.path.isdir(base) else []
    out = {}
    for tenant in tenants:
        if roll:
            tlog = TenantEventLog(data_root, tenant)
            tlog.roll()
            tlog.log.close()
        out[tenant] = flush_tenant(data_root, tenant, blocking=True)
    return out


class EventLogs:
    """The event logs of every tenant in this process, plus the timer that flushes them."""

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
                        self.data_root, tenant, self._segment_bytes, linger_s=self._linger_s
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


# --- feedback labels -----------------------------------------------------------------------------
FEEDBACK_LABELS = ("relevant", "not_relevant")


class FeedbackLog:
    """Human labels (user, item, relevant|not_relevant) of one tenant, in the same durable log
    format under ``serving/feedback/<tenant>/``; held in memory for reading back (labels are
    few compared with events)."""

    def __init__(self, data_root: str, tenant: str) -> None:
        self.tenant = tenant
        self.labels: dict[str, dict[str, Any]] = {}
        self.log = SegmentLog(
            os.path.join(data_root, "serving", "feedback", tenant), self._on_record
        )
        self.log.refresh()

    def _on_record(self, seg: int, offset: int, rec: dict) -> None:
        if rec.get("k") == "f":
            self.labels.setdefault(rec["id"], rec)

    def add(self, label: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Append `label` (which has an `id`) durably; (stored record, created?)."""
        outcome: dict[str, Any] = {}

        def prepare() -> list[dict]:
            existing = self.labels.get(label["id"])
            if existing is not None:
                outcome["rec"], outcome["new"] = existing, False
                return []
            rec = {"k": "f", **label}
            outcome["rec"], outcome["new"] = rec, True
            return [rec]

        self.log.append(prepare)
        return outcome["rec"], outcome["new"]

    def all(self) -> list[dict[str, Any]]:
        self.log.refresh()
        return list(self.labels.values())


# --- reading every known event of a tenant -----------------------------------------------------
def scan_all_events(
    data_root: str, tenant: str, tlog: TenantEventLog | None = None
) -> pl.LazyFrame:
    """Every event of `tenant` the server can see, in EVENT_SCHEMA, each event_id once: the
    validated warehouse (`recsys.ingest.scan_events`), the API's landed files (``api-*``, not
    yet ingested or ingested: deduplicated) and, with `tlog`, the events still in the log.
    Deleted (tombstoned) events are left out. Imported landing files that ingest has not
    validated yet are not read (they may hold rows that will be rejected)."""
    from recsys.ingest import scan_events  # the ingest module is heavy; only readers need it

    storage = Storage(data_root)
    cols = list(EVENT_SCHEMA)
    parts = [scan_events(storage, tenant).select(cols)]
    api_files = [
        f
        for f in storage.landing_files(tenant, "events")
        if os.path.basename(f).startswith("api-") and f.endswith(".parquet")
    ]
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

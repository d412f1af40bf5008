"""A generic durable log: numbered segment files of length + CRC framed JSON records, shared by
processes through `flock`, with recovery of a torn tail and a group commit.

Layout of a log folder::

    wal/seg-00000001.log   closed segment (its last record is an END marker)
    wal/seg-00000002.log   the active segment (highest number): every process appends here
    append.lock            flock held while appending (all gunicorn workers, all hosts on NFS)

Record framing: ``<u32 length><u32 crc32(payload)><payload>``, little-endian, payload = JSON.
A reader stops at the first frame that is incomplete or whose CRC does not match; the appender
truncates such a torn tail of the active segment (under the lock) before writing after it, so a
crash in the middle of a write never corrupts a later record.

`GroupCommit` batches concurrent submissions of one process: one thread validates and writes a
batch (the caller's `commit`) while a second fsyncs the previous one and releases its
requests, so every submission returns only after an fsync that started after its batch was
written. What the records mean is the caller's: the API's events (`serving.events_log`) and
feedback labels (`serving.feedback_log`) use this log.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import orjson

from recsys.durable import fsync_dir

log = logging.getLogger("recsys.serving")

_HEADER = struct.Struct("<II")
_SEGMENT = re.compile(r"^seg-(\d{8})\.log$")
END = {"k": "end"}
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
#: Longest a group commit waits for the requests of the previous batch to come back (see
#: `GroupCommit._take_batch`); only under concurrent load, never for a lone request.
DEFAULT_LINGER_S = 0.002


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


class SegmentLog:
    """An append-only log in numbered segment files, shared by processes through `flock`.

    Every process keeps an in-memory view (`on_record` is called once per record, in log order,
    for records written by any process; with `on_payload`, a record read back from the file is
    first offered to it as its raw JSON bytes, and is not parsed when it returns True: a view
    that needs one field of a frequent record takes it from the bytes) and catches up with the
    others' writes under the lock before appending, so a check made under the lock (a
    duplicate id) sees every committed record.
    """

    def __init__(
        self,
        directory: str,
        on_record: Callable[[int, int, dict], None],
        on_segment_removed: Callable[[int], None] | None = None,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        on_payload: Callable[[int, int, bytes], bool] | None = None,
    ) -> None:
        self.dir = directory
        self._on_payload = on_payload
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
            peek = self._on_payload
            for off, payload in payloads:
                if peek is not None and peek(self._seg, self._offset + off, payload):
                    continue  # the view took what it needs from the bytes
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
        fsync_dir(self.wal_dir)
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


# --- group commit --------------------------------------------------------------------------------
class Pending:
    """One `GroupCommit.submit` call waiting for its batch: its `rows`, the `results` the
    commit fills in (one per row) or the `error` it raised; `done()` releases the waiting
    thread (a held lock: the cheapest thing to block on, cheaper than a threading.Event)."""

    __slots__ = ("rows", "results", "error", "_lock")

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows
        self.results: list[Any] | None = None
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._lock.acquire()

    def done(self) -> None:
        self._lock.release()

    def wait(self, timeout_s: float) -> bool:
        return self._lock.acquire(timeout=timeout_s)


class GroupCommit:
    """Concurrent submissions of one process validated and written together, then fsync'd.

    `commit(batch)` runs on the committer thread with a list of `Pending`: it fills each
    one's `results`, writes what is to be written (typically `SegmentLog.append_unsynced`) and
    returns the fd to fsync before the batch is answered, or None when it wrote nothing. The
    syncer thread fsyncs (one fsync per distinct file for every batch written since its last
    one) and releases the requests. Under load the committer waits (at most `linger_s`) until
    as many requests are queued as were in flight during the previous batch; a lone request
    never waits. A batch holds at most `max_batch_rows` rows (and at least one request).
    """

    def __init__(
        self,
        name: str,
        commit: Callable[[list[Pending]], int | None],
        max_batch_rows: int = 20_000,
        linger_s: float = DEFAULT_LINGER_S,
    ) -> None:
        self._name = name
        self._commit = commit
        self._queue: list[Pending] = []
        self._queued_rows = 0
        self._cond = threading.Condition()
        self._max_batch = max_batch_rows
        self._linger_s = linger_s
        self._inflight = 0  # submit() calls of this process not yet returned
        self._peak = 0  # most of them at once since the current batch was taken
        self._target = 1  # requests a batch waits (up to linger_s) to gather
        self._synced: list[tuple[list[Pending], int]] = []  # written, waiting for the fsync
        self._sync_cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._syncer: threading.Thread | None = None
        self._pid = 0

    def submit(self, rows: list[Any], timeout_s: float = 30.0) -> list[Any]:
        """Queue `rows` for the next batch; returns their results once `commit` has decided
        them and what it wrote is fsync'd (or raises what the commit or the fsync raised)."""
        pending = Pending(rows)
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
                raise TimeoutError(f"{self._name}: no commit within {timeout_s} s")
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
                            target=self._sync_loop, daemon=True, name=f"{self._name}-sync"
                        )
                        self._syncer.start()
                    if self._thread is None or not self._thread.is_alive():
                        self._thread = threading.Thread(
                            target=self._run, daemon=True, name=f"{self._name}-commit"
                        )
                        self._thread.start()

    def _take_batch(self) -> list[Pending]:
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
                log.exception("%s: commit failed", self._name)
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
                log.exception("%s: fsync failed", self._name)
                error = e
            for batch, fd in items:
                os.close(fd)
                for p in batch:
                    if error is not None:
                        p.error = error
                    p.done()

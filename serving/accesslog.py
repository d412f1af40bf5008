"""The JSON access log, written in batches by a thread instead of one write() per request.

A request hands its fields (a dict) to `AccessLog.write`: one deque append, no formatting and
no system call. A writer thread wakes every `flush_s` seconds (or sooner when `batch` lines
wait), formats the waiting lines with orjson and writes them with a few write() calls. The
lines of one process keep their order.

Nothing is lost on a clean shutdown: the writer thread is not a daemon, so the interpreter
waits for it at exit (after the main thread has finished: gunicorn's workers exit through
``sys.exit``, granian's through multiprocessing, which joins the threads too), and it writes
what waits before it ends. A kill -9 loses at most the last `flush_s` seconds of lines. When
the output cannot keep up, a request that finds `max_pending` lines waiting writes them itself
(a synchronous log's back-pressure rather than unbounded memory).

Several worker processes usually share one stderr. A write() of at most ``PIPE_BUF`` bytes to
a pipe is never interleaved with another process's, so to anything but a regular file the
lines go in chunks of whole lines of at most that size (a longer line alone), as the
per-request logging handler wrote them; a regular file (O_APPEND) takes a batch at once.

`install` makes an `AccessLog` the process's (``serving.app.configure_logging`` does it for
the server); `sink` is what the middleware writes to: the installed log, else the
``recsys.access`` logger when it is enabled for INFO (tests, an app embedded elsewhere), else
None.

Files (what `/v1/recs/logs` queries): `log_to_files(folder)` adds a `RotatingFiles` output to
the installed log (now, or when one is installed later): the same batches also go to
``<folder>/access-<YYYYMMDDHH>-<pid>.jsonl``, one file per worker and hour (a worker never
shares a file, so no lock), a new one after `max_bytes`; files older than `keep_hours` are
removed when a new one is opened.
"""

from __future__ import annotations

import glob
import logging
import os
import select
import stat
import threading
import time
import weakref
from collections import deque

import orjson

logger = logging.getLogger("recsys.access")

#: Seconds between the writer thread's flushes.
FLUSH_S = 0.5
#: Seconds between the writer thread's looks at whether the main thread has ended.
POLL_S = 0.1
#: Lines waiting that wake the writer before its timer.
BATCH = 2048
#: Lines waiting that make a request write them itself.
MAX_PENDING = 65536


class AccessLog:
    """Access lines (dicts, written as JSON lines) to the file descriptor `fd` (None: none)
    and to each of `outputs` (`RotatingFiles`), from a writer thread started by the first line
    (so that an instance made before a fork is usable in the child)."""

    def __init__(
        self,
        fd: int | None,
        flush_s: float = FLUSH_S,
        batch: int = BATCH,
        max_pending: int = MAX_PENDING,
        outputs: tuple[RotatingFiles, ...] = (),
    ) -> None:
        if flush_s <= 0 or batch < 1 or max_pending < batch:
            raise ValueError("need flush_s > 0 and 1 <= batch <= max_pending")
        self._fd = fd
        self._flush_s = flush_s
        self._batch = batch
        self._max_pending = max_pending
        self.outputs: list[RotatingFiles] = list(outputs)
        mode = os.fstat(fd).st_mode if fd is not None else stat.S_IFREG
        self._chunk = 1 << 20 if stat.S_ISREG(mode) else select.PIPE_BUF
        self._pending: deque[dict] = deque()
        self._write_lock = threading.Lock()  # one flush at a time: lines stay in order
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (log := ref()) and log._forget_thread())

    def write(self, fields: dict) -> None:
        """Queue one line (its values must not change afterwards)."""
        pending = self._pending
        pending.append(fields)
        if self._thread is None:
            self._start()
        if len(pending) >= self._batch or self._closed:
            if self._closed or len(pending) >= self._max_pending:
                self.flush()  # (no writer thread any more, or it cannot keep up)
            else:
                self._wake.set()

    def flush(self) -> None:
        """Write every queued line now (any thread)."""
        with self._write_lock:
            pending = self._pending
            dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
            lines = [dumps(pending.popleft(), option=newline) for _ in range(len(pending))]
            if lines:
                if self._fd is not None:
                    self._write_lines(lines)
                for output in self.outputs:
                    output.write(lines)

    def close(self) -> None:
        """Write what waits and stop the writer thread (later lines are written by the
        request that makes them)."""
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.flush()

    def _write_lines(self, lines: list[bytes]) -> None:
        chunk, size, start = self._chunk, 0, 0
        for i, line in enumerate(lines):
            if size and size + len(line) > chunk:
                self._write_all(b"".join(lines[start:i]))
                start, size = i, 0
            size += len(line)
        if start < len(lines):
            self._write_all(b"".join(lines[start:]))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="access-log-writer", daemon=False
                )
                self._thread.start()

    def _run(self) -> None:
        """Flush every `flush_s` (or when woken) until closed or the main thread has ended
        (the interpreter is exiting and waits for this thread: seen within `POLL_S`), then
        flush once more."""
        main = threading.main_thread()
        poll_s = min(POLL_S, self._flush_s)
        polls = max(1, round(self._flush_s / poll_s))
        waited = 0
        while not self._closed and main.is_alive():
            waited += 1
            if not self._wake.wait(poll_s) and waited < polls:
                continue
            self._wake.clear()
            waited = 0
            try:
                self.flush()
            except OSError:
                logging.getLogger("recsys.serving").exception("writing the access log failed")
        self._closed = True  # (before the last flush: a later line is written by its request)
        self.flush()

    def _forget_thread(self) -> None:
        """In a forked child: the parent's writer thread and queued lines are not ours."""
        self._thread = None
        self._closed = False
        self._pending = deque()
        self._write_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._wake = threading.Event()


class RotatingFiles:
    """JSON lines appended to ``<folder>/access-<YYYYMMDDHH>-<pid>[-<n>].jsonl`` (see the
    module docstring); `write` is called by one thread at a time (the log's write lock)."""

    def __init__(self, folder: str, max_bytes: int = 64 << 20, keep_hours: float = 72.0) -> None:
        self.folder = folder
        self._max_bytes = max_bytes
        self._keep_s = keep_hours * 3600
        self._fd: int | None = None
        self._name = ""
        self._hour = ""
        self._size = 0
        self._pid = 0
        self._part = 0

    def write(self, lines: list[bytes]) -> None:
        data = b"".join(lines)
        hour = time.strftime("%Y%m%d%H", time.gmtime())
        if (
            self._fd is None
            or self._pid != os.getpid()
            or hour != self._hour
            or (self._size + len(data) > self._max_bytes and self._size)
        ):
            self._open(hour)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]  # type: ignore[arg-type]
        self._size += len(data)

    def _open(self, hour: str) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        pid = os.getpid()
        self._part = self._part + 1 if (hour, pid) == (self._hour, self._pid) else 0
        self._hour, self._pid = hour, pid
        os.makedirs(self.folder, exist_ok=True)
        suffix = f"-{self._part}" if self._part else ""
        self._name = os.path.join(self.folder, f"access-{hour}-{pid}{suffix}.jsonl")
        self._fd = os.open(self._name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = os.fstat(self._fd).st_size
        cutoff = time.time() - self._keep_s
        for path in glob.glob(os.path.join(self.folder, "access-*.jsonl")):
            try:
                if os.path.getmtime(path) < cutoff:
                    os.remove(path)
            except OSError:
                continue


class LoggerSink:
    """Access lines as messages of the ``recsys.access`` logger (when no `AccessLog` is
    installed)."""

    def write(self, fields: dict) -> None:
        logger.info(orjson.dumps(fields).decode())


_installed: AccessLog | None = None
_logger_sink = LoggerSink()
_files: RotatingFiles | None = None  # `log_to_files`


def install(log: AccessLog | None) -> None:
    """Make `log` the process's access log (None: back to the logger); a replaced log is
    closed (its lines written). The files of `log_to_files` follow it."""
    global _installed
    previous, _installed = _installed, log
    if previous is not None and previous is not log:
        previous.close()
    if log is not None and _files is not None and _files not in log.outputs:
        log.outputs.append(_files)


def log_to_files(folder: str, **options) -> RotatingFiles:
    """Also write the installed log's lines (now, or once one is installed) to rotated files
    under `folder` (a second call with another folder moves them). Returns the output."""
    global _files
    folder = os.path.abspath(folder)
    if _files is not None and _files.folder == folder:
        return _files
    flush()  # (lines waiting now go where they went so far)
    old, _files = _files, RotatingFiles(folder, **options)
    if _installed is not None:
        _installed.outputs = [o for o in _installed.outputs if o is not old] + [_files]
    return _files


def flush() -> None:
    """Write the installed log's waiting lines now."""
    if _installed is not None:
        _installed.flush()


def sink() -> AccessLog | LoggerSink | None:
    """Where an access line goes: the installed `AccessLog`, else the ``recsys.access`` logger
    if it is enabled for INFO, else nowhere (None)."""
    if _installed is not None:
        return _installed
    return _logger_sink if logger.isEnabledFor(logging.INFO) else None

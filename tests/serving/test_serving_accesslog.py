"""serving.accesslog: access lines written in batches from a thread, in order, whole (never
interleaved with another process's on a shared pipe), none lost when the process exits."""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import threading

import orjson
import pytest

from serving import accesslog
from serving.accesslog import AccessLog

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _line(n: int, pad: int = 0) -> dict:
    return {"n": n, "path": "/v1/recommend", "user_agent": "x" * pad, "status": 200}


def test_lines_are_written_in_order_as_json(tmp_path):
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    log = AccessLog(fd, flush_s=60)  # (only close() writes them here)
    for n in range(5000):
        log.write(_line(n))
    log.close()
    os.close(fd)
    lines = path.read_bytes().splitlines()
    assert [orjson.loads(x) for x in lines] == [_line(n) for n in range(5000)]


def test_the_writer_thread_flushes_on_its_timer(tmp_path):
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    log = AccessLog(fd, flush_s=0.05)
    log.write(_line(1))
    deadline = threading.Event()
    for _ in range(100):  # at most 5 s
        if path.read_bytes():
            break
        deadline.wait(0.05)
    assert orjson.loads(path.read_bytes()) == _line(1)
    log.close()
    os.close(fd)


def test_a_request_writes_the_lines_itself_when_too_many_wait(tmp_path):
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    # batch = max_pending: the writer thread is never woken before the 100th line (with a
    # smaller batch it was, and could write all 99 before the check: a race under load)
    log = AccessLog(fd, flush_s=60, batch=100, max_pending=100)
    for n in range(99):
        log.write(_line(n))
    assert path.read_bytes() == b""  # (the timer is a minute away)
    log.write(_line(99))  # the 100th waiting line: written by this call, not the timer
    assert len(path.read_bytes().splitlines()) == 100
    log.close()
    os.close(fd)


def test_lines_written_after_close_are_not_kept_waiting(tmp_path):
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    log = AccessLog(fd, flush_s=60)
    log.write(_line(1))
    log.close()
    log.write(_line(2))
    assert [orjson.loads(x) for x in path.read_bytes().splitlines()] == [_line(1), _line(2)]
    os.close(fd)


def _pipe_writer(fd: int, tag: int, count: int) -> None:
    log = AccessLog(fd, flush_s=0.01, batch=64)
    for n in range(count):
        log.write({"tag": tag, "n": n, "user_agent": "y" * (n % 700)})
    log.close()


def test_processes_sharing_a_pipe_never_interleave_inside_a_line():
    """Two processes write ~9 MB of lines of up to ~750 bytes into one pipe that the reader
    drains slowly (so the pipe is full and writers block half way): every line arrives whole."""
    read_fd, write_fd = os.pipe()
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_pipe_writer, args=(write_fd, tag, 12_000)) for tag in (1, 2)]
    for p in writers:
        p.start()
    os.close(write_fd)
    data = bytearray()
    while chunk := os.read(read_fd, 1000):  # small reads: the writers fill the pipe
        data += chunk
    os.close(read_fd)
    for p in writers:
        p.join(30)
        assert p.exitcode == 0
    seen = {1: [], 2: []}
    for line in bytes(data).splitlines():
        record = orjson.loads(line)  # fails on a line cut by the other process's bytes
        seen[record["tag"]].append(record["n"])
    assert seen == {1: list(range(12_000)), 2: list(range(12_000))}


_EXIT_SCRIPT = """
import os, sys
sys.path.insert(0, {repo!r})
from serving.accesslog import AccessLog
log = AccessLog(os.open({path!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND), flush_s=30)
for n in range(1000):
    log.write({{"n": n}})
{exit}
"""


@pytest.mark.parametrize(
    "exit_by",
    [
        "sys.exit(0)",  # gunicorn's workers
        "raise SystemExit(0)",
        # granian's workers: multiprocessing children end with os._exit after joining threads
        "import multiprocessing as mp\n"
        "p = mp.get_context('fork').Process(target=lambda: [log.write({'n': n}) "
        "for n in range(1000, 1500)])\np.start(); p.join(); assert p.exitcode == 0",
    ],
)
def test_no_line_is_lost_when_the_process_exits(tmp_path, exit_by):
    path = tmp_path / "access.log"
    script = _EXIT_SCRIPT.format(repo=REPO, path=str(path), exit=exit_by)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    numbers = sorted(orjson.loads(x)["n"] for x in path.read_bytes().splitlines())
    expected = 1500 if "mp." in exit_by else 1000
    assert numbers == list(range(expected))  # (flush_s=30: only the exit wrote them)


def test_sink_is_the_installed_log_else_the_logger(tmp_path, caplog):
    fd = os.open(tmp_path / "a.log", os.O_WRONLY | os.O_CREAT)
    try:
        caplog.set_level(logging.WARNING, logger="recsys.access")
        assert accesslog.sink() is None
        caplog.set_level(logging.INFO, logger="recsys.access")
        accesslog.sink().write({"n": 1})
        assert [r.getMessage() for r in caplog.records if r.name == "recsys.access"] == ['{"n":1}']
        log = AccessLog(fd, flush_s=60)
        accesslog.install(log)
        assert accesslog.sink() is log
    finally:
        accesslog.install(None)
        os.close(fd)
    assert accesslog.sink() is not log

"""`recsys serve --threads N`: the app under granian's WSGI server (serving.granian_server), for
real: keep-alive connections (an unread body not taken for the next request), concurrent event
posts all acknowledged and stored once, the kernels compiled once by the parent process and
inherited by the workers, the access lines of every request in the log after a SIGTERM, and a
prompt graceful stop."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time

import orjson
import pytest
from servers import free_port, start, stop_group, wait_http
from serving_helpers import SECRET, publish_tiny, token

from serving.cli import granian_argv

pytestmark = pytest.mark.slow


def start_granian(root: str, port: int, log_path, workers: int = 1, threads: int = 8, **env):
    """`recsys serve --threads` on `port`, its stdout and stderr into `log_path`; returns
    once /healthz answers."""
    argv = granian_argv(f"127.0.0.1:{port}", workers, threads)
    env = {**os.environ, "RECSYS_DATA_ROOT": root, "RECSYS_JWT_SECRET": SECRET, **env}
    proc = start(argv, env=env, log=log_path)
    try:  # (a cold Numba cache: the parent compiles the kernels)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=300, log=log_path)
    except BaseException:
        stop_group(proc)
        raise
    return proc


@pytest.fixture
def server(tmp_path):
    """One worker x 8 threads; yields (port, process, log path)."""
    port, log_path = free_port(), tmp_path / "server.log"
    proc = start_granian(str(tmp_path / "data"), port, log_path)
    yield port, proc, log_path
    stop_group(proc)


def _event(n: int) -> dict:
    return {
        "event_id": f"ev-{n}",
        "type": "click",
        "user_id": f"u{n}",
        "item_id": "a1",
        "timestamp": 1_735_689_600 + n,
    }


def test_keep_alive_requests_share_a_connection_and_unread_bodies_are_skipped(server):
    port, _, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/healthz")
    first = conn.getresponse()
    assert first.status == 200 and first.getheader("Connection") != "close"
    first.read()
    sock = conn.sock
    # /healthz takes no body: the server must skip it, not parse it as the next request
    junk = b"GET /nope HTTP/1.1\r\n\r\n" * 100
    conn.request("POST", "/healthz", body=junk, headers={"Content-Type": "application/json"})
    second = conn.getresponse()
    second.read()
    assert second.status == 405
    # Either the server skipped the body and keeps the connection (granian up to 2.8.6), or
    # it closes the connection (2.8.7 and later, without a "Connection: close"): never are
    # the junk's 100 requests answered
    sock.settimeout(0.5)  # (not select(): a full test run holds descriptors above 1024)
    try:
        peeked = sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        peeked = None  # nothing to read: the connection is kept
    sock.settimeout(10)
    kept = peeked is None
    if not kept:
        assert peeked == b"", "the unread body was taken for requests"
        conn.close()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}
    conn.request("POST", "/v1/recs/events", orjson.dumps(_event(0)), headers)
    third = conn.getresponse()
    assert third.status == 201 and orjson.loads(third.read())["status"] == "accepted"
    assert not kept or conn.sock is sock  # kept: all three on one connection
    conn.close()


def test_concurrent_event_posts_are_each_acknowledged_once(server):
    port, _, _ = server
    headers = {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}
    answers: dict[int, tuple[int, dict]] = {}

    def post(first: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for n in range(first, first + 25):
            conn.request("POST", "/v1/recs/events", orjson.dumps(_event(n)), headers)
            resp = conn.getresponse()
            answers[n] = (resp.status, orjson.loads(resp.read()))
        conn.close()

    clients = [threading.Thread(target=post, args=(c * 25,)) for c in range(8)]
    for t in clients:
        t.start()
    for t in clients:
        t.join()
    assert sorted(answers) == list(range(200))
    assert {status for status, _ in answers.values()} == {201}
    # the same events again: each is known (stored once), none accepted twice
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for n in (0, 77, 199):
        conn.request("POST", "/v1/recs/events", orjson.dumps(_event(n)), headers)
        resp = conn.getresponse()
        assert orjson.loads(resp.read())["status"] == "duplicate", n
    conn.close()


def test_sigterm_stops_promptly_with_a_connection_open(server):
    port, proc, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert time.monotonic() - started < 12  # within the graceful period (10 s)
    conn.close()


def test_workers_share_the_kernels_and_log_every_request_before_sigterm(tmp_path):
    """With an empty Numba cache the parent process compiles the kernels once before forking
    the two workers, which neither compile nor load them; and the access lines of requests
    answered just before a SIGTERM are all written (serving.accesslog) as the workers exit."""
    root = str(tmp_path / "data")
    publish_tiny(root, "acme", "a")
    port, log_path = free_port(), tmp_path / "server.log"
    proc = start_granian(
        root,
        port,
        log_path,
        workers=2,
        NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"),
        NUMBA_DEBUG_CACHE="1",  # one stdout line per cache file saved or loaded
        RECSYS_ACCESS_LOG="1",
    )
    sent = [f"granian-{n}" for n in range(200)]
    try:
        headers = {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}
        body = orjson.dumps({"k": 2, "user": {"user_id": "u1"}})
        for n, request_id in enumerate(sent):
            if n % 20 == 0:  # new connections now and then, so both workers answer some
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            conn.request("POST", "/v1/recommend", body, {**headers, "X-Request-Id": request_id})
            resp = conn.getresponse()
            items = [i["item_id"] for i in orjson.loads(resp.read())["items"]]
            assert resp.status == 200 and items == ["a0", "a1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        stop_group(proc)  # (anything of it still running)
    assert code == 0
    lines = log_path.read_bytes().splitlines()
    fused = [x for x in lines if b"kernels.outcomes_select-" in x and b"data " in x]
    assert len(fused) == 1 and b"data saved" in fused[0], lines[-20:]
    assert not [x for x in lines if b"data loaded" in x], lines[-20:]
    logged = [orjson.loads(x)["request_id"] for x in lines if x.startswith(b'{"ts":')]
    assert sorted(r for r in logged if r.startswith("granian-")) == sorted(sent)

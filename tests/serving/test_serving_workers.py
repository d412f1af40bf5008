"""serving.workers.ConnectionThreadWorker under real gunicorn: keep-alive connections served
by their own thread (an unread body drained, not taken for the next request), a bounded
number of connections per worker with idle ones let go after --keep-alive, event posts
sharing commits, and a prompt graceful stop."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import threading
import time

import orjson
import pytest
from serving_helpers import SECRET, token

from serving.cli import CONNECTION_THREAD_WORKER, gunicorn_argv

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    """gunicorn: 1 worker x 2 connection threads, 1 s keep-alive; yields (port, process)."""
    port = free_port()
    argv = gunicorn_argv(f"127.0.0.1:{port}", 1, threads=2)
    assert argv[argv.index("--worker-class") + 1] == CONNECTION_THREAD_WORKER
    argv[argv.index("--keep-alive") + 1] = "1"
    env = {**os.environ, "RECSYS_DATA_ROOT": str(tmp_path), "RECSYS_JWT_SECRET": SECRET}
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while True:  # the port is bound before the worker has booted: wait for an answer
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                conn.close()
                break
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "gunicorn did not start"
        time.sleep(0.2)
    yield port, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_keep_alive_requests_share_a_connection_and_unread_bodies_are_drained(server):
    port, _ = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
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
    headers = {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}
    body = {"type": "click", "user_id": "u1", "item_id": "a1", "timestamp": 1_735_689_600}
    conn.request("POST", "/v1/recs/events", orjson.dumps(body), headers)
    third = conn.getresponse()
    assert third.status == 201 and orjson.loads(third.read())["status"] == "accepted"
    assert conn.sock is sock  # all three on one connection
    conn.close()


def test_idle_connections_are_let_go_so_a_waiting_one_is_served(server):
    port, _ = server
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
    time.sleep(0.3)  # both threads now hold an idle connection
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200  # after an idle one timed out (--keep-alive 1)
    assert time.monotonic() - started > 0.5
    assert [s.recv(1) for s in idle] == [b"", b""]  # closed by the server, not answered
    for s in idle:
        s.close()
    conn.close()


def test_sigterm_stops_the_worker_promptly_with_a_connection_open(server):
    port, proc = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert time.monotonic() - started < 12  # within --graceful-timeout (10 s)
    conn.close()


def test_busy_keep_alive_connections_make_room_for_a_waiting_one(server):
    port, _ = server
    stop = threading.Event()
    closed: list[bool] = []

    def busy() -> None:  # never idle long enough for --keep-alive to let it go
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            resp.read()
            closed.append(resp.getheader("Connection") == "close")  # then it reconnects
            time.sleep(0.05)
        conn.close()

    clients = [threading.Thread(target=busy) for _ in range(2)]
    for t in clients:
        t.start()
    time.sleep(0.5)  # both threads of the worker now serve a busy connection
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", "/healthz")
    status = conn.getresponse().status
    waited = time.monotonic() - started
    stop.set()
    for t in clients:
        t.join()
    conn.close()
    assert status == 200 and waited < 5  # without room made it waits for the busy ones to end
    assert any(closed) and not all(closed)  # kept alive, closed only to let the third in

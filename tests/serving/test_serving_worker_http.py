"""ConnectionThreadWorker's own HTTP/1.1 (serving/workers_http.py: llhttp through httptools)
against gunicorn's sync worker, both under real gunicorn processes: the same bytes on the wire
for a set of requests (success and errors, of the recsys app and of a small echo app that
returns its WSGI environ and body), and the worker's keep-alive, pipelining, chunked request
bodies, Expect: 100-continue and request line / header limits."""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import time

import orjson
import pytest
from serving_helpers import SECRET, publish_tiny, token

from serving.cli import CONNECTION_THREAD_WORKER, gunicorn_argv

pytestmark = pytest.mark.slow
REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))

ECHO_APP = r"""
import json


def app(environ, start_response):
    path = environ["PATH_INFO"]
    inp = environ["wsgi.input"]
    if path == "/lines":
        body = b"|".join(inp.readlines())
    elif path == "/pieces":
        parts = []
        while True:
            piece = inp.read(3)
            if not piece:
                break
            parts.append(piece)
        body = b"|".join(parts)
    elif path == "/iter":
        body = b"|".join(line for line in inp)
    elif path == "/unread":
        body = b""
    else:
        body = inp.read()
    if path == "/stream":  # no Content-Length: chunked (HTTP/1.1) or close-delimited
        start_response("200 OK", [("Content-Type", "text/plain"), ("X-Kind", "stream")])
        return iter([b"one,", b"", b"two"])
    if path == "/empty":
        start_response("204 No Content", [("Content-Length", "0"), ("X-Kind", "empty")])
        return [b""]
    if path == "/hop":
        start_response("200 OK", [("Content-Length", "2"), ("Connection", "close"),
                                  ("Keep-Alive", "timeout=5"), ("X-Kind", "hop")])
        return [b"hi"]
    if path == "/long":  # more body than its Content-Length: cut
        start_response("200 OK", [("Content-Length", "3")])
        return [b"abcdef"]
    if path == "/bad":  # a header value with a line break: refused before anything is sent
        start_response("200 OK", [("X-Bad", "a\r\nb")])
        return [b"x"]
    if path == "/write":  # the legacy write() callable
        write = start_response("200 OK", [("Content-Length", "6")])
        write(b"abc")
        return [b"def"]
    env = {k: v for k, v in environ.items() if isinstance(v, str) and k != "REMOTE_PORT"}
    out = json.dumps({"environ": env, "body": body.decode("latin-1")}, sort_keys=True).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(out)))])
    return [out]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(app: str, worker: str, root: str, pythonpath: str) -> tuple[int, subprocess.Popen]:
    port = free_port()
    threads = 4 if worker == CONNECTION_THREAD_WORKER else 1
    argv = gunicorn_argv(f"127.0.0.1:{port}", 1, app=app, threads=threads, worker_class=worker)
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "PYTHONPATH": os.pathsep.join([pythonpath, REPO]),
    }
    proc = subprocess.Popen(argv, env=env, cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/healthz")
            conn.getresponse().read()
            conn.close()
            return port, proc
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "gunicorn did not start"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """{(app, worker): port} for the recsys app and the echo app under both workers."""
    base = tmp_path_factory.mktemp("worker-http")
    (base / "echo_wsgi.py").write_text(ECHO_APP)
    procs, ports = [], {}
    try:
        for worker in ("sync", CONNECTION_THREAD_WORKER):
            root = base / f"data-{len(procs)}"
            root.mkdir()
            publish_tiny(str(root), "acme", "a")
            for app in ("serving.wsgi:app", "echo_wsgi:app"):
                port, proc = start(app, worker, str(root), str(base))
                procs.append(proc)
                ports[(app.split(":")[0], "sync" if worker == "sync" else "ct")] = port
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def exchange(port: int, data: bytes, pause_after: bytes | None = None) -> bytes:
    """Send `data` on a new connection, half-close it and read every byte the server sends
    until it closes. With `pause_after`, the data after the first occurrence of that marker
    is sent only once the server has answered something (Expect: 100-continue)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        first = data
        rest = b""
        if pause_after is not None:
            cut = data.index(pause_after) + len(pause_after)
            first, rest = data[:cut], data[cut:]
        s.sendall(first)
        out = b""
        if rest:
            out = s.recv(65536)
            s.sendall(rest)
        s.shutdown(socket.SHUT_WR)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out + chunk
            out += chunk


def parse(raw: bytes) -> list[tuple[str, list[tuple[str, str]], bytes]]:
    """The responses in `raw`: (status line, headers, body), bodies de-chunked."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        names = {k.lower(): v for k, v in headers}
        code = int(lines[0].split()[1])
        if code < 200 or code in (204, 304) or lines[0].startswith("HEAD"):
            body = b""
        elif "content-length" in names:
            n = int(names["content-length"])
            body, raw = raw[:n], raw[n:]
        elif names.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size, _, raw = raw.partition(b"\r\n")
                n = int(size, 16)
                body += raw[:n]
                raw = raw[n + 2 :]
                if n == 0:
                    break
        else:
            body, raw = raw, b""
        out.append((lines[0], headers, body))
    return out


def normalized(raw: bytes) -> list:
    """Responses without what differs from one server to the next (Date, request ids, the
    seconds left in a rate-limit window, timings and request ids in a JSON body)."""
    out = []
    for status, headers, body in parse(raw):
        kept = []
        for k, v in headers:
            if k.lower() in ("date", "x-request-id"):
                continue
            if k.lower() == "ratelimit":
                v = re.sub(r"t=\d+", "t=N", v)
            kept.append((k, v))
        body = re.sub(rb'"(took_ms|latency_ms|timing_ms)":[0-9.]+', rb'"\1":0', body)
        body = re.sub(rb'"request_id":"[0-9a-f-]+"', rb'"request_id":"-"', body)
        body = re.sub(rb'"SERVER_PORT": "\d+"', rb'"SERVER_PORT": "-"', body)
        out.append((status, kept, body))
    return out


def req(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body and "Transfer-Encoding" not in (headers or {}):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def auth() -> dict:
    return {"Authorization": f"Bearer {token()}", "Content-Type": "application/json"}


EVENT = {"event_id": "e-1", "type": "click", "user_id": "u1", "item_id": "a1",
         "timestamp": 1_735_689_600}  # fmt: skip
CLOSE = {"Connection": "close"}
JSON = "application/json"

RECSYS_CASES = {
    "healthz": lambda: req("GET", "/healthz", headers=CLOSE),
    "head healthz": lambda: req("HEAD", "/healthz", headers=CLOSE),
    "not found": lambda: req("GET", "/nope", headers=CLOSE),
    "method not allowed": lambda: req(
        "POST", "/healthz", b"{}", {**CLOSE, "Content-Type": "application/json"}
    ),
    "no credentials": lambda: req(
        "POST", "/v1/recs/events", orjson.dumps(EVENT), {**CLOSE, "Content-Type": JSON}
    ),
    "event": lambda: req("POST", "/v1/recs/events", orjson.dumps(EVENT), {**CLOSE, **auth()}),
    "duplicate event": lambda: req(
        "POST", "/v1/recs/events", orjson.dumps(EVENT), {**CLOSE, **auth()}
    ),
    "invalid event": lambda: req(
        "POST", "/v1/recs/events", orjson.dumps({**EVENT, "event_id": "e-2", "timestamp": "x"}),
        {**CLOSE, **auth()},
    ),
    "not json": lambda: req("POST", "/v1/recs/events", b"{nope", {**CLOSE, **auth()}),
    "bulk": lambda: req(
        "POST", "/v1/recs/events/bulk",
        b"\n".join(orjson.dumps({**EVENT, "event_id": f"b-{i}"}) for i in range(3)) + b"\nnope",
        {**CLOSE, **auth()},
    ),
    "chunked event (411)": lambda: req(
        "POST", "/v1/recs/events", b"5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n",
        {**CLOSE, **auth(), "Transfer-Encoding": "chunked"},
    ),
    "read event back": lambda: req("GET", "/v1/recs/events/e-1", headers={**CLOSE, **auth()}),
    "recommend": lambda: req(
        "POST", "/v1/recommend", orjson.dumps({"user_id": "u1", "k": 3}), {**CLOSE, **auth()}
    ),
    "http/1.0": lambda: b"GET /healthz HTTP/1.0\r\n\r\n",
}  # fmt: skip

ECHO_CASES = {
    "environ": lambda: req(
        "GET", "/a%20b/c?x=1&y=%2F", headers={**CLOSE, "X-Custom": "v", "Accept": "*/*"}
    ),
    "repeated header": lambda: req("GET", "/", headers=CLOSE) [:-2]
    + b"X-Many: 1\r\nX-Many: 2\r\n\r\n",
    "underscore header dropped": lambda: req("GET", "/", headers={**CLOSE, "X_Under": "1"}),
    "forwarded proto": lambda: req("GET", "/", headers={**CLOSE, "X-Forwarded-Proto": "https"}),
    "absolute uri": lambda: req("GET", "http://example.com/p/q?r=1", headers=CLOSE),
    "body": lambda: req("POST", "/", b"hello world", CLOSE),
    "pieces": lambda: req("POST", "/pieces", b"abcdefgh", CLOSE),
    "lines": lambda: req("POST", "/lines", b"a\nbb\n\nccc", CLOSE),
    "iter": lambda: req("POST", "/iter", b"a\nbb\n", CLOSE),
    "chunked body": lambda: req(
        "POST", "/pieces", b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n",
        {**CLOSE, "Transfer-Encoding": "chunked"},
    ),
    "chunked lines": lambda: req(
        "POST", "/lines", b"3\r\na\nb\r\n4\r\nb\ncc\r\n0\r\n\r\n",
        {**CLOSE, "Transfer-Encoding": "chunked"},
    ),
    "stream (chunked answer)": lambda: req("GET", "/stream", headers=CLOSE),
    "stream http/1.0": lambda: b"GET /stream HTTP/1.0\r\n\r\n",
    "204": lambda: req("GET", "/empty", headers=CLOSE),
    "hop-by-hop headers dropped": lambda: req("GET", "/hop", headers=CLOSE),
    "longer than content-length": lambda: req("GET", "/long", headers=CLOSE),
    "bad header (500)": lambda: req("GET", "/bad", headers=CLOSE),
    "write()": lambda: req("GET", "/write", headers=CLOSE),
    "head": lambda: req("HEAD", "/", headers=CLOSE),
    # errors answered by the worker itself
    "request line too long": lambda: req("GET", "/" + "a" * 5000, headers=CLOSE),
    "too many headers": lambda: req(
        "GET", "/", headers={**CLOSE, **{f"X-H{i}": "v" for i in range(101)}}
    ),
    "header too large": lambda: req("GET", "/", headers={**CLOSE, "X-Big": "v" * 9000}),
    "two hosts": lambda: req("GET", "/", headers=CLOSE)[:-2] + b"Host: other\r\n\r\n",
    "expectation failed": lambda: req("POST", "/", b"x", {**CLOSE, "Expect": "nothing"}),
    "unknown transfer coding": lambda: req(
        "POST", "/", b"x", {**CLOSE, "Transfer-Encoding": "foo"}
    ),
    "chunked http/1.0": lambda: b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
}  # fmt: skip

#: Refused by both with a 400, whose message differs (gunicorn's parser and llhttp word it
#: differently): compared on the status line only.
MALFORMED = {
    "garbage": b"GARBAGE\r\n\r\n",
    "obsolete folding": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  2\r\n\r\n",
    "content-length and chunked": b"POST / HTTP/1.1\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "bad content-length": b"POST / HTTP/1.1\r\nContent-Length: x1\r\n\r\n",
    "control character": b"GET / HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",
    "lower-case method": b"get / HTTP/1.1\r\n\r\n",
}


@pytest.mark.parametrize("case", list(RECSYS_CASES))
def test_recsys_answers_are_the_same_as_under_the_sync_worker(servers, case):
    data = RECSYS_CASES[case]()
    sync = normalized(exchange(servers[("serving.wsgi", "sync")], data))
    ours = normalized(exchange(servers[("serving.wsgi", "ct")], data))
    assert len(sync) == 1 and ours == sync


@pytest.mark.parametrize("case", list(ECHO_CASES))
def test_echo_answers_and_environ_are_the_same_as_under_the_sync_worker(servers, case):
    data = ECHO_CASES[case]()
    sync = normalized(exchange(servers[("echo_wsgi", "sync")], data))
    ours = normalized(exchange(servers[("echo_wsgi", "ct")], data))
    assert len(sync) == 1
    if case == "request line too long":  # gunicorn counts what it had buffered: mask numbers
        for r in (sync, ours):
            r[0] = (r[0][0], r[0][1][:1], re.sub(rb"\(\d+ &gt; ", b"(N &gt; ", r[0][2]))
    assert ours == sync


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_are_refused_like_the_sync_worker(servers, case):
    sync = parse(exchange(servers[("echo_wsgi", "sync")], MALFORMED[case]))
    ours = parse(exchange(servers[("echo_wsgi", "ct")], MALFORMED[case]))
    assert [r[0] for r in ours] == [r[0] for r in sync] == ["HTTP/1.1 400 Bad Request"]
    assert dict(ours[0][1])["Connection"] == "close"


def test_a_malformed_chunked_body_is_refused(servers):
    # (gunicorn's sync worker closes the connection without an answer here)
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    (status, headers, _), *_ = parse(exchange(servers[("echo_wsgi", "ct")], data))
    assert status == "HTTP/1.1 400 Bad Request" and dict(headers)["Connection"] == "close"


def test_expect_100_continue(servers):
    data = req("POST", "/", b"late body", {**CLOSE, "Expect": "100-continue"})
    for worker in ("sync", "ct"):
        raw = exchange(servers[("echo_wsgi", worker)], data, pause_after=b"\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), worker
        (status, _, body), *_ = parse(raw[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
        assert status == "HTTP/1.1 200 OK" and orjson.loads(body)["body"] == "late body"


def test_keep_alive_and_pipelined_requests_are_answered_in_order(servers):
    port = servers[("echo_wsgi", "ct")]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        # three pipelined requests in one send: a body left unread, a chunked one, a plain one
        s.sendall(
            req("POST", "/unread", b"x" * 100_000)
            + req("POST", "/", b"3\r\nabc\r\n0\r\n\r\n", {"Transfer-Encoding": "chunked"})
            + req("GET", "/?n=3")
        )
        raw = b""
        while raw.count(b"HTTP/1.1 200 OK") < 3 or not raw.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, raw
            raw += chunk
        first, second, third = parse(raw)
        assert all(dict(r[1])["Connection"] == "keep-alive" for r in (first, second, third))
        assert orjson.loads(first[2])["body"] == ""
        assert orjson.loads(second[2])["body"] == "abc"
        assert orjson.loads(third[2])["environ"]["QUERY_STRING"] == "n=3"
        # and the connection still serves a request sent in pieces, byte by byte
        for b in req("POST", "/", b"slow"):
            s.sendall(bytes([b]))
        raw = b""
        while not raw.endswith(b"}"):
            raw += s.recv(65536)
        assert orjson.loads(parse(raw)[0][2])["body"] == "slow"
    # HTTP/1.0 keeps the connection when asked to (the sync worker always closes)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /?a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        raw = b""
        while not raw.endswith(b"}"):
            raw += s.recv(65536)
        assert dict(parse(raw)[0][1])["Connection"] == "keep-alive"
        s.sendall(b"GET /?b HTTP/1.0\r\n\r\n")
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
        (_, headers, body), *_ = parse(raw)
        assert dict(headers)["Connection"] == "close"
        assert orjson.loads(body)["environ"]["QUERY_STRING"] == "b"


def test_a_bad_request_pipelined_after_a_good_one_is_refused_after_its_answer(servers):
    port = servers[("echo_wsgi", "ct")]
    for bad in (
        req("GET", "/", headers={"X-Big": "v" * 9000}),  # 431 from the header limit
        b"GET / HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",  # 400 from llhttp
    ):
        data = req("POST", "/", b"first") + bad
        (first, _, body), (second, headers, _) = parse(exchange(port, data))
        assert first == "HTTP/1.1 200 OK" and orjson.loads(body)["body"] == "first"
        assert second.split()[1] in ("400", "431") and dict(headers)["Connection"] == "close"


def test_a_client_cut_in_the_middle_of_a_body_does_not_stop_the_worker(servers):
    port = servers[("echo_wsgi", "ct")]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(req("POST", "/", b"0123456789")[:-5])
    status = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    status.request("GET", "/")
    assert status.getresponse().status == 200


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

"""Smoke test: the real server under gunicorn on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import orjson
import pytest
from serving_helpers import SECRET, publish_tiny, token

from serving.cli import gunicorn_argv

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, body=None, headers=None):
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_gunicorn_serves_requests(tmp_path):
    root = str(tmp_path)
    publish_tiny(root, "acme", "a")
    port = free_port()
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_ACCESS_LOG": "1",
    }
    proc = subprocess.Popen(
        gunicorn_argv(f"127.0.0.1:{port}", 2),
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 20
        while True:
            try:
                status, _, _ = request(base + "/readyz")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "gunicorn did not become ready"
            time.sleep(0.2)
        status, headers, body = request(
            base + "/v1/recommend",
            {"k": 2, "user": {"user_id": "u1"}},
            {"Authorization": f"Bearer {token()}"},
        )
        assert status == 200
        assert [i["item_id"] for i in orjson.loads(body)["items"]] == ["a0", "a1"]
        assert headers["X-Request-Id"]
        status, headers, body = request(base + "/v1/recommend", {"k": 2, "user": {"user_id": "u1"}})
        assert status == 401 and headers["Content-Type"] == "application/problem+json"
        status, _, body = request(base + "/metrics")
        assert status == 200 and b"recsys_http_requests_total" in body
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    access = [orjson.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
    assert any(a["route"] == "/v1/recommend" and a["status"] == 200 for a in access)

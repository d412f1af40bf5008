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


def start_gunicorn(port: int, env: dict[str, str]) -> subprocess.Popen:
    """`recsys serve`'s gunicorn command line, 2 workers, on `port`."""
    return subprocess.Popen(
        gunicorn_argv(f"127.0.0.1:{port}", 2),
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_ready(base: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Until /readyz answers 200 (fails if gunicorn exits or the time runs out)."""
    deadline = time.time() + timeout_s
    while True:
        try:
            status, _, _ = request(base + "/readyz")
            if status == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "gunicorn did not become ready"
        time.sleep(0.2)


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
    proc = start_gunicorn(port, env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, 90)  # (the master preloads NumPy, Numba and the app)
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


def test_workers_share_the_kernels_the_master_compiled(tmp_path):
    """With an empty Numba cache the master (serving.gunicorn_conf) compiles the kernels once
    before forking; the two workers inherit them: they neither compile nor load the cache."""
    root = str(tmp_path / "data")
    publish_tiny(root, "acme", "a")
    cache = tmp_path / "numba-cache"
    port = free_port()
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "NUMBA_CACHE_DIR": str(cache),
        "NUMBA_DEBUG_CACHE": "1",  # one stdout line per cache file saved or loaded
    }
    proc = start_gunicorn(port, env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, proc, 300)  # (a cold compilation takes 5-20 s, more on a busy box)
        for _ in range(6):  # (new connections: both workers answer some)
            status, _, body = request(
                base + "/v1/recommend",
                {"k": 2, "user": {"user_id": "u1"}, "constraints": {"max_per_tag": {"x": 1}}},
                {"Authorization": f"Bearer {token()}"},
            )
            assert status == 200
            assert [i["item_id"] for i in orjson.loads(body)["items"]] == ["a0", "a1"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    lines = out.decode().splitlines()
    fused = [line for line in lines if "kernels.outcomes_select-" in line and "data " in line]
    # one process (the master) compiled and saved the fused kernel; no worker loaded it
    assert len(fused) == 1 and "data saved" in fused[0], lines
    assert not [line for line in lines if "data loaded" in line], lines


def test_the_preload_is_for_this_packages_apps_only():
    from serving.gunicorn_conf import serves_this_package

    assert serves_this_package("serving.wsgi:app")
    assert serves_this_package("serving:app")
    assert not serves_this_package("benchmarks.trivial_app:app")
    assert not serves_this_package("servingx.wsgi:app")
    assert not serves_this_package(None)


def test_access_lines_of_requests_before_sigterm_are_all_in_the_log(tmp_path):
    """The access log is written in batches from a thread (serving.accesslog); a SIGTERM right
    after the last answer still leaves one line per request in the log (workers write what
    waits as they exit)."""
    root = str(tmp_path / "data")
    publish_tiny(root, "acme", "a")
    port = free_port()
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_ACCESS_LOG": "1",
    }
    log_path = tmp_path / "stderr.log"
    with open(log_path, "wb") as err:
        proc = subprocess.Popen(
            gunicorn_argv(f"127.0.0.1:{port}", 2),
            env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready_logged(base, proc, log_path, 60)
        sent = [f"sigterm-test-{n}" for n in range(300)]
        for request_id in sent:
            status, _, _ = request(base + "/healthz", headers={"X-Request-Id": request_id})
            assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    logged = [
        orjson.loads(line)["request_id"]
        for line in log_path.read_bytes().splitlines()
        if line.startswith(b'{"ts":')
    ]
    assert sorted(r for r in logged if r.startswith("sigterm-test-")) == sorted(sent)


def wait_ready_logged(base: str, proc: subprocess.Popen, log_path, timeout_s: float) -> None:
    """`wait_ready` for a server whose stderr goes to `log_path`."""
    deadline = time.time() + timeout_s
    while True:
        try:
            if request(base + "/readyz")[0] == 200:
                return
        except OSError:
            pass
        assert proc.poll() is None, log_path.read_text()[-2000:]
        assert time.time() < deadline, "the server did not become ready"
        time.sleep(0.2)

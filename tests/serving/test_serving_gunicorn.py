"""Smoke test: the real server under gunicorn on a free port."""

from __future__ import annotations

import os
import signal
import urllib.error
import urllib.request

import orjson
import pytest
from servers import gunicorn, stop_group, wait_http
from serving_helpers import SECRET, publish_tiny, token

pytestmark = pytest.mark.slow


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


def stop_gracefully(proc) -> None:
    """SIGTERM the master and wait for it (its workers write what waits, access lines
    included), then whatever of its group is left."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    finally:
        stop_group(proc)


def test_gunicorn_serves_requests(tmp_path):
    root = str(tmp_path)
    publish_tiny(root, "acme", "a")
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_ACCESS_LOG": "1",
    }
    log_path = tmp_path / "server.log"
    proc, base = gunicorn(env, log=log_path)
    try:
        # (the master preloads NumPy, Numba and the app)
        wait_http(base + "/readyz", proc, timeout=90, log=log_path)
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
        stop_gracefully(proc)
    lines = log_path.read_bytes().splitlines()
    access = [orjson.loads(line) for line in lines if line.startswith(b"{")]
    assert any(a["route"] == "/v1/recommend" and a["status"] == 200 for a in access)


def test_workers_share_the_kernels_the_master_compiled(tmp_path):
    """With an empty Numba cache the master (serving.gunicorn_conf) compiles the kernels once
    before forking; the two workers inherit them: they neither compile nor load the cache."""
    root = str(tmp_path / "data")
    publish_tiny(root, "acme", "a")
    cache = tmp_path / "numba-cache"
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "NUMBA_CACHE_DIR": str(cache),
        "NUMBA_DEBUG_CACHE": "1",  # one stdout line per cache file saved or loaded
    }
    log_path = tmp_path / "server.log"
    proc, base = gunicorn(env, log=log_path)
    try:
        # (a cold compilation takes 5-20 s, more on a busy box)
        wait_http(base + "/readyz", proc, timeout=300, log=log_path)
        for _ in range(6):  # (new connections: both workers answer some)
            status, _, body = request(
                base + "/v1/recommend",
                {"k": 2, "user": {"user_id": "u1"}, "constraints": {"max_per_tag": {"x": 1}}},
                {"Authorization": f"Bearer {token()}"},
            )
            assert status == 200
            assert [i["item_id"] for i in orjson.loads(body)["items"]] == ["a0", "a1"]
    finally:
        stop_gracefully(proc)
    lines = log_path.read_text().splitlines()
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
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_ACCESS_LOG": "1",
    }
    log_path = tmp_path / "server.log"
    proc, base = gunicorn(env, log=log_path)
    try:
        wait_http(base + "/readyz", proc, timeout=60, log=log_path)
        sent = [f"sigterm-test-{n}" for n in range(300)]
        for request_id in sent:
            status, _, _ = request(base + "/healthz", headers={"X-Request-Id": request_id})
            assert status == 200
    finally:
        stop_gracefully(proc)
    logged = [
        orjson.loads(line)["request_id"]
        for line in log_path.read_bytes().splitlines()
        if line.startswith(b'{"ts":')
    ]
    assert sorted(r for r in logged if r.startswith("sigterm-test-")) == sorted(sent)


def test_settings_read_as_gunicorns_config_reads_them(monkeypatch):
    """`serving.gunicorn_server.Settings` answers every known setting with the value gunicorn's
    own `Config` gives, by default and once set (as a settings file or the command line sets
    them), through a property of its class (not `Config.__getattr__`, whose failed lookup
    raised an exception per read); and the runner `recsys serve` starts uses it."""
    from gunicorn.config import KNOWN_SETTINGS, Config

    from serving.cli import gunicorn_argv
    from serving.gunicorn_server import Application, Settings

    plain, fast = Config(), Settings()
    changes = {"limit_request_line": 0, "workers": 3, "strip_header_spaces": True}
    changes |= {"secure_scheme_headers": {"X-FORWARDED-PROTO": "https"}, "raw_env": ["A=1"]}
    for name, value in changes.items():
        plain.set(name, value)
        fast.set(name, value)
    for setting in KNOWN_SETTINGS:
        name = setting.name
        assert getattr(fast, name) == getattr(plain, name), name
        assert hasattr(Config, name) or isinstance(vars(Settings).get(name), property), name
    assert (fast.limit_request_line, fast.workers, fast.env) == (0, 3, {"A": "1"})

    argv = gunicorn_argv("127.0.0.1:0", 2)
    assert argv[1:3] == ["-m", "serving.gunicorn_server"]
    monkeypatch.setattr("sys.argv", ["gunicorn", *argv[3:]])
    app = Application("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn")
    assert type(app.cfg) is Settings
    assert (app.cfg.workers, app.cfg.limit_request_line, app.cfg.worker_class_str) == (2, 0, "sync")

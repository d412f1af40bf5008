"""Helpers of the browser tests: paths, free ports, starting and stopping servers."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("RECSYS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RECSYS_CHROMEDRIVER", "/usr/bin/chromedriver")
#: The demo data of the browser tests (small: the whole pipeline runs in a minute or two).
DEMO_EVENTS = 20_000
DEMO_SEED = 7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Stop a server started in its own session (the process group we made), then reap it."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    """Wait until `url` answers 2xx; fail with the server's log if it dies or never answers."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited ({proc.returncode}):\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status < 300:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout}s ({last}):\n{tail(log)}")


def tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@dataclass(frozen=True)
class DemoInstance:
    """A data root, Dagster home and MLflow store after one successful `recsys_pipeline` run."""

    root: Path
    data_root: Path
    dagster_home: Path
    env: dict[str, str]

    @property
    def mlflow_db(self) -> Path:
        return self.data_root / "mlflow" / "mlflow.db"


@dataclass(frozen=True)
class DemoServer:
    url: str
    secret: str
    tenant: str

    def token(self, *scopes: str) -> str:
        from serving.auth import mint_token

        return mint_token(self.secret, self.tenant, scopes or ("recommend",), 600)

    def call(self, method: str, path: str, body=None, token: str | None = None, headers=None):
        """(status, headers, JSON body) of one request to the server."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            return err.code, err.headers, json.loads(err.read() or b"null")


@contextlib.contextmanager
def serve_demo(instance: DemoInstance, workers: int = 2, **settings: str):
    """`recsys serve` (gunicorn) in demo mode on the demo instance's snapshot, with extra
    RECSYS_* settings; stopped on exit."""
    port = free_port()
    secret = secrets.token_hex(32)
    env = {
        **instance.env,
        "RECSYS_JWT_SECRET": secret,
        "RECSYS_DEMO_TENANTS": "default",
        "RECSYS_SNAPSHOT_CHECK_S": "0.2",
        "RECSYS_ACCESS_LOG": "0",
        **settings,
    }
    log = instance.root / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "recsys"), "serve", "--bind", f"127.0.0.1:{port}"]
            + ["--workers", str(workers)],
            cwd=instance.root,
            env=env,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/readyz", proc, 120, log)
        yield DemoServer(url, secret, "default")
    finally:
        stop(proc)

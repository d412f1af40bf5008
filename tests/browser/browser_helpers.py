"""Helpers of the browser tests: paths, the demo instance and its server (started and stopped
with the helpers of `tests/servers.py`)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from servers import BIN, REPO, free_port, serving, start

ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("RECSYS_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RECSYS_CHROMEDRIVER", "/usr/bin/chromedriver")
#: The demo data of the browser tests (small: the whole pipeline runs in a minute or two).
DEMO_EVENTS = 20_000
DEMO_SEED = 7


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
    proc = start(
        [BIN / "recsys", "serve", "--bind", f"127.0.0.1:{port}", "--workers", str(workers)],
        env=env,
        cwd=instance.root,
        log=log,
    )
    with serving(proc, f"http://127.0.0.1:{port}", "/readyz", log=log) as url:
        yield DemoServer(url, secret, "default")

"""Fixtures of the browser tests: one real demo instance (demo data -> `recsys run` of the whole
pipeline on its own Dagster instance and MLflow store), a real gunicorn server (`recsys serve`)
in demo mode on its snapshot, and headless Debian chromium driven by Selenium.

Chromium and chromedriver come from `scripts/setup_browser.sh` (called by `scripts/setup.sh`);
where they are absent the tests skip and say so. Screenshots go to `test-artifacts/browser/`
(ignored by git).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser_helpers import (
    ARTIFACTS,
    BIN,
    CHROMEDRIVER,
    CHROMIUM,
    DEMO_EVENTS,
    DEMO_SEED,
    REPO,
    free_port,
    stop,
    tail,
    wait_http,
)


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


@pytest.fixture(scope="session")
def demo_instance() -> DemoInstance:
    """A fresh instance per session; RECSYS_BROWSER_INSTANCE=<folder> keeps it there and reuses
    it on the next session when its run finished (for iterating on the page)."""
    keep = os.environ.get("RECSYS_BROWSER_INSTANCE")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="recsys-browser-"))
    data_root, home = root / "data", root / "dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(home), "RECSYS_DATA_ROOT": str(data_root)}
    done_marker = root / "pipeline.done"
    if not done_marker.exists():
        home.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
        log = root / "pipeline.log"
        with open(log, "wb") as out:
            for args in (
                ["demo-data", "--events", str(DEMO_EVENTS), "--seed", str(DEMO_SEED), "--quiet"],
                ["run", "--job", "recsys_pipeline"],
            ):
                done = subprocess.run(
                    [str(BIN / "recsys"), *args], cwd=REPO, env=env, stdout=out, stderr=out
                )
                assert done.returncode == 0, f"recsys {' '.join(args)} failed:\n{tail(log)}"
        done_marker.touch()
    yield DemoInstance(root, data_root, home, env)
    if not keep:
        shutil.rmtree(root, ignore_errors=True)


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


@pytest.fixture(scope="session")
def demo_server(demo_instance: DemoInstance) -> DemoServer:
    """`recsys serve` (gunicorn, 2 workers) in demo mode on the demo instance's snapshot."""
    port = free_port()
    secret = secrets.token_hex(32)
    env = {
        **demo_instance.env,
        "RECSYS_JWT_SECRET": secret,
        "RECSYS_DEMO_TENANTS": "default",
        "RECSYS_SNAPSHOT_CHECK_S": "0.2",
        "RECSYS_ACCESS_LOG": "0",
    }
    log = demo_instance.root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "recsys"), "serve", "--bind", f"127.0.0.1:{port}", "--workers", "2"],
            cwd=demo_instance.root,
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


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium under Selenium (chromedriver from the same Debian package)."""
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(
            f"chromium/chromedriver not found at {CHROMIUM} / {CHROMEDRIVER}: run "
            "scripts/setup_browser.sh as root (scripts/setup.sh calls it)"
        )
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="recsys-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def screenshot(request, browser):
    """`screenshot(name)` saves the browser's window to test-artifacts/browser/<name>.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def save(name: str | None = None) -> Path:
        path = ARTIFACTS / f"{name or request.node.name}.png"
        browser.save_screenshot(str(path))
        return path

    return save

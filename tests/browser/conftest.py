"""Fixtures of the browser tests: one real demo instance (demo data -> `recsys run` of the whole
pipeline on its own Dagster instance and MLflow store), a real gunicorn server (`recsys serve`)
in demo mode on its snapshot, and headless Debian chromium driven by Selenium.

Chromium and chromedriver come from `scripts/setup_browser.sh` (called by `scripts/setup.sh`);
where they are absent the tests skip and say so. Screenshots go to `test-artifacts/browser/`
(ignored by git).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from browser_helpers import (
    ARTIFACTS,
    CHROMEDRIVER,
    CHROMIUM,
    DEMO_EVENTS,
    DEMO_SEED,
    DemoInstance,
    DemoServer,
    serve_demo,
)
from servers import BIN, REPO, tail


@pytest.fixture(scope="session")
def demo_instance() -> DemoInstance:
    """A fresh instance per session; RECSYS_BROWSER_INSTANCE=<folder> keeps it there and reuses
    it on the next session when its run finished (for iterating on the page)."""
    keep = os.environ.get("RECSYS_BROWSER_INSTANCE")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="recsys-browser-"))
    data_root, home = root / "data", root / "dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(home), "RECSYS_DATA_ROOT": str(data_root)}
    done_marker = root / "pipeline.done"
    try:
        if not done_marker.exists():
            home.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
            log = root / "pipeline.log"
            with open(log, "wb") as out:
                for args in (
                    ["demo-data", "--events", str(DEMO_EVENTS), "--seed", str(DEMO_SEED)]
                    + ["--quiet"],
                    ["run", "--job", "recsys_pipeline"],
                ):
                    done = subprocess.run(
                        [str(BIN / "recsys"), *args], cwd=REPO, env=env, stdout=out, stderr=out
                    )
                    assert done.returncode == 0, f"recsys {' '.join(args)} failed:\n{tail(log)}"
            done_marker.touch()
        yield DemoInstance(root, data_root, home, env)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_server(demo_instance: DemoInstance) -> DemoServer:
    """`recsys serve` (gunicorn, 2 workers) in demo mode on the demo instance's snapshot."""
    with serve_demo(demo_instance) as server:
        yield server


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

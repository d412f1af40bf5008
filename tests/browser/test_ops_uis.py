"""What the data team sees: real `dagster dev` and `mlflow ui` on the demo's Dagster instance and
MLflow store (after one successful `recsys_pipeline` run), in headless chromium."""

from __future__ import annotations

import time

import pytest
from servers import dagster_dev, mlflow_ui, serving

pytestmark = pytest.mark.slow
GROUPS = ("ingest", "training", "evaluation", "publish")


def _text(browser) -> str:
    return browser.execute_script("return document.body ? document.body.innerText : ''")


def _wait_text(browser, needles, timeout: float = 120.0, what: str = "") -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, timeout, poll_frequency=0.5).until(
        lambda d: all(n in _text(d) for n in needles),
        message=f"the page never showed {needles} ({what}): {_text(browser)[:500]!r}",
    )
    return _text(browser)


def _skip_the_welcome(browser) -> None:
    """Close Dagster's first-visit "Join the community" dialog (once per browser profile; it
    opens a moment after the page, and not at all in versions without it)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        clicked = browser.execute_script(
            "const b = [...document.querySelectorAll('button')].find(b => b.textContent.trim()"
            " === 'Skip'); if (b) b.click(); return !!b;"
        )
        if clicked:
            return
        time.sleep(0.5)


def test_dagster_shows_the_asset_groups_and_the_last_successful_run(
    browser, demo_instance, screenshot
):
    log = demo_instance.root / "dagster-dev.log"
    proc, url = dagster_dev(demo_instance.dagster_home, demo_instance.env, log)
    with serving(proc, url, "/server_info", timeout=240, log=log):
        browser.get(url + "/asset-groups")
        _wait_text(browser, GROUPS, what="the global asset graph")
        _skip_the_welcome(browser)
        screenshot("dagster_asset_graph")
        browser.get(url + "/runs")
        # (the daemon's landing sensor may add ingest runs of its own beside it)
        _wait_text(browser, ("recsys_pipeline", "Success"), what="the runs list")
        screenshot("dagster_runs")


def test_mlflow_registry_shows_the_champion(browser, demo_instance, screenshot):
    log = demo_instance.root / "mlflow-ui.log"
    proc, url = mlflow_ui(
        f"sqlite:///{demo_instance.mlflow_db}",
        demo_instance.data_root / "mlflow" / "artifacts",
        cwd=demo_instance.root,
        log=log,
    )
    with serving(proc, url, "/health", timeout=240, log=log):
        browser.get(url + "/#/models")
        _wait_text(browser, ("recsys-default",), what="the registered models")
        screenshot("mlflow_models")
        browser.get(url + "/#/models/recsys-default")
        _wait_text(browser, ("recsys-default", "Aliases"), what="the model's versions")
        # the alias tag of a version ("@ champion"), not a tag that merely mentions it
        aliases = browser.execute_script(
            "return [...document.querySelectorAll('*')].filter(e => e.children.length === 0"
            " || e.childElementCount === 1).map(e => e.textContent.trim())"
            ".filter(t => /^@\\s*champion$/.test(t))"
        )
        assert aliases, "no version carries the champion alias"
        screenshot("mlflow_champion")

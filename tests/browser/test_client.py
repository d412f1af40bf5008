"""The checked-in TypeScript client (web/client/) is what the route table generates today.

`scripts/gen_client.sh` regenerates it; these tests fail, naming that command, when the spec
changed without it. The first needs only Python; the second runs openapi-typescript (from
web/node_modules, installed by scripts/setup_browser.sh) on the spec as it is now.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from serving.resources.demo import dump_openapi

REPO = Path(__file__).resolve().parents[2]
STALE = "the checked-in client is stale against the spec: run scripts/gen_client.sh"


def test_the_checked_in_spec_is_the_apps(tmp_path):
    dump_openapi(str(tmp_path / "openapi.json"))
    current = (tmp_path / "openapi.json").read_bytes()
    assert current == (REPO / "web" / "client" / "openapi.json").read_bytes(), STALE


@pytest.mark.slow  # (a minute on a loaded machine: the spec dump and openapi-typescript)
def test_the_generated_types_are_current():
    tool = REPO / "web" / "node_modules" / ".bin" / "openapi-typescript"
    if not tool.exists() or shutil.which("node") is None:
        pytest.skip("web/node_modules is not installed (scripts/setup_browser.sh installs it)")
    done = subprocess.run(
        ["bash", "scripts/gen_client.sh", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{STALE}\n{done.stderr}"


def test_the_page_uses_the_generated_client():
    """The page's modules are the compiled web/src (the typed client) and nothing external."""
    demo = REPO / "serving" / "demo"
    app = (demo / "app.js").read_text()
    api = (demo / "api.js").read_text()
    assert 'from "./api.js"' in app
    assert 'from "openapi-fetch"' in api
    page = (demo / "index.html").read_text()
    assert '"openapi-fetch": "/demo/openapi-fetch.js"' in page
    for text in (app, api, page):
        assert "http://" not in text and "https://" not in text  # nothing from a CDN

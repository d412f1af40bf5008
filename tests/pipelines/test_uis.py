"""The long-running UIs the README points to, started for real on free ports and stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_json(url: str, body: bytes | None = None, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(
                url, data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=5) as resp:
                return json.loads(resp.read())
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout}s: {last}")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_dagster_dev_serves_the_asset_graph(tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "RECSYS_DATA_ROOT": str(tmp_path / "data")}
    proc = subprocess.Popen(
        [str(BIN / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        query = b'{"query": "{ assetNodes { assetKey { path } groupName } }"}'
        data = _wait_json(f"http://127.0.0.1:{port}/graphql", query, timeout=180)
        nodes = data["data"]["assetNodes"]
        keys = {"/".join(n["assetKey"]["path"]): n["groupName"] for n in nodes}
        assert keys["events"] == "ingest" and keys["rejected_events"] == "ingest"
        assert {
            "interactions",
            "lightfm_model",
            "ranker_model",
            "model_evaluation",
            "champion_model",
            "serving_snapshot",
        } <= set(keys)
    finally:
        _stop(proc)


def test_mlflow_ui_opens_on_the_default_store(tmp_path):
    store = tmp_path / "mlflow"
    store.mkdir()
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "ui",
            "--backend-store-uri",
            f"sqlite:///{store}/mlflow.db",
            "--default-artifact-root",
            str(store / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",  # (one: uvicorn's supervisor restarts workers slow to start on a busy box)
            "1",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        data = _wait_json(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
            b'{"max_results": 10}',
            timeout=180,
        )
        assert any(e["name"] == "Default" for e in data["experiments"])
    finally:
        _stop(proc)

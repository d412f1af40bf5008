"""The long-running UIs the README points to, started for real on free ports and stopped."""

from __future__ import annotations

import pytest
from servers import dagster_dev, mlflow_ui, stop_group, wait_json

pytestmark = pytest.mark.slow


def test_dagster_dev_serves_the_asset_graph(tmp_path):
    proc, url = dagster_dev(tmp_path / "dagster_home", {"RECSYS_DATA_ROOT": str(tmp_path / "data")})
    try:
        query = b'{"query": "{ assetNodes { assetKey { path } groupName } }"}'
        data = wait_json(
            f"{url}/graphql",
            query,
            timeout=180,
            until=lambda doc: bool((doc.get("data") or {}).get("assetNodes")),
            proc=proc,
        )
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
        stop_group(proc)


def test_mlflow_ui_opens_on_the_default_store(tmp_path):
    store = tmp_path / "mlflow"
    store.mkdir()
    proc, url = mlflow_ui(f"sqlite:///{store}/mlflow.db", store / "artifacts", cwd=tmp_path)
    try:
        data = wait_json(
            f"{url}/api/2.0/mlflow/experiments/search",
            b'{"max_results": 10}',
            timeout=180,
            proc=proc,
        )
        assert any(e["name"] == "Default" for e in data["experiments"])
    finally:
        stop_group(proc)

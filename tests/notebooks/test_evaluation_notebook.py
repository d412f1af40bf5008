"""The evaluation notebook runs top to bottom on an evaluation written the way the asset does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import numpy as np
from nbclient import NotebookClient
from synthetic_events import cluster_events

from recsys.evaluation.offline import evaluate_offline

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "evaluation.ipynb"


def test_evaluation_notebook_executes_and_reports_the_lift(storage, monkeypatch):
    events = cluster_events(np.random.default_rng(7), n_users=60, n_items=20, per_user=8)
    result = evaluate_offline(events, n_resamples=50, seed=0)
    out = storage.evaluation_dir("t")
    storage.makedirs(out)
    result.table.write_csv(os.path.join(out, "evaluation.csv"))
    with open(os.path.join(out, "evaluation.json"), "w") as f:
        json.dump({"users": result.holdout.n_users, "pairs": result.holdout.n_pairs}, f)

    monkeypatch.setenv("RECSYS_DATA_ROOT", storage.root)
    monkeypatch.setenv("RECSYS_TENANT", "t")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    ).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    served = result.table.filter(result.table["model"] == "served")["NDCG@10"][0]
    assert f"served NDCG@10 {served:.4f}" in text
    assert "test users" in text
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", [])), (
        "the comparison plot was not drawn"
    )

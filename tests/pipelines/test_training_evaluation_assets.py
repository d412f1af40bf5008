"""The training and evaluation assets end to end on a small warehouse, plus a tiny tenant."""

import json
import os

import dagster as dg
import numpy as np
import pytest
from synthetic_events import cluster_events, cluster_items, make_events, saved_files

from pipelines import evaluation, training
from pipelines.resources import MlflowResource, StorageResource

RUN_CONFIG = {
    "ops": {
        "train_models": {
            "config": {
                "lightfm": {"no_components": 4, "epochs": 3},
                "ranker": {
                    "max_iter": 10,
                    "min_ranker_positives": 5,
                    "candidates_per_generator": 20,
                },
            }
        },
        "model_evaluation": {"config": {"bootstrap_resamples": 50}},
        "champion_model": {"config": {"tolerance": 0.01}},
    }
}


def _write_warehouse(store, tenant, events, items=None):
    d = store.path("warehouse", tenant, "events", "date=2024-01-01")
    os.makedirs(d, exist_ok=True)
    events.write_parquet(os.path.join(d, "part-0.parquet"))
    if items is not None:
        items.write_parquet(store.table_path(tenant, "items"))


@pytest.mark.slow
def test_pipeline_trains_evaluates_and_gates(storage):
    _write_warehouse(
        storage, "shop", cluster_events(np.random.default_rng(4), 80, 30, 10), cluster_items(30)
    )
    _write_warehouse(storage, "tiny", make_events([("a", "x", "view", 0), ("a", "y", "view", 0)]))
    externals = [dg.AssetSpec(k) for k in ("events", "items", "users")]
    result = dg.materialize(
        [
            *externals,
            *training.assets,
            *evaluation.assets,
            *training.asset_checks,
            *evaluation.asset_checks,
        ],
        resources={"storage": StorageResource(root=storage.root), "mlflow": MlflowResource()},
        run_config=RUN_CONFIG,
    )
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "split_is_temporal": True,
        "hybrid_model_saved": True,
        "champion_not_regressed": True,
    }
    mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
    eval_md = mats["model_evaluation"].materialization.metadata
    assert "shop/metrics" in eval_md and "too little data" in eval_md["summary"].value
    with open(storage.path("models", "shop", "gate.json")) as f:
        gate = json.load(f)
    assert gate["promoted"] and gate["version"] == "1"
    with open(storage.path("models", "tiny", "split.json")) as f:
        assert "popularity only" in json.load(f)["skip"]
    tiny_final = storage.path("models", "tiny", "final", "hybrid")
    assert os.path.exists(os.path.join(tiny_final, "popularity", "arrays.npz"))
    assert not os.path.exists(os.path.join(tiny_final, "lightfm"))
    ranker_md = mats["ranker_model"].materialization.metadata
    assert "chosen_on_validation" in ranker_md and "shop" in ranker_md["ranker"].value
    assert os.path.exists(storage.path("evaluation", "shop", "evaluation.png"))
    # what serves was chosen on validation and is recorded with its reason everywhere
    with open(storage.path("evaluation", "shop", "evaluation.json")) as f:
        record = json.load(f)
    assert record["served_by"] and record["selection"]
    assert gate["served_by"] == record["served_by"] and gate["served_because"]
    chosen = ranker_md["chosen_on_validation"].value["shop"]
    assert set(chosen) >= {"tuning", "selection"}  # the grids reach the pipeline
    # LightFM weighed on validation: the verdict reaches the MLflow run with both figures
    from mlflow.tracking import MlflowClient

    verdict = chosen["selection"]["lightfm"]
    run = MlflowClient(storage.mlflow_uri()).get_run(gate["run_id"]).data
    assert run.params["selection.lightfm.kept"] == str(verdict["kept"])
    assert run.params["selection.lightfm.reason"] == verdict["reason"]
    for side, value in verdict["validation_ndcg@10"].items():
        assert run.metrics[f"validation.hybrid_{side}_lightfm.NDCG_at_10"] == value
    with open(storage.path("models", "tiny", "gate.json")) as f:
        tiny_gate = json.load(f)
    assert tiny_gate["served_by"] == "popularity"
    assert "popularity only" in tiny_gate["served_because"]
    # the evaluated ranker's permutation importance, computed beside the published fit, is
    # what the saved evaluated model gives on the evaluation window
    from pipelines.training.assets import read_inputs
    from recsys.models.data import temporal_split
    from recsys.models.hybrid import HybridRecommender
    from recsys.models.importance import permutation_importance

    with open(storage.path("models", "shop", "final", "hybrid", "hybrid.json")) as f:
        logged = json.load(f)["info"]["permutation_importance"]
    evaluated = HybridRecommender.load(storage.path("models", "shop", "eval", "hybrid"))
    with open(storage.path("models", "shop", "split.json")) as f:
        parts = temporal_split(read_inputs(storage, "shop")[0], json.load(f)["test_fraction"])
    again = permutation_importance(evaluated, parts.train, parts.test, seed=evaluated.config.seed)
    assert logged is not None and logged == json.loads(json.dumps(again))


@pytest.mark.slow
def test_a_tenant_above_refits_beside_max_events_reads_its_events_anew(storage, tmp_path):
    """Above `refits_beside_max_events` the training step gives `fit_eval_and_final` a
    function that reads the tenant's events again, from the part files it read first, in
    each phase that needs them: the saved models are those of the step that holds the frame,
    file for file. A part file gone between two reads (a deletion compacted its day) is a
    clear error naming the tenant, not models fitted on two different sets of events."""
    from pipelines.training.assets import TenantEvents, read_model_events
    from recsys import ingest

    _write_warehouse(
        storage, "shop", cluster_events(np.random.default_rng(4), 80, 30, 10), cluster_items(30)
    )
    assets = [*(dg.AssetSpec(k) for k in ("events", "items", "users")), *training.assets]
    saved = []
    for limit in (None, 0):  # (None: the default, far above these events)
        train = RUN_CONFIG["ops"]["train_models"]["config"]
        config = train if limit is None else {**train, "refits_beside_max_events": limit}
        result = dg.materialize(
            assets,
            resources={"storage": StorageResource(root=storage.root), "mlflow": MlflowResource()},
            run_config={"ops": {"train_models": {"config": config}}},
        )
        assert result.success
        files = {}
        for variant in ("eval", "final"):  # (every file; the JSON without timings)
            folder = storage.path("models", "shop", variant, "hybrid")
            files.update({variant + "/" + k: v for k, v in saved_files(folder).items()})
        saved.append(files)
    assert sorted(saved[0]) == sorted(saved[1]) and len(saved[0]) > 20
    for name, want in saved[0].items():
        assert saved[1][name] == want, name
    parts = ingest.event_parts(storage, "shop")
    assert read_model_events(storage, "shop", parts).height == 800
    os.rename(parts[0], parts[0] + ".compacted")
    with pytest.raises(RuntimeError, match="shop: the events changed while they were being read"):
        read_model_events(storage, "shop", parts)
    with pytest.raises(RuntimeError, match="shop: the events changed while they were being read"):
        TenantEvents(storage, "shop", parts).scan()  # (the labels' folds: before any is read)

"""MLflow: a logged run, the registry round trip and the champion gate."""

import numpy as np
import polars as pl
import pytest
from synthetic_events import cluster_events, cluster_items

from recsys import tracking
from recsys.models.hybrid import HybridConfig, HybridRecommender
from recsys.models.serve import serve_top_n

FAST = dict(
    lightfm={"no_components": 4, "epochs": 3, "seed": 1, "num_threads": 1},
    ranker={"max_iter": 10, "max_leaf_nodes": 7, "min_samples_leaf": 5},
    tune={},
    candidates_per_generator=10,
    min_ranker_positives=5,
)


def _table(ndcg: float) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "model": ["served"],
            "users": [10],
            "NDCG@10": [ndcg],
            "NDCG@10_low": [ndcg - 0.01],
            "NDCG@10_high": [ndcg + 0.01],
        }
    )


def assert_serves_alike(fitted, loaded) -> None:
    """The registered model serves the fitted one's lists."""
    users = np.arange(len(fitted.user_ids_))
    a, b = serve_top_n(fitted, users, 10), serve_top_n(loaded, users, 10)
    np.testing.assert_array_equal(a.item_idx, b.item_idx)
    np.testing.assert_allclose(a.final_score, b.final_score, rtol=1e-6)


@pytest.fixture(scope="module")
def model():
    events = cluster_events(np.random.default_rng(2), n_users=60, n_items=20, per_user=8)
    return HybridRecommender(HybridConfig(**FAST)).fit(events, cluster_items()), events


def test_registry_roundtrip_and_gate(model, storage, tmp_path):
    hybrid, events = model
    uri = tracking.tracking_uri(storage)
    assert uri.startswith("sqlite:///") and uri.endswith("mlflow/mlflow.db")
    art = storage.mlflow_artifacts()
    first = tracking.log_training_run(
        tenant="shop",
        model=hybrid,
        events=events,
        uri=uri,
        artifact_root=art,
        table=_table(0.20),
        tolerance=0.01,
    )
    assert first.version == "1" and first.gate["promoted"]
    loaded = tracking.load_registered_model("shop", uri, "champion", dst=str(tmp_path / "dl"))
    assert_serves_alike(hybrid, loaded)

    # within tolerance: promoted; beyond it: refused, champion stays, both figures recorded
    second = tracking.log_training_run(
        tenant="shop",
        model=hybrid,
        events=events,
        uri=uri,
        artifact_root=art,
        table=_table(0.195),
        tolerance=0.01,
    )
    assert second.gate["promoted"]
    third = tracking.log_training_run(
        tenant="shop",
        model=hybrid,
        events=events,
        uri=uri,
        artifact_root=art,
        table=_table(0.15),
        tolerance=0.01,
    )
    assert not third.gate["promoted"] and third.gate["champion_ndcg_at_10"] == pytest.approx(0.195)
    client = tracking._client(uri)
    assert str(client.get_model_version_by_alias("recsys-shop", "champion").version) == "2"
    tags = client.get_model_version("recsys-shop", "3").tags
    assert tags["gate.promoted"] == "False" and tags["gate.candidate_ndcg_at_10"] == "0.15"

    run = client.get_run(first.run_id)
    assert run.data.tags["data_sha256"] == tracking.data_fingerprint(events)["data_sha256"]
    assert run.data.metrics["served.NDCG_at_10"] == pytest.approx(0.20)
    assert "config.lightfm.epochs" in run.data.params
    assert (
        str(storage.mlflow_artifacts())
        in client.get_experiment(run.info.experiment_id).artifact_location
    )


def test_a_saved_model_folder_is_logged_as_it_is(model, storage, tmp_path):
    hybrid, events = model
    folder = str(tmp_path / "saved")
    hybrid.save(folder)
    uri = tracking.tracking_uri(storage)
    run = tracking.log_training_run(
        tenant="folder",
        model=folder,
        events=events,
        uri=uri,
        artifact_root=storage.mlflow_artifacts(),
        table=_table(0.2),
    )
    assert run.gate["promoted"]
    params = tracking._client(uri).get_run(run.run_id).data.params
    assert params["config.lightfm.epochs"] == str(hybrid.config.lightfm["epochs"])
    loaded = tracking.load_registered_model("folder", uri, "champion", dst=str(tmp_path / "dl"))
    assert_serves_alike(hybrid, loaded)


def test_fingerprint_is_order_independent(model):
    _, events = model
    shuffled = events.sample(fraction=1.0, shuffle=True, seed=3)
    assert tracking.data_fingerprint(shuffled) == tracking.data_fingerprint(events)


@pytest.mark.services
def test_postgres_tracking_store_round_trip(model, pg_database_url, storage, tmp_path):
    """The production backend: runs, registry and aliases in PostgreSQL, artifacts on disk."""
    hybrid, events = model
    uri = tracking.tracking_uri(storage, override=pg_database_url)
    assert uri == pg_database_url
    run = tracking.log_training_run(
        tenant="pg",
        model=hybrid,
        events=events,
        uri=uri,
        artifact_root=storage.mlflow_artifacts(),
        table=_table(0.2),
        tolerance=0.01,
    )
    assert run.version == "1" and run.gate["promoted"]
    loaded = tracking.load_registered_model("pg", uri, "champion", dst=str(tmp_path / "dl"))
    assert_serves_alike(hybrid, loaded)
    client = tracking._client(uri)
    assert client.get_run(run.run_id).data.metrics["served.NDCG_at_10"] == pytest.approx(0.2)


def test_fingerprint_of_a_scan_hashed_in_slices_is_the_one_csv_hash(model, tmp_path, monkeypatch):
    """The hash is the SHA-256 of one CSV of the sorted rows, whether they are hashed whole or
    7 rows at a time, from a frame or from a lazy scan of Parquet files."""
    import hashlib

    _, events = model
    cols = ["event_id", "user_id", "item_id", "event_type", "timestamp"]
    one_csv = events.select(cols).sort(cols).write_csv(include_header=False).encode()
    whole = tracking.data_fingerprint(events)
    assert whole["data_sha256"] == hashlib.sha256(one_csv).hexdigest()
    assert whole["data_rows"] == events.height > 7
    assert whole["data_users"] == events["user_id"].n_unique()
    assert whole["data_max_ts"] == str(events["timestamp"].max())
    monkeypatch.setattr(tracking, "FINGERPRINT_ROWS", 7)
    for k, part in enumerate(events.sample(fraction=1.0, shuffle=True, seed=5).iter_slices(40)):
        part.write_parquet(tmp_path / f"part-{k}.parquet")
    assert tracking.data_fingerprint(pl.scan_parquet(tmp_path / "part-*.parquet")) == whole
    assert tracking.data_fingerprint(events) == whole

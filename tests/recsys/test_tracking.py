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
    assert whole["data_items"] == events["item_id"].n_unique()
    assert whole["data_min_ts"] == str(events["timestamp"].min())
    assert whole["data_max_ts"] == str(events["timestamp"].max())
    monkeypatch.setattr(tracking, "FINGERPRINT_ROWS", 7)
    for k, part in enumerate(events.sample(fraction=1.0, shuffle=True, seed=5).iter_slices(40)):
        part.write_parquet(tmp_path / f"part-{k}.parquet")
    assert tracking.data_fingerprint(pl.scan_parquet(tmp_path / "part-*.parquet")) == whole
    assert tracking.data_fingerprint(events) == whole


def _fingerprint_of_one_sorted_copy(events: pl.DataFrame) -> str:
    """The reference (what `data_fingerprint` did before it sorted in ranges of ids): the
    SHA-256 of one CSV of every row, sorted whole."""
    import hashlib

    cols = ["event_id", "user_id", "item_id", "event_type", "timestamp"]
    one_csv = events.select(cols).sort(cols).write_csv(include_header=False)
    return hashlib.sha256(one_csv.encode()).hexdigest()


def _events_with_repeated_keys(rng: np.random.Generator, n: int) -> pl.DataFrame:
    """Few distinct ids in every column (so the sort's ties run over several keys), null ids,
    ids that sort by bytes differently than by length, and non-ASCII ids."""
    ids = np.array(["", "a", "a0", "ab", "b", "z", "é", "évt-1", "ü", "A", "10", "9", "中"])
    eid = rng.choice(ids, n).astype(object)
    eid[rng.random(n) < 0.05] = None
    return pl.DataFrame(
        {
            "event_id": eid.tolist(),
            "user_id": rng.choice(["u1", "u2", "ü3"], n).tolist(),
            "item_id": [None if x == 0 else f"i{x}" for x in rng.integers(0, 4, n)],
            "event_type": rng.choice(["view", "purchase"], n).tolist(),
            "timestamp": pl.Series(1_700_000_000_000_000 + rng.integers(0, 5, n) * 60_000_000)
            .cast(pl.Datetime("us"))
            .dt.replace_time_zone("UTC"),
        }
    )


@pytest.mark.parametrize("range_rows", [1, 50, 333, 10**9])
def test_fingerprint_sorted_in_ranges_of_ids_is_the_one_sorted_copy_hash(
    tmp_path, monkeypatch, range_rows
):
    """Random events with many duplicates of every sort key (and of whole rows): hashed in
    ranges of event ids as small as one row, from a frame and from a scan of Parquet files,
    the hash is the one of the whole sorted copy, byte for byte."""
    rng = np.random.default_rng(range_rows)
    events = _events_with_repeated_keys(rng, 2000)
    want = _fingerprint_of_one_sorted_copy(events)
    monkeypatch.setattr(tracking, "FINGERPRINT_SORT_ROWS", range_rows)
    monkeypatch.setattr(tracking, "FINGERPRINT_MIN_RANGE", 1)
    monkeypatch.setattr(tracking, "FINGERPRINT_ROWS", 7)
    for k, part in enumerate(events.iter_slices(300)):
        part.write_parquet(tmp_path / f"part-{k}.parquet")
    scan = pl.scan_parquet(tmp_path / "part-*.parquet")
    got = tracking.data_fingerprint(events)
    assert got["data_sha256"] == want
    assert tracking.data_fingerprint(scan) == got
    assert tracking.data_fingerprint(events[rng.permutation(events.height)]) == got
    assert got["data_rows"] == 2000 and got["data_users"] == 3 and got["data_items"] == 4


def test_fingerprint_ranges_hold_a_share_of_the_events(monkeypatch):
    """Each range sorted holds about an eighth of the events, and an empty frame hashes to the
    hash of nothing."""
    import hashlib

    rng = np.random.default_rng(3)
    n = 40_000
    events = _events_with_repeated_keys(rng, n).with_columns(
        pl.Series("event_id", [f"e{x:06d}" for x in rng.permutation(n)])
    )
    monkeypatch.setattr(tracking, "FINGERPRINT_MIN_RANGE", 1000)
    sizes = []
    real_sort = pl.LazyFrame.sort

    def counting_sort(self, *args, **kwargs):
        sizes.append(self.select(pl.len()).collect().item())
        return real_sort(self, *args, **kwargs)

    monkeypatch.setattr(pl.LazyFrame, "sort", counting_sort)
    got = tracking.data_fingerprint(events)
    monkeypatch.setattr(pl.LazyFrame, "sort", real_sort)
    assert got["data_sha256"] == _fingerprint_of_one_sorted_copy(events)
    assert sum(sizes) == n and len(sizes) == 8
    assert max(sizes) < n / 8 * 1.5
    empty = tracking.data_fingerprint(events.clear())
    assert empty["data_rows"] == 0 and empty["data_sha256"] == hashlib.sha256().hexdigest()

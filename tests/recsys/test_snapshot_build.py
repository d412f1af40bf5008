"""Building and publishing a snapshot from a fitted hybrid model (recsys.snapshot.build)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from synthetic_events import cluster_events

from recsys.snapshot import SnapshotStore, open_snapshot
from recsys.snapshot import build as snapbuild
from recsys.snapshot.format import REASON_CODES


@pytest.fixture(scope="module")
def fitted():
    from recsys.models.hybrid import HybridConfig, HybridRecommender

    events = cluster_events(np.random.default_rng(0), n_users=60, n_items=30, per_user=8)
    return events, HybridRecommender(HybridConfig()).fit(events)


def _assemble(store, model, n_shards: int, users=None, events=None):
    """Tenant t's snapshot of model m1's lists (k=10) in `n_shards` shards."""
    return snapbuild.assemble_snapshot(
        store,
        tenant="t",
        model=model,
        model_key="m1",
        n_shards=n_shards,
        k=10,
        items=None,
        users=users,
        events=events,
        models_info={"champion": {"name": "hybrid", "version": "1", "run_id": "r"}},
        config_version="c1",
    )


def test_shard_bounds_cover_every_user_once() -> None:
    for n_users in (0, 1, 15, 16, 17, 1000):
        bounds = [snapbuild.shard_bounds(n_users, s, 16) for s in range(16)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n_users
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))


@pytest.mark.slow  # fits a hybrid model (~10 s)
def test_assemble_publishes_the_models_lists(fitted, tmp_path) -> None:
    events, model = fitted
    users = pl.DataFrame(
        {
            "user_id": [f"u{u}" for u in range(60)],
            "segment": ["a" if u % 3 else "b" for u in range(60)],
        }
    )
    store = SnapshotStore(str(tmp_path / "snapshots" / "t"))
    # one shard staged ahead (as the partitioned asset does), the others computed on assembly
    snapbuild.compute_shard(model, store.root, "m1", 2, 4, 10)
    sid, manifest = _assemble(store, model, 4, users, events)
    assert store.current_id() == sid and manifest["counts"]["users"] == 60
    snap = open_snapshot(store.current(), checksums=True)
    reference = snapbuild.shard_candidates(model, 0, 60, 10)
    for uid in ("u0", "u7", "u59"):
        u = snap.user_index(uid)
        items, score, signals, reason = snap.user_candidates(u)
        ref = reference.filter(pl.col("user_idx") == u)
        assert snap.item_ids(items) == [str(model.item_ids_[i]) for i in ref["item_idx"]]
        np.testing.assert_allclose(signals[:, 3], ref["ranker"].to_numpy(), rtol=1e-6)
        assert set(reason.tolist()) <= set(REASON_CODES.values())
        assert not set(items.tolist()) & set(snap.user_seen(u).tolist())
        assert snap.user_seen(u).size > 0
    assert snap.user_segment(snap.user_index("u3")) == "b"
    assert {"popular", "trending", "segment:a", "segment:b"} <= set(snap.fallback_names)
    assert snap.fallback("popular")[0].size > 0
    assert not (tmp_path / "snapshots" / "t" / ".staging" / "m1").exists()  # staging cleaned


@pytest.mark.slow  # fits a hybrid model (~10 s)
def test_a_shard_is_staged_and_assembled_a_chunk_of_users_at_a_time(
    fitted, tmp_path, monkeypatch
) -> None:
    """Chunks of 16 users: the staged file holds one row group per chunk, the lists of each
    chunk scored alone, and the snapshot assembled from them holds every user's list."""
    _, model = fitted
    monkeypatch.setattr(snapbuild, "SHARD_CHUNK_USERS", 16)
    assert snapbuild.shard_chunks(0, 60) == [(0, 16), (16, 32), (32, 48), (48, 60)]
    assert snapbuild.shard_chunks(7, 7) == [(7, 7)]
    store = SnapshotStore(str(tmp_path / "snapshots" / "t"))
    path, rows = snapbuild.compute_shard(model, store.root, "m1", 0, 1, 10)
    chunks = [snapbuild.shard_candidates(model, lo, hi, 10) for lo, hi in [(0, 16), (16, 32)]]
    chunks += [snapbuild.shard_candidates(model, lo, hi, 10) for lo, hi in [(32, 48), (48, 60)]]
    staged = list(snapbuild.read_shard(path, 0, 60))
    assert [bounds for bounds, _ in staged] == snapbuild.shard_chunks(0, 60)
    for (lo, hi), frame in staged:
        assert frame["user_idx"].is_between(lo, hi - 1).all() and frame.height > 0
    assert pl.concat([f for _, f in staged]).equals(pl.concat(chunks))
    assert rows == sum(c.height for c in chunks) == pl.read_parquet(path).height
    with pytest.raises(ValueError, match="row groups"):
        list(snapbuild.read_shard(path, 0, 100))
    sid, manifest = _assemble(store, model, 1)
    assert manifest["counts"]["candidates"] == rows
    snap = open_snapshot(store.current(), checksums=True)
    whole = pl.concat(chunks)
    for u in (0, 15, 16, 59):
        items, *_ = snap.user_candidates(u)
        assert items.tolist() == whole.filter(pl.col("user_idx") == u)["item_idx"].to_list()

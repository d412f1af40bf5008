"""Nothing but the data root's URI is shared: model folders and user-shard staging go through
the storage resource's filesystem (fsspec), so a worker needs no disk in common with others.

Two roots that are not a plain folder: `memory://` (a filesystem with no local path at all,
as an object store: anything written with local file I/O would land elsewhere and the steps
would not find it) and a `file://` URI (the local disk, reached through fsspec). A root that
cannot be reached fails the run before any step works.
"""

import glob
import os
import posixpath
import shutil
import tempfile
import uuid

import dagster as dg
import numpy as np
import polars as pl
import pytest
from synthetic_events import cluster_events

from pipelines import publish
from pipelines.publish.assets import snapshot_store
from pipelines.resources import StorageResource
from pipelines.training.assets import load_hybrid, model_path, save_model, write_json
from recsys.snapshot import SnapshotStore
from recsys.snapshot import build as snapbuild
from recsys.snapshot.fetch import fetch_snapshot
from recsys.storage import Storage

pytestmark = pytest.mark.slow  # fits a small hybrid model and runs Dagster (~20 s)

GATE = {
    "promoted": True,
    "candidate_ndcg_at_10": 0.3,
    "version": "2",
    "run_id": "uri0123456789",
    "model": "recsys-shop",
    "reason": "first version",
}


@pytest.fixture(scope="module")
def fitted():
    from recsys.models.hybrid import HybridConfig, HybridRecommender

    events = cluster_events(np.random.default_rng(3), n_users=48, n_items=24, per_user=8)
    return events, HybridRecommender(HybridConfig()).fit(events)


def _champion_at(store: Storage, fitted) -> None:
    """Events, the final model and the gate decision of tenant 'shop', written through
    `store` only (its filesystem, whatever the root)."""
    events, model = fitted
    day = store.path("warehouse", "shop", "events", "date=2024-01-01")
    store.makedirs(day)
    with store.fs.open(posixpath.join(day, "part-0.parquet"), "wb") as f:
        events.write_parquet(f)
    save_model(store, model, model_path(store, "shop", "final", "hybrid"))
    write_json(store, model_path(store, "shop", "gate.json"), GATE)


def _snapshot_arrays(path: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.npy"))):
        out[os.path.basename(f)] = np.load(f, allow_pickle=False)
    for f in sorted(glob.glob(os.path.join(path, "parquet", "**", "*.parquet"), recursive=True)):
        out[os.path.relpath(f, path)] = pl.read_parquet(f)
    return out


def _publish(store: Storage, n_shards: int = 4, selection=None):
    return dg.materialize(
        [dg.AssetSpec("champion_model"), *publish.build_assets(n_shards), *publish.asset_checks],
        resources={"storage": StorageResource(root=store.root, require_reachable=True)},
        run_config={"ops": {"user_recommendations": {"config": {"n_per_user": 6}}}},
        selection=selection,
    )


def test_shards_and_model_folders_go_through_a_memory_uri(fitted):
    _, model = fitted
    store = Storage(f"memory://recsys-{uuid.uuid4().hex[:8]}")
    _champion_at(store, fitted)
    # the model folder round-trips through the URI: same lists
    back = load_hybrid(store, model_path(store, "shop", "final", "hybrid"))
    users = np.arange(len(model.user_ids_))
    for a, b in zip(model.recommend(users, 5), back.recommend(users, 5), strict=True):
        np.testing.assert_array_equal(a, b)

    assert _publish(store, selection=["user_recommendations"]).success
    staging = posixpath.join(store.snapshots_dir("shop"), ".staging")
    found = sorted(store.fs.find(staging))
    assert [posixpath.basename(p) for p in found] == [
        f"shard-{i:02d}-of-04.parquet" for i in range(4)
    ]
    # each staged shard is what scoring that user range in process gives
    for shard, path in enumerate(found):
        with store.fs.open(path, "rb") as f:
            staged = pl.read_parquet(f)
        start, stop = snapbuild.shard_bounds(len(model.user_ids_), shard, 4)
        assert staged.equals(snapbuild.shard_candidates(model, start, stop, k=6))
    # nothing was written to a local folder named after the root
    assert not os.path.exists("memory:") and not os.path.exists(store.root)


def test_a_publication_through_object_store_and_file_uris_is_the_local_one(fitted, tmp_path):
    """The same champion under a plain folder, a `file://` URI and a `memory://` root (an
    object store: the snapshot is assembled on local disk, uploaded under the root, and a
    serving host fetches it): every root publishes the same arrays and tables, and the
    checks pass on each."""
    roots = {
        "folder": Storage(str(tmp_path / "folder")),
        "file": Storage(f"file://{tmp_path}/file"),
        "memory": Storage(f"memory://recsys-{uuid.uuid4().hex[:8]}"),
    }
    published, coverage = {}, {}
    for name, store in roots.items():
        _champion_at(store, fitted)
        result = _publish(store)
        assert result.success, name
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert checks["snapshot_live_and_verified"].passed, name
        # the coverage check read the live snapshot (fetched on the object store): the same
        # share of full lists everywhere (none here: 12 items a cluster, 8 seen, 6 asked)
        share = checks["snapshot_user_coverage"].metadata["full_list_share"].value
        coverage[name] = share["shop"]
        host = SnapshotStore(str(tmp_path / "host" / name))
        fetch_snapshot(store, "shop", host)  # what a serving host does
        published[name] = host.current()
    assert os.path.isfile(
        tmp_path / "file" / "models" / "shop" / "final" / "hybrid" / "hybrid.json"
    )
    assert coverage["file"] == coverage["memory"] == coverage["folder"]
    want = _snapshot_arrays(published["folder"])
    assert "cand.item.npy" in want
    for name in ("file", "memory"):
        got = _snapshot_arrays(published[name])
        assert got.keys() == want.keys(), name
        for key, value in want.items():
            if isinstance(value, np.ndarray):
                np.testing.assert_array_equal(got[key], value, err_msg=f"{name}: {key}")
            else:
                assert got[key].equals(value), f"{name}: {key}"
    # the staged shards are cleared once the snapshot is published
    memory = roots["memory"]
    assert not [p for p in memory.fs.find(memory.snapshots_dir("shop")) if "shard-" in p]
    # the object-store root's working copy on this host (kept for the next publication)
    working = snapshot_store(memory, "shop")
    assert working.root.startswith(tempfile.gettempdir())
    assert working.current_id() == os.path.basename(published["memory"])
    shutil.rmtree(working.root)


def test_a_root_the_workers_cannot_reach_fails_before_any_work(fitted):
    root = f"memory://not-there-{uuid.uuid4().hex[:8]}"
    result = dg.materialize(
        [dg.AssetSpec("champion_model"), *publish.build_assets(4)],
        resources={"storage": StorageResource(root=root, require_reachable=True)},
        run_config={"ops": {"user_recommendations": {"config": {"n_per_user": 6}}}},
        selection=["user_recommendations"],
        raise_on_error=False,
    )
    assert not result.success
    types = [e.event_type_value for e in result.all_events]
    assert "RESOURCE_INIT_FAILURE" in types and "STEP_START" not in types  # no work began
    said = " ".join(
        str(e.event_specific_data) for e in result.all_events if "FAILURE" in e.event_type_value
    )
    assert f"data root {root} does not exist here" in said

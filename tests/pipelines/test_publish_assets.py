"""The publish assets on a small tenant: shards, item lists, snapshot, checks, a re-run shard."""

import json
import os

import dagster as dg
import numpy as np
import pytest
from synthetic_events import cluster_events

from pipelines import publish
from pipelines.resources import StorageResource
from recsys.snapshot import SnapshotStore, open_snapshot

pytestmark = pytest.mark.slow  # fits a hybrid model and runs Dagster (~20 s)


@pytest.fixture
def champion_root(storage):
    from recsys.models.hybrid import HybridConfig, HybridRecommender

    events = cluster_events(np.random.default_rng(2), n_users=50, n_items=24, per_user=8)
    d = storage.path("warehouse", "shop", "events", "date=2024-01-01")
    os.makedirs(d, exist_ok=True)
    events.write_parquet(os.path.join(d, "part-0.parquet"))
    HybridRecommender(HybridConfig()).fit(events).save(
        storage.path("models", "shop", "final", "hybrid")
    )
    with open(storage.path("models", "shop", "gate.json"), "w") as f:
        json.dump(
            {
                "promoted": True,
                "candidate_ndcg_at_10": 0.3,
                "version": "4",
                "run_id": "abc123",
                "model": "recsys-shop",
                "reason": "first version",
            },
            f,
        )
    return storage


def test_publish_assets_build_verify_and_switch(champion_root):
    storage = champion_root
    resources = {"storage": StorageResource(root=storage.root)}
    defs = [dg.AssetSpec("champion_model"), *publish.assets, *publish.asset_checks]
    config = {
        "ops": {
            name: {"config": {"n_per_user": 8}}
            for name in (
                "user_recommendations",
                "item_similarities",
                "fallback_lists",
                "serving_snapshot",
            )
        }
    }

    # one shard alone (what a backfill or a re-run does): staged, nothing published
    one = dg.materialize(
        defs,
        resources=resources,
        run_config={"ops": {"user_recommendations": config["ops"]["user_recommendations"]}},
        partition_key="shard-03",
        selection=["user_recommendations"],
    )
    assert one.success
    snaps = SnapshotStore(storage.snapshots_dir("shop"))
    assert snaps.current() is None

    # the unpartitioned end-to-end run computes every shard, assembles and publishes
    result = dg.materialize(defs, resources=resources, run_config=config)
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"snapshot_live_and_verified": True, "snapshot_user_coverage": True}
    snap = open_snapshot(snaps.current(), checksums=True)
    assert snap.n_users == 50 and snap.manifest["models"]["champion"]["version"] == "4"
    assert snap.user_candidates(snap.user_index("u1"))[0].size == 8
    mats = {
        m.asset_key.to_user_string(): m.materialization.metadata
        for m in result.get_asset_materialization_events()
    }
    assert mats["serving_snapshot"]["published"].value[0]["snapshot"] == snap.snapshot_id

    # a second publication keeps the first for rollback
    first = snap.snapshot_id
    assert dg.materialize(defs, resources=resources, run_config=config).success
    assert snaps.current_id() != first and first in snaps.ids()


def test_publish_refuses_a_regressed_model(champion_root):
    storage = champion_root
    with open(storage.path("models", "shop", "gate.json"), "w") as f:
        json.dump({"promoted": False, "candidate_ndcg_at_10": 0.1, "reason": "regressed"}, f)
    result = dg.materialize(
        [dg.AssetSpec("champion_model"), *publish.assets],
        resources={"storage": StorageResource(root=storage.root)},
        selection=["serving_snapshot"],
        raise_on_error=False,
    )
    assert not result.success
    assert SnapshotStore(storage.snapshots_dir("shop")).current() is None

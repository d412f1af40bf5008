"""The publish assets on a small tenant: shards, item lists, snapshot, checks, a re-run shard."""

import json
import os

import dagster as dg
import numpy as np
import pytest
from synthetic_events import cluster_events

from pipelines import publish
from pipelines.publish.partitions import SHARD_STEPS_TAG
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


def _snapshot_arrays(path: str) -> dict[str, object]:
    import glob

    import polars as pl

    out: dict[str, object] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.npy"))):
        out[os.path.basename(f)] = np.load(f, allow_pickle=False)
    # a table's rows whatever its part files (the candidates are written a part per shard)
    tables: dict[str, list[str]] = {}
    for f in sorted(glob.glob(os.path.join(path, "parquet", "**", "*.parquet"), recursive=True)):
        rel = os.path.relpath(f, path)
        tables.setdefault(os.path.dirname(rel) if "part-" in rel else rel, []).append(f)
    for name, files in tables.items():
        out[name] = pl.concat([pl.read_parquet(f) for f in files])
    return out


@pytest.fixture
def many_users_root(storage):
    """A champion over 1,100 users: more than four scoring batches, so 4 and 16 shards cut
    them differently."""
    from recsys.models.hybrid import HybridConfig, HybridRecommender

    events = cluster_events(np.random.default_rng(4), n_users=1100, n_items=40, per_user=6)
    d = storage.path("warehouse", "shop", "events", "date=2024-01-01")
    os.makedirs(d, exist_ok=True)
    events.write_parquet(os.path.join(d, "part-0.parquet"))
    HybridRecommender(HybridConfig()).fit(events).save(
        storage.path("models", "shop", "final", "hybrid")
    )
    with open(storage.path("models", "shop", "gate.json"), "w") as f:
        json.dump({"promoted": True, "candidate_ndcg_at_10": 0.3, "version": "1",
                   "run_id": "many", "model": "recsys-shop", "reason": "first"}, f)  # fmt: skip
    return storage


def test_the_shard_count_is_a_setting_and_the_snapshot_does_not_depend_on_it(many_users_root):
    """RECSYS_USER_SHARDS (default 16) decides the partitions and the shard steps; 4 and 16
    shards publish the same snapshot, array for array and table for table (the candidates
    table is written a part file per shard: its rows are the same). Shard bounds fall on the
    scoring batches, so every user is scored in the same batch either way."""
    from recsys.snapshot import build as snapbuild

    storage = many_users_root
    for n in (4, 16):
        bounds = [snapbuild.shard_bounds(1100, s, n) for s in range(n)]
        assert bounds[0][0] == 0 and bounds[-1][1] == 1100
        inner = [a[1] for a in bounds[:-1]]
        assert inner == [b[0] for b in bounds[1:]]
        assert all(x % snapbuild.SCORING_BATCH == 0 for x in inner)
        assert sum(b > a for a, b in bounds) >= 4  # the users are cut in several shards
    resources = {"storage": StorageResource(root=storage.root)}
    snaps = SnapshotStore(storage.snapshots_dir("shop"))
    assert publish.user_shard_count(None) == 16 and publish.user_shard_count("4") == 4
    for bad in ("0", "-3", "many", "10001"):
        with pytest.raises(ValueError, match="RECSYS_USER_SHARDS"):
            publish.user_shard_count(bad)
    published, steps = {}, {}
    # (the in-process jobs' tag: every shard of a tenant in one step, two side by side)
    for n, tags in ((4, {}), (16, {}), ("16 in one step", {SHARD_STEPS_TAG: "one_step"})):
        assets = publish.build_assets(16 if tags else n)
        if not tags:
            keys = [f"shard-{i:02d}" for i in range(n)]
            assert assets[0].partitions_def.get_partition_keys() == keys
        config = {"ops": {"user_recommendations": {"config": {"n_per_user": 8}}}}
        result = dg.materialize(
            [dg.AssetSpec("champion_model"), *assets],
            resources=resources,
            run_config=config,
            tags=tags,
        )
        assert result.success
        steps[n] = sorted(
            e.step_key
            for e in result.all_events
            if e.event_type_value == "STEP_SUCCESS" and "score_user_shard" in e.step_key
        )
        published[n] = snaps.current()
    assert len(steps[4]) == 4 and len(steps[16]) == 16
    assert steps["16 in one step"] == ["user_recommendations.score_user_shard[shop_00_to_15]"]
    assert snapbuild.shard_step_count(steps["16 in one step"][0]) == 16
    assert {snapbuild.shard_step_count(k) for k in steps[16]} == {1}
    assert len(set(published.values())) == 3
    a = _snapshot_arrays(published[4])
    assert "cand.item.npy" in a
    for other in (16, "16 in one step"):
        b = _snapshot_arrays(published[other])
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], np.ndarray):
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{other}: {name}")
            else:
                assert a[name].equals(b[name]), f"{other}: {name}"
    # one shard of 4 alone, as a backfill's partition: the 4-shard file of that range
    one = dg.materialize(
        [dg.AssetSpec("champion_model"), *publish.build_assets(4)],
        resources=resources,
        run_config={"ops": {"user_recommendations": {"config": {"n_per_user": 8}}}},
        partition_key="shard-02",
        selection=["user_recommendations"],
    )
    assert one.success
    staging = os.path.join(snaps.root, ".staging")
    staged = [f for _, _, fs in os.walk(staging) for f in fs if f.endswith(".parquet")]
    assert staged == ["shard-02-of-04.parquet"]


def test_shard_step_keys_are_dagster_names_for_every_valid_tenant_and_count_back():
    """Tenant ids may hold '-' and '.', which Dagster names may not: the step keys escape them
    (and '_'), stay distinct per tenant, and `shard_step_count` reads the count back."""
    from recsys.snapshot.build import shard_step_count, shard_step_key

    tenants = ["default", "acme.eu", "a-b", "a_b", "a_2db", "x_to_5", "my_to_shop"]
    keys = set()
    for tenant in tenants:
        for shards, n in (([3], 1), (list(range(16)), 16), ([0, 1, 2], 3)):
            key = shard_step_key(tenant, shards, 1000 if n == 3 else 16)
            dg.DynamicOutput(0, mapping_key=key)  # a valid Dagster name, or it raises
            assert shard_step_count(f"user_recommendations.score_user_shard[{key}]") == n
            keys.add(key)
    assert len(keys) == 3 * len(tenants)
    assert shard_step_key("default", [3], 16) == "default_03"
    assert shard_step_key("acme.eu", list(range(16)), 16) == "acme_2eeu_00_to_15"

"""The ingest assets, checks and sensor in real Dagster runs over demo data."""

from __future__ import annotations

import os
import time
from pathlib import Path

import dagster as dg
import polars as pl

from pipelines import ingest as ingest_defs
from pipelines.definitions import defs
from pipelines.resources import IngestPolicy, StorageResource
from recsys import ingest


def _materialize(resources, instance=None):
    return dg.materialize(
        [*ingest_defs.assets, *ingest_defs.asset_checks],
        resources=resources,
        instance=instance or dg.DagsterInstance.ephemeral(),
    )


def _checks(result) -> dict[str, bool]:
    return {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_definitions_load_with_the_ingest_graph():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert {"events", "rejected_events", "items", "users"} <= keys
    assert defs.resolve_job_def("recsys_pipeline") is not None
    assert defs.resolve_sensor_def("landing_sensor") is not None
    shards = defs.resolve_job_def("user_shards_job")
    assert len(shards.partitions_def.get_partition_keys()) == 16
    schedule = defs.resolve_schedule_def("daily_retrain")
    assert schedule.job_name == "recsys_pipeline" and schedule.cron_schedule == "0 3 * * *"


def test_ingest_run_materialises_tables_with_metadata_and_passing_checks(ingest_resources):
    result = _materialize(ingest_resources)
    assert result.success
    mats = {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("events_and_rejects")
    }
    ev = mats["events"]
    assert ev["rows_new"].value == ev["dagster/row_count"].value > 19_000
    assert ev["duplicates_dropped"].value == 60
    rej = mats["rejected_events"]
    assert rej["rejected_this_run"].value == 80
    assert set(rej["rejected_by_reason"].value) == {
        "missing_id",
        "bad_timestamp",
        "unknown_event_type",
        "oversize_field",
        "bad_value",
    }
    checks = _checks(result)
    assert checks["events_schema"] and checks["events_null_ids"] and checks["events_unique"]
    assert checks["reject_rate"] and checks["items_valid"]
    assert checks["events_freshness"] is False  # demo data ends 2026-11-01: stale on purpose

    again = _materialize(ingest_resources)  # idempotent: nothing new, same table
    assert again.success
    ev2 = {
        m.asset_key.to_user_string(): m.metadata
        for m in again.asset_materializations_for_node("events_and_rejects")
    }["events"]
    assert ev2["rows_new"].value == 0
    assert ev2["dagster/row_count"].value == ev["dagster/row_count"].value
    # the catalogue: every landing file the first time, none when nothing new has landed
    items = [result.asset_materializations_for_node("items")[0].metadata]
    items.append(again.asset_materializations_for_node("items")[0].metadata)
    (tenant, first), (_, second) = (
        next(iter(m["landing_files_read"].value.items())) for m in items
    )
    store = ingest_resources["storage"].storage()
    n = len(ingest.catalogue_files(store, tenant, "items"))
    assert (first, second) == (f"{n} (every file)", "0 (since the last build)") and n > 0
    assert ingest.landing_data_files(store, tenant, "items") == []  # (moved out once folded)
    assert items[1]["dagster/row_count"].value == items[0]["dagster/row_count"].value


def test_reject_rate_check_fails_above_the_threshold(demo_root):
    strict = {
        "storage": StorageResource(root=demo_root.root),
        "policy": IngestPolicy(max_reject_rate=0.001),
    }
    result = _materialize(strict)
    assert _checks(result)["reject_rate"] is False


def test_sensor_requests_a_run_only_for_new_landing_files(demo_root, ingest_resources, tmp_path):
    ctx = dg.build_sensor_context(resources={"storage": ingest_resources["storage"]})
    first = ingest_defs.landing_sensor(ctx)
    assert isinstance(first, dg.RunRequest)
    _materialize(ingest_resources)
    assert isinstance(ingest_defs.landing_sensor(ctx), dg.SkipReason)
    new = tmp_path / "more.csv"
    new.write_text("user_id,item_id,event_type,timestamp\nu1,i1,view,1761955200\n")
    ingest.import_file(demo_root, "events", str(new))
    again = ingest_defs.landing_sensor(ctx)
    assert isinstance(again, dg.RunRequest) and again.run_key != first.run_key
    _materialize(ingest_resources)
    # a copy still coming in (not Parquet yet): a run that leaves it pending; the same file
    # whole, or the same bytes once settled, is new to the sensor (run keys are not repeated)
    folder = Path(demo_root.landing_dir("default", "events"))
    partial = folder / "copied-in.parquet"
    partial.write_bytes(b"PAR1 the first bytes of a copy")
    fresh = ingest_defs.landing_sensor(ctx)
    assert isinstance(fresh, dg.RunRequest)
    _materialize(ingest_resources)
    assert ingest.pending_files(demo_root, "default") == [str(partial)]
    assert ingest_defs.landing_sensor(ctx).run_key == fresh.run_key  # (nothing changed)
    past = time.time() - ingest.LANDING_SETTLE_S - 1
    os.utime(partial, (past, past))
    settled = ingest_defs.landing_sensor(ctx)
    assert settled.run_key != fresh.run_key
    pl.DataFrame(
        {"user_id": ["u9"], "item_id": ["i9"], "event_type": ["view"], "timestamp": ["1761955200"]}
    ).write_parquet(partial)  # (the copy done: another size)
    whole = ingest_defs.landing_sensor(ctx)
    assert whole.run_key not in (fresh.run_key, settled.run_key)
    _materialize(ingest_resources)
    assert ingest.pending_files(demo_root, "default") == []


def test_event_types_a_tenant_declared_are_ingested_and_weighed_in_training(tmp_path):
    """The tenant config's `event_types` (the API's document: PUT /v1/admin/tenants/{t}/config)
    is the one declaration: the ingest asset accepts a declared type beside the built-in ones,
    and the interactions asset weighs it (and a built-in type's changed weight). Another
    tenant's declaration does not apply: its rows of that type are rejects."""
    from pipelines.training.assets import interactions
    from serving.documents import TenantDocuments

    root = str(tmp_path / "data")
    storage = StorageResource(root=root)
    store = storage.storage()
    for tenant in ("acme", "globex"):
        folder = store.landing_dir(tenant, "events")
        store.makedirs(folder)
        pl.DataFrame(
            {
                "user_id": ["u1", "u1", "u2"],
                "item_id": ["i1", "i2", "i1"],
                "event_type": ["Wishlist", "view", "wishlist"],
                "timestamp": ["1761955200", "1761955300", "1761955400"],
            }
        ).write_parquet(os.path.join(folder, "e.parquet"))
    TenantDocuments(os.path.join(root, "serving")).collection("config").put(
        "acme", "config", {"event_types": {"wishlist": 2.5, "view": 0.5}}
    )
    result = dg.materialize(
        [*ingest_defs.assets, interactions],
        resources={"storage": storage, "policy": IngestPolicy()},
        instance=dg.DagsterInstance.ephemeral(),
    )
    assert result.success
    acme = ingest.read_events(store, "acme").sort("timestamp")
    assert acme["event_type"].to_list() == ["wishlist", "view", "wishlist"]
    rejected = ingest.scan_rejected(store, "globex").collect()
    assert sorted(rejected["reason"].to_list()) == ["unknown_event_type"] * 2
    assert ingest.read_events(store, "globex")["event_type"].to_list() == ["view"]
    weights = result.asset_materializations_for_node("interactions")[0].metadata["weights"].value
    assert (weights["acme"]["wishlist"], weights["acme"]["view"]) == (2.5, 0.5)
    assert "wishlist" not in weights["globex"] and weights["globex"]["view"] == 1.0
    pairs = pl.read_parquet(store.table_path("acme", "interactions")).sort("user_id", "item_id")
    conf = pairs["confidence"].to_list()
    assert pairs.height == 3 and abs(conf[0] / conf[1] - 5) < 1e-3  # (2.5 against 0.5)


def test_event_checks_read_the_days_the_last_ingest_wrote(tmp_path):
    """The events checks look at the days the run's ingest wrote (the others are as they were
    when checked), and the freshness check reads the time span the ingest keeps: a day holding
    an event without a user id fails `events_null_ids` once a run writes that day."""
    root = str(tmp_path / "data")
    resources = {"storage": StorageResource(root=root), "policy": IngestPolicy()}
    store = resources["storage"].storage()
    folder = store.landing_dir("acme", "events")
    store.makedirs(folder)

    def land(name: str, day: str) -> None:
        pl.DataFrame(
            {
                "user_id": [f"{name}1", f"{name}2"],
                "item_id": ["i1", "i2"],
                "event_type": ["view", "view"],
                "timestamp": [f"{day}T10:00:00Z", f"{day}T11:00:00Z"],
            }
        ).write_parquet(os.path.join(folder, name))

    def checked(result):
        evaluations = {
            e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
            for e in result.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
        }
        nulls = evaluations["events_null_ids"]
        return nulls.passed, nulls.metadata["days_checked"].value, evaluations

    land("a.parquet", "2026-10-01")
    land("b.parquet", "2026-10-02")
    passed, days, evaluations = checked(_materialize(resources))
    assert (passed, days) == (True, {"acme": 2})
    assert evaluations["events_freshness"].metadata["age_hours"].value["acme"] > 0
    day = os.path.join(store.events_dir("acme"), "date=2026-10-02")
    bad = (
        ingest.read_events(store, "acme")
        .head(1)
        .with_columns(pl.lit(None, pl.String).alias("user_id"), pl.lit("broken").alias("event_id"))
    )
    bad.write_parquet(os.path.join(day, "part-20261002T000000-0000beef.parquet"))
    land("c.parquet", "2026-10-03")  # (another day: not checked again)
    assert checked(_materialize(resources))[:2] == (True, {"acme": 1})
    land("d.parquet", "2026-10-02")  # (the day with the broken row)
    blocked = dg.materialize(
        [*ingest_defs.assets, *ingest_defs.asset_checks],
        resources=resources,
        instance=dg.DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert checked(blocked)[:2] == (False, {"acme": 1})

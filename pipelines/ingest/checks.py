"""Data-quality checks of the ingest assets, declared next to them.

The event checks share one step (one pass over the warehouse, one process under the
multiprocess executor); each still reports, blocks and shows in the UI on its own.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg
import polars as pl

from pipelines.resources import IngestPolicy, StorageResource
from recsys import ingest
from recsys.contract import EVENT_SCHEMA, ITEM_SCHEMA

EVENT_CHECKS = [
    dg.AssetCheckSpec(
        "events_schema",
        asset="events",
        blocking=True,
        description="Stored events match the data contract's types.",
    ),
    dg.AssetCheckSpec(
        "events_null_ids",
        asset="events",
        blocking=True,
        description="No event lacks an event, user or item id.",
    ),
    dg.AssetCheckSpec(
        "events_unique", asset="events", blocking=True, description="Every event_id is stored once."
    ),
    dg.AssetCheckSpec(
        "events_freshness",
        asset="events",
        description="The newest event is recent enough (warning only).",
    ),
    dg.AssetCheckSpec(
        "reject_rate",
        asset="rejected_events",
        description="The share of rejected rows in the last ingest is under the configured limit.",
    ),
]


@dg.multi_asset_check(specs=EVENT_CHECKS)
def event_checks(storage: StorageResource, policy: IngestPolicy):
    store = storage.storage()
    tenants = ingest.tenants_with_landing(store)
    schema_problems, nulls, dupes, ages, stale, rates = {}, {}, {}, {}, [], {}
    now = datetime.now(UTC)
    for tenant in tenants:
        scan = ingest.scan_events(store, tenant)
        schema = scan.collect_schema()
        bad = {c: str(schema.get(c)) for c, t in EVENT_SCHEMA.items() if schema.get(c) != t}
        if bad:
            schema_problems[tenant] = bad
        stats = scan.select(
            (
                pl.col("user_id").is_null()
                | pl.col("item_id").is_null()
                | pl.col("event_id").is_null()
            )
            .sum()
            .alias("nulls"),
            (pl.len() - pl.col("event_id").n_unique()).alias("dupes"),
            pl.col("timestamp").max().alias("newest"),
        ).collect()
        nulls[tenant] = int(stats["nulls"][0] or 0)
        dupes[tenant] = int(stats["dupes"][0] or 0)
        newest = stats["newest"][0]
        ages[tenant] = round((now - newest).total_seconds() / 3600, 1) if newest else None
        if newest is None or now - newest > timedelta(hours=policy.freshness_hours):
            stale.append(tenant)
        last = ingest.load_state(store, tenant).get("events", {}).get("last_report", {})
        rates[tenant] = round(last.get("reject_rate", 0.0), 5)
    over = [t for t, r in rates.items() if r > policy.max_reject_rate]
    yield dg.AssetCheckResult(
        check_name="events_schema",
        asset_key="events",
        passed=not schema_problems,
        metadata={"mismatched_columns": schema_problems},
    )
    yield dg.AssetCheckResult(
        check_name="events_null_ids",
        asset_key="events",
        passed=sum(nulls.values()) == 0,
        metadata={"null_ids": nulls},
    )
    yield dg.AssetCheckResult(
        check_name="events_unique",
        asset_key="events",
        passed=sum(dupes.values()) == 0,
        metadata={"duplicates": dupes},
    )
    yield dg.AssetCheckResult(
        check_name="events_freshness",
        asset_key="events",
        passed=not stale,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"age_hours": ages, "limit_hours": policy.freshness_hours, "stale": stale},
    )
    yield dg.AssetCheckResult(
        check_name="reject_rate",
        asset_key="rejected_events",
        passed=not over,
        metadata={
            "reject_rate": rates,
            "max_reject_rate": policy.max_reject_rate,
            "over_limit": over,
        },
    )


@dg.asset_check(asset="items", blocking=True, description="Items match the contract, ids unique.")
def items_valid(storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.storage()
    problems = {}
    for tenant in ingest.tenants_with_landing(store):
        path = store.table_path(tenant, "items")
        if not store.exists(path):
            continue
        df = pl.read_parquet(store.fs.open(path, "rb"))
        bad = [c for c, t in ITEM_SCHEMA.items() if df.schema.get(c) != t]
        dupes = df.height - df["item_id"].n_unique()
        if bad or dupes or df["item_id"].null_count():
            problems[tenant] = {"mismatched": bad, "duplicates": dupes}
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": problems})


asset_checks = [event_checks, items_valid]

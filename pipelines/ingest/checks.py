"""Data-quality checks of the ingest assets, declared next to them.

The event checks share one step (one pass over the days the last ingest wrote, one process
under the multiprocess executor); each still reports, blocks and shows in the UI on its own.
The newest event's age is the span the ingest keeps in its state, not a scan.
"""

import posixpath
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
        description="The events of the days the last ingest wrote match the contract's types.",
    ),
    dg.AssetCheckSpec(
        "events_null_ids",
        asset="events",
        blocking=True,
        description="No event of the days the last ingest wrote lacks an event, user or item id.",
    ),
    dg.AssetCheckSpec(
        "events_unique",
        asset="events",
        blocking=True,
        description="Every event_id of the days the last ingest wrote is stored once.",
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
    days_checked: dict[str, int] = {}
    now = datetime.now(UTC)
    for tenant in tenants:
        entry = ingest.load_state(store, tenant).get("events", {})
        last = entry.get("last_report", {})
        # (the days the last ingest wrote: the others have not changed since they were checked,
        # and a check of every stored event at every run grows with the whole history)
        written = {f"date={day}" for day in last.get("days_written", [])}
        parts = [
            p
            for p in ingest.event_parts(store, tenant)
            if posixpath.basename(posixpath.dirname(p)) in written
        ]
        days_checked[tenant] = len(written)
        if parts:
            scan = ingest.scan_events(store, tenant, parts)
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
            ).collect()
            nulls[tenant] = int(stats["nulls"][0] or 0)
            dupes[tenant] = int(stats["dupes"][0] or 0)
        _, newest_iso = ingest.events_time_range(store, tenant)
        newest = datetime.fromisoformat(newest_iso) if newest_iso else None
        ages[tenant] = round((now - newest).total_seconds() / 3600, 1) if newest else None
        if newest is None or now - newest > timedelta(hours=policy.freshness_hours):
            stale.append(tenant)
        rates[tenant] = round(last.get("reject_rate", 0.0), 5)
    over = [t for t, r in rates.items() if r > policy.max_reject_rate]
    yield dg.AssetCheckResult(
        check_name="events_schema",
        asset_key="events",
        passed=not schema_problems,
        metadata={"mismatched_columns": schema_problems, "days_checked": days_checked},
    )
    yield dg.AssetCheckResult(
        check_name="events_null_ids",
        asset_key="events",
        passed=sum(nulls.values()) == 0,
        metadata={"null_ids": nulls, "days_checked": days_checked},
    )
    yield dg.AssetCheckResult(
        check_name="events_unique",
        asset_key="events",
        passed=sum(dupes.values()) == 0,
        metadata={"duplicates": dupes, "days_checked": days_checked},
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

"""What one ingest run costs when the warehouse already holds a long history.

    .venv/bin/python benchmarks/ingest_history.py --days 30 --per-day 1000000 [--root DIR]

Writes `--days` days of `--per-day` events straight into a tenant's warehouse (one part a day,
as merges leave a past day), then lands a file of 100 new events for the last day and runs the
ingest assets with their checks in process (`dagster.materialize`, as the landing sensor's run
does), twice: the first run after the history was written, then the steady state. Prints each
run's wall time, the process's peak resident memory, and what the checks reported.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-day", type=int, default=1_000_000)
    parser.add_argument("--root", help="a folder to write into (default: a temporary one)")
    args = parser.parse_args()

    import dagster as dg
    import polars as pl

    from pipelines import ingest as ingest_defs
    from pipelines.resources import IngestPolicy, StorageResource
    from recsys import ingest
    from recsys.contract import EVENT_SCHEMA
    from recsys.storage import Storage

    with tempfile.TemporaryDirectory(prefix="bench-history-", dir=args.root) as root:
        storage = Storage(root)
        tenant = "bench"
        start = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
        started = time.perf_counter()
        n = args.per_day
        for d in range(args.days):
            day = start + dt.timedelta(days=d)
            folder = os.path.join(storage.events_dir(tenant), f"date={day:%Y-%m-%d}")
            os.makedirs(folder)
            k = pl.int_range(d * n, (d + 1) * n, eager=True)
            pl.DataFrame(
                {
                    "event_id": "e" + k.cast(pl.String),
                    "tenant": [tenant] * n,
                    "user_id": "u" + (k % 200_000).cast(pl.String),
                    "item_id": "i" + ((k * 7919) % 50_000).cast(pl.String),
                    "event_type": ["view"] * n,
                    "timestamp": pl.datetime_range(
                        day, day + dt.timedelta(seconds=86_399), interval="1s", eager=True
                    ).gather(pl.int_range(0, n, eager=True) * 86_399 // max(1, n - 1)),
                    "value": [None] * n,
                    "session_id": [None] * n,
                    "context": [None] * n,
                },
                schema=EVENT_SCHEMA,
            ).write_parquet(os.path.join(folder, "part-history-00000000.parquet"))
        print(
            f"history: {args.days} days x {n:,} events written in "
            f"{time.perf_counter() - started:.1f} s"
        )
        landing = storage.landing_dir(tenant, "events")
        os.makedirs(landing)
        last = start + dt.timedelta(days=args.days - 1, hours=12)
        resources = {"storage": StorageResource(root=root), "policy": IngestPolicy()}
        for run in range(2):
            pl.DataFrame(
                {
                    "user_id": [f"new{run}-{i}" for i in range(100)],
                    "item_id": ["i1"] * 100,
                    "event_type": ["view"] * 100,
                    "timestamp": [(last + dt.timedelta(seconds=i)).isoformat() for i in range(100)],
                }
            ).write_parquet(os.path.join(landing, f"api-{run}.parquet"))
            started = time.perf_counter()
            result = dg.materialize(
                [*ingest_defs.assets, *ingest_defs.asset_checks],
                resources=resources,
                instance=dg.DagsterInstance.ephemeral(),
            )
            seconds = time.perf_counter() - started
            checks = {
                e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
                for e in result.all_events
                if e.event_type_value == "ASSET_CHECK_EVALUATION"
            }
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(
                f"run {run + 1}: {seconds:.2f} s, peak RSS so far {peak:,.0f} MiB; checks "
                f"{sorted(k for k, ok in checks.items() if ok)} passed, "
                f"{sorted(k for k, ok in checks.items() if not ok)} failed; time range "
                f"{ingest.events_time_range(storage, tenant)}"
            )


if __name__ == "__main__":
    main()

"""Ingest throughput and peak memory: landing Parquet -> validated, deduplicated day partitions.

Generates N demo events (default 10M, in 1M-event landing files, 0.4% malformed and 0.3% resent
duplicates), then runs the same `ingest_events` the Dagster asset runs, in a fresh process, and
prints events/s and the peak resident memory. Run with a smaller N too to see that memory does
not grow with the input:

    .venv/bin/python benchmarks/ingest_throughput.py --events 10000000
    .venv/bin/python benchmarks/ingest_throughput.py --events 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def child(root: str) -> None:
    from recsys.ingest import ingest_events
    from recsys.storage import Storage

    started = time.perf_counter()
    report = ingest_events(Storage(root), "default", full_refresh=True)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "rows_read": report.rows_read,
                "rows_new": report.rows_new,
                "rejected": report.rejected,
                "duplicates": report.duplicates,
                "seconds": seconds,
                "peak_rss_mb": peak_mb,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--root", default=None, help="data root to reuse (default: a temp folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    from recsys.demo import DemoSpec, generate
    from recsys.storage import Storage

    root = args.root or os.path.join(tempfile.gettempdir(), f"recsys-bench-ingest-{args.events}")
    t = time.perf_counter()
    summary = generate(DemoSpec(events=args.events, seed=1, end_date="2026-11-01"), Storage(root))
    gen_s = time.perf_counter() - t
    if not summary.skipped:
        print(f"generated {summary.events_written:,} events in {gen_s:.1f}s into {root}")
    out = subprocess.run(
        [sys.executable, __file__, "--child", root], check=True, capture_output=True, text=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"ingest: {r['rows_read']:,} rows read -> {r['rows_new']:,} new events, "
        f"{r['duplicates']:,} duplicates dropped, {r['rejected']:,} rejected"
    )
    print(
        f"time: {r['seconds']:.2f}s  throughput: {r['rows_read'] / r['seconds']:,.0f} events/s  "
        f"peak RSS: {r['peak_rss_mb']:,.0f} MB  (cores: {os.cpu_count()})"
    )


if __name__ == "__main__":
    main()

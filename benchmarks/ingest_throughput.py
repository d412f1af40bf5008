"""Ingest throughput and peak memory: landing Parquet -> validated, deduplicated day partitions.

Generates N demo events (default 10M, in 1M-event landing files, 0.4% malformed and 0.3% resent
duplicates), then runs the same `ingest_events` the Dagster asset runs, in a fresh process, and
prints events/s and the peak resident memory. Run with a smaller N too to see that memory does
not grow with the input:

    .venv/bin/python benchmarks/ingest_throughput.py --events 10000000
    .venv/bin/python benchmarks/ingest_throughput.py --events 2000000

`--file-events N` lands the events in files of N events instead, as the API does (a file every
30 s a worker), to time many small files:

    .venv/bin/python benchmarks/ingest_throughput.py --events 300000 --file-events 100

After the ingest it prints what the landing sensor then costs at each tick (`pending_files`:
one listing of landing, compared with the ingest state) and the state's size.
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
    from recsys.ingest import ingest_events, pending_files
    from recsys.storage import Storage

    storage = Storage(root)
    started = time.perf_counter()
    report = ingest_events(storage, "default", full_refresh=True)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # what the landing sensor then does at every tick: list landing, compare with the state
    tick = time.perf_counter()
    pending = pending_files(storage, "default")
    tick_ms = (time.perf_counter() - tick) * 1000
    print(
        json.dumps(
            {
                "rows_read": report.rows_read,
                "rows_new": report.rows_new,
                "rejected": report.rejected,
                "duplicates": report.duplicates,
                "seconds": seconds,
                "peak_rss_mb": peak_mb,
                "landing_files_after": len(storage.landing_files("default", "events")),
                "pending_after": len(pending),
                "tick_ms": tick_ms,
                "state_kb": storage.fs.size(storage.ingest_state_path("default")) / 1024,
            }
        )
    )


def split_landing(storage, per_file: int) -> int:
    """Land the tenant's event files again as files of `per_file` events (in the same order,
    with increasing modification times: the landing order)."""
    import polars as pl

    from recsys.ingest import landing_data_files

    folder = storage.landing_dir("default", "events")
    old = landing_data_files(storage, "default", "events")
    events = pl.concat([pl.read_parquet(f) for f in old])
    for f in old:
        os.remove(f)
    n_files = -(-events.height // per_file)
    for n in range(n_files):
        path = os.path.join(folder, f"api-{n:07d}.parquet")
        events.slice(n * per_file, per_file).write_parquet(path)
        os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))
    return n_files


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--root", default=None, help="data root to reuse (default: a temp folder)")
    ap.add_argument("--file-events", type=int, default=0, help="events a landing file (0: 1M)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    from recsys.demo import DemoSpec, generate
    from recsys.storage import Storage

    name = f"recsys-bench-ingest-{args.events}" + (
        f"-{args.file_events}" if args.file_events else ""
    )
    root = args.root or os.path.join(tempfile.gettempdir(), name)
    t = time.perf_counter()
    summary = generate(DemoSpec(events=args.events, seed=1, end_date="2026-11-01"), Storage(root))
    gen_s = time.perf_counter() - t
    if not summary.skipped:
        print(f"generated {summary.events_written:,} events in {gen_s:.1f}s into {root}")
        if args.file_events:
            n_files = split_landing(Storage(root), args.file_events)
            print(f"landed again as {n_files:,} files of {args.file_events} events")
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
    print(
        f"after: {r['landing_files_after']:,} event files left in landing, the sensor's "
        f"pending_files {r['tick_ms']:.1f} ms ({r['pending_after']} pending), "
        f"ingest state {r['state_kb']:.1f} KB"
    )


if __name__ == "__main__":
    main()

"""What a day of many ingest runs leaves in the warehouse, and what reading it then costs.

The API lands its events as a file every 30 s a worker, and each file starts an ingest run that
adds a part file to each day it writes. This lands `--runs` files of `--file-events` events on
one day, ingesting after each (as the sensor does), then prints the day's part files, the rows
the merges wrote (per event of the day: how often a row was rewritten), the mean time of all
runs and of the last 20, and the time of `read_events` (what training reads) and of
`event_parts` (its listing). `--no-merge` sets `ingest.DAY_PARTS_MAX` out of reach: the
warehouse as it was before days were merged. `--rejects N` adds N rows of an unknown event
type to each file (a client with a steady trickle of bad events): each run then also writes a
part of `rejected_events`, and this prints its parts and the time of the rejects' count (what
the Dagster asset reads each run).

    .venv/bin/python benchmarks/event_parts.py --runs 1000
    .venv/bin/python benchmarks/event_parts.py --runs 1000 --no-merge
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--file-events", type=int, default=100)
    parser.add_argument("--no-merge", action="store_true")
    parser.add_argument("--rejects", type=int, default=0, help="bad rows in each file")
    args = parser.parse_args()

    import polars as pl

    from recsys import ingest
    from recsys.storage import Storage

    if args.no_merge:
        ingest.DAY_PARTS_MAX = 10**9
    with tempfile.TemporaryDirectory(prefix="bench-parts-") as root:
        storage = Storage(root)
        folder = storage.landing_dir("bench", "events")
        storage.makedirs(folder)
        seconds = []
        for n in range(args.runs):
            k, bad = args.file_events, args.rejects
            pl.DataFrame(
                {
                    "user_id": [f"u{n}-{i}" for i in range(k)],
                    "item_id": [f"i{i % 50}" for i in range(k)],
                    "event_type": ["view"] * (k - bad) + ["wishlist"] * bad,
                    "timestamp": [
                        f"2026-10-01T{n * 24 // args.runs:02d}:00:{i % 60:02d}Z" for i in range(k)
                    ],
                }
            ).write_parquet(os.path.join(folder, f"api-{n:06d}.parquet"))
            started = time.perf_counter()
            ingest.ingest_events(storage, "bench")
            seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        parts = ingest.event_parts(storage, "bench")
        list_s = time.perf_counter() - started
        started = time.perf_counter()
        events = ingest.read_events(storage, "bench")
        read_s = time.perf_counter() - started
        on_disk = len(os.listdir(os.path.join(storage.events_dir("bench"), "date=2026-10-01")))
        merges = ingest.load_state(storage, "bench")["events"].get("merges", [])
        events_dir = storage.events_dir("bench")
        written = sum(
            pl.read_parquet(m["new"]).height for m in merges if m["new"].startswith(events_dir)
        )
        print(
            f"{args.runs} runs of {args.file_events} events on one day"
            f"{' (no merge)' if args.no_merge else ''}: {len(parts)} live parts "
            f"({on_disk} files on disk), {events.height:,} events; {len(merges)} merges wrote "
            f"{written:,} rows ({written / events.height:.1f} a row); a run: mean "
            f"{statistics.mean(seconds) * 1000:.1f} ms, of the last 20 "
            f"{statistics.mean(seconds[-20:]) * 1000:.1f} ms; event_parts {list_s * 1000:.1f} ms; "
            f"read_events {read_s * 1000:.1f} ms"
        )
        if args.rejects:
            started = time.perf_counter()
            rejected = ingest.scan_rejected(storage, "bench").select(pl.len()).collect().item()
            count_s = time.perf_counter() - started
            print(
                f"rejected_events: {rejected:,} rows in "
                f"{len(ingest.rejected_parts(storage, 'bench'))} live parts ("
                f"{len(os.listdir(storage.rejected_dir('bench')))} files on disk); their count "
                f"{count_s * 1000:.1f} ms"
            )


if __name__ == "__main__":
    main()

"""What rebuilding the items table costs when the API lands one file per record write
(`recsys.ingest.build_table`, as the `items` asset runs it at every ingest).

A temporary data root; `--files` one-row landing files written the way the CRR records API
writes them (`serving.crr.records.landing_row`: every contract column, as text), round-robin
over `--items` distinct items, then `--feeds` price files of `--feed-rows` rows each
(`item_id,price`: a partial feed, folded by its columns). Prints the wall and CPU time of the
rebuild (`time.process_time`, this process only), the table's size and a digest of its rows
(the same for two versions of the code that fold alike). Then it lands `--then` more API
record files and builds again: the build of an ingest run after a few record writes (the fold
is incremental: it reads the files landed since the last build), and the same build from every
file (`rebuild=True`), with their digests. Last, `recsys.features.catalogue_as_of` (a training
run's point-in-time catalogue) at a cut-off halfway through the record files, with upserts of
`--late` items logged after it: it reads the files that hold those items (the builds record
which ids each file holds). After the
incremental build it prints what the landing sensor costs at each tick (`pending_files`) and
the ingest state's size.

    .venv/bin/python benchmarks/catalogue_build.py --files 2000
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import posixpath
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--feeds", type=int, default=3)
    parser.add_argument("--feed-rows", type=int, default=1000)
    parser.add_argument("--then", type=int, default=20, help="record files landed after")
    parser.add_argument("--late", type=int, default=3, help="items with a value upserted late")
    args = parser.parse_args()

    import polars as pl

    from recsys import ingest
    from recsys.durable import write_parquet_atomic
    from recsys.features import LOG_SCHEMA, catalogue_as_of
    from recsys.storage import Storage
    from serving.crr.records import landing_row

    with tempfile.TemporaryDirectory(prefix="bench-catalogue-") as root:
        storage = Storage(root)
        folder = storage.landing_dir("bench", "items")
        storage.makedirs(folder)
        stamp = time.time() - args.files - args.feeds
        paths = []

        def record_file(n: int) -> str:
            record = {"title": f"Item {n}", "price": float(n % 97), "available": n % 5 != 0}
            row = landing_row("items", f"i{n % args.items:06d}", record)
            path = posixpath.join(folder, f"api-crr-{n:07d}.parquet")
            write_parquet_atomic(row, path, storage.fs, sync=False)
            return path

        for n in range(args.files):
            paths.append(record_file(n))
        for n in range(args.feeds):
            feed = pl.DataFrame(
                {
                    "item_id": [f"i{i:06d}" for i in range(args.feed_rows)],
                    "price": [str(1.0 + n + i % 10) for i in range(args.feed_rows)],
                }
            )
            paths.append(posixpath.join(folder, f"prices-{n}.parquet"))
            write_parquet_atomic(feed, paths[-1], storage.fs, sync=False)
        for i, path in enumerate(paths):  # (landing order: the files' times)
            os.utime(path, (stamp + i, stamp + i))

        def build(**options) -> tuple[float, float, object, object]:
            wall, cpu = time.perf_counter(), time.process_time()
            table, report = ingest.build_table(storage, "bench", "items", **options)
            return time.perf_counter() - wall, time.process_time() - cpu, table, report

        wall, cpu, table, report = build()
        print(
            f"build_table: {len(paths)} files ({args.files} one-row API records, {args.feeds} "
            f"price feeds of {args.feed_rows} rows): {wall:.2f} s wall, {cpu:.2f} s CPU, "
            f"{cpu / len(paths) * 1000:.2f} ms CPU a file; {report.rows} rows, "
            f"{report.rejected} rejected; table digest {table.hash_rows(seed=0).sum()}"
        )
        for n in range(args.files, args.files + args.then):
            record_file(n)
        for label, options in (("then", {}), ("rebuilt", {"rebuild": True})):
            wall, cpu, table, report = build(**options)
            print(
                f"{label}: {args.then} more record files, {report.files_folded} files folded: "
                f"{wall:.2f} s wall, {cpu:.2f} s CPU; table digest {table.hash_rows(seed=0).sum()}"
            )
            if label == "then":  # what the landing sensor does at every tick, and the state
                tick = time.perf_counter()
                pending = ingest.pending_files(storage, "bench", "items")
                print(
                    f"  then the sensor's pending_files: {(time.perf_counter() - tick) * 1000:.1f}"
                    f" ms ({len(storage.landing_files('bench', 'items'))} files in landing, "
                    f"{len(pending)} pending); ingest state "
                    f"{storage.fs.size(storage.ingest_state_path('bench')) / 1024:.1f} KB"
                )
        late_at = dt.datetime.fromtimestamp(stamp + len(paths), dt.UTC)
        ids = [f"i{n:06d}" for n in range(min(args.late, args.items))]
        log = pl.DataFrame(
            {
                "entity_type": ["item"] * len(ids),
                "entity_id": ids,
                "feature": ["price"] * len(ids),
                "value": ["1.5"] * len(ids),
                "event_timestamp": [late_at] * len(ids),
                "created_timestamp": [late_at] * len(ids),
            },
            schema=LOG_SCHEMA,
        )
        cutoff = dt.datetime.fromtimestamp(stamp + args.files / 2, dt.UTC)
        wall, cpu = time.perf_counter(), time.process_time()
        as_of, as_of_report = catalogue_as_of(storage, "bench", "items", table, cutoff, log)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"catalogue_as_of: {len(ids)} items upserted after the cut-off, "
            f"{as_of_report.rows_changed} rows changed, the files holding them read: {wall:.2f} s "
            f"wall, {cpu:.2f} s CPU; table digest {as_of.hash_rows(seed=0).sum()}"
        )


if __name__ == "__main__":
    main()

"""What compacting the item change log costs (`serving.crr.overlay.compact_changes`).

A synthetic snapshot of `--items` items (tenant `bench`) in a temporary data root; `--writes`
changes appended round-robin over `--changed` distinct items (each item's availability
alternating), then half of the changed items set back to what the snapshot serves (the
compaction drops them). Prints the log's lines and bytes before and after, the CPU time of the
compaction (`time.process_time`, this process only), and the CPU time of a worker reading the
log whole before and after (what a new inode costs every worker once).

    .venv/bin/python benchmarks/change_log_compaction.py --items 100000 --writes 200000
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--changed", type=int, default=10_000)
    parser.add_argument("--writes", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from recsys.snapshot import SnapshotStore, open_snapshot
    from recsys.snapshot.synthetic import build_synthetic_snapshot
    from serving.crr import overlay

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-changes-") as root:
        store = SnapshotStore(os.path.join(root, "snapshots", "bench"))
        tmp = store.new_tmp_dir()
        build_synthetic_snapshot(tmp, 1000, args.items, n=20, tenant="bench", write_parquet=False)
        store.publish(tmp, checksums=False)
        snap = open_snapshot(store.current())
        serving = os.path.join(root, "serving")
        changed = [snap.item_id(i) for i in rng.sample(range(args.items), args.changed)]
        overlay.COMPACT_BYTES = 1 << 62  # (no compaction while the log is written)
        batch = []
        for n in range(args.writes):
            item = changed[n % len(changed)]
            available = (n // len(changed)) % 2 == 0  # (each item's writes alternate)
            batch.append({"id": item, "ts": str(n), "available": available})
            if len(batch) == 1000:
                overlay.append_changes(serving, "bench", batch)
                batch = []
        overlay.append_changes(serving, "bench", batch)
        # the last write of half the items: what the snapshot serves (dropped by compaction)
        back = [
            {"id": item, "ts": "end", "available": bool(snap.available[snap.item_index(item)])}
            for item in changed[: len(changed) // 2]
        ]
        overlay.append_changes(serving, "bench", back)
        path = overlay.changes_path(serving, "bench")

        def reread() -> float:
            reader = overlay._TenantChanges(path)
            t0 = time.process_time()
            reader.poll()
            return time.process_time() - t0

        before_bytes = os.path.getsize(path)
        read_before = reread()
        t0 = time.process_time()
        lines_before, lines_after = overlay.compact_changes(serving, "bench")
        cpu = time.process_time() - t0
        after_bytes = os.path.getsize(path)
        read_after = reread()
        print(
            f"items {args.items:,}, changed {args.changed:,}, writes {args.writes:,}: "
            f"log {lines_before:,} lines / {before_bytes:,} B -> {lines_after:,} lines / "
            f"{after_bytes:,} B; compaction {cpu * 1e3:.1f} ms CPU; a worker's whole re-read "
            f"{read_before * 1e3:.1f} ms CPU before, {read_after * 1e3:.1f} ms after"
        )


if __name__ == "__main__":
    main()

"""Build a large synthetic snapshot and report build time, size on disk, peak memory, open time.

    .venv/bin/python benchmarks/snapshot_build.py [--users 1000000] [--items 100000] [--out DIR]

Peak memory is the process high-water mark (ru_maxrss / VmHWM) and the Python-heap peak
(tracemalloc is too slow at this size, so NumPy's allocations are measured through VmHWM).
It is bounded by the shard size plus O(n_users) small arrays (ids, per-user counts), not by the
number of candidates.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time

import numpy as np

from recsys.snapshot import SnapshotStore, open_snapshot
from recsys.snapshot.synthetic import build_synthetic_snapshot


def _vm_hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_usage(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument(
        "--no-parquet", action="store_true", help="skip the analyst Parquet/DuckDB copies"
    )
    p.add_argument(
        "--out", help="snapshots folder to publish into (kept); default a temp dir (removed)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    root = args.out or tempfile.mkdtemp(prefix="snapbench-")
    store = SnapshotStore(root, keep=2)
    tmp = store.new_tmp_dir()
    base_mb = _vm_hwm_mb()
    t0 = time.perf_counter()
    manifest = build_synthetic_snapshot(
        tmp,
        args.users,
        args.items,
        n=args.n,
        seed=args.seed,
        shard_size=args.shard_size,
        write_parquet=not args.no_parquet,
    )
    t_build = time.perf_counter() - t0
    peak_mb = _vm_hwm_mb()
    t0 = time.perf_counter()
    sid = store.publish(tmp)
    t_publish = time.perf_counter() - t0
    path = store.current()
    assert path is not None
    size = disk_usage(path)
    npy = sum(f["bytes"] for rel, f in manifest["files"].items() if rel.endswith(".npy"))

    t0 = time.perf_counter()
    snap = open_snapshot(path)
    t_open = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    ids = [snap.user_id(int(u)) for u in rng.integers(0, snap.n_users, 10_000)]
    t0 = time.perf_counter()
    for uid in ids:
        u = snap.user_index(uid)
        snap.user_candidates(u)
    t_lookup = (time.perf_counter() - t0) / len(ids)

    print(
        f"snapshot {sid}: {args.users:,} users x {args.items:,} items, n={args.n}, "
        f"shard={args.shard_size:,}, parquet={'no' if args.no_parquet else 'yes'}"
    )
    print(f"  build            {t_build:8.1f} s  ({args.users / t_build:,.0f} users/s)")
    print(f"  publish (verify) {t_publish:8.1f} s  (sha256 of every file, open, rename, CURRENT)")
    print(f"  size on disk     {size / 2**30:8.2f} GiB  (serving .npy {npy / 2**30:.2f} GiB)")
    print(f"  peak memory      {peak_mb:8.0f} MiB  (VmHWM; {base_mb:.0f} MiB before building)")
    print(f"  open_snapshot    {t_open * 1e3:8.1f} ms")
    print(f"  lookup+cands     {t_lookup * 1e6:8.1f} us per user (id -> index -> candidates)")
    snap.close()
    if not args.out:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()

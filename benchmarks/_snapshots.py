"""Build (or reuse) the synthetic benchmark snapshot: 1M users, 100k items, N=200."""

from __future__ import annotations

import os
import time

from recsys.snapshot import SnapshotStore
from recsys.snapshot.synthetic import build_synthetic_snapshot

TENANT = "bench"


def ensure_snapshot(
    data_root: str, n_users: int = 1_000_000, n_items: int = 100_000, n: int = 200, seed: int = 0
) -> str:
    """Publish a synthetic snapshot under `<data_root>/snapshots/bench` unless one of this size is
    already current; returns the current snapshot id."""
    store = SnapshotStore(os.path.join(data_root, "snapshots", TENANT), keep=3)
    for info in store.list():
        if (
            info.is_current
            and info.counts.get("users") == n_users
            and info.counts.get("items") == n_items
        ):
            return info.snapshot_id
    t = time.perf_counter()
    tmp = store.new_tmp_dir()
    build_synthetic_snapshot(
        tmp, n_users, n_items, n=n, seed=seed, tenant=TENANT, write_parquet=False
    )
    sid = store.publish(tmp, checksums=False)
    print(
        f"built snapshot {sid} ({n_users} users x {n_items} items, N={n}) "
        f"in {time.perf_counter() - t:.0f} s",
        flush=True,
    )
    return sid


if __name__ == "__main__":
    import sys

    print(ensure_snapshot(sys.argv[1] if len(sys.argv) > 1 else "data/bench"))

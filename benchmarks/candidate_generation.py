"""CPU time of candidate generation for the history-times-similarity generators
(co-occurrence, recent): the sparse selection (`recsys.models.topk.sparse_top_k`, what
`build_candidates` uses) against the dense users x items block it replaced, same process,
interleaved, on the demo data.

    .venv/bin/python benchmarks/candidate_generation.py [--events 1000000] [--batch 2048]

Prints the CPU seconds per 1,000 users of each path (the best of `--repeats` interleaved
rounds: process CPU time, so a loaded machine stretches both alike) and checks that both
answer the same top lists.
"""

from __future__ import annotations

import argparse
import glob
import tempfile
import time

import numpy as np
import polars as pl

from recsys.demo import DemoSpec, generate
from recsys.models.base import mask_rows
from recsys.models.cooccurrence import CooccurrenceRecommender
from recsys.models.data import build_dataset
from recsys.models.recent import RecentItemsRecommender
from recsys.models.topk import sparse_top_k, top_k
from recsys.storage import Storage
from recsys.validation import validate_events, validate_items


def demo_dataset(events: int):
    store = Storage(tempfile.mkdtemp(prefix="recsys-cands-"))
    generate(DemoSpec(events=events, seed=42), store)
    land = store.path("landing", "default")
    raw = pl.concat([pl.read_parquet(p) for p in sorted(glob.glob(f"{land}/events/*.parquet"))])
    ev, _ = validate_events(raw, tenant="default", source="demo")
    it, _ = validate_items(
        pl.concat([pl.read_parquet(p) for p in glob.glob(f"{land}/items/*.parquet")]),
        source="demo",
    )
    return build_dataset(ev, it)


def dense(model, users, seen_rows, unavailable_idx, n):
    s = model.score(users)
    mask_rows(s, seen_rows, np.arange(len(users)))
    s[:, unavailable_idx] = -np.inf
    return top_k(s, n)


def sparse(model, users, seen_rows, unavailable, n):
    return sparse_top_k(model.sparse_scores(users), n, seen_rows, unavailable)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--candidates", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    data = demo_dataset(args.events)
    print(f"demo {args.events:,} events: {data.n_users:,} users x {data.n_items:,} items")
    unavailable = np.zeros(data.n_items, bool)
    users = np.arange(min(args.batch, data.n_users))
    for model in (CooccurrenceRecommender(), RecentItemsRecommender()):
        model.fit(data)
        seen_rows = model.seen_[users]
        a = dense(model, users, seen_rows, np.flatnonzero(unavailable), args.candidates)
        b = sparse(model, users, seen_rows, unavailable, args.candidates)
        same = np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        best = {"dense": np.inf, "sparse": np.inf}
        for _ in range(args.repeats):
            for name, fn, mask in (
                ("dense", dense, np.flatnonzero(unavailable)),
                ("sparse", sparse, unavailable),
            ):
                t = time.process_time()
                fn(model, users, seen_rows, mask, args.candidates)
                best[name] = min(best[name], time.process_time() - t)
        per_k = {k: v / len(users) * 1000 for k, v in best.items()}
        print(
            f"{model.name:>13}: dense {per_k['dense']:.3f} s, sparse {per_k['sparse']:.3f} s "
            f"CPU per 1,000 users ({per_k['dense'] / per_k['sparse']:.1f}x); same lists: {same}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

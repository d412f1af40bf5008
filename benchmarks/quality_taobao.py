"""Offline quality on the Taobao UserBehavior sample, and what event weights change.

    .venv/bin/python benchmarks/quality_taobao.py [--data ../shared/data/taobao-sample/...csv]

Prints the evaluation table with the contract's weights (purchase 8, cart 4, fav 3, view 1),
then fits the same model with every event weighing 1 and compares the served lists: their
overlap@10, and where items the user went on to buy (test purchases) rank in each.
"""

import argparse
import os
import sys
import time
from dataclasses import replace

import numpy as np
import polars as pl

from recsys.adapters import taobao_userbehavior
from recsys.evaluation.evaluate import print_table
from recsys.evaluation.metrics import hit_rate_at_k, ndcg_at_k
from recsys.evaluation.offline import evaluate_offline
from recsys.models.data import holdout_pairs
from recsys.models.hybrid import HybridConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "..", "shared", "data", "taobao-sample", "UserBehavior_head84475.csv")
EQUAL = {"view": 1.0, "click": 1.0, "like": 1.0, "add_to_cart": 1.0, "purchase": 1.0, "rating": 1.0}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DEFAULT)
    args = ap.parse_args()
    if not os.path.exists(args.data):
        print(f"Taobao sample not found at {args.data}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    events, items = taobao_userbehavior(args.data)
    print(
        f"{events.height:,} events, {events['user_id'].n_unique()} users, "
        f"{events['item_id'].n_unique():,} items"
    )
    base = HybridConfig()
    weighted = evaluate_offline(events, items, config=base)
    print("\n== contract weights (purchase 8, cart 4, like 3, view 1) ==")
    print_table(weighted.table)
    equal = evaluate_offline(events, items, config=replace(base, weights=EQUAL))
    print("\n== every event weighs 1 ==")
    print_table(equal.table)

    # Same test users in both runs (the split and the train users do not depend on weights).
    hw, he = weighted.holdout, equal.holdout
    assert np.array_equal(weighted.model.user_ids_[hw.user_idx], equal.model.user_ids_[he.user_idx])
    lw, le = weighted.lists["served"][:, :10], equal.lists["served"][:, :10]
    ids_w = weighted.model.item_ids_[np.maximum(lw, 0)]
    ids_e = equal.model.item_ids_[np.maximum(le, 0)]
    overlap = np.mean(
        [
            len(set(a[x >= 0]) & set(b[y >= 0])) / 10
            for a, b, x, y in zip(ids_w, ids_e, lw, le, strict=True)
        ]
    )
    print(f"\nserved overlap@10 between weighted and equal-weight lists: {overlap:.3f}")

    # Purchases in the test period, per the protocol (known user and item, not seen in train).
    train, test = weighted.split.train, weighted.split.test
    buys = holdout_pairs(train, test.filter(pl.col("event_type") == "purchase"))
    for name, res in (("weighted", weighted), ("equal", equal)):
        u = res.model.user_index(buys["user_id"].to_list())
        i = res.model.item_index(buys["item_id"].to_list())
        pos = {int(x): p for p, x in enumerate(res.holdout.user_idx)}
        rows = [pos[x] for x in u if int(x) in pos]
        rel = [
            np.array([ii for uu, ii in zip(u, i, strict=True) if uu == res.holdout.user_idx[r]])
            for r in sorted(set(rows))
        ]
        lists = res.lists["served"][sorted(set(rows))]
        print(
            f"{name:>8}: test purchases {len(buys)} by {len(rel)} users; purchased items in served "
            f"top-20 HitRate {hit_rate_at_k(lists, rel, 20).mean():.3f}, "
            f"NDCG@10 {ndcg_at_k(lists, rel, 10).mean():.4f}"
        )
    print(f"total {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

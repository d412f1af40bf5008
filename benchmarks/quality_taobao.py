"""Served quality on the Taobao UserBehavior sample through the product's own path.

    .venv/bin/python benchmarks/quality_taobao.py [--data ../shared/data/taobao-sample/...csv]
        [--seeds 1,2,3]

Per seed: the older 80 % of the events (and the items with their categories) are imported,
one Dagster run of ``recsys_pipeline`` publishes a snapshot, and the snapshot's lists are
scored on the newest 20 % with the protocol of shared/data/README.md, next to popularity and
EASE fitted on the same train split. Prints what the pipeline chose to serve and the
validation figures it chose on. What each recency signal is worth on validation:
``benchmarks/quality_signals.py --data taobao``.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _product_path import evaluate_product_path, reference_baselines, summarize  # noqa: E402

from recsys.adapters import taobao_userbehavior  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, "..", "shared", "data", "taobao-sample", "UserBehavior_head84475.csv")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DEFAULT)
    ap.add_argument("--seeds", default="1,2,3")
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
    refs = reference_baselines(events, items)
    print("references on the same split: " + ", ".join(f"{k} {v:.4f}" for k, v in refs.items()))
    scores = []
    for seed in (int(s) for s in args.seeds.split(",")):
        s = evaluate_product_path(events, items, None, seed)
        scores.append(s)
        print(
            f"seed {seed}: served NDCG@10 {s.ndcg:.4f} [{s.ndcg_low:.4f}, {s.ndcg_high:.4f}] "
            f"Recall@10 {s.recall:.4f}, {s.users} test users, served by {s.served_by} "
            f"({s.selection.get('reason')}), pipeline {s.seconds:.0f}s; validation NDCG@10 "
            f"{s.selection.get('validation_ndcg@10')}",
            flush=True,
        )
    print(summarize(scores))
    best = max(refs.values())
    mean = sum(s.ndcg for s in scores) / len(scores)
    print(f"served / best reference: {mean / best:.3f}")
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

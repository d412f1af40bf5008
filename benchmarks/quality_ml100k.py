"""Offline quality on MovieLens 100K with the protocol of shared/data/README.md.

    .venv/bin/python benchmarks/quality_ml100k.py [--data ../shared/data/ml-100k] [--plot out.png]

Prints the whole table (metric [95% bootstrap CI]) and checks the served list against
1.05 x max(EASE, popularity) NDCG@10. Hyperparameters are chosen on the validation window
inside train only; the test window is scored once.
"""

import argparse
import json
import os
import sys
import time

from recsys.adapters import movielens_100k
from recsys.evaluation.evaluate import plot_table, print_table
from recsys.evaluation.offline import evaluate_offline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "ml-100k"))
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    if not os.path.isdir(args.data):
        print(f"ml-100k not found at {args.data}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    events, items, users = movielens_100k(args.data)
    result = evaluate_offline(events, items, users)
    table = result.table
    print_table(table)
    ndcg = dict(zip(table["model"], table["NDCG@10"], strict=True))
    bar = 1.05 * max(ndcg["EASE"], ndcg["popularity"])
    print(f"\ntest users {result.holdout.n_users}, test pairs {result.holdout.n_pairs}")
    print(
        f"served NDCG@10 {ndcg['served']:.4f} vs target 1.05 x max(EASE, popularity) = {bar:.4f}: "
        f"{'PASS' if ndcg['served'] >= bar else 'FAIL'} "
        f"(ratio {ndcg['served'] / max(ndcg['EASE'], ndcg['popularity']):.3f})"
    )
    info = {
        k: v
        for k, v in result.model.info.items()
        if k
        in (
            "tuning",
            "lightfm_early_stopping",
            "candidate_recall",
            "ranker_rows",
            "ranker_positives",
            "ranker_trees",
        )
    }
    print("chosen on validation:", json.dumps(info, default=str))
    print(f"total {time.perf_counter() - t0:.1f}s")
    if args.plot:
        plot_table(table, args.plot)
        print("plot:", args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Served quality on MovieLens 100K through the product's own path, over several seeds.

    .venv/bin/python benchmarks/quality_ml100k.py [--data ../shared/data/ml-100k]
        [--seeds 1,2,3,4,5] [--keep]

For each seed: the older 80 % of the ratings (plus u.item and u.user) are imported into a
fresh data root as landing files, one Dagster run of ``recsys_pipeline`` ingests, trains,
evaluates, gates and publishes, and the published snapshot's lists (what the API serves) are
scored on the newest 20 % with the protocol of shared/data/README.md. The pipeline chooses
everything on its own validation window inside the imported data; the test window is scored
once per seed. Prints each seed's NDCG@10 with the users' 95 % bootstrap interval, what the
pipeline chose to serve, and the mean and spread over seeds against the target
1.10 x the best reference (LightFM 0.186 -> 0.205).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _product_path import evaluate_product_path, reference_baselines, summarize  # noqa: E402

from recsys.adapters import movielens_100k  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEST_REFERENCE = 0.186  # LightFM WARP, shared/data/README.md


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(ROOT, "..", "shared", "data", "ml-100k"))
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--keep", action="store_true", help="keep each run's data root")
    args = ap.parse_args()
    if not os.path.isdir(args.data):
        print(f"ml-100k not found at {args.data}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    events, items, users = movielens_100k(args.data)
    refs = reference_baselines(events, items)
    print("references on the same split: " + ", ".join(f"{k} {v:.4f}" for k, v in refs.items()))
    scores = []
    for seed in (int(s) for s in args.seeds.split(",")):
        s = evaluate_product_path(events, items, users, seed, keep=args.keep)
        scores.append(s)
        print(
            f"seed {seed}: served NDCG@10 {s.ndcg:.4f} [{s.ndcg_low:.4f}, {s.ndcg_high:.4f}] "
            f"Recall@10 {s.recall:.4f}, {s.users} test users, served by {s.served_by}, "
            f"pipeline {s.seconds:.0f}s; LightFM epochs {s.selection.get('lightfm_epochs')}, "
            f"grids {s.selection.get('tuning')}; validation NDCG@10 "
            f"{s.selection.get('validation_ndcg@10')}",
            flush=True,
        )
    print(summarize(scores))
    mean = sum(s.ndcg for s in scores) / len(scores)
    target = 1.10 * BEST_REFERENCE
    print(
        f"target 1.10 x {BEST_REFERENCE} = {target:.3f}: {'PASS' if mean >= target else 'FAIL'} "
        f"(ratio {mean / BEST_REFERENCE:.3f})"
    )
    print(f"total {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

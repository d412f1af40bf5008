"""What each recency signal (and LightFM's early stopping) is worth, on validation only.

    .venv/bin/python benchmarks/quality_signals.py [--data ml-100k|taobao] [--seeds 1,2]

The protocol's train part (the older 80 %) of the data set is fitted with the pipeline's
configuration (``pipelines.training.config.TrainingConfig`` through ``hybrid_config``'s
library calls: the tuning grids, early stopping, the ranker), once per variant:

* ``full``: every generator and feature;
* ``-recent``: without the recent-items generator;
* ``-recency features``: without the ranker's recency features;
* ``-early stopping``: LightFM runs its maximum epoch count;
* ``candidates 50`` / ``candidates 30``: each generator proposes its top 50 / 30 to the
  ranker instead of 100 (the rows the ranker learns on and scores per user).

Each fit measures, on ITS validation window (the newest 20 % of train), the NDCG@10 of
every generator's own list and of the ranked list (cross-fitted over users, see
``recsys.models.hybrid.train_ranker``): the figures ``choose_served`` decides on. The test
window is never looked at. Prints one row per variant and seed, then the mean over seeds.
"""

import argparse
import os
import sys
import time
from dataclasses import replace

import numpy as np

from recsys.adapters import movielens_100k, taobao_userbehavior
from recsys.models.data import temporal_split
from recsys.models.hybrid import GENERATORS, HybridConfig, HybridRecommender

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "..", "shared", "data")


def pipeline_config() -> HybridConfig:
    """The HybridConfig train_models builds from the default run configuration."""
    from pipelines.training.config import SplitConfig, TrainingConfig

    t, split = TrainingConfig(), SplitConfig()
    return HybridConfig(
        validation_fraction=split.validation_fraction,
        include_catalog_items=False,
        tune={
            "ease": [{"l2": v} for v in t.tune.ease_l2],
            "cooccurrence": [{"shrink": v} for v in t.tune.cooccurrence_shrink],
        },
        tune_max_users=t.tune.max_users,
        recent=t.recent.model_dump(),
        lightfm=t.lightfm.model_dump(exclude={"early_stopping", "eval_every", "patience"}),
        lightfm_early_stopping={
            "eval_every": t.lightfm.eval_every,
            "patience": t.lightfm.patience,
            "max_users": 1000,
        },
    )


VARIANTS = {
    "full": {},
    "-recent": {"generators": [g for g in GENERATORS if g != "recent"]},
    "-recency features": {"recency_features": False},
    "-early stopping": {"lightfm_early_stopping": None},
    # the ranker's candidate set (each generator's top n): its cost per served user grows with n
    "candidates 50": {"candidates_per_generator": 50},
    "candidates 30": {"candidates_per_generator": 30},
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", choices=["ml-100k", "taobao"], default="ml-100k")
    ap.add_argument("--seeds", default="1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument(
        "--within",
        action="store_true",
        help="fit the older 80%% of train (what the pipeline's evaluated model sees when "
        "the older 80%% is imported, as the quality benchmarks do)",
    )
    args = ap.parse_args()
    if args.data == "ml-100k":
        events, items, users = movielens_100k(os.path.join(DATA, "ml-100k"))
    else:
        path = os.path.join(DATA, "taobao-sample", "UserBehavior_head84475.csv")
        (events, items), users = taobao_userbehavior(path), None
    train = temporal_split(events, 0.2).train  # the test window is never used here
    if args.within:
        train = temporal_split(train, 0.2).train
    base = pipeline_config()
    rows = {}
    for name in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = replace(
                base,
                **VARIANTS[name],
                seed=seed,
                lightfm={**base.lightfm, "seed": seed},
            )
            t0 = time.perf_counter()
            model = HybridRecommender(cfg).fit(train, items, users)
            sel = model.info["selection"]
            figures = sel.get("validation_ndcg@10", {})
            rows.setdefault(name, []).append(figures)
            epochs = (model.info.get("lightfm_early_stopping") or {}).get("epochs", "max")
            print(
                f"{args.data} {name:<18} seed {seed}: serves {sel['served']:<8} "
                + " ".join(f"{g} {v:.4f}" for g, v in figures.items())
                + f" | {sel.get('validation_users')} users, LightFM epochs {epochs},"
                f" {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
    print(f"\nmean validation NDCG@10 over seeds {args.seeds} ({args.data}):")
    for name, figs in rows.items():
        keys = figs[0].keys()
        print(
            f"  {name:<18} "
            + " ".join(f"{g} {np.mean([f[g] for f in figs]):.4f}" for g in keys if g)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

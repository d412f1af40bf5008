"""One call from events to the evaluation table: split, fit everything on train, score test."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl

from recsys.evaluation.evaluate import Holdout, build_holdout, evaluation_table
from recsys.models.data import TemporalSplit, temporal_split
from recsys.models.hybrid import HybridConfig, HybridRecommender

#: Rows of the evaluation table: generator name in the hybrid -> row label.
TABLE_ROWS: dict[str, str] = {
    "popularity": "popularity",
    "ease": "EASE",
    "cooccurrence": "cooc",
    "lightfm": "lightfm",
    "recent": "recent",
}
SERVED = "served"


@dataclass
class OfflineResult:
    """The table plus what produced it."""

    table: pl.DataFrame
    holdout: Holdout
    split: TemporalSplit
    model: HybridRecommender
    lists: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: float = 0.0


def evaluate_offline(
    events: pl.DataFrame,
    items: pl.DataFrame | None = None,
    users: pl.DataFrame | None = None,
    config: HybridConfig | None = None,
    test_fraction: float = 0.2,
    n_resamples: int = 1000,
    seed: int = 0,
) -> OfflineResult:
    """The protocol of shared/data/README.md on `events`: fit the hybrid (generators + ranker,
    tuned only on its own validation window inside train) on the oldest 1 - `test_fraction`,
    and score every generator and the served list on the test period.

    The catalog is the items seen in train (test pairs on other items are dropped anyway).
    """
    t0 = time.perf_counter()
    config = replace(config or HybridConfig(), include_catalog_items=False)
    split = temporal_split(events, test_fraction)
    train = split.train
    model = HybridRecommender(config).fit(train, items, users)
    table, holdout, lists = evaluate_fitted(model, train, split.test, n_resamples, seed)
    return OfflineResult(table, holdout, split, model, lists, time.perf_counter() - t0)


def evaluate_fitted(
    model: HybridRecommender,
    train: pl.DataFrame | pl.LazyFrame,
    test: pl.DataFrame | pl.LazyFrame,
    n_resamples: int = 1000,
    seed: int = 0,
) -> tuple[pl.DataFrame, Holdout, dict[str, np.ndarray]]:
    """The table for a hybrid already fitted on `train`: one row per generator plus ``served``.

    The table is empty when the test period has no usable positives (too little data).
    `train` and `test` may be lazy scans (`recsys.models.data.temporal_split_scan`): only the
    held-out pairs are read from them (`recsys.models.data.holdout_pairs`).
    """
    holdout = build_holdout(model, train, test, model.config.weights)
    lists: dict[str, np.ndarray] = {}
    if holdout.n_users == 0:
        return pl.DataFrame(), holdout, lists
    from recsys.models.hybrid import rank_lists
    from recsys.models.serve import serve_top_n

    # one scoring pass gives the served lists and every generator's own list, with the same
    # exclusions (seen and unavailable items)
    per_generator: dict[str, np.ndarray] = {}
    served = serve_top_n(model, holdout.user_idx, 20, generator_lists=per_generator)
    for gen, label in TABLE_ROWS.items():
        if gen in per_generator:
            lists[label] = per_generator[gen]
    lists[SERVED], _ = rank_lists(
        served.user_pos, served.item_idx, served.final_score, holdout.n_users, 20
    )
    pop = model.generators_["popularity"].pop_
    return (
        evaluation_table(lists, holdout, len(model.item_ids_), pop, n_resamples, seed),
        holdout,
        lists,
    )

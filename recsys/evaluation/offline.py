"""One call from events to the evaluation table: split, fit everything on train, score test."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import polars as pl

from recsys.evaluation.evaluate import Holdout, MetricsFold, build_holdout
from recsys.models.data import TemporalSplit, temporal_split
from recsys.models.hybrid import HybridConfig, HybridRecommender, rank_lists
from recsys.models.serve import ServedLists, map_served_batches

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
    table, holdout, lists = evaluate_fitted(
        model, train, split.test, n_resamples, seed, keep_lists=True
    )
    return OfflineResult(table, holdout, split, model, lists or {}, time.perf_counter() - t0)


#: Test users scored (and folded into the metrics) per batch.
SCORE_BATCH = 256


def evaluate_fitted(
    model: HybridRecommender,
    train: pl.DataFrame | pl.LazyFrame,
    test: pl.DataFrame | pl.LazyFrame,
    n_resamples: int = 1000,
    seed: int = 0,
    keep_lists: bool = False,
) -> tuple[pl.DataFrame, Holdout, dict[str, np.ndarray] | None]:
    """The table for a hybrid already fitted on `train`: one row per generator plus ``served``,
    and its holdout; with `keep_lists`, also every test user's top-20 of each row's model
    (``None`` without: they are not held).

    The table is empty when the test period has no usable positives (too little data).
    `train` and `test` may be lazy scans (`recsys.models.data.temporal_split_scan`): only the
    held-out pairs are read from them (`recsys.models.data.holdout_pairs`). Each batch of
    test users is folded into the per-user metrics as soon as it is scored
    (:class:`~recsys.evaluation.evaluate.MetricsFold`, in the scoring threads): memory holds
    the metric values and top 10s of every test user, not their lists, and the table is the
    same, bit for bit.
    """
    holdout = build_holdout(model, train, test, model.config.weights)
    if holdout.n_users == 0:
        return pl.DataFrame(), holdout, {} if keep_lists else None
    names = [label for g, label in TABLE_ROWS.items() if g in model.generators_] + [SERVED]
    pop = model.generators_["popularity"].pop_
    fold = MetricsFold(names, holdout.n_users, len(model.item_ids_), pop)

    def fold_batch(start: int, served: ServedLists, tops: dict[str, np.ndarray]):
        # one scoring pass gives the served lists and every generator's own list, with the
        # same exclusions (seen and unavailable items)
        n = min(SCORE_BATCH, holdout.n_users - start)
        lists = {label: tops[g] for g, label in TABLE_ROWS.items() if g in tops}
        lists[SERVED], _ = rank_lists(
            served.user_pos - start, served.item_idx, served.final_score, n, 20
        )
        fold.add(start, lists, holdout.relevant[start : start + n])
        return lists if keep_lists else None

    kept = map_served_batches(
        model, holdout.user_idx, fold_batch, 20, SCORE_BATCH, generator_lists=True
    )
    table = fold.table(n_resamples, seed)
    if not keep_lists:
        return table, holdout, None
    return table, holdout, {name: np.concatenate([b[name] for b in kept]) for name in names}

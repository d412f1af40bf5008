"""Feature importance of the hybrid's second-stage ranker: split gains and permutation importance.

* `gain_importance`: per feature, the summed split gain of a trained LightGBM booster's trees
  (those it predicts with), as a share of the total (taken at fit time: the exported
  `TreeEnsemble` keeps no gains).
* `permutation_importance`: per feature, how much the mean NDCG@10 of the ranked lists falls
  when that feature's column is shuffled across the candidate rows of held-out users (seeded),
  the users' held-out items being the relevant ones. Measured on the evaluation window: the
  ranker of the model fitted on the train part, scored on the users of the test part.

`feature_importance` joins both into the document the training run logs to MLflow
(``model/feature_importance.json``) and the API serves.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

FILE = "feature_importance.json"


def gain_importance(booster: Any, feature_names: tuple[str, ...]) -> dict[str, float]:
    """Share of the total split gain per feature (0 for features never split on)."""
    total = np.asarray(
        booster.feature_importance(
            importance_type="gain", iteration=booster.best_iteration or None
        ),
        dtype=np.float64,
    )
    if len(total) != len(feature_names):
        raise ValueError(f"{len(total)} features in the booster, {len(feature_names)} named")
    s = float(total.sum())
    return {
        name: (float(g) / s if s > 0 else 0.0) for name, g in zip(feature_names, total, strict=True)
    }


def permutation_importance(
    model: Any,
    train: pl.DataFrame | pl.LazyFrame,
    test: pl.DataFrame | pl.LazyFrame,
    seed: int = 0,
    max_users: int = 500,
    repeats: int = 2,
) -> dict[str, Any] | None:
    """NDCG@10 drop per shuffled feature for `model`'s ranker on the test window's users (at most
    `max_users`, a seeded sample); None when the model has no ranker or no such users.

    Each shuffled copy is scored from what the rows share (`TreeEnsemble.column_permutations`:
    only the trees splitting on the shuffled feature are evaluated again), two at a time; the
    figures are those of scoring each shuffled copy whole (tested). On the 1M demo (500 users,
    188k candidate rows, 30 features x 2 repeats): 16.5-19.0 s CPU that way, 10.7-12.2 s so."""
    from recsys.evaluation.evaluate import build_holdout
    from recsys.evaluation.metrics import ndcg_at_k
    from recsys.models.hybrid import FEATURE_NAMES, build_candidates, rank_lists
    from recsys.models.threads import map_in_threads

    ranker = getattr(model, "ranker_", None)
    if ranker is None:
        return None
    holdout = build_holdout(model, train, test, model.config.weights)
    if holdout.n_users == 0:
        return None
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(holdout.n_users)[:max_users])
    users = holdout.user_idx[pick]
    relevant = [holdout.relevant[i] for i in pick]
    xs, ps, its = [], [], []
    for start in range(0, len(users), 256):  # (batches, as the ranker's training builds them)
        cand = build_candidates(
            model.generators_,
            model.side_,
            model.seen_,
            users[start : start + 256],
            model.config.candidates_per_generator,
        )
        rows = cand.feature_rows
        ps.append((cand.user_pos if rows is None else cand.user_pos[rows]) + start)
        its.append(cand.item_idx if rows is None else cand.item_idx[rows])
        xs.append(cand.features)
    x, pos, items = np.concatenate(xs), np.concatenate(ps), np.concatenate(its)
    x[:, np.isnan(x).all(axis=0)] = 0.0  # (as the ranker's training rows)

    def score(margins: np.ndarray) -> float:
        proba = 1.0 / (1.0 + np.exp(-margins))  # (TreeEnsemble.predict_proba)
        lists, _ = rank_lists(pos, items, proba, len(users), 10)
        return float(np.mean(ndcg_at_k(lists, relevant, 10)))

    # the shuffles drawn in the plain loop's order (rng.permutation(column) moves the values
    # as rng.permutation(len(column)) orders them), then scored a feature's repeats at a
    # time, two features at once, from what the rows and the repeats share
    # (TreeEnsemble.column_permutations: the margins of each shuffled copy)
    permuted = ranker.column_permutations(x)
    base = score(permuted.base)
    tasks = [
        (j, [rng.permutation(len(x)) for _ in range(repeats)]) for j in range(len(FEATURE_NAMES))
    ]
    scores = map_in_threads(lambda task: [score(m) for m in permuted.margins_of_each(*task)], tasks)
    drops: dict[str, list[float]] = {
        FEATURE_NAMES[j]: [base - value for value in values]
        for (j, _), values in zip(tasks, scores, strict=True)
    }
    return {
        "metric": "NDCG@10",
        "baseline": base,
        "users": len(users),
        "rows": int(len(x)),
        "repeats": repeats,
        "seed": seed,
        "drop": {n: float(np.mean(d)) for n, d in drops.items()},
        "drop_sd": {n: float(np.std(d)) for n, d in drops.items()},
    }


def feature_importance(
    gain: dict[str, float] | None, permutation: dict[str, Any] | None
) -> dict[str, Any]:
    """The logged document: one row per feature (sorted by gain), plus both measurements."""
    from recsys.models.hybrid import FEATURE_NAMES

    gain = gain or {}
    drop = (permutation or {}).get("drop", {})
    rows = [
        {"name": n, "gain": gain.get(n), "permutation_drop": drop.get(n)} for n in FEATURE_NAMES
    ]
    rows.sort(key=lambda r: -(r["gain"] or 0.0))
    return {
        "features": rows,
        "gain": {
            "what": "share of the total split gain of the served ranker's trees (at fit time)",
            "values": gain,
        },
        "permutation": {
            "what": "mean NDCG@10 drop when the feature is shuffled across candidate rows of "
            "test-window users, ranker of the model fitted on the train window",
            **(permutation or {"rows": 0}),
        },
    }

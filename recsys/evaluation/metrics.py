"""Ranking metrics as plain functions over per-user arrays, plus a seeded bootstrap CI.

Per-user metrics take ``recommended`` (n_users, k) item indices, best first (-1 = empty slot),
and ``relevant`` as a list of per-user arrays of relevant item indices; they return one value
per user, so the mean and its bootstrap CI come from the same numbers. Users without relevant
items must be left out by the caller (the protocol evaluates only users with test positives).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


def hits_matrix(recommended: np.ndarray, relevant: Sequence[np.ndarray]) -> np.ndarray:
    """Boolean (n_users, k): is the item at each rank relevant to that user."""
    recommended = np.asarray(recommended)
    n, k = recommended.shape
    lens = np.array([len(r) for r in relevant], dtype=np.int64)
    if n == 0 or k == 0 or lens.sum() == 0:
        return np.zeros((n, k), dtype=bool)
    # encode (user, item) as one int64 and test membership in one vectorized call
    rel_items = np.concatenate([np.asarray(r, np.int64) for r in relevant])
    width = int(max(recommended.max(initial=0), rel_items.max(initial=0))) + 2
    rel_codes = np.repeat(np.arange(n), lens) * width + rel_items
    rec_codes = np.arange(n)[:, None] * width + recommended.astype(np.int64)
    out = np.isin(rec_codes, rel_codes)
    return out & (recommended >= 0)


def _n_relevant(relevant: Sequence[np.ndarray]) -> np.ndarray:
    """Distinct relevant items per user (one vectorized unique, not one per user)."""
    lens = np.array([len(r) for r in relevant], dtype=np.int64)
    if lens.sum() == 0:
        return lens.astype(np.float64)
    items = np.concatenate([np.asarray(r, np.int64) for r in relevant])
    width = int(items.max()) - int(min(items.min(), 0)) + 1
    codes = np.repeat(np.arange(len(lens)), lens) * width + (items - min(items.min(), 0))
    users = np.unique(codes) // width
    return np.bincount(users, minlength=len(lens)).astype(np.float64)


def precision_at_k(
    recommended: np.ndarray, relevant: Sequence[np.ndarray], k: int = 10
) -> np.ndarray:
    """Relevant items among the top k, divided by k."""
    return hits_matrix(recommended[:, :k], relevant).sum(axis=1) / k


def recall_at_k(recommended: np.ndarray, relevant: Sequence[np.ndarray], k: int = 10) -> np.ndarray:
    """Relevant items among the top k, divided by min(k, number of relevant items).

    The min(k, .) normalisation (as in the reference figures of shared/data/README.md) keeps a
    perfect list at 1.0 for users with more than k relevant items.
    """
    n_rel = np.minimum(_n_relevant(relevant), k)
    hits = hits_matrix(recommended[:, :k], relevant).sum(axis=1)
    return np.divide(hits, n_rel, out=np.zeros_like(n_rel), where=n_rel > 0)


def hit_rate_at_k(
    recommended: np.ndarray, relevant: Sequence[np.ndarray], k: int = 10
) -> np.ndarray:
    """1 if at least one relevant item is in the top k, else 0."""
    return hits_matrix(recommended[:, :k], relevant).any(axis=1).astype(np.float64)


def ndcg_at_k(recommended: np.ndarray, relevant: Sequence[np.ndarray], k: int = 10) -> np.ndarray:
    """Binary-gain NDCG: sum 1/log2(rank+1) over hits, over the ideal for min(k, n relevant)."""
    hits = hits_matrix(recommended[:, :k], relevant)
    disc = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    dcg = (hits * disc).sum(axis=1)
    n_rel = np.minimum(_n_relevant(relevant), k).astype(np.int64)
    ideal_cum = np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])
    idcg = ideal_cum[n_rel]
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def map_at_k(recommended: np.ndarray, relevant: Sequence[np.ndarray], k: int = 10) -> np.ndarray:
    """Average precision at k: mean of precision@rank over hit ranks, over min(k, n relevant)."""
    hits = hits_matrix(recommended[:, :k], relevant)
    prec = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    n_rel = np.minimum(_n_relevant(relevant), k)
    ap = (prec * hits).sum(axis=1)
    return np.divide(ap, n_rel, out=np.zeros_like(ap), where=n_rel > 0)


def catalog_coverage(recommended: np.ndarray, n_items: int, k: int = 10) -> float:
    """Share of the catalog that appears in at least one user's top k."""
    if not n_items:
        return 0.0
    top = np.asarray(recommended)[:, :k]
    shown = np.zeros(n_items, dtype=bool)  # a mask, not np.unique: called 200x per bootstrap
    shown[top[top >= 0]] = True
    return float(shown.sum() / n_items)


def popularity_percentile(item_popularity: np.ndarray) -> np.ndarray:
    """Per item, the share of catalog items strictly less popular (0 = least, ~1 = most)."""
    pop = np.asarray(item_popularity, dtype=np.float64)
    order = np.sort(pop)
    return np.searchsorted(order, pop, side="left") / max(len(pop), 1)


def mean_popularity_percentile(
    recommended: np.ndarray, item_popularity: np.ndarray, k: int = 10
) -> np.ndarray:
    """Popularity bias: per user, the mean popularity percentile of the recommended items."""
    top = np.asarray(recommended)[:, :k]
    pct = popularity_percentile(item_popularity)
    vals = np.where(top >= 0, pct[np.maximum(top, 0)], np.nan)
    with np.errstate(invalid="ignore"):
        return np.nanmean(vals, axis=1) if vals.size else np.zeros(len(top))


@dataclass(frozen=True)
class Estimate:
    """A mean with a bootstrap confidence interval."""

    value: float
    low: float
    high: float


_RESAMPLES: dict[tuple[int, int, int], np.ndarray] = {}


def _resample_index(seed: int, size: int, n_resamples: int) -> np.ndarray:
    """The seeded (n_resamples, size) resample indices; an evaluation table asks for the same
    ones for every metric and model, so the last draw is kept (when it is not huge)."""
    key = (seed, size, n_resamples)
    idx = _RESAMPLES.get(key)
    if idx is None:
        idx = np.random.default_rng(seed).integers(0, size, size=(n_resamples, size))
        _RESAMPLES.clear()
        if idx.size <= 20_000_000:  # at most 160 MB kept
            idx.setflags(write=False)
            _RESAMPLES[key] = idx
    return idx


def bootstrap_ci(
    per_user: np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """Mean of `per_user` with a percentile bootstrap CI over users (seeded)."""
    x = np.asarray(per_user, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"))
    means = x[_resample_index(seed, x.size, n_resamples)].mean(axis=1)
    alpha = (1 - confidence) / 2
    return Estimate(
        float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
    )


#: label -> per-user metric function (recommended, relevant) -> per-user values
PER_USER_METRICS: dict[str, Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]] = {
    "NDCG@10": lambda r, t: ndcg_at_k(r, t, 10),
    "Recall@10": lambda r, t: recall_at_k(r, t, 10),
    "Recall@20": lambda r, t: recall_at_k(r, t, 20),
    "MAP@10": lambda r, t: map_at_k(r, t, 10),
    "Precision@10": lambda r, t: precision_at_k(r, t, 10),
    "HitRate@10": lambda r, t: hit_rate_at_k(r, t, 10),
}

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
    rel_codes = np.sort(np.repeat(np.arange(n), lens) * width + rel_items)
    rec_codes = np.arange(n)[:, None] * width + recommended.astype(np.int64)
    # membership by binary search in the sorted codes (np.isin would sort both sides)
    found = rel_codes[np.minimum(np.searchsorted(rel_codes, rec_codes), len(rel_codes) - 1)]
    return (found == rec_codes) & (recommended >= 0)


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


def coverage_ci(
    recommended: np.ndarray,
    n_items: int,
    k: int = 10,
    n_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Catalog coverage of the top k with a bootstrap CI over users (seeded).

    Coverage belongs to the whole set of lists, and resampling users with replacement shrinks
    it (fewer distinct users), so the bootstrap spread is re-centred on the estimate. The
    resamples are counted in one sparse product (items x users times users x resamples)
    instead of one coverage per resample.
    """
    top = np.asarray(recommended)[:, :k]
    value = catalog_coverage(top, n_items, k)
    n = len(top)
    if not n or not n_items:
        return Estimate(value, float("nan"), float("nan"))
    import scipy.sparse as sp

    users, ranks = np.nonzero(top >= 0)
    # item x user: in that user's top k (a repeated item sums; only > 0 is read)
    shown = sp.csr_matrix((np.ones(len(users)), (top[users, ranks], users)), shape=(n_items, n))
    boots = np.empty(n_resamples)
    step = max(1, BLOCK_VALUES // max(n, n_items))  # resamples per block: ~16 MB at a time
    for start, block in _resample_blocks(seed, n, n_resamples, step):
        picked = np.zeros((n, len(block)))  # user x resample: drawn at least once
        picked[block.ravel(), np.repeat(np.arange(len(block)), n)] = 1.0
        boots[start : start + len(block)] = ((shown @ picked) > 0).sum(axis=0) / n_items
    shift = value - float(np.mean(boots))
    alpha = (1 - confidence) / 2
    return Estimate(
        value,
        float(np.quantile(boots, alpha)) + shift,
        float(np.quantile(boots, 1 - alpha)) + shift,
    )


def popularity_percentile(item_popularity: np.ndarray) -> np.ndarray:
    """Per item, the share of catalog items strictly less popular (0 = least, ~1 = most)."""
    pop = np.asarray(item_popularity, dtype=np.float64)
    order = np.sort(pop)
    return np.searchsorted(order, pop, side="left") / max(len(pop), 1)


def mean_popularity_percentile(
    recommended: np.ndarray, item_popularity: np.ndarray, k: int = 10
) -> np.ndarray:
    """Popularity bias: per user, the mean popularity percentile of the recommended items."""
    return mean_percentile(recommended, popularity_percentile(item_popularity), k)


def mean_percentile(recommended: np.ndarray, percentile: np.ndarray, k: int = 10) -> np.ndarray:
    """Per user, the mean of `percentile` (one value per item, e.g.
    :func:`popularity_percentile`) over the recommended items of the top k: NaN for a user
    with none. Each user's value depends on that user's row alone."""
    top = np.asarray(recommended)[:, :k]
    if not top.size:
        return np.zeros(len(top))
    # np.nanmean's own sum and division, without its "Mean of empty slice" warning for a
    # user with no item (that user's NaN is the answer, not a fault)
    has = top >= 0
    sums = np.where(has, percentile[np.maximum(top, 0)], 0.0).sum(axis=1)
    counts = has.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


@dataclass(frozen=True)
class Estimate:
    """A mean with a bootstrap confidence interval."""

    value: float
    low: float
    high: float


#: Values (resamples x users) a bootstrap holds at a time: its draws, counts and products are
#: made one block of resamples at a time, so their memory does not grow with the users.
BLOCK_VALUES = 2_000_000


def _resample_blocks(seed: int, size: int, n_resamples: int, rows: int):
    """The seeded (n_resamples, size) resample indices, `rows` resamples at a time: yields
    (first resample, its block). The generator draws them row after row, so the blocks are
    the rows of one whole ``default_rng(seed).integers(0, size, (n_resamples, size))`` (and
    fewer resamples of the same seed and size are its first rows); memory holds one block,
    not the whole draw, which is 8 bytes per user and resample (312 MB for 39k test users)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_resamples, rows):
        yield start, rng.integers(0, size, size=(min(rows, n_resamples - start), size))


def bootstrap_ci(
    per_user: np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """Mean of `per_user` with a percentile bootstrap CI over users (seeded); NaN values are
    left out."""
    x = np.asarray(per_user, dtype=np.float64)[:, None]
    return bootstrap_cis(x, n_resamples, confidence, seed)[0]


def bootstrap_cis(
    columns: np.ndarray, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> list[Estimate]:
    """:func:`bootstrap_ci` of each column of `columns` (users x values), with the same draws.

    The resample means of all columns come from one product of the draws' counts (resamples x
    users) with the columns, instead of gathering every column once per resample. A column
    with NaN values is resampled over its other values (its own draws, as alone).
    """
    x = np.asarray(columns, dtype=np.float64)
    out: list[Estimate | None] = [None] * x.shape[1]
    nan = np.isnan(x).any(axis=0)
    for j in np.flatnonzero(nan):
        kept = x[~np.isnan(x[:, j]), j]
        out[j] = bootstrap_cis(kept[:, None], n_resamples, confidence, seed)[0]
    full = np.flatnonzero(~nan)
    if len(full) and not len(x):
        for j in full:
            out[j] = Estimate(float("nan"), float("nan"), float("nan"))
    elif len(full):
        from threadpoolctl import threadpool_limits

        n = len(x)
        means = np.empty((n_resamples, len(full)))
        # gathered once, not once per block; with no NaN column it is `x` itself when
        # C-ordered (the layout and values of the gathered copy: the same products)
        values = np.ascontiguousarray(x) if len(full) == x.shape[1] else x[:, full]
        step = max(1, BLOCK_VALUES // n)  # resamples per block: counts of ~16 MB at a time
        with threadpool_limits(limits=1, user_api="blas"):  # the same sums whatever the host
            for start, block in _resample_blocks(seed, n, n_resamples, step):
                rows = np.repeat(np.arange(len(block)), n) * n
                counts = np.bincount(rows + block.ravel(), minlength=len(block) * n)
                means[start : start + len(block)] = counts.reshape(len(block), n) @ values
        means /= n
        alpha = (1 - confidence) / 2
        low, high = np.quantile(means, [alpha, 1 - alpha], axis=0)
        for c, j in enumerate(full):
            out[j] = Estimate(float(x[:, j].mean()), float(low[c]), float(high[c]))
    return out  # type: ignore[return-value]


#: label -> per-user metric function (recommended, relevant) -> per-user values
PER_USER_METRICS: dict[str, Callable[[np.ndarray, Sequence[np.ndarray]], np.ndarray]] = {
    "NDCG@10": lambda r, t: ndcg_at_k(r, t, 10),
    "Recall@10": lambda r, t: recall_at_k(r, t, 10),
    "Recall@20": lambda r, t: recall_at_k(r, t, 20),
    "MAP@10": lambda r, t: map_at_k(r, t, 10),
    "Precision@10": lambda r, t: precision_at_k(r, t, 10),
    "HitRate@10": lambda r, t: hit_rate_at_k(r, t, 10),
}

"""Item-item co-occurrence ("viewed together", "bought together") with a shrunk cosine."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from recsys.models.base import Recommender
from recsys.models.data import Dataset, same_pattern
from recsys.models.similarity import shrunk_cosine_neighbours


def prune_rows(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the `k` largest entries of each row (ties by lower column).

    Rows with at most `k` entries are kept whole; only longer rows are partitioned, one
    ``np.partition`` each, which is far cheaper than sorting every stored entry.
    """
    m = m.tocsr()
    m.sum_duplicates()
    m.sort_indices()
    lens = np.diff(m.indptr)
    keep = np.ones(m.nnz, dtype=bool)
    kept = lens.astype(np.int64)  # each row's kept entries (no row index per entry)
    if k <= 0:
        keep[:] = False
        kept[:] = 0
    else:
        for r in np.flatnonzero(lens > k):
            lo, hi = m.indptr[r], m.indptr[r + 1]
            d = m.data[lo:hi]
            kth = np.partition(d, len(d) - k)[len(d) - k]  # the k-th largest value
            row_keep = d > kth
            ties = np.flatnonzero(d == kth)[: k - int(row_keep.sum())]  # lower columns first
            row_keep[ties] = True
            keep[lo:hi] = row_keep
            kept[r] = int(row_keep.sum())
    indptr = np.zeros(m.shape[0] + 1, dtype=np.int64)
    np.cumsum(kept, out=indptr[1:])
    return sp.csr_matrix((m.data[keep], m.indices[keep], indptr), shape=m.shape)


def cap_user_history(x: sp.csr_matrix, max_items: int) -> sp.csr_matrix:
    """Each user's `max_items` strongest interactions (ties by lower item index).

    Item-item co-occurrence costs the sum of squared history lengths, so one crawler-like
    account with thousands of items would dominate both the time and the similarities.
    """
    x = x.tocsr()
    if max_items <= 0 or x.nnz == 0 or np.diff(x.indptr).max() <= max_items:
        return x
    return prune_rows(x, max_items)


class HistoryTimesSimilarity(Recommender):
    """Scores = a users x items history matrix ``history_`` times an item-item similarity
    ``sim_`` (both sparse); saved as their CSR arrays."""

    history_: sp.csr_matrix
    sim_: sp.csr_matrix

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        return self.sparse_scores(user_idx).toarray()

    def sparse_scores(self, user_idx: np.ndarray) -> sp.csr_matrix:
        user_idx = np.asarray(user_idx, dtype=np.int64)
        return (self.history_[user_idx] @ self.sim_).astype(np.float32)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "sim_indptr": self.sim_.indptr,
            "sim_indices": self.sim_.indices,
            "sim_data": self.sim_.data,
            "h_indptr": self.history_.indptr,
            "h_indices": self.history_.indices,
            "h_data": self.history_.data,
        }

    def _set_arrays(self, a: dict[str, np.ndarray]) -> None:
        n_users, n_items = self.seen_.shape
        self.sim_ = sp.csr_matrix(
            (a["sim_data"], a["sim_indices"], a["sim_indptr"]), shape=(n_items, n_items)
        )
        self.history_ = sp.csr_matrix(
            (a["h_data"], a["h_indices"], a["h_indptr"]), shape=(n_users, n_items)
        )


class CooccurrenceRecommender(HistoryTimesSimilarity):
    """Scores = user history (log1p confidence) x item-item similarity.

    Similarity = shrunk cosine of co-interaction (all positive events) + ``buy_weight`` x shrunk
    cosine of co-buy (add_to_cart / purchase), pruned to ``neighbors`` per item.
    """

    name = "cooccurrence"

    def __init__(
        self,
        shrink: float = 10.0,
        buy_weight: float = 1.0,
        neighbors: int = 200,
        max_user_items: int = 1000,
    ) -> None:
        self.shrink = float(shrink)
        self.buy_weight = float(buy_weight)
        self.neighbors = int(neighbors)
        self.max_user_items = int(max_user_items)

    def params(self) -> dict[str, Any]:
        return {
            "shrink": self.shrink,
            "buy_weight": self.buy_weight,
            "neighbors": self.neighbors,
            "max_user_items": self.max_user_items,
        }

    @classmethod
    def fit_grid(cls, data: Dataset, grid: list[dict[str, Any]]) -> list[CooccurrenceRecommender]:
        """One model per parameter set, each the same as its own fit; the shrinks of
        parameter sets that differ only in shrink are computed in one counting pass."""
        models = [cls(**params) for params in grid]
        groups: dict[tuple, list[CooccurrenceRecommender]] = {}
        for model in models:
            key = (model.max_user_items, model.buy_weight, model.neighbors)
            groups.setdefault(key, []).append(model)
        for group in groups.values():
            sims = group[0]._similarities(data, [m.shrink for m in group])
            for model, sim in zip(group, sims, strict=True):
                model._remember_seen(data)
                model._set_fitted(data, sim)
        return models

    def _similarities(self, data: Dataset, shrinks: list[float]) -> list[sp.csr_matrix]:
        """The pruned item-item similarities for each shrink (``recsys.models.similarity``)."""
        buy = (
            cap_user_history(data.buy, self.max_user_items)
            if self.buy_weight and data.buy.nnz
            else None
        )
        return shrunk_cosine_neighbours(
            cap_user_history(data.confidence, self.max_user_items),
            buy,
            self.buy_weight,
            shrinks,
            self.neighbors,
        )

    def _fit(self, data: Dataset) -> None:
        self._set_fitted(data, self._similarities(data, [self.shrink])[0])

    def _set_fitted(self, data: Dataset, sim: sp.csr_matrix) -> None:
        self.sim_ = sim
        c = data.confidence.tocsr()  # (its pattern shared: read-only)
        self.history_ = same_pattern(c, np.log1p(np.maximum(c.data.astype(np.float32), 0)))

    def similar_items(self, k: int = 20) -> tuple[np.ndarray, np.ndarray]:
        """Per item, the `k` most similar items and their similarity (-1 / 0 padded)."""
        top = prune_rows(self.sim_, k)
        n = top.shape[0]
        lens = np.diff(top.indptr)
        idx = np.full((n, k), -1, np.int64)
        val = np.zeros((n, k), np.float32)
        rows = np.repeat(np.arange(n), lens)
        order = np.lexsort((top.indices, -top.data, rows))
        pos = np.arange(top.nnz) - top.indptr[rows[order]]
        idx[rows[order], pos] = top.indices[order]
        val[rows[order], pos] = top.data[order]
        return idx, val

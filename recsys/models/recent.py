"""Item-to-item candidates from what the user touched last, weighted by recency.

In e-commerce the last few items of a session say more than a whole history: this generator
scores items by their sequence similarity to the user's ``n_recent`` most recent items, the
newest weighing most.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from recsys.models.cooccurrence import HistoryTimesSimilarity, prune_rows
from recsys.models.data import Dataset, row_blocks


def recent_history(last_days: sp.csr_matrix, n_recent: int, half_life: float) -> sp.csr_matrix:
    """Users x items: each user's `n_recent` most recent items (fewest days since their last
    event; ties by lower item index) weighted ``0.5 ** (rank / half_life)``, rank 0 the newest."""
    m = last_days.tocsr()
    kept: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (rows, items, weights)
    for lo, hi in row_blocks(m.indptr):  # (a block of users' ranks at a time: ~40 bytes an entry)
        start = m.indptr[lo]
        rows = np.repeat(np.arange(lo, hi), np.diff(m.indptr[lo : hi + 1]))
        items, days = m.indices[start : m.indptr[hi]], m.data[start : m.indptr[hi]]
        order = np.lexsort((items, days, rows))
        rank = np.empty(len(rows), np.int64)
        rank[order] = np.arange(len(rows)) - (m.indptr[rows[order]] - start)
        keep = rank < n_recent
        w = np.power(0.5, rank[keep] / max(half_life, 1e-9)).astype(np.float32)
        kept.append((rows[keep], items[keep], w))
    if not kept:  # (no users)
        kept.append((np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)))
    rows, items, w = (np.concatenate(c) for c in zip(*kept, strict=True))
    out = sp.csr_matrix((w, (rows, items)), shape=m.shape, dtype=np.float32)
    out.sort_indices()
    return out


def sequence_similarity(transitions: sp.csr_matrix, shrink: float, neighbors: int):
    """``t_ij / (sqrt(t_i t_j) + shrink)`` of the transition weights (``t_i`` the row sums),
    each row pruned to its `neighbors` best."""
    # the dataset's matrix is read, never copied: ``sim`` shares its (canonical) index
    # arrays, so a fit holds one new float32 per entry beside it rather than two more copies
    # of the whole matrix and an int64 row index per entry (~6 entries an event)
    t = transitions.tocsr().astype(np.float32, copy=False)
    deg = np.asarray(t.sum(axis=1)).ravel().astype(np.float32)
    norm = np.repeat(deg, np.diff(t.indptr))  # deg of each entry's row
    norm *= deg[t.indices]
    np.sqrt(norm, out=norm)
    norm += np.float32(shrink)
    sim = sp.csr_matrix((t.data / norm, t.indices, t.indptr), shape=t.shape)
    del norm
    return prune_rows(sim, neighbors).astype(np.float32, copy=False)


class RecentItemsRecommender(HistoryTimesSimilarity):
    """score(u, j) = sum over the user's recent items r of weight(r) x sim(r, j).

    ``sim`` is the shrunk cosine of sequence transitions (items touched within a few events
    of each other by the same user, :func:`recsys.models.data.sequence_transitions`), so it
    is sequence-aware where co-occurrence counts whole histories; ``weight`` halves every
    ``half_life`` items back in the user's history, and only the ``n_recent`` newest count.
    """

    name = "recent"

    def __init__(
        self,
        n_recent: int = 10,
        half_life: float = 3.0,
        shrink: float = 5.0,
        neighbors: int = 100,
    ) -> None:
        self.n_recent = int(n_recent)
        self.half_life = float(half_life)
        self.shrink = float(shrink)
        self.neighbors = int(neighbors)

    def params(self) -> dict[str, Any]:
        return {
            "n_recent": self.n_recent,
            "half_life": self.half_life,
            "shrink": self.shrink,
            "neighbors": self.neighbors,
        }

    def _fit(self, data: Dataset) -> None:
        if data.last_days is None or data.transitions is None:
            raise ValueError("the recent-items model needs a Dataset with sequence data")
        self.sim_ = sequence_similarity(data.transitions, self.shrink, self.neighbors)
        self.history_ = recent_history(data.last_days, self.n_recent, self.half_life)

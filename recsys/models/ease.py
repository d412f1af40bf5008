"""EASE (Steck 2019): a closed-form item-item linear model, a strong baseline and generator."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from recsys.models.base import Recommender
from recsys.models.data import Dataset
from recsys.models.topk import top_k


def _ease_weights(gram: np.ndarray) -> np.ndarray:
    """B = I - P / diag(P) with a zero diagonal, P = gram^-1 (float32, via Cholesky)."""
    from scipy.linalg import lapack
    from threadpoolctl import threadpool_limits

    if gram.shape[0] == 0:
        return gram.astype(np.float32)
    # One BLAS thread: after LightFM and scikit-learn have run in the same process, OpenBLAS's
    # two threads fought idle-spinning workers of the other runtimes on a 2-core machine and
    # the factorisation ran ~15x slower than single-threaded.
    with threadpool_limits(limits=1, user_api="blas"):
        c, info = lapack.spotrf(gram, lower=1, clean=0, overwrite_a=1)
        if info == 0:
            p, info = lapack.spotri(c, lower=1, overwrite_c=1)
    if info != 0:  # not positive definite (only possible with l2 <= 0): general inverse
        p = np.linalg.inv(gram.astype(np.float64)).astype(np.float32)
    else:
        p = np.tril(p) + np.tril(p, -1).T  # spotri fills one triangle
    b = p / (-np.diag(p))
    b[np.diag_indices_from(b)] = 0.0
    return b.astype(np.float32, copy=False)


class EASERecommender(Recommender):
    """B = I - P diagMat(1 / diag(P)), P = (X'X + lambda I)^-1, scores = X B.

    The Gram matrix is dense in the number of items, so only the ``max_items`` most popular
    items are modelled (memory ~ 4 * max_items^2 bytes, time ~ max_items^3); the rest score
    ``-inf`` and are left to the other generators. P is computed in float32 through a Cholesky
    factorisation (the Gram matrix plus lambda I is symmetric positive definite): about four
    times faster than a float64 LU inverse, and well within float32 precision for lambda >= 1.
    """

    name = "ease"

    def __init__(self, l2: float = 250.0, max_items: int = 3000, binary: bool = True) -> None:
        self.l2 = float(l2)
        self.max_items = int(max_items)
        self.binary = bool(binary)

    def params(self) -> dict[str, Any]:
        return {"l2": self.l2, "max_items": self.max_items, "binary": self.binary}

    def _input(self, x):
        x = x.astype(np.float64)
        if self.binary:
            x.data[:] = 1.0
        return x

    def _shared_work(self, data: Dataset) -> tuple[np.ndarray, np.ndarray, sp.csr_matrix]:
        """(modelled items, their Gram matrix X'X without l2, the float32 histories X): the
        same for every l2, so a tuning grid builds it once."""
        x = self._input(data.confidence)
        counts = np.asarray((x > 0).sum(axis=0)).ravel()
        order = np.lexsort((np.arange(len(counts)), -counts))
        items = np.sort(order[: min(self.max_items, int((counts > 0).sum()))]).astype(np.int64)
        xs = x[:, items].astype(np.float32).tocsc()
        gram = np.asarray((xs.T @ xs).todense(), dtype=np.float32)
        # the float32 histories are the dataset's own matrices (read-only): its seen items
        # when binary, else its confidence (float32 already), not a copy of either
        return (
            items,
            gram,
            data.seen() if self.binary else data.confidence.astype(np.float32, copy=False),
        )

    def _fit(self, data: Dataset, shared=None) -> None:
        self.items_, gram, self.x_ = self._shared_work(data) if shared is None else shared
        gram = gram.copy() if shared is not None else gram
        gram[np.diag_indices_from(gram)] += self.l2
        self.b_ = _ease_weights(gram)
        self.xs_ = None

    def _shared_key(self):
        return (self.max_items, self.binary)

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        user_idx = np.asarray(user_idx, dtype=np.int64)
        out = np.full((len(user_idx), self.n_items_), -np.inf, dtype=np.float32)
        if len(self.items_):
            out[:, self.items_] = self._xs()[user_idx] @ self.b_
        return out

    def score_columns(self, user_idx: np.ndarray, cols: np.ndarray) -> np.ndarray:
        user_idx = np.asarray(user_idx, dtype=np.int64)
        if np.array_equal(cols, self.items_):  # what candidate_columns proposes
            return np.asarray(self._xs()[user_idx] @ self.b_, dtype=np.float32)
        out = np.full((len(user_idx), len(cols)), -np.inf, dtype=np.float32)
        at = np.minimum(np.searchsorted(self.items_, cols), max(len(self.items_) - 1, 0))
        modelled = self.items_[at] == cols if len(self.items_) else np.zeros(len(cols), bool)
        if modelled.any():
            out[:, modelled] = self._xs()[user_idx] @ self.b_[:, at[modelled]]
        return out

    def score_pairs(self, user_idx: np.ndarray, items: np.ndarray) -> np.ndarray:
        out = np.full(len(items), -np.inf, dtype=np.float32)
        modelled = np.isin(items, self.items_)
        if modelled.any():
            out[modelled] = super().score_pairs(
                np.asarray(user_idx)[modelled], np.asarray(items)[modelled]
            )
        return out

    def recommend(
        self,
        user_idx: np.ndarray,
        k: int = 10,
        exclude_seen: bool = True,
        batch_size: int = 1024,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`Recommender.recommend`'s lists, selected among the modelled items' columns (every
        other item scores -inf) instead of the whole catalogue's: the same scores (the same
        product, row by row) and the same ties (the columns in catalogue order). A user with
        fewer than k finite scores there is completed like the plain path (the lowest -inf
        columns of the whole row), by scoring the whole row."""
        user_idx = np.asarray(user_idx, dtype=np.int64)
        if not len(self.items_) or k > len(self.items_):
            return super().recommend(user_idx, k, exclude_seen, batch_size)
        out_i, out_s = [], []
        for start in range(0, len(user_idx), batch_size):
            batch = user_idx[start : start + batch_size]
            s = self.score_columns(batch, self.items_)
            if exclude_seen:
                seen = self.seen_[batch]
                col = np.full(self.n_items_, -1, np.int64)
                col[self.items_] = np.arange(len(self.items_))
                c = col[seen.indices]
                r = np.repeat(np.arange(len(batch)), np.diff(seen.indptr))
                s[r[c >= 0], c[c >= 0]] = -np.inf
            at, v = top_k(s, k)
            i = self.items_[at]
            short = np.flatnonzero(~np.isfinite(v[:, -1]))
            if len(short):  # (fewer than k finite: the plain path's padding)
                i[short], v[short] = super().recommend(batch[short], k, exclude_seen)
            out_i.append(i)
            out_s.append(v)
        if not out_i:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.concatenate(out_i), np.concatenate(out_s)

    def candidate_columns(self, n_candidates, seen, unavailable):
        """Only the modelled items score above -inf."""
        return self.items_, self.items_[:0]

    def _xs(self):
        """User histories restricted to the modelled items (computed once, then cached)."""
        xs = getattr(self, "xs_", None)
        if xs is None:
            xs = self.xs_ = self.x_[:, self.items_].tocsr()
        return xs

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "items": self.items_,
            "b": self.b_,
            "x_indptr": self.x_.indptr,
            "x_indices": self.x_.indices,
            "x_data": self.x_.data,
        }

    def _set_arrays(self, a: dict[str, np.ndarray]) -> None:
        self.xs_ = None
        self.items_, self.b_ = a["items"], a["b"]
        self.x_ = sp.csr_matrix(
            (a["x_data"], a["x_indices"], a["x_indptr"]), shape=self.seen_.shape
        )

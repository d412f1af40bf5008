"""EASE (Steck 2019): a closed-form item-item linear model, a strong baseline and generator."""

from __future__ import annotations

from typing import Any

import numpy as np

from recsys.models.base import Recommender
from recsys.models.data import Dataset


class EASERecommender(Recommender):
    """B = I - P diagMat(1 / diag(P)), P = (X'X + lambda I)^-1, scores = X B.

    The Gram matrix is dense in the number of items, so only the ``max_items`` most popular
    items are modelled (memory ~ 8 * max_items^2 bytes); the rest score ``-inf``.
    """

    name = "ease"

    def __init__(self, l2: float = 250.0, max_items: int = 5000, binary: bool = True) -> None:
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

    def _fit(self, data: Dataset) -> None:
        x = self._input(data.confidence)
        counts = np.asarray((x > 0).sum(axis=0)).ravel()
        order = np.lexsort((np.arange(len(counts)), -counts))
        self.items_ = np.sort(order[: min(self.max_items, int((counts > 0).sum()))]).astype(
            np.int64
        )
        xs = x[:, self.items_]
        gram = np.asarray((xs.T @ xs).todense())
        gram[np.diag_indices_from(gram)] += self.l2
        p = np.linalg.inv(gram)
        b = p / (-np.diag(p))
        b[np.diag_indices_from(b)] = 0.0
        self.b_ = b.astype(np.float32)
        self.x_ = x.tocsr().astype(np.float32)  # user histories, needed to score

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        user_idx = np.asarray(user_idx, dtype=np.int64)
        out = np.full((len(user_idx), self.n_items_), -np.inf, dtype=np.float32)
        if len(self.items_):
            xs = self.x_[user_idx][:, self.items_]
            out[:, self.items_] = xs @ self.b_
        return out

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "items": self.items_,
            "b": self.b_,
            "x_indptr": self.x_.indptr,
            "x_indices": self.x_.indices,
            "x_data": self.x_.data,
        }

    def _set_arrays(self, a: dict[str, np.ndarray]) -> None:
        import scipy.sparse as sp

        self.items_, self.b_ = a["items"], a["b"]
        self.x_ = sp.csr_matrix(
            (a["x_data"], a["x_indices"], a["x_indptr"]), shape=self.seen_.shape
        )

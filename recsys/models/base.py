"""The one small interface every recommender implements, and its plain-array persistence.

A model is fitted on a :class:`~recsys.models.data.Dataset`, scores a batch of user indices
against the whole catalog as one dense numpy block, and saves itself as ``arrays.npz`` (no
pickle) plus ``params.json``.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import numpy as np
import scipy.sparse as sp

from recsys.models.data import Dataset
from recsys.models.topk import top_k

#: at most this many dense scores (users x items, float32: 128 MiB) in one batch of users
SCORE_CELLS = 1 << 25


def score_batch(batch_size: int, n_items: int) -> int:
    """`batch_size`, lowered so that a batch's dense scores over `n_items` items stay within
    `SCORE_CELLS` (at least one user)."""
    return max(1, min(batch_size, SCORE_CELLS // max(n_items, 1)))


MODEL_CLASSES: dict[str, type[Recommender]] = {}


def mask_rows(
    scores: np.ndarray, matrix: sp.csr_matrix, rows: np.ndarray, value: float = -np.inf
) -> None:
    """Set ``scores[b, j] = value`` wherever ``matrix[rows[b], j]`` is stored (in place)."""
    sub = matrix[rows]
    r = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
    scores[r, sub.indices] = value


class Recommender(ABC):
    """Fit on a Dataset, score users against every item, recommend the top k, save / load."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            MODEL_CLASSES[cls.name] = cls

    # subclasses set these in fit / load
    seen_: sp.csr_matrix
    n_items_: int

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """Hyperparameters (JSON-able); ``type(self)(**params)`` rebuilds an unfitted model."""

    @abstractmethod
    def _fit(self, data: Dataset) -> None: ...

    @abstractmethod
    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """Dense float32 scores (len(user_idx), n_items); higher is better, -inf = never."""

    @abstractmethod
    def _arrays(self) -> dict[str, np.ndarray]: ...

    @abstractmethod
    def _set_arrays(self, arrays: dict[str, np.ndarray]) -> None: ...

    def score_columns(self, user_idx: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``score(user_idx)[:, cols]``, the same values; models whose candidates lie in a few
        columns (``candidate_columns``) compute them without the whole block."""
        return self.score(user_idx)[:, cols]

    def score_pairs(self, user_idx: np.ndarray, items: np.ndarray) -> np.ndarray:
        """``score(user_idx)[i, items[i]]`` for each i (aligned arrays), the same values."""
        users, row = np.unique(np.asarray(user_idx, dtype=np.int64), return_inverse=True)
        return self.score(users)[row, items] if len(users) else np.zeros(0, np.float32)

    def sparse_scores(self, user_idx: np.ndarray) -> sp.csr_matrix | None:
        """``score(user_idx)`` as a CSR matrix of non-negative scores, zero where nothing is
        stored, for models whose scores are mostly zero; None (the default) for the others.
        Candidate generation then selects the top without the dense block
        (`recsys.models.topk.sparse_top_k`)."""
        return None

    def candidate_columns(
        self, n_candidates: int, seen: sp.csr_matrix, unavailable: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Where the top `n_candidates` of a batch of users lie, or None (anywhere).

        `seen` holds the batch's rows of masked items and `unavailable` the items masked for
        everyone. Returns sorted item indices ``columns`` that hold each user's top, unless a
        ``frontier`` item (none: never) scores at least that user's last candidate: every
        item outside the columns scores at most the best of the frontier. Lets candidate
        generation select the top over a few columns instead of the whole catalog.
        """
        return None

    def fit(self, data: Dataset) -> Self:
        """Fit on `data`; remembers which items each user has seen (for exclusion)."""
        self._remember_seen(data)
        self._fit(data)
        return self

    @classmethod
    def fit_grid(cls, data: Dataset, grid: list[dict[str, Any]]) -> list[Recommender]:
        """One model fitted on `data` per parameter set of `grid` (a tuning grid), each the
        same as ``cls(**params).fit(data)``. Work that only depends on some parameters
        (``_shared_key``) is done once per distinct value of them."""
        shared: dict[Any, Any] = {}
        models = []
        for params in grid:
            model = cls(**params)
            key = model._shared_key()
            if key is None:
                models.append(model.fit(data))
                continue
            if key not in shared:
                shared[key] = model._shared_work(data)
            model._remember_seen(data)
            model._fit(data, shared[key])
            models.append(model)
        return models

    def _shared_key(self) -> Any:
        """The parameters ``_shared_work`` depends on; None: nothing to share."""
        return None

    def _shared_work(self, data: Dataset) -> Any:
        """What fits with the same ``_shared_key`` have in common (passed to ``_fit``)."""
        raise NotImplementedError

    def _remember_seen(self, data: Dataset) -> None:
        self.seen_ = data.seen()  # one matrix for every model fitted on `data` (read-only)
        self.n_items_ = data.n_items

    def recommend(
        self,
        user_idx: np.ndarray,
        k: int = 10,
        exclude_seen: bool = True,
        batch_size: int = 1024,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-`k` item indices and scores per user, best first (k columns, -inf padded).

        A batch holds at most `SCORE_CELLS` dense scores: fewer users than `batch_size` when
        the items are many (1,024 users x 100k items were 400 MiB at once; the lists do not
        depend on the batches)."""
        user_idx = np.asarray(user_idx, dtype=np.int64)
        batch_size = score_batch(batch_size, self.n_items_)
        out_i, out_s = [], []
        for start in range(0, len(user_idx), batch_size):
            batch = user_idx[start : start + batch_size]
            s = self.score(batch)
            if exclude_seen:
                mask_rows(s, self.seen_, batch)
            i, v = top_k(s, k)
            out_i.append(i)
            out_s.append(v)
        if not out_i:
            return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        return np.concatenate(out_i), np.concatenate(out_s)

    def save(self, path: str) -> None:
        """Write ``params.json`` and ``arrays.npz`` (no pickle) into folder `path`.

        Uncompressed: model arrays are mostly dense floats that zlib barely shrinks, and
        compressing them cost seconds per save (EASE's item-item matrix alone is 100 MB).
        """
        os.makedirs(path, exist_ok=True)
        arrays = dict(self._arrays())
        arrays.update(
            seen_indptr=self.seen_.indptr,
            seen_indices=self.seen_.indices,
            seen_shape=np.array(self.seen_.shape, np.int64),
        )
        np.savez(os.path.join(path, "arrays.npz"), **arrays)
        with open(os.path.join(path, "params.json"), "w") as f:
            json.dump({"model": self.name, "params": self.params()}, f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> Recommender:
        """Load any saved model from `path` (the class is read from params.json)."""
        with open(os.path.join(path, "params.json")) as f:
            meta = json.load(f)
        model = MODEL_CLASSES[meta["model"]](**meta["params"])
        with np.load(os.path.join(path, "arrays.npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        shape = tuple(arrays.pop("seen_shape"))
        indptr, indices = arrays.pop("seen_indptr"), arrays.pop("seen_indices")
        model.seen_ = sp.csr_matrix(
            (np.ones(len(indices), np.float32), indices, indptr), shape=shape
        )
        model.n_items_ = shape[1]
        model._set_arrays(arrays)
        return model

    def share_seen(self, other: Recommender) -> None:
        """Use `other`'s seen matrix when it is the same (generators of one hybrid saved each
        a copy): one in memory instead of one per generator."""
        a, b = self.seen_, other.seen_
        same = a is b or (
            a.shape == b.shape
            and a.nnz == b.nnz
            and np.array_equal(a.indptr, b.indptr)
            and np.array_equal(a.indices, b.indices)
        )
        if same:
            self.seen_ = b

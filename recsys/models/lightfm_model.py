"""LightFM WARP, hybrid: items are described by an identity feature plus category, brand and
tags, so an item nobody has touched yet still gets an embedding from its features."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
import scipy.sparse as sp

from recsys.models.base import Recommender
from recsys.models.data import Dataset
from recsys.models.dense import dot_scores


def item_feature_matrix(data: Dataset, identity: bool = True) -> sp.csr_matrix:
    """Items x features: [identity | category one-hot | brand one-hot | tags], rows L1-normed.

    A metadata column that repeats an earlier one exactly (the same items with the same
    values) is added into it: a tag ``category:<c>`` or ``brand:<b>``, as the demo data and
    the Taobao adapter give every item, becomes weight 2 on the category or brand column.
    An item's features keep their weights and LightFM learns the same way up to its random
    start (two embeddings that always receive the same updates act as one of twice the
    weight), but each sample reads and updates fewer embeddings: on the 1M demo 6.5 -> 4.5
    features an item and a LightFM fit on all events 16.1 -> 14.3 s CPU, validation NDCG@10
    the same (LightFM .0703 -> .0706, the ranked list .1059 -> .1060)."""
    n = data.n_items
    blocks = []
    if identity:
        blocks.append(sp.identity(n, dtype=np.float32, format="csr"))
    for codes, vocab in ((data.item_category, data.categories), (data.item_brand, data.brands)):
        if len(vocab):
            has = codes >= 0
            blocks.append(
                sp.csr_matrix(
                    (np.ones(int(has.sum()), np.float32), (np.flatnonzero(has), codes[has])),
                    shape=(n, len(vocab)),
                )
            )
    if data.item_tags.shape[1]:
        blocks.append(data.item_tags.astype(np.float32))
    if not blocks:
        blocks.append(sp.identity(n, dtype=np.float32, format="csr"))
    f = sp.hstack(blocks, format="csr").astype(np.float32)
    f = _merged_repeats(f, n if identity else 0)
    norms = np.asarray(f.sum(axis=1)).ravel()
    norms[norms == 0] = 1.0
    return sp.diags(1.0 / norms).astype(np.float32) @ f


def _merged_repeats(f: sp.csr_matrix, first: int) -> sp.csr_matrix:
    """`f` with each column from `first` on that repeats an earlier one of them exactly
    added into that one (k repeats: one column with k times its values)."""
    c = f.tocsc()
    c.sort_indices()
    kept: dict[tuple[bytes, bytes], int] = {}  # a column's (rows, values) -> its place in keep
    keep, times = list(range(first)), [1.0] * first
    for j in range(first, c.shape[1]):
        lo, hi = c.indptr[j], c.indptr[j + 1]
        same = kept.setdefault((c.indices[lo:hi].tobytes(), c.data[lo:hi].tobytes()), len(keep))
        if same == len(keep):
            keep.append(j)
            times.append(1.0)
        else:
            times[same] += 1.0
    if len(keep) == c.shape[1]:
        return f
    return (c[:, keep] @ sp.diags(np.asarray(times, np.float32))).tocsr().astype(np.float32)


class EpochChoice:
    """The epoch count early stopping is choosing, shared with fits that start before it has
    chosen (:meth:`LightFMRecommender.fit_as_chosen`): the counts it can choose, and the
    choice once made (or the failure, so that nobody waits for ever)."""

    def __init__(self, possible: Sequence[int]) -> None:
        self.possible = tuple(sorted(set(possible)))
        self._made = threading.Event()
        self._epochs: int | None = None

    def choose(self, epochs: int | None) -> None:
        """Record the choice; None: early stopping failed (waiters raise)."""
        self._epochs = epochs
        self._made.set()

    def known(self) -> bool:
        return self._made.is_set()

    def wait(self) -> int:
        self._made.wait()
        if self._epochs is None:
            raise RuntimeError("LightFM early stopping failed before choosing its epoch count")
        return self._epochs


class LightFMRecommender(Recommender):
    """LightFM with WARP loss; stores the final user / item representations and biases."""

    name = "lightfm"

    def __init__(
        self,
        no_components: int = 32,
        epochs: int = 30,
        learning_rate: float = 0.05,
        item_alpha: float = 0.0,
        user_alpha: float = 0.0,
        max_sampled: int = 10,
        use_item_features: bool = True,
        weighted: bool = True,
        seed: int = 42,
        num_threads: int = 1,
        max_updates: int = 0,
    ) -> None:
        self.no_components = int(no_components)
        self.epochs = int(epochs)
        self.learning_rate = float(learning_rate)
        self.item_alpha = float(item_alpha)
        self.user_alpha = float(user_alpha)
        self.max_sampled = int(max_sampled)
        self.use_item_features = bool(use_item_features)
        self.weighted = bool(weighted)
        self.seed = int(seed)
        # More than one thread makes LightFM's Hogwild updates order-dependent (not reproducible).
        self.num_threads = int(num_threads)
        # Time bound: at most max_updates / interactions epochs (0 = no bound), so a fit on
        # a large tenant costs about as much as one on max_updates interactions.
        self.max_updates = int(max_updates)

    def params(self) -> dict[str, Any]:
        return {
            "no_components": self.no_components,
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
            "item_alpha": self.item_alpha,
            "user_alpha": self.user_alpha,
            "max_sampled": self.max_sampled,
            "use_item_features": self.use_item_features,
            "weighted": self.weighted,
            "seed": self.seed,
            "num_threads": self.num_threads,
            "max_updates": self.max_updates,
        }

    def epochs_for(self, nnz: int, epochs: int | None = None) -> int:
        """``epochs`` (or `epochs`), capped by ``max_updates`` for `nnz` interactions (at
        least 1)."""
        epochs = self.epochs if epochs is None else epochs
        if self.max_updates <= 0 or nnz <= 0:
            return epochs
        return max(1, min(epochs, self.max_updates // nnz))

    def early_stopping_epochs(self, nnz: int, eval_every: int) -> list[int]:
        """The epoch counts :meth:`fit_early_stopping` evaluates (and so can choose) on
        `nnz` interactions: every `eval_every` epochs, and the last."""
        done, points, last = 0, [], self.epochs_for(nnz)
        while done < last:
            done += min(max(eval_every, 1), last - done)
            points.append(done)
        return points

    def _model_and_inputs(self, data: Dataset):
        from lightfm import LightFM

        conf = data.confidence.tocoo()
        inter = sp.coo_matrix(
            (np.ones(conf.nnz, np.float32), (conf.row, conf.col)), shape=conf.shape
        )
        weight = None
        if self.weighted:
            # log-damped confidence: a purchase counts more than a view, not 8x more
            weight = sp.coo_matrix(
                (
                    np.log1p(conf.data).astype(np.float32) / np.float32(np.log(2.0)),
                    (conf.row, conf.col),
                ),
                shape=conf.shape,
            )
        item_features = item_feature_matrix(data) if self.use_item_features else None
        model = LightFM(
            no_components=self.no_components,
            loss="warp",
            learning_rate=self.learning_rate,
            item_alpha=self.item_alpha,
            user_alpha=self.user_alpha,
            max_sampled=self.max_sampled,
            random_state=np.random.RandomState(self.seed),
        )
        return model, inter, weight, item_features

    def _take(self, model, item_features) -> None:
        self.item_bias_, self.item_emb_ = (
            a.astype(np.float32) for a in model.get_item_representations(item_features)
        )
        self.user_bias_, self.user_emb_ = (
            a.astype(np.float32) for a in model.get_user_representations()
        )

    def _fit(self, data: Dataset) -> None:
        model, inter, weight, item_features = self._model_and_inputs(data)
        if inter.nnz:
            model.fit(
                inter,
                item_features=item_features,
                sample_weight=weight,
                epochs=self.epochs_for(inter.nnz),
                num_threads=self.num_threads,
            )
        else:  # nothing to learn from: initialise the arrays so the shapes are right
            model._initialize(
                self.no_components,
                item_features.shape[1] if item_features is not None else data.n_items,
                data.n_users,
            )
        self._take(model, item_features)

    def fit_early_stopping(
        self,
        data: Dataset,
        user_idx: np.ndarray,
        relevant: list[np.ndarray],
        eval_every: int = 2,
        patience: int = 2,
    ) -> dict[str, Any]:
        """Fit up to ``epochs`` epochs, scoring validation NDCG@10 of the users `user_idx`
        (their `relevant` items) every `eval_every` epochs; stop after `patience` scores
        without improvement and keep the best state. ``epochs`` becomes the best count, so a
        refit with :meth:`params` repeats the chosen configuration. Deterministic: epoch by
        epoch training draws the same shuffles as one ``fit`` call."""
        from recsys.evaluation.metrics import ndcg_at_k

        self._remember_seen(data)
        model, inter, weight, item_features = self._model_and_inputs(data)
        if not inter.nnz or not len(user_idx):
            self._fit(data)
            return {"epochs": self.epochs, "curve": []}
        model._reset_state()
        best, best_epochs, curve, stale, done = -1.0, 0, [], 0, 0
        for point in self.early_stopping_epochs(inter.nnz, eval_every):
            if stale >= patience:
                break
            model.fit_partial(
                inter,
                item_features=item_features,
                sample_weight=weight,
                epochs=point - done,
                num_threads=self.num_threads,
            )
            done = point
            self._take(model, item_features)
            rec, _ = self.recommend(user_idx, 10)
            value = float(ndcg_at_k(rec, relevant, 10).mean())
            curve.append((done, round(value, 5)))
            if value > best + 1e-4:
                best, best_epochs, stale = value, done, 0
                kept = (self.item_bias_, self.item_emb_, self.user_bias_, self.user_emb_)
            else:
                stale += 1
        self.item_bias_, self.item_emb_, self.user_bias_, self.user_emb_ = kept
        self.epochs = best_epochs
        return {"epochs": best_epochs, "curve": curve, "validation_ndcg@10": best}

    def fit_as_chosen(self, data: Dataset, choice: EpochChoice) -> Self:
        """``fit(data)`` with ``epochs`` set to what early stopping (on another window) is
        choosing, started before it has chosen: epoch by epoch, keeping the representations
        at each count a choice can lead to, until the choice is known and reached. The same
        model as ``fit`` once ``epochs`` is set (epoch by epoch draws the same shuffles), so
        a refit runs beside the early stopping instead of after it."""
        self._remember_seen(data)
        model, inter, weight, item_features = self._model_and_inputs(data)
        if not inter.nnz:
            self.epochs = choice.wait()
            self._fit(data)
            return self
        # what a choice of e epochs makes this fit run (the max_updates bound of its data)
        targets = {self.epochs_for(inter.nnz, e) for e in choice.possible}
        model._reset_state()
        kept: dict[int, tuple[np.ndarray, ...]] = {}
        done = 0
        while True:
            if choice.known() or done >= max(targets, default=0):
                self.epochs = choice.wait()
                target = self.epochs_for(inter.nnz)
                if done >= target:
                    break
            model.fit_partial(
                inter,
                item_features=item_features,
                sample_weight=weight,
                epochs=1,
                num_threads=self.num_threads,
            )
            done += 1
            if done in targets and not choice.known():
                self._take(model, item_features)
                kept[done] = (self.item_bias_, self.item_emb_, self.user_bias_, self.user_emb_)
        if done == target:
            self._take(model, item_features)
        else:  # ran past the choice: its state was kept when it was reached
            self.item_bias_, self.item_emb_, self.user_bias_, self.user_emb_ = kept[target]
        return self

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        user_idx = np.asarray(user_idx, dtype=np.int64)
        # (u . i + b_i) + b_u in place, without two more (users x items) temporaries; the
        # products summed in factor order: a user's scores whatever its batch (dot_scores)
        s = dot_scores(self.user_emb_[user_idx], self.item_emb_)
        s += self.item_bias_[None, :]
        s += self.user_bias_[user_idx, None]
        return s

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "item_bias": self.item_bias_,
            "item_emb": self.item_emb_,
            "user_bias": self.user_bias_,
            "user_emb": self.user_emb_,
        }

    def _set_arrays(self, a: dict[str, np.ndarray]) -> None:
        self.item_bias_, self.item_emb_ = a["item_bias"], a["item_emb"]
        self.user_bias_, self.user_emb_ = a["user_bias"], a["user_emb"]

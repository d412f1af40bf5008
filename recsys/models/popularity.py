"""Popularity: global, recency-decayed trending, per category (by the user's affinity) and per
user segment. The baseline every tenant gets, even with very little data."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from recsys.models.base import Recommender
from recsys.models.data import Dataset

POPULARITY_KINDS = ("global", "trending", "category", "segment")


def _unit(x: np.ndarray) -> np.ndarray:
    m = float(x.max()) if x.size else 0.0
    return (x / m if m > 0 else np.zeros_like(x)).astype(np.float32)


class PopularityRecommender(Recommender):
    """Items ranked by summed interaction confidence.

    ``kind``: ``global`` (one list for everyone), ``trending`` (confidence with a short half-life),
    ``category`` (global popularity weighted by the user's share of confidence in each item's
    category, so a user who buys shoes sees popular shoes first) or ``segment`` (popularity among
    users of the same segment; global for users without one).
    """

    name = "popularity"

    def __init__(self, kind: str = "global") -> None:
        if kind not in POPULARITY_KINDS:
            raise ValueError(f"kind must be one of {POPULARITY_KINDS}, got {kind!r}")
        self.kind = kind

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind}

    def _fit(self, data: Dataset) -> None:
        conf = data.confidence
        self.pop_ = _unit(np.asarray(conf.sum(axis=0)).ravel())
        self.trending_ = _unit(data.trending)
        self.item_category_ = data.item_category.astype(np.int32)
        n_cat = max(len(data.categories), 1)
        # user x category share of confidence
        cat = np.where(data.item_category >= 0, data.item_category, 0)
        onehot = sp.csr_matrix(
            ((data.item_category >= 0).astype(np.float32), (np.arange(data.n_items), cat)),
            shape=(data.n_items, n_cat),
        )
        aff = np.asarray((conf @ onehot).todense(), dtype=np.float32)
        tot = aff.sum(axis=1, keepdims=True)
        self.user_category_ = np.divide(aff, tot, out=np.zeros_like(aff), where=tot > 0)
        self.user_segment_ = data.user_segment.astype(np.int32)
        n_seg = max(len(data.segments), 1)
        seg = np.where(data.user_segment >= 0, data.user_segment, 0)
        seg_onehot = sp.csr_matrix(
            ((data.user_segment >= 0).astype(np.float32), (seg, np.arange(data.n_users))),
            shape=(n_seg, data.n_users),
        )
        segpop = np.asarray((seg_onehot @ conf).todense(), dtype=np.float32)
        mx = segpop.max(axis=1, keepdims=True, initial=0.0)
        self.segment_pop_ = np.divide(segpop, mx, out=np.zeros_like(segpop), where=mx > 0)

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        user_idx = np.asarray(user_idx, dtype=np.int64)
        n = len(user_idx)
        if self.kind == "global":
            return np.broadcast_to(self.pop_, (n, self.pop_.size)).copy()
        if self.kind == "trending":
            return np.broadcast_to(self.trending_, (n, self.trending_.size)).copy()
        if self.kind == "category":
            cat = np.where(self.item_category_ >= 0, self.item_category_, 0)
            aff = self.user_category_[user_idx][:, cat] * (self.item_category_ >= 0)
            # affinity first, global popularity breaks ties (and serves users without history)
            return (aff * self.pop_ + 1e-3 * self.pop_).astype(np.float32)
        seg = self.user_segment_[user_idx]
        out = np.broadcast_to(self.pop_, (n, self.pop_.size)).copy()
        has = seg >= 0
        out[has] = self.segment_pop_[seg[has]]
        return out

    def score_columns(self, user_idx: np.ndarray, cols: np.ndarray) -> np.ndarray:
        if self.kind not in ("global", "trending", "category"):
            return super().score_columns(user_idx, cols)
        user_idx = np.asarray(user_idx, dtype=np.int64)
        if self.kind == "category":  # score()'s float32 arithmetic on the columns alone
            cat = self.item_category_[cols]
            aff = self.user_category_[user_idx][:, np.where(cat >= 0, cat, 0)] * (cat >= 0)
            pop = self.pop_[cols]
            return (aff * pop + 1e-3 * pop).astype(np.float32)
        score = self.pop_ if self.kind == "global" else self.trending_
        return np.broadcast_to(score[cols], (len(user_idx), len(cols))).copy()

    def score_pairs(self, user_idx: np.ndarray, items: np.ndarray) -> np.ndarray:
        if self.kind not in ("global", "trending", "category"):
            return super().score_pairs(user_idx, items)
        if self.kind == "category":
            cat = self.item_category_[items]
            aff = self.user_category_[user_idx, np.where(cat >= 0, cat, 0)] * (cat >= 0)
            pop = self.pop_[items]
            return (aff * pop + 1e-3 * pop).astype(np.float32)
        return (self.pop_ if self.kind == "global" else self.trending_)[items].copy()

    def candidate_columns(self, n_candidates, seen, unavailable):
        """Global and trending: the same list for everyone, so the top n_candidates plus as
        many items as one user of the batch has masked, plus any tied with the last of them
        (ties go to the lower index).

        Category: a user's score is an item's popularity times a factor of its category (the
        user's affinity), so within a category every user ranks items alike. Each category's
        top m (n_candidates, plus the most items one user of the batch has seen in it, plus
        its unavailable ones; ties included) holds every user's candidates from it, and an
        item further down scores at most the category's next item, which goes in the
        frontier (equal scores across categories are the one way it can matter).
        """
        masked = int(np.diff(seen.indptr).max(initial=0)) + int(unavailable.sum())
        if self.kind in ("global", "trending"):
            score = self.pop_ if self.kind == "global" else self.trending_
            m = n_candidates + masked
            if m >= score.size:
                return None
            threshold = np.partition(score, score.size - m)[score.size - m]
            return np.flatnonzero(score >= threshold), np.zeros(0, np.int64)
        if self.kind != "category" or n_candidates + masked >= self.pop_.size:
            return None
        group, order, starts = self._by_category()
        n_groups = len(starts) - 1
        users = np.repeat(np.arange(seen.shape[0]), np.diff(seen.indptr))
        per_user = np.bincount(
            users * n_groups + group[seen.indices], minlength=seen.shape[0] * n_groups
        )
        most_seen = per_user.reshape(-1, n_groups).max(axis=0, initial=0)
        m = n_candidates + most_seen + np.bincount(group[unavailable], minlength=n_groups)
        columns, frontier = [], []
        for g in range(n_groups):
            members = order[starts[g] : starts[g + 1]]
            take = len(members)
            if m[g] < take:  # cut after the m-th, keeping those tied with it
                take = int(
                    np.searchsorted(-self.pop_[members], -self.pop_[members[m[g] - 1]], "right")
                )
                if take < len(members):
                    frontier.append(members[take])
            columns.append(members[:take])
        return np.sort(np.concatenate(columns)), np.array(frontier, np.int64)

    def _by_category(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(category group of each item, items by group then popularity desc then index, the
        group starts in that order); items without a category are the last group. Computed
        once, then cached."""
        cached = getattr(self, "_groups", None)
        if cached is None:
            n_cat = int(self.item_category_.max(initial=-1)) + 1
            group = np.where(self.item_category_ >= 0, self.item_category_, n_cat)
            order = np.lexsort((np.arange(len(group)), -self.pop_, group))
            starts = np.searchsorted(group[order], np.arange(n_cat + 2))
            cached = self._groups = (group, order, starts)
        return cached

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "pop": self.pop_,
            "trending": self.trending_,
            "item_category": self.item_category_,
            "user_category": self.user_category_,
            "user_segment": self.user_segment_,
            "segment_pop": self.segment_pop_,
        }

    def _set_arrays(self, a: dict[str, np.ndarray]) -> None:
        self.pop_, self.trending_ = a["pop"], a["trending"]
        self.item_category_, self.user_category_ = a["item_category"], a["user_category"]
        self.user_segment_, self.segment_pop_ = a["user_segment"], a["segment_pop"]

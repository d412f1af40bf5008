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

    def candidate_columns(self, n_candidates: int, n_excluded: int) -> np.ndarray | None:
        """The same list for everyone (global, trending): the top n_candidates + n_excluded
        items, plus any tied with the last of them (ties go to the lower index)."""
        if self.kind not in ("global", "trending"):
            return None
        score = self.pop_ if self.kind == "global" else self.trending_
        m = n_candidates + n_excluded
        if m >= score.size:
            return None
        threshold = np.partition(score, score.size - m)[score.size - m]
        return np.flatnonzero(score >= threshold)

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

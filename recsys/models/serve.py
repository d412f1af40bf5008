"""What the snapshot builder calls: final top-N per user with per-signal parts, factors and
similar-item lists, all as batched numpy arrays.

Typical use (``model`` is a fitted or loaded :class:`~recsys.models.hybrid.HybridRecommender`)::

    lists = serve_top_n(model, np.arange(len(model.user_ids_)), k=50)
    # flat arrays, one row per (user, item), sorted by user then rank:
    # lists.user_idx, lists.item_idx, lists.rank, lists.final_score,
    # lists.pop, lists.cooc, lists.emb, lists.ranker, lists.reason_code
    user_ids = model.user_ids_[lists.user_idx]; item_ids = model.item_ids_[lists.item_idx]
    item_emb, item_bias = item_factors(model)          # LightFM, incl. features of new items
    sim_idx, sim_val = similar_items_embedding(model, k=20)
    co_idx, co_val = similar_items_cooccurrence(model, k=20)
    fallback_items, fallback_scores = popular_items(model, k=50)   # for unknown users

Index spaces: ``user_idx`` indexes ``model.user_ids_`` and ``item_idx`` ``model.item_ids_``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from recsys.models.allocator import reused_heap
from recsys.models.hybrid import (
    _REASON_OF_GENERATOR,
    GENERATORS,
    REASON_CODES,
    HybridRecommender,
    build_candidates,
)
from recsys.models.threads import map_in_threads
from recsys.models.topk import best_rows_per_user, top_k

T = TypeVar("T")

__all__ = [
    "REASON_CODES",
    "ServedLists",
    "item_factors",
    "map_served_batches",
    "popular_items",
    "serve_top_n",
    "similar_items_cooccurrence",
    "similar_items_embedding",
    "user_factors",
]


@dataclass(frozen=True)
class ServedLists:
    """Final lists as flat arrays, one row per (user, item), sorted by user then rank.

    * ``user_idx`` / ``item_idx``: int64 indices into ``model.user_ids_`` / ``model.item_ids_``;
      ``user_pos`` is the user's position in the requested batch.
    * ``rank``: 0-based position in the user's list.
    * ``final_score``: the score that decided the order (ranker probability, or the fallback
      generator's score when the tenant had too little data to train a ranker). Lists longer
      than the ranker's candidate set end with the generators' further items, scored below
      every ranked item (see ``_ranker_scores``).
    * ``pop``: global popularity in [0, 1]; ``cooc``: co-occurrence score with the user's history;
      ``emb``: LightFM score (dot product + biases); ``ranker``: ranker probability. A signal the
      model does not have (skipped for lack of data) is 0.0.
    * ``reason_code``: why the item is there, a key of :data:`REASON_CODES` (the generator that
      ranked it highest).

    A user gets fewer than k rows when fewer unseen, available items exist.
    """

    user_idx: np.ndarray
    user_pos: np.ndarray
    item_idx: np.ndarray
    rank: np.ndarray
    final_score: np.ndarray
    pop: np.ndarray
    cooc: np.ndarray
    emb: np.ndarray
    ranker: np.ndarray
    reason_code: np.ndarray

    def __len__(self) -> int:
        return len(self.item_idx)


def _zero_nan(x: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(x), 0.0, x).astype(np.float32)


def _ranker_scores(model: HybridRecommender, cand, n_users: int, n_cand: int):
    """(ranker probability, final score) per candidate.

    The ranker learned on the union of each generator's top ``candidates_per_generator``; it
    scores exactly those. Longer lists (k above that, e.g. 200 candidates kept per user in a
    snapshot) are filled with the rest of each generator's top-k, ordered by their best
    generator rank below every ranker-scored item of the same user (ranker column 0). So the
    ranker's work grows with ``candidates_per_generator``, not with k.
    """
    best_rank = np.min(np.column_stack([cand.ranks[g] for g in GENERATORS]), axis=1)
    scored = best_rank < model.config.candidates_per_generator
    ranker = np.zeros(len(cand.item_idx))
    # build_candidates computed features for exactly these rows (the ranked ones)
    x = cand.features if cand.feature_rows is not None else cand.features[scored]
    ranker[scored] = model.ranker_.predict_proba(x)
    final = ranker.copy()
    rest = ~scored
    if rest.any():
        floor = np.ones(n_users)
        np.minimum.at(floor, cand.user_pos[scored], ranker[scored])
        final[rest] = floor[cand.user_pos[rest]] * 0.5 * (1.0 - best_rank[rest] / (n_cand + 1))
    return ranker, final


def map_served_batches(
    model: HybridRecommender,
    user_idx: np.ndarray,
    fn: Callable[[int, ServedLists, dict[str, np.ndarray]], T],
    k: int = 10,
    batch_size: int = 256,
    generator_lists: bool = False,
    workers: int = 2,
    fill_only_when_short: bool = True,
) -> list[T]:
    """``fn(start, lists, tops)`` for each batch of `batch_size` users of `user_idx` (those
    from position `start`), in batch order: `lists` are the batch's served top-`k`
    (:func:`serve_top_n`'s, ``user_pos`` counted from the first user of `user_idx`), and
    `tops`, with `generator_lists`, each generator's own top-`k` of the batch (-1 padded;
    else empty). `fn` runs in the scoring thread (`workers` batches at a time), as soon as its
    batch is scored: a caller that reduces each batch there (the evaluation's per-user
    metrics) never holds every user's lists, nor leaves them in the threads' heaps.

    Lists longer than the ranked candidates (k above ``candidates_per_generator``, a
    snapshot's 200) end with filler items scored below every ranked one (`_ranker_scores`),
    so a user who has at least k ranked candidates, all with a positive ranker score, is
    served ranked items alone. With `fill_only_when_short` a batch is first built with the
    ranked candidates only, and built again with the fillers only when one of its users has
    fewer than k or a score of 0: the same lists (tested against ``False``, which always
    builds the fillers), for about half the candidate work (on the 1M demo no user has fewer
    than 278 ranked candidates)."""
    user_idx = np.asarray(user_idx, dtype=np.int64)
    n_ranked = model.config.candidates_per_generator
    n_cand = max(n_ranked, k)
    ranked_first = (
        fill_only_when_short and n_cand > n_ranked and model.ranker_ is not None
    ) and not generator_lists  # (a generator's own top-k needs its k proposals)

    def candidates(batch: np.ndarray, n: int):
        return build_candidates(
            model.generators_, model.side_, model.seen_, batch, n, n_ranked=n_ranked
        )

    def scored(batch: np.ndarray):
        """(candidates, ranker score, final score) of the batch's users."""
        if ranked_first:
            cand = candidates(batch, n_ranked)
            if np.bincount(cand.user_pos, minlength=len(batch)).min(initial=k) >= k:
                ranker, final = _ranker_scores(model, cand, len(batch), n_ranked)
                if ranker.min(initial=1.0) > 0:
                    return cand, ranker, final
        cand = candidates(batch, n_cand)
        if model.ranker_ is not None:
            return (cand, *_ranker_scores(model, cand, len(batch), n_cand))
        fb = model.info.get("fallback_order") or "popularity"
        return cand, np.zeros(len(cand.item_idx)), np.nan_to_num(cand.scores[fb], nan=-np.inf)

    def one_batch(start: int) -> T:
        batch = user_idx[start : start + batch_size]
        cand, ranker, final = scored(batch)
        # copies, not views: a view would keep each batch's whole (users x n_cand) tops alive
        # as long as the caller holds them (5 x 100 int64 a user)
        tops = {g: top[:, :k].copy() for g, top in cand.tops.items()} if generator_lists else {}
        keep, rank = best_rows_per_user(cand.user_pos, final, len(batch), k)
        ranks = np.column_stack([cand.ranks[g][keep] for g in GENERATORS])
        best = np.argmin(ranks, axis=1)
        reason = np.array([_REASON_OF_GENERATOR[g] for g in GENERATORS], np.int8)[best]
        lists = ServedLists(
            user_idx=batch[cand.user_pos[keep]],
            user_pos=cand.user_pos[keep] + start,
            item_idx=cand.item_idx[keep],
            rank=rank.astype(np.int32),
            final_score=final[keep].astype(np.float32),
            pop=_zero_nan(cand.scores["popularity"][keep]),
            cooc=_zero_nan(cand.scores["cooccurrence"][keep]),
            emb=_zero_nan(cand.scores["lightfm"][keep]),
            ranker=ranker[keep].astype(np.float32),
            reason_code=reason,
        )
        del cand, rank, keep, ranks, best, ranker, final
        return fn(start, lists, tops)

    # numpy, scipy and the tree predictor release the GIL in their heavy loops: two batches
    # at a time use both cores (one BLAS thread, as in the fit: the same LightFM products as
    # the ranker learned on); each batch's arrays reuse the heap the one before freed
    with reused_heap():
        return map_in_threads(one_batch, range(0, len(user_idx), batch_size), workers)


def serve_top_n(
    model: HybridRecommender,
    user_idx: np.ndarray,
    k: int = 10,
    batch_size: int = 256,
    generator_lists: dict[str, np.ndarray] | None = None,
    workers: int = 2,
) -> ServedLists:
    """Final served top-`k` for users (indices of ``model.user_ids_``), excluding seen and
    unavailable items. Batched: candidates and features of `batch_size` users at a time.

    Pass a dict as `generator_lists` to also get each generator's own top-`k` (the same
    exclusions, -1 padded, aligned with `user_idx`) from the same scoring pass: the evaluation
    compares them with the served lists without scoring every user twice. `workers` batches
    are scored at a time (threads; the output does not depend on it)."""
    results = map_served_batches(
        model,
        user_idx,
        lambda start, lists, tops: (lists, tops),
        k,
        batch_size,
        generator_lists is not None,
        workers,
    )
    if generator_lists is not None:
        per_generator: dict[str, list[np.ndarray]] = {}
        for _, tops in results:
            for g, top in tops.items():
                per_generator.setdefault(g, []).append(top)
        for g in model.generators_:
            generator_lists[g] = (
                np.concatenate(per_generator[g]) if g in per_generator else np.zeros((0, k), int)
            )
    fields = ServedLists.__dataclass_fields__
    if not results:
        ints = {
            "user_idx": np.int64,
            "user_pos": np.int64,
            "item_idx": np.int64,
            "rank": np.int32,
            "reason_code": np.int8,
        }
        return ServedLists(**{f: np.zeros(0, ints.get(f, np.float32)) for f in fields})
    return ServedLists(
        **{f: np.concatenate([getattr(lists, f) for lists, _ in results]) for f in fields}
    )


def _lightfm(model: HybridRecommender):
    """The LightFM generator, or LightFM fitted for its embeddings alone (``factors_``, when
    the weighing on validation left it out of the generators). KeyError: neither."""
    if "lightfm" in model.generators_ or model.factors_ is None:
        return model.generators_["lightfm"]
    return model.factors_


def item_factors(model: HybridRecommender) -> tuple[np.ndarray, np.ndarray]:
    """LightFM item embeddings (n_items, d) and biases (n_items,), including items known only
    from their features. Raises KeyError when LightFM was skipped for lack of data."""
    m = _lightfm(model)
    return m.item_emb_, m.item_bias_


def user_factors(model: HybridRecommender) -> tuple[np.ndarray, np.ndarray]:
    """LightFM user embeddings (n_users, d) and biases; score = u.i + b_u + b_i."""
    m = _lightfm(model)
    return m.user_emb_, m.user_bias_


def similar_items_embedding(
    model: HybridRecommender, k: int = 20, batch_size: int = 1024, workers: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the `k` nearest items by cosine of LightFM embeddings (self excluded);
    `workers` batches at a time (threads; the output does not depend on it)."""
    emb, _ = item_factors(model)
    norm = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)

    def one_batch(start: int) -> tuple[np.ndarray, np.ndarray]:
        s = norm[start : start + batch_size] @ norm.T
        rows = np.arange(s.shape[0])
        s[rows, rows + start] = -np.inf
        return top_k(s, k)

    results = map_in_threads(one_batch, range(0, len(norm), batch_size), workers)
    if not results:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    idx = np.concatenate([i for i, _ in results])
    val = np.concatenate([v for _, v in results])
    return np.where(np.isfinite(val), idx, -1), np.where(np.isfinite(val), val, 0.0).astype(
        np.float32
    )


def similar_items_cooccurrence(
    model: HybridRecommender, k: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the `k` items most often viewed / bought with it (shrunk cosine; -1 padded)."""
    return model.generators_["cooccurrence"].similar_items(k)


def popular_items(model: HybridRecommender, k: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """The global popularity list (available items only): the fallback for unknown users."""
    pop = model.generators_["popularity"].pop_.astype(np.float32).copy()
    pop[~model.side_.item_available] = -np.inf
    idx, val = top_k(pop[None, :], k)
    ok = np.isfinite(val[0])
    return idx[0][ok], val[0][ok]

"""The evaluation folds each batch of test users into its metrics as soon as it is scored
(issue 18: no list of every test user is held). The folded table is the table of the whole
lists, bit for bit, and its figures are the hand-computed ones."""

from __future__ import annotations

import math

import numpy as np
import pytest
from synthetic_events import FAST_HYBRID, cluster_events, cluster_items

import recsys.evaluation.offline as offline
from recsys.evaluation.evaluate import Holdout, MetricsFold, evaluation_table
from recsys.evaluation.metrics import PER_USER_METRICS, ndcg_at_k
from recsys.models.data import temporal_split
from recsys.models.hybrid import HybridConfig, HybridRecommender, rank_lists
from recsys.models.serve import map_served_batches, serve_top_n
from recsys.models.threads import map_in_threads

FAST = {  # (longer lists than FAST_HYBRID's, and no catalogue items: the test users' lists)
    **FAST_HYBRID,
    "lightfm": {**FAST_HYBRID["lightfm"], "epochs": 5},
    "candidates_per_generator": 20,
    "include_catalog_items": False,
}


def fold_in_batches(lists, holdout, n_items, pop, bounds, threads=1):
    """The fold of `lists` over the user ranges cut at `bounds`, `threads` batches at a time."""
    fold = MetricsFold(list(lists), holdout.n_users, n_items, pop)
    cuts = list(zip(bounds[:-1], bounds[1:], strict=True))

    def add(cut):
        a, b = cut
        fold.add(a, {k: v[a:b] for k, v in lists.items()}, holdout.relevant[a:b])

    map_in_threads(add, cuts, threads)
    return fold


def test_known_answer_whole_and_one_user_at_a_time():
    """Two users, two lists each, every figure worked out by hand."""
    n_items = 10
    relevant = [np.array([2]), np.array([0, 4])]
    holdout = Holdout(user_idx=np.array([0, 1]), relevant=relevant)
    lists = {
        "a": np.array([[1, 2, -1], [0, 3, 4]]),  # user 0: hit at rank 2; user 1: ranks 1, 3
        "b": np.array([[-1, -1, -1], [9, 8, 7]]),  # nothing shown to user 0, no hit for user 1
    }
    pop = np.arange(n_items, dtype=np.float64)  # item i is more popular than i items
    whole = evaluation_table(lists, holdout, n_items, pop, n_resamples=1000, seed=0)
    folded = fold_in_batches(lists, holdout, n_items, pop, [0, 1, 2]).table(1000, seed=0)
    assert folded.equals(whole)

    a = whole.row(0, named=True)
    ndcg = [1 / math.log2(3), (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))]
    assert a["model"] == "a" and a["users"] == 2
    assert a["NDCG@10"] == pytest.approx(sum(ndcg) / 2, abs=1e-15)
    # two users: a quarter of the resamples draw user 0 twice, a quarter user 1 twice, so the
    # 2.5 % and 97.5 % quantiles are the two users' own values
    assert a["NDCG@10_low"] == pytest.approx(ndcg[0], abs=1e-15)
    assert a["NDCG@10_high"] == pytest.approx(ndcg[1], abs=1e-15)
    assert a["Recall@10"] == 1.0 and a["Recall@20"] == 1.0 and a["HitRate@10"] == 1.0
    assert a["Precision@10"] == pytest.approx(0.15, abs=1e-15)  # (1 + 2) / 10 / 2
    assert a["MAP@10"] == pytest.approx((0.5 + (1 + 2 / 3) / 2) / 2, abs=1e-15)
    assert a["Coverage@10"] == 0.5  # items 0-4 of 10
    # item i's percentile is i / 10: user 0 (1, 2) 0.15, user 1 (0, 3, 4) 7 / 30
    assert a["PopPercentile@10"] == pytest.approx((0.15 + 7 / 30) / 2, abs=1e-15)

    b = whole.row(1, named=True)
    assert b["NDCG@10"] == 0.0 and b["HitRate@10"] == 0.0
    assert b["Coverage@10"] == 0.3  # items 7, 8, 9
    # user 0 was shown nothing: the popularity percentile is user 1's alone
    assert b["PopPercentile@10"] == pytest.approx(0.8, abs=1e-15)


@pytest.mark.parametrize("threads", [1, 2])
def test_fold_in_any_batches_is_the_whole_table_bit_for_bit(rng, threads):
    n_users, n_items = 700, 90
    relevant = [rng.choice(n_items, size=rng.integers(1, 6), replace=False) for _ in range(n_users)]
    holdout = Holdout(user_idx=np.arange(n_users), relevant=relevant)
    lists = {name: rng.integers(-1, n_items, size=(n_users, 20)) for name in ("a", "b", "c")}
    lists["c"][::50] = -1  # users shown nothing: their popularity percentile is NaN
    pop = rng.random(n_items)
    whole = evaluation_table(lists, holdout, n_items, pop, n_resamples=300, seed=4)
    for bounds in ([0, n_users], [0, 1, 8, 300, 301, 700], list(range(0, n_users + 1, 7))):
        if bounds[-1] != n_users:
            bounds.append(n_users)
        folded = fold_in_batches(lists, holdout, n_items, pop, bounds, threads)
        assert folded.table(300, seed=4).equals(whole), bounds
    # and the figures are the metric functions' means over every user
    row = whole.row(0, named=True)
    for label, fn in PER_USER_METRICS.items():
        assert row[label] == float(fn(lists["a"], relevant).mean())
    assert row["users"] == n_users


def test_fold_refuses_other_models_and_missing_users(rng):
    holdout = Holdout(user_idx=np.arange(4), relevant=[np.array([1])] * 4)
    fold = MetricsFold(["a"], 4, 5, np.ones(5))
    with pytest.raises(ValueError, match="the fold holds"):
        fold.add(0, {"b": np.zeros((4, 3), int)}, holdout.relevant)
    with pytest.raises(ValueError, match="outside"):
        fold.add(3, {"a": np.zeros((2, 3), int)}, holdout.relevant[:2])
    fold.add(0, {"a": np.zeros((2, 3), int)}, holdout.relevant[:2])
    with pytest.raises(ValueError, match="2 users folded of 4"):
        fold.table(10)


@pytest.fixture(scope="module")
def fitted_split():
    rng = np.random.default_rng(11)
    events = cluster_events(rng, n_users=160, n_items=40, per_user=14)
    split = temporal_split(events, 0.3)
    model = HybridRecommender(HybridConfig(**FAST)).fit(split.train, cluster_items(40))
    return model, split


def test_evaluate_fitted_folds_batches_into_the_whole_lists_table(fitted_split, monkeypatch):
    """Batches of 16 test users, folded in the scoring threads as they are scored: the table
    of the lists of one scoring pass over every test user (the plain path), bit for bit."""
    model, split = fitted_split
    monkeypatch.setattr(offline, "SCORE_BATCH", 16)
    table, holdout, lists = offline.evaluate_fitted(
        model, split.train, split.test, n_resamples=200, seed=2, keep_lists=True
    )
    assert holdout.n_users > 3 * 16  # several batches, two threads
    per_generator: dict[str, np.ndarray] = {}
    served = serve_top_n(model, holdout.user_idx, 20, 16, generator_lists=per_generator)
    plain = {
        label: per_generator[g] for g, label in offline.TABLE_ROWS.items() if g in per_generator
    }
    plain[offline.SERVED], _ = rank_lists(
        served.user_pos, served.item_idx, served.final_score, holdout.n_users, 20
    )
    assert list(lists) == list(plain) == table["model"].to_list()
    for name in plain:
        assert np.array_equal(lists[name], plain[name]), name
    pop = model.generators_["popularity"].pop_
    expected = evaluation_table(plain, holdout, len(model.item_ids_), pop, 200, seed=2)
    assert table.equals(expected)
    # real figures: the served NDCG@10 is the mean of its users' own, and the ranked list
    # of clustered tastes beats popularity
    served_row = table.filter(table["model"] == "served").row(0, named=True)
    assert served_row["NDCG@10"] == float(ndcg_at_k(plain["served"], holdout.relevant).mean())
    pop_row = table.filter(table["model"] == "popularity").row(0, named=True)
    assert served_row["NDCG@10"] > pop_row["NDCG@10"] > 0
    # without keep_lists nothing of the lists is returned, and the table is the same
    again, _, none = offline.evaluate_fitted(model, split.train, split.test, 200, seed=2)
    assert none is None and again.equals(table)


def test_map_served_batches_hands_each_batch_to_its_reduction(fitted_split):
    model, _ = fitted_split
    users = np.arange(len(model.user_ids_))[::-1]
    whole = serve_top_n(model, users, 7, 32)
    seen = map_served_batches(
        model,
        users,
        lambda start, lists, tops: (start, lists, sorted(tops)),
        7,
        32,
        generator_lists=False,
    )
    assert [start for start, _, _ in seen] == list(range(0, len(users), 32))
    assert all(tops == [] for _, _, tops in seen)
    for field in ("user_idx", "user_pos", "item_idx", "final_score"):
        got = np.concatenate([getattr(lists, field) for _, lists, _ in seen])
        assert np.array_equal(got, getattr(whole, field)), field

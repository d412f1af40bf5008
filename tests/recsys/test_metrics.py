"""Metrics on hand-computed cases."""

import math
import warnings

import numpy as np
import pytest

from recsys.evaluation import metrics as m

REC = np.array([[1, 2, 3, -1], [7, 8, 9, 4]])
REL = [np.array([2, 5]), np.array([4])]


def test_ndcg_hand_computed():
    got = m.ndcg_at_k(REC, REL, 10)
    # user 0: hit at rank 2 of 2 relevant; user 1: hit at rank 4 of 1 relevant
    assert got[0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert got[1] == pytest.approx(1 / math.log2(5))


def test_recall_precision_hitrate_map():
    assert m.recall_at_k(REC, REL, 10).tolist() == [0.5, 1.0]
    assert m.recall_at_k(REC, REL, 3).tolist() == [0.5, 0.0]
    assert m.precision_at_k(REC, REL, 10).tolist() == [0.1, 0.1]
    assert m.hit_rate_at_k(REC, REL, 3).tolist() == [1.0, 0.0]
    assert m.map_at_k(REC, REL, 10) == pytest.approx([0.5 / 2, 0.25 / 1])


def test_recall_normalises_by_min_k_relevant():
    rec = np.array([[0, 1]])
    assert m.recall_at_k(rec, [np.array([0, 1, 2, 3])], 2).tolist() == [1.0]


def test_perfect_list_scores_one():
    rec = np.array([[3, 1, 2]])
    rel = [np.array([1, 2, 3])]
    for fn in (m.ndcg_at_k, m.recall_at_k, m.map_at_k, m.hit_rate_at_k):
        assert fn(rec, rel, 3)[0] == pytest.approx(1.0)


def test_padding_never_counts_as_hit():
    assert m.hits_matrix(np.array([[-1, -1]]), [np.array([0])]).sum() == 0


def test_coverage_and_popularity_bias():
    assert m.catalog_coverage(np.array([[0, 1], [1, 2]]), 10) == pytest.approx(0.3)
    pct = m.popularity_percentile(np.array([1.0, 2.0, 3.0, 4.0]))
    assert pct.tolist() == [0.0, 0.25, 0.5, 0.75]
    assert m.mean_popularity_percentile(np.array([[3, 2]]), np.array([1.0, 2, 3, 4]), 10)[
        0
    ] == pytest.approx(0.625)


def test_mean_percentile_is_nanmean_without_its_warning(rng):
    # users with no item (all -1) get NaN, the rest the mean over their items: np.nanmean's
    # values bit for bit, and no "Mean of empty slice" warning
    pct = rng.random(50)
    rec = rng.integers(-1, 50, size=(300, 12))
    rec[::7] = -1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = m.mean_percentile(rec, pct, 10)
    expected = np.where(rec[:, :10] >= 0, pct[np.maximum(rec[:, :10], 0)], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = np.nanmean(expected, axis=1)
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got[::7]).all() and not np.isnan(np.delete(got, np.s_[::7])).any()
    assert m.mean_percentile(np.zeros((3, 0), np.int64), pct).tolist() == [0.0, 0.0, 0.0]


def test_bootstrap_ci_is_seeded_and_brackets_mean(rng):
    x = rng.random(200)
    a, b = m.bootstrap_ci(x, seed=3), m.bootstrap_ci(x, seed=3)
    assert a == b
    assert a.low < a.value < a.high
    assert a.value == pytest.approx(x.mean())
    c = m.bootstrap_ci(np.full(10, 0.5))
    assert c.low == c.value == c.high == 0.5


def test_bootstrap_cis_match_resampling_each_column(rng):
    x = rng.random((300, 4))
    x[rng.random(300) < 0.1, 2] = np.nan  # a column with missing values: resampled without them
    got = m.bootstrap_cis(x, n_resamples=500, seed=7)
    for j, est in enumerate(got):
        col = x[~np.isnan(x[:, j]), j]
        idx = np.random.default_rng(7).integers(0, len(col), size=(500, len(col)))
        means = col[idx].mean(axis=1)
        assert est.value == pytest.approx(col.mean(), abs=1e-15)
        assert est.low == pytest.approx(np.quantile(means, 0.025), abs=1e-12)
        assert est.high == pytest.approx(np.quantile(means, 0.975), abs=1e-12)
        alone = m.bootstrap_ci(x[:, j], n_resamples=500, seed=7)
        assert (alone.low, alone.high) == pytest.approx((est.low, est.high), abs=1e-12)


def test_coverage_ci_matches_covering_each_resample(rng):
    rec = rng.integers(-1, 60, size=(80, 12))
    got = m.coverage_ci(rec, 60, 10, n_resamples=200, seed=3)
    draws = np.random.default_rng(3)
    boots = np.array(
        [m.catalog_coverage(rec[draws.integers(0, 80, 80)], 60, 10) for _ in range(200)]
    )
    shift = m.catalog_coverage(rec, 60, 10) - boots.mean()
    assert got.value == m.catalog_coverage(rec, 60, 10)
    assert got.low == pytest.approx(np.quantile(boots, 0.025) + shift, abs=1e-12)
    assert got.high == pytest.approx(np.quantile(boots, 0.975) + shift, abs=1e-12)


@pytest.mark.parametrize("size", [1, 7, 300, 1001])
def test_resample_blocks_are_the_rows_of_one_draw(size):
    whole = np.random.default_rng(5).integers(0, size, size=(50, size))
    for rows in (1, 3, 7, 50, 64):
        blocks = list(m._resample_blocks(5, size, 50, rows))
        assert [start for start, _ in blocks] == list(range(0, 50, rows))
        assert all(len(b) <= rows for _, b in blocks)
        assert np.array_equal(np.concatenate([b for _, b in blocks]), whole)


def test_evaluation_table_in_small_bootstrap_blocks_is_the_plain_one(rng, monkeypatch):
    """The bootstraps draw their resamples a block at a time (memory: one block, not
    resamples x users); with blocks of 1-3 resamples the table is the one of a single block
    and the plain whole-draw computation."""
    from recsys.evaluation.evaluate import Holdout, evaluation_table

    n_users, n_items = 300, 60
    relevant = [rng.choice(n_items, size=rng.integers(1, 6), replace=False) for _ in range(n_users)]
    holdout = Holdout(user_idx=np.arange(n_users), relevant=relevant)
    lists = {name: rng.integers(-1, n_items, size=(n_users, 20)) for name in ("a", "b")}
    pop = rng.random(n_items)
    plain = evaluation_table(lists, holdout, n_items, pop, n_resamples=400, seed=3)
    monkeypatch.setattr(m, "BLOCK_VALUES", 1000)  # 3 resamples of 300 users a block, 1 of 60 items
    blocked = evaluation_table(lists, holdout, n_items, pop, n_resamples=400, seed=3)
    assert blocked["model"].to_list() == plain["model"].to_list()
    for col in plain.columns[1:]:
        assert blocked[col].to_list() == pytest.approx(plain[col].to_list(), rel=1e-12, abs=1e-15)
    # and both are the textbook bootstrap over the whole (resamples x users) draw
    draws = np.random.default_rng(3).integers(0, n_users, size=(400, n_users))
    for name, rec in lists.items():
        row = plain.filter(plain["model"] == name).row(0, named=True)
        for label, fn in m.PER_USER_METRICS.items():
            x = fn(rec, relevant)
            means = x[draws].mean(axis=1)
            assert row[label] == pytest.approx(x.mean(), abs=1e-15)
            assert row[f"{label}_low"] == pytest.approx(np.quantile(means, 0.025), abs=1e-12)
            assert row[f"{label}_high"] == pytest.approx(np.quantile(means, 0.975), abs=1e-12)
        covered = [m.catalog_coverage(rec[d], n_items, 10) for d in draws[:200]]
        shift = m.catalog_coverage(rec, n_items, 10) - np.mean(covered)
        assert row["Coverage@10_low"] == pytest.approx(
            np.quantile(covered, 0.025) + shift, abs=1e-12
        )
        assert row["Coverage@10_high"] == pytest.approx(
            np.quantile(covered, 0.975) + shift, abs=1e-12
        )

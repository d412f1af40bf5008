"""The faster training and scoring paths give the answers of the plain ones."""

import os
import sys
import threading

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from synthetic_events import FAST_HYBRID, cluster_events, cluster_items, make_events

from recsys.models.cooccurrence import CooccurrenceRecommender, cap_user_history, prune_rows
from recsys.models.data import build_dataset, temporal_split
from recsys.models.ease import EASERecommender
from recsys.models.hybrid import (
    HybridConfig,
    SideFeatures,
    build_candidates,
    fit_eval_and_final,
    fit_generators,
)
from recsys.models.lightfm_model import EpochChoice, LightFMRecommender
from recsys.models.popularity import PopularityRecommender
from recsys.models.recent import RecentItemsRecommender
from recsys.models.serve import ServedLists, map_served_batches, serve_top_n
from recsys.models.similarity import shrunk_cosine_neighbours
from recsys.models.threads import in_thread, lower_thread_priority, single_threaded_blas
from recsys.models.topk import top_k
from recsys.models.trees import TreeEnsemble

FAST = FAST_HYBRID


def _prune_by_sorting(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """The reference: sort every entry by (row, -value, column), keep the first k per row."""
    m = m.tocsr()
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
    order = np.lexsort((m.indices, -m.data, rows))
    rank = np.arange(m.nnz) - m.indptr[rows[order]]
    keep = order[rank < k]
    out = sp.csr_matrix((m.data[keep], (rows[keep], m.indices[keep])), shape=m.shape)
    out.sort_indices()
    return out


@pytest.mark.parametrize("k", [0, 1, 3, 10, 100])
def test_prune_rows_matches_sorting_with_ties(k):
    for seed in range(5):
        m = sp.random(40, 60, density=0.3, random_state=seed, format="csr", dtype=np.float32)
        m.data = np.round(m.data * 4) / 4  # many ties
        m = sp.diags((np.arange(40) % 7 != 3).astype(np.float32)) @ m  # some empty rows
        m = m.tocsr()
        m.sort_indices()
        got, want = prune_rows(m, k), _prune_by_sorting(m, k)
        assert got.nnz == want.nnz and (got != want).nnz == 0
        np.testing.assert_array_equal(got.indptr, want.indptr)  # (the empty rows included)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.data, want.data)


def test_cap_user_history_keeps_the_strongest_items():
    x = sp.csr_matrix(np.array([[1, 5, 3, 2], [0, 1, 0, 0]], np.float32))
    capped = cap_user_history(x, 2).toarray()
    assert capped[0].tolist() == [0, 5, 3, 0] and capped[1].tolist() == [0, 1, 0, 0]


def _shrunk_cosine_by_products(x: sp.csr_matrix, shrink: float) -> sp.csr_matrix:
    """The reference: X'X of binary histories, diagonal dropped, divided in float32."""
    xb = x.tocsr().astype(np.float32)
    xb.data[:] = 1.0
    c = (xb.T @ xb).tocsr()
    c.setdiag(0)
    c.eliminate_zeros()
    n = np.asarray(xb.sum(axis=0)).ravel()
    rows = np.repeat(np.arange(c.shape[0]), np.diff(c.indptr))
    c.data = (c.data / (np.sqrt(n[rows] * n[c.indices]) + shrink)).astype(np.float32)
    return c


@pytest.mark.parametrize("buy_weight", [0.0, 1.0, 0.35])
def test_neighbour_rows_match_sparse_products_and_pruning(buy_weight):
    rng = np.random.default_rng(5)
    n_users, n_items = 300, 120
    # skewed popularity: many equal similarities (ties at the cut), some empty items
    x = sp.csr_matrix(
        (rng.random((n_users, n_items)) < 0.08 * (rng.random(n_items) < 0.9)).astype(np.float32)
    )
    buy = sp.csr_matrix((x.toarray() * (rng.random(x.shape) < 0.3)).astype(np.float32))
    shrinks = [0.0, 5.0, 20.0]
    for neighbors in (1, 7, 40, 500):
        got = shrunk_cosine_neighbours(x, buy, buy_weight, shrinks, neighbors)
        for shrink, sim in zip(shrinks, got, strict=True):
            want = _shrunk_cosine_by_products(x, shrink)
            if buy_weight:
                want = want + buy_weight * _shrunk_cosine_by_products(buy, shrink)
            want = prune_rows(want.tocsr(), neighbors)
            assert sim.shape == want.shape
            np.testing.assert_array_equal(sim.indptr, want.indptr)
            np.testing.assert_array_equal(sim.indices, want.indices)
            np.testing.assert_array_equal(sim.data, want.data.astype(np.float32))


@pytest.mark.parametrize(
    "cls, grid",
    [
        (
            CooccurrenceRecommender,
            [{"shrink": 5.0}, {"shrink": 50.0}, {"shrink": 5.0, "max_user_items": 3}],
        ),
        (EASERecommender, [{"l2": 10.0}, {"l2": 500.0}, {"l2": 10.0, "max_items": 7}]),
    ],
)
def test_a_tuning_grid_fits_the_models_of_separate_fits(rng, cls, grid):
    data = build_dataset(cluster_events(rng, n_users=60), cluster_items())
    assert data.buy.nnz  # co-buy counts are shared too
    users = np.arange(data.n_users)
    for params, model in zip(grid, cls.fit_grid(data, grid), strict=True):
        alone = cls(**params).fit(data)
        assert model.params() == alone.params()
        np.testing.assert_array_equal(model.score(users), alone.score(users))
        assert (model.seen_ != alone.seen_).nnz == 0


def _booster(x, y, leaves, rounds):
    import lightgbm as lgb

    params = {
        "objective": "binary",
        "num_leaves": leaves,
        "min_data_in_leaf": 5,
        "num_threads": 1,
        "deterministic": True,
        "force_row_wise": True,
        "verbose": -1,
    }
    return lgb.train(params, lgb.Dataset(x, y), rounds)


@pytest.mark.parametrize("max_leaf_nodes", [2, 7, 15, 31, 63, 100])
def test_tree_predictor_matches_lightgbm_and_the_traversal(rng, max_leaf_nodes):
    # 2..63 leaves: bitmask tables (uint8 .. uint64 masks); 100: the traversal. Column 5
    # has no missing value in training (its splits read a NaN as 0.0), the others have some
    # (a NaN goes each split's default way); infinities on both sides
    x = rng.normal(size=(3000, 6))
    x[:, :5][rng.random((3000, 5)) < 0.1] = np.nan
    x[:50, 2] = np.inf
    x[50:100, 3] = -np.inf
    y = (np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 1]) * x[:, 4] + x[:, 5] > 0).astype(int)
    booster = _booster(x, y, max_leaf_nodes, 30)
    ens = TreeEnsemble.from_lightgbm(booster)
    assert len(ens.roots) == 30
    assert (ens._leaf_masks() is None) == (max_leaf_nodes > 64)
    x_new = rng.normal(size=(5000, 6)) * 2
    x_new[rng.random(x_new.shape) < 0.2] = np.nan  # column 5 too
    x_new[:100] = x[:100]  # infinities
    want = booster.predict(x_new, raw_score=True)
    np.testing.assert_allclose(ens.decision_function(x_new), want, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ens.decision_function_traversal(x_new), want, rtol=1e-9)
    np.testing.assert_allclose(ens.predict_proba(x_new), booster.predict(x_new), rtol=1e-9)
    # values exactly at a threshold go left, like LightGBM
    at = np.tile(np.nan_to_num(x_new[:1]), (len(ens.threshold), 1))
    split = ~ens.is_leaf
    at[np.flatnonzero(split), ens.feature[split]] = ens.threshold[split]
    np.testing.assert_allclose(
        ens.decision_function(at), booster.predict(at, raw_score=True), rtol=1e-9, atol=1e-12
    )


def test_the_ranker_stops_at_its_best_round_and_is_the_same_on_a_second_fit(rng):
    # early stopping on a held-out tenth: the exported trees are those up to the best round,
    # the gains are those trees', and a second fit gives the same trees (seeded, one thread)
    from recsys.models.hybrid import FEATURE_NAMES, HybridConfig, _fit_trees
    from recsys.models.importance import gain_importance

    x = rng.normal(size=(4000, len(FEATURE_NAMES)))
    y = (x[:, 0] + rng.normal(size=4000) > 1.5).astype(np.int8)
    config = HybridConfig(ranker={**HybridConfig().ranker, "max_iter": 400})
    booster, why = _fit_trees(x, y, config)
    assert why is None and 0 < booster.best_iteration < 400
    ens = TreeEnsemble.from_lightgbm(booster)
    assert len(ens.roots) == booster.best_iteration
    np.testing.assert_allclose(
        ens.decision_function(x), booster.predict(x, raw_score=True), rtol=1e-9, atol=1e-12
    )
    gain = gain_importance(booster, FEATURE_NAMES)
    assert max(gain, key=gain.get) == FEATURE_NAMES[0]
    assert sum(gain.values()) == pytest.approx(1.0)
    again = TreeEnsemble.from_lightgbm(_fit_trees(x, y, config)[0])
    for key, value in ens.to_arrays().items():
        np.testing.assert_array_equal(value, again.to_arrays()[key])
    with pytest.raises(ValueError, match="unknown ranker setting"):
        _fit_trees(x, y, HybridConfig(ranker={"max_depth": 3}))


@pytest.mark.parametrize("max_leaf_nodes", [2, 15, 63, 100])
def test_column_permutations_give_the_margins_of_the_permuted_copy(rng, max_leaf_nodes):
    # every column, a column no tree splits on (5) and NaN / infinite values: the margins
    # of the shortcut are the plain evaluation's, bit for bit (100 leaves: no tables)
    x = rng.normal(size=(2000, 6))
    x[rng.random(x.shape) < 0.1] = np.nan
    x[:40, 2] = np.inf
    x[:, 5] = 0.0
    y = (np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 1]) * x[:, 4] > 0).astype(int)
    ens = TreeEnsemble.from_lightgbm(_booster(x, y, max_leaf_nodes, 25))
    rows = rng.normal(size=(3000, 6)) * 2
    rows[rng.random(rows.shape) < 0.2] = np.nan
    rows[:100] = x[:100]
    scorer = ens.column_permutations(rows)
    np.testing.assert_array_equal(scorer.base, ens.decision_function(rows))
    for j in range(6):
        perm = rng.permutation(len(rows))
        copy = rows.copy()
        copy[:, j] = rows[perm, j]
        np.testing.assert_array_equal(scorer.margins(j, perm), ens.decision_function(copy))
        # several permutations of the column at once (what they share is done once)
        perms = [rng.permutation(len(rows)) for _ in range(3)]
        together = scorer.margins_of_each(j, perms)
        for perm, got in zip(perms, together, strict=True):
            copy[:, j] = rows[perm, j]
            np.testing.assert_array_equal(got, ens.decision_function(copy))


def test_rank_lists_order_is_the_lexsort_order(rng):
    # rows sorted by (user, item), as candidates are built, take the per-user path; shuffled
    # rows the lexsort; both give the lists of the plain lexsort, ties by the lower item
    from recsys.models.hybrid import rank_lists

    pos = np.repeat(np.arange(50), rng.integers(0, 30, 50))
    items = np.concatenate(
        [np.sort(rng.choice(200, (pos == u).sum(), replace=False)) for u in range(50)]
    )
    score = rng.integers(0, 4, len(pos)).astype(float)  # many ties
    score[rng.random(len(pos)) < 0.05] = np.nan
    for order in (np.arange(len(pos)), rng.permutation(len(pos))):
        p, i, sc = pos[order], items[order], score[order]
        want = np.lexsort((i, -sc, p))
        up, it = p[want], i[want]
        rank = np.arange(len(up)) - np.searchsorted(up, np.arange(50))[up]
        expected = np.full((50, 10), -1)
        keep = rank < 10
        expected[up[keep], rank[keep]] = it[keep]
        np.testing.assert_array_equal(rank_lists(p, i, sc, 50, 10)[0], expected)


def test_permutation_importance_is_the_plain_shuffle_loop(cluster_data, eval_and_final):
    # the reference: shuffle a copy of the rows per feature and repeat, score it whole
    from recsys.evaluation.evaluate import build_holdout
    from recsys.evaluation.metrics import ndcg_at_k
    from recsys.models.hybrid import FEATURE_NAMES, rank_lists
    from recsys.models.importance import permutation_importance

    events, _ = cluster_data
    model, _ = eval_and_final
    parts = temporal_split(events, 0.2)
    got = permutation_importance(model, parts.train, parts.test, seed=3, repeats=2)
    holdout = build_holdout(model, parts.train, parts.test, model.config.weights)
    rng = np.random.default_rng(3)
    pick = np.sort(rng.permutation(holdout.n_users)[:500])
    users = holdout.user_idx[pick]
    relevant = [holdout.relevant[i] for i in pick]
    cand = build_candidates(
        model.generators_, model.side_, model.seen_, users, model.config.candidates_per_generator
    )
    rows = cand.feature_rows if cand.feature_rows is not None else slice(None)
    x, pos, items = cand.features, cand.user_pos[rows], cand.item_idx[rows]
    x[:, np.isnan(x).all(axis=0)] = 0.0

    def score(r):
        lists, _ = rank_lists(pos, items, model.ranker_.predict_proba(r), len(users), 10)
        return float(np.mean(ndcg_at_k(lists, relevant, 10)))

    base = score(x)
    assert got["baseline"] == base and got["rows"] == len(x)
    for j, name in enumerate(FEATURE_NAMES):
        drops = []
        for _ in range(2):
            shuffled = x.copy()
            shuffled[:, j] = rng.permutation(shuffled[:, j])
            drops.append(base - score(shuffled))
        assert got["drop"][name] == np.mean(drops), name
        assert got["drop_sd"][name] == np.std(drops), name
    assert any(got["drop"].values())  # (some feature matters on these clusters)


@pytest.mark.parametrize("max_items", [12, 30])
def test_ease_lists_over_its_columns_are_the_whole_catalogues(rng, max_items):
    # 12 modelled items of 40: some users have seen all but a few of them, so their lists
    # are completed with -inf columns like the plain path's (the lowest ones)
    from recsys.models.base import Recommender

    data = build_dataset(
        cluster_events(rng, n_users=120, n_items=40, per_user=12), cluster_items(40)
    )
    model = EASERecommender(l2=10.0, max_items=max_items).fit(data)
    users = np.arange(data.n_users)
    for k in (5, 10):
        got = model.recommend(users, k, batch_size=50)
        want = Recommender.recommend(model, users, k, batch_size=50)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
        if max_items == 12 and k == 10:
            assert (~np.isfinite(want[1][:, -1])).any()  # the padded case is exercised


def test_ease_float32_cholesky_matches_float64_inverse(rng):
    data = build_dataset(cluster_events(rng), cluster_items())
    model = EASERecommender(l2=10.0).fit(data)
    x = data.confidence.toarray()[:, model.items_] > 0
    gram = x.T.astype(np.float64) @ x + 10.0 * np.eye(len(model.items_))
    p = np.linalg.inv(gram)
    b = p / -np.diag(p)
    np.fill_diagonal(b, 0.0)
    np.testing.assert_allclose(model.b_, b, atol=1e-5)


def test_lightfm_early_stopping_is_deterministic_and_refits_the_same(rng):
    data = build_dataset(cluster_events(rng), cluster_items())
    users = np.arange(data.n_users)
    relevant = [np.array([int(u) % 20]) for u in users]
    a = LightFMRecommender(no_components=4, epochs=6, seed=3)
    b = LightFMRecommender(no_components=4, epochs=6, seed=3)
    ca = a.fit_early_stopping(data, users, relevant, eval_every=2, patience=1)
    cb = b.fit_early_stopping(data, users, relevant, eval_every=2, patience=1)
    assert ca == cb and 1 <= a.epochs <= 6
    np.testing.assert_array_equal(a.score(users), b.score(users))
    # epoch by epoch = one fit of the chosen length, when it stopped at its best
    refit = LightFMRecommender(**a.params()).fit(data)
    if ca["curve"][-1][0] == a.epochs:
        np.testing.assert_allclose(refit.score(users), a.score(users), rtol=1e-5)


class _ObservedChoice(EpochChoice):
    """An EpochChoice that tells the test when the fit has run as far as it can unaided."""

    def __init__(self, possible):
        super().__init__(possible)
        self.waiting = threading.Event()

    def wait(self):
        self.waiting.set()
        return super().wait()


def _fit_beside(data, params, choice):
    return in_thread(LightFMRecommender(**params).fit_as_chosen, data, choice)


@pytest.mark.parametrize("chosen", [2, 4, 6])
def test_a_fit_beside_early_stopping_is_the_fit_of_the_chosen_count(rng, chosen):
    """Told the count only once it has run as far as any choice can need, it keeps the state
    of each possible count: the model of a plain fit of the chosen length."""
    data = build_dataset(cluster_events(rng), cluster_items())
    params = dict(no_components=4, epochs=30, seed=3)
    choice = _ObservedChoice([2, 4, 6])
    fitting = _fit_beside(data, params, choice)
    assert choice.waiting.wait(60)
    choice.choose(chosen)
    beside = fitting.result(60)
    plain = LightFMRecommender(**{**params, "epochs": chosen}).fit(data)
    assert beside.params() == plain.params()
    for key, value in plain._arrays().items():
        np.testing.assert_array_equal(beside._arrays()[key], value)


def test_a_fit_beside_early_stopping_follows_max_updates_and_failure(rng):
    data = build_dataset(cluster_events(rng), cluster_items())
    nnz = data.confidence.nnz
    # its own data allows 3 epochs: a choice of 6 runs 3, as fit() would
    params = dict(no_components=4, epochs=30, seed=3, max_updates=3 * nnz)
    choice = EpochChoice([2, 6])
    choice.choose(6)
    beside = LightFMRecommender(**params).fit_as_chosen(data, choice)
    plain = LightFMRecommender(**{**params, "epochs": 6}).fit(data)
    assert plain.epochs_for(nnz) == 3
    np.testing.assert_array_equal(beside.item_emb_, plain.item_emb_)
    # early stopping failed: the fit beside it stops with that error instead of waiting
    failed = _ObservedChoice([2])
    fitting = _fit_beside(data, params, failed)
    assert failed.waiting.wait(60)
    failed.choose(None)
    with pytest.raises(RuntimeError, match="early stopping failed"):
        fitting.result(60)


def test_lightfm_max_updates_bounds_epochs():
    m = LightFMRecommender(epochs=30, max_updates=1000)
    assert m.epochs_for(100) == 10 and m.epochs_for(5000) == 1 and m.epochs_for(10) == 30


@pytest.fixture(scope="module")
def cluster_data():
    events = cluster_events(np.random.default_rng(5), n_users=120, n_items=40, per_user=12)
    return events, cluster_items(40)


@pytest.fixture(scope="module")
def eval_and_final(cluster_data):
    events, items = cluster_data
    return fit_eval_and_final(events, items, None, HybridConfig(**FAST), 0.2)


def test_fits_in_threads_equal_a_fit_one_after_the_other(cluster_data, eval_and_final):
    events, items = cluster_data
    _, final = eval_and_final
    _, again = fit_eval_and_final(events, items, None, HybridConfig(**FAST), 0.2)
    with single_threaded_blas():
        sequential, _, _ = fit_generators(build_dataset(events, items), final.config)
    assert sorted(final.generators_) == sorted(sequential)
    for name, model in final.generators_.items():
        for key, value in model._arrays().items():
            np.testing.assert_array_equal(value, sequential[name]._arrays()[key])
            np.testing.assert_array_equal(value, again.generators_[name]._arrays()[key])
    for key, value in final.ranker_.to_arrays().items():
        np.testing.assert_array_equal(value, again.ranker_.to_arrays()[key])


def test_refits_started_at_each_choice_equal_fits_with_the_chosen_configuration(cluster_data):
    """A tuning grid and early stopping: the refits start as the choices are made (the grid
    before LightFM's epoch count); each refit equals a fit with the final configuration."""
    events, items = cluster_data
    grid = {
        "ease": [{"l2": 5.0}, {"l2": 200.0}],
        "cooccurrence": [{"shrink": 0.0}, {"shrink": 50.0}],
    }
    ev, final = fit_eval_and_final(events, items, None, HybridConfig(**{**FAST, "tune": grid}), 0.2)
    assert set(ev.info["tuning"]) == {"ease", "cooccurrence"}
    assert ev.config.lightfm["epochs"] == ev.info["lightfm_early_stopping"]["epochs"]
    split = temporal_split(events, 0.2)
    with single_threaded_blas():
        for model, rows in ((ev, split.train), (final, events)):
            data = model.dataset(rows, items, None)
            sequential, _, _ = fit_generators(data, model.config)
            assert list(model.generators_) == list(sequential)
            for name, gen in model.generators_.items():
                assert gen.params() == sequential[name].params()
                for key, value in gen._arrays().items():
                    np.testing.assert_array_equal(value, sequential[name]._arrays()[key])


def test_eval_and_final_share_the_evaluated_configuration(eval_and_final):
    ev, final = eval_and_final
    assert ev.ranker_ is not None and final.ranker_ is not None
    assert final.info["ranker_from"] == "the newest validation_fraction of all events"
    assert ev.config.lightfm == final.config.lightfm  # the epoch count chosen on validation
    assert len(final.user_ids_) >= len(ev.user_ids_)


def test_long_lists_rank_scored_candidates_first(eval_and_final):
    _, final = eval_and_final
    users = np.arange(len(final.user_ids_))
    lists = serve_top_n(final, users, k=30)
    n_cand = final.config.candidates_per_generator
    short = serve_top_n(final, users, k=n_cand)
    for u in users[:20]:
        mine = lists.user_pos == u
        scored = lists.ranker[mine] > 0
        # every ranker-scored item comes before every filler item
        assert not scored[np.argmax(~scored) :].any() if (~scored).any() else True
        # the head of the long list is the short list
        head = lists.item_idx[mine][: int((short.user_pos == u).sum())]
        assert head.tolist() == short.item_idx[short.user_pos == u].tolist()


def test_long_lists_built_without_fillers_when_no_user_needs_them(eval_and_final):
    # k above the ranked candidates: batches of 4 users, some whose users all have k ranked
    # candidates (built without the fillers) and some with a user short of k (built with them)
    _, final = eval_and_final
    n_ranked = final.config.candidates_per_generator
    users = np.arange(len(final.user_ids_))
    ranked = build_candidates(final.generators_, final.side_, final.seen_, users, n_ranked)
    per_user = np.bincount(ranked.user_pos, minlength=len(users))
    middle = int(np.median(per_user))
    short = [per_user[s : s + 4].min() < middle for s in range(0, len(users), 4)]
    assert middle > n_ranked and any(short) and not all(short)  # both ways are taken
    for k in (n_ranked + 1, middle, 3 * n_ranked):
        lists = {
            flag: serve_top_n_batches(final, users, k, fill_only_when_short=flag)
            for flag in (True, False)
        }
        for field in ServedLists.__dataclass_fields__:
            np.testing.assert_array_equal(
                getattr(lists[True], field), getattr(lists[False], field), err_msg=field
            )


def serve_top_n_batches(model, users, k, fill_only_when_short):
    """`serve_top_n`'s lists (batches of 4, one thread), the fillers' shortcut on or off."""
    parts = map_served_batches(
        model,
        users,
        lambda start, lists, tops: lists,
        k,
        batch_size=4,
        workers=1,
        fill_only_when_short=fill_only_when_short,
    )
    return ServedLists(
        **{
            f: np.concatenate([getattr(p, f) for p in parts])
            for f in ServedLists.__dataclass_fields__
        }
    )


def test_threaded_scoring_gives_the_same_lists(eval_and_final):
    _, final = eval_and_final
    users = np.arange(len(final.user_ids_))
    one = serve_top_n(final, users, k=12, batch_size=16, workers=1)
    two = serve_top_n(final, users, k=12, batch_size=16, workers=2)
    for field in ("user_idx", "item_idx", "rank", "final_score", "reason_code"):
        np.testing.assert_array_equal(getattr(one, field), getattr(two, field))


def test_candidate_columns_give_the_whole_catalogs_top():
    # popularity with many ties (small counts), categories (and none), unavailable items and
    # users with long histories: the columns path picks what the whole catalog would, ties
    # included
    rng = np.random.default_rng(11)
    n_items = 300
    users, picks = rng.integers(0, 60, 4000), rng.zipf(1.3, 4000) % n_items
    rows = [
        (f"u{u}", f"i{i}", "view", m) for m, (u, i) in enumerate(zip(users, picks, strict=True))
    ]
    # users of uncategorised items only: no category affinity, so popularity alone orders
    # their lists and equal counts tie across categories (where the frontier matters)
    rows += [(f"x{u}", "i0", "view", 5000 + u) for u in range(5)]
    events = make_events(rows)
    category = rng.choice(["a", "b", "c", None], n_items)
    category[0] = None
    items = cluster_items(n_items).with_columns(
        pl.Series("category", category.tolist()),
        pl.Series("available", (rng.random(n_items) > 0.1).tolist()),
    )
    data = build_dataset(events, items)
    gens = {
        "popularity": PopularityRecommender("global").fit(data),
        "category": PopularityRecommender("category").fit(data),
        "ease": EASERecommender(l2=5.0, max_items=80).fit(data),
        "cooccurrence": CooccurrenceRecommender(shrink=2.0, neighbors=20).fit(data),
        "recent": RecentItemsRecommender(n_recent=3, neighbors=10).fit(data),
    }
    side = SideFeatures.from_data(data, gens["popularity"])
    # the column and pair scores are the whole block's values
    batch = np.arange(data.n_users)
    cols = np.sort(rng.choice(n_items, 120, replace=False))
    pairs = rng.integers(0, data.n_users, 500), rng.integers(0, n_items, 500)
    for model in [*gens.values(), PopularityRecommender("trending").fit(data)]:
        whole = model.score(batch)
        np.testing.assert_array_equal(model.score_columns(batch, cols), whole[:, cols])
        np.testing.assert_array_equal(model.score_columns(batch, cols[:0]), whole[:, :0])
        np.testing.assert_array_equal(model.score_pairs(*pairs), whole[pairs])
    ease = gens["ease"]  # the columns it proposes: its modelled items
    np.testing.assert_array_equal(
        ease.score_columns(batch, ease.items_), ease.score(batch)[:, ease.items_]
    )

    class WholeCatalog:
        def __init__(self, model):
            self.model = model

        def score(self, user_idx):
            return self.model.score(user_idx)

        def candidate_columns(self, *args):
            return None

        def sparse_scores(self, user_idx):
            return None

    plain = {name: WholeCatalog(m) for name, m in gens.items()}
    for n in (1, 3, 10, 40, 100):
        got = build_candidates(gens, side, gens["popularity"].seen_, batch, n)
        want = build_candidates(plain, side, gens["popularity"].seen_, batch, n)
        for name in gens:
            np.testing.assert_array_equal(got.tops[name], want.tops[name])
            np.testing.assert_array_equal(got.scores[name], want.scores[name])
            np.testing.assert_array_equal(got.ranks[name], want.ranks[name])
        np.testing.assert_array_equal(got.features, want.features)


def test_category_frontier_flags_scores_equal_across_popularities():
    # two popularities whose category scores round to the same float32: the less popular item
    # (lower index) is the user's top, outside the columns; the frontier says so
    model = PopularityRecommender("category")
    model.pop_ = np.array([0.1, 0.49999994, 0.49999997, 0.05], np.float32)
    model.item_category_ = np.array([0, 1, 1, 0], np.int32)
    model.user_category_ = np.zeros((1, 2), np.float32)  # no affinity: popularity alone
    scores = model.score(np.array([0]))
    assert scores[0, 1] == scores[0, 2]
    best = top_k(scores, 1)[0][0, 0]
    seen = sp.csr_matrix((1, 4), dtype=np.float32)
    cols, frontier = model.candidate_columns(1, seen, np.zeros(4, bool))
    assert best == 1 and 1 not in cols and 1 in frontier
    assert scores[0, frontier].max() >= scores[0, best]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values: Linux")
def test_a_background_thread_lowers_its_own_priority_only():
    def nice_of_this_thread():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = nice_of_this_thread()
    lowered = in_thread(lambda: (lower_thread_priority(5), nice_of_this_thread())[1]).result()
    assert lowered == min(before + 5, 19)
    assert nice_of_this_thread() == before


def test_the_grids_are_scored_on_a_seeded_sample_of_the_validation_users(cluster_data):
    """`tune_max_users`: every value of a grid is scored on the same seeded sample of the
    validation users (a paired comparison), and the figures are those of separately fitted
    models on exactly that sample; 0 scores every user, as before."""
    from recsys.evaluation.evaluate import build_holdout
    from recsys.evaluation.metrics import ndcg_at_k
    from recsys.models.hybrid import HybridRecommender, _sample_holdout, fit_window_generators

    events, items = cluster_data
    grid = {"ease": [{"l2": 5.0}, {"l2": 200.0}], "cooccurrence": [{"shrink": 0.0}]}
    split = temporal_split(events, 0.0, 0.2)
    for max_users in (0, 25):
        cfg = HybridConfig(**{**FAST, "tune": grid, "tune_max_users": max_users})
        cfg.lightfm_early_stopping = None
        data = HybridRecommender(cfg).dataset(split.fit, items, None)
        holdout = build_holdout(data, split.fit, split.validation, cfg.weights)
        assert holdout.n_users > 25
        with single_threaded_blas():
            _, chosen = fit_window_generators(data, holdout, cfg)
        scored = holdout if max_users == 0 else _sample_holdout(holdout, max_users, cfg.seed)
        assert scored.n_users == (holdout.n_users if max_users == 0 else 25)
        for name, overrides in grid.items():
            tuning = chosen["tuning"][name]
            assert tuning["validation_users"] == scored.n_users
            base = HybridConfig().generator_params(name)
            cls = EASERecommender if name == "ease" else CooccurrenceRecommender
            want = []
            for override in overrides:
                rec, _ = cls(**{**base, **override}).fit(data).recommend(scored.user_idx, 10)
                want.append(float(ndcg_at_k(rec, scored.relevant, 10).mean()))
            assert tuning["validation_ndcg@10"] == want
            best = overrides[int(np.argmax(want))]
            assert tuning["chosen"] == best and getattr(cfg, name).items() >= best.items()

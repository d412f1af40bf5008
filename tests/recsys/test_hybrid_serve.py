"""The hybrid (generators + ranker), the served lists, degenerate inputs and the registry."""

import numpy as np
import polars as pl
import pytest
from synthetic_events import cluster_events, cluster_items, make_events

from recsys.evaluation.offline import evaluate_offline
from recsys.models.hybrid import HybridConfig, HybridRecommender
from recsys.models.serve import (
    REASON_CODES,
    item_factors,
    popular_items,
    serve_top_n,
    similar_items_cooccurrence,
    similar_items_embedding,
    user_factors,
)

FAST = dict(
    lightfm={"no_components": 8, "epochs": 5, "seed": 1, "num_threads": 1},
    ranker={"max_iter": 20, "max_leaf_nodes": 7, "min_samples_leaf": 5},
    tune={"ease": [{"l2": 10.0}, {"l2": 50.0}]},
    candidates_per_generator=20,
    min_ranker_positives=5,
    served="hybrid",  # the ranked list, whatever validation says (tests of the ranker)
)


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(5)
    events = cluster_events(rng, n_users=120, n_items=40, per_user=12)
    return events, cluster_items(40)


@pytest.fixture(scope="module")
def fitted(world):
    events, items = world
    return HybridRecommender(HybridConfig(**FAST)).fit(events, items)


def test_ranker_trained_and_lists_are_served(fitted):
    assert fitted.ranker_ is not None and fitted.info["ranker_skipped"] is None
    users = np.arange(len(fitted.user_ids_))
    s = serve_top_n(fitted, users, k=5)
    assert len(s) == 5 * len(users)
    # sorted by user then rank, one row per (user, item), never a seen item
    assert np.all(np.diff(s.user_idx) >= 0)
    assert len(set(zip(s.user_idx.tolist(), s.item_idx.tolist(), strict=True))) == len(s)
    seen = fitted.seen_.toarray() > 0
    assert not seen[s.user_idx, s.item_idx].any()
    assert np.array_equal(s.final_score, s.ranker)
    assert set(np.unique(s.reason_code)) <= set(REASON_CODES)
    for col in (s.pop, s.cooc, s.emb):
        assert col.dtype == np.float32 and np.isfinite(col).all()
    # users stay inside their taste cluster
    item_no = np.array([int(x[1:]) for x in fitted.item_ids_])
    user_no = np.array([int(x[1:]) for x in fitted.user_ids_])
    assert np.mean((item_no[s.item_idx] >= 20) == (user_no[s.user_idx] % 2 == 1)) > 0.9


def test_factors_and_similar_lists(fitted):
    emb, bias = item_factors(fitted)
    uemb, ubias = user_factors(fitted)
    assert emb.shape[0] == bias.shape[0] == len(fitted.item_ids_)
    assert uemb.shape[1] == emb.shape[1] and ubias.shape[0] == len(fitted.user_ids_)
    idx, val = similar_items_embedding(fitted, k=5)
    assert idx.shape == (len(fitted.item_ids_), 5)
    assert not np.any(idx == np.arange(len(idx))[:, None])
    co_idx, co_val = similar_items_cooccurrence(fitted, k=5)
    item_no = np.array([int(x[1:]) for x in fitted.item_ids_])
    ok = co_idx >= 0
    same = (item_no[co_idx] >= 20) == (item_no[:, None] >= 20)
    assert same[ok].all() and np.all(np.diff(co_val, axis=1) <= 1e-6)
    top, _ = popular_items(fitted, 3)
    assert len(top) == 3


def test_save_load_serves_identically(fitted, tmp_path):
    fitted.save(str(tmp_path / "h"))
    loaded = HybridRecommender.load(str(tmp_path / "h"))
    users = np.arange(len(fitted.user_ids_))
    a, b = serve_top_n(fitted, users, 10), serve_top_n(loaded, users, 10)
    np.testing.assert_array_equal(a.item_idx, b.item_idx)
    np.testing.assert_allclose(a.final_score, b.final_score, rtol=1e-6)


def test_same_data_and_config_give_same_metrics(world):
    events, items = world
    cfg = dict(FAST, tune={})
    t1 = evaluate_offline(events, items, config=HybridConfig(**cfg), n_resamples=50).table
    t2 = evaluate_offline(events, items, config=HybridConfig(**cfg), n_resamples=50).table
    assert t1.height == 6  # five generators of their own and the served list
    assert t1.equals(t2)


@pytest.mark.parametrize(
    "rows",
    [
        [
            ("solo", "x", "view", 0),
            ("solo", "y", "purchase", 1),
            ("solo", "z", "view", 2),
        ],  # one user
        [("a", "x", "view", 0), ("b", "x", "view", 1), ("c", "x", "purchase", 2)],  # one item
        [
            ("a", "x", "view", 0),
            ("b", "y", "view", 0),
            ("a", "y", "view", 0),
            ("c", "z", "view", 0),
        ],  # one second
        [("a", "x", "dislike", 0)],  # nothing positive
    ],
    ids=["one-user", "one-item", "same-second", "only-dislikes"],
)
def test_degenerate_inputs_fall_back_to_popularity(rows):
    events = make_events(rows)
    model = HybridRecommender(HybridConfig(**FAST)).fit(events)
    assert model.ranker_ is None and model.info["ranker_skipped"]
    assert "popularity" in model.generators_
    s = serve_top_n(model, np.arange(len(model.user_ids_)), k=5)
    seen = model.seen_.toarray() > 0
    assert not seen[s.user_idx, s.item_idx].any()
    result = evaluate_offline(events, config=HybridConfig(**FAST), n_resamples=10)
    assert isinstance(result.table, pl.DataFrame)


def test_unavailable_items_are_never_served(world):
    events, items = world
    items = items.with_columns(
        pl.when(pl.col("item_id") == "i0").then(False).otherwise(True).alias("available")
    )
    model = HybridRecommender(HybridConfig(**FAST)).fit(events, items)
    s = serve_top_n(model, np.arange(len(model.user_ids_)), 10)
    assert "i0" not in set(model.item_ids_[s.item_idx])

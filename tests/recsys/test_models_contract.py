"""The shared contract every recommender meets, on synthetic data with a known answer."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from synthetic_events import cluster_events, cluster_items

from recsys.models.base import Recommender
from recsys.models.cooccurrence import CooccurrenceRecommender
from recsys.models.data import build_dataset
from recsys.models.ease import EASERecommender
from recsys.models.lightfm_model import LightFMRecommender, item_feature_matrix
from recsys.models.popularity import PopularityRecommender
from recsys.models.recent import RecentItemsRecommender
from recsys.models.topk import top_k

PERSONALISED = [
    pytest.param(lambda: CooccurrenceRecommender(shrink=1.0), id="cooccurrence"),
    pytest.param(lambda: EASERecommender(l2=10.0), id="ease"),
    pytest.param(lambda: LightFMRecommender(no_components=8, epochs=20, seed=1), id="lightfm"),
    pytest.param(lambda: PopularityRecommender("category"), id="popularity-category"),
    pytest.param(lambda: RecentItemsRecommender(n_recent=3, shrink=1.0), id="recent"),
]
ALL = [
    pytest.param(lambda: PopularityRecommender("global"), id="popularity"),
    pytest.param(lambda: PopularityRecommender("trending"), id="trending"),
    *PERSONALISED,
]


@pytest.fixture
def data(rng):
    return build_dataset(cluster_events(rng), cluster_items())


def _cluster_of_items(data, idx):
    number = np.array([int(s[1:]) for s in data.item_ids])
    return number[idx] >= 10


@pytest.mark.parametrize("make", ALL)
def test_recommend_shape_and_excludes_seen(make, data):
    model = make().fit(data)
    users = np.arange(data.n_users)
    items, scores = model.recommend(users, k=5)
    assert items.shape == scores.shape == (data.n_users, 5)
    seen = data.confidence.toarray() > 0
    finite = np.isfinite(scores)
    assert not seen[np.repeat(users, 5).reshape(-1, 5)[finite], items[finite]].any()
    # best first
    assert np.all(np.diff(np.where(finite, scores, -1e30), axis=1) <= 1e-6)


@pytest.mark.parametrize("make", PERSONALISED)
def test_personalised_models_stay_in_the_users_cluster(make, data):
    model = make().fit(data)
    users = np.arange(data.n_users)
    user_cluster = np.array([int(s[1:]) % 2 == 1 for s in data.user_ids[users]])
    items, scores = model.recommend(users, k=3)
    ok = np.isfinite(scores)
    same = _cluster_of_items(data, items) == user_cluster[:, None]
    assert same[ok].mean() >= 0.9


def test_global_popularity_known_answer():
    from synthetic_events import make_events

    ev = make_events(
        [
            ("a", "x", "view", 0),
            ("b", "x", "view", 1),
            ("c", "x", "view", 2),
            ("a", "y", "view", 3),
            ("b", "y", "view", 4),
            ("c", "z", "view", 5),
        ]
    )
    data = build_dataset(ev)
    model = PopularityRecommender().fit(data)
    items, _ = model.recommend(np.array([0]), k=3, exclude_seen=False)
    assert list(data.item_ids[items[0]]) == ["x", "y", "z"]


@pytest.mark.parametrize("make", ALL)
def test_save_load_roundtrip_identical_scores(make, data, tmp_path):
    model = make().fit(data)
    model.save(str(tmp_path / "m"))
    loaded = Recommender.load(str(tmp_path / "m"))
    users = np.arange(data.n_users)
    np.testing.assert_array_equal(model.score(users), loaded.score(users))
    assert type(loaded) is type(model) and loaded.params() == model.params()
    assert not any(p.suffix == ".pkl" for p in (tmp_path / "m").iterdir())


@pytest.mark.parametrize("make", ALL)
def test_fit_is_deterministic(make, rng):
    events, items = cluster_events(np.random.default_rng(7)), cluster_items()
    a = make().fit(build_dataset(events, items)).score(np.arange(10))
    b = make().fit(build_dataset(events, items)).score(np.arange(10))
    np.testing.assert_array_equal(a, b)


def test_lightfm_scores_items_nobody_touched(rng):
    events = cluster_events(rng)
    items = cluster_items(22)  # i20, i21: new items with features only
    data = build_dataset(events, items)
    model = LightFMRecommender(no_components=8, epochs=5).fit(data)
    s = model.score(np.arange(3))
    new = data.item_index(["i20", "i21"])
    assert np.isfinite(s[:, new]).all() and np.ptp(s[:, new]) > 0


def test_lightfm_features_that_repeat_the_category_or_brand_are_read_once(rng):
    """Tags naming an item's own category or brand (as the demo data and the Taobao adapter
    give) repeat its category and brand columns: each repeat is added into the column it
    repeats, so an item's features keep their weights (category twice as heavy) in fewer
    columns. A tag on a set of items no other column has stays a column of its own."""
    events = cluster_events(rng)
    plain = cluster_items(22).with_columns(
        brand=pl.when(pl.col("price") < 15).then(pl.lit("b1")).otherwise(pl.lit("b2")),
        tags=pl.when(pl.col("price").is_in([3.0, 12.0])).then(pl.lit(["sale"])),
    )
    repeats = plain.with_columns(
        tags=pl.concat_list(
            pl.lit("category:") + pl.col("category"),
            pl.lit("brand:") + pl.col("brand"),
            pl.col("tags").fill_null(pl.lit([], pl.List(pl.String))),
        )
    )
    a, b = build_dataset(events, plain), build_dataset(events, repeats)
    assert b.item_tags.shape[1] == a.item_tags.shape[1] + 4  # 2 categories, 2 brands
    fa, fb = item_feature_matrix(a), item_feature_matrix(b)
    assert fb.shape == fa.shape == (22, 22 + 2 + 2 + 1)  # identity, category, brand, "sale"
    assert ((fa != 0) != (fb != 0)).nnz == 0  # the same columns
    i0, i3 = b.item_index(["i0", "i3"])  # i0: category a, brand b1; i3 the same and "sale"
    assert sorted(fa[i0].data) == pytest.approx([1 / 3] * 3)
    assert sorted(fb[i0].data) == pytest.approx([1 / 5, 2 / 5, 2 / 5])
    assert sorted(fb[i3].data) == pytest.approx([1 / 6, 1 / 6, 2 / 6, 2 / 6])
    assert fb[i0, i0] == pytest.approx(1 / 5)  # (the identity)
    other = plain.with_columns(tags=pl.when(pl.col("price") < 5).then(pl.lit(["new"])))
    assert item_feature_matrix(build_dataset(events, other)).shape[1] == 22 + 2 + 2 + 1


def test_top_k_breaks_ties_by_index():
    idx, val = top_k(np.array([[1.0, 3.0, 3.0, 0.5]]), 3)
    assert idx.tolist() == [[1, 2, 0]] and val.tolist() == [[3.0, 3.0, 1.0]]

"""Served quality: the published model is the evaluated procedure, what serves is chosen on
validation (never worse than a baseline beyond its interval), recency, and bad input."""

from datetime import timedelta

import numpy as np
import polars as pl
import pytest
from synthetic_events import START, cluster_events, cluster_items, make_events

from recsys.contract import EVENT_SCHEMA
from recsys.models.data import build_dataset, sequence_transitions, temporal_split
from recsys.models.hybrid import (
    HYBRID,
    HybridConfig,
    HybridRecommender,
    choose_served,
    fit_eval_and_final,
    weigh_lightfm,
)
from recsys.models.recent import RecentItemsRecommender, recent_history
from recsys.models.serve import item_factors, serve_top_n

FAST = dict(
    lightfm={"no_components": 8, "epochs": 6, "seed": 1, "num_threads": 1},
    lightfm_early_stopping={"eval_every": 2, "patience": 1, "max_users": 50},
    ranker={"max_iter": 20, "max_leaf_nodes": 7, "min_samples_leaf": 5},
    tune={"ease": [{"l2": 5.0}, {"l2": 200.0}], "cooccurrence": [{"shrink": 0.0}]},
    candidates_per_generator=8,
    min_ranker_positives=5,
)


@pytest.fixture(scope="module")
def cluster_data():
    events = cluster_events(np.random.default_rng(5), n_users=120, n_items=40, per_user=12)
    return events, cluster_items(40)


def _same_model(a: HybridRecommender, b: HybridRecommender) -> None:
    assert list(a.generators_) == list(b.generators_)
    for name, gen in a.generators_.items():
        assert gen.params() == b.generators_[name].params()
        for key, value in gen._arrays().items():
            np.testing.assert_array_equal(value, b.generators_[name]._arrays()[key])
    assert (a.ranker_ is None) == (b.ranker_ is None)
    if a.ranker_ is not None:
        for key, value in a.ranker_.to_arrays().items():
            np.testing.assert_array_equal(value, b.ranker_.to_arrays()[key])
    users = np.arange(len(a.user_ids_))
    la, lb = serve_top_n(a, users, 10), serve_top_n(b, users, 10)
    np.testing.assert_array_equal(la.item_idx, lb.item_idx)
    np.testing.assert_array_equal(la.final_score, lb.final_score)


@pytest.mark.parametrize("validation_fraction", [0.2, 0.15], ids=["train-reused", "own-window"])
def test_published_model_is_the_evaluated_procedure_on_all_events(
    cluster_data, validation_fraction
):
    """The published model equals ``HybridRecommender(its config).fit(all events)``: the
    evaluated procedure (ranker on the newest window, generators refit on everything) with
    the choices made on the evaluated model's validation window, whether its ranker's window
    reuses the train refit (validation_fraction == test_fraction) or not."""
    events, items = cluster_data
    cfg = HybridConfig(
        **FAST,
        served=HYBRID,
        include_catalog_items=False,
        validation_fraction=validation_fraction,
    )
    ev, final = fit_eval_and_final(events, items, None, cfg, 0.2)
    assert final.ranker_ is not None
    # every choice of the evaluated fit is in the published configuration
    assert final.config.lightfm == ev.config.lightfm and final.config.ease == ev.config.ease
    assert final.config.tune == {} and final.config.lightfm_early_stopping is None
    again = HybridRecommender(HybridConfig.from_dict(final.config.to_dict())).fit(events, items)
    _same_model(final, again)
    assert again.info["ranker_label_pairs"] == final.info["ranker_label_pairs"]


def test_a_generator_that_beats_the_ranked_list_on_validation_serves(cluster_data):
    """Two taste clusters that are two categories: category popularity is as good as it
    gets, and a ranker that cannot split (a leaf needs more rows than there are) orders the
    candidates by item index, worse beyond its interval. Category popularity serves, in
    both models, and says why."""
    events, items = cluster_data
    flat = {"max_iter": 2, "max_leaf_nodes": 2, "min_samples_leaf": 100_000}
    cfg = HybridConfig(**{**FAST, "candidates_per_generator": 20, "tune": {}, "ranker": flat})
    ev, final = fit_eval_and_final(events, items, None, cfg, 0.2)
    sel = ev.info["selection"]
    assert sel["served"] == "category" and "beats hybrid" in sel["reason"]
    figures = sel["validation_ndcg@10"]
    # the flat ranker orders the candidates alike with LightFM or without: left out (a
    # tie), its own list still measured
    assert not sel["lightfm"]["kept"] and "lightfm" not in ev.generators_
    assert set(figures) == {*ev.generators_, "lightfm", HYBRID}
    assert figures["category"] == max(figures.values())
    assert sel["difference"]["low"] > 0
    for model in (ev, final):
        assert model.ranker_ is None and model.info["served_by"] == "category"
    assert final.info["selection"]["served"] == "category"
    # the served list is category popularity's own list
    users = np.arange(len(final.user_ids_))
    served = serve_top_n(final, users, 5)
    own, _ = final.generators_["category"].recommend(users, 5)
    assert served.item_idx.reshape(-1, 5).tolist() == own.tolist()


# LightFM adds no candidate (every generator proposes every item) and, untrained, nothing the
# shallow trees split on: the ranked lists with and without it are the same
NOTHING_TO_ADD = dict(
    candidates_per_generator=40,
    lightfm={**FAST["lightfm"], "learning_rate": 0.0},
    ranker={"max_iter": 3, "max_leaf_nodes": 2, "min_samples_leaf": 20},
)


@pytest.mark.parametrize(
    "overrides, kept", [({}, True), (NOTHING_TO_ADD, False)], ids=["helps", "adds-nothing"]
)
def test_lightfm_is_kept_only_when_the_ranked_list_with_it_is_better_on_validation(
    cluster_data, overrides, kept, tmp_path
):
    """LightFM is weighed on the evaluated model's validation window: the ranked list with
    it against the one without it, on the same held-out users. Left out, both models are
    those fitted with it switched off from the start (its refits never ran), the published
    one is still its configuration's fit on all events, and the figures say why."""
    events, items = cluster_data
    cfg = HybridConfig(**{**FAST, **overrides, "include_catalog_items": False})
    ev, final = fit_eval_and_final(events, items, None, cfg, 0.2)
    verdict = ev.info["selection"]["lightfm"]
    assert verdict["kept"] is kept and final.info["selection"]["lightfm"] == verdict
    figures = verdict["validation_ndcg@10"]
    assert (figures["with"] > figures["without"]) is kept and verdict["validation_users"] >= 20
    for model in (ev, final):
        assert ("lightfm" in model.generators_) is kept
    assert final.config.weigh_lightfm is False
    again = HybridRecommender(HybridConfig.from_dict(final.config.to_dict())).fit(events, items)
    _same_model(final, again)
    if not kept:
        assert figures["with"] == figures["without"]  # a tie: the cheaper list
        assert "lightfm" not in final.config.generators
        # not a generator, but still fitted on all events for the snapshot's embeddings
        assert final.config.lightfm_factors and ev.factors_ is None
        emb, bias = item_factors(final)
        assert emb.shape[0] == len(final.item_ids_) == len(bias)
        (tmp_path / "final" / "lightfm").mkdir(parents=True)  # as a model saved before left
        (tmp_path / "final" / "lightfm" / "arrays.npz").write_bytes(b"stale")
        final.save(str(tmp_path / "final"))
        assert not (tmp_path / "final" / "lightfm").exists()
        loaded = HybridRecommender.load(str(tmp_path / "final"))
        assert loaded.factors_.seen_ is loaded.seen_  # one seen matrix in memory
        for key, value in final.factors_._arrays().items():
            np.testing.assert_array_equal(value, again.factors_._arrays()[key])
            np.testing.assert_array_equal(value, loaded.factors_._arrays()[key])
        assert ev.info["generators_skipped"]["lightfm"].startswith("left out on validation")
        off = HybridConfig.from_dict(ev.config.to_dict())  # LightFM off from the start
        off.weigh_lightfm = False
        off.served = None
        train = temporal_split(events, 0.2).train  # (the evaluated model's events)
        _same_model(ev, HybridRecommender(off).fit(train, items))


def test_lightfm_whose_own_list_serves_is_kept_even_when_the_ranked_lists_tie(cluster_data):
    """A ranker that cannot split orders the same candidates the same way with LightFM or
    without it (a tie: the cheaper list), but LightFM's own list beats that ranked list
    beyond its interval and serves: LightFM stays, in both models."""
    events, items = cluster_data
    flat = {"max_iter": 2, "max_leaf_nodes": 2, "min_samples_leaf": 100_000}
    cfg = HybridConfig(
        **{**FAST, "ranker": flat, "tune": {}, "candidates_per_generator": 40},
        generators=["popularity", "lightfm"],
    )
    ev, final = fit_eval_and_final(events, items, None, cfg, 0.2)
    sel = ev.info["selection"]
    assert sel["served"] == "lightfm" and sel["difference"]["low"] > 0
    assert sel["lightfm"]["kept"] and "own list serves" in sel["lightfm"]["reason"]
    assert sel["lightfm"]["difference"]["mean"] == 0.0
    for model in (ev, final):
        assert list(model.generators_) == ["popularity", "lightfm"]
        assert model.info["served_by"] == "lightfm"


def test_weigh_lightfm_on_known_figures():
    rng = np.random.default_rng(4)
    base = rng.random(100)
    better = weigh_lightfm({HYBRID: base + 0.01}, {HYBRID: base}, HybridConfig())
    assert better["kept"] and better["difference"]["mean"] == pytest.approx(0.01)
    tie = weigh_lightfm({HYBRID: base}, {HYBRID: base}, HybridConfig())
    assert not tie["kept"] and "does not beat" in tie["reason"]
    worse = weigh_lightfm({HYBRID: base}, {HYBRID: base + 0.02}, HybridConfig())
    assert (
        not worse["kept"]
        and worse["validation_ndcg@10"]["without"] > worse["validation_ndcg@10"]["with"]
    )
    few = weigh_lightfm({HYBRID: base[:5]}, {HYBRID: base[:5] + 1}, HybridConfig())
    assert few["kept"] and "min_selection_users=20" in few["reason"]
    assert weigh_lightfm({"ease": base}, None, HybridConfig())["kept"]  # no ranked list


def test_choose_served_keeps_the_ranked_list_within_the_interval():
    rng = np.random.default_rng(3)
    base = rng.random(200)
    noisy = {"popularity": base * 0.5, "ease": base + rng.normal(0, 0.05, 200), HYBRID: base}
    sel = choose_served(noisy, HybridConfig())
    assert sel["served"] == HYBRID and sel["best_single"] == "ease"
    assert sel["difference"]["low"] < 0 < sel["difference"]["high"]
    # without a ranked list, the best generator must beat popularity beyond its interval
    sel = choose_served({"popularity": base * 0.5, "ease": base}, HybridConfig(), "no ranker")
    assert sel["served"] == "ease"
    sel = choose_served({"popularity": base, "ease": base}, HybridConfig(), "no ranker")
    assert sel["served"] == "popularity" and "no ranker" in sel["reason"]


@pytest.mark.parametrize(
    "events",
    [
        make_events([("a", "x", "view", 0), ("b", "y", "view", 1), ("a", "y", "view", 2)]),
        pl.DataFrame(schema=EVENT_SCHEMA),
    ],
    ids=["tiny", "empty"],
)
def test_a_tiny_or_empty_validation_window_serves_popularity_with_the_reason(events):
    model = HybridRecommender(HybridConfig(**FAST)).fit(events)
    sel = model.info["selection"]
    assert sel["served"] == "popularity" and model.info["served_by"] == "popularity"
    assert "popularity serves" in sel["reason"] and sel["reason"].split(":")[0]
    assert model.ranker_ is None


def _one_type_events(n_users: int, per_user: int, event_type: str, seed: int) -> pl.DataFrame:
    """Two clusters of users (cluster = user % 2), each touching `per_user` items of its
    cluster's ten, all with one event type, spread over 60 days."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for i in rng.choice(10, per_user, replace=False) + 10 * (u % 2):
            rows.append((f"u{u}", f"i{i}", event_type, int(rng.integers(0, 60 * 24 * 60))))
    rows.sort(key=lambda r: r[3])
    return make_events(rows)


@pytest.mark.parametrize(
    "events",
    [_one_type_events(150, 4, "purchase", 1), _one_type_events(600, 1, "view", 2)],
    ids=["only-purchases", "one-event-per-user"],
)
def test_single_event_type_and_single_event_users_are_served_with_a_recorded_choice(events):
    ev, final = fit_eval_and_final(events, cluster_items(20), None, HybridConfig(**FAST), 0.2)
    for model in (ev, final):
        sel = model.info["selection"]
        assert sel["served"] in (HYBRID, *model.generators_) and sel["reason"]
        assert model.info["served_by"] == (
            HYBRID if model.ranker_ is not None else model.info["fallback_order"]
        )
        users = np.arange(len(model.user_ids_))
        lists = serve_top_n(model, users, 3)
        seen = model.seen_.toarray() > 0
        assert len(lists) and not seen[lists.user_idx, lists.item_idx].any()


def test_sequence_transitions_and_recent_items_known_answer():
    """u1 touched a, b, c, d in that order; u2 touched d then e, u3 b then f. For u1, whose
    newest item is d, e (after d) outranks f (after b, two items further back)."""
    t = [
        ("u1", "a", "view", 0),
        ("u1", "b", "view", 60),
        ("u1", "c", "view", 120),
        ("u1", "d", "view", 180),
        ("u2", "d", "view", 240),
        ("u2", "e", "purchase", 300),
        ("u3", "b", "view", 360),
        ("u3", "b", "view", 400),  # a repeat in a row is one step
        ("u3", "f", "view", 420),
        ("u4", "x", "impression", 430),  # weighs 0: no transition
        ("u4", "f", "view", 440),
    ]
    data = build_dataset(make_events(t))
    idx = {k: int(v) for k, v in zip(data.item_ids, range(data.n_items), strict=True)}
    tr = sequence_transitions(make_events(t), None, data.user_ids, data.item_ids, window=3)
    assert tr[idx["a"], idx["b"]] == 1.0 and tr[idx["a"], idx["c"]] == 0.5
    assert tr[idx["a"], idx["d"]] == pytest.approx(1 / 3) and tr[idx["a"], idx["e"]] == 0.0
    assert tr[idx["b"], idx["f"]] == 1.0 and tr[idx["f"], idx["b"]] == 1.0
    assert tr[idx["d"], idx["e"]] == 1.0 and not tr.diagonal().any()
    hist = recent_history(data.last_days, n_recent=2, half_life=1.0).toarray()
    u1 = int(data.user_index(["u1"])[0])
    assert hist[u1, idx["d"]] == 1.0 and hist[u1, idx["c"]] == 0.5 and hist[u1, idx["a"]] == 0
    model = RecentItemsRecommender(n_recent=4, half_life=1.0, shrink=0.0).fit(data)
    s = model.score(np.array([u1]))[0]
    assert s[idx["e"]] > s[idx["f"]] > 0


def test_recency_features_are_days_since_the_users_last_event():
    ev = make_events([("a", "x", "view", 0), ("a", "y", "view", 1440), ("b", "y", "view", 0)])
    items = cluster_items(2).with_columns(pl.Series("item_id", ["x", "y"]))
    model = HybridRecommender(HybridConfig(**FAST)).fit(ev, items)
    side = model.side_
    a, b = (int(i) for i in model.user_index(["a", "b"]))
    assert side.user_days_since_last[a] == 0.0 and side.user_days_since_last[b] == 1.0
    assert model.data_.now == START + timedelta(days=1)

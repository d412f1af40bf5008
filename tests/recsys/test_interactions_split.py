"""Interactions (weights, decay, dislikes) and the temporal split."""

import numpy as np
import polars as pl
import pytest
from synthetic_events import make_events

from recsys.evaluation.evaluate import build_holdout
from recsys.models.data import build_dataset, holdout_pairs, interactions, temporal_split


def test_weights_sum_and_dislike_drops_pair():
    ev = make_events(
        [
            ("a", "x", "view", 0),
            ("a", "x", "purchase", 1),
            ("a", "y", "view", 2),
            ("a", "y", "dislike", 3),
            ("b", "y", "add_to_cart", 4),
            ("b", "z", "impression", 5),
        ]
    )
    inter = interactions(ev)
    got = {(r["user_id"], r["item_id"]): r["confidence"] for r in inter.frame.iter_rows(named=True)}
    assert got == {("a", "x"): 9.0, ("b", "y"): 4.0}  # a-y: 1 - 4 < 0 dropped; impression weighs 0
    assert list(inter.user_ids) == ["a", "b"] and list(inter.item_ids) == ["x", "y"]
    m = inter.matrix().toarray()
    assert m[0, 0] == 9.0 and m[1, 1] == 4.0


def test_tenant_weights_override():
    ev = make_events([("a", "x", "view", 0), ("a", "y", "signup_bonus", 0)])
    got = interactions(ev, {"view": 2.0, "signup_bonus": 5.0}).frame
    assert dict(zip(got["item_id"], got["confidence"], strict=True)) == {"x": 2.0, "y": 5.0}


def test_half_life_decay():
    ev = make_events([("a", "old", "view", 0), ("a", "new", "view", 60 * 24 * 10)])
    got = interactions(ev, half_life_days=10.0).frame
    conf = dict(zip(got["item_id"], got["confidence"], strict=True))
    assert conf["new"] == pytest.approx(1.0) and conf["old"] == pytest.approx(0.5)


def test_temporal_split_by_quantile_and_order():
    ev = make_events([("u", f"i{k}", "view", k) for k in range(100)]).sample(
        fraction=1.0, shuffle=True, seed=1
    )
    s = temporal_split(ev, test_fraction=0.2, validation_fraction=0.25)
    assert (s.fit.height, s.validation.height, s.test.height) == (60, 20, 20)
    assert s.fit["timestamp"].max() <= s.validation["timestamp"].min()
    assert s.validation["timestamp"].max() <= s.test["timestamp"].min()
    assert s.train.height == 80


def test_holdout_protocol_drops_cold_and_repeat_pairs():
    train = make_events([("a", "x", "view", 0), ("b", "y", "view", 1)])
    test = make_events(
        [
            ("a", "x", "view", 5),
            ("a", "y", "view", 6),
            ("c", "x", "view", 7),
            ("a", "new", "view", 8),
        ]
    )
    pairs = holdout_pairs(train, test)
    assert pairs.rows() == [("a", "y")]
    data = build_dataset(train)
    h = build_holdout(data, train, test)
    assert h.user_idx.tolist() == [0] and [r.tolist() for r in h.relevant] == [[1]]
    assert np.array_equal(data.item_index(["y", "nope"]), [1, -1])


def test_holdout_rows_without_ids_are_no_pairs_and_hide_none():
    """A null user id sorted first and emptied every range of users: one such row in a holdout
    file made the whole holdout score nobody."""
    train = make_events([("a", "x", "view", 0), ("b", "y", "view", 1), ("a", "z", "view", 2)])
    test = make_events([("a", "y", "view", 5), ("b", "x", "view", 6), ("b", "z", "view", 7)])
    holed = pl.concat(
        [
            test,
            test.head(1).with_columns(pl.lit(None, pl.String).alias("user_id")),
            test.head(1).with_columns(pl.lit(None, pl.String).alias("item_id")),
        ]
    )
    want = [("a", "y"), ("b", "x"), ("b", "z")]
    assert holdout_pairs(train, test).rows() == want
    assert holdout_pairs(train, holed).rows() == want
    assert holdout_pairs(train, holed.lazy()).rows() == want


@pytest.mark.parametrize("rows_at_a_time", [1_000_000, 3, 1])
def test_in_time_order_is_whether_the_sort_keeps_every_row(monkeypatch, rows_at_a_time):
    """Frames with tied times, repeated and null ids, sorted or not: `in_time_order` says
    whether `temporal_split`'s stable sort by (timestamp, event_id) leaves them as they are,
    whatever the slices it checks."""
    import recsys.models.data as data

    monkeypatch.setattr(data, "ORDER_CHECK_ROWS", rows_at_a_time)
    rng = np.random.default_rng(7)
    verdicts = set()
    for trial in range(300):
        n = int(rng.integers(0, 9))
        frame = pl.DataFrame(
            {
                "timestamp": rng.integers(0, 3, n) * 1_000_000,
                "event_id": [None if x == 0 else f"e{x}" for x in rng.integers(0, 4, n)],
            },
            schema={"timestamp": pl.Int64, "event_id": pl.String},
        ).with_columns(pl.col("timestamp").cast(pl.Datetime("us", "UTC")))
        if trial % 2:  # half of them sorted: in order by construction
            frame = frame.sort("timestamp", "event_id", maintain_order=True)
        order = frame.select(pl.arg_sort_by("timestamp", "event_id", maintain_order=True))
        want = bool((order.to_series().to_numpy() == np.arange(n)).all())
        assert data.in_time_order(frame) == want, frame
        verdicts.add(want)
    assert verdicts == {True, False}

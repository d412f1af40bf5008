"""The folds read from a streamed scan of the events give what the in-memory folds give:
the same interactions, the same temporal cut, the same held-out pairs (issue 18: memory that
does not grow with the number of events)."""

import numpy as np
import polars as pl
import pytest
from synthetic_events import make_events

from recsys.models.data import (
    holdout_pairs,
    interactions,
    temporal_split,
    temporal_split_scan,
    write_interactions,
)

KINDS = ["view", "click", "add_to_cart", "purchase", "impression", "dislike", "like"]


def _events(n: int = 4000, seed: int = 3) -> pl.DataFrame:
    """Many events per (user, item) pair, every weight of the contract (dislikes make some
    pairs non-positive, impressions weigh 0), over ~9 days with many ties in time (the
    event id decides: "e10" sorts before "e9"), in no particular order."""
    rng = np.random.default_rng(seed)
    rows = [
        (f"u{rng.integers(40)}", f"i{rng.integers(25)}", str(rng.choice(KINDS)), int(m))
        for m in rng.integers(0, 13_000, n) // 7 * 7
    ]
    events = make_events(rows)
    return events[rng.permutation(n)]


@pytest.fixture
def scan(tmp_path):
    """The events written as several Parquet files (as the warehouse holds them) and their
    lazy scan, five columns as the pipeline reads them."""
    events = _events()
    for k, part in enumerate(events.iter_slices(900)):
        part.write_parquet(tmp_path / f"part-{k}.parquet")
    cols = ["event_id", "user_id", "item_id", "event_type", "timestamp"]
    return events, pl.scan_parquet(tmp_path / "*.parquet").select(cols)


def _written(lazy, tmp_path, *args, **kwargs) -> tuple[pl.DataFrame, object]:
    path = str(tmp_path / "interactions.parquet")
    counts = write_interactions(lazy, path, None, *args, **kwargs)
    return pl.read_parquet(path), counts


@pytest.mark.parametrize("max_events", [4_000_000, 1000, 1])
def test_interactions_written_from_a_scan_are_the_in_memory_ones_bit_for_bit(
    scan, tmp_path, max_events
):
    """One range of users, four of ~1000 events, one user a range: the same frame (the
    contract's weights are binary fractions: every sum is exact in any order)."""
    events, lazy = scan
    want = interactions(events)
    got, counts = _written(lazy, tmp_path, max_events=max_events)
    assert got.height > 500 and got.height < events.height
    assert got.equals(want.frame)  # every column, the float sums included, in order
    assert (counts.events, counts.pairs) == (events.height, want.frame.height)
    assert (counts.users, counts.items) == (want.n_users, want.n_items)


@pytest.mark.parametrize("max_events", [4_000_000, 1000])
def test_interactions_written_from_a_scan_with_decay(scan, tmp_path, max_events):
    """With a half-life or weights that are not binary fractions the order of a pair's
    additions shows in the last bits, and Polars' fold of a frame adds in an order of its own
    (it depends on the frame's size): the range folds give the same pairs, counts and times,
    and sums within rounding of the whole fold's, the same bits run after run."""
    events, lazy = scan
    weights = {"view": 1.0, "purchase": 7.3, "click": 0.37, "dislike": -2.2}
    for half_life, now in ((2.5, None), (2.5, events["timestamp"].max()), (None, None)):
        want = interactions(events, weights, half_life, now).frame
        got, _ = _written(lazy, tmp_path, weights, half_life, now, max_events=max_events)
        assert got.height > 300
        assert got.drop("confidence").equals(want.drop("confidence"))
        np.testing.assert_allclose(got["confidence"], want["confidence"], rtol=1e-12)
        again, _ = _written(lazy, tmp_path, weights, half_life, now, max_events=max_events)
        assert again.equals(got)


def test_interactions_of_no_events_are_an_empty_file_with_the_schema(scan, tmp_path):
    events, lazy = scan
    got, counts = _written(lazy.filter(pl.col("user_id") == "nobody"), tmp_path)
    assert got.height == 0 and got.schema == interactions(events).frame.schema
    assert (counts.events, counts.pairs, counts.users, counts.items) == (0, 0, 0, 0)


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.31, 0.5, 0.999])
def test_split_of_a_scan_is_the_in_memory_split(scan, fraction):
    events, lazy = scan
    want = temporal_split(events, fraction)
    got = temporal_split_scan(lazy, fraction)
    train = got.train.collect()
    test = got.test.collect()
    assert (got.n_train, got.n_test) == (want.train.height, want.test.height)
    assert (train.height, test.height) == (got.n_train, got.n_test)
    assert set(train["event_id"]) == set(want.train["event_id"])
    assert set(test["event_id"]) == set(want.test["event_id"])
    assert got.test_start == want.test_start


@pytest.mark.parametrize(("test_fraction", "validation_fraction"), [(0.2, 0.2), (0.1, 0.37)])
def test_validation_cut_of_a_scans_train_is_the_in_memory_one(
    scan, test_fraction, validation_fraction
):
    """data_split's record: the validation window cut again from the scan's train part."""
    events, lazy = scan
    want = temporal_split(events, test_fraction, validation_fraction)
    outer = temporal_split_scan(lazy, test_fraction)
    inner = temporal_split_scan(outer.train, validation_fraction)
    assert (inner.n_train, inner.n_test, outer.n_test) == (
        want.fit.height,
        want.validation.height,
        want.test.height,
    )
    assert set(inner.test.collect()["event_id"]) == set(want.validation["event_id"])
    assert inner.test_start == want.validation_start and outer.test_start == want.test_start


def test_split_cut_inside_a_tie_in_time():
    """Ten events at one minute, the cut among them: the event id (as text) decides."""
    rows = [("u", f"i{k}", "view", 0) for k in range(5)]
    rows += [("u", f"i{k}", "view", 3) for k in range(10)]
    events = make_events(rows)  # ids e5 ... e14 share minute 3
    lazy = events.lazy()
    for fraction in (0.1, 0.2, 0.45):
        want = temporal_split(events, fraction)
        got = temporal_split_scan(lazy, fraction)
        assert sorted(got.test.collect()["event_id"]) == sorted(want.test["event_id"])
        assert got.test_start == want.test_start


def test_empty_scan_splits_into_nothing():
    events = make_events([])
    got = temporal_split_scan(events.lazy(), 0.2)
    assert (got.n_train, got.n_test, got.test_start) == (0, 0, None)
    assert got.test.collect().height == 0


def test_holdout_pairs_of_scans_are_the_in_memory_ones(scan):
    events, lazy = scan
    want_split = temporal_split(events, 0.3)
    got_split = temporal_split_scan(lazy, 0.3)
    want = holdout_pairs(want_split.train, want_split.test)
    got = holdout_pairs(got_split.train, got_split.test)
    assert want.height > 10
    assert got.equals(want)


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_holdout_pairs_are_the_protocol_in_plain_python(seed):
    """The numbered users and items, the pairs matched by one integer: the same pairs as
    the protocol spelt out with Python sets (positive total weight in the later window,
    user and item both in train, the pair not in train), from frames, lazy frames and
    Categorical ids alike."""
    from recsys.contract import DEFAULT_EVENT_WEIGHTS

    events = _events(seed=seed)
    split = temporal_split(events, 0.3)
    train = set(split.train.select("user_id", "item_id").iter_rows())
    totals: dict[tuple[str, str], float] = {}
    for u, i, kind in split.test.select("user_id", "item_id", "event_type").iter_rows():
        totals[(u, i)] = totals.get((u, i), 0.0) + DEFAULT_EVENT_WEIGHTS[kind]
    users, items = {u for u, _ in train}, {i for _, i in train}
    want = sorted(
        (u, i)
        for (u, i), w in totals.items()
        if w > 0 and u in users and i in items and (u, i) not in train
    )
    assert len(want) > 10
    cat = {"user_id": pl.Categorical, "item_id": pl.Categorical}
    assert holdout_pairs(split.train, split.test).rows() == want
    assert holdout_pairs(split.train.lazy(), split.test.lazy()).rows() == want
    assert holdout_pairs(split.train.cast(cat), split.test.cast(cat)).rows() == want


def test_holdout_protocol_on_scans():
    """The known answer of test_interactions_split, from lazy frames."""
    train = make_events([("a", "x", "view", 0), ("b", "y", "view", 1), ("b", "z", "impression", 2)])
    test = make_events(
        [
            ("a", "x", "view", 5),
            ("a", "y", "view", 6),
            ("c", "x", "view", 7),
            ("a", "new", "view", 8),
            ("b", "z", "view", 9),  # b had z in train (an impression): not held out
            ("a", "z", "dislike", 10),
        ]
    )
    assert holdout_pairs(train.lazy(), test.lazy()).rows() == [("a", "y")]

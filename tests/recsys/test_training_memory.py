"""What training does to bound its memory gives the same models as before, bit for bit."""

import numpy as np
import pytest
import scipy.sparse as sp
from synthetic_events import make_events

from recsys.contract import DEFAULT_EVENT_WEIGHTS
from recsys.models.data import event_weight_expr, sequence_transitions


def _transitions_in_one_build(events, user_ids, item_ids, window=3):
    """The item-item transitions built from every transition at once (what
    `sequence_transitions` did before it built blocks of rows): the reference."""
    import polars as pl

    n = len(item_ids)
    uidx = pl.DataFrame({"user_id": list(user_ids), "u": np.arange(len(user_ids))})
    iidx = pl.DataFrame({"item_id": list(item_ids), "i": np.arange(n)})
    seq = (
        events.filter(event_weight_expr(DEFAULT_EVENT_WEIGHTS) > 0)
        .join(uidx, on="user_id")
        .join(iidx, on="item_id")
        .sort("u", "timestamp", "event_id")
    )
    u, i = seq["u"].to_numpy(), seq["i"].to_numpy()
    keep = np.ones(len(u), bool)
    keep[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    u, i = u[keep], i[keep]
    rows, cols, vals = [], [], []
    for d in range(1, window + 1):
        ok = (u[d:] == u[:-d]) & (i[d:] != i[:-d])
        a, b = i[:-d][ok], i[d:][ok]
        rows += [a, b]
        cols += [b, a]
        vals.append(np.full(2 * len(a), 1.0 / d, np.float32))
    m = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n, n),
        dtype=np.float32,
    )
    m.sum_duplicates()
    m.sort_indices()
    return m


@pytest.mark.parametrize("block", [1, 7, 100, 4_000_000])
def test_transitions_built_in_blocks_are_the_one_build_matrix_bit_for_bit(block):
    """Users walking over few items, so that each entry sums many 1, 1/2 and 1/3 in float32
    (where the order of the additions shows in the last bits); impressions weigh 0."""
    rng = np.random.default_rng(7)
    n_users, n_items, n = 60, 12, 6000
    users = rng.integers(0, n_users, n)
    items = np.minimum(rng.zipf(1.6, n) - 1, n_items - 1)
    kinds = rng.choice(["view", "add_to_cart", "purchase", "impression"], n, p=[0.7, 0.1, 0.1, 0.1])
    minutes = rng.integers(0, 5000, n)  # ties in time: the event id decides
    events = make_events(
        [
            (f"u{u}", f"i{i:02d}", str(t), int(m))
            for u, i, t, m in zip(users, items, kinds, minutes, strict=True)
        ]
    )
    user_ids = np.array(sorted({f"u{u}" for u in users}), dtype=object)
    item_ids = np.array(sorted({f"i{i:02d}" for i in items}), dtype=object)
    want = _transitions_in_one_build(events, user_ids, item_ids)
    got = sequence_transitions(events, None, user_ids, item_ids, block=block)
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    assert got.nnz == want.nnz > 50
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)  # exact: the same additions in order
    assert got.has_sorted_indices and got.indices.dtype == want.indices.dtype


def test_a_split_of_events_already_in_order_is_the_split_of_them_shuffled():
    """temporal_split gathers a sorted copy only when the events are out of order: the parts
    of a split's train (in order: cut again without a copy) are those of the same events in
    any order, ties in time included."""
    from recsys.models.data import temporal_split

    rng = np.random.default_rng(11)
    n = 500
    rows = [
        (f"u{rng.integers(20)}", f"i{rng.integers(30)}", "view", int(m))
        for m in rng.integers(0, 90, n)
    ]
    events = make_events(rows)
    shuffled = events[rng.permutation(n)]
    first = temporal_split(shuffled, 0.2, 0.0)
    again = temporal_split(first.train, 0.0, 0.25)  # in order: slices, no sorted copy
    direct = temporal_split(
        events.filter(events["event_id"].is_in(first.train["event_id"])), 0.0, 0.25
    )
    for part in ("fit", "validation", "test"):
        assert getattr(again, part).equals(getattr(direct, part)), part
    assert again.validation_start == direct.validation_start
    whole = temporal_split(events, 0.2, 0.0)
    assert first.train.equals(whole.train) and first.test.equals(whole.test)
    assert first.test_start == whole.test_start

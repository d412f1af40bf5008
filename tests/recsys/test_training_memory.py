"""What training does to bound its memory gives the same models as before, bit for bit."""

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from synthetic_events import make_events

from recsys.contract import DEFAULT_EVENT_WEIGHTS
from recsys.models.data import sequence_transitions


def _transitions_by_hand(events, user_ids, item_ids, window=3):
    """The item-item transitions summed pair by pair in Python's exact fractions, each
    entry rounded once to float32: the reference."""
    from collections import defaultdict
    from fractions import Fraction

    weights = DEFAULT_EVENT_WEIGHTS
    at = {i: k for k, i in enumerate(item_ids)}
    known = set(user_ids)
    rows = sorted(
        (r["user_id"], r["timestamp"], r["event_id"], r["item_id"])
        for r in events.iter_rows(named=True)
        if weights.get(r["event_type"], 0) > 0 and r["user_id"] in known and r["item_id"] in at
    )
    sums = defaultdict(Fraction)
    for user in user_ids:
        walk = [item for u, _, _, item in rows if u == user]
        walk = [x for k, x in enumerate(walk) if k == 0 or walk[k - 1] != x]  # repeats: one step
        for d in range(1, window + 1):
            for x, y in zip(walk, walk[d:], strict=False):
                if x != y:
                    sums[at[x], at[y]] += Fraction(1, d)
                    sums[at[y], at[x]] += Fraction(1, d)
    want = np.zeros((len(item_ids), len(item_ids)), np.float32)
    for (x, y), v in sums.items():
        want[x, y] = np.float32(float(v))  # (a float64 of the fraction, then float32)
    return want


@pytest.mark.parametrize("max_events", [6000, 1000, 1])
def test_transitions_are_exact_sums_whatever_the_ranges_of_users(max_events):
    """Users walking over few items, so that each entry sums many 1, 1/2 and 1/3 (where a
    float32 sum in some order would show in the last bits); impressions weigh 0. Built
    from one range of users, 6 ranges of 10 users, and one range per user: the same matrix,
    each entry the exact sum rounded once."""
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
    want = _transitions_by_hand(events, user_ids, item_ids)
    got = sequence_transitions(events, None, user_ids, item_ids, max_events=max_events)
    assert got.shape == want.shape and got.dtype == np.float32
    assert got.has_sorted_indices and got.nnz == np.count_nonzero(want) > 50
    assert (np.modf(got.data.astype(np.float64) * 2)[0] != 0).sum() > 20  # thirds in many
    np.testing.assert_array_equal(got.toarray(), want)  # exact: one rounding an entry


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


def _shuffled_events_in_parquet(tmp_path, events, rng, rows_per_file=400):
    """`events` shuffled and written as several Parquet files: a lazy scan of them (in the
    scan's order, not in time order, as the warehouse's day partitions are)."""
    import polars as pl

    events = events[rng.permutation(events.height)]
    for k, part in enumerate(events.iter_slices(rows_per_file)):
        part.write_parquet(tmp_path / f"part-{k:03d}.parquet")
    cols = ["event_id", "user_id", "item_id", "event_type", "timestamp"]
    return pl.scan_parquet(tmp_path / "part-*.parquet").select(cols)


@pytest.mark.parametrize("max_events", [1, 150, 1000, 4_000_000])
def test_events_collected_in_time_order_are_the_sorted_frame(tmp_path, max_events):
    """`collect_in_time_order` (runs of days sorted one at a time) gives the collected scan
    gathered by `temporal_split`'s order, row for row, ties in time and repeated event ids
    (kept in the scan's order) included; its splits are those of the scan collected."""
    import polars as pl

    from recsys.models.data import collect_in_time_order, temporal_split

    rng = np.random.default_rng(max_events)
    n = 3000
    rows = [
        (f"u{rng.integers(50)}", f"i{rng.integers(40)}", "view", int(m))
        for m in rng.integers(0, 6 * 1440, n)  # six days, many events a minute
    ]
    events = make_events(rows).with_columns(  # repeated ids, tied in time with others
        pl.when(pl.int_range(pl.len()) % 7 == 0).then(pl.lit("e1")).otherwise("event_id")
    )
    scan = _shuffled_events_in_parquet(tmp_path, events, rng)
    as_read = scan.collect()
    order = as_read.select(pl.arg_sort_by("timestamp", "event_id", maintain_order=True))
    want = as_read[order.to_series()]
    got = collect_in_time_order(scan, max_events)
    assert got.equals(want)
    for f in (0.2, 0.55):  # the train part alone: the newer days not read
        train = collect_in_time_order(scan, max_events, test_fraction=f)
        assert train.equals(temporal_split(want, f).train)
        assert max_events != 150 or train.n_chunks() < got.n_chunks()
    # one run of the six days (~500 events each), one a day, or runs of two days or so
    runs = got.n_chunks()
    assert runs == {1: 6, 150: 6, 4_000_000: 1}.get(max_events, runs) and 1 <= runs <= 6
    assert max_events != 1000 or 1 < runs < 6
    for a, b in zip(
        (temporal_split(got, 0.2, 0.1), temporal_split(got, 0.0, 0.15)),
        (temporal_split(as_read, 0.2, 0.1), temporal_split(as_read, 0.0, 0.15)),
        strict=True,
    ):
        for part in ("fit", "validation", "test"):
            assert getattr(a, part).equals(getattr(b, part)), part
        assert (a.validation_start, a.test_start) == (b.validation_start, b.test_start)


def _saved_folder(model, path) -> dict[str, object]:
    """Every file of `model` saved at `path` (`saved_files`: hybrid.json without timings)."""
    from synthetic_events import saved_files

    model.save(str(path))
    return saved_files(path)


def test_models_fitted_on_the_events_in_time_order_are_those_of_the_scan_order(tmp_path):
    """`train_models` reads the events in time order (held once) where it read them in the
    scan's order (then held a sorted copy beside them): the evaluated and the published models
    are the same, file for file (the published refit's dataset sums the trending weights in
    the other order: the same float32 figures)."""
    from synthetic_events import FAST_HYBRID, cluster_events, cluster_items

    from recsys.models.data import collect_in_time_order
    from recsys.models.hybrid import HybridConfig, fit_eval_and_final

    rng = np.random.default_rng(5)
    events = cluster_events(rng, n_users=120, n_items=40, per_user=12)
    items = cluster_items(40)
    scan = _shuffled_events_in_parquet(tmp_path, events, rng, rows_per_file=100)
    as_read, in_order = scan.collect(), collect_in_time_order(scan, 500)
    assert not as_read.equals(in_order)
    before = fit_eval_and_final(as_read, items, None, HybridConfig(**FAST_HYBRID), 0.2)
    after = fit_eval_and_final(in_order, items, None, HybridConfig(**FAST_HYBRID), 0.2)
    for variant, a, b in zip(("eval", "final"), before, after, strict=True):
        want = _saved_folder(a, tmp_path / "before" / variant)
        got = _saved_folder(b, tmp_path / "after" / variant)
        assert sorted(got) == sorted(want) and len(want) > 10
        for name in want:
            assert got[name] == want[name], f"{variant}/{name}"


def test_a_dataset_folds_its_pairs_once_with_the_known_confidences():
    """`build_dataset` folds the events into pairs once (it folded them twice: once for the
    index maps, once more onto them): the confidences of a hand-counted history, a catalogue
    item nobody touched kept, negative and zero totals dropped."""
    import polars as pl

    from recsys.contract import ITEM_SCHEMA
    from recsys.models.data import build_dataset

    events = make_events(
        [
            ("ua", "i1", "view", 0),  # ua: i1 = 1 + 8, i2 = 1, i3 = -4 (dropped)
            ("ua", "i1", "purchase", 1),
            ("ua", "i2", "view", 2),
            ("ua", "i3", "dislike", 3),
            ("ub", "i2", "click", 4),  # ub: i2 = 1.5, i3 = 4 - 8 (dropped)
            ("ub", "i3", "add_to_cart", 5),
            ("ub", "i3", "return", 6),
            ("uc", "i1", "impression", 7),  # weighs 0: uc is no user
        ]
    )
    items = pl.DataFrame({"item_id": ["i1", "i2", "i3", "i4"]}).with_columns(
        pl.lit(None).cast(dtype).alias(name)
        for name, dtype in ITEM_SCHEMA.items()
        if name != "item_id"
    )
    data = build_dataset(events, items)
    assert list(data.user_ids) == ["ua", "ub"]
    assert list(data.item_ids) == ["i1", "i2", "i3", "i4"]
    np.testing.assert_array_equal(
        data.confidence.toarray(), np.array([[9, 1, 0, 0], [0, 1.5, 0, 0]], np.float32)
    )
    np.testing.assert_array_equal(  # add_to_cart / purchase only (a return is not one)
        data.buy.toarray(), np.array([[8, 0, 0, 0], [0, 0, 4, 0]], np.float32)
    )
    assert data.info["n_pairs"] == 3
    # ua's last events: i1 at minute 1, i2 at 2; ub's i2 at 4; "now" is minute 7
    np.testing.assert_allclose(
        data.last_days.toarray() * 1440, [[6, 5, 0, 0], [0, 3, 0, 0]], rtol=1e-5
    )


@pytest.mark.parametrize("half_life_days", [None, 0.7])
def test_a_dataset_is_the_plain_fold_onto_its_maps_whatever_the_frames_chunks(
    half_life_days, monkeypatch
):
    """The dataset's matrices are the plain path's bit for bit: `interactions` onto the
    dataset's index maps (what `build_dataset` called, after a first fold for the maps), and
    the same from the events as one chunk or as the sorted runs `collect_in_time_order`
    leaves (runs of `SORT_EVENTS`; one run of 4M before), and folded in ranges of users of
    at most `FOLD_EVENTS` events (here 500: 8 or more ranges). With a half-life the sums are
    not exact, so the order of the additions would show."""
    import polars as pl
    from synthetic_events import cluster_items

    import recsys.models.data as data_module
    from recsys.models.data import build_dataset, interactions, temporal_split

    rng = np.random.default_rng(3)
    n = 4000
    kinds = rng.choice(["view", "click", "add_to_cart", "purchase", "dislike"], n)
    rows = [
        (f"u{u}", f"i{i}", str(t), int(m))
        for u, i, t, m in zip(
            rng.integers(0, 80, n), rng.integers(0, 30, n), kinds, rng.integers(0, 20_000, n),
            strict=True,
        )
    ]  # fmt: skip
    whole = temporal_split(make_events(rows), 0.0).train.rechunk()
    chunked = pl.concat([whole[k : k + 700] for k in range(0, n, 700)], rechunk=False)
    assert chunked.n_chunks() == 6 and chunked.equals(whole)
    items = cluster_items(40)  # ten catalogue items nobody touched
    a = build_dataset(whole, items, half_life_days=half_life_days)
    b = build_dataset(chunked, items, half_life_days=half_life_days)
    monkeypatch.setattr(data_module, "FOLD_EVENTS", 500)
    ranged = build_dataset(chunked, items, half_life_days=half_life_days)
    assert len(list(data_module._range_pairs(whole.lazy(), None, None, None, 500))) >= 8
    monkeypatch.undo()
    plain = interactions(
        whole, None, half_life_days, whole["timestamp"].max(),
        user_ids=a.user_ids, item_ids=a.item_ids,
    )  # fmt: skip
    assert a.n_items == 40 and a.n_users == 80 and a.confidence.nnz > 1000
    want = plain.matrix()
    for data in (a, b, ranged):
        for got, ref in ((data.confidence, want), (data.transitions, a.transitions)):
            np.testing.assert_array_equal(got.indptr, ref.indptr)
            np.testing.assert_array_equal(got.indices, ref.indices)
            np.testing.assert_array_equal(got.data, ref.data)
        assert data.confidence.dtype == np.float32
        np.testing.assert_array_equal(data.trending, a.trending)
        np.testing.assert_array_equal(data.last_days.data, a.last_days.data)
        np.testing.assert_array_equal(data.buy.data, a.buy.data)
    assert list(a.user_ids) == sorted(plain.frame["user_id"].unique().to_list())
    for data in (b, ranged):  # (ranged: the maps from the ranges' users, numbered range by range)
        assert list(data.user_ids) == list(a.user_ids)
        assert list(data.item_ids) == list(a.item_ids)
        np.testing.assert_array_equal(data.item_age_days, a.item_age_days)


@pytest.mark.parametrize("validation_fraction", [0.2, 0.1])
def test_refits_after_the_window_work_are_the_refits_beside_it(tmp_path, validation_fraction):
    """`refits_beside=False` (a large tenant: `TrainingConfig.refits_beside_max_events`) fits
    each refit once the work before it is done instead of in threads beside it: the evaluated
    and the published models are the same, file for file (R2 on S2's window, and on its own).
    So are they when the evaluated model is handed to `on_eval` (saved there, as the training
    step does) and no longer held: the function returns None for it, and nothing keeps it."""
    import gc
    import weakref

    from synthetic_events import FAST_HYBRID, cluster_events, cluster_items

    from recsys.models.hybrid import HybridConfig, fit_eval_and_final

    events = cluster_events(np.random.default_rng(5), n_users=120, n_items=40, per_user=12)
    items = cluster_items(40)
    cfg = {**FAST_HYBRID, "validation_fraction": validation_fraction}
    runs = {}
    for way in ("beside", "after", "after, handed over", "beside, handed over"):
        importance = []  # `beside_eval` is called in every way, on the evaluated model
        handed = []  # (the folder saved by `on_eval`, a weak reference to the model)

        def on_eval(m, way=way, handed=handed):
            handed.append((_saved_folder(m, tmp_path / f"{way}-eval"), weakref.ref(m)))

        ev, final = fit_eval_and_final(
            events,
            items,
            None,
            HybridConfig(**cfg),
            0.2,
            beside_eval=lambda m, seen=importance: seen.append(sorted(m.generators_)),
            refits_beside=way.startswith("beside"),
            on_eval=on_eval if way.endswith("handed over") else None,
        )
        if ev is None:
            ((eval_files, alive),) = handed
            gc.collect()
            assert alive() is None  # dropped once saved
            assert len(importance) == 1 and len(importance[0]) > 3
        else:
            assert not handed and importance == [sorted(ev.generators_)]
            eval_files = _saved_folder(ev, tmp_path / f"{way}-eval")
        runs[way] = [eval_files, _saved_folder(final, tmp_path / f"{way}-final")]
        assert final.ranker_ is not None
    assert set(runs) == {"beside", "after", "after, handed over", "beside, handed over"}
    want_runs = runs.pop("beside")
    for way, got_runs in runs.items():
        for variant, want, got in zip(("eval", "final"), want_runs, got_runs, strict=True):
            assert sorted(got) == sorted(want) and len(want) > 10
            for name in want:
                assert got[name] == want[name], f"{way}: {variant}/{name}"


@pytest.mark.parametrize("validation_fraction", [0.2, 0.1])
def test_events_read_anew_in_each_phase_are_not_held_beside_the_fits(
    tmp_path, monkeypatch, validation_fraction
):
    """Given a function that reads the events (a large tenant's training step reads them
    from the warehouse again), `fit_eval_and_final` reads them in each phase that needs them
    (the fit window, S2's dataset, R2's labels, S3's dataset; `beside_eval` with the same
    function) and holds none of them when a generator set is fitted: every column the reads
    gave is gone by then (a numpy-backed column shows it: Polars keeps it, and every slice
    of the frame holds it). The models are those fitted from the frame, file for file."""
    import gc
    import weakref

    from synthetic_events import FAST_HYBRID, cluster_events, cluster_items

    from recsys.models import hybrid
    from recsys.models.data import events_of, scan_split, temporal_split

    events = cluster_events(np.random.default_rng(5), n_users=120, n_items=40, per_user=12)
    # in time order, as the step reads them: every split of them is slices of the frame
    events = events.sort("timestamp", "event_id")
    items = cluster_items(40)
    # served chosen on validation: LightFM is weighed (a ranker without its candidates too)
    cfg = {**FAST_HYBRID, "validation_fraction": validation_fraction, "served": None}
    probes: list = []
    read_heights: list[int] = []

    class Reader:  # (as the step's: the train part alone when asked; a scan, in any order)
        def __call__(self, test_fraction=0.0):
            part = events_of(events, test_fraction)
            probe = np.arange(part.height)  # (zero-copy: the frame and its slices hold it)
            probes.append(weakref.ref(probe))
            read_heights.append(part.height)
            return part.with_columns(pl.Series("probe", probe))

        def scan(self):
            return events.sample(fraction=1.0, shuffle=True, seed=3).lazy()

    read = Reader()

    held_at_fits = []
    datasets: list = []  # (weak references to each dataset built, in order)
    alive_at_fits: list[tuple[int, list[int]]] = []  # (the fitted one, those alive)
    fit_generators, build_dataset = hybrid.fit_generators, hybrid.build_dataset

    def watched(data, config, *args, **kwargs):
        gc.collect()
        held_at_fits.append(sum(r() is not None for r in probes))
        alive = [i for i, r in enumerate(datasets) if r() is not None]
        alive_at_fits.append((next(i for i in alive if datasets[i]() is data), alive))
        return fit_generators(data, config, *args, **kwargs)

    def recorded(*args, **kwargs):
        data = build_dataset(*args, **kwargs)
        datasets.append(weakref.ref(data))
        return data

    monkeypatch.setattr(hybrid, "fit_generators", watched)
    monkeypatch.setattr(hybrid, "build_dataset", recorded)
    runs = []
    for source in (events, read):
        importance = []
        ev, final = hybrid.fit_eval_and_final(
            source,
            items,
            None,
            hybrid.HybridConfig(**cfg),
            0.2,
            beside_eval=lambda m, s=source, seen=importance: seen.append(scan_split(s, 0.2).n_test),
            refits_beside=False,
        )
        assert importance == [events.height - int(events.height * 0.8)]
        runs.append([_saved_folder(ev, tmp_path / f"{len(runs)}-eval"),
                     _saved_folder(final, tmp_path / f"{len(runs)}-final")])  # fmt: skip
        # no dataset is held beside a later one's fits, but the evaluated model's (S2's,
        # ranked beside R2's own window): the fit window's, with its generators (kept by
        # LightFM's weighing until the model was fitted), is gone by S2's fits
        assert [i for i, _ in alive_at_fits][-1] >= 2 and alive_at_fits[0] == (0, [0])
        for fitted, alive in alive_at_fits:
            assert set(alive) - {fitted} <= {1}, alive_at_fits
        datasets.clear()
        alive_at_fits.clear()
        if source is events:
            assert probes == []
            held_at_fits.clear()
    # the window and S2 read the train part alone, S3 every event, R2's own window (when
    # its cut is not train's) all but its labels; the labels and beside_eval, the scan
    n, n_train = events.height, temporal_split(events, 0.2).train.height
    own = [n - round(n * validation_fraction)] if validation_fraction != 0.2 else []
    assert sorted(read_heights) == sorted([n_train] * 2 + [n] + own)
    assert len(held_at_fits) >= 3 + (validation_fraction != 0.2) and set(held_at_fits) == {0}
    gc.collect()
    assert all(r() is None for r in probes)
    (want_eval, want_final), (got_eval, got_final) = runs
    for want, got in ((want_eval, got_eval), (want_final, got_final)):
        assert sorted(got) == sorted(want) and len(want) > 10
        for name in want:
            assert got[name] == want[name], name


def _ages(rng, n_users=300, n_items=50):
    """A users x items matrix of days since the pair's last event, as `build_dataset`'s
    ``last_days``: many ties (whole days), age-0 pairs stored, empty rows, long rows."""
    counts = rng.integers(0, 30, n_users)
    counts[::17] = 0
    counts[5] = n_items
    indptr = np.concatenate(([0], np.cumsum(counts)))
    indices = np.concatenate([np.sort(rng.choice(n_items, c, replace=False)) for c in counts])
    days = rng.integers(0, 6, indptr[-1]).astype(np.float32)
    return sp.csr_matrix((days, indices.astype(np.int32), indptr), shape=(n_users, n_items))


@pytest.mark.parametrize("block", [1, 7, 100, 10**9])
def test_recency_passes_in_blocks_of_users_are_the_one_pass_results(monkeypatch, block):
    """`recent_history` and the side features' recency arrays pass over the users a block
    of rows at a time (`row_blocks`: their per-entry temporaries, ~40 bytes an entry, held for
    one block): the same arrays, bit for bit, as the one pass over every entry they replace
    (the references below), ties in age and empty rows included, whatever the block."""
    from types import SimpleNamespace

    from recsys.models import data as data_module
    from recsys.models.hybrid import _recency_arrays
    from recsys.models.recent import recent_history

    rng = np.random.default_rng(3)
    m = _ages(rng)
    category = rng.integers(-1, 4, m.shape[1])  # (-1: unknown)

    def history_in_one_pass(m, n_recent, half_life):
        rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        order = np.lexsort((m.indices, m.data, rows))
        rank = np.empty(m.nnz, np.int64)
        rank[order] = np.arange(m.nnz) - m.indptr[rows[order]]
        keep = rank < n_recent
        w = np.power(0.5, rank[keep] / max(half_life, 1e-9)).astype(np.float32)
        out = sp.csr_matrix((w, (rows[keep], m.indices[keep])), shape=m.shape, dtype=np.float32)
        out.sort_indices()
        return out

    def category_days_in_one_pass(m, n_categories):
        rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        cat = category[m.indices]
        ok = cat >= 0
        flat = np.full(m.shape[0] * n_categories, np.inf, np.float32)
        np.minimum.at(flat, rows[ok] * n_categories + cat[ok], m.data[ok])
        flat[np.isinf(flat)] = np.nan
        return flat.reshape(m.shape[0], n_categories)

    monkeypatch.setattr(data_module, "BLOCK_ENTRIES", block)
    blocks = data_module.row_blocks(m.indptr)  # (consecutive, each within the bound or one row)
    assert [lo for lo, _ in blocks] == [0] + [hi for _, hi in blocks[:-1]]
    assert blocks[-1][1] == m.shape[0] and (len(blocks) == 1) == (block == 10**9)
    assert all(m.indptr[hi] - m.indptr[lo] <= block or hi - lo == 1 for lo, hi in blocks)
    for n_recent, half_life in ((3, 2.0), (100, 1.0)):
        got = recent_history(m, n_recent, half_life)
        want = history_in_one_pass(m, n_recent, half_life)
        for a in ("data", "indices", "indptr"):
            assert np.array_equal(getattr(got, a), getattr(want, a)), a
        assert np.array_equal(np.diff(got.indptr), np.minimum(np.diff(m.indptr), n_recent))
    ds = SimpleNamespace(last_days=m, n_users=m.shape[0], item_category=category)
    last, cat_days = _recency_arrays(ds, 4)
    np.testing.assert_array_equal(cat_days, category_days_in_one_pass(m, 4))
    has = np.diff(m.indptr) > 0
    assert np.isnan(last[~has]).all() and np.isnan(cat_days[~has]).all()
    starts, ends = m.indptr[:-1][has], m.indptr[1:][has]
    assert np.array_equal(last[has], [m.data[a:b].min() for a, b in zip(starts, ends, strict=True)])


def test_sequence_similarity_reads_the_transitions_without_copies_same_bits():
    """`sequence_similarity` no longer copies the dataset's transition matrix twice: the same
    float32 similarities as the copying build (the reference below), and the input is
    untouched (its index arrays are shared with the unpruned similarities, not written)."""
    from recsys.models.cooccurrence import prune_rows
    from recsys.models.recent import sequence_similarity

    rng = np.random.default_rng(7)
    n = 60
    t = sp.random(n, n, density=0.3, random_state=rng, dtype=np.float32, format="csr")
    t = (t + t.T).tocsr()
    t.data = (t.data * 3).astype(np.float32)
    t.sum_duplicates()
    t.sort_indices()
    before = (t.data.copy(), t.indices.copy(), t.indptr.copy())

    def copying(tr, shrink, neighbors):
        tr = tr.tocsr().astype(np.float32)
        deg = np.asarray(tr.sum(axis=1)).ravel().astype(np.float32)
        rows = np.repeat(np.arange(tr.shape[0]), np.diff(tr.indptr))
        sim = tr.copy()
        sim.data = tr.data / (np.sqrt(deg[rows] * deg[tr.indices]) + np.float32(shrink))
        return prune_rows(sim, neighbors).astype(np.float32)

    for shrink, neighbors in ((5.0, 4), (0.0, 100), (2.5, 1)):
        got, want = sequence_similarity(t, shrink, neighbors), copying(t, shrink, neighbors)
        assert got.dtype == np.float32 and got.nnz == want.nnz > 0
        for a, b in ((got.data, want.data), (got.indices, want.indices), (got.indptr, want.indptr)):
            np.testing.assert_array_equal(a, b)
    for a, b in zip((t.data, t.indices, t.indptr), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_event_types_and_ids_held_as_categoricals_give_the_same_models(tmp_path):
    """`read_inputs` holds the events' type, user id and item id as Categoricals (4 bytes
    an event each, not a 16-byte string view; the tables joined to them are cast to them,
    `id_types`): every model fitted from such events, evaluated
    and published, is the same, file for file, as from the same events with strings; so are
    the popularity-only models of a tenant with too little data, the evaluation's holdout
    pairs (against a holdout of strings too, as the control plane's evaluation job reads it),
    a user's sequences and the interactions."""
    from synthetic_events import FAST_HYBRID, cluster_events, cluster_items

    from recsys.models.data import holdout_pairs, interactions, sequence_transitions, temporal_split
    from recsys.models.hybrid import HybridConfig, fit_eval_and_final, popularity_only

    events = cluster_events(np.random.default_rng(11), n_users=120, n_items=40, per_user=12)
    assert events.schema["event_type"] == pl.String and events["event_type"].n_unique() > 1
    typed = events.with_columns(pl.col("event_type", "user_id", "item_id").cast(pl.Categorical))
    items = cluster_items(40)
    users = np.array(sorted(events["user_id"].unique()), dtype=object)
    item_ids = np.array(sorted(events["item_id"].unique()), dtype=object)
    files = {}
    for name, frame in (("string", events), ("categorical", typed)):
        config = HybridConfig(**FAST_HYBRID)
        models = [*fit_eval_and_final(frame, items, None, config, 0.2)]
        models.append(popularity_only(frame, items, None, config, "too few events"))
        files[name] = [_saved_folder(m, tmp_path / f"{name}-{v}") for v, m in
                       zip(("eval", "final", "popularity"), models, strict=True)]  # fmt: skip
        split = temporal_split(frame, 0.2)
        files[name].append(holdout_pairs(split.train, split.test).rows())
        files[name].append(holdout_pairs(split.train, split.test.cast({"user_id": pl.String,
                           "item_id": pl.String})).rows())  # fmt: skip
        t = sequence_transitions(frame, None, users, item_ids, max_events=500)
        m = interactions(frame).matrix()
        files[name].append([a.tolist() for a in (t.indptr, t.indices, t.data, m.indptr, m.data)])
    want, got = files["string"], files["categorical"]
    assert len(want[3]) > 10 and got[3:] == want[3:] and want[4] == want[3]
    assert len(want[5][1]) > 100
    for variant, w, g in zip(("eval", "final", "popularity"), want, got, strict=False):
        assert sorted(g) == sorted(w) and len(w) > 3
        for name in w:
            assert g[name] == w[name], f"{variant}/{name}"


def test_recommend_batches_bounded_by_score_cells_give_the_same_lists(monkeypatch):
    """`Recommender.recommend` scores fewer users a batch when the items are many (at most
    `SCORE_CELLS` dense scores): the same lists and scores as one batch of every user."""
    from synthetic_events import cluster_events, cluster_items

    from recsys.models import base
    from recsys.models.cooccurrence import CooccurrenceRecommender
    from recsys.models.data import build_dataset

    events = cluster_events(np.random.default_rng(3), n_users=90, n_items=40, per_user=10)
    data = build_dataset(events, cluster_items(40), None)
    model = CooccurrenceRecommender().fit(data)
    users = np.arange(data.n_users)
    want = model.recommend(users, 7, batch_size=1024)
    score, sizes = model.score, []
    monkeypatch.setattr(model, "score", lambda batch: sizes.append(len(batch)) or score(batch))
    for cells, size in ((data.n_items * 7, 7), (data.n_items - 1, 1), (1, 1)):
        monkeypatch.setattr(base, "SCORE_CELLS", cells)
        sizes.clear()
        got = model.recommend(users, 7, batch_size=1024)
        assert max(sizes) == size and sum(sizes) == len(users)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert np.isfinite(want[1][:, 0]).all()


def test_ranker_rows_in_batches_bounded_by_score_cells_are_the_same(monkeypatch):
    """`train_ranker` builds its candidate rows in batches of at most `SCORE_CELLS` dense
    scores (each dense generator's block is held until the batch's rows are built): the same
    trees and the same validation figures as with batches of 512 users."""
    from synthetic_events import FAST_HYBRID, cluster_events, cluster_items

    from recsys.evaluation.evaluate import build_holdout
    from recsys.models import base, hybrid
    from recsys.models.data import build_dataset, temporal_split

    events = cluster_events(np.random.default_rng(8), n_users=150, n_items=40, per_user=12)
    cfg = hybrid.HybridConfig(**FAST_HYBRID)
    split = temporal_split(events, 0.0, 0.2)
    data = build_dataset(split.fit, cluster_items(40), None)
    gens, _, _ = hybrid.fit_generators(data, cfg)
    side = hybrid.SideFeatures.from_data(data, gens["popularity"], cfg)
    holdout = build_holdout(data, split.fit, split.validation)
    runs = []
    for cells in (None, data.n_items * 3):  # 512 users a batch (all), then 3
        if cells is not None:
            monkeypatch.setattr(base, "SCORE_CELLS", cells)
        ranker, info = hybrid.train_ranker(gens, side, data, holdout, cfg, compare=True)
        runs.append((ranker.to_arrays(), info))
    (want, want_info), (got, got_info) = runs
    assert want_info["ranker_rows"] > 100 and sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert set(got_info["validation_per_user"]) == set(want_info["validation_per_user"])
    for name, values in want_info["validation_per_user"].items():
        np.testing.assert_array_equal(got_info["validation_per_user"][name], values)
    assert {k: v for k, v in got_info.items() if k != "validation_per_user"} == {
        k: v for k, v in want_info.items() if k != "validation_per_user"
    }


def test_index_lookup_of_a_series_is_that_of_its_strings():
    """`index_lookup` reads a Polars Series of ids as it is (no Python string per id): the
    same indices as the same ids given as a list, -1 for unknown ids and nulls."""
    from recsys.models.data import index_lookup

    ids = np.array(["a", "b", "c", "d"], dtype=object)
    query = pl.Series("user_id", ["c", "x", None, "a", "d", "c", "b"], dtype=pl.String)
    want = np.array([2, -1, -1, 0, 3, 2, 1])
    np.testing.assert_array_equal(index_lookup(ids, query), want)
    np.testing.assert_array_equal(index_lookup(ids, ["c", "x", "zz", "a", "d", "c", "b"]), want)
    assert index_lookup(ids, query.cast(pl.Categorical)).tolist() == want.tolist()
    assert index_lookup(ids, pl.Series([], dtype=pl.String)).shape == (0,)


def test_event_weights_without_replace_strict_are_the_same_and_streamed(tmp_path):
    """`event_weight_expr` weighs events with a chain of `when` (Polars does not stream
    `replace_strict`: a lazy scan weighed with it was collected whole before its fold): the
    same Float64 weights as `replace_strict` gave, for every type, an unknown one, a null,
    a categorical column and no weights at all; and a streamed fold of a scan gives the same
    sums as the in-memory one."""
    from recsys.models.data import event_weight_expr

    weights = {"view": 1.0, "add_to_cart": 3.0, "purchase": 5.0, "like": 0.5, "dislike": -1.0}
    types = ["view", None, "purchase", "zzz", "dislike", "like", "add_to_cart", "", "view"]
    frame = pl.DataFrame({"event_type": types, "item_id": list("abcabcabc")})
    for w in (weights, {}, {"view": 2.0}):
        want = frame.select(
            pl.col("event_type").replace_strict(
                list(w), [float(v) for v in w.values()], default=0.0, return_dtype=pl.Float64
            )
        ).to_series()
        for f in (frame, frame.with_columns(pl.col("event_type").cast(pl.Categorical))):
            got = f.select(event_weight_expr(w)).to_series()
            assert got.dtype == pl.Float64 and got.to_list() == want.to_list()
    assert frame.select(event_weight_expr({})).height == frame.height  # a column, not a scalar
    path = tmp_path / "events.parquet"
    frame.write_parquet(path)
    fold = (
        pl.scan_parquet(path)
        .group_by("item_id")
        .agg(event_weight_expr(weights).sum().alias("w"))
        .sort("item_id")
    )
    streamed, in_memory = fold.collect(engine="streaming"), fold.collect(engine="in-memory")
    assert streamed.equals(in_memory) and streamed["w"].to_list() == [4.0, -1.0, 6.5]


@pytest.mark.parametrize("max_events", [150, 4_000_000])
def test_event_ids_held_as_their_ranks_give_the_same_order_and_models(tmp_path, max_events):
    """`collect_in_time_order(..., rank_ids=True)` (what `read_inputs` holds) is the frame
    without it, with each event id replaced by its row number: so its splits are the same
    slices, and every model fitted, evaluated and published from it is the same, file for
    file, as are the holdout pairs and a user's sequence, on events with many ties in time
    whose ids sort otherwise as strings than as numbers (e10 < e9), in one run or several."""
    from synthetic_events import FAST_HYBRID, cluster_events, cluster_items

    from recsys.models.data import (
        collect_in_time_order,
        holdout_pairs,
        sequence_transitions,
        temporal_split,
    )
    from recsys.models.hybrid import HybridConfig, fit_eval_and_final

    rng = np.random.default_rng(13)
    events = cluster_events(rng, n_users=120, n_items=40, per_user=12).with_columns(
        pl.col("timestamp").dt.truncate("1h")  # ~60 events an hour share their timestamp
    )
    scan = _shuffled_events_in_parquet(tmp_path, events, rng, rows_per_file=100)
    plain = collect_in_time_order(scan, max_events)
    ranked = collect_in_time_order(scan, max_events, rank_ids=True)
    assert ranked.schema["event_id"] == pl.UInt32 and ranked.n_chunks() == plain.n_chunks()
    assert ranked["event_id"].to_list() == list(range(plain.height))
    assert ranked.drop("event_id").equals(plain.drop("event_id"))
    train = collect_in_time_order(scan, max_events, rank_ids=True, test_fraction=0.2)
    assert train.equals(temporal_split(ranked, 0.2).train)  # (the same ranks: a prefix)
    assert plain["timestamp"].n_unique() < plain.height / 20
    assert plain["event_id"].to_list() != sorted(
        plain["event_id"].to_list(), key=lambda e: int(e[1:])
    )
    split_plain, split_ranked = temporal_split(plain, 0.2, 0.15), temporal_split(ranked, 0.2, 0.15)
    for part in ("fit", "validation", "test"):
        a, b = getattr(split_plain, part), getattr(split_ranked, part)
        assert a.height and a.drop("event_id").equals(b.drop("event_id")), part
    users = np.array(sorted(plain["user_id"].unique()), dtype=object)
    items = np.array(sorted(plain["item_id"].unique()), dtype=object)
    a = sequence_transitions(plain, None, users, items, max_events=500)
    b = sequence_transitions(ranked, None, users, items, max_events=500)
    assert a.nnz > 100 and (a != b).nnz == 0
    got = {}
    for name, frame in (("plain", plain), ("ranked", ranked)):
        split = temporal_split(frame, 0.2)
        got[name] = [holdout_pairs(split.train, split.test).rows()]
        ev, final = fit_eval_and_final(
            frame, cluster_items(40), None, HybridConfig(**FAST_HYBRID), 0.2
        )
        got[name] += [_saved_folder(m, tmp_path / f"{name}-{v}") for v, m in
                      (("eval", ev), ("final", final))]  # fmt: skip
    want, have = got["plain"], got["ranked"]
    assert len(want[0]) > 10 and have[0] == want[0]
    for variant, w, g in zip(("eval", "final"), want[1:], have[1:], strict=True):
        assert sorted(g) == sorted(w) and len(w) > 10
        for name in w:
            assert g[name] == w[name], f"{variant}/{name}"


def test_models_of_a_dataset_share_its_pattern_instead_of_copies():
    """The seen items, co-occurrence's log-damped history and EASE's histories are the
    dataset's pattern with their own values (or the dataset's matrices themselves): the same
    values as the copies they replace, 4 bytes a pair or none instead of 8. A matrix that is
    not canonical is copied, so that sorting it never moves another's entries."""
    from synthetic_events import cluster_events, cluster_items

    from recsys.models.cooccurrence import CooccurrenceRecommender
    from recsys.models.data import build_dataset, same_pattern
    from recsys.models.ease import EASERecommender

    events = cluster_events(np.random.default_rng(3), n_users=60, n_items=30, per_user=8)
    data = build_dataset(events, cluster_items(30), None)
    c = data.confidence
    assert c.has_canonical_format and c.nnz > 100
    seen = data.seen()
    assert np.shares_memory(seen.indices, c.indices) and np.shares_memory(seen.indptr, c.indptr)
    np.testing.assert_array_equal(seen.toarray(), (c.toarray() != 0).astype(np.float32))
    cooc = CooccurrenceRecommender().fit(data)
    assert np.shares_memory(cooc.history_.indices, c.indices)
    want = np.log1p(np.maximum(c.data.astype(np.float32), 0))
    np.testing.assert_array_equal(cooc.history_.data, want)
    assert cooc.history_.data.dtype == np.float32
    assert EASERecommender(binary=True).fit(data).x_ is seen
    x = EASERecommender(binary=False).fit(data).x_
    assert x.dtype == np.float32 and np.shares_memory(x.data, c.data)
    messy = sp.csr_matrix((np.array([1.0, 2.0], np.float32), [1, 0], [0, 2]), shape=(1, 2))
    assert not messy.has_canonical_format
    copy = same_pattern(messy, np.array([5.0, 6.0], np.float32))
    copy.sort_indices()
    np.testing.assert_array_equal(messy.indices, [1, 0])  # untouched
    np.testing.assert_array_equal(copy.toarray(), [[6.0, 5.0]])

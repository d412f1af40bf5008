"""From validated events to what every model trains on.

* :func:`interactions` folds events into one weighted, time-decayed confidence per (user, item).
* :func:`temporal_split` cuts events by time into train / validation / test.
* :func:`build_dataset` adds the integer index maps, sparse matrices and item / user side data
  (category, brand, tags, price, age, segment) that the models and the ranker use.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import numpy as np
import polars as pl
import scipy.sparse as sp

from recsys.contract import DEFAULT_EVENT_WEIGHTS, EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA

#: Event types that make the "co-buy" signal (a stronger intent than a view).
BUY_EVENT_TYPES: tuple[str, ...] = ("add_to_cart", "purchase")
#: Events apart (in a user's time order) that still count as a sequence transition.
SEQUENCE_WINDOW = 3

_DAY_US = 86_400 * 1_000_000


@dataclass(frozen=True)
class Interactions:
    """One row per (user, item) with a positive confidence, plus the integer index maps.

    ``frame`` has columns user_id, item_id, user_idx, item_idx, confidence, n_events,
    first_ts, last_ts. ``user_ids[user_idx]`` and ``item_ids[item_idx]`` give the ids back.
    """

    frame: pl.DataFrame
    user_ids: np.ndarray
    item_ids: np.ndarray

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def matrix(self) -> sp.csr_matrix:
        """Users x items confidence matrix (float32)."""
        return _csr(self.frame, "confidence", self.n_users, self.n_items)


def _csr(frame: pl.DataFrame, column: str, n_users: int, n_items: int) -> sp.csr_matrix:
    m = sp.csr_matrix(
        (
            frame[column].to_numpy().astype(np.float32),
            (frame["user_idx"].to_numpy(), frame["item_idx"].to_numpy()),
        ),
        shape=(n_users, n_items),
    )
    m.sum_duplicates()
    m.sort_indices()
    return m


def event_weight_expr(weights: dict[str, float]) -> pl.Expr:
    """Per-row weight (Float64) of an event from its type; types missing from `weights` (and
    a null type) weigh 0.

    A chain of `when` on the type, not `replace_strict`: Polars (2.1) does not stream
    `replace_strict`, so a lazy scan that weighed its events with it was collected whole
    before the fold (a group-by of 30M events' weights per item: +2.1 GB instead of +0.2 GB).
    The same values (tested)."""
    event_type = pl.col("event_type")
    w = event_type.is_null().cast(pl.Float64) * 0.0  # (0 on every row: a column, not a scalar)
    for name, value in weights.items():
        w = pl.when(event_type == name).then(pl.lit(float(value), pl.Float64)).otherwise(w)
    return w


def _weight_expr(
    weights: dict[str, float], half_life_days: float | None, now_ts: datetime | None
) -> pl.Expr:
    """The column ``w`` of `decayed_weights` (no decay when `now_ts` is None)."""
    w = event_weight_expr(weights)
    if half_life_days is not None and half_life_days > 0 and now_ts is not None:
        age_days = (
            pl.lit(now_ts).cast(EVENT_SCHEMA["timestamp"]) - pl.col("timestamp")
        ).dt.total_microseconds() / _DAY_US
        # Events after `now` (clock skew) count as fresh, never as amplified.
        w = w * pl.lit(0.5).pow(age_days.clip(lower_bound=0.0) / half_life_days)
    return w.alias("w")


def decayed_weights(
    events: pl.DataFrame,
    weights: dict[str, float] | None = None,
    half_life_days: float | None = None,
    now: datetime | None = None,
) -> pl.DataFrame:
    """`events` with a column ``w``: type weight x 0.5 ** (age_days / half_life_days)."""
    weights = DEFAULT_EVENT_WEIGHTS if weights is None else weights
    now_ts = None
    if half_life_days is not None and half_life_days > 0 and events.height:
        now_ts = events["timestamp"].max() if now is None else now
    return events.with_columns(_weight_expr(weights, half_life_days, now_ts))


#: events a pass over a lazy scan holds at a time (`write_interactions`, `collect_in_time_order`)
FOLD_EVENTS = 4_000_000
#: events `collect_in_time_order` sorts at a time: reading and sorting a run holds ~200 bytes
#: an event beside the frame (Parquet decoding, the unsorted run, the sort), kept afterwards
#: by Polars' allocator (3M demo events, a 113 MiB frame: +670 MiB of RSS in one run of
#: 4M, +390 in runs of 1M, +305 in runs of 250k)
SORT_EVENTS = 1_000_000

_PAIR_ID_SCHEMA = {"user_id": pl.String, "item_id": pl.String}


def id_types(frame: pl.DataFrame | pl.LazyFrame) -> dict[str, pl.DataType]:
    """The types of `frame`'s user and item ids: strings, or Categoricals as `read_inputs`
    holds them. A small table joined to the events is cast to them (and a fold's pairs cast
    to strings), rather than every event's ids to strings: a cast of the events costs ~20 %
    more time in a fold, and a cast plan read three times is held whole for them."""
    schema = frame.collect_schema()
    return {c: schema[c] for c in _PAIR_ID_SCHEMA if c in schema}


_PAIR_AGGS = (
    pl.col("w").sum().alias("confidence"),
    pl.len().alias("n_events"),
    pl.col("timestamp").min().alias("first_ts"),
    pl.col("timestamp").max().alias("last_ts"),
)


def _pairs(
    events: pl.DataFrame,
    weights: dict[str, float],
    half_life_days: float | None,
    now: datetime | None,
) -> pl.DataFrame:
    """The positive (user_id, item_id) sums of `interactions`, unsorted: folded a range of
    users of at most `FOLD_EVENTS` events at a time (`_range_pairs`: exact sums in any order,
    else each pair's weights summed in the events' order), as a lazy scan is. One group-by
    over every event held ~160 bytes an event beside the frame (+1.6 GiB at 10M)."""
    parts = list(_pair_parts(events, weights, half_life_days, now))
    return pl.concat(parts) if len(parts) > 1 else parts[0]


def _pair_parts(
    events: pl.DataFrame,
    weights: dict[str, float],
    half_life_days: float | None,
    now: datetime | None,
):
    """`_pairs` as the ranges of users it folds, each folded when it is asked for, in user
    order (at least one, maybe empty)."""
    folded = False
    for _, part in _range_pairs(events.lazy(), weights, half_life_days, now, FOLD_EVENTS):
        folded = True
        yield part
        del part  # (as in _range_pairs)
    if not folded:
        yield _fold(decayed_weights(events, weights, half_life_days, now)).cast(_PAIR_ID_SCHEMA)


def _fold(weighted: pl.DataFrame) -> pl.DataFrame:
    """`_pairs` of events with their weights ``w`` (user_id, item_id, w, timestamp)."""
    return weighted.group_by("user_id", "item_id").agg(*_PAIR_AGGS).filter(pl.col("confidence") > 0)


def _fold_in_order(weighted: pl.DataFrame) -> pl.DataFrame:
    """`_fold`, with each pair's weights summed the same way whatever the frame's size and
    the threads: a stable sort by pair, then NumPy's sum of each run of the pair's weights
    in the frame's order. (Polars' group-by adds a group's floats in an order that varies
    from run to run; the same sums when every one is exact: `_exact_sums`.)"""
    s = weighted.sort("user_id", "item_id", maintain_order=True)
    new = (s["user_id"] != s["user_id"].shift(1)) | (s["item_id"] != s["item_id"].shift(1))
    starts = np.flatnonzero(new.fill_null(True).to_numpy())
    w, ts = s["w"].to_numpy(), s["timestamp"].to_physical().to_numpy()
    if not len(starts):
        return _fold(weighted)  # (empty: the schema)
    return (
        s[starts]
        .select("user_id", "item_id")
        .with_columns(
            pl.Series("confidence", np.add.reduceat(w, starts), dtype=pl.Float64),
            pl.Series("n_events", np.diff(np.append(starts, len(w))), dtype=pl.UInt32),
            pl.Series("first_ts", np.minimum.reduceat(ts, starts)).cast(s["timestamp"].dtype),
            pl.Series("last_ts", np.maximum.reduceat(ts, starts)).cast(s["timestamp"].dtype),
        )
        .filter(pl.col("confidence") > 0)
    )


def _exact_sums(weights: dict[str, float], half_life_days: float | None) -> bool:
    """Whether every pair's sum is exact in floating point whatever the order of its events:
    no decay, and each weight a multiple of 1/1024 under 2**20 in size (the contract's are
    multiples of 1/2), so every partial sum is an exact binary fraction."""
    if half_life_days is not None and half_life_days > 0:
        return False
    return all(
        abs(w) < 2**20 and float(w) * 1024 == round(float(w) * 1024) for w in weights.values()
    )


def _numbered(
    pairs: pl.DataFrame, umap: pl.DataFrame, imap: pl.DataFrame, ids: bool = True
) -> pl.DataFrame:
    """`pairs` with their indices, as `Interactions.frame` (pairs outside the maps dropped);
    without `ids`, the id columns are dropped before the sort (it gathered them too)."""
    index = ["user_idx", "item_idx", "confidence", "n_events", "first_ts", "last_ts"]
    joined = pairs.join(umap, on="user_id", how="inner").join(imap, on="item_id", how="inner")
    if not ids:
        return joined.select(index).sort("user_idx", "item_idx")
    return joined.sort("user_idx", "item_idx").select("user_id", "item_id", *index)


def _numbered_ranges(ranges, imap: pl.DataFrame, ids: bool = True):
    """`_numbered` of each range of users' pairs, from an iterable of (pairs, the range's
    users sorted), in user order: each range's users continue the previous range's indices,
    so the frames in order are the whole frame sorted by (user_idx, item_idx)."""
    offset = 0
    for pairs, users in ranges:
        numbered = _numbered(pairs, _index_map(users, "user", offset), imap, ids)
        del pairs  # (not held while the next range is read or folded: nor by the generators
        yield numbered  # that gave it, which drop theirs after their yield)
        del numbered  # (nor this one, while the next range is folded)
        offset += len(users)


def _index_map(ids, name: str, first: int = 0) -> pl.DataFrame:
    """(<name>_id, <name>_idx): `ids` numbered from `first`."""
    return pl.DataFrame(
        [
            pl.Series(f"{name}_id", ids, dtype=pl.String),
            pl.Series(f"{name}_idx", np.arange(first, first + len(ids)), dtype=pl.Int32),
        ]
    )


def interactions(
    events: pl.DataFrame,
    weights: dict[str, float] | None = None,
    half_life_days: float | None = None,
    now: datetime | None = None,
    *,
    user_ids: np.ndarray | None = None,
    item_ids: np.ndarray | None = None,
) -> Interactions:
    """Fold events into one confidence per (user, item).

    Each event contributes ``weights[event_type]`` (default: ``DEFAULT_EVENT_WEIGHTS``; a tenant
    overrides or extends it), decayed exponentially with age relative to ``now`` (default: the
    newest event) when ``half_life_days`` is set. Negative weights (dislike) count against the
    pair; pairs whose total is not positive are dropped.

    ``user_ids`` / ``item_ids`` fix the index maps (e.g. a catalog with items nobody touched
    yet); pairs outside them are dropped. By default the maps are the sorted ids that remain.
    (`write_interactions` folds a lazy scan of any size into the same frame, on disk.)
    """
    pairs = _pairs(
        events, DEFAULT_EVENT_WEIGHTS if weights is None else weights, half_life_days, now
    )
    uids = (
        np.array(sorted(pairs["user_id"].unique().to_list()), dtype=object)
        if user_ids is None
        else np.asarray(user_ids, dtype=object)
    )
    iids = (
        np.array(sorted(pairs["item_id"].unique().to_list()), dtype=object)
        if item_ids is None
        else np.asarray(item_ids, dtype=object)
    )
    frame = _numbered(pairs, _index_map(uids, "user"), _index_map(iids, "item"))
    return Interactions(frame=frame, user_ids=uids, item_ids=iids)


def _range_pairs(
    scan: pl.LazyFrame,
    weights: dict[str, float] | None,
    half_life_days: float | None,
    now: datetime | None,
    max_events: int,
):
    """(number of events, `_pairs` of them) per range of users of the lazy `scan`, in user
    order (see `write_interactions`). The weights are computed as the events are read (as
    `decayed_weights` computes them). With exact sums a range's pairs are one group-by of
    Polars' streaming engine (memory: the range's pairs); otherwise the range's events (ids,
    times, weights) are held and folded by `_fold_in_order`."""
    weights = DEFAULT_EVENT_WEIGHTS if weights is None else weights
    # (a row without an id is no pair; a null user would also sort first and empty the
    # ranges' bounds: validated events have none, a holdout read as it is may)
    scan = scan.select("user_id", "item_id", "event_type", "timestamp").filter(
        pl.col("user_id").is_not_null() & pl.col("item_id").is_not_null()
    )
    if half_life_days is not None and half_life_days > 0 and now is None:
        now = scan.select(pl.col("timestamp").max()).collect(engine="streaming").item()
    weighted = scan.select(
        "user_id", "item_id", _weight_expr(weights, half_life_days, now), "timestamp"
    )
    per_user = (
        scan.group_by("user_id")
        .agg(pl.len().alias("n"))
        .collect(engine="streaming")
        .sort("user_id")
    )
    if not per_user.height:
        return
    counts = per_user["n"].to_numpy().astype(np.int64)
    starts = np.cumsum(counts) - counts
    cut = np.flatnonzero(np.diff(starts // max_events)) + 1  # the first user of each new range
    first, last = np.concatenate(([0], cut)), np.concatenate((cut - 1, [len(counts) - 1]))
    ids = per_user["user_id"]
    exact = _exact_sums(weights, half_life_days)
    for lo, hi in zip(first.tolist(), last.tolist(), strict=True):
        events = weighted.filter(pl.col("user_id").is_between(pl.lit(ids[lo]), pl.lit(ids[hi])))
        if exact:  # any order gives the same sums: Polars' streaming engine holds the pairs only
            pairs = events.group_by("user_id", "item_id").agg(*_PAIR_AGGS)
            pairs = pairs.filter(pl.col("confidence") > 0).collect(engine="streaming")
        else:
            pairs = _fold_in_order(events.collect(engine="streaming"))
        # (folded on the ids as held, Categoricals or strings: the pairs' ids as strings)
        pairs = pairs.cast(_PAIR_ID_SCHEMA)
        yield int(counts[lo : hi + 1].sum()), pairs
        del pairs  # (a generator's local is held while it waits: not while the next is folded)


@dataclass(frozen=True)
class InteractionCounts:
    """What `write_interactions` wrote: events read, pairs, users and items that remain."""

    events: int
    pairs: int
    users: int
    items: int


def write_interactions(
    scan: pl.LazyFrame,
    path: str,
    fs: Any = None,
    weights: dict[str, float] | None = None,
    half_life_days: float | None = None,
    now: datetime | None = None,
    *,
    max_events: int = FOLD_EVENTS,
    sync: bool = True,
) -> InteractionCounts:
    """Write `interactions(events, weights, half_life_days, now).frame` of the events of the
    lazy `scan` as Parquet at `path` (`write_parquet_parts_atomic`, with `fs` and `sync`),
    holding about `max_events` events and their pairs at a time, never all the events nor
    all the pairs. The same rows; the same bits where every sum is exact in any order (no
    decay, weights that are binary fractions: the contract's), else sums within rounding of
    `interactions`' (whose Polars group-by adds in an order of its own), the same bits from
    run to run (`_fold_in_order`).

    A streamed count per user cuts the users, in sorted order, into ranges of consecutive ids
    whose events start within the same `max_events` (a range holds at most `max_events` plus
    its last user's events). Each range's events are collected in the scan's order and folded
    in memory, and its positive pairs go to a scratch file. The index maps are the sorted ids
    that remain, so a second pass numbers each range's pairs (its users continue the previous
    range's indices) and writes them in order: sorted by (user_idx, item_idx), as one frame of
    all of them would be.
    """
    from recsys.durable import write_parquet_parts_atomic

    with tempfile.TemporaryDirectory(prefix="interactions-") as scratch:
        ranges: list[tuple[str, pl.Series]] = []  # (scratch file, the range's users that remain)
        item_ids: list[pl.Series] = []
        n_events = 0
        for r, (events, pairs) in enumerate(
            _range_pairs(scan, weights, half_life_days, now, max_events)
        ):
            n_events += events
            part = os.path.join(scratch, f"{r}.parquet")
            pairs.write_parquet(part, compression="lz4")
            ranges.append((part, pairs["user_id"].unique().sort()))
            item_ids.append(pairs["item_id"].unique())
            del pairs
        imap = _index_map(
            pl.concat(item_ids).unique().sort() if item_ids else pl.Series([], dtype=pl.String),
            "item",
        )
        n_users = sum(len(users) for _, users in ranges)

        def numbered():
            yield from _numbered_ranges(((pl.read_parquet(p), u) for p, u in ranges), imap)
            if not ranges:  # no events: the empty frame, for its schema
                yield interactions(pl.DataFrame(schema=EVENT_SCHEMA), weights).frame

        n_pairs = write_parquet_parts_atomic(numbered(), path, fs, sync=sync)
    return InteractionCounts(n_events, n_pairs, n_users, imap.height)


# --- temporal split -----------------------------------------------------------------------


@dataclass(frozen=True)
class TemporalSplit:
    """Events cut by time: ``train`` (itself ``fit`` + ``validation``) and ``test``."""

    fit: pl.DataFrame
    validation: pl.DataFrame
    test: pl.DataFrame
    validation_start: datetime | None
    test_start: datetime | None

    @property
    def train(self) -> pl.DataFrame:
        return pl.concat([self.fit, self.validation])


#: rows `in_time_order` compares at a time
ORDER_CHECK_ROWS = 1_000_000


def in_time_order(events: pl.DataFrame) -> bool:
    """Whether `events` are sorted by (timestamp, event_id) as `temporal_split` sorts them
    (a null id before any other of its timestamp), checked pair by pair of neighbours,
    `ORDER_CHECK_ROWS` at a time (memory: one slice's comparisons, not a sort of all of them)."""
    for start in range(0, max(events.height - 1, 0), ORDER_CHECK_ROWS):
        part = events.slice(start, ORDER_CHECK_ROWS + 1).select("timestamp", "event_id")
        ts, ids = part["timestamp"], part["event_id"]
        t0, t1, i0, i1 = ts[:-1], ts[1:], ids[:-1], ids[1:]
        tied_in_order = i0.is_null() | (i1.is_not_null() & (i0 <= i1))
        if not ((t0 < t1) | ((t0 == t1) & tied_in_order)).fill_null(False).all():
            return False
    return True


def temporal_split(
    events: pl.DataFrame, test_fraction: float = 0.2, validation_fraction: float = 0.0
) -> TemporalSplit:
    """Global temporal split by event order.

    The newest ``test_fraction`` of events are the test period; of the rest (train), the newest
    ``validation_fraction`` are the validation window. Events are ordered by (timestamp,
    event_id), so ties at a cut are split deterministically.
    """
    if not (0 <= test_fraction < 1 and 0 <= validation_fraction < 1):
        raise ValueError("fractions must be in [0, 1)")
    # already in order (a part of an earlier split): slices of it, no copy of the events
    if in_time_order(events):
        ordered = events
    else:
        order = events.select(pl.arg_sort_by("timestamp", "event_id", maintain_order=True))
        ordered = events[order.to_series().to_numpy()]
        del order
    n = ordered.height
    n_train = n - int(round(n * test_fraction))
    n_fit = n_train - int(round(n_train * validation_fraction))
    ts = ordered["timestamp"]
    return TemporalSplit(
        fit=ordered[:n_fit],
        validation=ordered[n_fit:n_train],
        test=ordered[n_train:],
        validation_start=ts[n_fit] if n_fit < n_train else None,
        test_start=ts[n_train] if n_train < n else None,
    )


#: The events a fit reads: a frame, or a function that reads them, anew at each call, so
#: that nobody holds them between the phases that read them (see `fit_eval_and_final`); it
#: is given a test fraction and reads only the train part (see `events_of`). An
#: :class:`EventReader` also gives them as a lazy scan, for the folds that stream them.
EventSource = pl.DataFrame | Callable[[float], pl.DataFrame]


@runtime_checkable
class EventReader(Protocol):
    """An :data:`EventSource` function that can also give the events as a lazy scan (in any
    order, with unique event ids), which `scan_split` cuts without reading them."""

    def __call__(self, test_fraction: float = 0.0) -> pl.DataFrame: ...

    def scan(self) -> pl.LazyFrame: ...


def events_of(source: EventSource, test_fraction: float = 0.0) -> pl.DataFrame:
    """The events of `source`, or with `test_fraction` their train part
    (``temporal_split(events, test_fraction).train``). A function is called with
    `test_fraction` and reads them now (then only the train part need be read)."""
    if not isinstance(source, pl.DataFrame):
        return source(test_fraction)
    return temporal_split(source, test_fraction).train if test_fraction else source


@dataclass(frozen=True)
class ScanSplit:
    """`temporal_split` of a lazy scan of the events: its train and test parts are filters of
    the scan (the same events as the in-memory split's parts, in the scan's order)."""

    train: pl.LazyFrame
    test: pl.LazyFrame
    n_train: int
    n_test: int
    test_start: datetime | None


def temporal_split_scan(scan: pl.LazyFrame, test_fraction: float = 0.2) -> ScanSplit:
    """The train / test cut of ``temporal_split(events, test_fraction)`` without holding the
    events: a streamed count of events per UTC day, then the (timestamp, event_id) of the
    events of the one day the cut falls in, sorted as `temporal_split` orders them. The test
    part is every event at or after the first test event in (timestamp, event_id) order, so
    event ids must be unique (the warehouse's are: the blocking ``events_unique`` check).
    Memory: one row per day, plus that day's timestamps and ids."""
    if not 0 <= test_fraction < 1:
        raise ValueError("fractions must be in [0, 1)")
    day = (pl.col("timestamp").dt.epoch("us") // _DAY_US).alias("day")
    counts = scan.select(day).group_by("day").agg(pl.len()).collect(engine="streaming")
    counts = counts.sort("day")
    n = int(counts["len"].sum())
    n_train = n - int(round(n * test_fraction))
    if n_train >= n:
        return ScanSplit(scan, scan.filter(pl.lit(False)), n, 0, None)
    ends = counts["len"].cum_sum().to_numpy()
    at = int(np.searchsorted(ends, n_train, side="right"))  # the day holding event n_train
    before = int(ends[at - 1]) if at else 0
    cut_day = int(counts["day"][at])
    that_day = (
        scan.filter(day == cut_day)
        .select("timestamp", "event_id")
        .collect(engine="streaming")
        .sort("timestamp", "event_id", maintain_order=True)
    )
    first_test = that_day.row(n_train - before, named=True)
    t, e = first_test["timestamp"], first_test["event_id"]
    ts = pl.col("timestamp")
    t_lit = pl.lit(t).cast(EVENT_SCHEMA["timestamp"])
    is_test = (ts > t_lit) | ((ts == t_lit) & (pl.col("event_id") >= e))
    return ScanSplit(scan.filter(~is_test), scan.filter(is_test), n_train, n - n_train, t)


def scan_split(source: EventSource, test_fraction: float) -> ScanSplit:
    """`temporal_split(events, test_fraction)`'s train and test parts as lazy frames, for
    the folds Polars' streaming engine runs (`holdout_pairs`): an :class:`EventReader`'s
    scan cut by `temporal_split_scan` (the events read as they are folded, never held),
    a frame's slices, or a plain function's events, read."""
    if isinstance(source, EventReader):
        return temporal_split_scan(source.scan(), test_fraction)
    s = temporal_split(events_of(source), test_fraction)
    return ScanSplit(s.train.lazy(), s.test.lazy(), s.train.height, s.test.height, s.test_start)


def collect_in_time_order(
    scan: pl.LazyFrame,
    max_events: int = SORT_EVENTS,
    rank_ids: bool = False,
    test_fraction: float = 0.0,
) -> pl.DataFrame:
    """The events of `scan` collected in `temporal_split`'s order: by (timestamp, event_id),
    ties in the scan's order (the frame ``events[arg_sort_by(timestamp, event_id,
    maintain_order=True)]`` of the collected scan, equal row for row), so every split of it
    is cut in slices, without a sorted copy. With `test_fraction`, only the train part
    (``temporal_split(events, test_fraction).train``): the days after it are never read.

    With `rank_ids`, each event id is replaced by its rank in that order (0, 1, ...; UInt32,
    UInt64 from 2**32 events). That is all training reads of them: the order of events with
    the same timestamp (`temporal_split`'s cuts, a user's sequence), which the ranks give
    alike, in 4 bytes an event instead of a string (a 16-byte view, plus the bytes of an id
    longer than 12: 52 bytes an event for a UUID).

    Never holds the scan unsorted beside its sorted copy: a streamed count of events per UTC
    day, then runs of whole days of at most `max_events` events (a bigger day alone) are
    each collected and sorted, in order, and the sorted runs are the frame's chunks. Memory:
    the events once, plus one run twice while it is sorted."""
    if not 0 <= test_fraction < 1:
        raise ValueError("fractions must be in [0, 1)")
    ts = pl.col("timestamp")
    day = (ts.dt.epoch("us") // _DAY_US).alias("day")
    counts = scan.select(day).group_by("day").agg(pl.len()).collect(engine="streaming")
    counts = counts.sort("day", nulls_last=False)  # no timestamp first, as arg_sort_by puts it
    n = int(counts["len"].sum())
    n_train = n - int(round(n * test_fraction))  # (temporal_split's cut)
    runs: list[pl.Expr] = []
    first = last = None  # the days of the run being gathered
    size = 0
    before = 0  # (the events of the runs before the one being gathered)
    for d, n_day in counts.iter_rows():
        if before + size >= n_train and (runs or first is not None):
            break  # (the train part is read: the newer days are not)
        if d is None:
            runs.append(ts.is_null())
            before += n_day
            continue
        if first is not None and size + n_day > max_events:
            runs.append(_days(first, last))
            first, before, size = None, before + size, 0
        first = d if first is None else first
        last, size = d, size + n_day
    if first is not None:
        runs.append(_days(first, last))
    if not runs:
        events = scan.collect()[:n_train]
        return _ranked(events, 0) if rank_ids else events
    parts, start = [], 0
    for run in runs:
        part = scan.filter(run).collect().sort("timestamp", "event_id", maintain_order=True)
        part = part[: n_train - start]  # (the last run: up to the cut)
        parts.append(_ranked(part, start) if rank_ids else part)
        start += part.height
    return pl.concat(parts, rechunk=False) if len(parts) > 1 else parts[0]


def _ranked(part: pl.DataFrame, start: int) -> pl.DataFrame:
    """`part` with its event ids replaced by start, start + 1, ... (`collect_in_time_order`)."""
    dtype = pl.UInt32 if start + part.height <= 2**32 else pl.UInt64
    ranks = pl.int_range(start, start + part.height, dtype=dtype, eager=True)
    return part.with_columns(ranks.alias("event_id"))


def _days(first: int, last: int) -> pl.Expr:
    """The events of the UTC days `first` to `last` (days since the epoch), as bounds on the
    timestamp that Parquet's statistics can use to skip other days' row groups."""
    dtype = EVENT_SCHEMA["timestamp"]
    lo = pl.lit(datetime.fromtimestamp(first * 86_400, tz=UTC)).cast(dtype)
    hi = pl.lit(datetime.fromtimestamp((last + 1) * 86_400, tz=UTC)).cast(dtype)
    return (pl.col("timestamp") >= lo) & (pl.col("timestamp") < hi)


def holdout_pairs(
    train_events: pl.DataFrame | pl.LazyFrame,
    holdout_events: pl.DataFrame | pl.LazyFrame,
    weights: dict[str, float] | None = None,
) -> pl.DataFrame:
    """The positive (user_id, item_id) pairs of a later window, per the evaluation protocol.

    Keeps pairs with a positive total weight whose user and item both appear in train, and
    drops pairs the user already had in train.

    Polars' streaming engine reads the parts, lazy scans or frames: memory holds the later
    window's pairs (and the train users, items and pairs among them), not the events of
    either part. (In memory, the joins of the frames held each a copy of the train events'
    matches: +860 MiB at 10M demo events against +130 MiB streamed, and 4.5 s against 2.6 s.)
    The later window's users and items are numbered, and the train events are matched to its
    pairs by one integer a pair (the two ids as a join's key held ~2.5 times as much), in
    three queries collected one after another (one query of all three read the train events
    three times at once, with the buffers and tables of each: at 30M demo events, 3.5M later
    pairs, +1,250 MiB, now +540; 20 s of CPU, now ~30 s).
    """
    if isinstance(holdout_events, pl.LazyFrame):  # folded a range of users at a time
        parts = [
            p.select("user_id", "item_id")
            for _, p in _range_pairs(holdout_events, weights, None, None, FOLD_EVENTS)
        ]
        pos = pl.concat(parts) if parts else pl.DataFrame(schema=_PAIR_ID_SCHEMA)
        del parts
    else:
        pos = _pairs(holdout_events, weights or DEFAULT_EVENT_WEIGHTS, None, None)
    train = train_events.lazy().select("user_id", "item_id")
    # the later window's pairs (few) cast to the train ids' types (Categoricals as
    # `read_inputs` holds them), not the train events to strings: the train side is read
    # three times, and a cast of it was held whole for them (+339 MiB at 10M, now +76)
    pos = pos.select("user_id", "item_id").cast(id_types(train))
    users = pos.select(pl.col("user_id").unique()).with_row_index("u")
    items = pos.select(pl.col("item_id").unique()).with_row_index("i")
    key = (pl.col("u").cast(pl.Int64) * items.height + pl.col("i")).alias("key")
    pos = pos.join(users, on="user_id").join(items, on="item_id").with_columns(key)
    # train's pairs among the later window's, by key; its users and items among the window's
    seen = (
        train.join(users.lazy(), on="user_id")
        .join(items.lazy(), on="item_id")
        .select(key)
        .join(pos.lazy().select("key"), on="key", how="semi")
        .unique()
        .collect(engine="streaming")
    )
    in_train = [
        train.select(c).join(ids.lazy().select(c), on=c, how="semi").unique()
        .collect(engine="streaming")
        for c, ids in (("user_id", users), ("item_id", items))
    ]  # fmt: skip
    return (
        pos.lazy()
        .join(in_train[0].lazy(), on="user_id", how="semi")
        .join(in_train[1].lazy(), on="item_id", how="semi")
        .join(seen.lazy(), on="key", how="anti")
        .select("user_id", "item_id")
        .cast(_PAIR_ID_SCHEMA)
        .sort("user_id", "item_id")
        .collect(engine="streaming")
    )


# --- sequences: what the user did last ---------------------------------------------------


class _PairColumns:
    """What `build_dataset` reads of the numbered pairs (`_numbered_ranges`' frames, added in
    order), each frame cut to it as it comes: per pair its item index (int32), confidence
    (float32, as the matrix holds it) and days from its last event to `now` (float32, 0
    without `now`: the sequence models' ages), per user its count of pairs, per item (of
    the frames' item map) the time of its first event."""

    _NONE = np.iinfo(np.int64).max  # (an item without a pair has no first event)

    def __init__(self, n_items: int, now: datetime | None) -> None:
        self._now = now
        self._parts: dict[str, list[np.ndarray]] = {
            "item_idx": [], "confidence": [], "days": [], "pairs_per_user": []
        }  # fmt: skip
        self._first = np.full(n_items, self._NONE, np.int64)  # (the timestamps' integers)
        self._ts_type: pl.DataType = EVENT_SCHEMA["timestamp"]
        self._users = 0  # (the frames' users so far: the next frame's first index)

    def add(self, f: pl.DataFrame, n_users: int) -> None:
        """One range's numbered pairs, whose users are the next `n_users` indices."""
        parts = self._parts
        parts["item_idx"].append(f["item_idx"].to_numpy().astype(np.int32))
        parts["confidence"].append(f["confidence"].to_numpy().astype(np.float32))
        if self._now is None or not f.height:
            parts["days"].append(np.zeros(f.height, np.float32))
        else:
            age = pl.lit(self._now).cast(EVENT_SCHEMA["timestamp"]) - pl.col("last_ts")
            days = (age.dt.total_microseconds() / _DAY_US).clip(lower_bound=0.0)
            parts["days"].append(f.select(days).to_series().to_numpy().astype(np.float32))
        users = f["user_idx"].to_numpy() - self._users
        parts["pairs_per_user"].append(np.bincount(users, minlength=n_users))
        self._users += n_users
        self._ts_type = f.schema["first_ts"]
        first = f.group_by("item_idx").agg(pl.col("first_ts").min().to_physical())
        at, ts = first["item_idx"].to_numpy(), first["first_ts"].to_numpy()
        self._first[at] = np.minimum(self._first[at], ts)

    def take(self, name: str) -> np.ndarray:
        """Column `name` of every pair (``pairs_per_user``: of every user), in order; no
        longer held here."""
        parts = self._parts.pop(name)
        whole = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        parts.clear()
        return whole

    def first_events(self, kept: np.ndarray) -> pl.Series:
        """``first_ts``: the first event of each item of the map that `kept` keeps, in
        order (null: the item has no pair)."""
        first = self._first[kept]
        series = pl.Series("first_ts", first, dtype=pl.Int64)
        return series.set(pl.Series(first == self._NONE), None).cast(self._ts_type)


def sequence_transitions(
    events: pl.DataFrame,
    weights: dict[str, float] | None,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    window: int = SEQUENCE_WINDOW,
    max_events: int = FOLD_EVENTS,
) -> sp.csr_matrix:
    """Items x items: for each user's positive events in time order (repeats of the same
    item in a row collapsed), every pair of different items at most `window` events apart
    adds 1 / distance, in both directions. What a user touches next after an item.

    Each entry is the exact sum of its 1 / distance, rounded once: the transitions are counted
    in integers (L / distance, L the least common multiple of 1 .. `window`) and the sums are
    divided by L at the end (in float64, then float32). So the matrix depends neither on the
    order of the additions nor on how the events are cut: it is built from ranges of users of
    about `max_events` events, one at a time (their sequences are apart), each range's counts
    added into the matrix. Memory: one range's transitions, plus the matrix and its next sum.
    (Every transition at once held ~58 bytes an event beside the matrix: +730 MiB at 10M.)"""
    weights = DEFAULT_EVENT_WEIGHTS if weights is None else weights
    n = len(item_ids)
    scale = math.lcm(*range(1, max(window, 0) + 1))
    uidx = pl.DataFrame(
        {"user_id": list(user_ids), "u": np.arange(len(user_ids), dtype=np.int32)},
        schema={"user_id": pl.String, "u": pl.Int32},
    )
    iidx = pl.DataFrame(
        {"item_id": list(item_ids), "i": np.arange(n, dtype=np.int32)},
        schema={"item_id": pl.String, "i": pl.Int32},
    )
    positive = (
        events.lazy()
        .filter(event_weight_expr(weights) > 0)
        .select("user_id", "item_id", "timestamp", "event_id")
    )
    held = id_types(events)  # (the maps cast to the events' ids: not every event to strings)
    uidx, iidx = uidx.cast({"user_id": held["user_id"]}), iidx.cast({"item_id": held["item_id"]})
    ranges = max(1, -(-events.height // max(max_events, 1)))
    bounds = np.linspace(0, len(user_ids), ranges + 1).round().astype(np.int64)
    counts = sp.csr_matrix((n, n), dtype=np.int32)
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        seq = (
            positive.join(uidx.slice(lo, hi - lo).lazy(), on="user_id", how="inner")
            .join(iidx.lazy(), on="item_id", how="inner")
            .select("u", "i", "timestamp", "event_id")
            .sort("u", "timestamp", "event_id")
            .select("u", "i")
            .collect(engine="streaming")
        )
        part = _range_transitions(seq["u"].to_numpy(), seq["i"].to_numpy(), n, window, scale)
        del seq
        big = counts.nnz and part.nnz and int(counts.data.max()) + int(part.data.max()) >= 2**31
        if counts.dtype == np.int32 and big:
            counts = counts.astype(np.int64)  # (a sum past int32: never on the demo's data)
        counts = counts + part
        del part
        if counts.indices.base is not None:  # (a sum's arrays are views of buffers sized for
            counts = counts.copy()  # both operands: up to twice the entries it holds)
    values = np.empty(counts.nnz, np.float32)  # (divided in float64 a chunk at a time)
    np.divide(counts.data, scale, out=values, casting="unsafe", dtype=np.float64)
    m = sp.csr_matrix((values, counts.indices, counts.indptr), shape=(n, n))
    m.sort_indices()
    return m


def _range_transitions(
    u: np.ndarray, i: np.ndarray, n: int, window: int, scale: int
) -> sp.csr_matrix:
    """`sequence_transitions`' counts (``scale`` / distance, summed) of the events (user,
    item) of whole users, sorted by user and time. Int32 unless a sum could pass it: an
    entry sums at most 2 * `window` transitions an event, each at most `scale`."""
    count_type = np.int32 if 2 * window * scale * max(len(u), 1) < 2**31 else np.int64
    keep = np.ones(len(u), bool)
    keep[1:] = (u[1:] != u[:-1]) | (i[1:] != i[:-1])
    u, i = u[keep], i[keep]
    del keep
    counts = sp.csr_matrix((n, n), dtype=count_type)
    for d in range(1, max(window, 0) + 1):  # a distance at a time: its entries, then summed
        ok = (u[d:] == u[:-d]) & (i[d:] != i[:-d])
        a, b = i[:-d][ok], i[d:][ok]
        del ok
        one = sp.coo_matrix(
            (np.full(2 * len(a), scale // d, count_type), (np.r_[a, b], np.r_[b, a])),
            shape=(n, n),
        ).tocsr()
        del a, b
        one.sum_duplicates()
        counts = counts + one
    return counts


# --- dataset: everything a model fits on -----------------------------------------------------


def same_pattern(m: sp.csr_matrix, values: np.ndarray) -> sp.csr_matrix:
    """A CSR matrix of `m`'s stored entries holding `values` (one per entry) instead. `m`'s
    index arrays are shared when `m` is canonical (sorted, no duplicates: sorting or summing
    either matrix then moves nothing), else copied: a model's matrix of a dataset's pattern
    (its seen items, co-occurrence's log-damped history) costs 4 bytes a pair, not 8."""
    m = m.tocsr()
    shared = m.has_canonical_format
    indices = m.indices if shared else m.indices.copy()
    indptr = m.indptr if shared else m.indptr.copy()
    return sp.csr_matrix((values, indices, indptr), shape=m.shape)


#: stored entries of a CSR matrix a per-entry pass holds at a time (`row_blocks`)
BLOCK_ENTRIES = 4_000_000


def row_blocks(indptr: np.ndarray, max_entries: int | None = None) -> list[tuple[int, int]]:
    """Consecutive row ranges ``(lo, hi)`` covering a CSR matrix of row pointers `indptr`,
    each of at most `max_entries` (default `BLOCK_ENTRIES`) stored entries (a longer row
    alone): a pass over each entry (an int64 row index, a sort) holds one range's
    temporaries, not every entry's."""
    max_entries = BLOCK_ENTRIES if max_entries is None else max_entries
    n_rows, bounds = len(indptr) - 1, [0]
    while bounds[-1] < n_rows:
        lo = bounds[-1]  # (the rows up to hi hold at most max_entries from lo's first)
        hi = int(np.searchsorted(indptr, indptr[lo] + max_entries, "right")) - 1
        bounds.append(max(hi, lo + 1))
    return list(zip(bounds[:-1], bounds[1:], strict=False))


@dataclass
class Dataset:
    """Index maps, interaction matrices and side data for one fit.

    Matrices are users x items CSR float32: ``confidence`` (all events, weighted and decayed),
    ``buy`` (add_to_cart / purchase only, for co-buy) and ``trending`` per item (short half-life).
    Item side data: ``item_category`` codes (-1 unknown) into ``categories``, ``item_brand``
    codes into ``brands``, ``item_tags`` (items x tags CSR), ``item_price`` (nan unknown),
    ``item_age_days`` (since created_at or first event), ``item_available``. ``user_segment``
    codes into ``segments``.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    confidence: sp.csr_matrix
    buy: sp.csr_matrix
    trending: np.ndarray
    item_category: np.ndarray
    categories: list[str]
    item_brand: np.ndarray
    brands: list[str]
    item_tags: sp.csr_matrix
    tags: list[str]
    item_price: np.ndarray
    item_age_days: np.ndarray
    item_available: np.ndarray
    user_segment: np.ndarray
    segments: list[str]
    now: datetime | None
    info: dict = field(default_factory=dict)
    #: users x items CSR, the pattern of ``confidence``: days from the pair's last event to
    #: ``now`` (0 = the newest); None when built without sequence data
    last_days: sp.csr_matrix | None = None
    #: items x items CSR: how often j came within ``SEQUENCE_WINDOW`` events of i in a user's
    #: time-ordered events (weight 1 / distance, both directions); None as above
    transitions: sp.csr_matrix | None = None
    _seen: sp.csr_matrix | None = field(default=None, repr=False, compare=False)

    def seen(self) -> sp.csr_matrix:
        """Users x items float32 CSR, 1 where the user has a positive interaction (the pattern
        of ``confidence``): built once and shared, read-only, by every model fitted on this
        dataset (each generator kept its own copy: six per dataset)."""
        if self._seen is None:
            c = self.confidence.tocsr()
            self._seen = same_pattern(c, np.ones(c.nnz, np.float32))
        return self._seen

    def drop_transitions(self) -> None:
        """Let go of ``transitions`` once every model that reads them is fitted (the recent
        items model alone does): the largest matrix a dataset holds (10M demo events: 142 of
        its 295 MiB) is then not held beside the fits after it (LightFM's, the ranker's)."""
        self.transitions = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_index(self, user_ids) -> np.ndarray:
        """Index of each user id, -1 for unknown users."""
        return index_lookup(self.user_ids, user_ids)

    def item_index(self, item_ids) -> np.ndarray:
        """Index of each item id, -1 for unknown items."""
        return index_lookup(self.item_ids, item_ids)


def index_lookup(ids: np.ndarray, query) -> np.ndarray:
    """The index of each id of `query` in `ids`, -1 where absent. `query`: a Polars Series of
    ids (read as it is: no Python string per id), or any iterable of ids (compared as
    strings)."""
    table = pl.DataFrame(
        {"id": list(ids), "idx": np.arange(len(ids), dtype=np.int64)},
        schema={"id": pl.String, "idx": pl.Int64},
    )
    if isinstance(query, pl.Series):
        q = query.cast(pl.String).alias("id").to_frame()
    else:
        q = pl.DataFrame({"id": [str(x) for x in query]}, schema={"id": pl.String})
    return q.join(table, on="id", how="left", maintain_order="left")["idx"].fill_null(-1).to_numpy()


def _codes(values: list[str | None]) -> tuple[np.ndarray, list[str]]:
    vocab = sorted({v for v in values if v is not None})
    lookup = {v: i for i, v in enumerate(vocab)}
    return np.array(
        [lookup.get(v, -1) if v is not None else -1 for v in values], dtype=np.int32
    ), vocab


def build_dataset(
    events: pl.DataFrame,
    items: pl.DataFrame | None = None,
    users: pl.DataFrame | None = None,
    *,
    weights: dict[str, float] | None = None,
    half_life_days: float | None = None,
    trending_half_life_days: float = 7.0,
    now: datetime | None = None,
    include_catalog_items: bool = True,
) -> Dataset:
    """Index maps, matrices and side data for a fit on `events`.

    Users are those with at least one positive interaction. Items are those with one, plus
    (``include_catalog_items``) every item of the `items` table, so content-aware models can
    score items nobody has touched yet.
    """
    items = pl.DataFrame(schema=ITEM_SCHEMA) if items is None else items
    users = pl.DataFrame(schema=USER_SCHEMA) if users is None else users
    now = (events["timestamp"].max() if events.height else None) if now is None else now
    # Every item a pair can hold, sorted: each range of users' pairs is numbered as soon as
    # it is folded (its users continue the previous range's indices), so only one range's
    # pairs are held at a time (all of them, held to be numbered, were ~60 bytes a pair);
    # the items without a positive pair (nor in the catalogue) leave the map at the end, a
    # renumbering that keeps the (user, item) order. The pairs are folded once (`interactions`
    # with fixed maps folded them again: a second group-by over every event).
    catalogue = items["item_id"] if include_catalog_items else items["item_id"].clear()
    candidates = pl.concat([events["item_id"].unique().cast(pl.String), catalogue])
    candidates = np.array(candidates.unique().sort().to_list(), dtype=object)
    imap = _index_map(candidates, "item")
    range_users: list[list[str]] = []

    def ranges():  # (each range's pairs, its users sorted), folded one at a time
        w = DEFAULT_EVENT_WEIGHTS if weights is None else weights
        for part in _pair_parts(events, w, half_life_days, now):
            range_users.append(sorted(part["user_id"].unique().to_list()))
            yield part, range_users[-1]
            del part  # (as in _range_pairs)

    # each range's numbered pairs are cut, as they come, to what the dataset reads of them:
    # its confidence and the days since its last event (float32), its item index, each
    # user's count of pairs and each item's first event (12 bytes a pair; the numbered
    # frames, all held to be joined, were ~36: float64 sums, counts, two timestamps)
    columns = _PairColumns(len(candidates), now)
    for numbered in _numbered_ranges(ranges(), imap, False):
        columns.add(numbered, len(range_users[-1]))
        del numbered
    user_ids = np.array([u for part in range_users for u in part], dtype=object)
    range_users.clear()
    item_idx = columns.take("item_idx")
    kept = np.zeros(len(candidates), bool)
    kept[item_idx] = True
    in_catalogue = index_lookup(candidates, catalogue)
    kept[in_catalogue[in_catalogue >= 0]] = True
    item_ids = candidates[kept]
    if not kept.all():  # (a renumbering that keeps the order, in place)
        np.take(np.cumsum(kept, dtype=np.int32) - 1, item_idx, out=item_idx)
    n_users, n_items = len(user_ids), len(item_ids)
    indptr = np.zeros(n_users + 1, np.int64)
    np.cumsum(columns.take("pairs_per_user"), out=indptr[1:])
    # sorted by (user, item), one entry a pair: canonical as built
    confidence = sp.csr_matrix(
        (columns.take("confidence"), item_idx, indptr), shape=(n_users, n_items)
    )
    del item_idx, indptr
    # the days since each pair's last event, on confidence's pattern (a pair of age 0 kept)
    last_days = same_pattern(confidence, columns.take("days"))
    n_pairs = confidence.nnz

    buy_events = events.filter(pl.col("event_type").is_in(list(BUY_EVENT_TYPES)))
    buy = interactions(
        buy_events, weights, half_life_days, now, user_ids=user_ids, item_ids=item_ids
    ).matrix()
    del buy_events

    # Trending: the same weights with a short half-life, summed per item by the streaming
    # engine (the in-memory group-by held the decayed weights of every event and their
    # temporaries, ~+0.5 GiB at 10M; Polars sums a group in an order of its own either way)
    w = _weight_expr(
        DEFAULT_EVENT_WEIGHTS if weights is None else weights, trending_half_life_days, now
    )
    tr = (
        events.lazy()
        .select("item_id", w)
        .group_by("item_id")
        .agg(pl.col("w").sum())
        .collect(engine="streaming")
    )
    trending = np.zeros(len(item_ids), dtype=np.float32)
    tr_idx = index_lookup(item_ids, tr["item_id"].to_list())
    ok = tr_idx >= 0
    trending[tr_idx[ok]] = np.maximum(tr["w"].to_numpy()[ok], 0)

    # Item side data, aligned on item_ids.
    side = pl.DataFrame({"item_id": item_ids.tolist()}, schema={"item_id": pl.String}).join(
        items.unique("item_id", keep="last", maintain_order=True),
        on="item_id",
        how="left",
        maintain_order="left",
    )
    side = side.with_columns(columns.first_events(kept))
    item_category, categories = _codes(side["category"].to_list())
    item_brand, brands = _codes(side["brand"].to_list())
    tag_lists = [[t for t in (ts or []) if t is not None] for ts in side["tags"].to_list()]
    tags = sorted({t for ts in tag_lists for t in ts})
    tag_lookup = {t: i for i, t in enumerate(tags)}
    rows = np.repeat(np.arange(len(tag_lists)), [len(ts) for ts in tag_lists])
    cols = np.array([tag_lookup[t] for ts in tag_lists for t in ts], dtype=np.int64)
    item_tags = sp.csr_matrix(
        (np.ones(len(cols), np.float32), (rows, cols)), shape=(len(item_ids), len(tags))
    )
    price = side["price"].cast(pl.Float64).fill_null(float("nan")).to_numpy().astype(np.float64)
    born = side.select(pl.coalesce("created_at", "first_ts").alias("born"))["born"]
    if now is not None:
        age = (
            pl.Series([now] * len(born)).cast(EVENT_SCHEMA["timestamp"]) - born
        ).dt.total_microseconds() / _DAY_US
        item_age = age.fill_null(float("nan")).to_numpy().astype(np.float64)
    else:
        item_age = np.full(len(item_ids), np.nan)
    available = side["available"].fill_null(True).to_numpy().astype(bool)

    useg = pl.DataFrame({"user_id": user_ids.tolist()}, schema={"user_id": pl.String}).join(
        users.unique("user_id", keep="last", maintain_order=True).select("user_id", "segment"),
        on="user_id",
        how="left",
        maintain_order="left",
    )
    user_segment, segments = _codes(useg["segment"].to_list())
    del side, useg  # (not held beside the transitions' build)
    transitions = sequence_transitions(events, weights, user_ids, item_ids)

    return Dataset(
        user_ids=user_ids,
        item_ids=item_ids,
        confidence=confidence,
        buy=buy,
        trending=trending,
        item_category=item_category,
        categories=categories,
        item_brand=item_brand,
        brands=brands,
        item_tags=item_tags,
        tags=tags,
        item_price=price,
        item_age_days=item_age,
        item_available=available,
        user_segment=user_segment,
        segments=segments,
        now=now,
        last_days=last_days,
        transitions=transitions,
        info={
            "n_events": events.height,
            "n_pairs": n_pairs,
            "weights": dict(DEFAULT_EVENT_WEIGHTS if weights is None else weights),
            "half_life_days": half_life_days,
        },
    )

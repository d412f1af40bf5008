"""A deterministic demo data set: a catalog, users with latent tastes, and shopping sessions.

Built so that a real model can beat popularity measurably: each user prefers a few categories
and, within each, one "style" of item; item popularity is power-law and drifts over time, new
items appear during the window; sessions run view -> add_to_cart -> purchase funnels. A small
share of rows is malformed on purpose (missing ids, bad timestamps, unknown types, oversize
fields, bad values, resent duplicates) to exercise validation.

Events stream to Parquet in chunks, so memory stays bounded from thousands to 100M events.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta

import numpy as np
import polars as pl

from recsys.durable import write_atomic, write_parquet_atomic
from recsys.storage import Storage

CATEGORIES = (
    "shoes",
    "jackets",
    "shirts",
    "trousers",
    "dresses",
    "bags",
    "watches",
    "jewelry",
    "phones",
    "laptops",
    "headphones",
    "cameras",
    "kitchen",
    "furniture",
    "lighting",
    "garden",
    "toys",
    "books",
    "sports",
    "beauty",
)
STYLE_TAGS = ("classic", "modern", "sporty", "premium")
EXTRA_TAGS = ("sale", "eco", "winter", "outdoor", "kids", "adult")
SEGMENTS = ("new", "regular", "loyal", "bargain")
COUNTRIES = ("FI", "SE", "DE", "FR", "ES", "IT", "NL", "PL", "GB", "US")
N_PHASES = 6  # popularity drifts across these many phases of the time window


@dataclass(frozen=True)
class DemoSpec:
    """What to generate; the same spec always gives the same files."""

    events: int = 200_000
    seed: int = 42
    items: int | None = None  # default: scales with events, 500..100k
    users: int | None = None  # default: scales with events, 200..5M
    days: int = 60
    end_date: str = field(default_factory=lambda: date.today().isoformat())
    malformed_share: float = 0.004
    duplicate_share: float = 0.003
    chunk_events: int = 1_000_000
    tenant: str = "default"

    @property
    def n_items(self) -> int:
        return self.items or int(np.clip(self.events // 40, 500, 100_000))

    @property
    def n_users(self) -> int:
        return self.users or int(np.clip(self.events // 25, 200, 5_000_000))


@dataclass
class DemoSummary:
    events_written: int = 0
    malformed: int = 0
    duplicates: int = 0
    items: int = 0
    users: int = 0
    files: list[str] = field(default_factory=list)
    start: str = ""
    end: str = ""
    skipped: bool = False


class _World:
    """The hidden truth behind the demo: item attributes, popularity and user tastes."""

    def __init__(self, spec: DemoSpec, rng: np.random.Generator):
        n_items, n_users = spec.n_items, spec.n_users
        n_cat = len(CATEGORIES)
        self.item_cat = rng.integers(0, n_cat, n_items)
        self.item_style = rng.integers(0, len(STYLE_TAGS), n_items)
        self.item_brand = rng.integers(0, 60, n_items)
        # power-law base popularity with a per-item trend, so rankings drift over the window
        self.base_pop = rng.pareto(1.2, n_items) + 0.05
        self.trend = rng.normal(0.0, 0.8, n_items)
        # 15% of items launch during the window (phase > 0), the rest exist from the start
        self.launch_phase = np.where(
            rng.random(n_items) < 0.15, rng.integers(1, N_PHASES, n_items), 0
        )
        # users: a sparse taste over categories and a preferred style in each category
        taste = rng.dirichlet(np.full(n_cat, 0.15), n_users)
        self.user_taste_cdf = np.cumsum(taste, axis=1)
        self.user_style = rng.integers(0, len(STYLE_TAGS), (n_users, n_cat))
        self.user_activity_cdf = np.cumsum(rng.pareto(1.5, n_users) + 0.2)
        self.user_activity_cdf /= self.user_activity_cdf[-1]
        # per phase, per (category, style): the cumulative popularity of its items
        self.groups: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray]] = {}
        for phase in range(N_PHASES):
            weight = self.base_pop * np.exp(self.trend * phase / N_PHASES)
            weight = np.where(self.launch_phase <= phase, weight, 0.0)
            # new items get a launch boost in their first phase
            weight = np.where(self.launch_phase == phase, weight * 3.0, weight)
            for c in range(n_cat):
                for s in range(len(STYLE_TAGS)):
                    idx = np.flatnonzero((self.item_cat == c) & (self.item_style == s))
                    w = weight[idx]
                    if idx.size == 0 or w.sum() == 0:
                        idx = np.flatnonzero(self.item_cat == c)
                        w = weight[idx] + 1e-9
                    self.groups[(phase, c, s)] = (idx, np.cumsum(w) / w.sum())
        self.global_cdf = [
            np.cumsum(np.where(self.launch_phase <= p, self.base_pop, 0.0)) for p in range(N_PHASES)
        ]

    def pick_items(
        self, rng: np.random.Generator, users: np.ndarray, phase: np.ndarray
    ) -> np.ndarray:
        """One item per (user, phase): mostly from the user's tastes, some popular noise."""
        n = users.size
        cat = (self.user_taste_cdf[users] < rng.random((n, 1))).sum(axis=1)
        cat = np.minimum(cat, len(CATEGORIES) - 1)
        # 75% in the user's preferred style of that category, else any style
        style = np.where(
            rng.random(n) < 0.75, self.user_style[users, cat], rng.integers(0, len(STYLE_TAGS), n)
        )
        out = np.empty(n, dtype=np.int64)
        u = rng.random(n)
        for key in set(zip(phase.tolist(), cat.tolist(), style.tolist(), strict=True)):
            mask = (phase == key[0]) & (cat == key[1]) & (style == key[2])
            idx, cdf = self.groups[key]
            out[mask] = idx[np.minimum(np.searchsorted(cdf, u[mask]), idx.size - 1)]
        # 15% of picks ignore taste entirely: what is simply popular right now
        noise = rng.random(n) < 0.15
        for p in np.unique(phase[noise]):
            m = noise & (phase == p)
            cdf = self.global_cdf[p]
            out[m] = np.searchsorted(cdf, rng.random(m.sum()) * cdf[-1])
        return out


def _catalog(spec: DemoSpec, world: _World, rng: np.random.Generator, start: datetime):
    n = spec.n_items
    cat = world.item_cat
    base_price = np.array(
        [60, 120, 30, 50, 70, 80, 150, 200, 400, 900, 90, 500, 40, 250, 60, 35, 25, 15, 45, 20],
        dtype=float,
    )
    price = np.round(
        base_price[cat] * rng.lognormal(0, 0.45, n) * (1 + 0.5 * (world.item_style == 3)), 2
    )
    extra = rng.random((n, len(EXTRA_TAGS))) < np.array([0.15, 0.1, 0.1, 0.1, 0.05, 0.02])
    tags = []
    for i in range(n):
        t = [
            f"category:{CATEGORIES[cat[i]]}",
            f"brand:brand{world.item_brand[i]:02d}",
            f"style:{STYLE_TAGS[world.item_style[i]]}",
        ]
        t.extend(EXTRA_TAGS[j] for j in np.flatnonzero(extra[i]))
        tags.append(t)
    phase_len = timedelta(days=spec.days) / N_PHASES
    created = [
        start
        + phase_len * int(world.launch_phase[i])
        - timedelta(days=int(rng.integers(0, 400))) * (world.launch_phase[i] == 0)
        for i in range(n)
    ]
    return pl.DataFrame(
        {
            "item_id": [f"i{i:06d}" for i in range(n)],
            "title": [
                f"{STYLE_TAGS[world.item_style[i]].title()} {CATEGORIES[cat[i]]} #{i}"
                for i in range(n)
            ],
            "category": [CATEGORIES[c] for c in cat],
            "brand": [f"brand{b:02d}" for b in world.item_brand],
            "price": price,
            "tags": tags,
            "available": rng.random(n) > 0.05,
            "created_at": created,
            "attributes": [json.dumps({"style": STYLE_TAGS[s]}) for s in world.item_style],
        }
    )


def _users(spec: DemoSpec, rng: np.random.Generator) -> pl.DataFrame:
    n = spec.n_users
    return pl.DataFrame(
        {
            "user_id": [f"u{u:07d}" for u in range(n)],
            "segment": [SEGMENTS[s] for s in rng.integers(0, len(SEGMENTS), n)],
            "country": [COUNTRIES[c] for c in rng.integers(0, len(COUNTRIES), n)],
        }
    )


def _session_chunk(
    spec: DemoSpec,
    world: _World,
    rng: np.random.Generator,
    n_target: int,
    start_us: int,
    span_us: int,
    first_id: int,
) -> pl.DataFrame:
    """n_target clean events (fewer only if a tiny target draws too few): sessions of views
    with cart and purchase funnels, in time order. A few more sessions than needed are drawn
    and whole sessions, chosen at random, are left out (`_sessions_to_keep`): the events cover
    the whole window up to its end, and funnels stay whole."""
    n_sessions = max(1, n_target * 21 // 100 + 10)  # (~5.07 events a session: ~6 % to spare)
    users = np.searchsorted(world.user_activity_cdf, rng.random(n_sessions))
    users = np.minimum(users, spec.n_users - 1)
    t0 = start_us + (rng.random(n_sessions) * span_us).astype(np.int64)
    phase = np.minimum((t0 - start_us) * N_PHASES // span_us, N_PHASES - 1)
    n_views = rng.geometric(0.3, n_sessions)  # mean ~3.3 views a session
    s_idx = np.repeat(np.arange(n_sessions), n_views)
    items = world.pick_items(rng, users[s_idx], phase[s_idx])
    step = np.arange(s_idx.size) - np.repeat(np.cumsum(n_views) - n_views, n_views)
    ts = t0[s_idx] + step * rng.integers(5_000_000, 90_000_000, s_idx.size)
    # funnel: a view becomes a cart add, a cart add a purchase; some views get a click first
    cart = rng.random(s_idx.size) < 0.14
    buy = cart & (rng.random(s_idx.size) < 0.45)
    click = rng.random(s_idx.size) < 0.3
    rate = buy & (rng.random(s_idx.size) < 0.3)
    parts = [
        (np.ones(s_idx.size, bool), "view", 0),
        (click, "click", 2_000_000),
        (cart, "add_to_cart", 30_000_000),
        (buy, "purchase", 120_000_000),
        (rate, "rating", 21_600_000_000),
    ]
    cols: dict[str, list[np.ndarray]] = {"s": [], "i": [], "t": [], "e": [], "v": []}
    for mask, etype, delay in parts:
        k = int(mask.sum())
        cols["s"].append(s_idx[mask])
        cols["i"].append(items[mask])
        cols["t"].append(ts[mask] + delay)
        cols["e"].append(np.full(k, etype, dtype=object))
        if etype == "purchase":
            v = rng.integers(1, 4, k).astype(float)
        elif etype == "rating":
            v = rng.integers(3, 6, k).astype(float)
        else:
            v = np.full(k, np.nan)
        cols["v"].append(v)
    s = np.concatenate(cols["s"])
    t = np.concatenate(cols["t"])
    keep = _sessions_to_keep(s, t, n_target, rng)
    order = keep[np.argsort(t[keep], kind="stable")]
    s = s[order]
    n = s.size
    value = np.concatenate(cols["v"])[order]
    return pl.DataFrame(
        {
            "event_id": [f"ev{spec.seed}-{first_id + k}" for k in range(n)],
            "user_id": [f"u{u:07d}" for u in users[s].tolist()],
            "item_id": [f"i{i:06d}" for i in np.concatenate(cols["i"])[order].tolist()],
            "event_type": np.concatenate(cols["e"])[order].tolist(),
            "timestamp": t[order] // 1000,  # epoch milliseconds
            "value": pl.Series(value).fill_nan(None),
            "session_id": [f"s{spec.seed}-{first_id}-{x}" for x in s.tolist()],
        },
        schema_overrides={"timestamp": pl.Int64, "value": pl.Float64},
    )


def _sessions_to_keep(
    sessions: np.ndarray, t: np.ndarray, n: int, rng: np.random.Generator
) -> np.ndarray:
    """Indices of `n` of the rows (session index and time per row; all when there are fewer):
    whole sessions in a random order, the last one taken cut to its earliest events. (Keeping
    the first `n` rows in time order instead would leave the window's last day or two empty.)"""
    if sessions.size <= n:
        return np.arange(sessions.size)
    sizes = np.bincount(sessions)
    picked = rng.permutation(sizes.size)
    ends = np.cumsum(sizes[picked])
    last = int(np.searchsorted(ends, n))  # (the first session whose rows reach n)
    chosen = np.zeros(sizes.size, dtype=bool)
    chosen[picked[:last]] = True
    rows = np.flatnonzero(chosen[sessions])
    tail = np.flatnonzero(sessions == picked[last])
    tail = tail[np.argsort(t[tail], kind="stable")][: n - rows.size]
    return np.sort(np.concatenate([rows, tail]))


def _corrupt(
    df: pl.DataFrame, spec: DemoSpec, rng: np.random.Generator
) -> tuple[pl.DataFrame, int, int]:
    """Spoil a small share of rows the ways real feeds do, and resend a few events."""
    n = df.height
    k = int(round(n * spec.malformed_share))
    d = int(round(n * spec.duplicate_share))
    rows = rng.choice(n, k, replace=False) if k else np.empty(0, dtype=np.int64)
    if k:
        kind = rows % 6
        uid = df["user_id"].to_numpy().astype(object)
        iid = df["item_id"].to_numpy().astype(object)
        et = df["event_type"].to_numpy().astype(object)
        ts = df["timestamp"].to_numpy().copy()
        val = df["value"].to_numpy().copy()
        uid[rows[kind == 0]] = None  # missing id
        ts[rows[kind == 1]] = 0  # 1970: a reset clock
        ts[rows[kind == 2]] = 32_503_680_000_000  # year 3000
        et[rows[kind == 3]] = "hover"  # undeclared event type
        iid[rows[kind == 4]] = "x" * 400  # oversize field
        val[rows[kind == 5]] = np.inf  # bad value
        df = df.with_columns(
            pl.Series("user_id", uid, dtype=pl.String),
            pl.Series("item_id", iid, dtype=pl.String),
            pl.Series("event_type", et, dtype=pl.String),
            pl.Series("timestamp", ts),
            pl.Series("value", val).fill_nan(None),
        )
    if d:  # resend clean rows only, so every malformed row is counted once
        clean = np.setdiff1d(np.arange(n), rows)
        df = pl.concat([df, df[np.sort(rng.choice(clean, d, replace=False))]])
    return df, k, d


def generate(
    spec: DemoSpec,
    storage: Storage,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> DemoSummary:
    """Write the demo catalog, users and events into the landing zone of `spec.tenant`.

    Idempotent: the same spec writes the same files, and a spec already written is skipped
    unless `overwrite`.
    """
    end = datetime.combine(date.fromisoformat(spec.end_date), datetime.min.time(), UTC)
    start = end - timedelta(days=spec.days)
    tag = f"demo-s{spec.seed}-n{spec.events}"
    ev_dir = storage.landing_dir(spec.tenant, "events")
    marker = storage.path("landing", spec.tenant, f".{tag}.json")
    summary = DemoSummary(
        start=start.isoformat(), end=end.isoformat(), items=spec.n_items, users=spec.n_users
    )
    if not overwrite and storage.exists(marker):
        done = json.loads(storage.fs.cat_file(marker))
        if done.get("spec") == asdict(spec):
            summary = DemoSummary(**done["summary"])
            summary.skipped = True
            return summary
    rng = np.random.default_rng(spec.seed)
    world = _World(spec, rng)
    for kind in ("events", "items", "users"):
        storage.makedirs(storage.landing_dir(spec.tenant, kind))
    items_path = storage.path(storage.landing_dir(spec.tenant, "items"), f"{tag}-items.parquet")
    users_path = storage.path(storage.landing_dir(spec.tenant, "users"), f"{tag}-users.parquet")
    _write(storage, _catalog(spec, world, rng, start), items_path)
    _write(storage, _users(spec, rng), users_path)
    summary.files += [items_path, users_path]
    start_us = int(start.timestamp() * 1e6)
    span_us = int(timedelta(days=spec.days).total_seconds() * 1e6)
    written, part = 0, 0
    while written < spec.events:
        # each chunk covers the whole window; chunks are independent samples of sessions
        want = min(spec.chunk_events, spec.events - written)
        chunk = _session_chunk(spec, world, rng, want, start_us, span_us, written)
        n_clean = chunk.height
        chunk, bad, dup = _corrupt(chunk, spec, rng)
        path = storage.path(ev_dir, f"{tag}-part{part:04d}.parquet")
        _write(storage, chunk, path)
        summary.files.append(path)
        summary.malformed += bad
        summary.duplicates += dup
        written += n_clean
        part += 1
        if progress:
            progress(written, spec.events)
    summary.events_written = written + summary.duplicates
    write_atomic(
        marker, json.dumps({"spec": asdict(spec), "summary": asdict(summary)}).encode(), storage.fs
    )
    return summary


def _write(storage: Storage, df: pl.DataFrame, path: str) -> None:
    """Land `df` whole (a sensor never sees half a file)."""
    write_parquet_atomic(df, path, storage.fs, row_group_size=256_000)

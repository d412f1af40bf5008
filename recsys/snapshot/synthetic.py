"""Synthetic snapshots of any size for tests, benchmarks and the server's load test.

Deterministic for a given seed. Candidates are drawn without any model (each user gets `n`
distinct items on a random arithmetic progression modulo n_items, scores decreasing), so a
1M-user x 100k-item snapshot builds in a couple of minutes with memory bounded by `shard_size`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import polars as pl

from recsys.snapshot.format import REASONS, SIGNALS
from recsys.snapshot.writer import SnapshotWriter

N_CATEGORIES, N_BRANDS, N_TAGS, N_SEGMENTS = 40, 200, 100, 5


def synthetic_items(n_items: int, seed: int = 0) -> pl.DataFrame:
    """An items table (recsys.contract.ITEM_SCHEMA) with ids 'i0000042'-style."""
    rng = np.random.default_rng([seed, 1])
    n_tags = rng.integers(0, 4, n_items)
    tag_ids = rng.integers(0, N_TAGS, int(n_tags.sum()))
    tag_names = np.array([f"tag{t:03d}" for t in range(N_TAGS)], dtype=object)
    offsets = np.concatenate([[0], np.cumsum(n_tags)])
    tags = [
        list(dict.fromkeys(tag_names[tag_ids[offsets[k] : offsets[k + 1]]])) for k in range(n_items)
    ]
    width = max(7, len(str(n_items)))
    cat = rng.integers(0, N_CATEGORIES, n_items)
    brand = rng.integers(0, N_BRANDS, n_items)
    return pl.DataFrame(
        {
            "item_id": [f"i{k:0{width}d}" for k in range(n_items)],
            "title": [f"Item {k}" for k in range(n_items)],
            "category": [f"cat{c:02d}" for c in cat],
            "brand": [f"brand{b:03d}" for b in brand],
            "price": np.round(rng.lognormal(3.0, 1.0, n_items), 2),
            "tags": tags,
            "available": rng.random(n_items) > 0.05,
            "created_at": [None] * n_items,
            "attributes": [None] * n_items,
        },
        schema_overrides={
            "created_at": pl.Datetime("us", "UTC"),
            "attributes": pl.String,
            "tags": pl.List(pl.String),
        },
    )


def user_id_list(n_users: int) -> list[str]:
    width = max(7, len(str(n_users)))
    return [f"u{k:0{width}d}" for k in range(n_users)]


class _LazyUserFactors:
    """float32[n_users, d] generated per requested slice, so 1M users never sit in memory."""

    def __init__(self, n_users: int, dim: int, seed: int) -> None:
        self.shape = (n_users, dim)
        self._seed = seed

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(self.shape[0])
        rng = np.random.default_rng([self._seed, 2, start])
        return rng.standard_normal((stop - start, self.shape[1]), dtype=np.float32) * 0.1


def _steps(n_items: int) -> np.ndarray:
    """Strides coprime with n_items: `start + r*stride mod n_items` never repeats early."""
    cands = np.arange(1, min(n_items, 5000))
    return np.array([s for s in cands if math.gcd(int(s), n_items) == 1], dtype=np.int64)


def synthetic_shard(
    user_start: int, user_stop: int, n_items: int, n: int, n_seen: int, seed: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(candidates, seen) of users [user_start, user_stop), deterministic per (seed, user_start)."""
    rng = np.random.default_rng([seed, 3, user_start])
    m = user_stop - user_start
    n = min(n, n_items - n_seen)
    strides = _steps(n_items)
    start = rng.integers(0, n_items, m)[:, None]
    stride = strides[rng.integers(0, strides.shape[0], m)][:, None]
    r = np.arange(n + n_seen)[None, :]
    items = (start + r * stride) % n_items
    users = np.repeat(np.arange(user_start, user_stop, dtype=np.int64), n)
    base = np.sort(rng.random((m, n), dtype=np.float32), axis=1)[:, ::-1]
    parts = rng.random((m * n, len(SIGNALS)), dtype=np.float32)
    cand = {
        "user_idx": users,
        "item_idx": items[:, :n].ravel(),
        "score": base.ravel(),
        **{s: parts[:, j] for j, s in enumerate(SIGNALS)},
        "reason": rng.integers(0, len(REASONS), m * n).astype(np.uint8),
    }
    seen = {
        "user_idx": np.repeat(np.arange(user_start, user_stop, dtype=np.int64), n_seen),
        "item_idx": items[:, n:].ravel(),
    }
    return cand, seen


def build_synthetic_snapshot(
    out_dir: str,
    n_users: int,
    n_items: int,
    n: int = 200,
    seed: int = 0,
    *,
    tenant: str = "default",
    shard_size: int = 50_000,
    n_seen: int = 5,
    n_similar: int = 20,
    dim: int = 32,
    write_parquet: bool = True,
    models: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a synthetic snapshot to `out_dir` (empty or absent); return its manifest.

    User ids are 'u0000000'.., item ids 'i0000000'.. (zero-padded to at least 7 digits); users
    get `n` candidates, `n_seen` seen items, a segment 'seg0'..'seg4'; items get `n_similar` emb
    and cooc neighbours; fallbacks 'popular', 'trending', 'category:catNN', 'tag:tagNNN',
    'segment:segN'; factors of `dim` dimensions.
    """
    if n_items < 2 or n_users < 1:
        raise ValueError("need at least 1 user and 2 items")
    items = synthetic_items(n_items, seed)
    rng = np.random.default_rng([seed, 4])
    segments = pl.Series("segment", rng.integers(0, N_SEGMENTS, n_users)).cast(pl.String)
    segments = ("seg" + segments).alias("segment")
    writer = SnapshotWriter(
        out_dir,
        tenant=tenant,
        user_ids=user_id_list(n_users),
        items=items,
        segments=segments,
        models=models or {"champion": {"name": "synthetic", "version": "0", "run_id": None}},
        config_version=f"synthetic-seed{seed}",
        n_per_user=min(n, n_items - n_seen),
        write_parquet=write_parquet,
    )
    n_seen = min(n_seen, n_items - 1)
    for a in range(0, n_users, shard_size):
        b = min(n_users, a + shard_size)
        cand, seen = synthetic_shard(a, b, n_items, n, n_seen, seed)
        writer.add_shard(a, b, cand, seen)

    k = min(n_similar, n_items - 1)
    for kind_no, kind in enumerate(("emb", "cooc")):
        r = np.random.default_rng([seed, 5, kind_no])
        src = np.repeat(np.arange(n_items), k)
        offs = (np.arange(1, k + 1)[None, :] * (kind_no + 1)) % n_items
        offs[offs == 0] = 1
        dst = (np.arange(n_items)[:, None] + offs + r.integers(0, 1, (n_items, k))) % n_items
        # de-duplicate the rare collisions of small n_items
        frame = pl.DataFrame(
            {
                "item_idx": src,
                "similar_idx": dst.ravel(),
                "score": r.random(n_items * k, dtype=np.float32),
            }
        ).unique(["item_idx", "similar_idx"], keep="first", maintain_order=True)
        writer.set_similar(kind, frame)

    fb_n = min(n, n_items)
    pop = np.random.default_rng([seed, 6]).zipf(1.3, n_items).astype(np.float32)
    fallbacks: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def top(mask: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(mask)
        order = idx[np.argsort(-score[idx], kind="stable")[:fb_n]]
        return order, score[order]

    everything = np.ones(n_items, dtype=bool)
    fallbacks["popular"] = top(everything, pop)
    fallbacks["trending"] = top(
        everything, np.random.default_rng([seed, 7]).random(n_items, dtype=np.float32)
    )
    for c, group in items.with_row_index("i").group_by("category"):
        mask = np.zeros(n_items, dtype=bool)
        mask[group["i"].to_numpy()] = True
        fallbacks[f"category:{c[0]}"] = top(mask, pop)
    exploded = items.with_row_index("i").select("i", "tags").explode("tags").drop_nulls()
    for t, group in exploded.group_by("tags"):
        mask = np.zeros(n_items, dtype=bool)
        mask[group["i"].to_numpy()] = True
        fallbacks[f"tag:{t[0]}"] = top(mask, pop)
    for s in range(N_SEGMENTS):
        seg_score = pop * np.random.default_rng([seed, 8, s]).random(n_items, dtype=np.float32)
        fallbacks[f"segment:seg{s}"] = top(everything, seg_score)
    writer.set_fallbacks(dict(sorted(fallbacks.items())))

    fr = np.random.default_rng([seed, 9])
    writer.set_factors(
        _LazyUserFactors(n_users, dim, seed),
        fr.standard_normal((n_items, dim), dtype=np.float32) * 0.1,
        fr.standard_normal(n_items, dtype=np.float32) * 0.01,
    )
    return writer.finish()

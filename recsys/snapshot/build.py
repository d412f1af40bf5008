"""Build a tenant's serving snapshot from a fitted hybrid model (Dagster-free).

The publish assets (pipelines/publish/) are thin wrappers around these functions:

* `compute_shard` scores one contiguous range of users with `recsys.models.serve.serve_top_n`
  and writes it to a staging Parquet file, a chunk of users (a row group) at a time;
  `compute_shards` runs several, two side by side (bounded memory: two chunks at a time, however
  large a shard is);
* `similar_lists` and `fallback_lists` build the item-level lists;
* `assemble_snapshot` streams the shard files, a chunk at a time, into a `SnapshotWriter` inside
  a temporary folder and publishes it through `SnapshotStore.publish` (verify, then switch
  CURRENT atomically).

Staging files live in ``<snapshots_dir>/.staging/<model_key>/`` so shards computed for another
model version are never mixed into a snapshot.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl

from recsys.contract import DEFAULT_EVENT_WEIGHTS, ITEM_SCHEMA
from recsys.durable import write_parquet_atomic, write_parquet_parts_atomic
from recsys.snapshot.format import REASON_CODES
from recsys.snapshot.store import SnapshotStore
from recsys.snapshot.writer import CANDIDATE_COLUMNS, SnapshotWriter

STAGING = ".staging"

#: recsys.models.hybrid.REASON_CODES (0 popular, 1 popular_in_category, 2 similar_to_history,
#: 3 personalized) -> snapshot reason codes (recsys.snapshot.format.REASONS).
MODEL_REASON_TO_SNAPSHOT: dict[int, int] = {
    0: REASON_CODES["popular"],
    1: REASON_CODES["category"],
    2: REASON_CODES["cooc"],
    3: REASON_CODES["personal"],
}


#: users scored together (`shard_candidates`): shard bounds fall on multiples of it, so each
#: user is scored in the same batch whatever the shard count, and its scores are the same to
#: the last bit (a BLAS product's rounding depends on the shape of the batch it is part of)
SCORING_BATCH = 256


#: users of a shard scored, staged and assembled together (one row group of its staged file):
#: memory holds a chunk's lists, not a shard's, however many users a shard has. A multiple of
#: `SCORING_BATCH`, so a user's batch does not depend on it.
SHARD_CHUNK_USERS = 16 * SCORING_BATCH


def shard_chunks(start: int, stop: int) -> list[tuple[int, int]]:
    """The chunks [lo, hi) of users [start, stop) (one, empty, for an empty shard)."""
    return [
        (lo, min(lo + SHARD_CHUNK_USERS, stop)) for lo in range(start, stop, SHARD_CHUNK_USERS)
    ] or [(start, stop)]


def shard_bounds(n_users: int, shard: int, n_shards: int) -> tuple[int, int]:
    """Users [start, stop) of shard `shard` of `n_shards` contiguous, near-equal ranges whose
    bounds are multiples of `SCORING_BATCH` (a shard may be empty when there are fewer than
    that many users per shard)."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range [0, {n_shards})")

    def edge(s: int) -> int:
        if s >= n_shards:
            return n_users
        return s * n_users // n_shards // SCORING_BATCH * SCORING_BATCH

    return edge(shard), edge(shard + 1)


def shard_key(shard: int, n_shards: int) -> str:
    """The partition key of shard `shard` of `n_shards`: 'shard-03' (zero-padded to the width
    of the largest number, at least two digits, so keys sort in shard order)."""
    return f"shard-{shard:0{max(2, len(str(n_shards - 1)))}d}"


def shard_step_key(tenant: str, shards: Sequence[int], n_shards: int) -> str:
    """The mapping key of the pipeline step scoring `shards` (a contiguous run) of `tenant`:
    'default_03' for one shard, 'default_00_to_15' for several. Dagster allows only letters,
    digits and '_' in it: every other character of the tenant id, and '_' itself, is written
    '_' + its hex code ('acme.eu' -> 'acme_2eeu'), so two tenants never share a key and the
    tenant part never holds '_to_' (`shard_step_count` reads the key back)."""
    safe = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):02x}" for c in tenant)
    first, last = (shard_key(s, n_shards)[6:] for s in (shards[0], shards[-1]))
    return f"{safe}_{first}" if len(shards) == 1 else f"{safe}_{first}_to_{last}"


def shard_step_count(step_key: str) -> int:
    """How many shards a pipeline step scores, from its Dagster step key: 16 for
    '...score_user_shard[default_00_to_15]', 1 for '...[default_03]' (`shard_step_key`)."""
    head, sep, last = step_key.rstrip("]").rpartition("_to_")
    if not sep or not last.isdigit():
        return 1
    return int(last) - int(head.rsplit("_", 1)[1]) + 1


def staging_dir(snapshots_dir: str, model_key: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_key) or "model"
    return os.path.join(snapshots_dir, STAGING, safe)


def shard_path(snapshots_dir: str, model_key: str, shard: int, n_shards: int) -> str:
    return os.path.join(
        staging_dir(snapshots_dir, model_key), f"shard-{shard:02d}-of-{n_shards:02d}.parquet"
    )


def shard_candidates(
    model: Any, start: int, stop: int, k: int, batch_size: int = SCORING_BATCH, workers: int = 2
) -> pl.DataFrame:
    """Final top-k of users [start, stop) as a frame with `CANDIDATE_COLUMNS` (scored
    `workers` batches at a time; the frame does not depend on it)."""
    from recsys.models.serve import serve_top_n  # the model package is optional for readers

    lists = serve_top_n(model, np.arange(start, stop), k=k, batch_size=batch_size, workers=workers)
    code = np.asarray(lists.reason_code, dtype=np.int64)
    mapping = np.full(256, REASON_CODES["personal"], dtype=np.uint8)
    for src, dst in MODEL_REASON_TO_SNAPSHOT.items():
        mapping[src] = dst
    return pl.DataFrame(
        {
            "user_idx": np.asarray(lists.user_idx, np.int64),
            "item_idx": np.asarray(lists.item_idx, np.int64),
            "score": np.asarray(lists.final_score, np.float32),
            "pop": lists.pop,
            "cooc": lists.cooc,
            "emb": lists.emb,
            "ranker": lists.ranker,
            "reason": mapping[code],
        }
    ).select(CANDIDATE_COLUMNS)


def compute_shard(
    model: Any,
    snapshots_dir: str,
    model_key: str,
    shard: int,
    n_shards: int,
    k: int,
    workers: int = 2,
    fs: Any = None,
) -> tuple[str, int]:
    """Score one shard and write it atomically to staging, a chunk of users at a time (one
    row group each: `shard_chunks`). Returns (path, rows). `snapshots_dir` is a local folder,
    or a folder of the fsspec filesystem `fs` (a worker stages its shard through the data
    root's URI, no shared disk needed)."""
    start, stop = shard_bounds(len(model.user_ids_), shard, n_shards)
    path = shard_path(snapshots_dir, model_key, shard, n_shards)
    _fs(fs).makedirs(os.path.dirname(path), exist_ok=True)
    chunks = (
        shard_candidates(model, lo, hi, k, workers=workers) for lo, hi in shard_chunks(start, stop)
    )
    # staging, read back by this run only (a lost shard is scored again): whole for readers,
    # no fsync (the published snapshot is what is made durable and verified)
    return path, write_parquet_parts_atomic(chunks, path, fs, sync=False)


def _fs(fs: Any) -> Any:
    """`fs`, or the local filesystem."""
    if fs is not None:
        return fs
    from fsspec.implementations.local import LocalFileSystem

    return LocalFileSystem()


def read_shard(path: str, start: int, stop: int, fs: Any = None):
    """((lo, hi), the frame of users [lo, hi)) for each chunk of a staged shard of users
    [start, stop), read one row group at a time."""
    import pyarrow.parquet as pq

    chunks = shard_chunks(start, stop)
    with _fs(fs).open(path, "rb") as f:
        staged = pq.ParquetFile(f)
        if staged.num_row_groups != len(chunks):
            raise ValueError(
                f"{path}: {staged.num_row_groups} row groups for "
                f"{len(chunks)} chunks of users [{start}, {stop})"
            )
        for g, bounds in enumerate(chunks):
            yield bounds, pl.from_arrow(staged.read_row_group(g))


def _read_parquet(path: str, fs: Any) -> pl.DataFrame:
    if fs is None:
        return pl.read_parquet(path)
    with fs.open(path, "rb") as f:
        return pl.read_parquet(f)


def compute_shards(
    model: Any,
    snapshots_dir: str,
    model_key: str,
    shards: Sequence[int],
    n_shards: int,
    k: int,
    workers: int = 2,
    fs: Any = None,
) -> list[tuple[str, int]]:
    """`compute_shard` for each of `shards`, in their order (staged through `fs` as there).
    Several shards are scored `workers` at a time, one thread each (a shard's batches, scored
    two at a time, leave a core idle while its last batch finishes; whole shards side by side
    do not), so memory holds `workers` shards at most. The files do not depend on `workers`."""
    from recsys.models.threads import map_in_threads

    if len(shards) < 2 or workers < 2:
        return [
            compute_shard(model, snapshots_dir, model_key, s, n_shards, k, workers, fs)
            for s in shards
        ]
    return map_in_threads(
        lambda s: compute_shard(model, snapshots_dir, model_key, s, n_shards, k, 1, fs),
        shards,
        workers,
    )


def seen_pairs(model: Any, start: int, stop: int) -> dict[str, np.ndarray]:
    """The (user_idx, item_idx) training interactions of users [start, stop)."""
    seen = model.seen_[start:stop].tocsr()
    rows = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(seen.indptr))
    return {"user_idx": rows, "item_idx": seen.indices.astype(np.int64)}


def aligned_items(item_ids: Sequence[str], items: pl.DataFrame | None) -> pl.DataFrame:
    """The items table in the model's item order (ITEM_SCHEMA); items absent from it are null."""
    order = pl.DataFrame({"item_id": pl.Series(list(item_ids), dtype=pl.String)})
    if items is None:
        table = pl.DataFrame(schema=ITEM_SCHEMA)
    else:
        table = items.select(
            [
                pl.col(c) if c in items.columns else pl.lit(None, dtype=t).alias(c)
                for c, t in ITEM_SCHEMA.items()
            ]
        ).unique("item_id", keep="last")
    out = order.join(table, on="item_id", how="left", maintain_order="left")
    return out.with_columns(pl.col("available").fill_null(True), pl.col("tags").fill_null([])).cast(
        ITEM_SCHEMA
    )  # type: ignore[arg-type]


def similar_lists(model: Any, k: int = 20) -> dict[str, pl.DataFrame]:
    """Item-to-item lists: 'emb' (LightFM cosine, when the model has LightFM) and 'cooc'."""
    from recsys.models import serve

    out: dict[str, pl.DataFrame] = {}
    for kind, fn in (
        ("emb", serve.similar_items_embedding),
        ("cooc", serve.similar_items_cooccurrence),
    ):
        try:
            idx, val = fn(model, k=k)
        except KeyError:  # the generator was skipped for lack of data: no list of this kind
            continue
        idx, val = np.asarray(idx), np.asarray(val, dtype=np.float32)
        src = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
        ok = idx.ravel() >= 0
        out[kind] = pl.DataFrame(
            {"item_idx": src[ok], "similar_idx": idx.ravel()[ok], "score": val.ravel()[ok]}
        )
    return out


def fallback_lists(
    model: Any,
    items: pl.DataFrame,
    users: pl.DataFrame | None,
    events: pl.DataFrame | pl.LazyFrame | None,
    k: int = 200,
    weights: Mapping[str, float] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """'popular', 'trending', 'category:<c>', 'tag:<t>', 'segment:<s>' lists over available items.

    `items` is aligned to the model (see `aligned_items`); popularity and trending come from the
    model's popularity generator, segment lists from the events of each segment's users.
    """
    pop_gen = model.generators_["popularity"]
    available = items["available"].to_numpy().astype(bool)
    pop = np.asarray(pop_gen.pop_, dtype=np.float32)
    trending = np.asarray(pop_gen.trending_, dtype=np.float32)

    def top(mask: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        idx = np.flatnonzero(mask & available & (score > 0))
        order = idx[np.argsort(-score[idx], kind="stable")[:k]]
        return order.astype(np.int32), score[order].astype(np.float32)

    everything = np.ones(len(items), dtype=bool)
    out = {"popular": top(everything, pop), "trending": top(everything, trending)}
    indexed = items.with_row_index("i")
    for (cat,), group in indexed.drop_nulls("category").group_by("category"):
        mask = np.zeros(len(items), dtype=bool)
        mask[group["i"].to_numpy()] = True
        out[f"category:{cat}"] = top(mask, pop)
    for (tag,), group in (
        indexed.select("i", "tags").explode("tags").drop_nulls("tags").group_by("tags")
    ):
        mask = np.zeros(len(items), dtype=bool)
        mask[group["i"].to_numpy()] = True
        out[f"tag:{tag}"] = top(mask, pop)
    if users is not None and events is not None and "segment" in users.columns:
        from recsys.models.data import event_weight_expr  # (a streamed weight: see there)

        w = dict(DEFAULT_EVENT_WEIGHTS, **(weights or {}))
        item_pos = indexed.select("item_id", "i")
        # lazy and streamed: a scan of the events is folded to (segment, item) sums without
        # holding every event (exact in any order: positive multiples of 0.5 by default)
        seg = (
            events.lazy()
            .select("user_id", "item_id", "event_type")
            .join(users.lazy().select("user_id", "segment").drop_nulls(), on="user_id")
            .with_columns(event_weight_expr(w).alias("w"))
            .filter(pl.col("w") > 0)
            .group_by("segment", "item_id")
            .agg(pl.col("w").sum())
            .join(item_pos.lazy(), on="item_id")
            .collect(engine="streaming")
        )
        for (name,), group in seg.group_by("segment"):
            score = np.zeros(len(items), dtype=np.float32)
            score[group["i"].to_numpy()] = group["w"].to_numpy()
            out[f"segment:{name}"] = top(everything, score)
    return dict(sorted(out.items()))


def write_item_lists(
    snapshots_dir: str,
    model_key: str,
    similar: Mapping[str, pl.DataFrame] | None = None,
    fallbacks: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    fs: Any = None,
) -> list[str]:
    """Stage similar lists (similar-<kind>.parquet) and/or fallbacks (fallbacks.parquet)."""
    d = staging_dir(snapshots_dir, model_key)
    _fs(fs).makedirs(d, exist_ok=True)
    frames: dict[str, pl.DataFrame] = {f"similar-{kind}": f for kind, f in (similar or {}).items()}
    if similar is not None:
        frames["similar-kinds"] = pl.DataFrame({"kind": list(similar)}, schema={"kind": pl.String})
    if fallbacks is not None:
        frames["fallbacks"] = pl.DataFrame(
            {
                "name": [n for n, (i, _) in fallbacks.items() for _ in range(len(i))],
                "item_idx": np.concatenate(
                    [i for i, _ in fallbacks.values()] or [np.zeros(0, np.int32)]
                ).astype(np.int32),
                "score": np.concatenate(
                    [v for _, v in fallbacks.values()] or [np.zeros(0, np.float32)]
                ).astype(np.float32),
            },
            schema={"name": pl.String, "item_idx": pl.Int32, "score": pl.Float32},
        )
    paths = []
    for name, frame in frames.items():
        path = os.path.join(d, f"{name}.parquet")
        write_parquet_atomic(frame, path, fs, sync=False)  # staging, as the shards
        paths.append(path)
    return paths


def read_similar_lists(
    snapshots_dir: str, model_key: str, fs: Any = None
) -> dict[str, pl.DataFrame] | None:
    d = staging_dir(snapshots_dir, model_key)
    kinds_path = os.path.join(d, "similar-kinds.parquet")
    if not _fs(fs).exists(kinds_path):
        return None
    kinds = _read_parquet(kinds_path, fs)["kind"].to_list()
    return {k: _read_parquet(os.path.join(d, f"similar-{k}.parquet"), fs) for k in kinds}


def read_fallback_lists(
    snapshots_dir: str, model_key: str, fs: Any = None
) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
    path = os.path.join(staging_dir(snapshots_dir, model_key), "fallbacks.parquet")
    if not _fs(fs).exists(path):
        return None
    frame = _read_parquet(path, fs)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for (name,), group in frame.group_by("name", maintain_order=True):
        out[name] = (group["item_idx"].to_numpy(), group["score"].to_numpy())
    return out


def user_segments(user_ids: Sequence[str], users: pl.DataFrame | None) -> pl.Series:
    order = pl.DataFrame({"user_id": pl.Series(list(user_ids), dtype=pl.String)})
    if users is None or "segment" not in users.columns:
        return pl.Series("segment", [None] * order.height, dtype=pl.String)
    table = users.select("user_id", pl.col("segment").cast(pl.String)).unique(
        "user_id", keep="last"
    )
    return order.join(table, on="user_id", how="left", maintain_order="left")["segment"]


def assemble_snapshot(
    store: SnapshotStore,
    *,
    tenant: str,
    model: Any,
    model_key: str,
    n_shards: int,
    k: int,
    items: pl.DataFrame | None,
    users: pl.DataFrame | None,
    events: pl.DataFrame | None,
    models_info: Mapping[str, Mapping[str, Any]],
    config_version: str | None,
    n_similar: int = 20,
    compute_missing: bool = True,
    log: Any = None,
    make_live: bool = True,
    staging_root: str | None = None,
    fs: Any = None,
) -> tuple[str, dict[str, Any]]:
    """Write the snapshot from the staged shards (computing missing ones), verify and publish
    (`make_live`: and switch CURRENT to it). The shards and lists are staged under
    `staging_root` (default: the store's folder), on the fsspec filesystem `fs` when given.

    Returns (snapshot_id, manifest). CURRENT changes only if everything succeeded.
    """
    staging_root = store.root if staging_root is None else staging_root
    user_ids = [str(u) for u in model.user_ids_]
    item_table = aligned_items([str(i) for i in model.item_ids_], items)
    tmp = store.new_tmp_dir()
    try:
        writer = SnapshotWriter(
            tmp,
            tenant=tenant,
            user_ids=user_ids,
            items=item_table,
            segments=user_segments(user_ids, users),
            models=models_info,
            config_version=config_version,
            n_per_user=k,
        )
        for shard in range(n_shards):
            path = shard_path(staging_root, model_key, shard, n_shards)
            if not _fs(fs).exists(path):
                if not compute_missing:
                    raise FileNotFoundError(
                        f"shard {shard} of {n_shards} not computed for model {model_key}"
                    )
                if log is not None:
                    log.info(f"{tenant}: computing missing shard {shard}/{n_shards}")
                compute_shard(model, staging_root, model_key, shard, n_shards, k, fs=fs)
            start, stop = shard_bounds(len(user_ids), shard, n_shards)
            for (lo, hi), frame in read_shard(path, start, stop, fs):
                writer.add_shard(lo, hi, frame, seen_pairs(model, lo, hi))
        similar = read_similar_lists(staging_root, model_key, fs)
        for kind, frame in (
            similar if similar is not None else similar_lists(model, n_similar)
        ).items():
            writer.set_similar(kind, frame)
        fallbacks = read_fallback_lists(staging_root, model_key, fs)
        writer.set_fallbacks(
            fallbacks
            if fallbacks is not None
            else fallback_lists(model, item_table, users, events, k=k)
        )
        try:
            from recsys.models.serve import item_factors, user_factors

            uf, _ = user_factors(model)
            itf, ib = item_factors(model)
            writer.set_factors(uf, itf, ib)
        except KeyError:
            pass  # no LightFM in this model: the snapshot carries no factors
        manifest = writer.finish()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sid = store.publish(tmp, switch=make_live)
    with contextlib.suppress(OSError):  # (left-over staging is harmless)
        _fs(fs).rm(staging_dir(staging_root, model_key), recursive=True)
    return sid, manifest

"""Write a serving snapshot folder (format: docs/snapshot-format.md).

Per-user data arrives shard by shard (contiguous user-index ranges) through `SnapshotWriter`, so
memory is bounded by the shard size: each shard is sorted, checked and appended to raw part files;
`finish()` streams the parts into the final `.npy` files (hashing as it copies), writes the small
arrays, the Parquet copies, `snapshot.duckdb` and finally `manifest.json` (last, so a folder without
a manifest is never mistaken for a snapshot).

`write_snapshot` is the one-call form for data that fits in memory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import secrets
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.contract import ITEM_SCHEMA
from recsys.durable import write_atomic
from recsys.snapshot.format import (
    DICTIONARIES,
    MANIFEST,
    REASONS,
    SCHEMA_VERSION,
    SIGNALS,
    SIMILAR_KINDS,
    encode_ids,
)

CANDIDATE_COLUMNS: tuple[str, ...] = ("user_idx", "item_idx", "score", *SIGNALS, "reason")
_PARTS = ".parts"

Arrays = Mapping[str, Any]  # dict of arrays or a polars DataFrame with those columns


def new_snapshot_id(now: dt.datetime | None = None) -> str:
    """Sortable unique id: UTC time to the microsecond + a random suffix."""
    now = now or dt.datetime.now(dt.UTC)
    return now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3)


def _col(data: Arrays, name: str, dtype: Any) -> np.ndarray:
    try:
        col = data[name]
    except (KeyError, pl.exceptions.ColumnNotFoundError):
        raise ValueError(f"missing column {name!r}") from None
    arr = col.to_numpy() if isinstance(col, pl.Series) else np.asarray(col)
    return np.ascontiguousarray(arr, dtype=dtype)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class _Part:
    """An append-only raw binary column (no header) that becomes one `.npy` in `finish`."""

    def __init__(self, path: str, dtype: Any, tail: tuple[int, ...] = ()) -> None:
        self.path, self.dtype, self.tail, self.rows = path, np.dtype(dtype), tail, 0
        self._f = open(path, "wb")  # noqa: SIM115 - closed in finish()

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape[1:] != self.tail:
            raise ValueError(f"{os.path.basename(self.path)}: shape {arr.shape}, tail {self.tail}")
        self._f.write(arr.tobytes())
        self.rows += arr.shape[0]

    def finish(self, out_path: str) -> str:
        """Write header + payload to `out_path` streaming; return its sha256."""
        self._f.close()
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header,
            {
                "descr": np.lib.format.dtype_to_descr(self.dtype),
                "fortran_order": False,
                "shape": (self.rows, *self.tail),
            },
        )
        h = hashlib.sha256(header.getvalue())
        with open(out_path, "wb") as out, open(self.path, "rb") as src:
            out.write(header.getvalue())
            while chunk := src.read(1 << 22):
                out.write(chunk)
                h.update(chunk)
        os.remove(self.path)
        return h.hexdigest()


class SnapshotWriter:
    """Build one snapshot in `out_dir` (empty or absent), shard by shard.

    tenant, user_ids (position = user index), items (polars, recsys.contract.ITEM_SCHEMA columns;
    row = item index), segments (str|None per user, optional), models ({role: {name, version,
    run_id, ...}}), config_version (str). Then `add_shard(...)` for each contiguous user range in
    increasing order, the `set_*` methods for item-level data, and `finish()` -> manifest.
    """

    def __init__(
        self,
        out_dir: str,
        *,
        tenant: str,
        user_ids: Sequence[str] | pl.Series | np.ndarray,
        items: pl.DataFrame,
        segments: Sequence[str | None] | pl.Series | None = None,
        models: Mapping[str, Mapping[str, Any]] | None = None,
        config_version: str | None = None,
        n_per_user: int | None = None,
        write_parquet: bool = True,
    ) -> None:
        self.out_dir = os.path.abspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        if os.listdir(self.out_dir):
            raise ValueError(f"{self.out_dir} is not empty")
        os.makedirs(os.path.join(self.out_dir, _PARTS))
        self.tenant = tenant
        self.models = {k: dict(v) for k, v in (models or {}).items()}
        self.config_version = config_version
        self.n_per_user = n_per_user
        self.write_parquet = write_parquet
        self.created_at = dt.datetime.now(dt.UTC)
        self.snapshot_id = new_snapshot_id(self.created_at)
        self._hashes: dict[str, str] = {}

        users = (
            pl.Series("user_id", user_ids, dtype=pl.String)
            if not isinstance(user_ids, pl.Series)
            else user_ids.cast(pl.String)
        )
        if users.null_count():
            raise ValueError("user_ids contain nulls")
        if users.n_unique() != users.len():
            raise ValueError("user_ids contain duplicates")
        self.n_users = users.len()
        missing = [c for c in ITEM_SCHEMA if c not in items.columns]
        if missing:
            raise ValueError(f"items lack columns {missing}")
        items = items.select(list(ITEM_SCHEMA)).cast(ITEM_SCHEMA)  # type: ignore[arg-type]
        if items["item_id"].null_count() or items["item_id"].n_unique() != items.height:
            raise ValueError("item ids must be unique and non-null")
        self.items = items
        self.n_items = items.height

        if segments is None:
            seg = pl.Series("segment", [None] * self.n_users, dtype=pl.String)
        else:
            seg = (
                pl.Series("segment", segments, dtype=pl.String)
                if not isinstance(segments, pl.Series)
                else segments.cast(pl.String)
            )
        if seg.len() != self.n_users:
            raise ValueError("segments must have one entry per user")
        self.segments = sorted(s for s in seg.unique().to_list() if s is not None)
        seg_ids = seg.replace_strict(
            {s: i for i, s in enumerate(self.segments)}, default=-1, return_dtype=pl.Int16
        )

        # Users: ids + segment now (bounded by n_users, not by candidates).
        for name, arr in zip(("data", "offsets", "hash"), encode_ids(users.to_list()), strict=True):
            self._save(f"user_ids.{name}", arr)
        self._save("user_segment", seg_ids.to_numpy().astype(np.int16))
        if write_parquet:
            self._parquet(
                "users",
                pa.table(
                    {
                        "user_idx": np.arange(self.n_users, dtype=np.int32),
                        "user_id": users.to_arrow(),
                        "segment": seg.to_arrow(),
                    }
                ),
            )
        del users, seg, seg_ids

        parts = os.path.join(self.out_dir, _PARTS)
        self._cand = {
            "item": _Part(f"{parts}/cand.item", np.int32),
            "score": _Part(f"{parts}/cand.score", np.float32),
            "signals": _Part(f"{parts}/cand.signals", np.float32, (len(SIGNALS),)),
            "reason": _Part(f"{parts}/cand.reason", np.uint8),
        }
        self._seen = _Part(f"{parts}/seen.item", np.int32)
        self._cand_counts = np.zeros(self.n_users, dtype=np.int32)
        self._seen_counts = np.zeros(self.n_users, dtype=np.int32)
        self._next_user = 0
        self._n_shards = 0
        self._max_per_user = 0
        self._similar: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._fallbacks: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._factors: tuple[Any, np.ndarray, np.ndarray] | None = None

    # --- inputs ------------------------------------------------------------------------------
    def add_shard(
        self, user_start: int, user_stop: int, candidates: Arrays, seen: Arrays | None = None
    ) -> int:
        """Append the candidates (and seen pairs) of users [user_start, user_stop).

        candidates: columns CANDIDATE_COLUMNS (user_idx, item_idx, score, pop, cooc, emb, ranker,
        reason), any row order; seen: columns user_idx, item_idx. Shards must come in order and
        cover every user exactly once (a user may have no rows). Raises ValueError on bad input:
        out-of-range indices, duplicate (user, item) pairs, a candidate the user has seen.
        Returns the number of candidate rows written.
        """
        if user_start != self._next_user or not user_start <= user_stop <= self.n_users:
            raise ValueError(
                f"shard [{user_start}, {user_stop}) out of order; next user is {self._next_user}"
            )
        u = _col(candidates, "user_idx", np.int64)
        it = _col(candidates, "item_idx", np.int64)
        score = _col(candidates, "score", np.float32)
        n = u.shape[0]
        signals = np.empty((n, len(SIGNALS)), dtype=np.float32)
        for j, s in enumerate(SIGNALS):
            signals[:, j] = _col(candidates, s, np.float32)
        reason_raw = _col(candidates, "reason", np.int64)
        if n and (reason_raw.min() < 0 or reason_raw.max() > 255):
            raise ValueError("reason codes must be in 0..255")
        reason = reason_raw.astype(np.uint8)
        for name, arr in (("score", score), ("signals", signals)):
            if not np.isfinite(arr).all():
                raise ValueError(f"candidate {name} contain NaN or inf")
        self._check_range(u, user_start, user_stop, "candidates.user_idx")
        self._check_range(it, 0, self.n_items, "candidates.item_idx")

        if not _sorted_by_user_then_score(u, score):
            order = np.lexsort((-score, u))
            u, it, score, signals, reason = (
                u[order],
                it[order],
                score[order],
                signals[order],
                reason[order],
            )
            del order
        keys = np.sort(u * self.n_items + it)
        if n and (keys[1:] == keys[:-1]).any():
            raise ValueError("duplicate (user_idx, item_idx) among candidates")

        if seen is not None:
            su = _col(seen, "user_idx", np.int64)
            si = _col(seen, "item_idx", np.int64)
            self._check_range(su, user_start, user_stop, "seen.user_idx")
            self._check_range(si, 0, self.n_items, "seen.item_idx")
            skeys = np.sort(su * self.n_items + si)
            if skeys.size:
                skeys = skeys[np.concatenate(([True], skeys[1:] != skeys[:-1]))]
                hit = np.searchsorted(skeys, keys)
                hit[hit == skeys.shape[0]] = 0
                if (skeys[hit] == keys).any():
                    raise ValueError("a candidate is an item the user has already seen")
            su, si = skeys // self.n_items, skeys % self.n_items
            self._seen.append(si.astype(np.int32))
            self._seen_counts[user_start:user_stop] = np.bincount(
                su - user_start, minlength=user_stop - user_start
            )
        del keys

        counts = np.bincount(u - user_start, minlength=user_stop - user_start)
        self._cand_counts[user_start:user_stop] = counts
        self._max_per_user = max(self._max_per_user, int(counts.max()) if counts.size else 0)
        self._cand["item"].append(it.astype(np.int32))
        self._cand["score"].append(score)
        self._cand["signals"].append(signals)
        self._cand["reason"].append(reason)

        if self.write_parquet:
            starts = np.zeros(counts.shape[0], dtype=np.int64)
            np.cumsum(counts[:-1], out=starts[1:])
            rank = (np.arange(n) - np.repeat(starts, counts)).astype(np.int16)
            cols = {
                "user_idx": u.astype(np.int32),
                "rank": rank,
                "item_idx": it.astype(np.int32),
                "score": score,
            }
            cols.update({s: signals[:, j] for j, s in enumerate(SIGNALS)})
            cols["reason"] = reason
            # No dictionary pages: scores are near-unique floats, the attempt only costs time.
            self._parquet(f"candidates/part-{self._n_shards:05d}", pa.table(cols), dictionary=False)
        self._next_user = user_stop
        self._n_shards += 1
        return n

    def set_similar(self, kind: str, data: Arrays) -> None:
        """Item-to-item lists of one kind (emb|cooc): columns item_idx, similar_idx, score."""
        if kind not in SIMILAR_KINDS:
            raise ValueError(f"unknown similarity kind {kind!r}; expected one of {SIMILAR_KINDS}")
        i = _col(data, "item_idx", np.int64)
        j = _col(data, "similar_idx", np.int64)
        s = _col(data, "score", np.float32)
        self._check_range(i, 0, self.n_items, f"similar_{kind}.item_idx")
        self._check_range(j, 0, self.n_items, f"similar_{kind}.similar_idx")
        if not np.isfinite(s).all():
            raise ValueError(f"similar_{kind}.score contains NaN or inf")
        order = np.lexsort((-s, i))
        self._similar[kind] = (i[order], j[order].astype(np.int32), s[order])

    def set_fallbacks(self, fallbacks: Mapping[str, tuple[Any, Any]]) -> None:
        """Named fallback lists: {name: (item_idx[], score[])}; stored best first."""
        for name, (items, scores) in fallbacks.items():
            it = np.asarray(items, dtype=np.int64)
            sc = np.asarray(scores, dtype=np.float32)
            if it.shape != sc.shape:
                raise ValueError(f"fallback {name!r}: items and scores differ in length")
            self._check_range(it, 0, self.n_items, f"fallback {name!r}")
            order = np.argsort(-sc, kind="stable")
            self._fallbacks[str(name)] = (it[order].astype(np.int32), sc[order])

    def set_factors(
        self, user_factors: Any, item_factors: Any, item_bias: Any | None = None
    ) -> None:
        """Latent factors: user float32[n_users, d] (may be a memmap), item [n_items, d], bias."""
        uf_shape = tuple(user_factors.shape)
        itf = np.ascontiguousarray(item_factors, dtype=np.float32)
        if len(uf_shape) != 2 or uf_shape[0] != self.n_users:
            raise ValueError(f"user_factors shape {uf_shape}, expected ({self.n_users}, d)")
        if itf.shape != (self.n_items, uf_shape[1]):
            raise ValueError(
                f"item_factors shape {itf.shape}, expected ({self.n_items}, {uf_shape[1]})"
            )
        bias = (
            np.zeros(self.n_items, np.float32)
            if item_bias is None
            else np.ascontiguousarray(item_bias, np.float32)
        )
        if bias.shape != (self.n_items,):
            raise ValueError("item_bias must have one value per item")
        self._factors = (user_factors, itf, bias)

    # --- output ------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Assemble every file, write the manifest last, return it."""
        if self._next_user != self.n_users:
            raise ValueError(f"shards cover users [0, {self._next_user}) of {self.n_users}")
        for name, part in self._cand.items():
            self._hashes[f"cand.{name}.npy"] = part.finish(
                os.path.join(self.out_dir, f"cand.{name}.npy")
            )
        self._hashes["seen.item.npy"] = self._seen.finish(
            os.path.join(self.out_dir, "seen.item.npy")
        )
        shutil.rmtree(os.path.join(self.out_dir, _PARTS))
        self._save("cand.offsets", _offsets(self._cand_counts))
        self._save("seen.offsets", _offsets(self._seen_counts))
        n_candidates, n_seen = int(self._cand_counts.sum()), int(self._seen_counts.sum())
        if self.write_parquet:
            self._write_seen_parquet()

        counts: dict[str, int] = {
            "users": self.n_users,
            "items": self.n_items,
            "candidates": n_candidates,
            "seen": n_seen,
        }
        counts.update(self._write_items())
        counts.update(self._write_similar())
        counts.update(self._write_fallbacks())
        factors = self._write_factors()
        if self.write_parquet:
            self._write_duckdb()

        with open(os.path.join(self.out_dir, DICTIONARIES), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "categories": self._categories,
                    "brands": self._brands,
                    "tags": self._tags,
                    "segments": self.segments,
                    "fallbacks": list(self._fallbacks),
                },
                f,
            )
        files: dict[str, dict[str, Any]] = {}
        for root, _dirs, names in os.walk(self.out_dir):
            for name in sorted(names):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, self.out_dir)
                if rel == MANIFEST:
                    continue
                sha = self._hashes.get(rel) or _sha256_file(full)
                files[rel] = {"bytes": os.path.getsize(full), "sha256": sha}
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "snapshot_id": self.snapshot_id,
            "tenant": self.tenant,
            "created_at": self.created_at.isoformat(),
            "config_version": self.config_version,
            "models": self.models,
            "counts": counts,
            "n_per_user": self.n_per_user if self.n_per_user is not None else self._max_per_user,
            "signals": list(SIGNALS),
            "reasons": {str(k): v for k, v in REASONS.items()},
            "factors": factors,
            "files": dict(sorted(files.items())),
        }
        write_atomic(os.path.join(self.out_dir, MANIFEST), json.dumps(manifest, indent=1).encode())
        return manifest

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _check_range(arr: np.ndarray, lo: int, hi: int, what: str) -> None:
        if arr.size and (arr.min() < lo or arr.max() >= hi):
            raise ValueError(f"{what} out of range [{lo}, {hi})")

    def _save(self, name: str, arr: np.ndarray) -> None:
        path = os.path.join(self.out_dir, name + ".npy")
        np.save(path, np.ascontiguousarray(arr), allow_pickle=False)

    def _parquet(self, name: str, table: pa.Table, dictionary: bool = True) -> None:
        path = os.path.join(self.out_dir, "parquet", name + ".parquet")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path, compression="lz4", use_dictionary=dictionary)

    def _write_seen_parquet(self) -> None:
        seen = np.load(os.path.join(self.out_dir, "seen.item.npy"), mmap_mode="r")
        users = np.repeat(np.arange(self.n_users, dtype=np.int32), self._seen_counts)
        self._parquet("seen", pa.table({"user_idx": users, "item_idx": np.asarray(seen)}))

    def _write_items(self) -> dict[str, int]:
        items = self.items
        self._categories = sorted(items["category"].drop_nulls().unique().to_list())
        self._brands = sorted(items["brand"].drop_nulls().unique().to_list())
        self._tags = sorted(items["tags"].explode().drop_nulls().unique().to_list())

        def codes(col: str, values: list[str]) -> np.ndarray:
            mapping = {v: i for i, v in enumerate(values)}
            return items[col].replace_strict(mapping, default=-1, return_dtype=pl.Int32).to_numpy()

        data, offsets, table = encode_ids(items["item_id"].to_list())
        self._save("item_ids.data", data)
        self._save("item_ids.offsets", offsets)
        self._save("item_ids.hash", table)
        self._save("item_available", items["available"].fill_null(False).to_numpy().astype(bool))
        self._save("item_category", codes("category", self._categories))
        self._save("item_brand", codes("brand", self._brands))
        self._save("item_price", items["price"].cast(pl.Float32).fill_null(float("nan")).to_numpy())
        tag_map = {t: i for i, t in enumerate(self._tags)}
        tags = items["tags"].fill_null([])
        lengths = tags.list.len().to_numpy().astype(np.int64)
        flat = tags.explode().drop_nulls()
        if flat.len() != int(
            lengths.sum()
        ):  # null tags inside a list: drop them, keep lengths right
            tags = tags.list.drop_nulls()
            lengths = tags.list.len().to_numpy().astype(np.int64)
            flat = tags.explode().drop_nulls()
        self._save("item_tags.offsets", _offsets(lengths))
        self._save(
            "item_tags.id",
            flat.replace_strict(tag_map, return_dtype=pl.Int32).to_numpy()
            if flat.len()
            else np.zeros(0, np.int32),
        )
        if self.write_parquet:
            self._parquet(
                "items",
                items.with_row_index("item_idx")
                .with_columns(pl.col("item_idx").cast(pl.Int32))
                .to_arrow(),
            )
        return {
            "categories": len(self._categories),
            "brands": len(self._brands),
            "tags": len(self._tags),
        }

    def _write_similar(self) -> dict[str, int]:
        counts, tables = {}, []
        for kind in SIMILAR_KINDS:
            i, j, s = self._similar.get(
                kind, (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32))
            )
            per_item = np.bincount(i, minlength=self.n_items)
            self._save(f"similar_{kind}.offsets", _offsets(per_item))
            self._save(f"similar_{kind}.item", j)
            self._save(f"similar_{kind}.score", s)
            counts[f"similar_{kind}"] = int(j.shape[0])
            if self.write_parquet:
                rank = np.arange(i.shape[0]) - np.repeat(_offsets(per_item)[:-1], per_item)
                tables.append(
                    pa.table(
                        {
                            "kind": pa.array([kind] * i.shape[0], pa.string()),
                            "item_idx": i.astype(np.int32),
                            "rank": rank.astype(np.int32),
                            "similar_idx": j,
                            "score": s,
                        }
                    )
                )
        if self.write_parquet:
            self._parquet("similar", pa.concat_tables(tables))
        return counts

    def _write_fallbacks(self) -> dict[str, int]:
        names = list(self._fallbacks)
        lengths = np.array([self._fallbacks[n][0].shape[0] for n in names], dtype=np.int64)
        items = [self._fallbacks[n][0] for n in names] or [np.zeros(0, np.int32)]
        scores = [self._fallbacks[n][1] for n in names] or [np.zeros(0, np.float32)]
        self._save("fallback.offsets", _offsets(lengths))
        self._save("fallback.item", np.concatenate(items).astype(np.int32))
        self._save("fallback.score", np.concatenate(scores).astype(np.float32))
        if self.write_parquet:
            self._parquet(
                "fallbacks",
                pa.table(
                    {
                        "name": pa.array(
                            [n for n, k in zip(names, lengths, strict=True) for _ in range(k)],
                            pa.string(),
                        ),
                        "rank": np.concatenate(
                            [np.arange(k, dtype=np.int32) for k in lengths]
                            or [np.zeros(0, np.int32)]
                        ),
                        "item_idx": np.concatenate(items).astype(np.int32),
                        "score": np.concatenate(scores).astype(np.float32),
                    }
                ),
            )
            self._parquet(
                "reasons",
                pa.table(
                    {
                        "code": pa.array(list(REASONS), pa.uint8()),
                        "text": pa.array(list(REASONS.values())),
                    }
                ),
            )
        return {"fallbacks": len(names)}

    def _write_factors(self) -> dict[str, int] | None:
        if self._factors is None:
            return None
        uf, itf, bias = self._factors
        d = int(itf.shape[1])
        # Streamed through a part file (not a memmap) so memory stays bounded by one chunk.
        part = _Part(os.path.join(self.out_dir, "user_factors.part"), np.float32, (d,))
        step = max(1, (1 << 24) // (d * 4))
        for a in range(0, self.n_users, step):
            part.append(np.asarray(uf[a : a + step], dtype=np.float32))
        self._hashes["user_factors.npy"] = part.finish(
            os.path.join(self.out_dir, "user_factors.npy")
        )
        self._save("item_factors", itf)
        self._save("item_bias", bias)
        return {"dim": d}

    def _write_duckdb(self) -> None:
        import duckdb  # local: the reader and server never need it

        path = os.path.join(self.out_dir, "snapshot.duckdb")
        views = {
            "users": "read_parquet('parquet/users.parquet')",
            "items": "read_parquet('parquet/items.parquet')",
            "candidates": "read_parquet('parquet/candidates/*.parquet')",
            "seen": "read_parquet('parquet/seen.parquet')",
            "similar_items": "read_parquet('parquet/similar.parquet')",
            "fallbacks": "read_parquet('parquet/fallbacks.parquet')",
            "reasons": "read_parquet('parquet/reasons.parquet')",
        }
        con = duckdb.connect(path)
        try:
            con.execute("SET file_search_path = " + _sql_str(self.out_dir))
            for name, src in views.items():
                con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM {src}')
            con.execute(
                "CREATE VIEW recommendations AS SELECT u.user_id, c.rank, i.item_id, c.score, "
                "c.pop, "
                "c.cooc, c.emb, c.ranker, r.text AS reason FROM candidates c "
                "JOIN users u USING (user_idx) JOIN items i USING (item_idx) "
                "LEFT JOIN reasons r ON r.code = c.reason"
            )
            con.execute(
                "CREATE TABLE snapshot_info AS "
                "SELECT ? AS snapshot_id, ? AS tenant, ? AS created_at",
                [self.snapshot_id, self.tenant, self.created_at.isoformat()],
            )
        finally:
            con.close()


def _sorted_by_user_then_score(u: np.ndarray, score: np.ndarray) -> bool:
    if u.shape[0] < 2:
        return True
    du = np.diff(u)
    return bool((du >= 0).all() and ((du != 0) | (score[1:] <= score[:-1])).all())


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _offsets(counts: np.ndarray) -> np.ndarray:
    off = np.zeros(counts.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=off[1:])
    return off


def write_snapshot(
    out_dir: str,
    *,
    tenant: str,
    user_ids: Sequence[str] | pl.Series | np.ndarray,
    items: pl.DataFrame,
    candidates: Arrays,
    seen: Arrays | None = None,
    similar: Mapping[str, Arrays] | None = None,
    fallbacks: Mapping[str, tuple[Any, Any]] | None = None,
    segments: Sequence[str | None] | pl.Series | None = None,
    factors: tuple[Any, Any, Any] | None = None,
    models: Mapping[str, Mapping[str, Any]] | None = None,
    config_version: str | None = None,
    n_per_user: int | None = None,
    write_parquet: bool = True,
) -> dict[str, Any]:
    """Write a whole snapshot in one call (all users as one shard). Returns the manifest."""
    w = SnapshotWriter(
        out_dir,
        tenant=tenant,
        user_ids=user_ids,
        items=items,
        segments=segments,
        models=models,
        config_version=config_version,
        n_per_user=n_per_user,
        write_parquet=write_parquet,
    )
    w.add_shard(0, w.n_users, candidates, seen)
    for kind, data in (similar or {}).items():
        w.set_similar(kind, data)
    w.set_fallbacks(fallbacks or {})
    if factors is not None:
        w.set_factors(*factors)
    return w.finish()


def connect_duckdb(snapshot_path: str) -> Any:
    """A read-only DuckDB connection to a snapshot's `snapshot.duckdb`, views resolvable."""
    import duckdb

    path = os.path.abspath(snapshot_path)
    con = duckdb.connect(os.path.join(path, "snapshot.duckdb"), read_only=True)
    con.execute("SET file_search_path = " + _sql_str(path))
    return con

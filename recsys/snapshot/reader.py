"""Read a published serving snapshot: memory-mapped arrays and O(1) id lookups.

Every array is a NumPy ``.npy`` file opened with ``mmap_mode="r"``, so gunicorn workers share one
copy through the page cache and opening a 1M-user snapshot costs milliseconds. String ids are
looked up through an on-disk open-addressing hash table (also memory-mapped), so nothing is built
per process at load time. No method touches a database.

Per-user and per-item lists are CSR tables: ``<name>.offsets.npy`` (int64[n+1]) delimits row ``i``
as ``[offsets[i], offsets[i+1])`` in the value arrays. Every returned array is a read-only view;
copy it before changing it.

See docs/snapshot-format.md for the file list and its guarantees.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from typing import Any

import numpy as np

from recsys.snapshot.format import (
    DICTIONARIES,
    EMPTY_SLOT,
    MANIFEST,
    REASONS,
    SCHEMA_VERSION,
    SIGNALS,
    SIMILAR_KINDS,
    id_hash,
)

__all__ = [
    "REASONS",
    "SIGNALS",
    "Snapshot",
    "SnapshotError",
    "open_snapshot",
    "verify_checksums",
]


class SnapshotError(Exception):
    """A snapshot is missing, incomplete, corrupted or of an unsupported schema version."""


class _IdTable:
    """Ids as concatenated UTF-8 bytes + offsets, with an on-disk linear-probing hash table."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray, table: np.ndarray) -> None:
        self._data = data
        self._offsets = offsets
        self._table = table
        self._mask = int(table.shape[0]) - 1
        self.n = int(offsets.shape[0]) - 1
        # memoryviews of the same pages for the scalar lookups of `index`: indexing one yields a
        # Python int / bytes-comparable slice without building a NumPy scalar (~10x cheaper).
        self._data_mv = memoryview(np.ascontiguousarray(data))
        self._offsets_mv = memoryview(np.ascontiguousarray(offsets))
        self._table_mv = memoryview(np.ascontiguousarray(table))

    def as_bytes(self) -> tuple[bytes, list[int]]:
        """(all ids as one UTF-8 bytes object, the n + 1 offsets of each id in it)."""
        return bytes(self._data_mv), self._offsets_mv.tolist()

    def as_arrow(self) -> Any:
        """The ids as a pyarrow large_string array, zero-copy over the memory map."""
        import pyarrow as pa

        return pa.LargeStringArray.from_buffers(
            self.n,
            pa.py_buffer(np.ascontiguousarray(self._offsets)),
            pa.py_buffer(np.ascontiguousarray(self._data)),
        )

    def id(self, idx: int) -> str:
        if not 0 <= idx < self.n:
            raise IndexError(f"index {idx} out of range [0, {self.n})")
        offsets = self._offsets_mv  # (Python ints and a bytes slice: no NumPy scalars)
        return str(self._data_mv[offsets[idx] : offsets[idx + 1]], "utf-8")

    def index(self, key: str) -> int | None:
        raw = key.encode("utf-8")
        slot = id_hash(raw) & self._mask
        data, offsets, table, mask = self._data_mv, self._offsets_mv, self._table_mv, self._mask
        n_raw = len(raw)
        while True:
            row = table[slot]
            if row == EMPTY_SLOT:
                return None
            start = offsets[row]
            if offsets[row + 1] - start == n_raw and data[start : start + n_raw] == raw:
                return row
            slot = (slot + 1) & mask


def verify_checksums(path: str) -> None:
    """Recompute the sha256 of every file listed in the manifest; raise SnapshotError on mismatch.

    Reads every byte (seconds for a multi-GB snapshot); publication runs it once, servers don't.
    """
    manifest = read_manifest(path)
    for rel, info in manifest["files"].items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise SnapshotError(f"{rel}: listed in the manifest but missing")
        h = hashlib.sha256()
        with open(full, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        if h.hexdigest() != info["sha256"]:
            raise SnapshotError(f"{rel}: sha256 mismatch (file changed or corrupted)")


def read_manifest(path: str) -> dict[str, Any]:
    mpath = os.path.join(path, MANIFEST)
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise SnapshotError(
            f"{path}: no {MANIFEST} (not a snapshot, or an unfinished one)"
        ) from None
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{mpath}: unreadable manifest ({exc})") from None
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise SnapshotError(
            f"{path}: schema version {version!r}, this reader supports {SCHEMA_VERSION}"
        )
    for key in ("snapshot_id", "tenant", "created_at", "counts", "files"):
        if key not in manifest:
            raise SnapshotError(f"{path}: manifest lacks {key!r}")
    return manifest


def open_snapshot(path: str, verify: bool = True, checksums: bool = False) -> Snapshot:
    """Open the snapshot folder `path` (memory-mapped, read-only).

    verify:    cheap structural checks: schema version, every manifest file present with its
               recorded size, array shapes consistent with the manifest counts (milliseconds).
    checksums: also recompute every file's sha256 (reads the whole snapshot; publication does it).
    Raises SnapshotError when a check fails.
    """
    path = os.path.abspath(path)
    manifest = read_manifest(path)
    if verify:
        for rel, info in manifest["files"].items():
            full = os.path.join(path, rel)
            try:
                size = os.path.getsize(full)
            except OSError:
                raise SnapshotError(f"{rel}: listed in the manifest but missing") from None
            if size != info["bytes"]:
                raise SnapshotError(f"{rel}: {size} bytes, manifest says {info['bytes']}")
    if checksums:
        verify_checksums(path)
    snap = Snapshot(path, manifest)
    if verify:
        snap._check_shapes()
    return snap


class Snapshot:
    """One immutable, published snapshot. Construct with `open_snapshot`.

    Indices: users are ``0..n_users-1`` and items ``0..n_items-1`` (int). Ids are strings.
    """

    def __init__(self, path: str, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.snapshot_id: str = manifest["snapshot_id"]
        self.tenant: str = manifest["tenant"]
        self.created_at: dt.datetime = dt.datetime.fromisoformat(manifest["created_at"])
        counts = manifest["counts"]
        self.n_users: int = int(counts["users"])
        self.n_items: int = int(counts["items"])
        try:
            with open(os.path.join(path, DICTIONARIES), "rb") as f:
                dicts = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{path}: unreadable {DICTIONARIES} ({exc})") from None
        self.categories: list[str] = dicts["categories"]
        self.brands: list[str] = dicts["brands"]
        self.tags: list[str] = dicts["tags"]
        self.segments: list[str] = dicts["segments"]
        self.fallback_names: list[str] = dicts["fallbacks"]
        self._category_ids = {c: i for i, c in enumerate(self.categories)}
        self._brand_ids = {b: i for i, b in enumerate(self.brands)}
        self._tag_ids = {t: i for i, t in enumerate(self.tags)}
        self._fallback_rows = {n: i for i, n in enumerate(self.fallback_names)}

        ld = self._load
        self._users = _IdTable(ld("user_ids.data"), ld("user_ids.offsets"), ld("user_ids.hash"))
        self._items = _IdTable(ld("item_ids.data"), ld("item_ids.offsets"), ld("item_ids.hash"))
        #: int64[n_users+1]: the candidate CSR offsets (list lengths = np.diff).
        self.candidate_offsets: np.ndarray = ld("cand.offsets")
        self._cand_off = self.candidate_offsets
        #: The candidate CSR's values, one row per candidate: item index (int32), score
        #: (float32), signals (float32[n, len(SIGNALS)]) and reason code.
        self.candidate_items: np.ndarray = ld("cand.item")
        self.candidate_scores: np.ndarray = ld("cand.score")
        self.candidate_signals: np.ndarray = ld("cand.signals")
        self.candidate_reasons: np.ndarray = ld("cand.reason")
        #: int64[n_users+1] and int32[]: the items each user has seen (CSR).
        self.seen_offsets: np.ndarray = ld("seen.offsets")
        self.seen_items: np.ndarray = ld("seen.item")
        # (memoryviews of the offsets: Python ints per lookup, no NumPy scalars)
        self._cand_off_mv = memoryview(np.ascontiguousarray(self._cand_off))
        self._seen_off_mv = memoryview(np.ascontiguousarray(self.seen_offsets))
        self._similar = {
            kind: (
                ld(f"similar_{kind}.offsets"),
                ld(f"similar_{kind}.item"),
                ld(f"similar_{kind}.score"),
            )
            for kind in SIMILAR_KINDS
        }
        self._fb_off = ld("fallback.offsets")
        self._fb_item = ld("fallback.item")
        self._fb_score = ld("fallback.score")
        #: int32[n_users]: the user's segment, an index into `segments` (-1: none).
        self.user_segment_codes: np.ndarray = ld("user_segment")
        #: bool[n_items]: the item could be sold when the snapshot was built.
        self.available: np.ndarray = ld("item_available")
        #: int32[n_items]: index into `categories`, -1 when unknown.
        self.category_id: np.ndarray = ld("item_category")
        #: int32[n_items]: index into `brands`, -1 when unknown.
        self.brand_id: np.ndarray = ld("item_brand")
        #: float32[n_items]: price, NaN when unknown.
        self.price: np.ndarray = ld("item_price")
        #: Tag CSR over items, for vectorized tag filters: tags of item i are
        #: ``item_tags_ids[item_tags_offsets[i]:item_tags_offsets[i+1]]``.
        self.item_tags_offsets: np.ndarray = ld("item_tags.offsets")
        self.item_tags_ids: np.ndarray = ld("item_tags.id")
        self._tags_off, self._tags_id = self.item_tags_offsets, self.item_tags_ids
        self.has_factors: bool = bool(manifest.get("factors"))
        if self.has_factors:
            #: float32[n_users, d] (memory-mapped); only when `has_factors`.
            self.user_factor_matrix: np.ndarray = ld("user_factors")
            #: float32[n_items, d] (memory-mapped); only when `has_factors`.
            self.item_factors: np.ndarray = ld("item_factors")
            #: float32[n_items]; only when `has_factors`.
            self.item_bias: np.ndarray = ld("item_bias")

    # --- loading --------------------------------------------------------------------------
    def _load(self, name: str) -> np.ndarray:
        full = os.path.join(self.path, name + ".npy")
        try:
            # np.asarray: a plain ndarray view of the map (np.memmap slices carry per-op overhead).
            return np.asarray(np.load(full, mmap_mode="r", allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise SnapshotError(f"{name}.npy: cannot be opened ({exc})") from None

    def _check_shapes(self) -> None:
        nu, ni = self.n_users, self.n_items
        counts = self.manifest["counts"]

        def expect(cond: bool, what: str) -> None:
            if not cond:
                raise SnapshotError(f"{self.path}: inconsistent arrays: {what}")

        expect(self._users.n == nu and self._items.n == ni, "id tables vs counts")
        for name, off, n_rows, values in (
            ("cand", self._cand_off, nu, self.candidate_items),
            ("seen", self.seen_offsets, nu, self.seen_items),
            ("fallback", self._fb_off, len(self.fallback_names), self._fb_item),
            ("item_tags", self._tags_off, ni, self._tags_id),
        ):
            expect(off.shape == (n_rows + 1,), f"{name}.offsets shape")
            expect(int(off[0]) == 0 and int(off[-1]) == values.shape[0], f"{name}.offsets ends")
        nnz = int(counts["candidates"])
        expect(self.candidate_items.shape == (nnz,), "cand.item length vs counts.candidates")
        for arr, shape in (
            (self.candidate_scores, (nnz,)),
            (self.candidate_signals, (nnz, len(SIGNALS))),
            (self.candidate_reasons, (nnz,)),
            (self.user_segment_codes, (nu,)),
            (self.available, (ni,)),
            (self.category_id, (ni,)),
            (self.brand_id, (ni,)),
            (self.price, (ni,)),
        ):
            expect(arr.shape == shape, f"array of shape {arr.shape}, expected {shape}")
        for kind, (off, item, score) in self._similar.items():
            expect(off.shape == (ni + 1,) and item.shape == score.shape, f"similar_{kind}")
        if self.has_factors:
            d = self.user_factor_matrix.shape[1]
            expect(self.user_factor_matrix.shape == (nu, d), "user_factors shape")
            expect(self.item_factors.shape == (ni, d), "item_factors shape")
            expect(self.item_bias.shape == (ni,), "item_bias shape")

    def close(self) -> None:
        """Drop the references to the memory maps (the OS unmaps when the last view goes)."""
        for name in list(vars(self)):
            if name.startswith("_") and isinstance(getattr(self, name), np.ndarray):
                setattr(self, name, None)

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Snapshot({self.snapshot_id!r}, tenant={self.tenant!r}, "
            f"users={self.n_users}, items={self.n_items})"
        )

    # --- ids ------------------------------------------------------------------------------
    def user_index(self, user_id: str) -> int | None:
        """Row of `user_id`, or None when the snapshot does not know the user. O(1)."""
        return self._users.index(user_id)

    def user_id(self, uidx: int) -> str:
        return self._users.id(uidx)

    def item_index(self, item_id: str) -> int | None:
        """Row of `item_id`, or None when the snapshot does not know the item. O(1)."""
        return self._items.index(item_id)

    def item_id(self, iidx: int) -> str:
        return self._items.id(int(iidx))

    def user_ids_arrow(self) -> Any:
        """Every user id, by user index, as a pyarrow large_string array (zero-copy)."""
        return self._users.as_arrow()

    def item_ids_arrow(self) -> Any:
        """Every item id, by item index, as a pyarrow large_string array (zero-copy)."""
        return self._items.as_arrow()

    def item_id_bytes(self) -> tuple[bytes, list[int]]:
        """(every item id as one UTF-8 bytes object, the n_items + 1 offsets of each in it)."""
        return self._items.as_bytes()

    def item_ids(self, iidx: np.ndarray | list[int]) -> list[str]:
        """Ids of many items (e.g. a response page)."""
        return [self._items.id(int(i)) for i in iidx]

    # --- per-user -------------------------------------------------------------------------
    def user_candidates(self, uidx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(item_idx int32[n], score f32[n], signals f32[n, 4] in SIGNALS order, reason uint8[n]).

        Sorted by score, best first; the user's seen items are already excluded.
        """
        off = self._cand_off_mv
        a, b = off[uidx], off[uidx + 1]
        return (
            self.candidate_items[a:b],
            self.candidate_scores[a:b],
            self.candidate_signals[a:b],
            self.candidate_reasons[a:b],
        )

    def user_seen(self, uidx: int) -> np.ndarray:
        """int32[]: items the user interacted with in the training data, sorted ascending."""
        off = self._seen_off_mv
        return self.seen_items[off[uidx] : off[uidx + 1]]

    def users_in_segments(self, codes: list[int]) -> np.ndarray:
        """The user indices whose segment code is one of `codes` (indices of `segments`)."""
        return np.flatnonzero(np.isin(np.asarray(self.user_segment_codes), codes))

    def user_segment(self, uidx: int) -> str | None:
        s = int(self.user_segment_codes[uidx])
        return None if s < 0 else self.segments[s]

    def user_factors(self, uidx: int) -> np.ndarray:
        """float32[d] latent factors of the user (only when `has_factors`)."""
        if not self.has_factors:
            raise SnapshotError(f"snapshot {self.snapshot_id} carries no factors")
        return self.user_factor_matrix[uidx]

    # --- per-item -------------------------------------------------------------------------
    def similar(self, iidx: int, kind: str = "emb") -> tuple[np.ndarray, np.ndarray]:
        """(item_idx int32[k], score f32[k]) most similar to `iidx`, best first; kind emb|cooc."""
        try:
            off, item, score = self._similar[kind]
        except KeyError:
            raise ValueError(
                f"unknown similarity kind {kind!r}; expected one of {SIMILAR_KINDS}"
            ) from None
        a, b = int(off[iidx]), int(off[iidx + 1])
        return item[a:b], score[a:b]

    def item_tags(self, iidx: int) -> np.ndarray:
        """int32[] tag ids of the item (names via `tag_name`)."""
        a, b = int(self._tags_off[iidx]), int(self._tags_off[iidx + 1])
        return self._tags_id[a:b]

    def tag_id(self, tag: str) -> int | None:
        return self._tag_ids.get(tag)

    def tag_name(self, tag_id: int) -> str:
        return self.tags[tag_id]

    def category_index(self, category: str) -> int | None:
        return self._category_ids.get(category)

    def category_name(self, category_id: int) -> str | None:
        return None if category_id < 0 else self.categories[category_id]

    def brand_index(self, brand: str) -> int | None:
        return self._brand_ids.get(brand)

    def brand_name(self, brand_id: int) -> str | None:
        return None if brand_id < 0 else self.brands[brand_id]

    # --- fallbacks ------------------------------------------------------------------------
    def fallback(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(item_idx int32[k], score f32[k]) of a fallback list, best first, or None if absent.

        Names: 'popular', 'trending', 'category:<category>', 'tag:<tag>', 'segment:<segment>'.
        """
        row = self._fallback_rows.get(name)
        if row is None:
            return None
        a, b = int(self._fb_off[row]), int(self._fb_off[row + 1])
        return self._fb_item[a:b], self._fb_score[a:b]

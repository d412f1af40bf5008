"""Constants and small helpers of the on-disk snapshot format (see docs/snapshot-format.md).

Shared by the writer and the reader so the two can never disagree about a file name, a dtype or
the id hash.
"""

from __future__ import annotations

import hashlib

import numpy as np

#: Bumped when a file is added, removed or changes meaning. A reader refuses other versions.
SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
DICTIONARIES = "dictionaries.json"
CURRENT = "CURRENT"
TMP_PREFIX = ".tmp-"

#: Per-signal columns of a candidate, in the order of `signals[:, j]`.
SIGNALS: tuple[str, ...] = ("pop", "cooc", "emb", "ranker")

#: Reason codes stored per candidate (uint8) and the text the API shows for them.
REASONS: dict[int, str] = {
    0: "recommended for you",
    1: "popular right now",
    2: "often bought together with items you interacted with",
    3: "similar to items you interacted with",
    4: "trending",
    5: "popular with shoppers like you",
    6: "popular in a category you like",
}
REASON_CODES: dict[str, int] = {
    "personal": 0,
    "popular": 1,
    "cooc": 2,
    "emb": 3,
    "trending": 4,
    "segment": 5,
    "category": 6,
}

SIMILAR_KINDS: tuple[str, ...] = ("emb", "cooc")

#: Empty slot marker of the on-disk id hash tables.
EMPTY_SLOT = -1


def id_hash(key: bytes) -> int:
    """Stable 64-bit hash of an id's UTF-8 bytes (the same in every process and release)."""
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def hash_table_size(n: int) -> int:
    """Slots of an open-addressing table for `n` keys: a power of two, load factor <= 0.5."""
    size = 8
    while size < 2 * n:
        size *= 2
    return size


def build_hash_table(hashes: np.ndarray) -> np.ndarray:
    """Linear-probing table (int32 slots holding a key's row, -1 when empty) for uint64 hashes.

    Vectorized insertion in rounds: every pending key claims its current slot; one claimer per
    free slot wins, the rest move one slot on. Lookups walk the same probe sequence.
    """
    n = int(hashes.shape[0])
    if n >= 2**31 - 1:
        raise ValueError("too many ids for an int32 hash table")
    size = hash_table_size(n)
    mask = np.uint64(size - 1)
    table = np.full(size, EMPTY_SLOT, dtype=np.int32)
    pos = (hashes.astype(np.uint64) & mask).astype(np.int64)
    pending = np.arange(n, dtype=np.int64)
    while pending.size:
        p = pos[pending]
        free = table[p] == EMPTY_SLOT
        claimers, slots = pending[free], p[free]
        won_slots, first = np.unique(slots, return_index=True)
        winners = claimers[first]
        table[won_slots] = winners.astype(np.int32)
        placed = np.zeros(n, dtype=bool)
        placed[winners] = True
        pending = pending[~placed[pending]]
        pos[pending] = (pos[pending] + 1) & (size - 1)
    return table


def encode_ids(ids: list[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(utf-8 bytes uint8[], offsets int64[n+1], hash table int32[slots]) for a list of ids."""
    encoded = [str(s).encode("utf-8") for s in ids]
    lengths = np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded))
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    hashes = np.fromiter((id_hash(b) for b in encoded), dtype=np.uint64, count=len(encoded))
    return data, offsets, build_hash_table(hashes)

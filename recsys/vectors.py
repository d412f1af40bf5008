"""A writable k-NN index of id-named vectors: exact while small, faiss IVF when large.

`VectorIndex` holds rows of float32 vectors (cosine: stored normalized, searched by inner
product; dot: as given), each with an id and a metadata dict. `upsert` appends a row (the id's
previous row, if any, is marked dead), `delete` marks a row dead, `search` returns the k best
live rows, optionally only among rows an `allow` mask admits (metadata and tag filters).

Search is exact (one matrix-vector product, numpy) while the rows it would scan number at most
`exact_below`; beyond that an inverted-file index (`faiss.IndexIVFFlat`, nlist ~ sqrt(n),
trained on a sample of the rows the first time it is needed) is searched with `nprobe` lists
and an ID selector holding the live (and admitted) rows, so deleted or filtered-out rows are
never returned and never take a place of the k. Rows added after training are added to the IVF
as they come; deleted ones are removed from it. A filter admitting few rows is answered exactly
over those rows (cheaper and exact). Figures: benchmarks/vector_search.py.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np

try:  # (faiss is a dependency; the exact path alone works without it)
    import faiss
except ImportError:  # pragma: no cover
    faiss = None

METRICS = ("cosine", "dot")
#: Rows searched exactly (one BLAS product: about a millisecond at 50k x 64).
EXACT_BELOW = 50_000


class VectorIndex:
    """See the module docstring. Thread-safe (one lock around writes and the IVF)."""

    def __init__(
        self,
        dim: int,
        metric: str = "cosine",
        *,
        exact_below: int = EXACT_BELOW,
        nprobe: int = 32,
        seed: int = 0,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric is one of {METRICS}")
        self.dim = int(dim)
        self.metric = metric
        self.exact_below = exact_below
        self.nprobe = nprobe
        self.seed = seed
        self._vectors = np.zeros((1024, self.dim), dtype=np.float32)
        self._alive = np.zeros(1024, dtype=bool)
        self.ids: list[str] = []
        self.metadata: list[dict[str, Any] | None] = []
        self.row_of: dict[str, int] = {}
        self._ivf: Any = None
        self._lock = threading.RLock()

    # --- sizes -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def rows(self) -> int:
        return len(self.ids)

    @property
    def approximate(self) -> bool:
        """Does `search` go through the trained IVF index (rather than exact scoring)?"""
        return self._ivf is not None

    @property
    def vectors(self) -> np.ndarray:
        return self._vectors[: self.rows]

    @property
    def alive(self) -> np.ndarray:
        return self._alive[: self.rows]

    # --- writes ------------------------------------------------------------------------------
    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as stored (float32; normalized for cosine); ValueError for a wrong shape, a
        non-finite value or (cosine) a zero vector."""
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim == 1:
            v = v[None, :]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"vectors of dimension {self.dim} expected, got {v.shape[-1]}")
        if not np.isfinite(v).all():
            raise ValueError("vectors hold NaN or infinite values")
        if self.metric == "cosine":
            norms = np.linalg.norm(v, axis=1, keepdims=True)
            if (norms == 0).any():
                raise ValueError("a zero vector has no direction (cosine)")
            v = v / norms
        return np.ascontiguousarray(v, dtype=np.float32)

    def upsert(
        self,
        ids: list[str],
        vectors: np.ndarray,
        metadata: list[dict[str, Any] | None] | None = None,
        prepared: bool = False,
    ) -> None:
        """Add or replace vectors by id (the last one wins within one call)."""
        v = vectors if prepared else self.prepare(vectors)
        if len(ids) != v.shape[0]:
            raise ValueError("one id per vector")
        metadata = metadata if metadata is not None else [None] * len(ids)
        with self._lock:
            start = self.rows
            self._grow(start + len(ids))
            self._vectors[start : start + len(ids)] = v
            self._alive[start : start + len(ids)] = True
            dead = []
            for j, (key, meta) in enumerate(zip(ids, metadata, strict=True)):
                old = self.row_of.get(key)
                if old is not None:
                    self._alive[old] = False
                    dead.append(old)
                self.row_of[key] = start + j
                self.ids.append(key)
                self.metadata.append(meta)
            if self._ivf is not None:
                new = np.arange(start, start + len(ids), dtype=np.int64)
                self._ivf.add_with_ids(self._vectors[start : start + len(ids)], new)
                if dead:
                    self._ivf.remove_ids(np.asarray(dead, dtype=np.int64))

    def delete(self, key: str) -> bool:
        """Remove the vector of `key`; False when there is none."""
        with self._lock:
            row = self.row_of.pop(key, None)
            if row is None:
                return False
            self._alive[row] = False
            self.metadata[row] = None
            if self._ivf is not None:
                self._ivf.remove_ids(np.asarray([row], dtype=np.int64))
            return True

    def get(self, key: str) -> tuple[np.ndarray, dict[str, Any] | None] | None:
        row = self.row_of.get(key)
        if row is None:
            return None
        return self._vectors[row], self.metadata[row]

    def _grow(self, need: int) -> None:
        cap = self._vectors.shape[0]
        if need <= cap:
            return
        new_cap = max(need, cap * 2)
        vectors = np.zeros((new_cap, self.dim), dtype=np.float32)
        vectors[:cap] = self._vectors
        alive = np.zeros(new_cap, dtype=bool)
        alive[:cap] = self._alive
        self._vectors, self._alive = vectors, alive

    # --- search ------------------------------------------------------------------------------
    def search(
        self, query: np.ndarray, k: int, allow: np.ndarray | None = None, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the k best live rows (admitted by `allow`, a bool per row),
        best first. `exact` forces the exact path (the benchmark's reference)."""
        q = self.prepare(query)[0]
        mask = self.alive if allow is None else (self.alive & allow[: self.rows])
        n = int(mask.sum()) if allow is not None or len(self) != self.rows else len(self)
        if exact or n <= self.exact_below or faiss is None:
            return self._exact(q, k, None if n == self.rows else mask)
        ivf = self._trained()
        params = faiss.SearchParametersIVF()
        params.nprobe = self.nprobe
        if n != self.rows:
            bits = np.packbits(mask, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(bits)
        with self._lock:
            scores, rows = ivf.search(q[None, :], k, params=params)
        keep = rows[0] >= 0
        return rows[0][keep], scores[0][keep]

    def _exact(
        self, q: np.ndarray, k: int, mask: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if mask is None:
            rows = np.arange(self.rows)
            scores = self.vectors @ q
        else:
            rows = np.flatnonzero(mask)
            scores = self._vectors[rows] @ q
        if rows.size > k:
            part = np.argpartition(-scores, k - 1)[:k]
            rows, scores = rows[part], scores[part]
        order = np.lexsort((rows, -scores))
        return rows[order], scores[order]

    def _trained(self) -> Any:
        """The IVF over the live rows, trained and filled the first time it is needed."""
        with self._lock:
            if self._ivf is None:
                live = np.flatnonzero(self.alive)
                nlist = max(16, int(math.sqrt(live.size)))
                quantizer = faiss.IndexFlatIP(self.dim)
                ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
                rng = np.random.default_rng(self.seed)
                sample = rng.choice(live, size=min(live.size, nlist * 40), replace=False)
                ivf.cp.seed = self.seed
                ivf.train(self._vectors[np.sort(sample)])
                ivf.add_with_ids(self._vectors[live], live.astype(np.int64))
                self._ivf = ivf
            return self._ivf

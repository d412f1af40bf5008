"""The precompute kernel: exact top-N items per user from latent factors.

score(u, i) = user_factors[u] . item_factors[i] + item_bias[i], with the user's seen items and
excluded items (e.g. unavailable) never returned.

Per block of users: one BLAS matmul (float32), then a two-stage partial selection that avoids
`argpartition` over every item. Items are split into `G` interleaved groups of width W
(item i is in column i % W of group i // W); the top-N items of a user all lie in the N columns
whose maximum over the G groups is largest (each of those N maxima is a distinct item, so the
N-th best score is at least the N-th best column maximum). So: column maxima (B x W, a SIMD
reduction), argpartition them (W instead of n_items), gather the G*N candidates, argpartition
those, sort the final N. Exact, not approximate; tested against brute force.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

NEG_INF = np.float32(-np.inf)


def csr_from_pairs(row: np.ndarray, col: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64[n_rows+1], cols int32[]) from (row, col) pairs, rows 0..n_rows-1."""
    row = np.asarray(row, dtype=np.int64)
    order = np.argsort(row, kind="stable")
    off = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n_rows), out=off[1:])
    return off, np.asarray(col, dtype=np.int32)[order]


class TopNScorer:
    """Reusable kernel state for one item side (factors, bias, exclusions); score user blocks.

    item_factors float32[n_items, d]; item_bias float32[n_items] or None; exclude bool[n_items]
    (True = never recommend) or None; n = list length; block_size users per matmul (64 keeps
    the score block in L2); threads for BLAS (None = leave the library default).
    """

    def __init__(
        self,
        item_factors: np.ndarray,
        n: int,
        *,
        item_bias: np.ndarray | None = None,
        exclude: np.ndarray | None = None,
        block_size: int = 64,
        threads: int | None = 2,
    ) -> None:
        itf = np.asarray(item_factors, dtype=np.float32)
        if itf.ndim != 2:
            raise ValueError("item_factors must be 2-D")
        self.n_items, self.dim = itf.shape
        if n < 1:
            raise ValueError("n must be >= 1")
        self.n = n
        self.block_size = block_size
        self.threads = threads
        bias = (
            np.zeros(self.n_items, np.float32)
            if item_bias is None
            else np.asarray(item_bias, np.float32)
        )
        if bias.shape != (self.n_items,):
            raise ValueError("item_bias must have one value per item")
        bias = bias.copy()
        if exclude is not None:
            bias[np.asarray(exclude, dtype=bool)] = NEG_INF
        # Bias folded into the matmul: users get a constant 1 column, items their bias.
        # Group layout: pad the item axis to G*W; padded columns score -inf.
        self.n_keep = min(n, self.n_items)
        groups = self.n_items // (10 * self.n_keep)
        self.groups = groups if groups >= 2 else 1
        self.width = -(-self.n_items // self.groups)
        padded = self.groups * self.width
        vt = np.zeros((self.dim + 1, padded), dtype=np.float32)
        vt[: self.dim, : self.n_items] = itf.T
        vt[self.dim, : self.n_items] = bias
        vt[self.dim, self.n_items :] = NEG_INF
        self._vt = vt

    def score_block(
        self, user_factors: np.ndarray, seen: tuple[np.ndarray, np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-n of a block of users: (item_idx int32[b, n], score float32[b, n]), best first.

        seen: CSR (offsets int64[b+1], items) relative to this block. Rows with fewer than n
        eligible items are padded with item -1 and score -inf.
        """
        uf = np.asarray(user_factors, dtype=np.float32)
        b = uf.shape[0]
        ua = np.empty((b, self.dim + 1), dtype=np.float32)
        ua[:, : self.dim] = uf
        ua[:, self.dim] = 1.0
        s = ua @ self._vt  # b x padded
        if seen is not None:
            off, cols = seen
            counts = np.diff(off)
            if counts.sum():
                rows = np.repeat(np.arange(b), counts)
                s[rows, np.asarray(cols[off[0] : off[-1]], dtype=np.int64)] = NEG_INF
        n = self.n_keep
        if self.groups == 1:
            cand = np.argpartition(s, s.shape[1] - n, axis=1)[:, s.shape[1] - n :]
            csc = np.take_along_axis(s, cand, axis=1)
        else:
            g, w = self.groups, self.width
            colmax = s.reshape(b, g, w).max(axis=1)  # b x w
            top_cols = np.argpartition(colmax, w - n, axis=1)[:, w - n :]  # b x n
            flat = (
                (np.arange(b, dtype=np.int64) * (g * w))[:, None, None]
                + (np.arange(g, dtype=np.int64) * w)[None, :, None]
                + top_cols[:, None, :]
            ).reshape(b, g * n)
            vals = s.ravel()[flat]  # b x g*n
            pick = np.argpartition(vals, g * n - n, axis=1)[:, g * n - n :]
            cand = (
                np.take_along_axis(flat, pick, axis=1)
                - (np.arange(b, dtype=np.int64) * (g * w))[:, None]
            )
            csc = np.take_along_axis(vals, pick, axis=1)
        order = np.argsort(-csc, axis=1, kind="stable")
        items = np.take_along_axis(cand, order, axis=1).astype(np.int32)
        scores = np.take_along_axis(csc, order, axis=1)
        items[~np.isfinite(scores)] = -1
        if n < self.n:  # fewer items than requested: pad
            items = np.pad(items, ((0, 0), (0, self.n - n)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, self.n - n)), constant_values=NEG_INF)
        return items, scores

    def iter_blocks(
        self, user_factors: Any, seen: tuple[np.ndarray, np.ndarray] | None = None
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Yield (first_row, item_idx, score) per block over all rows of `user_factors`."""
        n_users = user_factors.shape[0]
        limits = threadpool_limits(self.threads, user_api="blas") if self.threads else None
        try:
            for a in range(0, n_users, self.block_size):
                z = min(n_users, a + self.block_size)
                block_seen = None
                if seen is not None:
                    block_seen = (seen[0][a : z + 1], seen[1])
                items, scores = self.score_block(user_factors[a:z], block_seen)
                yield a, items, scores
        finally:
            if limits is not None:
                limits.restore_original_limits()


def top_n(
    user_factors: Any,
    item_factors: np.ndarray,
    n: int,
    *,
    item_bias: np.ndarray | None = None,
    seen: tuple[np.ndarray, np.ndarray] | None = None,
    exclude: np.ndarray | None = None,
    block_size: int = 64,
    threads: int | None = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-n items for every row of `user_factors`: (int32[u, n], float32[u, n]).

    seen: CSR (offsets int64[u+1], item int32[]) of items to exclude per user. Keep `u` to a
    shard (the output is u x n); stream larger inputs with `TopNScorer.iter_blocks`.
    """
    scorer = TopNScorer(
        item_factors,
        n,
        item_bias=item_bias,
        exclude=exclude,
        block_size=block_size,
        threads=threads,
    )
    n_users = user_factors.shape[0]
    out_items = np.empty((n_users, n), dtype=np.int32)
    out_scores = np.empty((n_users, n), dtype=np.float32)
    for a, items, scores in scorer.iter_blocks(user_factors, seen):
        out_items[a : a + items.shape[0]] = items
        out_scores[a : a + items.shape[0]] = scores
    return out_items, out_scores

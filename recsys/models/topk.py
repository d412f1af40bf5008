"""Per-row top-k selection, compiled (Numba): the hot loop of candidate generation.

Every generator's candidates, the served lists, the evaluation and the similar-item lists
select each row's best few of a (batch x catalogue) score block. ``np.argpartition`` over
25,000 columns costs ~0.3 ms a row; one pass with a bounded heap costs a tenth of that, and it
releases the GIL, so the threaded batches of the snapshot builder use both cores.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from numba import njit

_BLOCK = 32  # columns per block maximum


@njit(cache=True, nogil=True)
def _keep_best(bv, bi, n, k):
    """Compact the buffer's first `n` entries (in column order) to its `k` best, still in
    column order; returns the k-th best score (the new entry threshold)."""
    kth = np.partition(bv[:n].copy(), n - k)[n - k]
    above = 0
    for j in range(n):
        if bv[j] > kth:
            above += 1
    ties = k - above  # entries equal to kth that stay: the lowest columns
    m = 0
    for j in range(n):
        v = bv[j]
        if v > kth or (v == kth and ties > 0):
            if v == kth:
                ties -= 1
            bv[m], bi[m] = v, bi[j]
            m += 1
    return kth


@njit(cache=True, nogil=True)
def top_k_rows(scores, k, out_idx, out_val):
    """Fill ``out_idx[r]`` / ``out_val[r]`` with row r's `k` largest scores, best first, ties
    by the lower column; NaN counts as -inf. `k` <= the number of columns.

    Per row: the maxima of blocks of ``_BLOCK`` columns (a vectorised pass); the k-th largest
    of them is a lower bound of the row's k-th score (k blocks reach it), so only blocks whose
    maximum reaches the bound are visited. A column enters a buffer when it reaches the bound;
    a full buffer is compacted to its k best, whose k-th score becomes the bound (entry then
    strictly above it: an equal score at a later column loses the tie). The k kept are sorted,
    stable, so equal scores stay in column order. Rows with fewer than k finite scores are
    completed with the lowest columns holding -inf or NaN, as -inf.
    """
    n_rows, n_cols = scores.shape
    # at least 2k blocks where the row is long enough: the bound then prunes
    block = max(1, min(_BLOCK, n_cols // (2 * k)))
    n_blocks = (n_cols + block - 1) // block
    whole = n_cols // block if block == _BLOCK else 0
    cap = 4 * k + 64
    bv = np.empty(cap, scores.dtype)
    bi = np.empty(cap, np.int64)
    block_max = np.empty(n_blocks, scores.dtype)
    neg_inf = np.full(1, -np.inf, scores.dtype)[0]  # keeps the scores' type
    for r in range(n_rows):
        row = scores[r]
        for b in range(n_blocks):
            m = neg_inf
            if b < whole:
                base = b * _BLOCK
                for j in range(_BLOCK):  # fixed length, select only: vectorised
                    x = row[base + j]
                    m = x if x > m else m
            else:
                for j in range(b * block, min((b + 1) * block, n_cols)):
                    x = row[j]
                    m = x if x > m else m
            block_max[b] = m
        t = neg_inf
        if n_blocks >= k:
            t = np.partition(block_max.copy(), n_blocks - k)[n_blocks - k]
        strict = t == neg_inf  # -inf never enters
        n = 0
        for b in range(n_blocks):
            m = block_max[b]
            if not (m > t or (m == t and not strict)):
                continue
            for j in range(b * block, min((b + 1) * block, n_cols)):
                x = row[j]
                if x > t or (x == t and not strict):
                    bv[n], bi[n] = x, j
                    n += 1
                    if n == cap:
                        t = _keep_best(bv, bi, n, k)
                        strict = True
                        n = k
        if n > k:
            _keep_best(bv, bi, n, k)
            n = k
        order = np.argsort(-bv[:n], kind="mergesort")
        for p in range(n):
            out_val[r, p], out_idx[r, p] = bv[order[p]], bi[order[p]]
        p = n
        j = 0
        while p < k:  # too few finite scores: the lowest -inf / NaN columns
            x = row[j]
            if not x > neg_inf:
                out_val[r, p], out_idx[r, p] = neg_inf, j
                p += 1
            j += 1


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the indices and values of the `k` largest scores, best first (batched).

    Ties are broken by the lower index, so the answer depends on the scores alone (not on the
    matrix layout, e.g. when a caller selects among a subset of columns). Rows with fewer than
    `k` finite scores end with ``-inf`` entries, which callers drop.
    """
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    dtype = scores.dtype if scores.dtype in (np.float32, np.float64) else np.float64
    idx = np.empty((n_rows, max(k, 0)), np.int64)
    val = np.empty((n_rows, max(k, 0)), dtype)
    if k > 0 and n_rows:
        top_k_rows(np.ascontiguousarray(scores, dtype=dtype), k, idx, val)
    return idx, val


@njit(cache=True, nogil=True)
def _sparse_top_k_rows(
    indptr, indices, data, seen_indptr, seen_indices, masked, k, out_idx, out_val
):
    """`top_k_rows` of the dense rows a CSR matrix of non-negative scores stands for (zero
    where nothing is stored), with each row's `seen` columns and the `masked` columns at -inf:
    the stored positive scores best first (ties by the lower column), then zeros in column
    order, then -inf columns in column order."""
    n_rows = len(indptr) - 1
    n_cols = len(masked)
    taken = np.zeros(n_cols, np.bool_)
    blocked = masked.copy()
    longest = 0
    for r in range(n_rows):
        longest = max(longest, indptr[r + 1] - indptr[r])
    vals = np.empty(longest, data.dtype)
    cols = np.empty(longest, np.int64)
    for r in range(n_rows):
        for p in range(seen_indptr[r], seen_indptr[r + 1]):
            blocked[seen_indices[p]] = True
        n = 0
        for p in range(indptr[r], indptr[r + 1]):  # columns ascending
            j = indices[p]
            if data[p] > 0 and not blocked[j]:
                vals[n], cols[n] = data[p], j
                n += 1
        if n > 2 * k:  # keep the entries reaching the k-th best (ties too), in column order
            kth = np.partition(vals[:n], n - k)[n - k]
            m = 0
            for q in range(n):
                if vals[q] >= kth:
                    vals[m], cols[m] = vals[q], cols[q]
                    m += 1
            n = m
        order = np.argsort(-vals[:n], kind="mergesort")  # stable: ties by the lower column
        m = min(n, k)
        for q in range(m):
            out_val[r, q], out_idx[r, q] = vals[order[q]], cols[order[q]]
            taken[cols[order[q]]] = True
        j = 0
        while m < k and j < n_cols:  # then the zeros, lowest columns first
            if not blocked[j] and not taken[j]:
                out_val[r, m], out_idx[r, m] = 0, j
                m += 1
            j += 1
        j = 0
        while m < k:  # then the -inf columns
            if blocked[j]:
                out_val[r, m], out_idx[r, m] = -np.inf, j
                m += 1
            j += 1
        for q in range(min(n, k)):
            taken[out_idx[r, q]] = False
        for p in range(seen_indptr[r], seen_indptr[r + 1]):
            blocked[seen_indices[p]] = masked[seen_indices[p]]


def sparse_top_k(
    scores: sp.csr_matrix, k: int, seen: sp.csr_matrix, masked: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` of ``scores.toarray()`` with ``seen``'s stored entries (row by row) and the
    ``masked`` columns (all rows) set to -inf, without building the dense block.

    `scores` must be non-negative (a history times a similarity, say): what is not stored is
    a score of 0. The answer is the same as the dense path's, ties included.
    """
    scores = scores.tocsr()
    scores.sort_indices()
    if scores.nnz and scores.data.min() < 0:
        raise ValueError("sparse_top_k needs non-negative scores")
    n_rows, n_cols = scores.shape
    k = min(k, n_cols)
    dtype = scores.dtype if scores.dtype in (np.float32, np.float64) else np.float64
    idx = np.empty((n_rows, max(k, 0)), np.int64)
    val = np.empty((n_rows, max(k, 0)), dtype)
    if k > 0 and n_rows:
        seen = seen.tocsr()
        _sparse_top_k_rows(
            scores.indptr.astype(np.int64),
            scores.indices.astype(np.int64),
            scores.data.astype(dtype),
            seen.indptr.astype(np.int64),
            seen.indices.astype(np.int64),
            np.asarray(masked, dtype=np.bool_),
            k,
            idx,
            val,
        )
    return idx, val


@njit(cache=True, nogil=True)
def _csr_lookup(indptr, indices, data, rows, cols, out):
    for i in range(len(rows)):
        lo, hi = indptr[rows[i]], indptr[rows[i] + 1]
        p = lo + np.searchsorted(indices[lo:hi], cols[i])
        out[i] = data[p] if p < hi and indices[p] == cols[i] else 0


def csr_values(m: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``m.toarray()[rows, cols]`` (aligned arrays) by binary search in sorted rows."""
    m = m.tocsr()
    m.sort_indices()
    out = np.empty(len(rows), m.dtype)
    _csr_lookup(
        m.indptr.astype(np.int64),
        m.indices.astype(np.int64),
        m.data,
        np.asarray(rows, np.int64),
        np.asarray(cols, np.int64),
        out,
    )
    return out


@njit(cache=True, nogil=True)
def _best_rows_per_user(starts, score, k, keep, rank):
    """Per user segment ``starts[u]:starts[u + 1]``: its rows ordered by score descending,
    ties in row order (a stable sort of the segment; NaN last), the first `k` written to
    `keep` / `rank` from the segment's output offset; returns how many were written."""
    m = 0
    for u in range(len(starts) - 1):
        lo, hi = starts[u], starts[u + 1]
        if hi == lo:
            continue
        order = np.argsort(-score[lo:hi], kind="mergesort")
        for j in range(min(k, hi - lo)):
            keep[m] = lo + order[j]
            rank[m] = j
            m += 1
    return m


def best_rows_per_user(
    user_pos: np.ndarray, score: np.ndarray, n_users: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, rank): each user's `k` best rows by `score` (ties: the earlier row first, NaN
    last), ordered by user then rank, of rows sorted by `user_pos` (candidate rows as built,
    by user then item): the rows at rank < k of ``np.lexsort((rows, -score, user_pos))``
    (tested), each user's segment sorted alone instead of all rows (1M rows of 3,000 users:
    0.05 s, against 0.16 s for the two stable sorts of all rows it replaces)."""
    user_pos = np.asarray(user_pos, dtype=np.int64)
    starts = np.searchsorted(user_pos, np.arange(n_users + 1)).astype(np.int64)
    keep = np.empty(min(len(user_pos), max(k, 0) * n_users), np.int64)
    rank = np.empty(len(keep), np.int64)
    if len(keep):
        m = _best_rows_per_user(starts, np.ascontiguousarray(score, np.float64), k, keep, rank)
        keep, rank = keep[:m], rank[:m]
    return keep, rank

"""Item-item shrunk-cosine neighbours, one item row at a time (compiled, GIL-free).

What :class:`~recsys.models.cooccurrence.CooccurrenceRecommender` learns: per item i, the
``neighbors`` items j with the highest ``cos(i, j) + buy_weight * cos_buy(i, j)``, where
``cos(i, j) = c_ij / (sqrt(n_i n_j) + shrink)`` over binary user histories (``c_ij`` users of
both, ``n_i`` users of i) and ``cos_buy`` the same over add-to-cart / purchase histories.

A sparse product X'X materialises every co-occurring pair (tens of millions) before the rows
are pruned to their neighbours. Here each row is accumulated in a dense scratch array over the
users of i and their items, divided, pruned and written at once, for several shrinks in the
same pass (a tuning grid counts once). The arithmetic is numpy's float32 on the same counts:
each operation is done in float64 and rounded to float32, which gives the same float32 result
for +, -, *, / and sqrt; ties go to the lower column. So the neighbours are those of
``prune_rows(shrunk_cosine(...) + buy_weight * shrunk_cosine(...), neighbors)``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from numba import njit

from recsys.models.threads import map_in_threads


@njit(cache=True, nogil=True)
def _count(i, i_ptr, i_users, u_ptr, u_items, acc, mark, touched, nt):
    """Add item i's co-occurrence counts into ``acc``; new columns go to ``touched``."""
    for p in range(i_ptr[i], i_ptr[i + 1]):
        u = i_users[p]
        for q in range(u_ptr[u], u_ptr[u + 1]):
            j = u_items[q]
            if j == i:
                continue
            if not mark[j]:
                mark[j] = True
                touched[nt] = j
                nt += 1
            acc[j] += 1.0
    return nt


@njit(cache=True, nogil=True)
def _cos(c, ni, nj, shrink):
    """float32 ``c / (sqrt(ni * nj) + shrink)``, rounded as numpy's float32 does."""
    prod = np.float32(ni * nj)
    den = np.float32(np.float32(math.sqrt(prod)) + shrink)
    return np.float32(c / den)


@njit(cache=True, nogil=True)
def neighbour_rows(
    lo, hi, i_ptr, i_users, u_ptr, u_items, n,
    has_buy, bi_ptr, bi_users, bu_ptr, bu_items, nb,
    buy_weight, shrinks, k, out_cols, out_vals, out_len,
):  # fmt: skip
    """Rows lo..hi-1: for each shrink s, ``out_cols[s, i, :out_len[s, i]]`` (ascending) and
    ``out_vals`` hold item i's top-k neighbours."""
    n_items = len(i_ptr) - 1
    acc = np.zeros(n_items, np.float32)
    acc_buy = np.zeros(n_items, np.float32)
    mark = np.zeros(n_items, np.bool_)
    touched = np.empty(n_items, np.int64)
    vals = np.empty(n_items, np.float32)
    for i in range(lo, hi):
        nt = _count(i, i_ptr, i_users, u_ptr, u_items, acc, mark, touched, 0)
        if has_buy:
            nt = _count(i, bi_ptr, bi_users, bu_ptr, bu_items, acc_buy, mark, touched, nt)
        cols = np.sort(touched[:nt])
        for s in range(len(shrinks)):
            shrink = shrinks[s]
            for t in range(nt):
                j = cols[t]
                v = np.float32(0.0)
                if acc[j] > 0:
                    v = _cos(acc[j], n[i], n[j], shrink)
                if has_buy and acc_buy[j] > 0:
                    w = np.float32(buy_weight * _cos(acc_buy[j], nb[i], nb[j], shrink))
                    v = np.float32(v + w) if acc[j] > 0 else w
                vals[t] = v
            m = 0
            if nt <= k:
                for t in range(nt):
                    out_cols[s, i, m], out_vals[s, i, m] = cols[t], vals[t]
                    m += 1
            else:  # the k largest, ties to the lower columns, kept in column order
                kth = np.partition(vals[:nt].copy(), nt - k)[nt - k]
                ties = k
                for t in range(nt):
                    if vals[t] > kth:
                        ties -= 1
                for t in range(nt):
                    v = vals[t]
                    if v > kth or (v == kth and ties > 0):
                        if v == kth:
                            ties -= 1
                        out_cols[s, i, m], out_vals[s, i, m] = cols[t], v
                        m += 1
            out_len[s, i] = m
        for t in range(nt):
            j = touched[t]
            acc[j] = 0.0
            acc_buy[j] = 0.0
            mark[j] = False


def _structure(x: sp.csr_matrix) -> tuple[np.ndarray, ...]:
    """(user indptr, items, item indptr, users, users per item as float32) of the stored
    entries of `x` (each one interaction, whatever its value). The items are `x`'s own index
    array, read in place; the pointers are int64 (a count of entries may pass 2**31), the
    indices scipy's (int32 below 2**31 rows and columns): a pass over the dataset holds its
    transpose beside it, not three int64 copies of every entry."""
    x = x.tocsr()
    t = x.tocsc()
    n = np.diff(t.indptr).astype(np.float32)
    return (x.indptr.astype(np.int64), x.indices, t.indptr.astype(np.int64), t.indices, n)


def shrunk_cosine_neighbours(
    x: sp.csr_matrix,
    buy: sp.csr_matrix | None,
    buy_weight: float,
    shrinks: list[float],
    neighbors: int,
    workers: int = 2,
) -> list[sp.csr_matrix]:
    """One (items x items) float32 CSR of top-`neighbors` similarities per shrink, from the
    user histories `x` and (when given, with `buy_weight`) `buy`. `workers` threads take
    halves of the rows; the result does not depend on it."""
    n_items = x.shape[1]
    k = max(0, min(int(neighbors), n_items))
    u_ptr, u_items, i_ptr, i_users, n = _structure(x)
    has_buy = buy is not None and buy.nnz > 0 and buy_weight != 0
    bu_ptr, bu_items, bi_ptr, bi_users, nb = _structure(buy if has_buy else x[:0])
    s32 = np.asarray(shrinks, np.float32)
    out_cols = np.empty((len(s32), n_items, max(k, 1)), np.int32)
    out_vals = np.empty((len(s32), n_items, max(k, 1)), np.float32)
    out_len = np.zeros((len(s32), n_items), np.int64)
    if k > 0 and n_items:
        bounds = np.linspace(0, n_items, max(workers, 1) * 4 + 1).astype(np.int64)

        def rows(span):
            neighbour_rows(
                span[0], span[1], i_ptr, i_users, u_ptr, u_items, n,
                has_buy, bi_ptr, bi_users, bu_ptr, bu_items, nb,
                np.float32(buy_weight), s32, k, out_cols, out_vals, out_len,
            )  # fmt: skip

        map_in_threads(rows, zip(bounds[:-1], bounds[1:], strict=True), workers)
    out = []
    for s in range(len(s32)):
        lens = out_len[s]
        keep = np.arange(out_cols.shape[2])[None, :] < lens[:, None]
        indptr = np.zeros(n_items + 1, np.int64)
        np.cumsum(lens, out=indptr[1:])
        out.append(
            sp.csr_matrix((out_vals[s][keep], out_cols[s][keep], indptr), shape=(n_items, n_items))
        )
    return out

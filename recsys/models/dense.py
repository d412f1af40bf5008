"""Dense scores ``u @ v.T`` that do not depend on the batch a user is scored in (compiled).

A float32 matrix product from BLAS sums each entry in an order that depends on where its row
falls in the kernel's tiles: OpenBLAS's sgemm on an AMD EPYC (its Haswell kernels) gives a
different last bit for ~2-20 % of the entries of one user's row when the user is scored in
a batch of 1, 3, 16 or 150. Candidate rows, served lists and sharded snapshots are meant to
be the same whatever the batches (the tests say so), so LightFM's scores come from here:
each entry is ``((u0 v0 + u1 v1) + u2 v2) + ...`` in float32, in factor order, whatever the
batch, the row's place in it, or the machine. Users go eight at a time over blocks of items
(each load of an item's factor serves the eight; each user's sums are its own).

The price (`benchmarks/dense_scores.py`, one thread): 512 users x 100,000 items x 32 factors
take 0.27 s of CPU against sgemm's 0.065 s, ~0.4 ms more a user scored against 100k items
(~0.1 ms against the 1M demo's 25k). A register-blocked kernel, as BLAS's are, would close
most of it; Numba does not keep an array of partial sums in registers.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_ROWS = 8  # users a group: each load of an item's factor serves eight sums
_ITEMS = 256  # items a block: the group's partial sums stay in L1


@njit(cache=True, nogil=True)
def _dot_rows(u, vt, out):
    """``out[r, i] = sum_k u[r, k] * vt[k, i]``, summed in k order, one rounding a step."""
    m, k_n = u.shape
    n = vt.shape[1]
    acc = np.empty((_ROWS, _ITEMS), np.float32)
    for r0 in range(0, m - m % _ROWS, _ROWS):
        for lo in range(0, n, _ITEMS):
            w = min(_ITEMS, n - lo)
            for r in range(_ROWS):
                a = u[r0 + r, 0]
                for i in range(w):
                    acc[r, i] = a * vt[0, lo + i]
            for k in range(1, k_n):
                a0, a1, a2, a3 = u[r0, k], u[r0 + 1, k], u[r0 + 2, k], u[r0 + 3, k]
                a4, a5, a6, a7 = u[r0 + 4, k], u[r0 + 5, k], u[r0 + 6, k], u[r0 + 7, k]
                for i in range(w):
                    v = vt[k, lo + i]
                    acc[0, i] += a0 * v
                    acc[1, i] += a1 * v
                    acc[2, i] += a2 * v
                    acc[3, i] += a3 * v
                    acc[4, i] += a4 * v
                    acc[5, i] += a5 * v
                    acc[6, i] += a6 * v
                    acc[7, i] += a7 * v
            for r in range(_ROWS):
                for i in range(w):
                    out[r0 + r, lo + i] = acc[r, i]
    for row in range(m - m % _ROWS, m):  # the last rows, one at a time: the same sums
        for lo in range(0, n, _ITEMS):
            w = min(_ITEMS, n - lo)
            a = u[row, 0]
            for i in range(w):
                acc[0, i] = a * vt[0, lo + i]
            for k in range(1, k_n):
                a = u[row, k]
                for i in range(w):
                    acc[0, i] += a * vt[k, lo + i]
            for i in range(w):
                out[row, lo + i] = acc[0, i]


def dot_scores(user_vectors: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
    """(users x items) float32 ``user_vectors @ item_vectors.T``, each entry summed in factor
    order: the same bits for a user whatever else is in the batch (see the module docstring).
    Releases the GIL."""
    u = np.ascontiguousarray(user_vectors, dtype=np.float32)
    vt = np.ascontiguousarray(np.asarray(item_vectors, dtype=np.float32).T)
    out = np.empty((u.shape[0], vt.shape[1]), np.float32)
    if u.shape[1] == 0:
        out[:] = 0.0
    elif out.size:
        _dot_rows(u, vt, out)
    return out

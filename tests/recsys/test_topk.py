"""The compiled per-row top-k against a full stable sort, on inputs whose answer is known."""

import numpy as np
import pytest

from recsys.models.topk import top_k


def reference(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row fully sorted by score descending, then column; NaN as -inf."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    k = min(k, s.shape[1])
    cols = np.arange(s.shape[1])
    order = np.array([np.lexsort((cols, -row))[:k] for row in s]).reshape(len(s), k)
    return order, np.take_along_axis(s, order, axis=1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_a_full_stable_sort_with_ties_infinities_and_nan(dtype):
    rng = np.random.default_rng(7)
    for trial in range(400):
        n_rows, n_cols = int(rng.integers(1, 30)), int(rng.integers(1, 700))
        k = int(rng.integers(1, n_cols + 5))  # also k >= the number of columns
        if trial % 3 == 0:  # many ties: small integers
            s = rng.integers(0, 6, (n_rows, n_cols)).astype(dtype)
        else:
            s = rng.standard_normal((n_rows, n_cols)).astype(dtype)
        s[rng.random(s.shape) < rng.choice([0.0, 0.3, 0.97])] = -np.inf
        s[rng.random(s.shape) < 0.02] = np.nan
        if trial % 7 == 0:
            s[:, : n_cols // 2] = np.inf
        idx, val = top_k(s, k)
        want_idx, want_val = reference(s, k)
        assert val.dtype == dtype
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(val, want_val)


def test_sorted_input_and_degenerate_shapes():
    rising = np.arange(5000, dtype=np.float32)[None, :].repeat(3, axis=0)
    idx, val = top_k(rising, 4)
    np.testing.assert_array_equal(idx, [[4999, 4998, 4997, 4996]] * 3)
    np.testing.assert_array_equal(val, idx.astype(np.float32))
    assert top_k(np.zeros((0, 10), np.float32), 3)[0].shape == (0, 3)
    assert top_k(np.zeros((2, 10), np.float32), 0)[0].shape == (2, 0)
    # integer input is scored as float64
    idx, val = top_k(np.array([[1, 3, 3, 0]]), 2)
    np.testing.assert_array_equal(idx, [[1, 2]])
    assert val.dtype == np.float64


def test_sparse_top_k_answers_like_the_dense_block():
    """Non-negative sparse scores (zero where unstored, explicit zeros too) with per-row seen
    and global masks: the same indices and values as `top_k` of the masked dense block."""
    import scipy.sparse as sp

    from recsys.models.topk import csr_values, sparse_top_k

    rng = np.random.default_rng(11)
    for trial in range(300):
        n_rows, n_cols = int(rng.integers(1, 25)), int(rng.integers(1, 400))
        k = int(rng.integers(1, n_cols + 5))
        density = rng.choice([0.0, 0.01, 0.1, 0.6])
        dense = np.where(rng.random((n_rows, n_cols)) < density, 0, 1.0)
        values = rng.integers(0, 4, dense.shape) if trial % 2 else rng.random(dense.shape)
        dense = (dense == 0) * values.astype(np.float32)  # ties and explicit zeros
        scores = sp.csr_matrix(dense.astype(np.float32))
        if trial % 5 == 0:
            scores.data[: scores.nnz // 2] = 0  # stored zeros count as zeros
        seen = sp.csr_matrix(rng.random((n_rows, n_cols)) < rng.choice([0.0, 0.2, 0.9]))
        masked = rng.random(n_cols) < rng.choice([0.0, 0.1, 0.95])
        block = scores.toarray()
        block[seen.toarray()] = -np.inf
        block[:, masked] = -np.inf
        idx, val = sparse_top_k(scores, k, seen, masked)
        want_idx, want_val = top_k(block, k)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_array_equal(val, want_val)
        rows = rng.integers(0, n_rows, 50)
        cols = rng.integers(0, n_cols, 50)
        np.testing.assert_array_equal(csr_values(scores, rows, cols), scores.toarray()[rows, cols])
    with pytest.raises(ValueError, match="non-negative"):
        sparse_top_k(sp.csr_matrix(-np.ones((1, 2))), 1, sp.csr_matrix((1, 2)), np.zeros(2, bool))


def test_best_rows_per_user_are_the_first_ranks_of_the_lexsort():
    """Candidate rows sorted by user (as built): each user's k best rows, ties by the earlier
    row, NaN after -inf, exactly the rows at rank < k of the lexsort of all rows; users with
    no row, fewer rows than k, and k = 0."""
    from recsys.models.topk import best_rows_per_user

    rng = np.random.default_rng(5)
    for _ in range(300):
        n_users, n_rows = int(rng.integers(1, 40)), int(rng.integers(0, 1500))
        k = int(rng.integers(0, 40))
        pos = np.sort(rng.integers(0, n_users, n_rows))
        score = rng.integers(0, 5, n_rows).astype(float)  # many ties
        score[rng.random(n_rows) < 0.1] = -np.inf
        score[rng.random(n_rows) < 0.1] = np.nan
        order = np.lexsort((np.arange(n_rows), -score, pos))
        rank = np.arange(n_rows) - np.searchsorted(pos[order], np.arange(n_users))[pos[order]]
        rows, got_rank = best_rows_per_user(pos, score, n_users, k)
        np.testing.assert_array_equal(rows, order[rank < k])
        np.testing.assert_array_equal(got_rank, rank[rank < k])

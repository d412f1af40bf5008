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

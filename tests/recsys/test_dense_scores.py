"""LightFM's dense scores: each entry summed in factor order, whatever the batch."""

import numpy as np
import pytest

from recsys.models.dense import dot_scores


def _in_factor_order(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The plain path: ((u0 v0 + u1 v1) + u2 v2) + ..., each step a float32 rounding."""
    s = u[:, :1] * v[:, 0][None, :]
    for k in range(1, u.shape[1]):
        s = s + u[:, k : k + 1] * v[:, k][None, :]
    return s


@pytest.mark.parametrize(("users", "items", "factors"), [(150, 40, 32), (9, 1100, 7), (5, 3, 1)])
def test_dot_scores_sum_in_factor_order_whatever_the_batch(users, items, factors):
    rng = np.random.default_rng(users)
    u = rng.standard_normal((users, factors)).astype(np.float32)
    v = rng.standard_normal((items, factors)).astype(np.float32)
    want = _in_factor_order(u, v)
    got = dot_scores(u, v)
    assert got.dtype == np.float32 and got.shape == (users, items)
    np.testing.assert_array_equal(got, want)
    for batch in (1, 3, 7, 8, 9, 16, 64):  # a user's row whatever else is scored beside it
        rows = np.vstack([dot_scores(u[s : s + batch], v) for s in range(0, users, batch)])
        np.testing.assert_array_equal(rows, want)
    picked = np.array([users - 1, 0, users // 2])
    np.testing.assert_array_equal(dot_scores(u[picked], v), want[picked])
    np.testing.assert_allclose(got, u.astype(np.float64) @ v.T.astype(np.float64), atol=1e-4)


def test_dot_scores_of_no_users_no_items_or_no_factors():
    assert dot_scores(np.zeros((0, 4), np.float32), np.ones((3, 4), np.float32)).shape == (0, 3)
    assert dot_scores(np.ones((2, 4), np.float32), np.zeros((0, 4), np.float32)).shape == (2, 0)
    np.testing.assert_array_equal(
        dot_scores(np.ones((2, 0), np.float32), np.ones((3, 0), np.float32)), np.zeros((2, 3))
    )

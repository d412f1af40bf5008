"""The precompute kernel equals a brute-force top-N."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.snapshot.scoring import TopNScorer, csr_from_pairs, top_n


def brute_force(uf, itf, bias, n, seen_pairs, exclude):
    s = uf @ itf.T + bias
    s[:, exclude] = -np.inf
    for u, i in seen_pairs:
        s[u, i] = -np.inf
    order = np.argsort(-s, axis=1, kind="stable")[:, :n]
    scores = np.take_along_axis(s, order, axis=1)
    pad = n - order.shape[1]  # fewer items than n: the kernel pads with -1 / -inf
    return np.pad(order, ((0, 0), (0, pad)), constant_values=-1), np.pad(
        scores, ((0, 0), (0, pad)), constant_values=-np.inf
    )


@pytest.mark.parametrize(
    "n_users, n_items, dim, n, block",
    [(50, 3000, 8, 20, 16), (37, 999, 5, 30, 64), (20, 40, 4, 10, 7), (9, 25, 3, 50, 4)],
)
def test_top_n_equals_brute_force(rng, n_users, n_items, dim, n, block) -> None:
    uf = rng.standard_normal((n_users, dim)).astype(np.float32)
    itf = rng.standard_normal((n_items, dim)).astype(np.float32)
    bias = rng.standard_normal(n_items).astype(np.float32)
    exclude = rng.random(n_items) < 0.1
    rows = rng.integers(0, n_users, 4 * n_users)
    cols = rng.integers(0, n_items, rows.shape[0])
    seen = csr_from_pairs(rows, cols, n_users)
    items, scores = top_n(uf, itf, n, item_bias=bias, seen=seen, exclude=exclude, block_size=block)
    ref_items, ref_scores = brute_force(uf, itf, bias, n, zip(rows, cols, strict=True), exclude)

    assert items.shape == scores.shape == (n_users, n) and items.dtype == np.int32
    finite = np.isfinite(ref_scores)
    np.testing.assert_allclose(scores[finite], ref_scores[finite], rtol=1e-5, atol=1e-5)
    assert (items[~finite] == -1).all() and np.isneginf(scores[~finite]).all()
    for u in range(n_users):  # same sets (ties in float could reorder equal scores)
        assert set(items[u][finite[u]].tolist()) == set(ref_items[u][finite[u]].tolist())
        assert not set(items[u].tolist()) & set(cols[rows == u].tolist())
        assert not exclude[items[u][items[u] >= 0]].any()
    assert all((np.diff(row[np.isfinite(row)]) <= 0).all() for row in scores)


def test_grouped_path_is_used_for_large_catalogues() -> None:
    scorer = TopNScorer(np.zeros((20_000, 4), np.float32), 200)
    assert scorer.groups == 10 and scorer.width == 2000
    assert TopNScorer(np.zeros((100, 4), np.float32), 200).groups == 1


def test_iter_blocks_streams_rows_in_order(rng) -> None:
    uf = rng.standard_normal((70, 4)).astype(np.float32)
    itf = rng.standard_normal((500, 4)).astype(np.float32)
    scorer = TopNScorer(itf, 5, block_size=32, threads=1)
    starts = [a for a, _, _ in scorer.iter_blocks(uf)]
    assert starts == [0, 32, 64]
    whole, _ = top_n(uf, itf, 5, block_size=70)
    parts = np.concatenate([i for _, i, _ in scorer.iter_blocks(uf)])
    np.testing.assert_array_equal(parts, whole)

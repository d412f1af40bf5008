"""The served list beats the baselines on MovieLens 100K (the benchmark's bar, as a test)."""

import pytest

from recsys.adapters import movielens_100k
from recsys.evaluation.offline import evaluate_offline


@pytest.mark.realdata
@pytest.mark.slow
def test_served_beats_ease_and_popularity_on_ml100k(shared_data):
    events, items, users = movielens_100k(str(shared_data / "ml-100k"))
    table = evaluate_offline(events, items, users, n_resamples=100).table
    ndcg = dict(zip(table["model"], table["NDCG@10"], strict=True))
    assert ndcg["popularity"] == pytest.approx(0.149, abs=0.005)
    assert ndcg["served"] >= 1.05 * max(ndcg["EASE"], ndcg["popularity"])

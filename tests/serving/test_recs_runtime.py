"""The /v1/recs runtime routes on the tiny snapshots of serving_helpers (known answers), plus a
snapshot with hand-set factors for score, embeddings/search and embeddings/{id}."""

from __future__ import annotations

import os

import numpy as np
import pytest
from serving_helpers import auth, build_client, make_config, write_tiny_snapshot

from recsys.snapshot import SnapshotStore


def test_predict_maps_onto_the_engine(client):
    resp = client.simulate_post(
        "/v1/recs/predict", headers=auth(), json={"user_id": "u1", "limit": 3, "explain": True}
    )
    assert resp.status_code == 200
    body = resp.json
    assert [i["item_id"] for i in body["items"]] == ["a0", "a1", "a3"]  # a2 unavailable
    assert body["model"] == "tiny@1" and body["items"][0]["explain"]["signals"]
    assert body["items"][0]["reason"] and body["request_id"]
    excl = client.simulate_post(
        "/v1/recs/predict",
        headers=auth(),
        json={"user_id": "u1", "limit": 2, "exclude_ids": ["a0"], "return_scores": False},
    )
    assert [i["item_id"] for i in excl.json["items"]] == ["a1", "a3"]
    assert "score" not in excl.json["items"][0]
    tagged = client.simulate_post(
        "/v1/recs/predict",
        headers=auth(),
        json={"user_id": "u1", "limit": 2, "filters": {"tags": ["winter"]}},
    )
    assert [i["item_id"] for i in tagged.json["items"]] == ["a3", "a4"]


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "u1", "novelty": 0.5},
        {"user_id": "u1", "filter_query": "price < 10"},
        {"user_id": "u1", "novelty": None},
        {"user_id": "u1", "strategy": "graph"},
        {"user_id": "u1", "model": "other@9"},
    ],
)
def test_options_the_engine_cannot_honour_are_422(client, body):
    resp = client.simulate_post("/v1/recs/predict", headers=auth(), json=body)
    assert resp.status_code == 422 and resp.json["code"] == "RECSYS_UNSUPPORTED_OPTION"


@pytest.mark.parametrize(
    "body,field",
    [
        ({"user_id": "u1", "filters": {"price_max": 150}}, "unknown field `price_max`"),
        ({"user_id": "u1", "diversity": 0.3}, "`body.diversity`"),
        ({"user_id": "u1", "strategy": "psychic"}, "`body.strategy`"),
        ({"user_id": "u1", "limit": 0}, "`body.limit`"),
        ({"user_id": "u1", "context": {"session_id": 7}}, "context.session_id"),
    ],
)
def test_bodies_outside_the_schema_are_400_naming_the_field(client, body, field):
    resp = client.simulate_post("/v1/recs/predict", headers=auth(), json=body)
    assert resp.status_code == 400 and field in resp.json["detail"], resp.json


def test_users_route_realtime_and_batch(client):
    top = client.simulate_get("/v1/recs/users/u1", params={"limit": 2}, headers=auth())
    assert [i["item_id"] for i in top.json["items"]] == ["a0", "a1"]
    assert (
        client.simulate_get(
            "/v1/recs/users/u1", params={"fresh": "true"}, headers=auth()
        ).status_code
        == 422
    )
    rt = client.simulate_post(
        "/v1/recs/users/u1/realtime", headers=auth(), json={"limit": 1, "exclude_ids": ["a0"]}
    )
    assert [i["item_id"] for i in rt.json["items"]] == ["a1"]
    cold = client.simulate_get("/v1/recs/users/nobody", params={"limit": 2}, headers=auth())
    assert [i["item_id"] for i in cold.json["items"]] == ["a8", "a9"]  # popular fallback
    batch = client.simulate_post(
        "/v1/recs/batch/predict",
        headers=auth(),
        json={"requests": [{"user_id": "u1", "limit": 1}, {"user_id": "u1", "novelty": 1}]},
    )
    assert [r["status"] for r in batch.json["results"]] == [200, 422]
    assert batch.json["results"][0]["result"]["items"][0]["item_id"] == "a0"
    globex = client.simulate_get("/v1/recs/users/u1", params={"limit": 2}, headers=auth("globex"))
    assert all(i["item_id"].startswith("g") for i in globex.json["items"])


def test_related_strategies(client):
    content = client.simulate_get(
        "/v1/recs/item/a0/related", params={"strategy": "content", "limit": 3}, headers=auth()
    )
    assert [i["item_id"] for i in content.json["items"]] == ["a3", "a4", "a5"]
    co = client.simulate_get(
        "/v1/recs/item/a0/related", params={"strategy": "co_buy", "limit": 2}, headers=auth()
    )
    assert [i["item_id"] for i in co.json["items"]] == ["a5", "a6"]
    assert any(w["code"] == "COOCCURRENCE" for w in co.json["warnings"])
    assert (
        client.simulate_get(
            "/v1/recs/item/a0/related", params={"strategy": "x"}, headers=auth()
        ).status_code
        == 400
    )


@pytest.fixture()
def factor_client(tmp_path):
    """acme with factors: item i has factor (1, i/10), user u1 (0, 1): score = i/10 + bias 0."""
    root = str(tmp_path)
    store = SnapshotStore(os.path.join(root, "snapshots", "acme"))
    tmp = store.new_tmp_dir()
    items = np.stack([np.ones(20), np.arange(20) / 10], axis=1).astype(np.float32)
    users = np.array([[0, 1], [1, 0], [1, 1]], dtype=np.float32)
    import serving_helpers

    orig = serving_helpers.write_snapshot

    def with_factors(*a, **kw):
        return orig(*a, factors=(users, items, np.zeros(20, dtype=np.float32)), **kw)

    serving_helpers.write_snapshot = with_factors
    try:
        write_tiny_snapshot(tmp, "acme", "a")
    finally:
        serving_helpers.write_snapshot = orig
    store.publish(tmp, checksums=False, prune=False)
    return build_client(make_config(root))


def test_score_orders_candidates_by_the_stored_factors(factor_client):
    resp = factor_client.simulate_post(
        "/v1/recs/score",
        headers=auth(),
        json={"user_id": "u1", "candidates": ["a3", {"item_id": "a12"}, "zzz", "a7"]},
    )
    assert resp.status_code == 200
    assert [(i["item_id"], i["score"]) for i in resp.json["items"]] == [
        ("a12", 1.2),
        ("a7", 0.7),
        ("a3", 0.3),
        ("zzz", None),
    ]
    assert (
        factor_client.simulate_post(
            "/v1/recs/score", headers=auth(), json={"user_id": "nobody", "candidates": ["a1"]}
        ).status_code
        == 404
    )


def test_embedding_search_is_exact_knn_with_filters(factor_client):
    dot = factor_client.simulate_post(
        "/v1/recs/embeddings/search",
        headers=auth(),
        json={"vector": [0, 1], "k": 3, "metric": "dot"},
    )
    assert [i["item_id"] for i in dot.json["items"]] == ["a19", "a18", "a17"]
    c1 = factor_client.simulate_post(
        "/v1/recs/embeddings/search",
        headers=auth(),
        json={
            "vector": [0, 1],
            "k": 2,
            "metric": "dot",
            "filters": {"category": "c1", "available": True},
        },
    )
    assert [i["item_id"] for i in c1.json["items"]] == ["a7", "a6"]
    by_item = factor_client.simulate_post(
        "/v1/recs/embeddings/search", headers=auth(), json={"item_id": "a0", "k": 1}
    )
    assert by_item.json["items"][0]["item_id"] == "a1"  # nearest by cosine, itself excluded
    emb = factor_client.simulate_get("/v1/recs/embeddings/item:a5", headers=auth())
    assert emb.json["vector"] == [1.0, 0.5] and emb.json["dim"] == 2
    assert factor_client.simulate_get("/v1/recs/embeddings/user:u2", headers=auth()).json[
        "vector"
    ] == [1.0, 0.0]
    assert (
        factor_client.simulate_post(
            "/v1/recs/embeddings/search", headers=auth(), json={"vector": [1, 2, 3]}
        ).status_code
        == 422
    )

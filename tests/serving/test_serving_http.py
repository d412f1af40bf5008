"""HTTP behaviour: Problem Details everywhere, limits, headers, middleware, ops routes."""

from __future__ import annotations

import gzip
import re

import pytest
from serving_helpers import auth, build_client, make_config, recommend

from serving.config import RateLimitSpec


def assert_problem(resp, status, code=None):
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"] == "application/problem+json"
    body = resp.json
    assert set(body) >= {"type", "title", "status", "detail", "instance", "code", "request_id"}
    assert body["status"] == status and body["request_id"] == resp.headers["X-Request-Id"]
    if code:
        assert body["code"] == code
    return body


def test_routing_errors_are_problems(client):
    body = assert_problem(client.simulate_get("/nope", headers=auth()), 404)
    assert body["instance"] == "/nope"
    assert_problem(client.simulate_get("/v1/recommend", headers=auth()), 405)
    assert_problem(client.simulate_get("/nope"), 401)  # unknown routes are not probed without auth


@pytest.mark.parametrize(
    "body,status",
    [
        # the schema (400): types, ranges, unknown fields
        ({"k": 0, "user": {"user_id": "u1"}}, 400),
        ({"k": "5", "user": {"user_id": "u1"}}, 400),
        ({"user": {"user_id": "u1"}, "bogus": 1}, 400),
        ({"user": {"user_id": "u1"}, "weights": {"pop": -1}}, 400),
        ({"user": {"user_id": "u1"}, "weights": {"magic": 1}}, 400),
        ({"user": {"user_id": "u1"}, "candidates": {"exclude_ids": ["x"] * 10_001}}, 400),
        # the second pass (422): the server's and the tenant's limits, semantics
        ({"k": 201, "user": {"user_id": "u1"}}, 422),
        ({"user": {}}, 422),
        ({"user": {"user_id": "u1"}, "candidates": {"exclude_ids": ["x"] * 5001}}, 422),
        ({"user": {"user_id": "u1"}, "anchors": {"item_ids": ["x"] * 51}}, 422),
        ({"user": {"user_id": "u1"}, "weights": {"pop": 0}}, 422),
        (
            {
                "user": {"user_id": "u1"},
                "constraints": {"required_tags": ["a"], "forbidden_tags": ["a"]},
            },
            422,
        ),
        ({"user": {"user_id": "u1"}, "options": {"explain": "everything"}}, 400),
    ],
)
def test_invalid_requests(client, body, status):
    assert_problem(recommend(client, body), status)


def test_unknown_surface_when_tenant_declares_surfaces(client):
    client.simulate_put(
        "/v1/admin/tenants/acme/config",
        json={"surfaces": ["home", "pdp"]},
        headers=auth("acme", ("admin",)),
    )
    assert_problem(
        recommend(client, {"surface": "cart", "user": {"user_id": "u1"}}),
        422,
        "RECSYS_UNKNOWN_SURFACE",
    )
    assert recommend(client, {"surface": "home", "user": {"user_id": "u1"}}).status_code == 200


def test_media_type_size_and_json(client, data_root):
    resp = client.simulate_post(
        "/v1/recommend",
        body=b'{"user": {"user_id": "u1"}}',
        headers={**auth(), "Content-Type": "text/plain"},
    )
    assert_problem(resp, 415)
    resp = client.simulate_post(
        "/v1/recommend", body=b'{"user": ', headers={**auth(), "Content-Type": "application/json"}
    )
    assert_problem(resp, 400, "RECSYS_MALFORMED_JSON")
    small = build_client(make_config(data_root, max_body_bytes=100))
    resp = small.simulate_post(
        "/v1/recommend",
        json={"user": {"user_id": "u1"}, "context": {"x": "y" * 200}},
        headers=auth(),
    )
    assert_problem(resp, 413)


def test_deadline_gives_504(data_root):
    client = build_client(make_config(data_root, deadline_ms=0.0))
    assert_problem(recommend(client, {"user": {"user_id": "u1"}}), 504, "RECSYS_DEADLINE_EXCEEDED")


def test_rate_limit_headers_and_429(data_root):
    client = build_client(make_config(data_root, rate_limit=RateLimitSpec(3, 60)))
    for remaining in (2, 1, 0):
        resp = recommend(client, {"k": 1, "user": {"user_id": "u1"}})
        assert resp.status_code == 200
        assert resp.headers["RateLimit"].startswith(f'"key";r={remaining};t=')
        assert "RateLimit-Policy" in resp.headers and resp.headers["RateLimit"].startswith('"key"')
    resp = recommend(client, {"k": 1, "user": {"user_id": "u1"}})
    assert_problem(resp, 429, "RECSYS_RATE_LIMITED")
    assert int(resp.headers["Retry-After"]) > 0
    # another tenant has its own budget
    assert (
        recommend(client, {"k": 1, "user": {"user_id": "u1"}}, tenant="globex").status_code == 200
    )


def test_tenant_rate_limit_spans_keys(data_root):
    client = build_client(make_config(data_root, tenant_rate_limit=RateLimitSpec(2, 60)))
    assert recommend(client, {"user": {"user_id": "u1"}}).status_code == 200
    other_key = {"X-Api-Key": "acme-key-0123456789"}
    assert (
        client.simulate_post(
            "/v1/recommend", json={"user": {"user_id": "u1"}}, headers=other_key
        ).status_code
        == 200
    )
    resp = client.simulate_post(
        "/v1/recommend", json={"user": {"user_id": "u1"}}, headers=other_key
    )
    assert_problem(resp, 429)
    assert resp.headers["RateLimit"].startswith('"tenant"')


def test_request_id_and_traceparent(client):
    resp = recommend(
        client,
        {"k": 1, "user": {"user_id": "u1"}},
        headers={
            "X-Request-Id": "req-123",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=1",
        },
    )
    assert resp.headers["X-Request-Id"] == "req-123"
    assert resp.json["meta"]["request_id"] == "req-123"
    tp = resp.headers["traceparent"]
    assert tp.startswith("00-0af7651916cd43dd8448eb211c80319c-") and tp.endswith("-01")
    assert tp.split("-")[2] != "b7ad6b7169203331"
    assert resp.headers["tracestate"] == "vendor=1"
    fresh = client.simulate_get("/healthz", headers={"X-Request-Id": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f-]{36}", fresh.headers["X-Request-Id"])
    assert "traceparent" not in fresh.headers  # nothing to continue


def test_gzip_when_accepted(client):
    body = {
        "k": 8,
        "user": {"user_id": "u1"},
        "options": {"explain": "full", "include_trace": True},
    }
    plain = recommend(client, body)
    zipped = recommend(client, body, headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in plain.headers
    assert zipped.headers["Content-Encoding"] == "gzip"
    import orjson

    assert orjson.loads(gzip.decompress(zipped.content))["items"] == plain.json["items"]


def test_cors_for_configured_origins(client):
    ok = client.simulate_options(
        "/v1/recommend",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert ok.headers["Access-Control-Allow-Origin"] == "https://shop.example"
    assert "POST" in ok.headers["Access-Control-Allow-Methods"]
    other = recommend(
        client, {"k": 1, "user": {"user_id": "u1"}}, headers={"Origin": "https://evil.example"}
    )
    assert "Access-Control-Allow-Origin" not in other.headers


def test_ops_routes(client):
    assert client.simulate_get("/healthz").json == {"status": "ok"}
    ready = client.simulate_get("/readyz")
    assert ready.status_code == 200 and ready.json["status"] == "ready"
    assert set(ready.json["tenants"]) == {"acme", "globex"}
    version = client.simulate_get("/version").json
    assert version["service"] == "recsys-svc"
    recommend(
        client,
        {
            "k": 5,
            "user": {"user_id": "u1"},
            "constraints": {"forbidden_tags": ["shoes", "nike", "winter"]},
        },
    )
    text = client.simulate_get("/metrics").text
    assert 'recsys_http_requests_total{route="/v1/recommend",method="POST",status="200"} 1' in text
    assert (
        "recsys_http_request_duration_seconds_bucket"
        '{route="/v1/recommend",method="POST",status="200",le="+Inf"} 1' in text
    )
    assert re.search(r'recsys_snapshot_info\{tenant="acme",snapshot_id="[^"]+"\} 1', text)
    assert 'recsys_snapshot_age_seconds{tenant="acme"}' in text
    assert 'recsys_candidates_filtered_total{tenant="acme",reason="forbidden_tag"}' in text
    assert 'recsys_backfilled_items_total{tenant="acme",source="popular"}' in text
    docs = client.simulate_get("/docs")
    assert docs.status_code == 200 and "/v1/recommend" in docs.text


def test_not_ready_without_snapshots(tmp_path):
    client = build_client(make_config(str(tmp_path)))
    resp = client.simulate_get("/readyz")
    assert resp.status_code == 503 and resp.json["status"] == "not_ready"
    assert_problem(recommend(client, {"user": {"user_id": "u1"}}), 503, "RECSYS_NO_SNAPSHOT")


def test_unexpected_errors_are_500_problems(client, monkeypatch):
    from serving.service import RecommendService

    def boom(self, *args, **kwargs):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(RecommendService, "_recommend", boom)
    body = assert_problem(recommend(client, {"user": {"user_id": "u1"}}), 500, "RECSYS_INTERNAL")
    assert "kaboom" not in body["detail"]  # internals are logged, not leaked

"""Middleware and small parts on their own."""

from __future__ import annotations

import falcon
import pytest
from falcon import testing

from serving import errors
from serving.config import RateLimitSpec, ServingConfig, parse_api_keys
from serving.middleware import BodyLimitMiddleware, GzipMiddleware, RequestIdMiddleware
from serving.ratelimit import InProcessLimiter, RedisLimiter


class Echo:
    def on_get(self, req, resp):
        resp.media = {"request_id": req.context.request_id, "padding": "x" * 2000}

    def on_post(self, req, resp):
        resp.media = req.get_media()


def tiny_app(*middleware):
    app = falcon.App(middleware=list(middleware))
    errors.install(app, "https://errors.test/")
    app.add_route("/echo", Echo())
    return testing.TestClient(app)


def test_request_id_alone():
    client = tiny_app(RequestIdMiddleware())
    resp = client.simulate_get("/echo", headers={"X-Request-Id": "abc"})
    assert resp.json["request_id"] == "abc" and resp.headers["X-Request-Id"] == "abc"


def test_body_limit_alone():
    client = tiny_app(RequestIdMiddleware(), BodyLimitMiddleware(10))
    assert client.simulate_post("/echo", json={"a": 1}).status_code == 200
    resp = client.simulate_post("/echo", json={"a": "0123456789"})
    assert resp.status_code == 413 and resp.json["type"] == "https://errors.test/payload-too-large"


def test_gzip_alone():
    client = tiny_app(RequestIdMiddleware(), GzipMiddleware(100))
    assert (
        client.simulate_get("/echo", headers={"Accept-Encoding": "gzip"}).headers[
            "Content-Encoding"
        ]
        == "gzip"
    )
    assert "Content-Encoding" not in client.simulate_get("/echo").headers


def test_in_process_limiter_windows():
    now = [1000.0]
    limiter = InProcessLimiter(clock=lambda: now[0])
    spec = RateLimitSpec(2, 10)
    assert [limiter.hit("k", spec).allowed for _ in range(3)] == [True, True, False]
    now[0] += 10
    assert limiter.hit("k", spec).allowed


def test_in_process_limiter_counts_a_pair_like_two_hits():
    now = [1000.0]
    limiter = InProcessLimiter(clock=lambda: now[0])
    key_spec, tenant_spec = RateLimitSpec(2, 10), RateLimitSpec(3, 60)
    pairs = [limiter.hit_pair("k:a", key_spec, "t:a", tenant_spec) for _ in range(4)]
    assert [(k.allowed, t.allowed) for k, t in pairs] == [
        (True, True),
        (True, True),
        (False, True),
        (False, False),
    ]
    assert [(k.remaining, t.remaining) for k, t in pairs[:2]] == [(1, 2), (0, 1)]
    assert pairs[0][0].reset_s == 11 and pairs[0][1].reset_s == 21  # windows of 10 s and 60 s
    assert limiter.hit("t:a", tenant_spec).remaining == 0  # the same counters as hit()


def test_config_from_env():
    cfg = ServingConfig.from_env(
        {
            "RECSYS_DATA_ROOT": "/srv/data",
            "RECSYS_API_KEYS": "k1=acme:recommend+admin",
            "RECSYS_RATE_LIMIT": "5/1",
            "RECSYS_CORS_ORIGINS": "https://a, https://b",
            "RECSYS_ACCESS_LOG": "0",
        }
    )
    assert cfg.data_root == "/srv/data" and cfg.rate_limit == RateLimitSpec(5, 1)
    assert cfg.api_keys[0].tenant == "acme" and cfg.api_keys[0].scopes == {"recommend", "admin"}
    assert cfg.cors_origins == ("https://a", "https://b") and cfg.access_log is False
    assert ServingConfig.from_env({}).max_k == 200
    with pytest.raises(ValueError):
        parse_api_keys("nokey")


@pytest.mark.services
def test_redis_limiter_is_shared():
    redis = pytest.importorskip("redis")
    url = "redis://127.0.0.1:6379/15"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=0.5).ping()
    except redis.RedisError as e:
        pytest.skip(f"Redis at {url} unreachable ({e}); start one to run this test")
    import uuid

    key = f"test-{uuid.uuid4().hex}"
    spec = RateLimitSpec(3, 60)
    a, b = RedisLimiter(url), RedisLimiter(url)  # two workers
    decisions = [
        a.hit(key, spec).allowed,
        b.hit(key, spec).allowed,
        a.hit(key, spec).allowed,
        b.hit(key, spec).allowed,
    ]
    assert decisions == [True, True, True, False]
    # a pair is counted in one round trip, on the same shared counters
    k, t = a.hit_pair(key, spec, f"{key}-tenant", RateLimitSpec(5, 60))
    assert (k.allowed, k.remaining, t.allowed, t.remaining) == (False, 0, True, 4)
    assert b.hit(f"{key}-tenant", RateLimitSpec(5, 60)).remaining == 3


def test_redis_limiter_fails_open_to_in_process():
    limiter = RedisLimiter("redis://127.0.0.1:1/0")  # nothing listens on port 1
    spec = RateLimitSpec(1, 60)
    assert limiter.hit("k", spec).allowed and not limiter.hit("k", spec).allowed
    k, t = limiter.hit_pair("k", spec, "t", spec)
    assert not k.allowed and t.allowed

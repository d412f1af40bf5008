"""Middleware and small parts on their own."""

from __future__ import annotations

import math
from fractions import Fraction

import falcon
import pytest
from falcon import testing
from hypothesis import given, settings
from hypothesis import strategies as st

from serving import errors
from serving.config import RateLimitSpec, ServingConfig, parse_api_keys
from serving.middleware import BodyLimitMiddleware, GzipMiddleware, RequestIdMiddleware
from serving.ratelimit import HostLimiter, InProcessLimiter, RedisLimiter


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


@pytest.fixture(params=["in_process", "host"], scope="module")
def new_limiter(request, tmp_path_factory):
    """A new limiter of each kind on a clock of the test's: one process's, and the host's
    (a table file of its own each time)."""
    if request.param == "in_process":
        return lambda clock: InProcessLimiter(clock=clock)
    folder = tmp_path_factory.mktemp("limiters")
    files = iter(range(10**9))
    return lambda clock: HostLimiter(str(folder / f"{next(files)}.tats"), clock=clock)


def test_limiter_lets_a_burst_through_then_one_request_an_interval(new_limiter):
    now = [1000.0]
    limiter = new_limiter(lambda: now[0])
    spec = RateLimitSpec(3, 60)  # a burst of 3, then one every 20 s
    burst = [limiter.hit("k", spec) for _ in range(4)]
    assert [(d.allowed, d.remaining, d.reset_s) for d in burst] == [
        (True, 2, 20),
        (True, 1, 20),
        (True, 0, 20),
        (False, 0, 20),  # (Retry-After: the next request passes in 20 s)
    ]
    now[0] += 10
    assert limiter.hit("k", spec)[::3] == (False, 10)
    now[0] += 10
    assert limiter.hit("k", spec)[:3] == (True, 3, 0)
    assert not limiter.hit("k", spec).allowed
    now[0] += 60  # a whole window idle: the whole burst again
    assert [limiter.hit("k", spec).allowed for _ in range(4)] == [True, True, True, False]


def test_no_second_burst_right_after_a_window_ends(new_limiter):
    """Fixed windows let 6 requests through at 59.9 s and 6 more at 60.1 s; here the second
    burst gets the one request the 0.2 s in between earned (none) and waits."""
    now = [59.9]
    limiter = new_limiter(lambda: now[0])
    spec = RateLimitSpec(6, 60)
    assert all(limiter.hit("k", spec).allowed for _ in range(6))
    now[0] = 60.1
    refused = limiter.hit("k", spec)
    assert not refused.allowed and refused.reset_s == 10  # (one request every 10 s; 0.2 s in)
    now[0] = 59.9 + 10
    assert limiter.hit("k", spec).allowed and not limiter.hit("k", spec).allowed


def test_limiter_charges_a_pair_all_or_nothing(new_limiter):
    now = [1000.0]
    limiter = new_limiter(lambda: now[0])
    key_spec, tenant_spec = RateLimitSpec(2, 10), RateLimitSpec(3, 60)
    pairs = [limiter.hit_pair("k:a", key_spec, "t:a", tenant_spec) for _ in range(4)]
    assert [(k.allowed, t.allowed) for k, t in pairs] == [
        (True, True),
        (True, True),
        (False, True),  # refused by the key: not charged to the tenant
        (False, True),
    ]
    assert [(k.remaining, t.remaining) for k, t in pairs] == [(1, 2), (0, 1), (0, 1), (0, 1)]
    assert [(k.reset_s, t.reset_s) for k, t in pairs[:3]] == [(5, 20), (5, 20), (5, 20)]
    # another credential of the tenant still has the tenant's last request; then none
    assert limiter.hit_pair("k:b", key_spec, "t:a", tenant_spec)[1][:3] == (True, 3, 0)
    assert not limiter.hit_pair("k:b", key_spec, "t:a", tenant_spec)[1].allowed
    assert limiter.hit("t:a", tenant_spec).remaining == 0  # the same TATs as hit()


def test_a_changed_limit_starts_afresh(new_limiter):
    now = [1000.0]
    limiter = new_limiter(lambda: now[0])
    assert limiter.hit("k", RateLimitSpec(1, 3600)).allowed
    assert not limiter.hit("k", RateLimitSpec(1, 3600)).allowed  # (an hour's backlog)
    assert limiter.hit("k", RateLimitSpec(100, 60)).allowed  # raised: not held by the old one


@settings(max_examples=150, deadline=None)
@given(
    limit=st.integers(1, 8),
    window_s=st.sampled_from([1, 3, 10, 60]),
    gaps_ms=st.lists(st.integers(0, 4000), min_size=1, max_size=60),
)
def test_the_limiter_answers_as_a_token_bucket(new_limiter, limit, window_s, gaps_ms):
    """GCRA is a bucket of `limit` tokens refilled at limit / window_s a second, a request
    taking one: computed here with exact fractions, request by request."""
    rate = Fraction(limit, window_s)
    tokens, last, clock = Fraction(limit), Fraction(0), [0.0]
    limiter = new_limiter(lambda: clock[0])
    spec = RateLimitSpec(limit, window_s)
    t = Fraction(0)
    for gap in gaps_ms:
        t += Fraction(gap, 1000)
        clock[0] = float(t)
        tokens = min(Fraction(limit), tokens + (t - last) * rate)
        last = t
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        # seconds until the bucket holds one more whole token than now
        wait = (math.floor(tokens) + 1 - tokens) / rate
        got = limiter.hit("k", spec)
        assert got.allowed == allowed
        assert got.remaining == math.floor(tokens)
        assert got.reset_s == max(1, math.ceil(wait))


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
    decisions = [a.hit(key, spec), b.hit(key, spec), a.hit(key, spec), b.hit(key, spec)]
    assert [(d.allowed, d.remaining) for d in decisions] == [
        (True, 2),
        (True, 1),
        (True, 0),
        (False, 0),
    ]
    assert 19 <= decisions[3].reset_s <= 20  # (the next of one every 20 s; Redis's clock)
    # a pair in one round trip, on the same shared TATs: refused by the key, so not charged to
    # the tenant
    k, t = a.hit_pair(key, spec, f"{key}-tenant", RateLimitSpec(5, 60))
    assert (k.allowed, k.remaining, t.allowed, t.remaining) == (False, 0, True, 5)
    k, t = b.hit_pair(f"{key}-other", spec, f"{key}-tenant", RateLimitSpec(5, 60))
    assert (k.allowed, k.remaining, t.allowed, t.remaining) == (True, 2, True, 4)
    assert b.hit(f"{key}-tenant", RateLimitSpec(5, 60)).remaining == 3
    # the key expires once its backlog has drained (at most the window)
    ttl = redis.Redis.from_url(url).pttl(f"recsys:rl:{key}:3/60")
    assert 55_000 < ttl <= 60_001


def test_redis_limiter_fails_open_to_in_process():
    limiter = RedisLimiter("redis://127.0.0.1:1/0")  # nothing listens on port 1
    spec = RateLimitSpec(1, 60)
    assert limiter.hit("k", spec).allowed and not limiter.hit("k", spec).allowed
    k, t = limiter.hit_pair("k", spec, "t", spec)
    assert not k.allowed and t.allowed and t.remaining == 1  # (not charged: all or nothing)

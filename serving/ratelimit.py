"""Fixed-window request counters: in-process by default, shared through Redis when configured.

`LimitTable` gives each tenant's windows (its rate-limit and quota documents over the server's
configuration), re-read without a restart. `hit(key, spec)` counts one request and answers
whether it is allowed, how many remain and when the window resets; `hit_pair` counts two at
once (a request's credential and tenant: one lock, or one Redis round trip). With Redis every
worker and host share one counter per key; without it each worker counts alone (so the
effective limit is workers x limit; documented in the README).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import NamedTuple

from serving.config import RateLimitSpec, ServingConfig

log = logging.getLogger("recsys.serving")

#: The routes an ``inference_qps`` quota counts (each answers recommendations).
INFERENCE_PATHS = frozenset(
    {
        "/v1/recommend",
        "/v1/similar",
        "/v1/recs/predict",
        "/v1/recs/batch/predict",
        "/v1/recs/rerank",
    }
)


class TenantLimits(NamedTuple):
    """What a tenant's documents say about its requests (`LimitTable.limits`)."""

    key: RateLimitSpec  # per credential (unless `per_key` names it)
    tenant: RateLimitSpec  # all of the tenant's credentials together
    per_key: dict[str, RateLimitSpec]  # subject ("key:<id>", "jwt:<sub>") -> its own window
    inference: RateLimitSpec | None  # the inference_qps quota (a 1 s window; None: not set)
    policies: dict[str, str]  # subject -> RateLimit-Policy header ("" for the default one)


class LimitTable:
    """Each tenant's rate limits and inference quota, from its documents (``rate_limits`` and
    ``quotas`` of `serving.control.access`) over the server's configuration; a tenant's entry
    is re-checked at most every `check_s` seconds, so a change made by any worker applies on
    every worker within that (plus a stat of each document)."""

    def __init__(self, config: ServingConfig, check_s: float | None = None) -> None:
        from serving.control import access

        self._docs = access.store_collections(config.data_root)
        self._quota_defaults = access.QUOTA_DEFAULTS
        self._check_s = access.LIMIT_CHECK_S if check_s is None else check_s
        self._config = config
        self._tenants: dict[str, tuple[float, tuple, TenantLimits]] = {}

    def limits(self, tenant: str) -> TenantLimits:
        now = time.monotonic()
        entry = self._tenants.get(tenant)
        if entry is not None and now - entry[0] < self._check_s:
            return entry[2]
        rl = self._docs["rate_limits"].cached(tenant, "rate_limits")
        qd = self._docs["quotas"].cached(tenant, "quotas")
        sources = (rl, qd)
        if entry is not None and entry[1][0] is rl and entry[1][1] is qd:
            limits = entry[2]
        else:
            limits = self._resolve(rl.body if rl else {}, qd.body if qd else {})
        if len(self._tenants) > 10_000:
            self._tenants.clear()
        self._tenants[tenant] = (now, sources, limits)
        return limits

    def _resolve(self, rl: dict, quotas: dict) -> TenantLimits:
        def spec(value: dict | None, default: RateLimitSpec) -> RateLimitSpec:
            return RateLimitSpec(value["limit"], value["window_s"]) if value else default

        key = spec(rl.get("key"), self._config.rate_limit)
        tenant = spec(rl.get("tenant"), self._config.tenant_rate_limit)
        per_key = {}
        for name, value in (rl.get("keys") or {}).items():
            subject = name if ":" in name else "key:" + name  # a stored key's id
            per_key[subject] = spec(value, key)
        # (a tenant that did not lower its inference quota is not counted: no cost per request)
        qps = quotas.get("inference_qps")
        inference = None
        if qps is not None and qps < self._quota_defaults["inference_qps"]:
            inference = RateLimitSpec(max(qps, 0), 1)
        policies = {s: _policy(k, tenant) for s, k in per_key.items()}
        policies[""] = _policy(key, tenant)
        return TenantLimits(key, tenant, per_key, inference, policies)


def _policy(key: RateLimitSpec, tenant: RateLimitSpec) -> str:
    return f'"key";q={key.limit};w={key.window_s}, "tenant";q={tenant.limit};w={tenant.window_s}'


class RateDecision(NamedTuple):  # (a tuple: built twice per request, cheaply)
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the window resets


_decision = tuple.__new__  # (RateDecision(...) without the namedtuple's Python-level __new__)


class InProcessLimiter:
    """Per-process fixed windows (a dict of key -> [window start, count], updated in place)."""

    def __init__(self, clock=time.time, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._counts: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._max_keys = max_keys

    def hit(self, key: str, spec: RateLimitSpec) -> RateDecision:
        with self._lock:
            return self._hit(key, spec, self._clock())

    def hit_pair(
        self, key_a: str, spec_a: RateLimitSpec, key_b: str, spec_b: RateLimitSpec
    ) -> tuple[RateDecision, RateDecision]:
        """Two counters at once (a request's credential and tenant): one clock read, one lock
        (`_hit` twice, written out: this runs on every request)."""
        now = self._clock()
        counts = self._counts
        with self._lock:
            window_a, window_b = int(now // spec_a.window_s), int(now // spec_b.window_s)
            slot_a, slot_b = counts.get(key_a), counts.get(key_b)
            if slot_a is None or slot_b is None or slot_a is slot_b:
                return self._hit(key_a, spec_a, now), self._hit(key_b, spec_b, now)
            if slot_a[0] != window_a:
                slot_a[0], slot_a[1] = window_a, 0
            if slot_b[0] != window_b:
                slot_b[0], slot_b[1] = window_b, 0
            slot_a[1] = count_a = slot_a[1] + 1
            slot_b[1] = count_b = slot_b[1] + 1
        limit_a, limit_b = spec_a.limit, spec_b.limit
        return _decision(
            RateDecision,
            (
                count_a <= limit_a,
                limit_a,
                limit_a - count_a if count_a < limit_a else 0,
                int((window_a + 1) * spec_a.window_s - now) + 1,
            ),
        ), _decision(
            RateDecision,
            (
                count_b <= limit_b,
                limit_b,
                limit_b - count_b if count_b < limit_b else 0,
                int((window_b + 1) * spec_b.window_s - now) + 1,
            ),
        )

    def _hit(self, key: str, spec: RateLimitSpec, now: float) -> RateDecision:
        window_s, limit = spec.window_s, spec.limit
        window = int(now // window_s)
        slot = self._counts.get(key)
        if slot is None:
            if len(self._counts) >= self._max_keys:
                self._counts.clear()  # bounded memory; losing old windows only forgives callers
            slot = self._counts[key] = [window, 0]
        elif slot[0] != window:
            slot[0], slot[1] = window, 0
        slot[1] = count = slot[1] + 1
        reset = int((window + 1) * window_s - now) + 1
        return _decision(
            RateDecision, (count <= limit, limit, limit - count if count < limit else 0, reset)
        )


class RedisLimiter:
    """Fixed windows in Redis (INCR + EXPIRE in one round trip); shared by all workers.

    If Redis fails, the request is counted by an in-process limiter instead (fail open to a
    per-worker limit rather than refusing traffic) and a warning is logged once a minute.
    """

    def __init__(self, url: str, prefix: str = "recsys:rl:", client=None) -> None:
        import redis  # optional dependency, only needed when RECSYS_REDIS_URL is set

        self._redis = client or redis.Redis.from_url(
            url, socket_timeout=0.05, socket_connect_timeout=0.05
        )
        self._prefix = prefix
        self._fallback = InProcessLimiter()
        self._last_warning = 0.0

    def hit(self, key: str, spec: RateLimitSpec) -> RateDecision:
        return self._hit_many(((key, spec),))[0]

    def hit_pair(
        self, key_a: str, spec_a: RateLimitSpec, key_b: str, spec_b: RateLimitSpec
    ) -> tuple[RateDecision, RateDecision]:
        """Two counters in one round trip (a request's credential and tenant)."""
        a, b = self._hit_many(((key_a, spec_a), (key_b, spec_b)))
        return a, b

    def _hit_many(self, hits) -> list[RateDecision]:
        now = time.time()
        windows = [int(now // spec.window_s) for _, spec in hits]
        try:
            pipe = self._redis.pipeline(transaction=False)
            for (key, spec), window in zip(hits, windows, strict=True):
                rkey = f"{self._prefix}{key}:{spec.window_s}:{window}"
                pipe.incr(rkey)
                pipe.expire(rkey, spec.window_s + 1)
            replies = pipe.execute()
        except Exception as e:  # redis.RedisError, OSError: degrade, do not fail requests
            if now - self._last_warning > 60:
                log.warning("redis rate limiter unavailable (%s); counting in-process", e)
                self._last_warning = now
            return [self._fallback.hit(key, spec) for key, spec in hits]
        out = []
        for j, ((_, spec), window) in enumerate(zip(hits, windows, strict=True)):
            count = int(replies[2 * j])
            reset = int((window + 1) * spec.window_s - now) + 1
            out.append(
                RateDecision(count <= spec.limit, spec.limit, max(0, spec.limit - count), reset)
            )
        return out

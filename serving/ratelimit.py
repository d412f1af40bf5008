"""Rate limits as a generic cell rate algorithm (GCRA): in-process by default, shared through
Redis when configured.

A spec of `limit` requests per `window_s` seconds lets a caller send up to `limit` requests at
once, then one every ``window_s / limit`` seconds (its `RateLimitSpec.interval`): a token
bucket of `limit` tokens refilled continuously. Each key keeps one number, its theoretical
arrival time (TAT): when the caller's backlog drains. A request is allowed when the backlog it
adds stays within the window. This is what fixed windows (counters reset on the clock's
minute) did not give: a burst is never more than `limit` (a fixed window let `limit` through at
its end and `limit` again a moment later), a refused caller waits one interval rather than
until the window ends, callers do not all get their quota back at the same second, and the
``t`` of the RateLimit header (draft-ietf-httpapi-ratelimit-headers-10: "seconds until
additional quota is made available") and Retry-After say when the next request will pass. The
long-run rate is the same: `limit` per `window_s`.

`LimitTable` gives each tenant's specs (its rate-limit and quota documents over the server's
configuration), re-read without a restart. `hit(key, spec)` takes one request and answers
whether it is allowed, how many more would be now, and in how many seconds more quota comes;
`hit_pair` takes a request's credential and tenant together, all or nothing (one lock, or one
Redis round trip): a request refused by one is charged to neither, so a credential hammering
past its own limit does not use up its tenant's. A key's TAT is kept per spec, so a changed
limit starts afresh.

Where the TATs live (`limiter_for`): in Redis when configured, shared by every worker and host
(on Redis's clock); otherwise in a file of the data root shared by every worker of the host
(`HostLimiter`). Until 2026-12-07 each worker kept its own without Redis, so the limit a
caller met was workers x the configured one. `InProcessLimiter` (one process) is what either
falls back to when its store fails.
"""

from __future__ import annotations

import fcntl
import logging
import math
import mmap
import os
import threading
import time
import weakref
from typing import Any, NamedTuple

from recsys.snapshot.format import id_hash
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
    remaining: int  # requests that would be allowed now, after this one
    reset_s: int  # seconds until more quota is available (>= 1)


_decision = tuple.__new__  # (RateDecision(...) without the namedtuple's Python-level __new__)

#: Relative tolerance of the comparisons (``limit * interval`` is the window up to rounding).
_EPS = 1e-9


def admitted_tat(tat: float, now: float, spec: RateLimitSpec) -> float | None:
    """The TAT after one more request at `now` on a key whose TAT is `tat` (0: none yet), or
    None when `spec` refuses the request."""
    new = (tat if tat > now else now) + spec.interval
    return new if new - now <= spec.window_s * (1 + _EPS) else None


def decision(allowed: bool, tat: float, now: float, spec: RateLimitSpec) -> RateDecision:
    """What the caller is told, from its TAT after the request (the unchanged TAT of a request
    that was refused or not charged)."""
    limit, window_s, interval = spec.limit, spec.window_s, spec.interval
    if limit <= 0:
        return _decision(RateDecision, (False, 0, 0, window_s))
    slack = window_s - tat + now if tat > now else window_s  # (the quota not in use, in s)
    remaining = int(slack / interval + _EPS) if slack > 0 else 0  # (<= limit: slack <= window)
    reset = math.ceil((remaining + 1) * interval - slack - _EPS * window_s)
    return _decision(RateDecision, (allowed, limit, remaining, reset if reset > 1 else 1))


class _TatTable:
    """GCRA over a table of TATs. A subclass says where a key's TAT lives (`_cell`: a sequence
    and an index in it, found or made under the table's lock) and how the table is locked."""

    def hit(self, key: str, spec: RateLimitSpec) -> RateDecision:
        now = self._clock()
        self._acquire()
        try:
            cells, i = self._cell(key, spec, now)
            tat = cells[i]
            new = admitted_tat(tat, now, spec)
            if new is not None:
                cells[i] = tat = new
        finally:
            self._release()
        return decision(new is not None, tat, now, spec)

    def hit_pair(
        self, key_a: str, spec_a: RateLimitSpec, key_b: str, spec_b: RateLimitSpec
    ) -> tuple[RateDecision, RateDecision]:
        """A request's two keys (credential and tenant) at once: one clock read, one lock,
        charged to both only when both allow it."""
        now = self._clock()
        self._acquire()
        try:
            cells_a, i = self._cell(key_a, spec_a, now)
            cells_b, j = self._cell(key_b, spec_b, now)
            tat_a, tat_b = cells_a[i], cells_b[j]
            new_a = admitted_tat(tat_a, now, spec_a)
            new_b = admitted_tat(tat_b, now, spec_b)  # (key_b == key_a: charged once)
            if new_a is not None and new_b is not None:
                cells_a[i] = tat_a = new_a
                cells_b[j] = tat_b = new_b
        finally:
            self._release()
        return decision(new_a is not None, tat_a, now, spec_a), decision(
            new_b is not None, tat_b, now, spec_b
        )

    def _acquire(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError

    def _cell(self, key: str, spec: RateLimitSpec, now: float) -> tuple[Any, int]:
        raise NotImplementedError


class InProcessLimiter(_TatTable):
    """Per-process GCRA: a dict of key -> [TAT, spec], updated in place under one lock (the
    fallback of the shared limiters, and the tests' limiter with a clock of their own)."""

    def __init__(self, clock=time.time, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._tats: dict[str, list] = {}
        lock = threading.Lock()
        self._acquire, self._release = lock.acquire, lock.release
        self._max_keys = max_keys

    def _cell(self, key: str, spec: RateLimitSpec, now: float) -> tuple[list, int]:
        """The key's [TAT, spec] (a new one, TAT 0, when absent or kept for another spec)."""
        slot = self._tats.get(key)
        if slot is None or (slot[1] is not spec and slot[1] != spec):
            if len(self._tats) >= self._max_keys:
                self._tats.clear()  # bounded memory; forgetting a TAT only forgives its caller
            slot = self._tats[key] = [0.0, spec]
        return slot, 0


class HostLimiter(_TatTable):
    """GCRA shared by every process of the host that names the same file: the default without
    Redis, so that a limit means the same with 1 worker or 8 (and across the servers a host
    starts on one data root). A memory map is not kept coherent between hosts sharing a
    network folder: several hosts need Redis.

    The file is a fixed open-addressing table of 16-byte slots - a key's 64-bit hash (0: empty)
    and its TAT as a float - memory-mapped by each process and read and written under an
    exclusive ``flock`` (released by the kernel if the holder dies, so a killed worker never
    leaves it locked). A key's hash covers its spec, so a changed limit starts afresh in a slot
    of its own. A key is looked for in `PROBES` slots from its home; a slot whose TAT has
    passed is as good as empty (its key would start afresh anyway) and is reused, and when none
    is, the slot with the earliest TAT is (forgiving that caller part of its backlog: bounded
    memory, as the in-process limiter's). TATs are wall-clock times, shared by the processes
    and kept across restarts. Threads of one process take a lock of their own first (a
    ``flock`` does not exclude threads sharing a file descriptor); a forked child opens the
    file again, for the same reason.
    """

    SLOTS = 1 << 16  # (1 MiB; a table in use keeps the size it was made with)
    PROBES = 32

    def __init__(self, path: str, clock=time.time, slots: int = SLOTS) -> None:
        self._path = path
        self._clock = clock
        fd = self._open()
        try:
            size = os.fstat(fd).st_size
            if size < slots * 16:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:  # (another process may have made it meanwhile: only ever grown from zero)
                    if os.fstat(fd).st_size == 0:
                        # (blocks allocated now: a write through the map into a sparse file
                        # on a full disk would kill the worker with SIGBUS)
                        os.posix_fallocate(fd, 0, slots * 16)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                size = os.fstat(fd).st_size
            n = size // 16
            if n < 8 or n & (n - 1) or size != n * 16:
                raise OSError(f"{path}: {size} bytes is not a rate-limit table")
        except BaseException:
            os.close(fd)
            raise
        self._map = mmap.mmap(fd, size)
        view = memoryview(self._map)
        self._hashes, self._tats = view.cast("Q"), view.cast("d")  # (slot i: [2i], [2i + 1])
        self._mask = n - 1
        self._where: dict[str, list] = {}
        self._fd = [fd]  # (the descriptor this process locks through; closed with the limiter)
        self._thread_lock = threading.Lock()
        weakref.finalize(self, lambda fds: os.close(fds[0]), self._fd)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (c := ref()) and c._adopt(c._open()))

    def _open(self) -> int:
        os.makedirs(os.path.dirname(self._path) or ".", exist_ok=True)
        return os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _adopt(self, fd: int) -> None:
        """In a forked child: lock through `fd`, a new descriptor (its parent's, which it
        closes, would not exclude the parent or its siblings)."""
        inherited, self._fd[0] = self._fd[0], fd
        self._thread_lock = threading.Lock()
        os.close(inherited)

    def _acquire(self) -> None:
        self._thread_lock.acquire()
        try:
            fcntl.flock(self._fd[0], fcntl.LOCK_EX)
        except BaseException:
            self._thread_lock.release()
            raise

    def _release(self) -> None:
        fcntl.flock(self._fd[0], fcntl.LOCK_UN)
        self._thread_lock.release()

    def _cell(self, key: str, spec: RateLimitSpec, now: float) -> tuple[memoryview, int]:
        """Where the key's TAT is: the slot it was last seen in, when it is still there."""
        entry = self._where.get(key)  # [spec, hash, index of the slot's hash]
        if entry is None or (entry[0] is not spec and entry[0] != spec):
            if len(self._where) >= 100_000:
                self._where.clear()
            h = id_hash(f"{key}:{spec.limit}/{spec.window_s}".encode()) or 1
            entry = self._where[key] = [spec, h, 2 * (h & self._mask)]
        at = entry[2]
        if self._hashes[at] != entry[1]:
            at = entry[2] = 2 * self._slot(entry[1], now)
        return self._tats, at + 1

    def _slot(self, h: int, now: float) -> int:
        """The slot of hash `h`: found within `PROBES` of its home, else taken (TAT 0) from
        the first empty or drained one, else from the one whose TAT is earliest."""
        hashes, tats, mask = self._hashes, self._tats, self._mask
        slot, reuse, earliest = h & mask, -1, -1
        for _ in range(self.PROBES):
            held = hashes[2 * slot]
            if held == h:
                return slot
            if held == 0:  # (the key is in no later slot: slots are never emptied)
                if reuse < 0:
                    reuse = slot
                break
            tat = tats[2 * slot + 1]
            if tat <= now:
                if reuse < 0:
                    reuse = slot
            elif earliest < 0 or tat < tats[2 * earliest + 1]:
                earliest = slot
            slot = (slot + 1) & mask
        slot = reuse if reuse >= 0 else earliest
        tats[2 * slot + 1] = 0.0
        hashes[2 * slot] = h
        return slot


#: One GCRA step over KEYS with ARGV = limit, window_s per key, on Redis's clock: every key is
#: charged or none. Returns {allowed (1/0), now, TAT of each key after it} (numbers as text:
#: Redis turns a Lua number into an integer).
_GCRA_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local tats, news, ok = {}, {}, 1
for i = 1, #KEYS do
  local limit, window = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or 0
  if tat < now then tat = now end
  tats[i] = tat
  if limit <= 0 then
    ok = 0
  else
    news[i] = tat + window / limit
    if news[i] - now > window * (1 + 1e-9) then ok = 0 end
  end
end
local out = {ok, string.format('%.6f', now)}
for i = 1, #KEYS do
  local tat = tats[i]
  if ok == 1 then
    tat = news[i]
    redis.call('SET', KEYS[i], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1)
  end
  out[#out + 1] = string.format('%.6f', tat)
end
return out
"""


def limiter_for(config: ServingConfig) -> InProcessLimiter | HostLimiter | RedisLimiter:
    """The limiter of a server with `config`: the host's table under the data root
    (`<data_root>/serving/ratelimits.tats`), or one per process with a warning when that file
    cannot be made or mapped (a read-only data root); in front of it Redis when `redis_url` is
    set (the host's table then counts while Redis is unreachable)."""
    path = os.path.join(config.data_root, "serving", "ratelimits.tats")
    try:
        limiter = HostLimiter(path)
    except OSError as e:
        log.warning("rate limits counted per worker: %s cannot be used (%s)", path, e)
        limiter = InProcessLimiter()
    return RedisLimiter(config.redis_url, fallback=limiter) if config.redis_url else limiter


class RedisLimiter:
    """GCRA in Redis (one Lua script per request: a round trip, atomic); shared by every worker
    and host, on Redis's clock.

    If Redis fails, the request is counted by `fallback` instead (`limiter_for` gives the
    host's table; by default one per process): fail open to a per-host limit rather than
    refuse traffic, with a warning logged once a minute.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "recsys:rl:",
        client=None,
        fallback: InProcessLimiter | HostLimiter | None = None,
    ) -> None:
        import redis  # optional dependency, only needed when RECSYS_REDIS_URL is set

        self._redis = client or redis.Redis.from_url(
            url, socket_timeout=0.05, socket_connect_timeout=0.05
        )
        self._script = self._redis.register_script(_GCRA_SCRIPT)
        self._prefix = prefix
        self._fallback = fallback or InProcessLimiter()
        self._last_warning = 0.0

    def hit(self, key: str, spec: RateLimitSpec) -> RateDecision:
        return self._hit_many(((key, spec),))[0]

    def hit_pair(
        self, key_a: str, spec_a: RateLimitSpec, key_b: str, spec_b: RateLimitSpec
    ) -> tuple[RateDecision, RateDecision]:
        """Both keys in one round trip, charged to both only when both allow the request."""
        a, b = self._hit_many(((key_a, spec_a), (key_b, spec_b)))
        return a, b

    def _hit_many(self, hits) -> list[RateDecision]:
        # (the spec is part of the key: a changed limit starts afresh, as in-process)
        keys = [f"{self._prefix}{key}:{spec.limit}/{spec.window_s}" for key, spec in hits]
        args = [n for _, spec in hits for n in (spec.limit, spec.window_s)]
        try:
            reply = self._script(keys=keys, args=args)
        except Exception as e:  # redis.RedisError, OSError: degrade, do not fail requests
            now = time.time()
            if now - self._last_warning > 60:
                log.warning("redis rate limiter unavailable (%s); counting in-process", e)
                self._last_warning = now
            if len(hits) == 2:
                return list(self._fallback.hit_pair(*hits[0], *hits[1]))
            return [self._fallback.hit(key, spec) for key, spec in hits]
        charged, now = int(reply[0]) == 1, float(reply[1])
        out = []
        for (_, spec), tat in zip(hits, reply[2:], strict=True):
            tat = float(tat)
            allowed = charged or admitted_tat(tat, now, spec) is not None
            out.append(decision(allowed, tat, now, spec))
        return out

"""The host's rate-limit table (`serving.ratelimit.HostLimiter`): one budget for every worker
and server on a data root without Redis. (Its GCRA answers are checked with the in-process
limiter's, kind by kind, in test_serving_middleware.py.)"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import urllib.error
import urllib.request

import pytest
from servers import gunicorn, serving
from serving_helpers import SECRET, make_config, publish_tiny

from serving.auth import mint_token
from serving.config import RateLimitSpec
from serving.ratelimit import HostLimiter, InProcessLimiter, RedisLimiter, limiter_for

SPEC = RateLimitSpec(100, 3600)  # a burst of 100, then one every 36 s: exactly 100 pass here


def _hammer(path: str, n: int, start_at, results) -> None:
    limiter = HostLimiter(path)
    start_at.wait()
    results.put(sum(limiter.hit_pair("key:a", SPEC, "tenant:t", SPEC)[0].allowed for _ in range(n)))


def _hammer_inherited(limiter: HostLimiter, n: int, start_at, results) -> None:
    start_at.wait()
    results.put(sum(limiter.hit("key:a", SPEC).allowed for _ in range(n)))


def _allowed_by(target, args_of, n_procs: int = 3, n: int = 80) -> int:
    ctx = multiprocessing.get_context("fork")
    start_at, results = ctx.Barrier(n_procs), ctx.Queue()
    procs = [
        ctx.Process(target=target, args=(*args_of, n, start_at, results)) for _ in range(n_procs)
    ]
    for p in procs:
        p.start()
    total = sum(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return total


def test_processes_on_one_file_share_one_budget(tmp_path):
    """Three processes send 80 requests each at once: 100 pass in all (each counting its own,
    as workers did before, let 240 through)."""
    path = str(tmp_path / "rl.tats")
    assert _allowed_by(_hammer, (path,)) == SPEC.limit
    # the pair was charged to the tenant as often: nothing left of either
    assert not HostLimiter(path).hit("tenant:t", SPEC).allowed


def test_forked_children_lock_with_files_of_their_own(tmp_path):
    """A limiter made before the fork (gunicorn's preload) works in each child: a child's
    `flock` through its parent's descriptor would not exclude its siblings."""
    limiter = HostLimiter(str(tmp_path / "rl.tats"))
    assert limiter.hit("key:a", SPEC).allowed  # (the parent takes one)
    assert _allowed_by(_hammer_inherited, (limiter,)) == SPEC.limit - 1
    assert not limiter.hit("key:a", SPEC).allowed


def test_a_full_table_reuses_drained_slots_then_forgets_the_earliest(tmp_path):
    now = [1000.0]
    limiter = HostLimiter(str(tmp_path / "rl.tats"), clock=lambda: now[0], slots=8)
    spec = RateLimitSpec(1, 100)
    assert all(limiter.hit(f"k{i}", spec).allowed for i in range(8))  # (8 slots, 8 keys)
    assert not any(limiter.hit(f"k{i}", spec).allowed for i in range(8))  # (all kept)
    # drained keys' slots are taken by new keys, and keep them
    for i in range(8, 16):
        now[0] = 1200.0 + (i - 8)  # (TATs 1300, 1301, ... 1307)
        assert limiter.hit(f"k{i}", spec).allowed
    assert not any(limiter.hit(f"k{i}", spec).allowed for i in range(8, 16))
    # a ninth key that is still waiting: the one whose backlog ends first (k8) is forgotten
    now[0] = 1208.0
    assert limiter.hit("k16", spec).allowed
    assert not any(limiter.hit(f"k{i}", spec).allowed for i in range(9, 17))
    assert limiter.hit("k8", spec).allowed


def test_the_file_keeps_its_size_and_is_checked(tmp_path):
    path = tmp_path / "rl.tats"
    HostLimiter(str(path), slots=16)
    assert path.stat().st_size == 16 * 16
    HostLimiter(str(path))  # (a table in use keeps its size: each process finds the same slots)
    assert path.stat().st_size == 16 * 16
    bad = tmp_path / "bad.tats"
    bad.write_bytes(b"x" * 100)
    with pytest.raises(OSError, match="not a rate-limit table"):
        HostLimiter(str(bad))


def test_a_limiter_let_go_closes_its_file(tmp_path):
    """Tests and reloads make many apps in one process: each limiter's descriptors go with it."""
    import gc

    path = str(tmp_path / "rl.tats")

    def open_on_the_table() -> int:  # (descriptors of this file: other threads open others)
        fds = "/proc/self/fd"
        return sum(_target(os.path.join(fds, fd)) == path for fd in os.listdir(fds))

    HostLimiter(path)  # (the file made)
    gc.collect()
    assert open_on_the_table() == 0
    for _ in range(50):
        HostLimiter(path).hit("k", SPEC)
    gc.collect()
    assert open_on_the_table() == 0


def _target(link: str) -> str | None:
    try:
        return os.readlink(link)
    except OSError:  # (closed meanwhile)
        return None


def test_limiter_for_a_server(tmp_path, caplog):
    root = tmp_path / "data"
    limiter = limiter_for(make_config(str(root)))
    assert isinstance(limiter, HostLimiter)
    assert (root / "serving" / "ratelimits.tats").stat().st_size == HostLimiter.SLOTS * 16
    # a data root whose table cannot be used: one per process, and a warning saying so
    other = tmp_path / "other"
    (other / "serving").mkdir(parents=True)
    (other / "serving" / "ratelimits.tats").write_bytes(b"not a table")
    with caplog.at_level(logging.WARNING, logger="recsys.serving"):
        assert isinstance(limiter_for(make_config(str(other))), InProcessLimiter)
    assert "rate limits counted per worker" in caplog.text
    # Redis in front; the host's table counts while Redis is unreachable (nothing on port 1)
    limiter = limiter_for(make_config(str(root), redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(limiter, RedisLimiter)
    spec = RateLimitSpec(1, 60)
    assert limiter.hit("key:b", spec).allowed
    assert not HostLimiter(str(root / "serving" / "ratelimits.tats")).hit("key:b", spec).allowed


@pytest.mark.slow
def test_two_servers_on_one_data_root_share_the_limit(tmp_path):
    """Two servers on one data root, no Redis, requests alternating between them: the
    credential's 10 per hour pass in all, the RateLimit header counting down across both."""
    root = str(tmp_path / "data")
    publish_tiny(root, "acme", "a")
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_RATE_LIMIT": "10/3600",
        "RECSYS_ACCESS_LOG": "0",
    }
    env.pop("RECSYS_REDIS_URL", None)
    token = mint_token(SECRET, "acme", ["recommend"], 3600, "client-1")
    answers = []
    with contextlib.ExitStack() as servers:
        urls = []
        for i in range(2):  # (`recsys serve`'s gunicorn, one worker each)
            log = tmp_path / f"server-{i}.log"
            proc, url = gunicorn(env, workers=1, log=log)
            urls.append(servers.enter_context(serving(proc, url, "/healthz", log=log)))
        for n in range(16):
            req = urllib.request.Request(
                f"{urls[n % 2]}/v1/recommend",
                data=json.dumps({"user": {"user_id": "u1"}, "k": 3}).encode(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            )
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answers.append((resp.status, resp.headers["RateLimit"]))
            except urllib.error.HTTPError as e:
                answers.append((e.code, e.headers["RateLimit"]))
    assert [status for status, _ in answers] == [200] * 10 + [429] * 6
    assert [header.split(";")[:2] for _, header in answers[:10]] == [
        ['"key"', f"r={n}"] for n in range(9, -1, -1)
    ]

"""Stateless API replicas: two `recsys serve` on two ports, the same data root (snapshots,
admin documents) and the same Redis (rate limits), behind client-side round robin.

Under load the requests spread over both; the per-subject rate limit is one budget across
the replicas (Redis), not one each; a snapshot published during the load switches both
replicas with no failed request; an admin write made on one is read on the other.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import threading
import time
import uuid

import pytest
from servers import BIN, free_port, start, stop_group, wait_http
from serving_helpers import SECRET, publish_tiny

from serving.auth import mint_token

pytestmark = [pytest.mark.slow, pytest.mark.services]
REDIS_URL = os.environ.get("RECSYS_TEST_REDIS", "redis://127.0.0.1:6379/13")
#: Requests per subject per hour, across all replicas: a burst of 30, then one every 2 minutes
#: (GCRA), far longer than the tests' requests take, so exactly 30 pass.
LIMIT = 30
SWITCH_BOUND_S = 3.0  # snapshot check every 0.2 s; documented bound with margin


def _request(port: int, method: str, path: str, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=payload, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        hdrs = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, hdrs, (json.loads(data) if data else None)
    finally:
        conn.close()


def _auth(subject: str, tenant: str = "acme", scopes=("recommend",)) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, tenant, scopes, 3600, subject)}"}


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    redis = pytest.importorskip("redis")
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=0.5).ping()
    except redis.RedisError as e:
        pytest.skip(f"Redis at {REDIS_URL} unreachable ({e})")
    root = str(tmp_path_factory.mktemp("replicas") / "data")
    publish_tiny(root, "acme", "a", variant=0)
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_REDIS_URL": REDIS_URL,
        "RECSYS_RATE_LIMIT": f"{LIMIT}/3600",
        "RECSYS_SNAPSHOT_CHECK_S": "0.2",
        "RECSYS_ACCESS_LOG": "0",
    }
    procs, ports = [], []
    try:
        for i in range(2):
            port = free_port()
            log = os.path.join(os.path.dirname(root), f"replica-{i}.log")
            argv = [BIN / "recsys", "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
            procs.append(start(argv, env=env, log=log))
            ports.append(port)
        for port, proc in zip(ports, procs, strict=True):
            wait_http(f"http://127.0.0.1:{port}/healthz", proc, timeout=240, interval=0.2)
        yield {"root": root, "ports": ports}
    finally:
        for proc in procs:
            stop_group(proc)


class RoundRobin:
    """Client-side load balancing: each request to the next replica."""

    def __init__(self, ports: list[int]) -> None:
        self._next = itertools.cycle(ports)
        self._lock = threading.Lock()

    def port(self) -> int:
        with self._lock:
            return next(self._next)


def _recommend(port: int, headers: dict) -> tuple[int, list[str]]:
    status, _, body = _request(
        port, "POST", "/v1/recommend", {"user": {"user_id": "u1"}, "k": 3}, headers
    )
    return status, [it["item_id"] for it in body["items"]] if status == 200 else []


def test_rate_limit_is_one_budget_across_replicas(replicas):
    lb, headers = RoundRobin(replicas["ports"]), _auth(f"rl-{uuid.uuid4().hex}")
    results: list[tuple[int, int]] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for _ in range(n):
            port = lb.port()
            status = _recommend(port, headers)[0]
            with lock:
                results.append((port, status))

    threads = [threading.Thread(target=client, args=(10,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [s for _, s in results]
    assert len(statuses) == 80 and set(statuses) <= {200, 429}
    assert statuses.count(200) == LIMIT  # not LIMIT per replica: the counters are in Redis
    for port in replicas["ports"]:  # both replicas served, and both refused
        mine = [s for p, s in results if p == port]
        assert 200 in mine and 429 in mine and len(mine) == 40


def test_a_published_snapshot_switches_both_replicas_without_a_failed_request(replicas):
    lb = RoundRobin(replicas["ports"])
    records: list[tuple[float, int, int, str, float]] = []
    lock, stop = threading.Lock(), threading.Event()
    subjects = itertools.count()

    def client() -> None:
        while not stop.is_set():
            with lock:
                subject = f"load-{uuid.uuid4().hex[:8]}-{next(subjects)}"
            headers = _auth(subject)
            for _ in range(LIMIT - 5):  # a fresh subject before its budget runs out
                if stop.is_set():
                    break
                port, t0 = lb.port(), time.perf_counter()
                status, items = _recommend(port, headers)
                with lock:
                    records.append(
                        (
                            time.monotonic(),
                            port,
                            status,
                            items[0] if items else "",
                            time.perf_counter() - t0,
                        )
                    )

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    published_at = time.monotonic()
    publish_tiny(replicas["root"], "acme", "a", variant=1)  # u1's best item becomes a7
    time.sleep(SWITCH_BOUND_S + 2.0)
    stop.set()
    for t in threads:
        t.join()

    assert len(records) > 50
    failed = [r for r in records if r[2] != 200]
    assert failed == []  # 0 failed requests during the deploy
    before = [r for r in records if r[0] < published_at]
    after = [r for r in records if r[0] > published_at + SWITCH_BOUND_S]
    assert before and {r[3] for r in before} == {"a0"}
    assert after and {r[3] for r in after} == {"a7"}
    assert {r[1] for r in after} == set(replicas["ports"])  # both replicas switched
    lat = sorted(r[4] for r in records)
    p99 = lat[int(0.99 * (len(lat) - 1))]
    n = len(records)
    print(f"\n{n} requests over 2 replicas during a deploy: 0 failed, p99 {p99 * 1e3:.1f} ms")


def test_an_admin_write_on_one_replica_is_read_on_the_other(replicas):
    a, b = replicas["ports"]
    admin = _auth(f"admin-{uuid.uuid4().hex}", scopes=("recommend", "admin"))
    status, headers, _ = _request(a, "GET", "/v1/admin/tenants/acme/rules", headers=admin)
    assert status == 200
    best = _recommend(b, admin)[1][0]  # what replica b puts first now
    rules = {"rules": [{"id": "block-best", "type": "block", "item_ids": [best]}]}
    status, _, body = _request(
        a, "PUT", "/v1/admin/tenants/acme/rules", rules, {**admin, "If-Match": headers["etag"]}
    )
    assert status == 200, body
    version = body["rules_version"]
    deadline = time.monotonic() + SWITCH_BOUND_S
    while True:
        _, _, seen = _request(b, "GET", "/v1/admin/tenants/acme/rules", headers=admin)
        if seen["rules_version"] == version:
            break
        assert time.monotonic() < deadline, f"replica b still at {seen['rules_version']}"
        time.sleep(0.1)
    # and the other replica applies it to recommendations
    deadline = time.monotonic() + SWITCH_BOUND_S
    while best in (items := _recommend(b, admin)[1]) or not items:
        assert time.monotonic() < deadline, items
        time.sleep(0.1)

"""Monitoring: /v1/recs/health, /v1/recs/metrics, /v1/recs/usage, /v1/recs/logs and /metrics
as one view across real gunicorn workers.

The in-process tests use the tiny two-tenant snapshots of `tests/serving/serving_helpers.py`
(acme a*, globex g*); the worker test starts gunicorn with 4 sync workers on the same data.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serving"))

from servers import free_port, gunicorn, serving  # noqa: E402
from serving_helpers import (  # noqa: E402
    SECRET,
    auth,
    build_client,
    make_config,
    token,
)

from serving import accesslog  # noqa: E402
from serving.control import timeseries  # noqa: E402
from serving.metrics import LATENCY_BUCKETS, Metrics, quantile  # noqa: E402

ADMIN = ("recommend", "admin")


@pytest.fixture()
def client(data_root):
    """An app with the access log on, installed as the server installs it (to /dev/null here;
    its files under the data root are what /v1/recs/logs reads)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    accesslog.install(accesslog.AccessLog(devnull))
    try:
        yield build_client(make_config(data_root, access_log=True))
    finally:
        accesslog.install(None)
        os.close(devnull)


# --- health ------------------------------------------------------------------------------------
def test_health_reports_each_dependency(client):
    resp = client.simulate_get("/v1/recs/health", headers=auth("acme"))
    assert resp.status_code == 200, resp.text
    deps = {d["name"]: d for d in resp.json["dependencies"]}
    assert set(deps) == {"snapshot", "event_log", "mlflow", "dagster", "redis", "postgres"}
    assert deps["snapshot"]["state"] == "ok" and "tiny@1" in deps["snapshot"]["detail"]
    assert deps["event_log"]["state"] == "ok"
    for name in ("dagster", "redis", "postgres"):
        assert deps[name]["state"] == "not_configured", deps[name]
        assert deps[name]["latency_ms"] is None
    # no MLflow store was ever created under this data root: the store is down
    assert deps["mlflow"]["state"] == "down" and "does not exist" in deps["mlflow"]["detail"]
    assert resp.json["status"] == "degraded"
    assert all(d["latency_ms"] >= 0 for d in deps.values() if d["latency_ms"] is not None)


def test_health_names_a_dependency_that_is_down_and_keeps_serving(data_root):
    import sqlite3

    os.makedirs(os.path.join(data_root, "mlflow"))
    with sqlite3.connect(os.path.join(data_root, "mlflow", "mlflow.db")) as conn:
        conn.execute("CREATE TABLE experiments (experiment_id INTEGER)")
        conn.execute("INSERT INTO experiments VALUES (0)")
    port = free_port()  # (nothing listens there)
    client = build_client(
        make_config(
            data_root, dagster_url=f"http://127.0.0.1:{port}", redis_url=f"redis://127.0.0.1:{port}"
        )
    )
    resp = client.simulate_get("/v1/recs/health", headers=auth("acme"))
    deps = {d["name"]: d for d in resp.json["dependencies"]}
    assert (
        deps["mlflow"]["state"] == "ok"
        and deps["mlflow"]["detail"] == "sqlite store, 1 experiments"
    )
    assert deps["dagster"]["state"] == "down" and "Connection refused" in deps["dagster"]["detail"]
    assert deps["redis"]["state"] == "down"
    assert resp.status_code == 200 and resp.json["status"] == "degraded"
    rec = client.simulate_post(
        "/v1/recommend", json={"user": {"user_id": "u1"}, "k": 3}, headers=auth("acme")
    )
    assert rec.status_code == 200  # recommendations keep serving


@pytest.mark.services
def test_health_of_a_real_redis_and_postgresql(data_root, pg_database_url):
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 6379)) != 0:
            pytest.skip("Redis not reachable at 127.0.0.1:6379")
    client = build_client(
        make_config(data_root, redis_url="redis://127.0.0.1:6379/15", postgres_url=pg_database_url)
    )
    resp = client.simulate_get("/v1/recs/health", headers=auth("acme"))
    deps = {d["name"]: d for d in resp.json["dependencies"]}
    assert deps["redis"]["state"] == "ok" and deps["redis"]["detail"] == "PING answered"
    assert deps["postgres"]["state"] == "ok", deps["postgres"]
    assert deps["postgres"]["latency_ms"] > 0


def test_health_is_503_for_a_tenant_without_snapshot(client):
    resp = client.simulate_get("/v1/recs/health", headers=auth("initech"))
    assert resp.status_code == 503
    assert resp.json["status"] == "down"
    assert resp.json["dependencies"][0]["state"] == "down"


# --- the time series ---------------------------------------------------------------------------
def test_quantile_interpolates_inside_the_bucket():
    row = [0.0] * (len(LATENCY_BUCKETS) + 1)
    row[0] = 50  # <= 0.5 ms
    row[3] = 50  # (2 ms, 5 ms]
    assert quantile(LATENCY_BUCKETS, row, 0.5) == pytest.approx(0.0005)
    assert quantile(LATENCY_BUCKETS, row, 0.75) == pytest.approx(0.002 + 0.003 * 0.5)
    assert quantile(LATENCY_BUCKETS, row, 0.99) == pytest.approx(0.002 + 0.003 * 0.98)
    assert quantile(LATENCY_BUCKETS, [0.0] * len(row), 0.5) is None


def test_minute_rows_give_known_figures(tmp_path):
    """Two workers' counts over two minutes, with known latencies: the query adds them up per
    route and model, and each minute's rows are that minute's counts only."""
    path = str(tmp_path / "ts.sqlite")
    now = [1_800_000_000.0]  # a minute boundary
    workers = []
    for w in range(2):
        m = Metrics()
        rec = timeseries.MinuteRecorder(path, f"s/{w}", lambda t: "snap-1", clock=lambda: now[0])
        workers.append((m, rec))
    for m, rec in workers:  # minute 1: 30 fast OKs and 10 slow 503s per worker
        for _ in range(30):
            m.observe_request(("/v1/recommend", "POST", "200", "acme"), 0.0004)
        for _ in range(10):
            m.observe_request(("/v1/recommend", "POST", "503", "acme"), 0.2)
        m.observe_request(("/v1/recs/health", "GET", "200", "globex"), 0.001)
        rec.tick(m.state(), force=True)
    now[0] += 60
    for m, rec in workers:  # minute 2: 20 more OKs per worker
        for _ in range(20):
            m.observe_request(("/v1/recommend", "POST", "200", "acme"), 0.0004)
        rec.tick(m.state(), force=True)
    out = timeseries.query(path, "acme", now[0] - 60, now[0] + 60, step_s=60)
    [row] = out["routes"]
    assert row["route"] == "/v1/recommend" and row["model"] == "snap-1"
    assert row["requests"] == 2 * (30 + 10 + 20)
    assert row["qps"] == pytest.approx(120 / 120)
    assert row["error_rate"] == pytest.approx(20 / 120, abs=1e-6)
    assert row["latency_ms"]["p50"] <= 0.5  # (the fast bucket)
    assert 100 < row["latency_ms"]["p99"] <= 250  # (the slow bucket: (100, 250] ms)
    assert [p["requests"] for p in out["series"]] == [80, 40]
    assert [p["error_rate"] for p in out["series"]] == [pytest.approx(0.25), 0.0]
    # the other tenant's row is its own; a range before the data is empty
    assert timeseries.query(path, "globex", now[0] - 60, now[0] + 60)["routes"][0]["model"] is None
    assert timeseries.query(path, "acme", 0, 60)["routes"] == []


def test_metrics_route_reports_this_servers_requests(client):
    for _ in range(5):
        client.simulate_post(
            "/v1/recommend", json={"user": {"user_id": "u1"}, "k": 3}, headers=auth("acme")
        )
    client.simulate_post("/v1/recommend", json={"k": 0}, headers=auth("acme"))  # 400
    resp = client.simulate_get(
        "/v1/recs/metrics", params={"route": "/v1/recommend"}, headers=auth("acme", ADMIN)
    )
    assert resp.status_code == 200, resp.text
    [row] = resp.json["routes"]
    assert row["requests"] == 6 and row["client_error_rate"] == pytest.approx(1 / 6)
    assert row["model"].startswith("2")  # the snapshot id
    assert row["latency_ms"]["p50"] is not None
    # another tenant sees none of it
    other = client.simulate_get("/v1/recs/metrics", headers=auth("globex", ADMIN))
    assert all(r["route"] != "/v1/recommend" for r in other.json["routes"])
    for wrong in ("yesterday", "nan", "1e308", "-5", "inf"):
        for path in ("/v1/recs/metrics", "/v1/recs/usage", "/v1/recs/logs"):
            bad = client.simulate_get(path, params={"from": wrong}, headers=auth("acme", ADMIN))
            assert bad.status_code == 422, (path, wrong, bad.text)
    backwards = client.simulate_get(
        "/v1/recs/metrics", params={"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        headers=auth("acme", ADMIN),
    )  # fmt: skip
    assert backwards.status_code == 422


def test_usage_counts_requests_storage_and_index(client):
    for _ in range(3):
        client.simulate_post(
            "/v1/recommend", json={"user": {"user_id": "u1"}, "k": 3}, headers=auth("acme")
        )
    client.simulate_post(
        "/v1/recs/events",
        json={"user_id": "u1", "item_id": "a1", "type": "click"},
        headers=auth("acme"),
    )
    resp = client.simulate_get("/v1/recs/usage", headers=auth("acme", ADMIN))
    assert resp.status_code == 200, resp.text
    body = resp.json
    assert body["inferences"] == 3
    assert body["requests"] >= 4
    assert body["index"]["users"] == 3 and body["index"]["items"] == 20
    assert body["index"]["candidates"] == 9 and body["index"]["bytes"] > 0
    assert body["storage"]["by_area"]["event_log"] > 0
    assert body["storage"]["total_bytes"] >= body["index"]["bytes"]
    assert "quotas" in body


# --- logs --------------------------------------------------------------------------------------
def test_logs_query_by_request_id_status_and_route(client):
    for i in range(4):
        client.simulate_post(
            "/v1/recommend",
            json={"user": {"user_id": "u1"}, "k": 3},
            headers=auth("acme", **{"X-Request-Id": f"req-{i}"}),
        )
    client.simulate_get("/v1/recs/events/nope", headers=auth("acme", **{"X-Request-Id": "r404"}))
    client.simulate_post(
        "/v1/recommend", json={"k": 3}, headers=auth("globex", **{"X-Request-Id": "g-1"})
    )
    headers = auth("acme", ADMIN)
    one = client.simulate_get("/v1/recs/logs", params={"request_id": "req-2"}, headers=headers)
    assert one.status_code == 200, one.text
    [line] = one.json["items"]
    assert line["route"] == "/v1/recommend" and line["status"] == 200
    assert line["method"] == "POST" and line["duration_ms"] > 0
    missing = client.simulate_get("/v1/recs/logs", params={"status": 404}, headers=headers)
    assert [x["request_id"] for x in missing.json["items"]] == ["r404"]
    page = client.simulate_get(
        "/v1/recs/logs", params={"route": "/v1/recommend", "limit": 3}, headers=headers
    )
    assert [x["request_id"] for x in page.json["items"]] == ["req-3", "req-2", "req-1"]
    assert page.json["next_cursor"] == "3"
    rest = client.simulate_get(
        "/v1/recs/logs",
        params={"route": "/v1/recommend", "limit": 3, "cursor": 3},
        headers=headers,
    )
    assert [x["request_id"] for x in rest.json["items"]] == ["req-0"]
    assert rest.json["next_cursor"] is None
    # globex sees its own line and none of acme's
    theirs = client.simulate_get("/v1/recs/logs", headers=auth("globex", ADMIN))
    ids = {x["request_id"] for x in theirs.json["items"]}
    assert "g-1" in ids and not any(i.startswith("req-") for i in ids)


@pytest.mark.parametrize(
    "path", ["/v1/recs/metrics", "/v1/recs/usage", "/v1/recs/logs", "/v1/recs/health"]
)
def test_no_tenant_reaches_another_tenants_data(client, path):
    client.simulate_post(
        "/v1/recommend",
        json={"user": {"user_id": "u1"}, "k": 3},
        headers=auth("acme", **{"X-Request-Id": "acme-secret"}),
    )
    spy = client.simulate_get(path, headers=auth("globex", ADMIN))
    assert spy.status_code == 200
    assert "acme" not in spy.text and not re.search(r'"a\d+"', spy.text)
    assert client.simulate_get(path).status_code == 401
    org = auth("acme", ADMIN, **{"X-Org-Id": "globex"})
    assert client.simulate_get(path, headers=org).status_code == 403
    if path != "/v1/recs/health":  # (admin routes: a recommend-only caller is refused)
        assert client.simulate_get(path, headers=auth("acme")).status_code == 403


# --- /metrics across real gunicorn workers -----------------------------------------------------
def _get(url: str, headers: dict | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: dict, headers: dict) -> int:
    req = urllib.request.Request(
        url,
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json", **headers},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _requests_total(text: str, route: str, status: str) -> float:
    pattern = re.compile(
        r'^recsys_http_requests_total\{route="' + re.escape(route) + r'",method="[A-Z]+",'
        r'status="' + status + r'"\} (\S+)$',
        re.M,
    )
    return sum(float(v) for v in pattern.findall(text))


@pytest.mark.slow
def test_metrics_total_equals_requests_sent_across_4_gunicorn_workers(data_root):
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": data_root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_ACCESS_LOG": "0",
        "RECSYS_RATE_LIMIT": "1000000/60",
        "RECSYS_TENANT_RATE_LIMIT": "1000000/60",
    }
    proc, url = gunicorn(env, workers=4)
    with serving(proc, url, "/healthz", timeout=180) as base:
        headers = {"Authorization": f"Bearer {token('acme')}"}
        sent_ok, sent_bad = 300, 37
        for i in range(sent_ok):
            user = ("u1", "u2", "u3", "nobody")[i % 4]
            assert (
                _post(base + "/v1/recommend", {"user": {"user_id": user}, "k": 3}, headers) == 200
            )
        for _ in range(sent_bad):
            assert _post(base + "/v1/recommend", {"k": 0}, headers) == 400
        time.sleep(1.5)  # (each worker writes its counters every 0.5 s)
        pids = set()
        for _ in range(8):  # whichever worker answers, the totals are everybody's
            status, body = _get(base + "/metrics")
            text = body.decode()
            assert status == 200
            assert _requests_total(text, "/v1/recommend", "200") == sent_ok, text[:3000]
            assert _requests_total(text, "/v1/recommend", "400") == sent_bad
            assert re.search(r"^recsys_workers_reporting 4$", text, re.M), text[-400:]
            pids.add(re.search(r"^recsys_worker_pid (\d+)$", text, re.M).group(1))
            hits = re.search(
                r'^recsys_cache_answers_total\{tenant="acme",surface="default",'
                r'source="precomputed"\} (\S+)$',
                text,
                re.M,
            )
            # u1..u3 have rows in the snapshot (u3's is empty), "nobody" is answered by fallback
            assert hits and float(hits.group(1)) == sent_ok * 3 / 4
        admin = {"Authorization": f"Bearer {token('acme', ADMIN)}"}
        deadline = time.monotonic() + 20  # (the other workers write their minute every 5 s)
        while True:
            status, body = _get(base + "/v1/recs/metrics?route=/v1/recommend", admin)
            assert status == 200, body
            counted = sum(r["requests"] for r in orjson.loads(body)["routes"])
            if counted == sent_ok + sent_bad or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert counted == sent_ok + sent_bad
        print(f"\n/metrics answered by {len(pids)} worker(s); totals {sent_ok}+{sent_bad} each")


# --- online evaluation -------------------------------------------------------------------------
def test_online_evaluation_attributes_clicks_and_purchases_by_request_id(client, data_root):
    from serving_helpers import items_frame

    os.makedirs(os.path.join(data_root, "warehouse", "acme"))
    items_frame("a").write_parquet(os.path.join(data_root, "warehouse", "acme", "items.parquet"))

    def event(n, type_, item, req, value=None, **ctx):
        body = {"user_id": "u1", "item_id": item, "type": type_, "event_id": f"e{n}"}
        body["context"] = {"request_id": req, **ctx}
        if value is not None:
            body["value"] = value
        resp = client.simulate_post("/v1/recs/events", json=body, headers=auth("acme"))
        assert resp.status_code == 201, resp.text

    a = {"model": "tiny@1", "surface": "home", "experiment": {"id": "x", "variant": "A"}}
    b = {"model": "tiny@1", "surface": "home", "experiment": {"id": "x", "variant": "B"}}
    for n, item in enumerate(["a1", "a2", "a3"]):
        event(n, "impression", item, "r1", **a)
    event(10, "impression", "a4", "r2", **b)
    event(11, "impression", "a5", "r2", **b)
    event(12, "impression", "a6", "r3", model="tiny@2", surface="pdp")
    event(20, "click", "a1", "r1")
    event(21, "click", "a1", "r1")  # (a second click on the same shown item: one click)
    event(22, "purchase", "a1", "r1", value=2)  # 2 x a1's price 11.0
    event(23, "click", "a5", "r2")
    event(24, "purchase", "a5", "r2", revenue=99.5)
    event(25, "click", "a9", "r1")  # not shown by r1: not attributed
    event(26, "click", "a1", "r9")  # no such request: not attributed
    resp = client.simulate_get(
        "/v1/recs/metrics", params={"online": "true"}, headers=auth("acme", ADMIN)
    )
    assert resp.status_code == 200, resp.text
    rows = {(r["model"], r["surface"], r["variant"]): r for r in resp.json["online"]}
    ra, rb, rc = (
        rows["tiny@1", "home", "A"],
        rows["tiny@1", "home", "B"],
        rows["tiny@2", "pdp", None],
    )
    assert (ra["impressions"], ra["requests"], ra["clicks"], ra["purchases"]) == (3, 1, 1, 1)
    assert ra["revenue"] == 22.0 and ra["revenue_per_impression"] == pytest.approx(22 / 3)
    assert ra["ctr"] == pytest.approx(1 / 3) and ra["conversion"] == pytest.approx(1 / 3)
    assert (rb["impressions"], rb["clicks"], rb["purchases"], rb["revenue"]) == (2, 1, 1, 99.5)
    assert rb["ctr"] == 0.5
    assert (rc["impressions"], rc["clicks"], rc["revenue"], rc["ctr"]) == (1, 0, 0.0, 0.0)
    assert len(rows) == 3
    other = client.simulate_get(
        "/v1/recs/metrics", params={"online": "true"}, headers=auth("globex", ADMIN)
    )
    assert other.json["online"] == []

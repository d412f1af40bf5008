"""The audit log: every write on an admin route is recorded (refused ones too), the entries
form a hash chain that verifies, and an edited, removed or re-ordered entry is found."""

from __future__ import annotations

import os
import sqlite3
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))
from serving_helpers import auth  # noqa: E402

from serving.control.audit import AuditLog, verify_file  # noqa: E402

ADMIN = auth("acme", ("admin",))


def entries(data_root: str, tenant: str = "acme") -> list[dict]:
    return AuditLog(os.path.join(data_root, "serving", "audit")).query(tenant, limit=1000)


def test_every_admin_write_is_recorded_refused_ones_too(client, data_root):
    path = "/v1/admin/tenants/acme/config"
    assert client.simulate_get(path, headers=ADMIN).status_code == 200  # reads: not recorded
    ok = client.simulate_put(path, json={"strict_similar": True}, headers=ADMIN)
    assert ok.status_code in (200, 201), ok.json
    stale = client.simulate_put(
        path, json={"strict_similar": False}, headers={**ADMIN, "If-Match": '"x"'}
    )
    assert stale.status_code == 409
    no_scope = client.simulate_put(path, json={"strict_similar": False}, headers=auth("acme"))
    assert no_scope.status_code == 403
    other_org = client.simulate_put(
        path, json={"strict_similar": False}, headers={**ADMIN, "X-Org-Id": "b"}
    )
    assert other_org.status_code == 403
    bad = client.simulate_put(path, json=[1], headers={**ADMIN, "X-Request-Id": "rid-bad-1"})
    assert bad.status_code in (400, 422)
    anonymous = client.simulate_put(path, json={"strict_similar": False})
    assert anonymous.status_code == 401  # no tenant to record it for: the access log has it
    # a recommend-scope write (not an admin route) is not the audit log's
    client.simulate_post("/v1/recommend", json={"user": {"user_id": "u1"}}, headers=auth())
    got = entries(data_root)
    assert [(e["method"], e["status"]) for e in got] == [
        ("PUT", ok.status_code),
        ("PUT", 409),
        ("PUT", 403),
        ("PUT", 403),
        ("PUT", bad.status_code),
    ]
    assert {e["route"] for e in got} == {"/v1/admin/tenants/{tenant_id}/config"}
    assert got[0]["actor"] == "jwt:dev-acme" and got[0]["tenant"] == "acme"
    # the accepted write names what it changed: the config, from the defaults' revision
    assert got[0]["target"] == "config" and got[0]["before"].startswith("cfg_defaults_")
    assert got[0]["after"] == ok.json["config_version"]
    assert got[0]["request_id"] == ok.headers["X-Request-Id"]
    assert got[-1]["request_id"] == "rid-bad-1"
    assert entries(data_root, "globex") == []
    result = verify_file(AuditLog(os.path.join(data_root, "serving", "audit")).path("acme"))
    assert result.ok and result.entries == 5


def test_the_chain_finds_an_edited_a_removed_and_a_reordered_entry(tmp_path):
    log = AuditLog(str(tmp_path / "audit"))
    for n in range(20):
        log.append(
            "acme", f"jwt:u{n % 3}", "PUT", "/v1/recs/quotas", "/v1/recs/quotas", 200, f"r{n}"
        )
    path = log.path("acme")
    assert verify_file(path).ok and verify_file(path).entries == 20

    def edit(sql: str) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute(sql)

    edit("UPDATE audit SET status = 403 WHERE seq = 7")
    broken = verify_file(path).broken
    assert broken is not None and broken.seq == 7 and "hash" in broken.reason
    edit("UPDATE audit SET status = 200 WHERE seq = 7")  # put back: holds again
    assert verify_file(path).ok
    edit("DELETE FROM audit WHERE seq = 12")
    broken = verify_file(path).broken
    assert broken is not None and broken.seq == 13


def test_query_filters_and_cursor(tmp_path):
    log = AuditLog(str(tmp_path / "audit"))
    for n in range(10):
        route = "/v1/recs/keys" if n % 2 else "/v1/recs/quotas"
        log.append(
            "acme",
            f"jwt:u{n % 2}",
            "POST",
            route,
            route,
            201,
            f"r{n}",
            ts=f"2026-01-0{n}T00:00:00Z",
        )
    assert [e["request_id"] for e in log.query("acme", actor="jwt:u1")] == [
        "r1",
        "r3",
        "r5",
        "r7",
        "r9",
    ]
    assert [e["seq"] for e in log.query("acme", route="/v1/recs/quotas", after_seq=3, limit=2)] == [
        5,
        7,
    ]
    window = log.query("acme", since="2026-01-02T00:00:00Z", until="2026-01-04T00:00:00Z")
    assert [e["request_id"] for e in window] == ["r2", "r3"]
    assert log.query("globex") == []


def _append_many(root: str, tenant: str, actor: str, n: int) -> None:
    log = AuditLog(root)
    for i in range(n):
        log.append(tenant, actor, "POST", "/v1/recs/keys", "/v1/recs/keys", 201, f"{actor}-{i}")


APPEND_MANY = """
import sys
from serving.control.audit import AuditLog
root, actor, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = AuditLog(root)
for i in range(n):
    log.append("acme", actor, "POST", "/v1/recs/keys", "/v1/recs/keys", 201, f"{actor}-{i}")
"""


def test_concurrent_writers_keep_one_chain(tmp_path):
    """Two processes (as two gunicorn workers) appending at once: one unbroken chain. (New
    interpreters, not forks of this one: a fork inherits the locks the test process's other
    threads hold at that moment, and one such child hung in a CI run.)"""
    import subprocess

    root = str(tmp_path / "audit")
    procs = [
        subprocess.Popen([sys.executable, "-c", APPEND_MANY, root, f"w{p}", "150"]) for p in (1, 2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    result = AuditLog(root).verify("acme")
    assert result.ok and result.entries == 300
    actors = [e["actor"] for e in AuditLog(root).query("acme", limit=1000)]
    assert actors.count("w1") == actors.count("w2") == 150


@pytest.mark.slow
def test_ten_thousand_writes_verify_and_an_edit_is_found(tmp_path, capsys):
    """The chain after 10k writes (each its own fsync'd transaction) verifies through
    `recsys audit verify`; one edited entry in the middle is reported as the first bad one."""
    import time

    from recsys.cli import main

    data_root = tmp_path / "data"
    root = str(data_root / "serving" / "audit")
    started = time.perf_counter()
    cpu = time.process_time()
    _append_many(root, "acme", "jwt:bulk", 10_000)
    write_s, write_cpu = time.perf_counter() - started, time.process_time() - cpu
    started = time.perf_counter()
    assert main(["audit", "verify", "--data-root", str(data_root)]) == 0
    verify_s = time.perf_counter() - started
    out = capsys.readouterr().out
    assert "acme: ok, 10000 entries" in out
    with sqlite3.connect(AuditLog(root).path("acme")) as conn:
        conn.execute("UPDATE audit SET actor = 'jwt:someone-else' WHERE seq = 5000")
    assert main(["audit", "verify", "--data-root", str(data_root), "--tenant", "acme"]) == 1
    out = capsys.readouterr().out
    assert "BROKEN at entry 5000" in out and "4999 entries verified" in out
    with capsys.disabled():
        print(
            f"\naudit: 10,000 appends {write_s:.1f} s wall ({write_cpu:.1f} s CPU), "
            f"verify {verify_s:.2f} s wall"
        )


def test_a_rate_limited_write_is_recorded_with_its_route(client, data_root):
    """A write refused by the rate limiter (before routing: the hook finds its route in the
    table) is recorded, and a document change carries the revisions before and after."""
    import time

    from serving.control.access import LIMIT_CHECK_S

    put = client.simulate_put(
        "/v1/recs/rate-limits", json={"tenant": {"limit": 3, "window_s": 3600}}, headers=ADMIN
    )
    assert put.status_code == 200
    time.sleep(LIMIT_CHECK_S + 0.05)
    statuses = [
        client.simulate_patch("/v1/recs/quotas", json={"keys": 5}, headers=ADMIN).status_code
        for _ in range(5)
    ]
    assert 429 in statuses
    got = entries(data_root)
    first = got[0]
    assert first["route"] == "/v1/recs/rate-limits" and first["target"] == "rate-limits/rate_limits"
    assert first["before"].startswith("rl_defaults_") and first["after"] == put.json["version"]
    refused = [e for e in got if e["status"] == 429]
    assert len(refused) == statuses.count(429)
    assert {e["route"] for e in refused} == {"/v1/recs/quotas"}
    assert {e["method"] for e in refused} == {"PATCH"}


def test_query_times_are_rfc3339_text(client):
    """(serving.routing's query decoding, through the audit route's since/until; the spec's
    query parameters have no null alternative, so an empty value is a bad date-time too.)"""
    path = "/v1/recs/audit/logs"
    for bad in ("0.5", "1700000000", "-3", "yesterday"):
        got = client.simulate_get(path, params={"until": bad}, headers=ADMIN)
        assert got.status_code == 400 and "until" in got.json["detail"], (bad, got.json)
    for query in ("since=", "since=null", "limit=null"):
        got = client.simulate_get(path, query_string=query, headers=ADMIN)
        assert got.status_code == 400 and query.split("=")[0] in got.json["detail"], query
    assert client.simulate_get(path, query_string="actor=null", headers=ADMIN).status_code == 200
    spec = client.simulate_get("/openapi.json").json["paths"][path]["get"]["parameters"]
    since = next(p for p in spec if p["name"] == "since")["schema"]
    assert since["type"] == "string" and since["format"] == "date-time"
    ok = client.simulate_get(path, params={"since": "2026-01-01T00:00:00Z"}, headers=ADMIN)
    assert ok.status_code == 200

"""Admin config/rules: versioned with ETag / If-Match, validated, durable."""

from __future__ import annotations

import pytest
from serving_helpers import auth, build_client, make_config, recommend

from serving.tenant_store import TenantStore

ADMIN = auth("acme", ("admin",))


def test_etag_if_match_and_conflict(client):
    first = client.simulate_get("/v1/admin/tenants/acme/config", headers=ADMIN)
    assert first.status_code == 200 and first.json["config_version"] is None
    put = client.simulate_put(
        "/v1/admin/tenants/acme/config",
        json={"defaults": {"weights": {"pop": 0.4, "cooc": 0.2, "emb": 0.4}}},
        headers=ADMIN,
    )
    assert put.status_code == 200
    v1 = put.json["config_version"]
    assert put.headers["ETag"] == f'"{v1}"' and v1.startswith("cfg_") and v1.endswith("_001")
    put2 = client.simulate_put(
        "/v1/admin/tenants/acme/config",
        json={"defaults": {"k": 5}},
        headers={**ADMIN, "If-Match": f'"{v1}"'},
    )
    assert put2.status_code == 200 and put2.json["config_version"].endswith("_002")
    stale = client.simulate_put(
        "/v1/admin/tenants/acme/config",
        json={"defaults": {"k": 7}},
        headers={**ADMIN, "If-Match": f'"{v1}"'},
    )
    assert stale.status_code == 409
    assert stale.headers["Content-Type"] == "application/problem+json"
    assert stale.json["current_version"] == put2.json["config_version"]
    got = client.simulate_get("/v1/admin/tenants/acme/config", headers=ADMIN)
    assert got.headers["ETag"] == f'"{put2.json["config_version"]}"' and got.json["defaults"] == {
        "k": 5
    }
    # config takes effect: default k
    resp = recommend(client, {"user": {"user_id": "u1"}})
    assert len(resp.json["items"]) == 5
    assert resp.json["meta"]["config_version"] == put2.json["config_version"]


def test_config_is_durable(client, data_root):
    client.simulate_put(
        "/v1/admin/tenants/acme/rules",
        json={"rules": [{"id": "b", "type": "block", "item_ids": ["a0"]}]},
        headers=ADMIN,
    )
    doc = TenantStore(data_root + "/serving").read("acme", "rules")
    assert doc.version.startswith("rules_") and doc.body["rules"][0]["id"] == "b"
    fresh = build_client(make_config(data_root))  # a new process would see the same
    again = fresh.simulate_get("/v1/admin/tenants/acme/rules", headers=ADMIN)
    assert again.json["rules_version"] == doc.version


@pytest.mark.parametrize(
    "body,status",
    [
        ({"defaults": {"weights": {"pop": -0.1}}}, 422),
        ({"defaults": {"weights": {"pop": 0, "emb": 0}}}, 422),
        ({"limits": {"max_k": 0}}, 422),
        ({"limits": {"max_k": 10_000}}, 422),
        ({"limits": {"max_k": 10}, "defaults": {"k": 20}}, 422),
        ({"limits": {"max_k": "ten"}}, 400),
        ({"unknown": 1}, 400),
        ({"experiments": {"e": {"variants": [{"name": "A", "weight": -1}]}}}, 422),
    ],
)
def test_invalid_config(client, body, status):
    resp = client.simulate_put("/v1/admin/tenants/acme/config", json=body, headers=ADMIN)
    assert resp.status_code == status, resp.json
    assert resp.headers["Content-Type"] == "application/problem+json"


@pytest.mark.parametrize(
    "rule,status",
    [
        ({"id": "p", "type": "pin", "item_id": "a1", "position": 0}, 422),
        ({"id": "p", "type": "pin", "item_id": "a1"}, 400),
        ({"id": "b", "type": "boost", "tag": "x", "factor": 0.5}, 422),
        ({"id": "b", "type": "bury", "tag": "x", "factor": 2}, 422),
        ({"id": "k", "type": "block"}, 422),
        ({"id": "z", "type": "teleport"}, 400),
    ],
)
def test_invalid_rules(client, rule, status):
    resp = client.simulate_put(
        "/v1/admin/tenants/acme/rules", json={"rules": [rule]}, headers=ADMIN
    )
    assert resp.status_code == status, resp.json


def test_unknown_tenant_is_404(data_root):
    client = build_client(make_config(data_root))
    resp = client.simulate_get(
        "/v1/admin/tenants/initech/config", headers=auth("initech", ("admin",))
    )
    assert resp.status_code == 404


def test_cache_invalidate(client):
    resp = client.simulate_post(
        "/v1/admin/tenants/acme/cache/invalidate",
        json={"targets": ["rules", "config"], "surface": "home"},
        headers=ADMIN,
    )
    assert resp.status_code == 202 and resp.json["invalidated"] == ["rules", "config"]
    bad = client.simulate_post(
        "/v1/admin/tenants/acme/cache/invalidate", json={"targets": ["x"]}, headers=ADMIN
    )
    assert bad.status_code == 400

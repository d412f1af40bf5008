"""Admin config/rules: versioned with ETag / If-Match, validated, durable."""

from __future__ import annotations

import os

import orjson
import pytest
from serving_helpers import auth, build_client, make_config, recommend

from serving.documents import TenantDocuments

ADMIN = auth("acme", ("admin",))


def test_etag_if_match_and_conflict(client):
    first = client.simulate_get("/v1/admin/tenants/acme/config", headers=ADMIN)
    assert first.status_code == 200 and first.json["config_version"].startswith("cfg_defaults_")
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
    doc = TenantDocuments(data_root + "/serving").collection("rules").get("acme", "rules")
    assert doc.revision.startswith("rules_") and doc.body["rules"][0]["id"] == "b"
    fresh = build_client(make_config(data_root))  # a new process would see the same
    again = fresh.simulate_get("/v1/admin/tenants/acme/rules", headers=ADMIN)
    assert again.json["rules_version"] == doc.revision


def test_a_worker_sees_its_own_writes_at_once_and_another_workers_within_the_interval(
    data_root,
):
    """The recommend service keeps what the tenant's documents say (`TenantView`) between
    requests: a config or rules write is served at once by the worker that made it, and by
    another worker once the document check interval has passed."""
    import time

    interval = 0.3
    a = build_client(make_config(data_root, snapshot_check_s=interval))
    b = build_client(make_config(data_root, snapshot_check_s=interval))
    first = recommend(a, {"user": {"user_id": "u1"}, "k": 3}).json
    assert first["meta"]["config_version"].startswith("cfg_defaults_")
    # a write on worker b: a sees it once its view and the document's check have expired
    put = b.simulate_put(
        "/v1/admin/tenants/acme/config", json={"defaults": {"k": 2}}, headers=ADMIN
    )
    assert put.status_code == 200, put.text
    time.sleep(2 * interval)
    seen = recommend(a, {"user": {"user_id": "u1"}})
    assert seen.json["meta"]["config_version"] == put.json["config_version"]
    assert len(seen.json["items"]) == 2
    # a write on worker a (config, then rules): its next request uses it, with no wait
    again = a.simulate_put(
        "/v1/admin/tenants/acme/config",
        json={"defaults": {"k": 4}},
        headers={**ADMIN, "If-Match": put.headers["ETag"]},
    )
    assert again.status_code == 200, again.text
    now = recommend(a, {"user": {"user_id": "u1"}})
    assert now.json["meta"]["config_version"] == again.json["config_version"]
    assert len(now.json["items"]) == 4
    top = now.json["items"][0]["item_id"]
    rules = a.simulate_put(
        "/v1/admin/tenants/acme/rules",
        json={"rules": [{"id": "no-top", "type": "block", "item_ids": [top]}]},
        headers=ADMIN,
    )
    assert rules.status_code == 200, rules.text
    blocked = recommend(a, {"user": {"user_id": "u1"}})
    assert blocked.json["meta"]["rules_version"] == rules.json["rules_version"]
    assert top not in [it["item_id"] for it in blocked.json["items"]]


def test_a_tenant_never_configured_gets_its_effective_defaults(client, config):
    got = client.simulate_get("/v1/admin/tenants/acme/config", headers=ADMIN)
    assert got.status_code == 200
    assert got.json["defaults"] == {
        "weights": None,
        "k": 20,
        "surface": "default",
        "anchor_half_life": 1.0,
    }
    assert got.json["limits"] == {
        "max_k": config.max_k,
        "max_include_ids": config.max_list_ids,
        "max_exclude_ids": config.max_list_ids,
        "max_anchors": config.max_anchors,
    }
    assert got.json["surfaces"] == [] and got.json["experiments"] == {}
    etag = got.headers["ETag"]
    assert etag == f'"{got.json["config_version"]}"' and etag.startswith('"cfg_defaults_')
    # the same defaults have the same ETag (another worker, another GET)
    assert (
        client.simulate_get("/v1/admin/tenants/acme/config", headers=ADMIN).headers["ETag"] == etag
    )
    # the defaults are what a request gets: k = 20, of which u1 can have 18 (a2 is
    # unavailable, a8 seen), and its meta names the defaults' revision
    served = recommend(client, {"user": {"user_id": "u1"}}).json
    assert len(served["items"]) == 18
    assert served["meta"]["config_version"] == got.json["config_version"]
    # a stale guess is refused and names the defaults' revision
    stale = client.simulate_put(
        "/v1/admin/tenants/acme/config",
        json={"defaults": {"k": 5}},
        headers={**ADMIN, "If-Match": '"cfg_2020-01-01_001"'},
    )
    assert stale.status_code == 409 and stale.json["current_version"] == got.json["config_version"]
    # the first PUT with If-Match of the defaults' ETag goes through
    body = {k: v for k, v in got.json.items() if k not in ("tenant_id", "config_version")}
    body["defaults"] = {**body["defaults"], "k": 5}
    put = client.simulate_put(
        "/v1/admin/tenants/acme/config", json=body, headers={**ADMIN, "If-Match": etag}
    )
    assert put.status_code == 200, put.json
    assert put.json["config_version"].endswith("_001") and put.json["defaults"]["k"] == 5
    # ... and only once: the defaults' ETag is stale now
    again = client.simulate_put(
        "/v1/admin/tenants/acme/config", json=body, headers={**ADMIN, "If-Match": etag}
    )
    assert again.status_code == 409
    assert again.json["current_version"] == put.json["config_version"]
    assert len(recommend(client, {"user": {"user_id": "u1"}}).json["items"]) == 5


def test_first_put_with_if_none_match_star(client):
    rules = {"rules": [{"id": "b", "type": "block", "item_ids": ["a0"]}]}
    got = client.simulate_get("/v1/admin/tenants/acme/rules", headers=ADMIN)
    assert got.json["rules"] == [] and got.headers["ETag"].startswith('"rules_defaults_')
    first = client.simulate_put(
        "/v1/admin/tenants/acme/rules", json=rules, headers={**ADMIN, "If-None-Match": "*"}
    )
    assert first.status_code == 200 and first.json["rules_version"].endswith("_001")
    second = client.simulate_put(
        "/v1/admin/tenants/acme/rules", json=rules, headers={**ADMIN, "If-None-Match": "*"}
    )
    assert second.status_code == 412
    assert second.headers["Content-Type"] == "application/problem+json"
    assert second.json["current_version"] == first.json["rules_version"]
    assert second.json["code"] == "RECSYS_PRECONDITION_FAILED"
    # If-Match: * needs a stored document: fine now, refused on a tenant without one
    star = client.simulate_put(
        "/v1/admin/tenants/acme/rules", json=rules, headers={**ADMIN, "If-Match": "*"}
    )
    assert star.status_code == 200 and star.json["rules_version"].endswith("_002")


def test_config_written_before_the_document_store_still_loads(client, data_root):
    folder = os.path.join(data_root, "serving", "tenants", "acme")
    os.makedirs(folder)
    old = {
        "version": "cfg_2026-01-29_004",
        "updated_at": "2026-01-29T10:00:00+00:00",
        "body": {"defaults": {"k": 3}},
    }
    with open(os.path.join(folder, "config.json"), "wb") as f:
        f.write(orjson.dumps(old))
    got = client.simulate_get("/v1/admin/tenants/acme/config", headers=ADMIN)
    assert got.json["config_version"] == "cfg_2026-01-29_004" and got.json["defaults"] == {"k": 3}
    assert len(recommend(client, {"user": {"user_id": "u1"}}).json["items"]) == 3
    put = client.simulate_put(
        "/v1/admin/tenants/acme/config",
        json={"defaults": {"k": 4}},
        headers={**ADMIN, "If-Match": got.headers["ETag"]},
    )
    assert put.status_code == 200 and put.json["config_version"].endswith("_005")
    with open(os.path.join(folder, "config.json"), "rb") as f:
        stored = orjson.loads(f.read())
    assert stored["revision"] == put.json["config_version"] and stored["body"]["defaults"] == {
        "k": 4
    }


@pytest.mark.parametrize(
    "body,status",
    [
        # the schema (400): types, ranges of the API, unknown fields
        ({"defaults": {"weights": {"pop": -0.1}}}, 400),
        ({"limits": {"max_k": 0}}, 400),
        ({"limits": {"max_k": 10_000}}, 400),
        ({"experiments": {"e": {"variants": [{"name": "A", "weight": -1}]}}}, 400),
        # the second pass (422): the server's limits, semantics
        ({"defaults": {"weights": {"pop": 0, "emb": 0}}}, 422),
        ({"limits": {"max_k": 999}}, 422),
        ({"limits": {"max_k": 10}, "defaults": {"k": 20}}, 422),
        ({"limits": {"max_k": "ten"}}, 400),
        ({"unknown": 1}, 400),
        ({"experiments": {"e": {"variants": [{"name": "A"}, {"name": "A"}]}}}, 422),
    ],
)
def test_invalid_config(client, body, status):
    resp = client.simulate_put("/v1/admin/tenants/acme/config", json=body, headers=ADMIN)
    assert resp.status_code == status, resp.json
    assert resp.headers["Content-Type"] == "application/problem+json"


@pytest.mark.parametrize(
    "rule,status",
    [
        ({"id": "p", "type": "pin", "item_id": "a1", "position": 0}, 400),
        ({"id": "p", "type": "pin", "item_id": "a1", "position": 201}, 422),
        ({"id": "p", "type": "pin", "item_id": "a1"}, 422),
        ({"id": "p", "type": "pin", "item_id": "a1", "position": 1, "tag": "x"}, 422),
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

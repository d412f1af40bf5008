"""The OpenAPI document matches the implementation: real requests and responses validate."""

from __future__ import annotations

import jsonschema
import pytest
from serving_helpers import auth

ADMIN = auth("acme", ("admin",))


@pytest.fixture()
def spec(client):
    doc = client.simulate_get("/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    return doc


def validator_for(spec, schema):
    root = {**schema, "components": spec["components"]}
    return jsonschema.Draft202012Validator(root)


def check(spec, method, path, status, body, content_type):
    op = spec["paths"][path][method.lower()]
    response = op["responses"][str(status)]
    media = response["content"][content_type]
    validator_for(spec, media["schema"]).validate(body)


def check_request(spec, method, path, body):
    op = spec["paths"][path][method.lower()]
    validator_for(spec, op["requestBody"]["content"]["application/json"]["schema"]).validate(body)


CASES = [
    (
        "POST",
        "/v1/recommend",
        "/v1/recommend",
        {
            "surface": "home",
            "segment": "default",
            "k": 5,
            "user": {"user_id": "u1"},
            "context": {"locale": "fi-FI"},
            "anchors": {"item_ids": ["a3"], "max_anchors": 5},
            "candidates": {"include_ids": [], "exclude_ids": ["a9"]},
            "constraints": {
                "required_tags": [],
                "forbidden_tags": ["adult"],
                "max_per_tag": {"nike": 2},
            },
            "weights": {"pop": 0.4, "cooc": 0.2, "emb": 0.4},
            "options": {
                "include_reasons": True,
                "explain": "full",
                "include_trace": True,
                "seed": 1,
            },
        },
    ),
    (
        "POST",
        "/v1/recommend",
        "/v1/recommend",
        {"k": 6, "user": {"user_id": "u1"}, "constraints": {"forbidden_tags": ["shoes", "winter"]}},
    ),
    (
        "POST",
        "/v1/recommend",
        "/v1/recommend",
        {"user": {"anonymous_id": "x"}, "anchors": {"item_ids": ["a0"]}},
    ),
    ("POST", "/v1/recommend/validate", "/v1/recommend/validate", {"user": {"session_id": "s"}}),
    (
        "POST",
        "/v1/similar",
        "/v1/similar",
        {"item_id": "a0", "k": 3, "kind": "blend", "options": {"explain": "summary"}},
    ),
]


@pytest.mark.parametrize("method,path,template,body", CASES)
def test_public_routes_conform(client, spec, method, path, template, body):
    check_request(spec, method, template, body)
    resp = client.simulate_request(method, path, json=body, headers=auth())
    assert resp.status_code == 200, resp.json
    check(spec, method, template, 200, resp.json, "application/json")


def test_admin_routes_conform(client, spec):
    t = "/v1/admin/tenants/{tenant_id}"
    cfg = {
        "defaults": {"weights": {"pop": 1}, "k": 10, "surface": "home"},
        "limits": {"max_k": 50, "max_exclude_ids": 100},
        "surfaces": ["home"],
        "experiments": {"e": {"variants": [{"name": "A", "snapshot": "current", "weight": 1}]}},
    }
    rules = {
        "rules": [
            {"id": "p", "type": "pin", "item_id": "a9", "position": 1},
            {"id": "b", "type": "boost", "tag": "winter", "factor": 2},
        ]
    }
    for kind, body in (("config", cfg), ("rules", rules)):
        check_request(spec, "PUT", f"{t}/{kind}", body)
        put = client.simulate_put(f"/v1/admin/tenants/acme/{kind}", json=body, headers=ADMIN)
        check(spec, "PUT", f"{t}/{kind}", 200, put.json, "application/json")
        get = client.simulate_get(f"/v1/admin/tenants/acme/{kind}", headers=ADMIN)
        check(spec, "GET", f"{t}/{kind}", 200, get.json, "application/json")
        stale = client.simulate_put(
            f"/v1/admin/tenants/acme/{kind}", json=body, headers={**ADMIN, "If-Match": '"old"'}
        )
        check(spec, "PUT", f"{t}/{kind}", 409, stale.json, "application/problem+json")
    inv = client.simulate_post(
        "/v1/admin/tenants/acme/cache/invalidate", json={"targets": ["rules"]}, headers=ADMIN
    )
    check(spec, "POST", f"{t}/cache/invalidate", 202, inv.json, "application/json")


def test_errors_and_ops_conform(client, spec):
    bad = client.simulate_post(
        "/v1/recommend", json={"k": 0, "user": {"user_id": "u1"}}, headers=auth()
    )
    check(spec, "POST", "/v1/recommend", 400, bad.json, "application/problem+json")
    unauth = client.simulate_post("/v1/similar", json={"item_id": "a0"})
    check(spec, "POST", "/v1/similar", 401, unauth.json, "application/problem+json")
    check(spec, "GET", "/readyz", 200, client.simulate_get("/readyz").json, "application/json")
    check(spec, "GET", "/version", 200, client.simulate_get("/version").json, "application/json")


#: Routes mounted by issue 6 (serving/recs, serving/crr) that serving/openapi.py does not
#: describe yet; their owner adds them there and removes the prefix from this list.
def test_every_route_is_documented(client, spec):
    routes = set()

    def walk(nodes):
        for node in nodes:
            if node.resource is not None:
                routes.add(node.uri_template)
            walk(node.children)

    walk(client.app._router._roots)
    documented = set(spec["paths"]) | {"/openapi.json", "/docs"}
    assert documented <= routes  # nothing documented that does not exist
    missing = routes - documented
    assert not missing

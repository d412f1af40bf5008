"""Authentication, scopes and the tenant isolation matrix: no tenant reaches another tenant's
recommendations, similar items, config or rules through any route."""

from __future__ import annotations

import time

import jwt
import pytest
from serving_helpers import SECRET, auth, ids, token

from serving.auth import mint_token

PUBLIC_ROUTES = [
    ("POST", "/v1/recommend", {"k": 3, "user": {"user_id": "u1"}}),
    ("POST", "/v1/recommend/validate", {"user": {"user_id": "u1"}}),
    ("POST", "/v1/similar", {"item_id": "g0", "k": 3}),
]


def admin_routes(tenant):
    return [
        ("GET", f"/v1/admin/tenants/{tenant}/config", None),
        ("PUT", f"/v1/admin/tenants/{tenant}/config", {"defaults": {"k": 5}}),
        ("GET", f"/v1/admin/tenants/{tenant}/rules", None),
        ("PUT", f"/v1/admin/tenants/{tenant}/rules", {"rules": []}),
        ("POST", f"/v1/admin/tenants/{tenant}/cache/invalidate", {"targets": ["rules"]}),
    ]


def call(client, method, path, body, headers):
    return client.simulate_request(method, path, json=body, headers=headers)


def assert_problem(resp, status):
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.json["status"] == status and resp.json["request_id"]


@pytest.mark.parametrize("method,path,body", admin_routes("globex"))
def test_admin_of_one_tenant_cannot_touch_another(client, method, path, body):
    assert_problem(call(client, method, path, body, auth("acme", ("admin",))), 403)


@pytest.mark.parametrize("method,path,body", PUBLIC_ROUTES + admin_routes("globex"))
@pytest.mark.parametrize("org", ["globex", "ACME"])
def test_x_org_id_must_match_the_token(client, method, path, body, org):
    headers = auth("acme", ("admin",), **{"X-Org-Id": org})
    assert_problem(call(client, method, path, body, headers), 403)


@pytest.mark.parametrize("method,path,body", PUBLIC_ROUTES + admin_routes("acme"))
def test_every_route_needs_credentials(client, method, path, body):
    resp = call(client, method, path, body, {})
    assert_problem(resp, 401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("method,path,body", admin_routes("acme"))
def test_admin_routes_need_the_admin_scope(client, method, path, body):
    assert_problem(call(client, method, path, body, auth("acme", ("recommend",))), 403)
    assert call(client, method, path, body, auth("acme", ("admin",))).status_code in (200, 202)


def test_answers_come_only_from_the_callers_snapshot(client):
    # u1 exists in both tenants; each caller sees only its own ids, whatever it sends
    for tenant, prefix in (("acme", "a"), ("globex", "g")):
        for path, body in (
            ("/v1/recommend", {"k": 5, "user": {"user_id": "u1"}}),
            (
                "/v1/recommend",
                {"k": 5, "user": {"anonymous_id": "x"}, "anchors": {"item_ids": ["a0", "g0"]}},
            ),
            ("/v1/similar", {"item_id": "a0", "k": 5}),
            ("/v1/similar", {"item_id": "g0", "k": 5}),
        ):
            resp = client.simulate_post(path, json=body, headers=auth(tenant))
            assert resp.status_code == 200
            assert all(i.startswith(prefix) for i in ids(resp)), (tenant, path, ids(resp))
            assert resp.json["meta"]["tenant_id"] == tenant
    # a foreign item id is simply unknown: no similar items leak
    resp = client.simulate_post("/v1/similar", json={"item_id": "g0", "k": 5}, headers=auth("acme"))
    assert ids(resp) == []


def test_config_and_rules_are_per_tenant(client):
    put = client.simulate_put(
        "/v1/admin/tenants/globex/rules",
        json={"rules": [{"id": "secret-pin", "type": "pin", "item_id": "g9", "position": 1}]},
        headers=auth("globex", ("admin",)),
    )
    assert put.status_code == 200
    mine = client.simulate_get("/v1/admin/tenants/acme/rules", headers=auth("acme", ("admin",)))
    assert mine.json["rules"] == []
    # globex's pin affects only globex
    assert (
        ids(
            client.simulate_post(
                "/v1/recommend", json={"k": 2, "user": {"user_id": "u1"}}, headers=auth("globex")
            )
        )[0]
        == "g9"
    )
    assert (
        ids(
            client.simulate_post(
                "/v1/recommend", json={"k": 2, "user": {"user_id": "u1"}}, headers=auth("acme")
            )
        )[0]
        == "a0"
    )


def test_api_keys(client):
    resp = client.simulate_post(
        "/v1/recommend",
        json={"k": 2, "user": {"user_id": "u1"}},
        headers={"X-Api-Key": "acme-key-0123456789"},
    )
    assert resp.status_code == 200 and ids(resp) == ["a0", "a1"]
    assert_problem(
        client.simulate_get(
            "/v1/admin/tenants/acme/config", headers={"X-Api-Key": "acme-key-0123456789"}
        ),
        403,
    )
    assert_problem(
        client.simulate_get(
            "/v1/admin/tenants/acme/config", headers={"X-Api-Key": "globex-key-0123456789"}
        ),
        403,
    )
    assert_problem(
        client.simulate_post(
            "/v1/recommend", json={"user": {"user_id": "u1"}}, headers={"X-Api-Key": "wrong"}
        ),
        401,
    )


@pytest.mark.parametrize(
    "bad",
    [
        "not-a-jwt",
        jwt.encode(
            {"tenant_id": "acme", "scope": "recommend", "exp": int(time.time()) + 60},
            "other-secret-0123456789abcdef0123",
            algorithm="HS256",
        ),
        jwt.encode(
            {"tenant_id": "acme", "scope": "recommend", "exp": int(time.time()) - 60},
            SECRET,
            algorithm="HS256",
        ),
        jwt.encode(
            {"tenant_id": "acme", "scope": "recommend"}, SECRET, algorithm="HS256"
        ),  # no exp
    ],
)
def test_bad_tokens_are_401(client, bad):
    resp = client.simulate_post(
        "/v1/recommend",
        json={"user": {"user_id": "u1"}},
        headers={"Authorization": f"Bearer {bad}"},
    )
    assert_problem(resp, 401)


def test_token_without_tenant_is_403(client):
    bad = jwt.encode(
        {"scope": "recommend", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    assert_problem(
        client.simulate_post(
            "/v1/recommend",
            json={"user": {"user_id": "u1"}},
            headers={"Authorization": f"Bearer {bad}"},
        ),
        403,
    )


def test_rs256_tokens(data_root):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from serving_helpers import build_client, make_config

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem_private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem_public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    client = build_client(make_config(data_root, jwt_secret=None, jwt_public_key=pem_public))
    good = mint_token(pem_private, "acme", ["recommend"], 60, algorithm="RS256")
    resp = client.simulate_post(
        "/v1/recommend",
        json={"k": 1, "user": {"user_id": "u1"}},
        headers={"Authorization": f"Bearer {good}"},
    )
    assert resp.status_code == 200
    # an HS256 token (e.g. signed with the public key as secret) is refused
    assert_problem(
        client.simulate_post(
            "/v1/recommend",
            json={"user": {"user_id": "u1"}},
            headers={"Authorization": f"Bearer {token()}"},
        ),
        401,
    )

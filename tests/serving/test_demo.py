"""Demo mode (`serving.resources.demo`): off by default, and then nothing under /demo answers or
mints; on, the login mints short-lived tokens for the demo tenants only, and the page's lookups
read the caller's own snapshot."""

from __future__ import annotations

import time

import jwt
import pytest
from serving_helpers import SECRET, auth, build_client, make_config

from serving.config import ServingConfig


@pytest.fixture()
def demo(data_root):
    return build_client(make_config(data_root, demo_tenants=("acme",)))


def _login(client, tenant: str, admin: bool = False):
    return client.simulate_post("/demo/login", json={"tenant": tenant, "admin": admin})


def test_demo_mode_is_off_by_default(client):
    assert ServingConfig().demo_tenants == ()
    assert ServingConfig.from_env({}).demo_tenants == ()
    for path in ("/demo", "/demo/app.js", "/demo/info"):
        resp = client.simulate_get(path)
        assert resp.status_code == 404 and resp.json["code"] == "RECSYS_DEMO_OFF", path
    for tenant, admin in (("acme", False), ("acme", True), ("globex", True)):
        resp = _login(client, tenant, admin)
        assert resp.status_code == 404 and "token" not in resp.json
    resp = client.simulate_get("/demo/items", headers=auth("acme"))
    assert resp.status_code == 404


def test_the_env_turns_demo_mode_on():
    config = ServingConfig.from_env({"RECSYS_DEMO_TENANTS": "acme, globex"})
    assert config.demo_tenants == ("acme", "globex")


def test_login_mints_a_short_lived_token_for_a_demo_tenant(demo):
    resp = _login(demo, "acme")
    assert resp.status_code == 200
    body = resp.json
    assert body["tenant"] == "acme" and body["scopes"] == ["recommend"]
    claims = jwt.decode(body["token"], SECRET, algorithms=["HS256"])
    assert claims["tenant_id"] == "acme" and claims["scope"] == "recommend"
    assert 0 < claims["exp"] - time.time() <= 900 == body["expires_in"]
    assert resp.headers["Cache-Control"] == "no-store"
    # the token works on the API, for its tenant
    headers = {"Authorization": f"Bearer {body['token']}"}
    rec = demo.simulate_post("/v1/recommend", json={"user": {"user_id": "u1"}}, headers=headers)
    assert rec.status_code == 200 and rec.json["items"][0]["item_id"] == "a0"
    rules = demo.simulate_get("/v1/admin/tenants/acme/rules", headers=headers)
    assert rules.status_code == 403  # no admin scope unless asked for


def test_the_admin_login_is_for_the_demo_tenant_only(demo):
    body = _login(demo, "acme", admin=True).json
    assert body["scopes"] == ["recommend", "admin"]
    headers = {"Authorization": f"Bearer {body['token']}"}
    assert demo.simulate_get("/v1/admin/tenants/acme/rules", headers=headers).status_code == 200
    other = demo.simulate_get("/v1/admin/tenants/globex/rules", headers=headers)
    assert other.status_code == 403
    for admin in (False, True):  # globex is served, but not a demo tenant
        resp = _login(demo, "globex", admin)
        assert resp.status_code == 403 and resp.json["code"] == "RECSYS_DEMO_TENANT"
        assert "token" not in resp.json


@pytest.mark.parametrize(
    "body", [{"tenant": "../acme"}, {"tenant": "acme", "scope": "admin"}, {"admin": True}]
)
def test_a_bad_login_is_refused(demo, body):
    resp = demo.simulate_post("/demo/login", json=body)
    assert resp.status_code == 400 and "token" not in resp.json


def test_demo_mode_needs_a_jwt_secret(data_root):
    with pytest.raises(ValueError, match="RECSYS_JWT_SECRET"):
        build_client(make_config(data_root, demo_tenants=("acme",), jwt_secret=None))


def test_the_page_and_its_files(demo):
    page = demo.simulate_get("/demo")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert '<script type="module" src="/demo/app.js">' in page.text
    for name, media in (
        ("app.js", "text/javascript"),
        ("api.js", "text/javascript"),
        ("openapi-fetch.js", "text/javascript"),
        ("style.css", "text/css"),
    ):
        resp = demo.simulate_get(f"/demo/{name}")
        assert resp.status_code == 200 and resp.headers["Content-Type"].startswith(media), name
    assert demo.simulate_get("/demo/info").json == {"demo": True, "tenants": ["acme"]}
    assert demo.simulate_get("/demo/nothing.js").status_code == 401  # not a public file


def test_item_and_user_lookups_read_the_callers_snapshot(demo):
    resp = demo.simulate_get("/demo/items", params={"ids": "a3,a9,g1,zz"}, headers=auth("acme"))
    assert resp.status_code == 200
    items = {i["item_id"]: i for i in resp.json["items"]}
    assert set(items) == {"a3", "a9"} and resp.json["unknown"] == ["g1", "zz"]
    assert items["a3"]["price"] == 13.0 and items["a3"]["category"] == "c1"
    assert "title" not in items["a3"]  # (the tiny snapshots have no analyst copy to read it from)
    assert items["a3"]["tags"] == ["winter", "nike"] and items["a3"]["brand"] == "nike"
    first = demo.simulate_get("/demo/items", params={"limit": 3}, headers=auth("acme")).json
    assert [i["item_id"] for i in first["items"]] == ["a0", "a1", "a2"]
    assert first["items"][2]["available"] is False
    users = demo.simulate_get("/demo/users", params={"limit": 2}, headers=auth("acme")).json
    assert users["users"] == ["u1", "u2"]
    assert demo.simulate_get("/demo/items").status_code == 401
    # a tenant outside the demo gets nothing from these lookups
    assert demo.simulate_get("/demo/items", headers=auth("globex")).status_code == 404

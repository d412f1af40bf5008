"""The Common Recommender REST API under /v1/crr: records with revision ids landed for the
pipeline, events with their filters, predictions, recommendations, statistics; plus the tenant
isolation matrix of every new issue-6 route (/v1/crr and the /v1/recs loop routes)."""

from __future__ import annotations

import jsonschema
import pytest
from serving_helpers import auth

from recsys.ingest import build_table
from recsys.storage import Storage

ADMIN = auth("acme", ("admin",))
ITEM = {
    "title": "Boot",
    "category": "shoes",
    "brand": "acme",
    "price": 99.5,
    "tags": ["winter", "leather"],
    "attributes": {"colour": "brown"},
}


def test_items_have_revisions_and_land_for_the_pipeline(client, data_root):
    made = client.simulate_post("/v1/crr/items", json={"iid": "boot-1", **ITEM}, headers=ADMIN)
    assert made.status_code == 201, made.json
    rid = made.json["rid"]
    assert made.headers["ETag"] == f'"{rid}"' and made.json["tags"] == ["winter", "leather"]
    assert (
        client.simulate_post("/v1/crr/items", json={"iid": "boot-1"}, headers=ADMIN).status_code
        == 409
    )
    no_rid = client.simulate_put(
        "/v1/crr/items/boot-1", json={**ITEM, "price": 79.0}, headers=ADMIN
    )
    assert no_rid.status_code == 428
    wrong = client.simulate_put("/v1/crr/items/boot-1", json={**ITEM, "rid": "nope"}, headers=ADMIN)
    assert wrong.status_code == 409 and wrong.json["current_version"] == rid
    upd = client.simulate_put(
        "/v1/crr/items/boot-1", json={**ITEM, "price": 79.0, "rid": rid}, headers=ADMIN
    )
    assert upd.status_code == 200 and upd.json["rid"] != rid and upd.json["price"] == 79.0
    got = client.simulate_get("/v1/crr/items/boot-1", headers=auth())
    assert got.json["rid"] == upd.json["rid"]
    bad = client.simulate_put("/v1/crr/items/boot-2", json={"price": -1}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json["reason"] == "bad_value"
    fresh = client.simulate_put("/v1/crr/items/boot-3", json={"title": "New"}, headers=ADMIN)
    assert fresh.status_code == 201
    # the pipeline's own table builder reads the landed rows: the update wins
    table, report = build_table(Storage(data_root), "acme", "items")
    rows = {r["item_id"]: r for r in table.iter_rows(named=True)}
    assert rows["boot-1"]["price"] == 79.0 and rows["boot-1"]["tags"] == ["winter", "leather"]
    assert rows["boot-1"]["category"] == "shoes" and report.rejected == 0
    deleted = client.simulate_delete("/v1/crr/items/boot-1", headers=ADMIN)
    assert deleted.status_code == 200
    assert client.simulate_get("/v1/crr/items/boot-1", headers=auth()).status_code == 404
    table, _ = build_table(Storage(data_root), "acme", "items")
    assert table.filter(table["item_id"] == "boot-1")["available"].to_list() == [False]


def test_users_with_events_in_the_body(client, data_root):
    made = client.simulate_post(
        "/v1/crr/users",
        headers=ADMIN,
        json={
            "uid": "alice",
            "segment": "vip",
            "country": "FI",
            "events": [{"iid": "a1", "type": "rating", "value": 4, "timestamp": 1735725600}],
        },
    )
    assert made.status_code == 201, made.json
    assert made.json["events"][0]["status"] == "accepted"
    table, _ = build_table(Storage(data_root), "acme", "users")
    assert table.row(0, named=True)["segment"] == "vip"
    generated = client.simulate_post("/v1/crr/users", json={"country": "SE"}, headers=ADMIN)
    assert generated.status_code == 201 and generated.json["uid"].startswith("u-")
    assert (
        client.simulate_get(f"/v1/crr/users/{generated.json['uid']}", headers=auth()).json[
            "country"
        ]
        == "SE"
    )


def _post(client, uid, etype, **ev):
    return client.simulate_post(f"/v1/crr/users/{uid}/events/{etype}", json=ev, headers=auth())


@pytest.fixture()
def history(client):
    """u1: rating a1=2 (2025-01-01) then a1=5 (2025-01-03), rating a2 null, purchase a3;
    u2: rating a1=3. Timestamps are epoch seconds, as the API shows them."""
    day = 86400
    t0 = 1735689600  # 2025-01-01T00:00:00Z
    assert _post(client, "u1", "ratings", iid="a1", value=2, timestamp=t0).status_code == 201
    _post(client, "u1", "ratings", iid="a1", value=5, timestamp=t0 + 2 * day)
    _post(client, "u1", "ratings", iid="a2", timestamp=t0 + day)
    _post(client, "u1", "purchases", iid="a3", value=1, timestamp=t0 + 3 * day)
    _post(client, "u2", "rating", iid="a1", value=3, timestamp=t0)
    return t0


def test_event_queries_and_filters(client, history):
    every = client.simulate_get("/v1/crr/users/u1/events", headers=auth()).json
    assert [(e["type"], e["iid"], e["value"]) for e in every["events"]] == [
        ("rating", "a1", 2.0),
        ("rating", "a2", None),
        ("rating", "a1", 5.0),
        ("purchase", "a3", 1.0),
    ]
    assert every["events"][0]["timestamp"] == history
    ratings = client.simulate_get(
        "/v1/crr/users/u1/events/ratings",
        params={"null": "false", "item": ["a1", "a2"]},
        headers=auth(),
    ).json
    assert [e["value"] for e in ratings["events"]] == [2.0, 5.0]
    current = client.simulate_get(
        "/v1/crr/users/u1/events/ratings",
        params={"history": "current", "null": "false"},
        headers=auth(),
    ).json
    assert [(e["iid"], e["value"]) for e in current["events"]] == [("a1", 5.0)]
    assert client.simulate_get("/v1/crr/users/u1/currentRatings", headers=auth()).json[
        "ratings"
    ] == {"a1": 5.0}
    recent = client.simulate_get(
        "/v1/crr/users/u1/events", params={"history": "1m"}, headers=auth()
    ).json
    assert recent["total"] == 0  # all of it is older than a month
    by_item = client.simulate_get(
        "/v1/crr/items/a1/events/ratings", params={"user": "u2"}, headers=auth()
    ).json
    assert [(e["uid"], e["value"]) for e in by_item["events"]] == [("u2", 3.0)]
    page = client.simulate_get("/v1/crr/items/a1/events", params={"limit": 2}, headers=auth())
    assert page.json["total"] == 3 and page.json["next_cursor"] == "2"
    assert (
        client.simulate_get("/v1/crr/users/u1/events/teleports", headers=auth()).status_code == 404
    )
    assert (
        client.simulate_get(
            "/v1/crr/users/u1/events", params={"history": "soon"}, headers=auth()
        ).status_code
        == 400
    )
    eid = every["events"][3]["eid"]
    assert client.simulate_get(f"/v1/crr/events/{eid}", headers=auth()).json["iid"] == "a3"
    assert client.simulate_delete(f"/v1/crr/events/{eid}", headers=auth()).status_code == 403
    assert client.simulate_delete(f"/v1/crr/events/{eid}", headers=ADMIN).status_code == 200
    assert client.simulate_get(f"/v1/crr/events/{eid}", headers=auth()).status_code == 410
    spec = client.simulate_get("/openapi.json").json
    schema = spec["paths"]["/v1/crr/users/{uid}/events"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(every)


def test_predictions_recommendations_and_statistics(client, history):
    preds = client.simulate_get(
        "/v1/crr/users/u1/predictions", params={"item": ["a1", "a3", "zzz"]}, headers=auth()
    ).json
    assert [(p["iid"], p["value"], p["source"]) for p in preds["predictions"]] == [
        ("a1", 0.8, "candidates"),
        ("a3", 0.6, "candidates"),
        ("zzz", None, None),
    ]
    stored = client.simulate_get(
        "/v1/crr/users/u1/predictions",
        params={"item": "a1", "useStoredRatings": "true"},
        headers=auth(),
    ).json
    assert stored["predictions"] == [{"iid": "a1", "value": 5.0, "source": "rating"}]
    allp = client.simulate_get(
        "/v1/crr/users/u1/predictions", params={"limit": 3}, headers=auth()
    ).json
    assert [p["iid"] for p in allp["predictions"]] == ["a0", "a1", "a2"] and allp["truncated"]
    assert (
        client.simulate_get("/v1/crr/users/nobody/predictions", headers=auth()).status_code == 404
    )
    recs = client.simulate_get(
        "/v1/crr/users/u1/recommendations", params={"count": 3}, headers=auth()
    ).json
    assert [r["iid"] for r in recs["recommendations"]] == ["a0", "a1", "a3"]
    many = client.simulate_get(
        "/v1/crr/users/u1/recommendations", params={"count": 5000}, headers=auth()
    )
    assert (
        many.status_code == 200 and len(many.json["recommendations"]) == 18
    )  # 20 - a2 (unavailable) - a8 (seen)
    user = client.simulate_get("/v1/crr/users/u1/statistics", headers=auth()).json
    assert user["events"] == 4 and user["events_by_type"] == {"purchase": 1, "rating": 3}
    assert user["mean_rating"] == 3.5 and user["in_snapshot"] and user["candidates"] == 8
    item = client.simulate_get("/v1/crr/items/a1/statistics", headers=auth()).json
    assert item["distinct_users"] == 2 and item["mean_rating"] == pytest.approx(10 / 3, abs=1e-6)
    system = client.simulate_get("/v1/crr/statistics", headers=auth()).json
    assert system["events"] == 5 and system["snapshot"]["items"] == 20
    assert system["distinct_users"] == 2 and system["distinct_items"] == 3


# --- tenant isolation of every new route --------------------------------------------------------
NEW_ROUTES = [
    ("GET", "/v1/crr/users/{u}"),
    ("PUT", "/v1/crr/users/{u}"),
    ("DELETE", "/v1/crr/users/{u}"),
    ("GET", "/v1/crr/items/{i}"),
    ("DELETE", "/v1/crr/items/{i}"),
    ("GET", "/v1/crr/items/{i}/statistics"),
    ("GET", "/v1/crr/statistics"),
    ("GET", "/v1/crr/users/{u}/events"),
    ("GET", "/v1/crr/items/{i}/events/ratings"),
    ("GET", "/v1/crr/events/{e}"),
    ("GET", "/v1/crr/users/{u}/currentRatings"),
    ("GET", "/v1/crr/users/{u}/recommendations"),
    ("GET", "/v1/crr/users/{u}/predictions"),
    ("GET", "/v1/recs/experiments/{x}"),
    ("PATCH", "/v1/recs/experiments/{x}"),
    ("DELETE", "/v1/recs/experiments/{x}"),
    ("GET", "/v1/recs/experiments/{x}/results"),
    ("POST", "/v1/recs/experiments/{x}/assign"),
    ("GET", "/v1/recs/seed"),
    ("POST", "/v1/recs/rerank"),
    ("POST", "/v1/recs/explain"),
]


@pytest.fixture()
def acme_world(client):
    """acme owns a user, an item, an event, an experiment and a seed."""
    client.simulate_put("/v1/crr/users/secret-user", json={"segment": "marker-seg"}, headers=ADMIN)
    client.simulate_put("/v1/crr/items/secret-item", json={"title": "marker-title"}, headers=ADMIN)
    eid = _post(client, "secret-user", "ratings", iid="secret-item", value=4.25).json["eid"]
    client.simulate_post(
        "/v1/recs/experiments",
        json={"id": "secret-exp", "name": "marker-name", "variants": [{"id": "A"}, {"id": "B"}]},
        headers=ADMIN,
    )
    client.simulate_post(
        "/v1/recs/seed", json={"surface": "home", "item_ids": ["a1"]}, headers=ADMIN
    )
    return {"u": "secret-user", "i": "secret-item", "e": eid, "x": "secret-exp"}


def _body(method, path):
    if "rerank" in path:
        return {"user_id": "u1", "candidates": ["a0", "g0"]}
    if "explain" in path:
        return {"user_id": "u1", "item_id": "a0"}
    if "assign" in path:
        return {"user_id": "u1", "variant": "A"}
    if method == "PATCH":
        return {"status": "paused"}
    return {"segment": "x"} if method == "PUT" else None


@pytest.mark.parametrize("method,template", NEW_ROUTES)
def test_no_tenant_reaches_another_tenants_data(client, acme_world, method, template):
    path = template.format(**acme_world)
    body = _body(method, path)
    spy = client.simulate_request(method, path, json=body, headers=auth("globex", ("admin",)))
    # a foreign id the caller sent is echoed back as unknown, which leaks nothing
    text = spy.text.replace('{"item_id":"a0","outcome":"unknown","rule":null}', "")
    assert "marker" not in text and "4.25" not in text, (path, text)  # none of acme's data
    assert not any(f'"a{n}"' in text for n in range(20)), (path, text)  # no acme item ids
    if (
        template in ("/v1/crr/users/{u}", "/v1/crr/items/{i}", "/v1/crr/events/{e}")
        and (method != "PUT")
        or "experiments/" in template
    ):
        assert spy.status_code == 404, (path, spy.status_code)
    if method == "PUT":  # globex created its own record of that id; acme's is untouched
        mine = client.simulate_get(path, headers=auth("acme"))
        assert mine.json["segment"] == "marker-seg"
    assert client.simulate_request(method, path, json=body, headers={}).status_code == 401
    org = auth("acme", ("admin",), **{"X-Org-Id": "globex"})
    assert client.simulate_request(method, path, json=body, headers=org).status_code == 403

"""The Common Recommender REST API under /v1/crr: records with revision ids landed for the
pipeline, events with their filters, predictions, recommendations, statistics; plus the tenant
isolation matrix of every new issue-6 route (/v1/crr and the /v1/recs loop routes)."""

from __future__ import annotations

import datetime as dt
import os

import jsonschema
import pytest
from serving_helpers import auth

from recsys.ingest import build_table
from recsys.storage import Storage
from serving.crr.resources import event_json

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
    # the schema's bounds answer 400 naming the field; the contract's own checks 422
    bad = client.simulate_put("/v1/crr/items/boot-2", json={"price": -1}, headers=ADMIN)
    assert bad.status_code == 400 and "`body.price`" in bad.json["detail"]
    wide = client.simulate_put("/v1/crr/items/boot-2", json={"brand": "é" * 200}, headers=ADMIN)
    assert wide.status_code == 422 and wide.json["reason"] == "oversize_field"  # 400 bytes
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
    ages = client.simulate_get(
        "/v1/crr/users/u1/events", params={"history": "999999y"}, headers=auth()
    )  # (a window reaching before year 1 holds every event)
    assert ages.status_code == 200 and ages.json["total"] == 4
    by_item = client.simulate_get(
        "/v1/crr/items/a1/events/ratings", params={"user": "u2"}, headers=auth()
    ).json
    assert [(e["uid"], e["value"]) for e in by_item["events"]] == [("u2", 3.0)]
    page = client.simulate_get("/v1/crr/items/a1/events", params={"limit": 2}, headers=auth())
    assert page.json["total"] == 3 and page.json["next_cursor"] == "2"
    teleports = client.simulate_get("/v1/crr/users/u1/events/teleports", headers=auth())
    assert teleports.status_code == 400 and "'event_type'" in teleports.json["detail"]
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


# --- the generated spec: real requests and answers of every /v1/crr operation conform -----
JSON, PROBLEM = "application/json", "application/problem+json"


@pytest.fixture()
def spec(client):
    return client.simulate_get("/openapi.json").json


class Conformance:
    """Sends requests and checks each one and its answer against the generated spec: the body
    is valid for the operation's request schema (or, for `refused`, invalid), the status is one
    the operation lists, and the answer validates against that status's schema."""

    def __init__(self, client, spec) -> None:
        self.client, self.spec = client, spec
        self.seen: set[tuple[str, str]] = set()

    def schema(self, schema: dict) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator({**schema, "components": self.spec["components"]})

    def request_schema(self, method: str, template: str) -> jsonschema.Draft202012Validator:
        op = self.spec["paths"][template][method.lower()]
        return self.schema(op["requestBody"]["content"][JSON]["schema"])

    def __call__(self, method, template, status, path=None, body=None, headers=ADMIN, **kw):
        if body is not None:
            self.request_schema(method, template).validate(body)
        return self._send(method, template, status, path, body, headers, **kw)

    def refused(self, method, template, path, body, field) -> None:
        """A body the schema forbids: 400 naming `field`."""
        assert not self.request_schema(method, template).is_valid(body), body
        resp = self._send(method, template, 400, path, body, ADMIN)
        assert field in resp.json["detail"], (field, resp.json["detail"])

    def _send(self, method, template, status, path, body, headers, **kw):
        resp = self.client.simulate_request(
            method, path or template, json=body, headers=headers, **kw
        )
        assert resp.status_code == status, (method, path or template, resp.status_code, resp.text)
        listed = self.spec["paths"][template][method.lower()]["responses"]
        assert str(status) in listed, (method, template, status)
        media = PROBLEM if status >= 400 else JSON
        self.schema(listed[str(status)]["content"][media]["schema"]).validate(resp.json)
        self.seen.add((method, template))
        return resp


def test_every_crr_operation_answers_as_its_schema_says(client, spec):
    send = Conformance(client, spec)
    users, user = "/v1/crr/users", "/v1/crr/users/{uid}"
    items, item = "/v1/crr/items", "/v1/crr/items/{iid}"
    alice = send(
        "POST",
        users,
        201,
        body={
            "uid": "alice",
            "segment": "vip",
            "country": "FI",
            "attributes": {"age": 31},
            "events": [
                {"iid": "a1", "type": "ratings", "value": 4.5, "timestamp": "2025-01-02T03:04:05Z"},
                {"iid": "a3", "type": "purchase", "timestamp": 1735725600, "context": {"p": 1}},
                {"iid": "a4", "type": "view", "timestamp": "2099-01-01T00:00:00Z"},
            ],
        },
    ).json
    assert [e["status"] for e in alice["events"]] == ["accepted", "accepted", "rejected"]
    assert alice["events"][2]["reason"] == "bad_timestamp" and alice["events"][2]["eid"] is None
    assert "generated_id" not in alice
    made = send("POST", users, 201, body={}).json
    assert made["generated_id"] is True and set(made) == {
        "uid",
        "rid",
        "created_at",
        "updated_at",
        "generated_id",
    }
    send("POST", users, 409, body={"uid": "alice"})
    huge = send("POST", users, 422, body={"uid": "x", "attributes": {"n": 2**70}})
    assert huge.json["reason"] == "bad_value"  # (JSON allows it; the contract's text cannot)
    path = "/v1/crr/users/alice"
    send("PUT", user, 428, path, body={"segment": "gold"})
    send("PUT", user, 409, path, body={"segment": "gold", "rid": "stale"})
    gold = send("PUT", user, 200, path, body={"segment": "gold", "rid": alice["rid"]}).json
    assert gold["segment"] == "gold" and "country" not in gold  # a PUT replaces the record
    send("PUT", user, 422, path, body={"uid": "bob"})
    send("PUT", user, 201, "/v1/crr/users/bob", body={"country": None})
    padded = send("PUT", user, 400, "/v1/crr/users/bob%20", body={})  # (ids are trimmed)
    assert "path parameter 'uid'" in padded.json["detail"]
    assert send("GET", user, 200, path, headers=auth()).json["rid"] == gold["rid"]
    send("GET", user, 404, "/v1/crr/users/nobody", headers=auth())
    send("GET", "/v1/crr/users/{uid}/statistics", 200, "/v1/crr/users/u1/statistics")
    send("GET", "/v1/crr/users/{uid}/statistics", 404, "/v1/crr/users/nobody/statistics")
    send("DELETE", user, 409, path, headers={**ADMIN, "If-Match": '"stale"'})
    gone = send("DELETE", user, 200, path, headers={**ADMIN, "If-Match": f'"{gold["rid"]}"'})
    assert gone.json == {"uid": "alice", "rid": gold["rid"], "status": "deleted"}
    send("DELETE", user, 404, path)

    boot = send(
        "POST", items, 201, body={"iid": "boot-1", **ITEM, "created_at": "2024-05-01T00:00:00Z"}
    ).json
    assert boot["tags"] == ["winter", "leather"] and "available" not in boot
    ipath = "/v1/crr/items/boot-1"
    upd = send("PUT", item, 200, ipath, body={**ITEM, "available": False, "rid": boot["rid"]})
    assert upd.json["available"] is False
    send("PUT", item, 422, "/v1/crr/items/boot-2", body={"category": "é" * 200})
    send("GET", item, 200, ipath, headers=auth())
    send("GET", "/v1/crr/items/{iid}/statistics", 200, "/v1/crr/items/a1/statistics")
    send("GET", "/v1/crr/items/{iid}/statistics", 404, "/v1/crr/items/nothing/statistics")
    send("DELETE", item, 412, ipath, headers={**ADMIN, "If-None-Match": "*"})
    send("DELETE", item, 200, ipath)  # (If-Match is optional for a delete)

    of_type = "/v1/crr/users/{uid}/events/{event_type}"
    one = {"iid": "a1", "eid": "e-1", "value": 2, "timestamp": 1735689600}
    first = send("POST", of_type, 201, "/v1/crr/users/u1/events/ratings", body=one, headers=auth())
    assert first.json == {"eid": "e-1", "status": "accepted"}
    again = send("POST", of_type, 200, "/v1/crr/users/u1/events/rating", body=one, headers=auth())
    assert again.json == {"eid": "e-1", "status": "duplicate"}
    late = {"iid": "a1", "timestamp": "2099-01-01T00:00:00Z"}
    refused = send("POST", of_type, 422, "/v1/crr/users/u1/events/ratings", body=late)
    assert refused.json["reason"] == "bad_timestamp"
    batch = send(
        "POST",
        of_type,
        200,
        "/v1/crr/users/u1/events/views",
        body=[
            {"iid": "a2"},
            late,
            {"iid": "a5", "session_id": "s", "context": {"page": "home"}},
            {"iid": "a6", "context": {"n": 2**64}},
        ],
        headers=auth(),
    ).json
    outcomes = [(e["status"], e["reason"]) for e in batch["events"]]
    assert outcomes == [
        ("accepted", None),
        ("rejected", "bad_timestamp"),
        ("accepted", None),
        ("rejected", "unparsable"),
    ]

    u1 = "/v1/crr/users/u1"
    listed = send("GET", "/v1/crr/users/{uid}/events", 200, f"{u1}/events", headers=auth()).json
    assert listed["total"] == 3 and listed["next_cursor"] is None
    ratings = send(
        "GET", of_type, 200, f"{u1}/events/ratings", headers=auth(), params={"item": "a1"}
    ).json
    assert [(e["eid"], e["value"], e["timestamp"]) for e in ratings["events"]] == [
        ("e-1", 2.0, 1735689600)
    ]
    by_item = send(
        "GET",
        "/v1/crr/items/{iid}/events",
        200,
        "/v1/crr/items/a5/events",
        headers=auth(),
        params={"user": ["u1", "u9"], "limit": 1},
    ).json
    assert by_item["events"][0]["context"] == {"page": "home"} and by_item["total"] == 1
    send(
        "GET",
        "/v1/crr/items/{iid}/events/{event_type}",
        200,
        "/v1/crr/items/a1/events/ratings",
        headers=auth(),
        params={"history": "current", "null": "false"},
    )
    current = send("GET", "/v1/crr/users/{uid}/currentRatings", 200, f"{u1}/currentRatings")
    assert current.json == {"uid": "u1", "ratings": {"a1": 2.0}}
    # an id known nowhere (no record, events or snapshot entry) is 404; a known one without
    # events (u3 is in the snapshot) is an empty answer
    send("GET", "/v1/crr/users/{uid}/events", 404, "/v1/crr/users/nobody/events")
    send("GET", "/v1/crr/items/{iid}/events", 404, "/v1/crr/items/boot-9/events")
    send("GET", "/v1/crr/users/{uid}/currentRatings", 404, "/v1/crr/users/nobody/currentRatings")
    send("GET", of_type, 200, "/v1/crr/users/u3/events/ratings")
    empty = send(
        "GET", "/v1/crr/users/{uid}/currentRatings", 200, "/v1/crr/users/u3/currentRatings"
    )
    assert empty.json == {"uid": "u3", "ratings": {}}

    event = "/v1/crr/events/{eid}"
    assert send("GET", event, 200, "/v1/crr/events/e-1", headers=auth()).json["type"] == "rating"
    send("GET", event, 404, "/v1/crr/events/e-none", headers=auth())
    assert send("DELETE", event, 200, "/v1/crr/events/e-1").json["status"] == "deleted"
    assert send("DELETE", event, 200, "/v1/crr/events/e-1").json["status"] == "already_deleted"
    send("GET", event, 410, "/v1/crr/events/e-1", headers=auth())

    preds = "/v1/crr/users/{uid}/predictions"
    asked = send(
        "GET", preds, 200, f"{u1}/predictions", headers=auth(), params={"item": ["a0", "zz"]}
    ).json
    assert asked["predictions"] == [
        {"iid": "a0", "value": 0.9, "source": "candidates", "known": True},
        {"iid": "zz", "value": None, "source": None, "known": False},
    ]
    send("GET", preds, 200, f"{u1}/predictions", params={"usedStoredRatings": "true", "limit": 2})
    send("GET", preds, 404, "/v1/crr/users/nobody/predictions", headers=auth())
    recs = send(
        "GET",
        "/v1/crr/users/{uid}/recommendations",
        200,
        f"{u1}/recommendations",
        headers=auth(),
        params={"count": 2},
    ).json
    assert [(r["iid"], r["rank"]) for r in recs["recommendations"]] == [("a0", 1), ("a1", 2)]
    system = send("GET", "/v1/crr/statistics", 200, headers=auth()).json
    assert system["records"] == {"users": 2, "items": 0} and system["events"] == 4  # e-1 gone

    crr_operations = {
        (method.upper(), path)
        for path, ops in spec["paths"].items()
        if path.startswith("/v1/crr/")
        for method in ops
    }
    assert send.seen == crr_operations


REFUSED = [
    ("POST", "/v1/crr/users", None, {"uid": ""}, "`body.uid`"),
    ("POST", "/v1/crr/users", None, {"uid": " alice"}, "`body.uid`"),
    ("POST", "/v1/crr/users", None, {"uid": "alice\n"}, "`body.uid`"),
    ("POST", "/v1/crr/users", None, {"uid": "\x85alice"}, "`body.uid`"),  # (NEL: a blank)
    ("POST", "/v1/crr/users", None, {"nickname": "x"}, "unknown field `nickname`"),
    ("POST", "/v1/crr/users", None, {"attributes": [1]}, "`body.attributes`"),
    ("POST", "/v1/crr/users", None, {"events": [{"iid": "a1"}]}, "`type` - at `body.events[0]`"),
    ("POST", "/v1/crr/users", None, {"events": [{"iid": "a", "type": "x"}]}, "events[0].type"),
    ("POST", "/v1/crr/items", None, {"tags": "a,b"}, "`body.tags`"),
    ("POST", "/v1/crr/items", None, {"price": "9.5"}, "`body.price`"),
    ("POST", "/v1/crr/items", None, {"events": []}, "unknown field `events`"),
    ("POST", "/v1/crr/items", None, {"item_id": "x"}, "unknown field `item_id`"),
    ("POST", "/v1/crr/items", None, {"created_at": "0000-01-01T00:00:00Z"}, "`body.created_at`"),
    ("PUT", "/v1/crr/items/{iid}", "/v1/crr/items/x", {"available": "yes"}, "`body.available`"),
    ("PUT", "/v1/crr/items/{iid}", "/v1/crr/items/x", {"title": "t" * 1025}, "`body.title`"),
    ("PUT", "/v1/crr/users/{uid}", "/v1/crr/users/x", {"rid": 7}, "`body.rid`"),
    ("PUT", "/v1/crr/users/{uid}", "/v1/crr/users/x", [], "Expected `object`"),
]
EVENTS = "/v1/crr/users/{uid}/events/{event_type}"
REFUSED += [
    ("POST", EVENTS, "/v1/crr/users/u1/events/ratings", body, field)
    for body, field in (
        ({"iid": "a1", "type": "rating"}, "unknown field `type`"),
        ({"value": 3}, "missing required field `iid`"),
        ({"iid": "a1", "value": "3"}, "`body.value`"),
        ({"iid": "a1", "timestamp": "yesterday"}, "`body.timestamp`"),
        ({"iid": "a1", "timestamp": "2025-13-01T00:00:00Z"}, "`body.timestamp`"),
        ({"iid": "a1", "timestamp": "2025-06-31T00:00:00Z"}, "`body.timestamp`"),
        ({"iid": "a1", "timestamp": "2025-01-01T00:00:00+13:79"}, "`body.timestamp`"),
        ({"iid": "a1", "timestamp": "1989-12-31T23:59:59Z"}, "`body.timestamp`"),
        ({"iid": "a1", "timestamp": 1e300}, "`body.timestamp`"),
        ({"iid": "a1", "context": "home"}, "`body.context`"),
        ([{"iid": "a1"}] * 1001, "length <= 1000"),
        ("a1", "Expected `object | array`"),
    )
]


@pytest.mark.parametrize("method,template,path,body,field", REFUSED)
def test_bodies_the_schema_forbids_are_400_naming_the_field(
    client, spec, data_root, method, template, path, body, field
):
    Conformance(client, spec).refused(method, template, path or template, body, field)
    # nothing was stored, landed or logged
    assert client.simulate_get("/v1/crr/statistics", headers=auth()).json["events"] == 0
    assert client.simulate_get("/v1/crr/statistics", headers=auth()).json["records"] == {
        "users": 0,
        "items": 0,
    }
    assert not os.path.exists(os.path.join(data_root, "landing"))


@pytest.mark.parametrize(
    "path,params,field",
    [
        ("/v1/crr/users/u1/events", {"history": "soon"}, "`query.history`"),
        ("/v1/crr/users/u1/events", {"history": "all\n"}, "`query.history`"),
        ("/v1/crr/users/u1/events", {"limit": "0"}, "`query.limit`"),
        ("/v1/crr/items/a1/events", {"cursor": "-1"}, "`query.cursor`"),
        ("/v1/crr/items/a1/events", {"cursor": str(2**63)}, "`query.cursor`"),
        ("/v1/crr/items/a1/events", {"null": "maybe"}, "`query.null`"),
        ("/v1/crr/users/u1/predictions", {"item": "x" * 257}, "`query.item`"),
        ("/v1/crr/users/u1/predictions", {"useStoredRatings": "2"}, "`query.useStoredRatings`"),
        ("/v1/crr/users/u1/recommendations", {"count": "0"}, "`query.count`"),
        ("/v1/crr/users/u1/events/teleports", {}, "path parameter 'event_type'"),
    ],
)
def test_queries_the_schema_forbids_are_400_naming_the_parameter(client, path, params, field):
    resp = client.simulate_get(path, params=params, headers=auth())
    assert resp.status_code == 400 and field in resp.json["detail"], resp.json


def test_event_context_an_import_kept_as_text_is_shown_as_that_text(spec):
    at = dt.datetime(2025, 1, 1, 0, 0, 0, 500_000, tzinfo=dt.UTC)
    row = {
        "event_id": "e",
        "event_type": "view",
        "user_id": "u",
        "item_id": "i",
        "timestamp": at,
        "value": None,
        "session_id": None,
    }
    shown = [event_json({**row, "context": c})["context"] for c in ('{"a":1}', "page=home", "[1]")]
    assert shown == [{"a": 1}, "page=home", "[1]"]
    event = event_json({**row, "context": None})
    assert event["timestamp"] == 1735689600.5 and event["time"] == "2025-01-01T00:00:00.500000Z"
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/CrrEvent", "components": spec["components"]}
    )
    for context in ('{"a":1}', "page=home", None):
        validator.validate(event_json({**row, "context": context}))

"""Every /v1/recs operation conforms to the generated /openapi.json: real requests (bodies
validated against their schema first) and the answers the handlers send (successes and
problems) validate with jsonschema, on a tiny snapshot with stored factors. Also: bodies the
schema forbids are refused (400 naming the field; an event: 422 with the data contract's
reason), and schema-valid bodies that the second pass refuses get their documented 422."""

from __future__ import annotations

import os

import jsonschema
import msgspec
import numpy as np
import orjson
import pytest
import serving_helpers
from serving_helpers import auth, build_client, make_config, write_tiny_snapshot

from recsys.snapshot import SnapshotStore
from recsys.validation import MISSING_ITEM, MISSING_USER, OVERSIZE_EVENT_FIELD
from serving import control
from serving.recs.schemas import Event, event_reason

ADMIN = auth("acme", ("admin",))
EV = {"type": "click", "user_id": "u1", "item_id": "a1", "timestamp": "2025-01-01T10:00:00Z"}


@pytest.fixture()
def client(tmp_path):
    """acme with factors (item i: (1, i/10); users u1 (0, 1), u2 (1, 0), u3 (1, 1))."""
    root = str(tmp_path)
    store = SnapshotStore(os.path.join(root, "snapshots", "acme"))
    tmp = store.new_tmp_dir()
    items = np.stack([np.ones(20), np.arange(20) / 10], axis=1).astype(np.float32)
    users = np.array([[0, 1], [1, 0], [1, 1]], dtype=np.float32)
    orig = serving_helpers.write_snapshot

    def with_factors(*a, **kw):
        return orig(*a, factors=(users, items, np.zeros(20, dtype=np.float32)), **kw)

    serving_helpers.write_snapshot = with_factors
    try:
        write_tiny_snapshot(tmp, "acme", "a")
    finally:
        serving_helpers.write_snapshot = orig
    store.publish(tmp, checksums=False, prune=False)
    return build_client(make_config(root))


class Conformance:
    """Sends requests and validates them and their answers against the spec; remembers
    which operations it saw."""

    def __init__(self, client) -> None:
        self.client = client
        self.spec = client.simulate_get("/openapi.json").json
        self.seen: set[tuple[str, str]] = set()

    def validate(self, schema: dict, value) -> None:
        root = {**schema, "components": self.spec["components"]}
        jsonschema.Draft202012Validator(root).validate(value)

    def __call__(self, method, template, status, path=None, body=None, headers=None, **kw):
        op = self.spec["paths"][template][method.lower()]
        if body is not None and status not in (400, 422):
            self.validate(op["requestBody"]["content"]["application/json"]["schema"], body)
        resp = self.client.simulate_request(
            method,
            path or template,
            json=body,
            headers=headers or ADMIN,
            **kw,
        )
        assert resp.status_code == status, (method, path or template, resp.status_code, resp.text)
        assert str(status) in op["responses"], (method, template, status)
        answer = op["responses"][str(status)]
        if "content" in answer:
            ((media, content),) = answer["content"].items()
            assert resp.headers["Content-Type"].startswith(media), resp.headers["Content-Type"]
            self.validate(content["schema"], resp.json)
        else:
            assert not resp.content
        self.seen.add((method, template))
        return resp


def test_every_recs_operation_conforms(client):
    call = Conformance(client)
    # events
    first = call("POST", "/v1/recs/events", 201, body={**EV, "event_id": "e1", "value": 2})
    assert first.json == {"status": "accepted", "event_id": "e1"}
    call("POST", "/v1/recs/events", 200, body={**EV, "event_id": "e1", "value": 2})
    bad = call("POST", "/v1/recs/events", 422, body={**EV, "type": "teleport"})
    assert bad.json["reason"] == "unknown_event_type"
    call("POST", "/v1/recs/events", 400, body=[EV])
    bulk = call(
        "POST",
        "/v1/recs/events/bulk",
        200,
        body=[{**EV, "event_id": "e2"}, {**EV, "user_id": 7}, {**EV, "metadata": {"p": 1}}],
    )
    assert bulk.json["event_ids"][:2] == ["e2", None]
    assert bulk.json["errors"] == [
        {"line": 2, "reason": "unparsable", "detail": "Expected `str`, got `int` - at `$.user_id`"}
    ]
    ndjson = b"\n".join([orjson.dumps({**EV, "event_id": "e3"}), b"{nope"])
    resp = client.simulate_post(
        "/v1/recs/events/bulk",
        body=ndjson,
        headers={**ADMIN, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 200 and resp.json["accepted"] == 1 and resp.json["rejected"] == 1
    call.validate(
        call.spec["paths"]["/v1/recs/events/bulk"]["post"]["responses"]["200"]["content"][
            "application/json"
        ]["schema"],
        resp.json,
    )
    noline = client.simulate_post(
        "/v1/recs/events/bulk", body=b"\x00", headers={**ADMIN, "Content-Type": "application/json"}
    )
    assert noline.status_code == 400
    got = call("GET", "/v1/recs/events/{event_id}", 200, "/v1/recs/events/e1")
    assert got.json["value"] == 2.0 and got.json["event_type"] == "click"
    call("GET", "/v1/recs/events/{event_id}", 404, "/v1/recs/events/nope")
    gone = call("DELETE", "/v1/recs/events/{event_id}", 200, "/v1/recs/events/e3")
    assert gone.json == {"event_id": "e3", "status": "deleted", "known": True}
    call("GET", "/v1/recs/events/{event_id}", 410, "/v1/recs/events/e3")
    # feedback
    label = {"feedback_id": "f1", "user_id": "u1", "item_id": "a1", "label": "relevant"}
    made = call("POST", "/v1/recs/feedback", 201, body={**label, "confidence": 0.5})
    assert made.json["confidence"] == 0.5 and "source" not in made.json
    call("POST", "/v1/recs/feedback", 200, body=label)
    call("POST", "/v1/recs/feedback", 400, body={**label, "label": "meh"})
    page = call("GET", "/v1/recs/feedback", 200, params={"label": "relevant", "limit": 1})
    assert page.json["total"] == 1 and page.json["next_cursor"] is None
    call("GET", "/v1/recs/feedback", 400, params={"limit": 0})
    call("GET", "/v1/recs/feedback/{feedback_id}", 200, "/v1/recs/feedback/f1")
    call("GET", "/v1/recs/feedback/{feedback_id}", 404, "/v1/recs/feedback/f2")
    # runtime
    predict = {"user_id": "u1", "limit": 3, "explain": True, "filters": {"exclude_tags": ["x"]}}
    p = call("POST", "/v1/recs/predict", 200, body=predict)
    assert [i["item_id"] for i in p.json["items"]] == ["a0", "a1", "a3"]
    assert p.json["meta"]["request_id"] == p.headers["X-Request-Id"]
    call("POST", "/v1/recs/predict", 200, body={"context": {"session_id": "s"}, "limit": 2})
    call("POST", "/v1/recs/predict", 200, body={"user_id": "u1", "return_scores": False})
    call("POST", "/v1/recs/predict", 422, body={"user_id": "u1", "novelty": 1})
    call("POST", "/v1/recs/predict", 400, body={"user_id": "u1", "limit": 0})
    call("GET", "/v1/recs/users/{user_id}", 200, "/v1/recs/users/u1", params={"limit": 2})
    call("GET", "/v1/recs/users/{user_id}", 422, "/v1/recs/users/u1", params={"fresh": "true"})
    rt = "/v1/recs/users/{user_id}/realtime"
    call("POST", rt, 200, "/v1/recs/users/u1/realtime", body={"limit": 2, "seed": 3})
    call("POST", rt, 422, "/v1/recs/users/u1/realtime", body={"user_id": "u2"})
    batch = call(
        "POST",
        "/v1/recs/batch/predict",
        200,
        body={"requests": [{"user_id": "u1", "limit": 1}, {"user_id": "u1", "strategy": "graph"}]},
    )
    assert [r["status"] for r in batch.json["results"]] == [200, 422]
    call("POST", "/v1/recs/batch/predict", 400, body={"requests": []})
    rel = "/v1/recs/item/{item_id}/related"
    r = call("GET", rel, 200, "/v1/recs/item/a0/related", params={"strategy": "co_buy"})
    assert r.json["meta"]["request_id"] == r.headers["X-Request-Id"]
    call("GET", rel, 400, "/v1/recs/item/a0/related", params={"strategy": "x"})
    score = call(
        "POST",
        "/v1/recs/score",
        200,
        body={"user_id": "u1", "candidates": ["a3", {"item_id": "a12"}, "zzz"]},
    )
    assert [i["score"] for i in score.json["items"]] == [1.2, 0.3, None]
    call("POST", "/v1/recs/score", 404, body={"user_id": "nobody", "candidates": ["a1"]})
    call("POST", "/v1/recs/score", 422, body={"user_id": "u1", "candidates": ["a1"], "model": "m"})
    search = "/v1/recs/embeddings/search"
    s = call("POST", search, 200, body={"vector": [0, 1], "k": 2, "metric": "dot"})
    assert [i["item_id"] for i in s.json["items"]] == ["a19", "a18"]
    call("POST", search, 200, body={"item_id": "a0", "k": 1, "filters": {"available": True}})
    call("POST", search, 422, body={"vector": [1, 2, 3]})
    call("POST", search, 400, body={"vector": [1e300, 0]})
    call("POST", search, 404, body={"item_id": "zzz"})
    emb = "/v1/recs/embeddings/{embedding_id}"
    assert call("GET", emb, 200, "/v1/recs/embeddings/user:u2").json["vector"] == [1.0, 0.0]
    call("GET", emb, 400, "/v1/recs/embeddings/shoe:a1")
    call("GET", emb, 404, "/v1/recs/embeddings/item:zzz")
    # experiments
    exp = {"id": "ab", "surface": "home", "variants": [{"id": "A"}, {"name": "B", "weight": 3}]}
    made = call(
        "POST",
        "/v1/recs/experiments",
        201,
        body={**exp, "start": "2025-01-01T00:00:00+02:00"},
    )
    assert made.json["start"] == "2024-12-31T22:00:00Z"
    assert made.json["variants"][1] == {"id": "B", "traffic": 3.0, "snapshot": "current"}
    call("POST", "/v1/recs/experiments", 409, body=exp)
    call("POST", "/v1/recs/experiments", 422, body={**exp, "id": "x", "variants": [{}, {}]})
    call("GET", "/v1/recs/experiments", 200, params={"status": "draft"})
    call("GET", "/v1/recs/experiments", 400, params={"status": "gone"})
    one = "/v1/recs/experiments/{experiment_id}"
    etag = call("GET", one, 200, "/v1/recs/experiments/ab").headers["ETag"]
    patched = call(
        "PATCH",
        one,
        200,
        "/v1/recs/experiments/ab",
        body={"start": None, "status": "running", "name": "n"},
        headers={**ADMIN, "If-Match": etag},
    )
    assert patched.json["start"] is None and patched.json["status"] == "running"
    call(
        "PATCH",
        one,
        409,
        "/v1/recs/experiments/ab",
        body={"name": "m"},
        headers={**ADMIN, "If-Match": etag},
    )
    call("PATCH", one, 400, "/v1/recs/experiments/ab", body={"variants": None})
    assign = "/v1/recs/experiments/{experiment_id}/assign"
    forced = call(
        "POST",
        assign,
        200,
        "/v1/recs/experiments/ab/assign",
        body={"user_id": "u1", "variant": "B"},
    )
    assert forced.json["forced"] is True and forced.json["variant"] == "B"
    call(
        "POST",
        assign,
        422,
        "/v1/recs/experiments/ab/assign",
        body={"user_id": "u1", "variant": "Z"},
    )
    call("POST", assign, 400, "/v1/recs/experiments/ab/assign", body={"user_id": "u1"})
    got = call(
        "GET",
        "/v1/recs/experiments/{experiment_id}/assignment",
        200,
        "/v1/recs/experiments/ab/assignment",
        params={"user_id": "u1"},
    )
    assert got.json["variant"] == "B"
    call(
        "GET",
        "/v1/recs/experiments/{experiment_id}/results",
        200,
        "/v1/recs/experiments/ab/results",
        params={"alpha": 0.1},
    )
    call("DELETE", one, 204, "/v1/recs/experiments/ab")
    call("GET", one, 404, "/v1/recs/experiments/ab")
    # rerank, explain
    rr = call(
        "POST",
        "/v1/recs/rerank",
        200,
        body={"user_id": "u1", "candidates": ["a3", {"item_id": "a1"}, "zzz"], "explain": True},
    )
    assert rr.json["excluded"][-1] == {"item_id": "zzz", "outcome": "unknown", "rule": None}
    call("POST", "/v1/recs/rerank", 200, body={"candidates": ["a3"], "weights": {"pop": 1}})
    call("POST", "/v1/recs/rerank", 422, body={"candidates": ["a3"], "weights": {"pop": 0}})
    call("POST", "/v1/recs/rerank", 400, body={"candidates": ["a3"], "filters": {"price": 1}})
    ex = call("POST", "/v1/recs/explain", 200, body={"user_id": "u1", "item_id": "a1"})
    assert ex.json["known_user"] is True and "factors" in ex.json
    anon = call("POST", "/v1/recs/explain", 200, body={"user_id": "zz", "item_id": "a1"})
    assert "seen" not in anon.json and anon.json["candidate"] is None
    call("POST", "/v1/recs/explain", 404, body={"user_id": "u1", "item_id": "zzz"})
    # seeds
    seed = call(
        "POST",
        "/v1/recs/seed",
        200,
        body={"surface": "home", "item_ids": ["a3", "a3", "a1"], "strategy": "tag:winter"},
    )
    assert seed.json["surfaces"]["home"]["item_ids"] == ["a3", "a1"]
    call("POST", "/v1/recs/seed", 422, body={"surface": "home"})
    call("POST", "/v1/recs/seed", 400, body={"strategy": "popular\n"})
    call("GET", "/v1/recs/seed", 200)
    call("GET", "/v1/recs/seed/{surface}", 200, "/v1/recs/seed/home")
    call("DELETE", "/v1/recs/seed/{surface}", 200, "/v1/recs/seed/home")
    call("GET", "/v1/recs/seed/{surface}", 404, "/v1/recs/seed/home")

    # (the control plane's /v1/recs operations are exercised by tests/control, area by area)
    control_plane = {(r.method, r.path) for r in control.routes()}
    operations = {
        (method.upper(), path)
        for path, ops in call.spec["paths"].items()
        if path.startswith("/v1/recs")
        for method in ops
    }
    assert operations - control_plane - call.seen == set()


@pytest.mark.parametrize(
    "body,reason,detail",
    [
        ({**EV, "user_id": ""}, "missing_id", MISSING_USER),
        ({k: v for k, v in EV.items() if k != "item_id"}, "missing_id", MISSING_ITEM),
        ({**EV, "session_id": "s" * 257}, "oversize_field", OVERSIZE_EVENT_FIELD),
        ({**EV, "value": "abc"}, "bad_value", "Expected `float | null`, got `str` - at `$.value`"),
        ({**EV, "value": True}, "bad_value", "Expected `float | null`, got `bool` - at `$.value`"),
        ({**EV, "colour": "red"}, "unparsable", "Object contains unknown field `colour`"),
        (
            {**EV, "context": [1]},
            "unparsable",
            "Expected `object | null`, got `array` - at `$.context`",
        ),
    ],
)
def test_events_outside_the_schema_get_the_contract_reason(client, body, reason, detail):
    with pytest.raises(msgspec.ValidationError) as e:
        msgspec.convert(body, Event)
    assert event_reason(e.value) == (reason, detail)
    single = client.simulate_post("/v1/recs/events", json=body, headers=auth())
    assert single.status_code == 422 and single.json["reason"] == reason
    assert single.json["code"] == "RECSYS_INVALID_EVENT"
    bulk = client.simulate_post("/v1/recs/events/bulk", json=[EV, body], headers=auth())
    assert bulk.json["errors"] == [{"line": 2, "reason": reason, "detail": detail}]
    assert bulk.json["accepted"] == 1

"""Candidate generators and declared pipelines on the tiny hand-made snapshots
(tests/serving/serving_helpers.py), whose right answers are known:

u1's stored candidates are a0..a7 (scores 0.9 .. 0.2), a2 is unavailable, u1 has seen a8,
`popular` is a8..a19; co-occurrence neighbours: a0 -> a5 (0.9), a6 (0.5), a5 -> a0 (0.4);
tags: a1 shoes+adult, a3 winter+nike, a4 winter, a5 nike, a7 winter. No factors."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))
from serving_helpers import auth, build_client, make_config, publish_tiny  # noqa: E402

ADMIN = auth("acme", ("recommend", "admin"))
GEN = "/v1/recs/candidates/generate"
PIPELINE = {
    "pipeline_id": "home",
    "name": "homepage hybrid",
    "stages": [
        {"type": "candidate", "generator": "collab", "limit": 50},
        {"type": "candidate", "generator": "co_view", "limit": 50, "weight": 0.5},
        {"type": "filter", "rules": {"available": True, "exclude_seen": True}},
        {"type": "ranker", "model": "stored"},
        {"type": "postprocess", "diversity": "tag", "max_per_group": 1, "limit": 4},
    ],
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipelines"))
    publish_tiny(root, "acme", "a")
    publish_tiny(root, "globex", "g")
    return build_client(make_config(root))


def ids(items) -> list[str]:
    return [i["item_id"] for i in items]


def test_generators_answer_from_the_snapshot(client):
    pop = client.simulate_post(
        GEN, json={"generator": "popularity", "user_id": "u1", "limit": 3}, headers=auth()
    )
    assert pop.status_code == 200, pop.json
    assert ids(pop.json["candidates"]) == ["a8", "a9", "a10"]
    first = pop.json["candidates"][0]
    assert first["score"] == 1.0 and first["category"] == "c2" and first["price"] == 18.0
    collab = client.simulate_post(
        GEN,
        json={"generator": "collab", "user_id": "u1", "filters": {"available": True}},
        headers=auth(),
    ).json
    assert ids(collab["candidates"]) == ["a0", "a1", "a3", "a4", "a5", "a6", "a7"]
    assert collab["candidates"][0]["tags"] == ["shoes", "nike"] and collab["meta"]["user_known"]
    graph = client.simulate_post(
        GEN, json={"generator": "graph", "context": {"anchors": ["a0"]}}, headers=auth()
    ).json
    assert ids(graph["candidates"]) == ["a5", "a6"]
    assert [c["score"] for c in graph["candidates"]] == [pytest.approx(0.9), pytest.approx(0.5)]
    segment = client.simulate_post(
        GEN, json={"generator": "popularity", "user_id": "u1", "list": "segment"}, headers=auth()
    ).json
    assert ids(segment["candidates"]) == ["a19", "a18", "a17"]  # u1 is in segment s1
    # an unknown user has no collaborative candidates (and is told so)
    nobody = client.simulate_post(
        GEN, json={"generator": "collab", "user_id": "zz"}, headers=auth()
    ).json
    assert nobody["count"] == 0 and nobody["meta"]["user_known"] is False


@pytest.mark.parametrize(
    "body,code",
    [
        ({"generator": "embedding", "user_id": "u1"}, "RECSYS_NOT_AVAILABLE"),  # no factors
        ({"generator": "content", "user_id": "u1"}, "RECSYS_NOT_AVAILABLE"),  # no text model
        ({"generator": "telepathy"}, "RECSYS_INVALID_PIPELINE"),
        ({"generator": "popularity", "list": "nope"}, "RECSYS_NOT_AVAILABLE"),
        ({"generator": "collab", "filters": {"colour": "red"}}, "RECSYS_INVALID_PIPELINE"),
        ({"generator": "collab", "filters": {"price_max": "cheap"}}, "RECSYS_INVALID_PIPELINE"),
    ],
)
def test_generator_bad_input_is_422(client, body, code):
    resp = client.simulate_post(GEN, json=body, headers=auth())
    assert resp.status_code == 422, resp.json
    assert resp.json["code"] == code and resp.headers["content-type"] == "application/problem+json"


def test_generator_status(client):
    collab = client.simulate_get("/v1/recs/candidates/collab/status", headers=auth()).json
    # candidates a0..a7 and a9 (u2): 9 of 20 items, 2 of 3 users
    assert (collab["size"], collab["items_covered"], collab["coverage"]) == (9, 9, 0.45)
    assert (collab["users_covered"], collab["user_coverage"]) == (2, pytest.approx(2 / 3, 1e-5))
    assert collab["model"] == "tiny@1" and collab["freshness_s"] >= 0
    graph = client.simulate_get("/v1/recs/candidates/graph/status", headers=auth()).json
    assert (graph["size"], graph["items_covered"]) == (3, 2)
    emb = client.simulate_get("/v1/recs/candidates/embedding/status", headers=auth()).json
    assert emb["available"] is False and "not available" in emb["detail"]
    unknown = client.simulate_get("/v1/recs/candidates/telepathy/status", headers=auth())
    assert unknown.status_code == 404


def test_pipeline_lifecycle_and_every_stage_output(client):
    made = client.simulate_post("/v1/recs/pipelines", json=PIPELINE, headers=ADMIN)
    assert made.status_code == 201, made.json
    assert made.json["stages"][1]["generator"] == "graph"  # (co_view is graph)
    etag = made.headers["ETag"]
    again = client.simulate_post("/v1/recs/pipelines", json=PIPELINE, headers=ADMIN)
    assert again.status_code == 409
    listed = client.simulate_get("/v1/recs/pipelines", headers=auth()).json
    assert [p["id"] for p in listed["items"]] == ["home"]

    run = client.simulate_post(
        "/v1/recs/pipelines/home/run",
        json={"user_id": "u1", "context": {"anchors": ["a0"]}},
        headers=auth(),
    )
    assert run.status_code == 200, run.json
    stages = {s["index"]: s for s in run.json["stages"]}
    assert ids(stages[1]["items"]) == [f"a{i}" for i in range(8)]
    # graph from the anchor a0 and u1's seen a8: a5 (0.9), a6 (0.5)
    assert ids(stages[2]["items"]) == ["a5", "a6"]
    # merged: collab / 0.9 plus graph / 0.9 * 0.5 -> a5 = 0.444 + 0.5 second
    merged = stages[0]["items"]
    assert ids(merged)[:3] == ["a0", "a5", "a1"]
    assert merged[1]["score"] == pytest.approx(0.4 / 0.9 + 0.5, abs=1e-6)
    assert merged[1]["sources"] == ["collab", "graph"]
    # filter (merged order kept): a2 unavailable, a0 is the anchor (seen): out
    assert ids(stages[3]["items"]) == ["a5", "a1", "a3", "a6", "a4", "a7"]
    # ranker "stored": u1's stored scores (0.9 - 0.1 i)
    assert [i["score"] for i in stages[4]["items"]][:2] == [pytest.approx(0.8), pytest.approx(0.6)]
    # one item per tag: a1, a3, a6 (no tags), then the first set aside (a4)
    assert ids(run.json["items"]) == ["a1", "a3", "a6", "a4"]

    # PATCH (If-Match), checked again; a bad change leaves the pipeline as it was
    bad = client.simulate_patch(
        "/v1/recs/pipelines/home",
        json={"stages": [{"type": "ranker", "model": "stored"}]},
        headers={**ADMIN, "If-Match": etag},
    )
    assert bad.status_code == 422
    good = client.simulate_patch(
        "/v1/recs/pipelines/home",
        json={"stages": [{"type": "candidate", "generator": "popularity", "limit": 2}]},
        headers={**ADMIN, "If-Match": etag},
    )
    assert good.status_code == 200, good.json
    stale = client.simulate_patch(
        "/v1/recs/pipelines/home", json={"name": "x"}, headers={**ADMIN, "If-Match": etag}
    )
    assert stale.status_code == 409
    short = client.simulate_post("/v1/recs/pipelines/home/run", headers=auth()).json
    assert ids(short["items"]) == ["a8", "a9"]
    gone = client.simulate_delete(
        "/v1/recs/pipelines/home", headers={**ADMIN, "If-Match": good.headers["ETag"]}
    )
    assert gone.status_code == 204
    assert client.simulate_get("/v1/recs/pipelines/home", headers=auth()).status_code == 404


@pytest.mark.parametrize(
    "stages,words",
    [
        ([{"type": "candidate", "generator": "telepathy"}], "unknown generator"),
        (
            [{"type": "candidate", "generator": "collab"}, {"type": "ranker", "model": "gbdt9"}],
            "unknown ranker",
        ),
        ([{"type": "filter", "rules": {"available": True}}], "starts with a candidate"),
        (
            [
                {"type": "candidate", "generator": "collab"},
                {"type": "ranker", "model": "stored"},
                {"type": "candidate", "generator": "graph"},
            ],
            "cannot follow",
        ),
        (
            [
                {"type": "candidate", "generator": "collab"},
                {"type": "postprocess", "diversity": "category"},
                {"type": "filter", "rules": {"available": True}},
            ],
            "cannot follow",
        ),
        (
            [
                {"type": "candidate", "generator": "collab"},
                {"type": "ranker", "model": "stored"},
                {"type": "ranker", "model": "blend"},
            ],
            "at most one ranker",
        ),
        ([{"type": "candidate", "generator": "collab", "limit": 0}], "limit"),
        ([{"type": "sorcery"}], "unknown stage type"),
        (
            [{"type": "candidate", "generator": "collab"}, {"type": "postprocess", "diversity": 3}],
            "diversity",
        ),
    ],
)
def test_pipelines_that_cannot_run_are_refused_at_write(client, stages, words):
    resp = client.simulate_post(
        "/v1/recs/pipelines", json={"name": "bad", "stages": stages}, headers=ADMIN
    )
    assert resp.status_code == 422, resp.json
    assert words in resp.json["detail"] and resp.json["code"] == "RECSYS_INVALID_PIPELINE"


def test_a_pipeline_naming_a_missing_model_answers_422_at_run(client):
    body = {
        "pipeline_id": "emb",
        "name": "embedding",
        "stages": [{"type": "candidate", "generator": "embedding"}],
    }
    assert client.simulate_post("/v1/recs/pipelines", json=body, headers=ADMIN).status_code == 201
    run = client.simulate_post("/v1/recs/pipelines/emb/run", json={"user_id": "u1"}, headers=auth())
    assert run.status_code == 422 and "not available for this snapshot" in run.json["detail"]


def test_no_tenant_reaches_another_tenants_pipeline(client):
    body = {**PIPELINE, "pipeline_id": "secret", "name": "marker-pipeline"}
    assert client.simulate_post("/v1/recs/pipelines", json=body, headers=ADMIN).status_code == 201
    other = auth("globex", ("recommend", "admin"))
    for method, path, json in (
        ("GET", "/v1/recs/pipelines/secret", None),
        ("PATCH", "/v1/recs/pipelines/secret", {"name": "x"}),
        ("DELETE", "/v1/recs/pipelines/secret", None),
        ("POST", "/v1/recs/pipelines/secret/run", {"user_id": "u1"}),
    ):
        spy = client.simulate_request(method, path, json=json, headers=other)
        assert spy.status_code == 404 and "marker" not in spy.text, (method, path)
        assert client.simulate_request(method, path, json=json).status_code == 401
        org = auth("acme", ("recommend", "admin"), **{"X-Org-Id": "globex"})
        assert client.simulate_request(method, path, json=json, headers=org).status_code == 403
    listed = client.simulate_get("/v1/recs/pipelines", headers=other).json
    assert "marker" not in str(listed)
    # globex's generators answer from globex's snapshot only
    cands = client.simulate_post(
        GEN, json={"generator": "collab", "user_id": "u1"}, headers=auth("globex")
    ).json
    assert all(c["item_id"].startswith("g") for c in cands["candidates"])
    assert client.simulate_get("/v1/recs/pipelines/secret", headers=ADMIN).status_code == 200


def test_a_surface_runs_the_pipeline_its_tenant_config_names(tmp_path):
    root = str(tmp_path)
    publish_tiny(root, "acme", "a")
    client = build_client(make_config(root))
    pop = {
        "pipeline_id": "pop5",
        "name": "popular",
        "stages": [{"type": "candidate", "generator": "popularity", "limit": 5}],
    }
    assert client.simulate_post("/v1/recs/pipelines", json=pop, headers=ADMIN).status_code == 201
    got = client.simulate_get("/v1/admin/tenants/acme/config", headers=ADMIN)
    config = {**got.json, "surfaces": [got.json["defaults"]["surface"], "home", "pdp", "cart"]}
    config["pipelines"] = {"pdp": "pop5", "cart": "missing"}
    put = client.simulate_put(
        "/v1/admin/tenants/acme/config",
        json=config,
        headers={**ADMIN, "If-Match": got.headers["ETag"]},
    )
    assert put.status_code == 200, put.json

    def answer(surface: str):
        resp = client.simulate_post(
            "/v1/recommend",
            json={"user": {"user_id": "u1"}, "k": 3, "surface": surface},
            headers=auth(),
        )
        assert resp.status_code == 200, resp.json
        return resp.json

    # the pipeline's popular list, u1's seen a8 left out by the request-time engine
    pdp = answer("pdp")
    assert ids(pdp["items"]) == ["a9", "a10", "a11"]
    assert pdp["meta"]["pipeline"]["id"] == "pop5"
    # /v1/recs/predict goes through the same service
    predicted = client.simulate_post(
        "/v1/recs/predict",
        json={"user_id": "u1", "limit": 3, "surface": "pdp"},
        headers=auth(),
    )
    assert predicted.status_code == 200, predicted.json
    assert ids(predicted.json["items"]) == ["a9", "a10", "a11"]
    # a surface without a pipeline answers as before
    home = answer("home")
    assert ids(home["items"]) == ["a0", "a1", "a3"] and "pipeline" not in home["meta"]
    # a pipeline that is not there: today's answer, and a warning
    cart = answer("cart")
    assert ids(cart["items"]) == ["a0", "a1", "a3"]
    assert [w["code"] for w in cart["warnings"]] == ["PIPELINE_UNAVAILABLE"]


def test_check_model_compares_a_model_version_with_its_snapshot(tmp_path):
    root = str(tmp_path)
    publish_tiny(root, "acme", "a")  # tiny@1
    publish_tiny(root, "acme", "a", variant=1)  # tiny@2, live: u1's scores reversed
    client = build_client(make_config(root))
    path = "/v1/recs/health/check-model"
    sample = {"samples": [{"user_id": "u1"}], "k": 3, "repeat": 2}
    live = client.simulate_post(path, json=sample, headers=ADMIN)
    assert live.status_code == 200, live.json
    assert live.json["model"] == "tiny@2" and live.json["ok"]
    result = live.json["results"][0]
    assert result["items"] == ["a7", "a6", "a5"] and result["overlap_at_k"] == 1.0
    old = client.simulate_post(path, json={**sample, "model_version": "tiny@1"}, headers=ADMIN)
    assert old.status_code == 200, old.json
    assert old.json["model"] == "tiny@1" and old.json["target"].startswith("model version")
    assert old.json["results"][0]["items"] == ["a0", "a1", "a3"]  # (a2 is unavailable)
    assert old.json["latency_ms"]["calls"] == 2
    # a sample without a user is an anonymous session: from its anchors (a0's neighbours)
    anonymous = {"samples": [{"context": {"anchors": ["a0"]}}, {}], "k": 3, "repeat": 1}
    got = client.simulate_post(path, json=anonymous, headers=ADMIN)
    assert got.status_code == 200, got.json
    assert got.json["results"][0]["items"] == ["a5", "a3", "a4"]
    assert got.json["results"][1]["items"] == ["a8", "a9", "a10"]  # the cold start
    assert (
        client.simulate_post(
            path, json={**sample, "model_version": "tiny@7"}, headers=ADMIN
        ).status_code
        == 422
    )


def test_the_content_generator_reads_the_tenants_content_model(tmp_path):
    from serving_helpers import items_frame

    from recsys import content

    root = str(tmp_path)
    publish_tiny(root, "acme", "a")
    content.fit(items_frame("a"), dim=8).save(os.path.join(root, "warehouse", "acme", "content"))
    client = build_client(make_config(root))
    resp = client.simulate_post(
        GEN,
        json={"generator": "content", "context": {"anchors": ["a3"]}, "limit": 4},
        headers=auth(),
    )
    assert resp.status_code == 200, resp.json
    found = resp.json["candidates"]
    assert "a3" not in ids(found) and len(found) == 4
    # a3 is tagged winter and nike (brand nike): its nearest texts share those words
    assert all({"winter", "nike"} & set(c["tags"]) for c in found[:3]), found
    status = client.simulate_get("/v1/recs/candidates/content/status", headers=auth()).json
    assert status["available"] and status["items_covered"] == 20


@pytest.mark.parametrize(
    "stages",
    [
        [{"type": ["candidate"]}],
        [{"type": "candidate", "generator": {"name": "collab"}}],
        [{"type": "candidate", "generator": "collab"}, {"type": "ranker", "model": [1]}],
        [{"type": "candidate", "generator": "collab"}, {"type": "postprocess", "diversity": {}}],
        [{"type": "candidate", "generator": "collab", "limit": 5.5}],
        [
            {"type": "candidate", "generator": "collab"},
            {"type": "filter", "rules": {"brands": [1]}},
        ],
        ["candidate"],
    ],
)
def test_stage_fields_of_any_json_type_are_422_not_500(client, stages):
    resp = client.simulate_post(
        "/v1/recs/pipelines", json={"name": "odd", "stages": stages}, headers=ADMIN
    )
    assert resp.status_code in (400, 422), resp.json

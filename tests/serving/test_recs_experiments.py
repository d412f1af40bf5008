"""Experiments (CRUD, ETag/If-Match, deterministic and forced assignment, results with known
answers), /v1/recommend honouring a running experiment, rerank, explain and cold-start seeds,
on the tiny snapshots of serving_helpers."""

from __future__ import annotations

import math
import os

import jsonschema
import pytest
from scipy import stats
from serving_helpers import auth, build_client, ids, make_config, publish_tiny

from serving.experiments import two_proportion_z, wilson_interval
from serving.rules import assign_variant
from serving.service import RecommendService

ADMIN = auth("acme", ("admin",))
EXP = {
    "id": "home-ab",
    "name": "ranker test",
    "surface": "home",
    "variants": [{"id": "A", "traffic": 50}, {"id": "B", "traffic": 50}],
    "metrics": ["ctr", "conversion"],
}
#: The service.py hook the lead applies (see the report); until then /v1/recommend ignores
#: stored experiments and seeds, and the tests that need it are skipped, not faked.
HOOKED = "_named_variant" in vars(RecommendService)
needs_hook = pytest.mark.skipif(not HOOKED, reason="needs the issue-6 hook in serving/service.py")


def create(client, body=EXP, headers=ADMIN):
    return client.simulate_post("/v1/recs/experiments", json=body, headers=headers)


def test_crud_with_etag_and_if_match(client):
    made = create(client)
    assert made.status_code == 201, made.json
    etag = made.headers["ETag"]
    assert made.json["status"] == "draft" and made.json["primary_metric"] == "conversion"
    assert create(client).status_code == 409  # the id exists
    got = client.simulate_get("/v1/recs/experiments/home-ab", headers=auth())
    assert got.json == made.json and got.headers["ETag"] == etag
    patched = client.simulate_patch(
        "/v1/recs/experiments/home-ab",
        json={"status": "running", "alpha": 0.01},
        headers={**ADMIN, "If-Match": etag},
    )
    assert patched.status_code == 200 and patched.json["status"] == "running"
    assert patched.json["alpha"] == 0.01 and patched.headers["ETag"] != etag
    stale = client.simulate_patch(
        "/v1/recs/experiments/home-ab", json={"alpha": 0.2}, headers={**ADMIN, "If-Match": etag}
    )
    assert stale.status_code == 409
    assert stale.json["current_version"] == patched.json["version"]
    listed = client.simulate_get(
        "/v1/recs/experiments", params={"status": "running"}, headers=auth()
    )
    assert [e["id"] for e in listed.json["items"]] == ["home-ab"]
    # a second running experiment on the same surface is refused
    other = create(client, {**EXP, "id": "other", "status": "running"})
    assert other.status_code == 409 and other.json["code"] == "RECSYS_EXPERIMENT_CONFLICT"
    assert (
        create(client, {**EXP, "id": "other", "status": "running", "surface": "pdp"}).status_code
        == 201
    )
    assert (
        client.simulate_delete(
            "/v1/recs/experiments/home-ab", headers={**ADMIN, "If-Match": etag}
        ).status_code
        == 409
    )
    assert client.simulate_delete("/v1/recs/experiments/home-ab", headers=ADMIN).status_code == 204
    assert client.simulate_get("/v1/recs/experiments/home-ab", headers=auth()).status_code == 404


@pytest.mark.parametrize(
    "body,status",
    [
        ({**EXP, "variants": [{"id": "A"}]}, 400),
        ({**EXP, "variants": [{"id": "A"}, {"id": "A"}]}, 422),
        ({**EXP, "variants": [{"id": "A", "traffic": 0}, {"id": "B"}]}, 400),
        ({**EXP, "variants": [{"id": "A", "model": "tiny"}, {"id": "B"}]}, 400),
        ({**EXP, "variants": [{"id": "A", "model": "t@1", "snapshot": "s"}, {"id": "B"}]}, 422),
        ({**EXP, "alpha": 0.7}, 400),
        ({**EXP, "primary_metric": "revenue"}, 400),
        ({**EXP, "metrics": ["ctr"], "primary_metric": "conversion"}, 422),
        ({**EXP, "start": "2025-02-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"}, 422),
        ({**EXP, "start": "2025-02-01T00:00:00"}, 400),  # no offset
        ({**EXP, "colour": "red"}, 400),
    ],
)
def test_invalid_experiments_are_refused(client, body, status):
    resp = create(client, body)
    assert resp.status_code == status, resp.json
    assert resp.headers["Content-Type"] == "application/problem+json"


def test_writes_need_admin_and_stay_in_the_tenant(client):
    assert create(client, headers=auth("acme")).status_code == 403
    assert create(client).status_code == 201
    for method in ("GET", "DELETE"):
        resp = client.simulate_request(
            method, "/v1/recs/experiments/home-ab", headers=auth("globex", ("admin",))
        )
        assert resp.status_code == 404
    assert client.simulate_get("/v1/recs/experiments", headers=auth("globex")).json["total"] == 0
    assert (
        client.simulate_get(
            "/v1/recs/experiments/home-ab/results", headers=auth("globex")
        ).status_code
        == 404
    )


def test_assignment_is_the_hash_of_experiment_and_user_and_can_be_forced(client):
    create(client)
    variants = [{"name": "A", "weight": 50.0}, {"name": "B", "weight": 50.0}]
    counts = {"A": 0, "B": 0}
    for n in range(40):
        user = f"user-{n}"
        got = client.simulate_get(
            "/v1/recs/experiments/home-ab/assignment", params={"user_id": user}, headers=auth()
        ).json
        assert got["variant"] == assign_variant("home-ab", user, variants)["name"]
        assert got["forced"] is False
        counts[got["variant"]] += 1
    assert min(counts.values()) >= 10  # a fair split of 40 users (binomial, p=0.5)
    hashed = assign_variant("home-ab", "u1", variants)["name"]
    other = "B" if hashed == "A" else "A"
    forced = client.simulate_post(
        "/v1/recs/experiments/home-ab/assign",
        json={"user_id": "u1", "variant": other},
        headers=ADMIN,
    )
    assert forced.json["variant"] == other and forced.json["forced"] is True
    doc = client.simulate_get("/v1/recs/experiments/home-ab", headers=auth()).json
    assert doc["assignments"] == {"u1": other}
    bad = client.simulate_post(
        "/v1/recs/experiments/home-ab/assign", json={"user_id": "u1", "variant": "Z"}, headers=ADMIN
    )
    assert bad.status_code == 422
    unpinned = client.simulate_post(
        "/v1/recs/experiments/home-ab/assign",
        json={"user_id": "u1", "variant": None},
        headers=ADMIN,
    )
    assert unpinned.json["variant"] == hashed and unpinned.json["forced"] is False


# --- results ----------------------------------------------------------------------------------
def _event(user, etype, variant=None, ts="2025-03-01T10:00:00Z", value=None, item="a1"):
    ev = {"user_id": user, "item_id": item, "type": etype, "timestamp": ts}
    if variant:
        ev["metadata"] = {"experiment": {"id": "home-ab", "variant": variant}}
    if value is not None:
        ev["value"] = value
    return ev


def _traffic():
    """A: 100 exposed users, 200 impressions, 20 clicks, 10 converters.
    B: 100 exposed users, 200 impressions, 40 clicks, 30 converters.
    Half the purchases carry the experiment context, half are attributed by exposure. Plus
    events that must not count: a purchase before exposure, a user exposed to both variants,
    an unknown variant, and an unexposed user's click."""
    evs = []
    for arm, clicks, conv in (("A", 20, 10), ("B", 40, 30)):
        for n in range(100):
            u = f"{arm}-{n}"
            for t in ("2025-03-01T10:00:00Z", "2025-03-01T10:05:00Z"):
                evs.append(_event(u, "impression", arm, t, item=f"a{n % 7}"))
            if n < clicks // 2:
                evs.append(_event(u, "click", arm, "2025-03-01T10:01:00Z"))
                evs.append(_event(u, "click", None, "2025-03-01T10:06:00Z"))
            if n < conv:
                tagged = arm if n % 2 else None
                evs.append(_event(u, "purchase", tagged, "2025-03-01T11:00:00Z", value=10.0))
    evs.append(_event("A-50", "purchase", None, "2025-03-01T09:00:00Z"))  # before exposure
    evs.append(_event("mixed", "impression", "A"))
    evs.append(_event("mixed", "impression", "B", "2025-03-01T10:30:00Z"))  # own event id
    evs.append(_event("mixed", "purchase", "B", "2025-03-01T12:00:00Z"))
    evs.append(_event("ghost", "impression", "C"))
    evs.append(_event("never-shown", "click", "A"))
    return evs


def test_results_have_known_counts_intervals_tests_and_winner(client):
    create(client)
    resp = client.simulate_post("/v1/recs/events/bulk", json=_traffic(), headers=auth())
    assert resp.status_code == 200 and resp.json["rejected"] == 0, resp.json
    res = client.simulate_get("/v1/recs/experiments/home-ab/results", headers=auth())
    assert res.status_code == 200, res.json
    body = res.json
    a, b = body["variants"]
    assert (a["users"], a["impressions"], a["clicks"], a["converters"]) == (100, 200, 20, 10)
    assert (b["users"], b["impressions"], b["clicks"], b["converters"]) == (100, 200, 40, 30)
    assert a["purchase_value"] == 100.0 and b["purchase_value"] == 300.0
    assert body["left_out"] == {"unknown_variant": 1, "mixed_users": 1, "not_exposed": 1}
    lo, hi = stats.binomtest(30, 100).proportion_ci(0.95, method="wilson")
    assert b["conversion"]["rate"] == 0.3
    assert b["conversion"]["ci_low"] == pytest.approx(lo, abs=1e-6)
    assert b["conversion"]["ci_high"] == pytest.approx(hi, abs=1e-6)
    conv = next(c for c in body["comparisons"] if c["metric"] == "conversion")
    # pooled p = 0.2, se = sqrt(0.2 * 0.8 * 2 / 100) = 0.056569, z = 0.2 / se = 3.535534
    assert conv["z"] == pytest.approx(3.535534, abs=1e-6)
    assert conv["p_value"] == pytest.approx(2 * stats.norm.sf(3.535534), rel=1e-5)
    assert body["winner"]["variant"] == "B" and body["winner"]["metric"] == "conversion"
    # at alpha = 0.0001 the same data names no winner
    strict = client.simulate_get(
        "/v1/recs/experiments/home-ab/results", params={"alpha": 0.0001}, headers=auth()
    ).json
    assert strict["winner"] is None
    spec = client.simulate_get("/openapi.json").json
    schema = spec["paths"]["/v1/recs/experiments/{experiment_id}/results"]["get"]["responses"][
        "200"
    ]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": spec["components"]}).validate(body)


def test_no_events_means_no_rates_and_no_winner(client):
    create(client)
    body = client.simulate_get("/v1/recs/experiments/home-ab/results", headers=auth()).json
    assert body["winner"] is None
    assert all(v["conversion"]["rate"] is None for v in body["variants"])


def test_statistics_helpers():
    lo, hi = wilson_interval(10, 100, 0.05)
    assert (lo, hi) == pytest.approx(stats.binomtest(10, 100).proportion_ci(0.95, "wilson"))
    assert wilson_interval(0, 0, 0.05) is None
    z, p = two_proportion_z(10, 100, 30, 100)
    assert z == pytest.approx(0.2 / math.sqrt(0.2 * 0.8 * 0.02)) and p < 0.001
    assert two_proportion_z(0, 10, 0, 10) is None


# --- /v1/recommend under a running experiment ----------------------------------------------------
@pytest.fixture()
def two_model_client(tmp_path):
    """acme has two published snapshots: tiny@2 (u1's order reversed: a7 first) and the
    current tiny@1 (a0 first)."""
    root = str(tmp_path)
    publish_tiny(root, "acme", "a", variant=1)
    publish_tiny(root, "acme", "a", variant=0)
    return build_client(make_config(root))


@needs_hook
def test_recommend_follows_the_running_experiment_of_its_surface(two_model_client):
    c = two_model_client
    body = {
        **EXP,
        "status": "running",
        "variants": [{"id": "A", "traffic": 1}, {"id": "B", "model": "tiny@2", "traffic": 1}],
    }
    assert create(c, body).status_code == 201
    for variant, first in (("A", "a0"), ("B", "a7")):
        c.simulate_post(
            "/v1/recs/experiments/home-ab/assign",
            json={"user_id": "u1", "variant": variant},
            headers=ADMIN,
        )
        resp = c.simulate_post(
            "/v1/recommend",
            json={"k": 2, "surface": "home", "user": {"user_id": "u1"}},
            headers=auth(),
        )
        assert resp.status_code == 200, resp.json
        assert ids(resp)[0] == first
        assert resp.json["meta"]["experiment"]["variant"] == variant
        assert resp.json["meta"]["experiment"]["assigned"] is False  # forced
    # another surface is not in the experiment
    other = c.simulate_post(
        "/v1/recommend", json={"k": 2, "surface": "pdp", "user": {"user_id": "u1"}}, headers=auth()
    )
    assert "experiment" not in other.json["meta"]
    # hashed assignment for everybody else, echoed for attribution
    weighted = [{"name": "A", "weight": 1.0}, {"name": "B", "weight": 1.0}]
    for n in range(6):
        resp = c.simulate_post(
            "/v1/recommend",
            json={"k": 1, "surface": "home", "user": {"anonymous_id": f"anon-{n}"}},
            headers=auth(),
        )
        exp = resp.json["meta"]["experiment"]
        assert exp["variant"] == assign_variant("home-ab", f"anon-{n}", weighted)["name"]
        assert exp["assigned"] is True
    # paused: no longer applied
    c.simulate_patch("/v1/recs/experiments/home-ab", json={"status": "paused"}, headers=ADMIN)
    resp = c.simulate_post(
        "/v1/recommend", json={"k": 2, "surface": "home", "user": {"user_id": "u1"}}, headers=auth()
    )
    assert ids(resp)[0] == "a0" and "experiment" not in resp.json["meta"]


# --- seeds ----------------------------------------------------------------------------------------
def test_seed_crud_and_validation(client):
    put = client.simulate_post(
        "/v1/recs/seed",
        json={"surface": "home", "item_ids": ["a15", "a3"], "strategy": "tag:winter"},
        headers=ADMIN,
    )
    assert put.status_code == 200 and put.json["surfaces"]["home"]["item_ids"] == ["a15", "a3"]
    etag = put.headers["ETag"]
    assert client.simulate_get("/v1/recs/seed/home", headers=auth()).json["strategy"] == (
        "tag:winter"
    )
    assert (
        client.simulate_post(
            "/v1/recs/seed", json={"surface": "home", "strategy": "x"}, headers=ADMIN
        ).status_code
        == 400
    )
    assert (
        client.simulate_post("/v1/recs/seed", json={"surface": "home"}, headers=ADMIN).status_code
        == 422
    )
    assert (
        client.simulate_post(
            "/v1/recs/seed", json={"surface": "pdp", "item_ids": ["a1"]}, headers=auth()
        ).status_code
        == 403
    )
    assert client.simulate_get("/v1/recs/seed", headers=auth("globex")).json["surfaces"] == {}
    stale = client.simulate_delete("/v1/recs/seed/home", headers={**ADMIN, "If-Match": '"old"'})
    assert stale.status_code == 409
    gone = client.simulate_delete("/v1/recs/seed/home", headers={**ADMIN, "If-Match": etag})
    assert gone.status_code == 200 and gone.json["surfaces"] == {}
    assert client.simulate_get("/v1/recs/seed/home", headers=auth()).status_code == 404


def test_seed_preconditions_answer_412_and_409(client):
    seed = {"surface": "home", "item_ids": ["a1"]}
    none_yet = client.simulate_post("/v1/recs/seed", json=seed, headers={**ADMIN, "If-Match": "*"})
    assert none_yet.status_code == 412 and none_yet.json["current_version"] is None
    assert none_yet.json["code"] == "RECSYS_PRECONDITION_FAILED"
    first = client.simulate_post(
        "/v1/recs/seed", json=seed, headers={**ADMIN, "If-None-Match": "*"}
    )
    assert first.status_code == 200 and first.headers["ETag"] == f'"{first.json["version"]}"'
    again = client.simulate_post(
        "/v1/recs/seed", json=seed, headers={**ADMIN, "If-None-Match": "*"}
    )
    assert again.status_code == 412 and again.json["current_version"] == first.json["version"]
    one = client.simulate_get("/v1/recs/seed/home", headers=auth())
    assert one.headers["ETag"] == first.headers["ETag"]
    pdp = {"surface": "pdp", "item_ids": ["a2"]}
    both = client.simulate_post(
        "/v1/recs/seed", json=pdp, headers={**ADMIN, "If-Match": first.headers["ETag"]}
    )
    assert both.status_code == 200 and set(both.json["surfaces"]) == {"home", "pdp"}
    stale = client.simulate_post(
        "/v1/recs/seed", json=pdp, headers={**ADMIN, "If-Match": first.headers["ETag"]}
    )
    assert stale.status_code == 409 and stale.json["current_version"] == both.json["version"]
    assert stale.json["code"] == "RECSYS_VERSION_CONFLICT"


@needs_hook
def test_unknown_users_start_from_the_seed_of_their_surface(client):
    client.simulate_post(
        "/v1/recs/seed",
        json={"surface": "home", "item_ids": ["a15", "a3"], "strategy": "tag:winter"},
        headers=ADMIN,
    )
    resp = client.simulate_post(
        "/v1/recommend",
        json={"k": 6, "surface": "home", "user": {"user_id": "newcomer"}},
        headers=auth(),
    )
    # curated a15, a3; then tag:winter (a3 a4 a7) without the duplicate; then popular back-fill
    assert ids(resp) == ["a15", "a3", "a4", "a7", "a8", "a9"]
    assert any("seed:home" in w["detail"] for w in resp.json["warnings"])
    other = client.simulate_post(
        "/v1/recommend",
        json={"k": 2, "surface": "pdp", "user": {"user_id": "newcomer"}},
        headers=auth(),
    )
    assert ids(other) == ["a8", "a9"]  # no seed for pdp: the popular fallback as before


# --- rerank and explain ---------------------------------------------------------------------------
def test_rerank_orders_candidates_by_stored_scores_and_rules(client):
    resp = client.simulate_post(
        "/v1/recs/rerank",
        headers=auth(),
        json={"user_id": "u1", "candidates": ["a5", "a2", "a0", {"item_id": "a12"}, "zzz", "a3"]},
    )
    assert resp.status_code == 200, resp.json
    # stored scores a0 .9 > a3 .6 > a5 .4; a12 has none (0); a2 unavailable; zzz unknown
    assert ids(resp) == ["a0", "a3", "a5", "a12"]
    assert resp.json["meta"]["scored_by"] == "candidates"
    out = {e["item_id"]: e["outcome"] for e in resp.json["excluded"]}
    assert out == {"a2": "excluded", "zzz": "unknown"}
    by_emb = client.simulate_post(
        "/v1/recs/rerank",
        headers=auth(),
        json={"user_id": "u1", "candidates": ["a0", "a3", "a5"], "weights": {"emb": 1}},
    )
    assert ids(by_emb) == ["a5", "a3", "a0"] and by_emb.json["meta"]["scored_by"] == "weights"
    rules = {
        "rules": [
            {"id": "no-nike", "type": "block", "tags": ["nike"]},
            {"id": "feature", "type": "pin", "item_id": "a19", "position": 1},
        ]
    }
    client.simulate_put("/v1/admin/tenants/acme/rules", json=rules, headers=ADMIN)
    ruled = client.simulate_post(
        "/v1/recs/rerank",
        headers=auth(),
        json={"user_id": "u1", "candidates": ["a0", "a1", "a3", "a4"]},
    )
    assert ids(ruled) == ["a1", "a4"]  # nike items blocked; the pin's item is no candidate
    assert {e["rule"] for e in ruled.json["excluded"]} == {"block:no-nike"}
    cold = client.simulate_post(
        "/v1/recs/rerank",
        headers=auth(),
        json={"candidates": ["a19", "a10", "a8"], "business_rules": False},
    )
    assert ids(cold) == ["a8", "a10", "a19"] and cold.json["meta"]["scored_by"] == "popularity"


def test_explain_reports_signals_and_what_the_pipeline_did(client):
    resp = client.simulate_post(
        "/v1/recs/explain", headers=auth(), json={"user_id": "u1", "item_id": "a3"}
    )
    assert resp.status_code == 200, resp.json
    body = resp.json
    assert body["candidate"]["precomputed_rank"] == 4
    assert body["candidate"]["signals"] == {"pop": 0.5, "cooc": 0.0, "emb": 0.4, "ranker": 0.6}
    assert body["pipeline"]["outcome"] == "recommended" and body["pipeline"]["rank"] == 3
    assert body["seen"] is False
    client.simulate_put(
        "/v1/admin/tenants/acme/rules",
        headers=ADMIN,
        json={"rules": [{"id": "b", "type": "boost", "tag": "winter", "factor": 3}]},
    )
    client.simulate_put(
        "/v1/admin/tenants/acme/config", headers=ADMIN, json={"defaults": {"weights": {"emb": 1}}}
    )
    boosted = client.simulate_post(
        "/v1/recs/explain", headers=auth(), json={"user_id": "u1", "item_id": "a3"}
    ).json
    assert boosted["pipeline"]["rules"] == ["boost:b"]
    assert boosted["candidate"]["contributions"] == {
        "pop": 0.0,
        "cooc": 0.0,
        "emb": 0.4,
        "ranker": 0.0,
    }
    gone = client.simulate_post(
        "/v1/recs/explain", headers=auth(), json={"user_id": "u1", "item_id": "a2"}
    ).json
    assert gone["pipeline"]["outcome"] == "excluded"
    assert gone["pipeline"]["rules"] == ["unavailable"] and gone["item"]["available"] is False
    assert (
        client.simulate_post(
            "/v1/recs/explain", headers=auth(), json={"user_id": "u1", "item_id": "g3"}
        ).status_code
        == 404
    )


def test_experiment_files_are_per_tenant_json(client, data_root):
    create(client)
    path = os.path.join(data_root, "serving", "experiments", "acme", "home-ab.json")
    assert os.path.exists(path)
    assert not os.path.exists(os.path.join(data_root, "serving", "experiments", "globex"))

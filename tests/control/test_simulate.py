"""Simulation before deploy and the model check, on a real pipeline run: 20,000 generated events
of tenant acme through `recsys run --job recsys_pipeline` (ingest, training, evaluation,
snapshot) in a temporary data root, then the API on that root.

Known answers: the live configuration (no rules) replays exactly the lists `model_evaluation`
scored, so its NDCG@10 is the evaluation's own figure; a rule blocking a category takes that
category's exposure to 0; a pipeline of the model's own candidates ranked by its own ranker is
the live configuration; the check of the live model finds the snapshot's own top k."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))
from serving_helpers import auth, build_client, make_config  # noqa: E402

from recsys import ingest  # noqa: E402
from recsys.models.data import temporal_split  # noqa: E402
from recsys.storage import Storage  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ADMIN = auth("acme", ("recommend", "admin"))
SIM = "/v1/recs/simulate"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """A data root after one successful pipeline run of tenant acme (20k events);
    RECSYS_SIMULATE_DATA=<data root> reuses one (for iterating on these tests)."""
    if os.environ.get("RECSYS_SIMULATE_DATA"):
        return os.environ["RECSYS_SIMULATE_DATA"]
    base = tmp_path_factory.mktemp("simulate")
    data, home = base / "data", base / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home), "RECSYS_DATA_ROOT": str(data)}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = base / "pipeline.log"
    with open(log, "wb") as out:
        for args in (
            ["demo-data", "--events", "20000", "--seed", "7", "--tenant", "acme", "--quiet"],
            ["run", "--job", "recsys_pipeline"],
        ):
            done = subprocess.run(
                [str(BIN / "recsys"), *args], cwd=REPO, env=env, stdout=out, stderr=out
            )
            assert done.returncode == 0, log.read_text()[-3000:]
    return str(data)


@pytest.fixture(scope="module")
def client(root):
    return build_client(make_config(root))


@pytest.fixture(scope="module")
def live_run(client):
    """The live configuration replayed (no rules: the rules document is empty)."""
    resp = client.simulate_post(SIM, json={"rules": [], "n_resamples": 200}, headers=ADMIN)
    assert resp.status_code == 200, resp.json
    return resp.json


def test_the_live_configuration_replays_the_pipelines_own_evaluation(live_run):
    evaluated = live_run["evaluated"]
    # the very lists model_evaluation scored: its NDCG@10, to its 4 decimals
    assert round(evaluated["metrics"]["NDCG@10"]["value"], 4) == evaluated["evaluation_ndcg@10"]
    assert live_run["users"] > 20 and live_run["pairs"] >= live_run["users"]
    live = live_run["live"]["metrics"]
    for name in ("NDCG@10", "Recall@10", "Coverage@10", "revenue_proxy"):
        est = live[name]
        assert est["low"] <= est["value"] <= est["high"], (name, est)
    # empty rules are the live configuration: no list changes, every difference 0
    same = live_run["configurations"][0]
    assert same["lists_changed"] == 0
    assert all(d["value"] == 0 for d in same["difference"].values()), same["difference"]
    shares = live_run["live"]["exposure"]["category"]
    assert sum(s["value"] for s in shares.values()) == pytest.approx(1.0, abs=1e-4)


def test_a_block_rule_shows_its_cost_before_it_goes_live(client, live_run):
    shares = live_run["live"]["exposure"]["category"]
    top = max(shares, key=lambda c: shares[c]["value"])
    rule = {"id": "no-top", "type": "block", "tags": [f"category:{top}"]}
    resp = client.simulate_post(SIM, json={"rules": [rule], "n_resamples": 200}, headers=ADMIN)
    assert resp.status_code == 200, resp.json
    conf = resp.json["configurations"][0]
    assert top not in conf["exposure"]["category"]
    assert conf["exposure_difference"]["category"][top] == pytest.approx(
        -shares[top]["value"], abs=1e-6
    )
    assert conf["lists_changed"] > 0
    nd = conf["difference"]["NDCG@10"]
    assert nd["low"] <= nd["value"] <= nd["high"]


def test_pipelines_and_experiments_are_replayed_on_the_model_at_the_cut_off(client, live_run):
    own = {
        "stages": [
            {"type": "candidate", "generator": "collab", "limit": 100},
            {"type": "ranker", "model": "stored"},
        ]
    }
    popular = {"stages": [{"type": "candidate", "generator": "popularity", "limit": 100}]}
    resp = client.simulate_post(
        SIM,
        json={
            "experiment": {
                "variants": [{"id": "own", "pipeline": own}, {"id": "pop", "pipeline": popular}]
            },
            "n_resamples": 200,
        },
        headers=ADMIN,
    )
    assert resp.status_code == 200, resp.json
    by_id = {c["id"]: c for c in resp.json["configurations"]}
    assert by_id["own"]["lists_changed"] == 0
    assert by_id["own"]["metrics"]["NDCG@10"] == live_run["live"]["metrics"]["NDCG@10"]
    # popularity alone is worse than the served hybrid (as the evaluation table says) and
    # covers fewer items
    assert by_id["pop"]["difference"]["NDCG@10"]["value"] < 0
    assert by_id["pop"]["difference"]["Coverage@10"]["value"] < 0


def test_a_sample_dataset_is_replayed_and_checked_for_its_columns(client, root):
    storage = Storage(root)
    events = ingest.read_events(storage, "acme")
    test = temporal_split(events, 0.2).test
    os.makedirs(os.path.join(root, "samples"), exist_ok=True)
    test.write_parquet(os.path.join(root, "samples", "test.parquet"))
    resp = client.simulate_post(
        SIM,
        json={"rules": [], "dataset": "samples/test.parquet", "n_resamples": 200},
        headers=ADMIN,
    )
    assert resp.status_code == 200, resp.json
    assert resp.json["source"].endswith("test.parquet")
    # the same window as the evaluation: the same users and figures
    assert (
        round(resp.json["evaluated"]["metrics"]["NDCG@10"]["value"], 4)
        == (resp.json["evaluated"]["evaluation_ndcg@10"])
    )
    test.drop("event_type").write_parquet(os.path.join(root, "samples", "bad.parquet"))
    bad = client.simulate_post(
        SIM, json={"rules": [], "dataset": "samples/bad.parquet"}, headers=ADMIN
    )
    assert bad.status_code == 422 and "event_type" in bad.json["detail"]


def test_a_replay_being_built_answers_503_with_retry_after(root):
    """A request waits at most `wait_s` for the replay; the build goes on, the next call
    gets it."""
    from types import SimpleNamespace

    from serving.errors import ProblemError
    from serving.simulation import Simulator

    simulator = Simulator(SimpleNamespace(config=SimpleNamespace(data_root=root)), wait_s=0.0)
    with pytest.raises(ProblemError) as refused:
        simulator.replay("acme", None, None)
    assert refused.value.status_code == 503
    assert refused.value.headers["Retry-After"] == "10"
    simulator.wait_s = 300.0
    replay = simulator.replay("acme", None, None)
    assert replay.n_users > 20
    assert simulator.replay("acme", None, None) is replay  # (cached)


@pytest.mark.parametrize(
    "body",
    [
        {"rules": [], "pipeline_id": "x"},  # two things
        {},  # nothing
        {"pipeline_id": "missing"},
        {"pipeline": {"stages": [{"type": "ranker", "model": "stored"}]}},  # cannot chain
        {"pipeline": {"stages": [{"type": "candidate", "generator": "telepathy"}]}},
        {"rules": [], "dataset": "/etc/passwd.csv"},  # outside the data root
        {"rules": [], "dataset": "nope.parquet"},
        {"rules": [{"id": "p", "type": "pin", "item_id": "i1"}]},  # a pin without position
        {"experiment": {"variants": []}},
        {"rules": [{}]},  # a valid body whose rules are not rules (found by schemathesis)
        {"experiment": {"variants": [{"id": "a", "rules": [{"type": "x"}]}]}},
        {"rules": [], "dataset": "a\u0000.csv"},  # NUL (was a 500 from os.path.realpath)
    ],
)
def test_simulation_bad_input_is_problem_details(client, body):
    resp = client.simulate_post(SIM, json=body, headers=ADMIN)
    assert resp.status_code == 422, resp.json  # the body fits the schema: the semantic 422
    assert resp.headers["content-type"] == "application/problem+json"


def test_check_model_compares_answers_with_the_snapshot(client):
    live = client.simulate_post(
        "/v1/recs/health/check-model", json={"n_samples": 10, "repeat": 2}, headers=ADMIN
    )
    assert live.status_code == 200, live.json
    body = live.json
    assert body["ok"] and body["passed"] == body["samples"] == 10
    assert body["latency_ms"]["calls"] == 20 and body["latency_ms"]["p50"] > 0
    # without rules, /v1/recommend answers each user's stored top k
    assert all(r["overlap_at_k"] == 1.0 for r in body["results"])
    # a popularity pipeline without a seen-items filter recommends what users already had
    pop = {"stages": [{"type": "candidate", "generator": "popularity", "limit": 10}]}
    checked = client.simulate_post(
        "/v1/recs/health/check-model", json={"pipeline": pop, "n_samples": 30}, headers=ADMIN
    ).json
    assert checked["target"] == "pipeline"
    assert not checked["ok"] and any(r["seen_items"] for r in checked["results"])
    unknown = client.simulate_post(
        "/v1/recs/health/check-model", json={"model_version": "nope@9"}, headers=ADMIN
    )
    assert unknown.status_code == 422


def test_no_tenant_reaches_another_tenants_simulation(client):
    made = client.simulate_post(
        "/v1/recs/pipelines",
        json={
            "pipeline_id": "acme-only",
            "name": "marker",
            "stages": [{"type": "candidate", "generator": "popularity"}],
        },
        headers=ADMIN,
    )
    assert made.status_code == 201
    other = auth("globex", ("recommend", "admin"))
    for path, body in (
        (SIM, {"pipeline_id": "acme-only"}),
        ("/v1/recs/health/check-model", {"pipeline_id": "acme-only"}),
    ):
        spy = client.simulate_post(path, json=body, headers=other)
        # globex has no snapshot, no evaluation and no such pipeline: nothing of acme's
        assert spy.status_code in (404, 422, 503) and "marker" not in spy.text
        assert client.simulate_post(path, json=body).status_code == 401
        org = auth("acme", ("recommend", "admin"), **{"X-Org-Id": "globex"})
        assert client.simulate_post(path, json=body, headers=org).status_code == 403


# --- a large simulation is a Dagster job ----------------------------------------------------------
def test_the_simulation_job_gives_the_requests_figures(root, live_run):
    """`simulate_job` in process, on the plan the API would send for `{"rules": []}`: the
    figures of the synchronous answer, written as the job's results."""
    import json

    from pipelines.control_jobs import simulate_job
    from pipelines.resources import StorageResource
    from serving.validation import DEFAULT_SURFACE

    plan = {
        "tenant": "acme",
        "dataset": None,
        "max_users": None,
        "k": 10,
        "surface": DEFAULT_SURFACE,
        "n_resamples": 200,
        "seed": 0,
        "n_candidates": 100,
        "live_rules": [],
        "live_rules_version": live_run["live"]["rules_version"],
        "configurations": [
            {"id": "rules", "rules": [], "rules_version": "sim:test", "pipeline": None}
        ],
    }
    dest = f"file://{root}/exports/acme/simulations/in-process"
    config = {"tenant": "acme", "plan": json.dumps(plan), "dest_uri": dest}
    result = simulate_job.execute_in_process(
        run_config={"ops": {"simulate_configurations": {"config": config}}},
        resources={"storage": StorageResource(root=root)},
    )
    assert result.success
    with open(f"{root}/exports/acme/simulations/in-process/_manifest.json") as f:
        manifest = json.load(f)
    got = manifest["result"]
    assert manifest["kind"] == "simulation" and got["mode"] == "job"
    assert got["users"] == live_run["users"] and got["pairs"] == live_run["pairs"]
    assert got["evaluated"]["metrics"] == live_run["evaluated"]["metrics"]
    assert got["live"]["metrics"] == live_run["live"]["metrics"]
    assert got["configurations"][0]["metrics"] == live_run["configurations"][0]["metrics"]
    assert got["live"]["exposure"] == live_run["live"]["exposure"]


def test_async_or_large_simulations_go_to_dagster(root, monkeypatch):
    """Past the size threshold (or with async: true) the request launches a job: without a
    Dagster configured that is a 503 naming it; a bad configuration is still a 422 first."""
    from serving import simulation

    client = build_client(make_config(root))
    small = client.simulate_post(SIM, json={"rules": [], "n_resamples": 200}, headers=ADMIN)
    assert small.status_code == 200 and small.json["mode"] == "sync"
    job = client.simulate_post(SIM, json={"rules": [], "async": True}, headers=ADMIN)
    assert job.status_code == 503 and job.json["code"] == "RECSYS_DAGSTER_UNAVAILABLE"
    bad = client.simulate_post(
        SIM,
        json={"rules": [{"id": "p", "type": "pin", "item_id": "i1"}], "async": True},
        headers=ADMIN,
    )
    assert bad.status_code == 422
    monkeypatch.setattr(simulation, "ASYNC_ABOVE", small.json["users"] * 2 - 1)
    large = build_client(make_config(root))  # (its simulator reads the threshold)
    resp = large.simulate_post(SIM, json={"rules": []}, headers=ADMIN)  # users x 2 lists
    assert resp.status_code == 503 and resp.json["code"] == "RECSYS_DAGSTER_UNAVAILABLE"

"""Jobs as Dagster runs: the GraphQL client against a real `dagster dev`, then the job routes."""

from __future__ import annotations

import json
import os
import time

import pytest

from serving.control.dagster import DagsterClient, DagsterConfigInvalid, client_for
from serving.errors import ProblemError

pytestmark = pytest.mark.slow


def wait_finished(client: DagsterClient, run_id: str, timeout: float = 600.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = client.run(run_id)
        if run is not None and run.finished:
            return run
        time.sleep(1.0)
    raise AssertionError(f"run {run_id} did not finish within {timeout}s")


def test_client_launches_reads_lists_and_logs_a_run(dagster_server):
    client = DagsterClient(dagster_server.url)
    tags = {"recsys/tenant": "acme", "recsys/requested-by": "test"}
    run_id = client.launch("ingest_job", {}, tags)
    run = client.run(run_id)
    assert run is not None and run.job == "ingest_job"
    assert run.tags["recsys/tenant"] == "acme"
    assert client.ui_link(run_id) == f"{dagster_server.url}/runs/{run_id}"
    done = wait_finished(client, run_id)
    assert done.status == "SUCCESS", done
    assert {"items", "users"} <= {s.key for s in done.steps}
    assert done.steps_done == len(done.steps) and done.started and done.ended
    listed = client.runs(tags={"recsys/tenant": "acme"}, statuses=["SUCCESS"])
    assert run_id in [r.run_id for r in listed]
    assert client.runs(tags={"recsys/tenant": "nobody"}) == []
    assert client.runs(tags={"recsys/tenant": "acme"}, created_after=time.time() + 60) == []
    events, cursor, _ = client.events(run_id)
    assert any(e["type"] == "RunSuccessEvent" for e in events) and cursor
    # a finished run cannot be terminated: its status stays
    assert client.terminate(run_id) == "SUCCESS"


def test_client_unknown_run_and_rejected_config(dagster_server):
    client = DagsterClient(dagster_server.url)
    assert client.run("00000000-0000-0000-0000-000000000000") is None
    assert client.events("00000000-0000-0000-0000-000000000000") is None
    assert client.terminate("00000000-0000-0000-0000-000000000000") is None
    tags = {"recsys/tenant": "acme", "test": "rejected"}
    with pytest.raises(DagsterConfigInvalid) as err:
        client.launch("ingest_job", {"ops": {"events_and_rejects": {"config": {"nope": 1}}}}, tags)
    assert str(err.value.status).startswith("422")
    assert client.runs(tags=tags) == []  # rejected before any run


def test_client_terminates_a_queued_or_running_run(dagster_server):
    client = DagsterClient(dagster_server.url)
    run_id = client.launch("ingest_job", {}, {"recsys/tenant": "acme"})
    status = client.terminate(run_id)
    assert status in ("CANCELING", "CANCELED"), status
    assert wait_finished(client, run_id).status == "CANCELED"


def test_dagster_down_is_a_503_naming_dagster():
    with pytest.raises(ProblemError) as err:
        DagsterClient("http://127.0.0.1:9", timeout_s=2).runs()
    assert "Dagster" in err.value.description and err.value.extra["dependency"] == "dagster"
    assert str(err.value.status).startswith("503")
    with pytest.raises(ProblemError) as err:
        client_for(None)
    assert "RECSYS_DAGSTER_URL" in err.value.description


# --- the job routes, through the API ----------------------------------------------------------
ADMIN = ("recommend", "admin")
TRAIN_HP = {"lightfm": {"epochs": 5}, "ranker": {"max_iter": 20}}


def hdr(tenant: str = "acme", scopes=ADMIN, **extra):
    from serving_helpers import auth

    return auth(tenant, scopes, **extra)


def wait_job(client, job_id: str, timeout: float = 900.0, path: str = "/v1/recs/jobs/{}"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = client.simulate_get(path.format(job_id), headers=hdr())
        assert got.status_code == 200, got.text
        if got.json["status"] in ("succeeded", "failed", "canceled"):
            return got.json
        time.sleep(2.0)
    raise AssertionError(f"job {job_id} did not finish within {timeout}s")


def active_users(root: str, n: int) -> list[str]:
    """The `n` users with the most events (every model knows them), sorted."""
    from recsys.ingest import read_events
    from recsys.storage import Storage

    counts = read_events(Storage(root), "acme").group_by("user_id").len()
    return sorted(counts.sort(["len", "user_id"], descending=[True, False])["user_id"][:n])


@pytest.fixture(scope="module")
def trained(control_client):
    """One train job through the API: (job view when launched, finished view, seconds)."""
    t0 = time.monotonic()
    resp = control_client.simulate_post(
        "/v1/recs/jobs/train",
        json={"model_id": "recsys-acme", "hyperparameters": TRAIN_HP, "bootstrap_resamples": 50},
        headers=hdr(),
    )
    assert resp.status_code == 202, resp.text
    done = wait_job(control_client, resp.json["job_id"])
    return resp.json, done, time.monotonic() - t0


def test_train_job_registers_a_version_with_readable_metrics(
    control_client, dagster_server, trained, capsys
):
    launched, done, seconds = trained
    assert launched["type"] == "train" and launched["tenant"] == "acme"
    assert launched["status"] in ("queued", "running")
    assert launched["dagster_url"].endswith(f"/runs/{launched['job_id']}")
    assert launched["requested_by"] and launched["model_id"] == "recsys-acme"
    assert done["status"] == "succeeded", done
    progress = done["progress"]
    assert progress["steps_done"] == progress["steps_total"] >= 10
    assert {"train_models", "champion_model", "mlflow_job_link"} <= {
        s["key"] for s in progress["steps"]
    }
    ml = done["mlflow_run"]
    assert ml and ml["status"] == "FINISHED" and ml["model_version"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=dagster_server.mlflow_uri)
    mv = client.get_model_version("recsys-acme", ml["model_version"])
    assert mv.run_id == ml["run_id"]  # the version the job registered, in the registry
    res = control_client.simulate_get(f"/v1/recs/jobs/{done['job_id']}/results", headers=hdr())
    assert res.status_code == 200, res.text
    body = res.json
    assert "served.NDCG_at_10" in body["metrics"]
    assert body["params"]["tenant"] == "acme"
    assert body["params"]["config.lightfm.epochs"] == "5"  # the hyperparameters reached it
    rows = {r["model"]: r for r in body["baseline_comparison"]}
    assert {"served", "popularity"} <= set(rows)
    assert rows["popularity"]["NDCG_at_10_vs_popularity"] == 0.0
    assert "evaluation/evaluation.csv" in body["artifacts"]
    with capsys.disabled():
        print(f"\ntrain job through the API: {seconds:.1f} s to version {ml['model_version']}")


def test_jobs_list_filters(control_client, trained):
    job_id = trained[1]["job_id"]
    got = control_client.simulate_get("/v1/recs/jobs?type=train", headers=hdr())
    assert job_id in [j["job_id"] for j in got.json["jobs"]]
    got = control_client.simulate_get("/v1/recs/jobs?status=succeeded", headers=hdr())
    assert job_id in [j["job_id"] for j in got.json["jobs"]]
    for query in ("type=evaluate", "status=failed", f"created_after={time.time() + 60}"):
        got = control_client.simulate_get(f"/v1/recs/jobs?{query}", headers=hdr())
        assert job_id not in [j["job_id"] for j in got.json["jobs"]], query
    got = control_client.simulate_get("/v1/recs/jobs?status=nope", headers=hdr())
    assert got.status_code == 400


def _acme_runs(dagster_server) -> int:
    return len(DagsterClient(dagster_server.url).runs(tags={"recsys/tenant": "acme"}, limit=1000))


@pytest.mark.parametrize(
    "body, status",
    [
        ({"hyperparameters": {"lightfm": {"no_components": "many"}}}, 422),
        ({"hyperparameters": {"lightfm": {"no_such_knob": 1}}}, 422),
        ({"hyperparameters": {"tenants": ["globex"]}}, 422),
        ({"notify_webhook": "ftp://example.com/x"}, 422),
        ({"model_id": "recsys-globex"}, 404),
        ({"data_source": "elsewhere"}, 400),
    ],
)
def test_bad_train_requests_start_no_run(control_client, dagster_server, body, status):
    before = _acme_runs(dagster_server)
    resp = control_client.simulate_post(
        "/v1/recs/jobs/train", json={"model_id": "recsys-acme", **body}, headers=hdr()
    )
    assert resp.status_code == status, resp.text
    assert _acme_runs(dagster_server) == before


def test_evaluate_a_registered_version_on_a_holdout(
    control_client, dagster_server, trained, tmp_path
):
    import polars as pl

    from recsys.demo import DemoSpec, generate
    from recsys.ingest import read_events
    from recsys.storage import Storage

    version = trained[1]["mlflow_run"]["model_version"]
    # the holdout: the same demo world a week further on, only the events after the data the
    # version was trained on (a version scored on its own training events scores 0: the
    # protocol drops pairs seen in training and the model never recommends seen items)
    events = read_events(Storage(dagster_server.data_root), "acme")
    later = Storage(str(tmp_path / "later"))
    generate(
        DemoSpec(events=24_000, seed=11, end_date="2026-11-08", chunk_events=12_000, tenant="acme"),
        later,
    )
    landed = pl.concat(
        [pl.read_parquet(f) for f in later.fs.glob(f"{later.root}/landing/acme/events/*")],
        how="diagonal_relaxed",
    )
    unit = "ms" if landed["timestamp"].max() > 10**11 else "s"
    landed = landed.with_columns(
        pl.from_epoch("timestamp", time_unit=unit).dt.replace_time_zone("UTC")
    ).filter(pl.col("timestamp") > events["timestamp"].max())
    path = f"{dagster_server.data_root}/exports/acme/holdout/later.parquet"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    landed.select("user_id", "item_id", "event_type", "timestamp", "value").write_parquet(path)
    bad = [
        ({"model_version": version, "holdout_uri": "/etc/passwd"}, 422),
        ({"model_version": version, "holdout_uri": path, "metrics": ["Fun@3"]}, 422),
        ({"model_version": "999", "holdout_uri": path}, 404),
    ]
    for body, status in bad:
        resp = control_client.simulate_post("/v1/recs/jobs/evaluate", json=body, headers=hdr())
        assert resp.status_code == status, (body, resp.text)
    resp = control_client.simulate_post(
        "/v1/recs/jobs/evaluate",
        json={
            "model_version": version,
            "holdout_uri": path,
            "metrics": ["NDCG@10", "Recall@10"],
            "bootstrap_resamples": 20,
        },
        headers=hdr(),
    )
    assert resp.status_code == 202, resp.text
    done = wait_job(control_client, resp.json["job_id"])
    assert done["status"] == "succeeded", done
    assert done["mlflow_run"]["model_version"] == version
    res = control_client.simulate_get(f"/v1/recs/jobs/{done['job_id']}/results", headers=hdr())
    assert res.status_code == 200 and "metrics" in res.json, res.text
    metrics = res.json["metrics"]
    assert "served.NDCG_at_10" in metrics and "popularity.Recall_at_10" in metrics
    assert not any("MAP" in k for k in metrics)  # only the metrics asked for
    assert 0.0 < metrics["served.NDCG_at_10"] <= 1.0  # later events the version never saw
    assert int(res.json["params"]["holdout_users"]) > 20
    # the demo's malformed rows are rejected by the events contract, and counted
    rejected = json.loads(res.json["params"]["holdout_rejected"])
    assert {"missing_id", "bad_timestamp"} <= set(rejected), rejected

    # a holdout of users the version never saw has nothing to score: the run fails, saying so
    strangers = landed.head(30).with_columns(pl.lit("nobody").alias("user_id"))
    strangers.select("user_id", "item_id", "event_type", "timestamp", "value").write_parquet(path)
    resp = control_client.simulate_post(
        "/v1/recs/jobs/evaluate",
        json={"model_version": version, "holdout_uri": path, "bootstrap_resamples": 20},
        headers=hdr(),
    )
    failed = wait_job(control_client, resp.json["job_id"])
    assert failed["status"] == "failed", failed
    logs = DagsterClient(dagster_server.url).events(failed["job_id"])[0]
    assert any("nothing to score" in (e["error"] or e["message"] or "") for e in logs)
    assert {"evaluation/evaluation.csv", "evaluation/evaluation.png"} <= set(res.json["artifacts"])
    assert res.json["params"]["holdout_uri"].endswith("later.parquet")


def test_precompute_to_a_uri_by_shards_and_async_batch(control_client, dagster_server, trained):
    import polars as pl

    users = active_users(dagster_server.data_root, 5)
    dest = f"{dagster_server.data_root}/exports/acme/pre"
    resp = control_client.simulate_post(
        "/v1/recs/batch/precompute",
        json={
            "users": {"user_ids": users},
            "dest": {"uri": dest, "format": "csv"},
            "k": 5,
            "shards": 2,
        },
        headers=hdr(),
    )
    assert resp.status_code == 202, resp.text
    job = resp.json["job"]
    assert job["shards_done"] == 0 and job["status"] in ("queued", "running")
    asyn = control_client.simulate_post(
        "/v1/recs/async/batch",
        json={"requests": [{"user_id": u} for u in users[:3]], "k": 4},
        headers=hdr(),
    )
    assert asyn.status_code == 202, asyn.text
    early = control_client.simulate_get(
        f"/v1/recs/async/batch/{asyn.json['job_id']}/results", headers=hdr()
    )
    assert early.status_code == 409  # not finished yet
    done = wait_job(control_client, job["job_id"], path="/v1/recs/batch/jobs/{}")
    assert done["status"] == "succeeded", done
    assert done["shards_done"] == done["shards_total"] == 2 and done["errors"] == []
    res = control_client.simulate_get(f"/v1/recs/jobs/{job['job_id']}/results", headers=hdr())
    manifest = res.json["manifest"]
    assert manifest["users"] == 5 and manifest["rows"] == 25 and len(manifest["parts"]) == 2
    frame = pl.concat([pl.read_csv(p["uri"].removeprefix("file://")) for p in manifest["parts"]])
    assert sorted(set(frame["user_id"])) == users
    assert frame.group_by("user_id").len()["len"].to_list() == [5] * 5
    # async: the same users and model give the same lists as the precompute
    adone = wait_job(control_client, asyn.json["job_id"], path="/v1/recs/batch/jobs/{}")
    assert adone["status"] == "succeeded", adone
    got = control_client.simulate_get(
        f"/v1/recs/async/batch/{asyn.json['job_id']}/results", headers=hdr()
    )
    assert got.status_code == 200 and got.headers["content-type"].startswith("application/x-ndjson")
    lines = pl.read_ndjson(got.content)
    assert lines.height == 12 and sorted(set(lines["user_id"])) == users[:3]
    for u in users[:3]:
        a = lines.filter(pl.col("user_id") == u).sort("rank")["item_id"].to_list()
        b = frame.filter(pl.col("user_id") == u).sort("rank")["item_id"].to_list()[:4]
        assert a == b, u


def test_precompute_bad_requests(control_client):
    bad = [
        {"dest": {"uri": "/tmp/outside"}},
        {"dest": {"snapshot": True, "uri": "memory://x"}},
        {"dest": {"snapshot": True}, "users": {"segment": "s1"}},
        {"dest": {"uri": "memory://acme/x"}, "schedule": "every tuesday"},
    ]
    for body in bad:
        resp = control_client.simulate_post("/v1/recs/batch/precompute", json=body, headers=hdr())
        assert resp.status_code == 422, (body, resp.text)


def test_precompute_schedule_becomes_a_dagster_schedule(control_client, dagster_server):
    resp = control_client.simulate_post(
        "/v1/recs/batch/precompute",
        json={"dest": {"uri": "memory://acme/nightly"}, "schedule": "0 4 * * *"},
        headers=hdr(),
    )
    assert resp.status_code == 201, resp.text
    sched = resp.json["schedule"]
    assert sched["status"] == "RUNNING" and sched["cron"] == "0 4 * * *"
    dagster = DagsterClient(dagster_server.url)
    seen = dagster.schedule(sched["name"])
    assert seen is not None and seen["cron"] == "0 4 * * *" and seen["job"] == "precompute_job"
    assert seen["status"] == "RUNNING"
    assert dagster.schedules()[sched["name"]] == seen  # (the listing's one query)

    # listed for its tenant only, and removed by it only
    path = "/v1/recs/batch/schedules"
    listed = control_client.simulate_get(path, headers=hdr()).json["schedules"]
    assert [(s["name"], s["cron"], s["status"]) for s in listed] == [
        (sched["name"], "0 4 * * *", "RUNNING")
    ]
    assert control_client.simulate_get(path, headers=hdr("globex")).json == {"schedules": []}
    gone = control_client.simulate_delete(f"{path}/{sched['name']}", headers=hdr("globex"))
    assert gone.status_code == 404 and gone.json["code"] == "RECSYS_UNKNOWN_SCHEDULE"
    assert dagster.schedule(sched["name"])["status"] == "RUNNING"
    resp = control_client.simulate_delete(f"{path}/{sched['name']}", headers=hdr())
    assert resp.status_code == 204, resp.text
    assert dagster.schedule(sched["name"]) is None  # (out of the reloaded code location)
    assert control_client.simulate_get(path, headers=hdr()).json == {"schedules": []}
    again = control_client.simulate_delete(f"{path}/{sched['name']}", headers=hdr())
    assert again.status_code == 404
    bad = control_client.simulate_delete(f"{path}/..%2Fx", headers=hdr())
    assert bad.status_code in (400, 404) and bad.headers["content-type"].startswith(
        "application/problem+json"
    )


def test_cancel_and_stop_terminate_the_run(control_client, dagster_server):
    # (runs long enough that the termination lands while they work: with TRAIN_HP a quiet
    # machine finished a run between the CANCELING answer and the kill)
    slow = {"lightfm": {"epochs": 200}, "ranker": {"max_iter": 300}}
    ids = []
    for _ in range(2):
        resp = control_client.simulate_post(
            "/v1/recs/jobs/train",
            json={"model_id": "recsys-acme", "hyperparameters": slow},
            headers=hdr(),
        )
        assert resp.status_code == 202, resp.text
        ids.append(resp.json["job_id"])
    cancel = control_client.simulate_delete(f"/v1/recs/jobs/{ids[0]}/cancel", headers=hdr())
    assert cancel.status_code == 200, cancel.text
    assert cancel.json["status"] in ("canceling", "canceled")
    stop = control_client.simulate_post(
        "/v1/recs/jobs/stop", json={"job_id": ids[1]}, headers=hdr()
    )
    assert stop.status_code == 200, stop.text
    for job_id in ids:
        assert wait_job(control_client, job_id)["status"] == "canceled"
        again = control_client.simulate_delete(f"/v1/recs/jobs/{job_id}/cancel", headers=hdr())
        assert again.status_code == 409
        assert DagsterClient(dagster_server.url).run(job_id).status == "CANCELED"


def test_no_tenant_reaches_another_tenants_jobs(control_client, trained):
    job_id = trained[1]["job_id"]
    reads = [
        ("GET", f"/v1/recs/jobs/{job_id}", None),
        ("GET", f"/v1/recs/jobs/{job_id}/results", None),
        ("GET", f"/v1/recs/batch/jobs/{job_id}", None),
        ("GET", f"/v1/recs/async/batch/{job_id}/results", None),
        ("DELETE", f"/v1/recs/jobs/{job_id}/cancel", None),
        ("POST", "/v1/recs/jobs/stop", {"job_id": job_id}),
    ]
    for method, path, body in reads:
        spy = control_client.simulate_request(method, path, json=body, headers=hdr("globex"))
        assert spy.status_code == 404, (path, spy.text)
        # (the id the caller sent comes back in `instance`; nothing of acme's job does)
        assert not any(w in spy.text for w in ("acme", "succeeded", "mlflow", "dagster_url"))
        assert control_client.simulate_request(method, path, json=body).status_code == 401
        org = hdr("acme", ADMIN, **{"X-Org-Id": "globex"})
        assert (
            control_client.simulate_request(method, path, json=body, headers=org).status_code == 403
        )
    listed = control_client.simulate_get("/v1/recs/jobs", headers=hdr("globex"))
    assert listed.status_code == 200 and listed.json["jobs"] == []
    writes = [
        ("/v1/recs/jobs/train", {"model_id": "recsys-acme"}),
        ("/v1/recs/jobs/evaluate", {"model_version": "1", "holdout_uri": "memory://x.parquet"}),
    ]
    for path, body in writes:  # globex cannot train or evaluate acme's model
        spy = control_client.simulate_post(path, json=body, headers=hdr("globex"))
        assert spy.status_code == 404, (path, spy.text)
    # writes need the admin scope
    resp = control_client.simulate_post(
        "/v1/recs/jobs/train", json={"model_id": "recsys-acme"}, headers=hdr("acme", ("recommend",))
    )
    assert resp.status_code == 403


def test_publish_a_new_snapshot_then_export_it(control_client, dagster_server, trained):
    import numpy as np
    import polars as pl

    resp = control_client.simulate_post(
        "/v1/recs/batch/precompute", json={"dest": {"snapshot": True}}, headers=hdr()
    )
    assert resp.status_code == 202, resp.text
    done = wait_job(control_client, resp.json["job"]["job_id"], path="/v1/recs/batch/jobs/{}")
    assert done["status"] == "succeeded", done
    assert done["shards_done"] == done["shards_total"] == 16
    root = dagster_server.data_root
    out = {}
    for kind, fmt in (("recommendations", "parquet"), ("item_features", "csv"),
                      ("embeddings", "ndjson")):  # fmt: skip
        uri = f"{root}/exports/acme/{kind}.{fmt}"
        resp = control_client.simulate_post(
            "/v1/recs/exports", json={"kind": kind, "uri": uri, "format": fmt, "k": 5},
            headers=hdr(),
        )  # fmt: skip
        assert resp.status_code == 201, resp.text
        assert resp.json["bytes"] == os.path.getsize(uri) and resp.json["rows"] > 0
        out[kind] = resp.json
    recs = pl.read_parquet(f"{root}/exports/acme/recommendations.parquet")
    assert recs.group_by("user_id").len()["len"].max() == 5
    # the snapshot's lists are the champion's: the same as a precompute of the champion
    pre = f"{root}/exports/acme/check"
    users = active_users(root, 3)
    resp = control_client.simulate_post(
        "/v1/recs/batch/precompute",
        json={"users": {"user_ids": users}, "dest": {"uri": pre}, "k": 5, "shards": 1},
        headers=hdr(),
    )
    done = wait_job(control_client, resp.json["job"]["job_id"], path="/v1/recs/batch/jobs/{}")
    manifest = control_client.simulate_get(
        f"/v1/recs/jobs/{done['job_id']}/results", headers=hdr()
    ).json["manifest"]
    check = pl.read_parquet(manifest["parts"][0]["uri"].removeprefix("file://"))
    for u in users:
        a = recs.filter(pl.col("user_id") == u).sort("rank")["item_id"].to_list()
        b = check.filter(pl.col("user_id") == u).sort("rank")["item_id"].to_list()
        assert a == b, u
    feats = pl.read_csv(f"{root}/exports/acme/item_features.csv")
    assert feats.height == out["embeddings"]["rows"] and "title" in feats.columns
    emb = pl.read_ndjson(f"{root}/exports/acme/embeddings.ndjson")
    assert len(set(len(v) for v in emb["embedding"].to_list())) == 1
    assert np.isfinite(np.asarray(emb["embedding"].to_list())).all()
    outside = control_client.simulate_post(
        "/v1/recs/exports", json={"kind": "item_features", "uri": "/tmp/x.csv"}, headers=hdr()
    )
    assert outside.status_code == 422
    none = control_client.simulate_post(
        "/v1/recs/exports",
        json={"kind": "item_features", "uri": "memory://g/x.csv"},
        headers=hdr("globex"),
    )
    assert none.status_code == 404  # globex has no snapshot here; never acme's


def test_dagster_down_answers_503_while_recommendations_serve(tmp_path):
    from serving_helpers import build_client, make_config, publish_tiny

    root = str(tmp_path)
    publish_tiny(root, "acme", "a")
    client = build_client(make_config(root, dagster_url="http://127.0.0.1:9"))
    for method, path, body in [
        ("POST", "/v1/recs/jobs/train", {"model_id": "recsys-acme"}),
        ("GET", "/v1/recs/jobs", None),
        ("GET", "/v1/recs/jobs/0123-abcd", None),
    ]:
        resp = client.simulate_request(method, path, json=body, headers=hdr())
        assert resp.status_code == 503, resp.text
        assert resp.json["dependency"] == "dagster" and "Dagster" in resp.json["detail"]
    for version in ("999", "no-such-alias", "1e5"):  # MLflow answers before Dagster is asked
        resp = client.simulate_post(
            "/v1/recs/jobs/evaluate",
            json={"model_version": version, "holdout_uri": "memory://acme/h.parquet"},
            headers=hdr(),
        )
        assert resp.status_code == 404, (version, resp.text)
    rec = client.simulate_post("/v1/recommend", json={"user": {"user_id": "u1"}}, headers=hdr())
    assert rec.status_code == 200 and rec.json["items"]


def test_export_uris_stay_in_the_tenants_folders_or_object_stores(tmp_path):
    import inspect

    import polars as pl
    import serving_helpers as sh

    from recsys.snapshot import SnapshotStore

    root = str(tmp_path)
    store = SnapshotStore(os.path.join(root, "snapshots", "acme"))
    tmp = store.new_tmp_dir()
    # the tiny snapshot of the serving tests, with its Parquet tables this time
    src = inspect.getsource(sh.write_tiny_snapshot).replace(
        "write_parquet=False", "write_parquet=True"
    )  # noqa: E501
    names = dict(vars(sh))
    exec(src, names)
    names["write_tiny_snapshot"](tmp, "acme", "a")
    store.publish(tmp, checksums=False, prune=False)
    client = sh.build_client(sh.make_config(root, dagster_url=None))
    refused = [
        "a://b/x.csv",  # (fsspec reads a one-letter scheme as a drive: a local path)
        "zz://x.csv",
        "http://169.254.169.254/latest",
        "simplecache::memory://x.csv",
        f"{root}/exports/acme/../../escape.csv",
        f"{root}/exports/globex/x.csv",
        "relative.csv",
    ]
    for uri in refused:
        resp = client.simulate_post(
            "/v1/recs/exports", json={"kind": "item_features", "uri": uri}, headers=hdr()
        )
        assert resp.status_code == 422, (uri, resp.text)
    assert not os.path.exists("a:") and not os.path.exists(f"{root}/escape.csv")
    uri = f"{root}/exports/acme/items.csv"
    resp = client.simulate_post(
        "/v1/recs/exports",
        json={"kind": "item_features", "uri": uri, "format": "csv"},
        headers=hdr(),
    )
    assert resp.status_code == 201, resp.text
    items = pl.read_csv(uri)
    assert items.height == 20 and items["item_id"].to_list() == [f"a{i}" for i in range(20)]
    assert items.filter(pl.col("item_id") == "a0")["tags"][0] == '["shoes", "nike"]'
    resp = client.simulate_post(
        "/v1/recs/exports",
        json={"kind": "recommendations", "uri": "memory://acme/r.ndjson", "format": "ndjson"},
        headers=hdr(),
    )
    assert resp.status_code == 201 and resp.json["rows"] == 9  # u1: 8 candidates, u2: 1
    import fsspec

    with fsspec.open("memory://acme/r.ndjson", "rb") as f:
        recs = pl.read_ndjson(f.read())
    u1 = recs.filter(pl.col("user_id") == "u1").sort("rank")["item_id"].to_list()
    assert u1 == [f"a{i}" for i in range(8)]  # the snapshot's order, best first

"""A large simulation is a Dagster job: `POST /v1/recs/simulate` with `async: true` answers 202
with a job the jobs API reads, and the job's results are the figures the synchronous path
gives for the same body. On the real `dagster dev` of tests/control/conftest.py (tenant acme,
20k demo events): the fixture runs `recsys_pipeline` there first when its data root has no
evaluated model or no live snapshot yet."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))
from serving_helpers import auth  # noqa: E402

pytestmark = pytest.mark.slow
ADMIN = auth("acme", ("recommend", "admin"))
SIM = "/v1/recs/simulate"


@pytest.fixture(scope="module")
def published(dagster_server):
    """The Dagster server's data root with an evaluation and a live snapshot of acme."""
    from recsys.snapshot import SnapshotStore
    from recsys.storage import Storage
    from serving.control.dagster import DagsterClient

    root = dagster_server.data_root
    storage = Storage(root)
    evaluated = os.path.exists(os.path.join(storage.evaluation_dir("acme"), "evaluation.json"))
    live = SnapshotStore(os.path.join(root, "snapshots", "acme")).current_id()
    if evaluated and live:
        return root
    client = DagsterClient(dagster_server.url)
    run_id = client.launch("recsys_pipeline", {}, {"recsys/tenant": "acme"})
    deadline = time.monotonic() + 1800
    while True:
        run = client.run(run_id)
        if run is not None and run.finished:
            break
        assert time.monotonic() < deadline, "recsys_pipeline did not finish"
        time.sleep(3)
    assert run.status == "SUCCESS", run
    return root


def _wait(client, job_id: str, timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.simulate_get(f"/v1/recs/jobs/{job_id}", headers=ADMIN)
        assert job.status_code == 200, job.text
        if job.json["status"] in ("succeeded", "failed", "canceled"):
            return job.json
        assert time.monotonic() < deadline, job.json
        time.sleep(2)


def test_an_async_simulation_is_a_job_with_the_synchronous_figures(control_client, published):
    body = {"rules": [], "n_resamples": 200}
    sync = control_client.simulate_post(SIM, json=body, headers=ADMIN)
    assert sync.status_code == 200, sync.text
    resp = control_client.simulate_post(SIM, json={**body, "async": True}, headers=ADMIN)
    assert resp.status_code == 202, resp.text
    job = resp.json
    assert job["mode"] == "job" and job["reason"] == "async requested"
    assert resp.headers["Location"].endswith(f"/v1/recs/jobs/{job['job_id']}")
    assert job["size"] == sync.json["users"] * 2  # (the live lists and one configuration's)
    early = control_client.simulate_get(job["results_url"], headers=ADMIN)
    assert early.status_code in (200, 409)  # (409 while it runs)
    done = _wait(control_client, job["job_id"])
    assert done["status"] == "succeeded", done
    assert done["type"] == "simulate" and done["tenant"] == "acme"
    listed = control_client.simulate_get("/v1/recs/jobs?type=simulate", headers=ADMIN).json
    assert job["job_id"] in [j["job_id"] for j in listed["jobs"]]
    results = control_client.simulate_get(job["results_url"], headers=ADMIN)
    assert results.status_code == 200, results.text
    got = results.json["manifest"]["result"]
    assert got["mode"] == "job"
    for part in ("users", "pairs", "k"):
        assert got[part] == sync.json[part]
    assert got["evaluated"] == sync.json["evaluated"]
    assert got["live"]["metrics"] == sync.json["live"]["metrics"]
    assert got["configurations"][0]["metrics"] == sync.json["configurations"][0]["metrics"]
    # another tenant never reads it
    other = auth("globex", ("recommend", "admin"))
    assert control_client.simulate_get(job["results_url"], headers=other).status_code == 404

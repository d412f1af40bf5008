"""Jobs as Dagster runs: the GraphQL client against a real `dagster dev`, then the job routes."""

from __future__ import annotations

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

"""Fixtures of the control-plane tests: a real Dagster webserver and daemon, and an API client
whose config points at it.

`dagster_server` (session) generates a small demo data set (tenant `acme`, 20k events) in its
own data root, starts `dagster dev` on a free port with its own DAGSTER_HOME (the project's
dagster.yaml: SQLite storage, queued run coordinator) and the project's workspace, waits until
the code location has loaded, stops the landing sensor (its ingest runs would race the
tests' runs; tests launch ingest themselves) and waits for its runs, yields a
`DagsterServer` (url, data root, home, MLflow URI) and kills the whole process group at the
end. Runs it launches write into that data root and that
MLflow store (MLFLOW_TRACKING_URI), never into the checkout's `data/`.

`control_client(dagster_server)` builds a Falcon test client (`serving_helpers.build_client`)
on the same data root, with `dagster_url` and `mlflow_uri` set; `serving_helpers.auth("acme",
("recommend", "admin"))` gives headers. The helpers to start and stop servers are those of
`tests/servers.py` (`free_port`, `wait_json`, `stop_group`, and `start_dagster_dev`, which is
`servers.dagster_dev`), also importable from here under those names.
RECSYS_TEST_DAGSTER="<url>,<data root>" reuses a server already running (while developing).

The in-process tests use the tiny two-tenant snapshots of `tests/serving/serving_helpers.py`:
`snapshot_root` (per module: a module that deploys or overlays changes only its own copy; a
module may override it), `data_root` (per test: those snapshots symlinked plus an empty admin
state) and `client` (a Falcon test client on it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
from servers import BIN, REPO, free_port, stop_group, wait_json  # noqa: F401 (re-exported)
from servers import dagster_dev as start_dagster_dev

sys.path.insert(0, str(REPO / "tests" / "serving"))  # serving_helpers

TENANT = "acme"
OTHER = "globex"
LOCATION_READY = b'{"query": "{ repositoriesOrError { __typename ... on RepositoryConnection { nodes { name location { name } pipelines { name } } } } }"}'  # noqa: E501


def location_loaded(doc) -> bool:
    repos = (doc.get("data") or {}).get("repositoriesOrError") or {}
    return any(n["location"]["name"] == "recsys" for n in repos.get("nodes") or ())


def _graphql(url: str, query: str, variables: dict | None = None) -> dict:
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    return wait_json(f"{url}/graphql", body, timeout=60)["data"]


def stop_landing_sensor(url: str, timeout: float = 300.0) -> None:
    """Stop the landing sensor (its ingest runs would race the tests' runs over the same
    files) and wait until the runs it already started have finished."""
    selector = {
        "repositoryName": "__repository__",
        "repositoryLocationName": "recsys",
        "sensorName": "landing_sensor",
    }
    found = _graphql(
        url,
        "query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) {"
        " ... on Sensor { sensorState { id } } } }",
        {"s": selector},
    )
    state_id = found["sensorOrError"]["sensorState"]["id"]
    _graphql(
        url,
        "mutation($id: String) { stopSensor(id: $id) { __typename } }",
        {"id": state_id},
    )
    active = ["QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = _graphql(
            url,
            "query($f: RunsFilter) { runsOrError(filter: $f) { ... on Runs { count } } }",
            {"f": {"statuses": active}},
        )
        if runs["runsOrError"]["count"] == 0:
            return
        time.sleep(1)
    raise AssertionError(f"the landing sensor's runs did not finish within {timeout}s")


@dataclasses.dataclass(frozen=True)
class DagsterServer:
    url: str
    data_root: str
    home: str
    mlflow_uri: str
    log: str
    proc: subprocess.Popen


@pytest.fixture(scope="session")
def dagster_data_root(tmp_path_factory) -> str:
    """A data root with landed demo data of tenant `acme` (20k events, seed 11)."""
    if os.environ.get("RECSYS_TEST_DAGSTER"):
        return os.environ["RECSYS_TEST_DAGSTER"].split(",", 1)[1]
    from recsys.demo import DemoSpec, generate
    from recsys.storage import Storage

    root = tmp_path_factory.mktemp("control") / "data"
    spec = DemoSpec(
        events=20_000, seed=11, end_date="2026-11-01", chunk_events=10_000, tenant=TENANT
    )
    generate(spec, Storage(str(root)))
    return str(root)


@pytest.fixture(scope="session")
def dagster_server(dagster_data_root, tmp_path_factory):
    reuse = os.environ.get("RECSYS_TEST_DAGSTER")  # "<url>,<data root>" of a running one
    if reuse:  # (developing: a server started by hand with this conftest's helpers)
        url, root = reuse.split(",", 1)
        yield DagsterServer(url, root, "", f"sqlite:///{root}/mlflow/mlflow.db", "", None)
        return
    base = tmp_path_factory.mktemp("dagster")
    mlflow_uri = f"sqlite:///{dagster_data_root}/mlflow/mlflow.db"
    os.makedirs(f"{dagster_data_root}/mlflow", exist_ok=True)
    env = {"RECSYS_DATA_ROOT": dagster_data_root, "MLFLOW_TRACKING_URI": mlflow_uri}
    log = base / "dagster.log"
    proc, url = start_dagster_dev(base / "home", env, log)
    try:
        wait_json(f"{url}/graphql", LOCATION_READY, 300, location_loaded, proc=proc, log=log)
        stop_landing_sensor(url)
        yield DagsterServer(url, dagster_data_root, str(base / "home"), mlflow_uri, str(log), proc)
    finally:
        stop_group(proc)


@pytest.fixture(scope="session")
def control_client(dagster_server):
    """A Falcon test client on the Dagster server's data root, pointed at it and its MLflow."""
    from serving_helpers import build_client, make_config

    config = make_config(
        dagster_server.data_root,
        dagster_url=dagster_server.url,
        mlflow_uri=dagster_server.mlflow_uri,
    )
    return build_client(config)


@pytest.fixture(scope="module")
def snapshot_root(tmp_path_factory) -> str:
    """A data root with published snapshots of acme (a*) and globex (g*)."""
    from serving_helpers import publish_tiny

    root = str(tmp_path_factory.mktemp("snapshots"))
    publish_tiny(root, "acme", "a")
    publish_tiny(root, "globex", "g")
    return root


@pytest.fixture()
def data_root(snapshot_root, tmp_path) -> str:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(os.path.join(snapshot_root, "snapshots"), root / "snapshots")
    return str(root)


@pytest.fixture()
def client(data_root):
    from serving_helpers import build_client, make_config

    return build_client(make_config(data_root))

"""Connector runs in Dagster: the `connector_run` job and the sensor that starts it.

`connector_run` (one op, `sync_connector`) runs one stored connector
(`recsys.connectors.run_connector`) with its progress in the run's log, the summary as output
metadata, and a failure -- an unreachable source, a missing stream -- as a failed run whose log
says why. The API's ``POST /v1/recs/connectors/{id}/run`` launches it through the webserver;
``GET .../logs`` reads its runs and their logs back.

`connector_sensor` starts runs by itself: for a ``files`` connector when the listing of its
folder changed (the run key is a hash of names, sizes and times), for ``http`` once per
``interval_s``, for ``nats`` and ``redis`` once a minute (each run drains what is new, then
ends). A connector with a run queued or in progress is skipped; one whose folder cannot be
listed is logged and skipped: a broken source never keeps the others from running.
"""

import hashlib
import os
import time

import dagster as dg

from pipelines.resources import StorageResource
from recsys.connectors import COLLECTION, ConnectorError, read_connector, run_connector
from recsys.tenancy import is_valid_tenant

JOB = "connector_run"
TAG_CONNECTOR = "recsys/connector"
TAG_TENANT = "recsys/tenant"
STREAM_INTERVAL_S = 60
ACTIVE = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


class ConnectorRunConfig(dg.Config):
    """Which connector to run."""

    tenant: str
    connector_id: str
    idle_s: float = 2.0  # a stream run ends after this long without new messages


@dg.op(description="Pull what is new from the connector's source into landing.")
def sync_connector(
    context: dg.OpExecutionContext, config: ConnectorRunConfig, storage: StorageResource
) -> None:
    if not is_valid_tenant(config.tenant):
        raise dg.Failure(description=f"{config.tenant!r} is not a tenant id")
    try:
        spec = read_connector(storage.root, config.tenant, config.connector_id)
        options = {"idle_s": config.idle_s} if spec["type"] in ("nats", "redis") else {}
        summary = run_connector(
            storage.root, config.tenant, config.connector_id, context.log.info, **options
        )
    except ConnectorError as exc:
        context.log.error(f"connector {config.connector_id} failed: {exc}")
        raise dg.Failure(description=str(exc)) from exc
    context.add_output_metadata(
        {k: v for k, v in summary.as_dict().items() if isinstance(v, int | float | str)}
    )


@dg.job(
    name=JOB,
    description="One run of a stored connector (files, NATS JetStream, polled HTTP JSON).",
    executor_def=dg.in_process_executor,
)
def connector_run() -> None:
    sync_connector()


def stored_connectors(root: str) -> list[tuple[str, str, dict]]:
    """(tenant, connector id, body) of every stored connector."""
    base = os.path.join(root, "serving", COLLECTION)
    out = []
    try:
        tenants = sorted(os.listdir(base))
    except FileNotFoundError:
        return []
    for tenant in tenants:
        if not is_valid_tenant(tenant):
            continue
        for name in sorted(os.listdir(os.path.join(base, tenant))):
            if name.endswith(".json") and not name.startswith("."):
                cid = name[:-5]
                try:
                    out.append((tenant, cid, read_connector(root, tenant, cid)))
                except (ConnectorError, ValueError, KeyError):
                    continue
    return out


def run_key(body: dict, now: float) -> str | None:
    """The key of the run the sensor would start now (None: nothing to do)."""
    kind, cfg = body["type"], body["config"]
    if kind == "files":
        from recsys.connectors.files import list_files

        listing = list_files(cfg["url"], cfg.get("pattern", "*"))
        if not listing:
            return None
        text = "\n".join(f"{k}\t{v}" for k, v in sorted(listing.items()))
        return "files-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    interval = int(cfg.get("interval_s", 300)) if kind == "http" else STREAM_INTERVAL_S
    return f"{kind}-{int(now // interval)}"


@dg.sensor(
    job=connector_run,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts connector runs: files when the folder changed, http every interval_s, "
    "nats every minute.",
)
def connector_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    now = time.time()
    requests = []
    for tenant, cid, body in stored_connectors(storage.root):
        tags = {TAG_TENANT: tenant, TAG_CONNECTOR: cid}
        try:
            key = run_key(body, now)
        except ConnectorError as exc:
            context.log.warning(f"{tenant}/{cid}: {exc}")
            continue
        if key is None:
            continue
        active = context.instance.get_runs(
            filters=dg.RunsFilter(tags=tags, statuses=ACTIVE), limit=1
        )
        if active:
            continue
        requests.append(
            dg.RunRequest(
                run_key=f"{tenant}/{cid}/{key}",
                run_config={"ops": {"sync_connector": {"config": {"tenant": tenant,
                                                                  "connector_id": cid}}}},
                tags={**tags, "recsys/trigger": "sensor"},
            )
        )  # fmt: skip
    return requests or dg.SkipReason("no connector has anything new")


jobs = [connector_run]
sensors = [connector_sensor]

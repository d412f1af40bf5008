"""Control plane: connectors - sources that feed landing (files, NATS, Redis Streams, HTTP).

``POST /v1/recs/connectors`` stores a connector document (``type``, ``target``, ``config``,
``name``) in the versioned store, collection ``connectors``
(``<data root>/serving/connectors/<tenant>/<id>.json``), after `recsys.connectors.check_spec`
(422 naming what is wrong). The source is not contacted: a connector to a source that is down is
accepted, and its runs fail with a clear log. ``GET`` lists the tenant's connectors (header
values of http connectors are masked).

A run is a Dagster run of the `connector_run` job (`pipelines/connector_sensors.py`), started by
the connector sensor or by ``POST .../{id}/run`` (202, launched through the webserver's GraphQL
API, `serving.control.dagster`; 409 while a run of the connector is queued or running; 503
naming Dagster when it is down -- recommendations keep serving). ``GET .../{id}/logs`` returns
the connector's newest runs (sensor and API alike) with their status and log lines, read back
from Dagster.
"""

from __future__ import annotations

import datetime as dt
import functools
import secrets
from typing import Annotated, Any, Literal

import falcon
from msgspec import Meta

from recsys.connectors import TARGETS, TYPES, check_spec
from recsys.contract import PATTERN_END
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.control.dagster import client_for
from serving.documents import Collection, DocumentStore, set_etag
from serving.errors import ProblemError
from serving.routing import Route
from serving.schemas import Body, Reply, Timestamp

JOB = "connector_run"  # pipelines/connector_sensors.py
TAG_TENANT, TAG_CONNECTOR, TAG_TRIGGER = "recsys/tenant", "recsys/connector", "recsys/trigger"
ACTIVE = ("QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING")
ConnectorId = Annotated[
    str,
    Meta(
        pattern=r"^cn_[0-9a-f]{16}" + PATTERN_END,
        description="a connector id (cn_ + 16 hex digits)",
    ),
]
ConnectorType = Literal[TYPES]  # type: ignore[valid-type]
Target = Literal[TARGETS]  # type: ignore[valid-type]


class ConnectorSpec(Body):
    """A new connector. config by type -- files: url (absolute path or fsspec URL), pattern,
    format; nats: servers, stream, subject, batch; redis: url, stream, group, field, batch;
    http: url, records_path, interval_s, headers. Every type: map (source field -> contract
    column)."""

    type: ConnectorType
    target: Target
    config: dict[str, Any]
    name: Annotated[str, Meta(min_length=1, max_length=100)] | None = None


class Connector(Reply):
    id: str
    type: str
    target: str
    config: dict[str, Any]
    version: str
    created_at: Timestamp
    name: str | None = None


class ConnectorList(Reply):
    items: list[Connector]
    total: int


class RunStarted(Reply):
    job_id: str
    connector_id: str
    status: str
    dagster_url: str


class LogLine(Reply):
    timestamp: Timestamp | None
    level: str | None
    message: str
    step: str | None = None


class ConnectorRun(Reply):
    job_id: str
    status: str
    trigger: str
    created_at: Timestamp
    dagster_url: str
    logs: list[LogLine]
    started_at: Timestamp | None = None
    ended_at: Timestamp | None = None


class ConnectorLogs(Reply):
    connector_id: str
    runs: list[ConnectorRun]


class LogsQuery(Body):
    runs: Annotated[int, Meta(ge=1, le=20)] = 5


@functools.cache
def _collection(root: str, check_interval_s: float) -> Collection:
    return DocumentStore(root, check_interval_s).collection("connectors", prefix="conn")


def collection(ctx: Any) -> Collection:
    return _collection(ctx.documents.root, ctx.documents.check_interval_s)


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _public(doc: Any) -> dict[str, Any]:
    config = dict(doc.body["config"])
    if config.get("headers"):  # (credentials of an HTTP service are not read back)
        config["headers"] = {k: "***" for k in config["headers"]}
    return {
        "id": doc.id,
        "name": doc.body.get("name"),
        "type": doc.body["type"],
        "target": doc.body["target"],
        "config": config,
        "version": doc.revision,
        "created_at": doc.created_at,
    }


def _own(runs: list[Any], tags: dict[str, str]) -> list[Any]:
    """The runs carrying every one of `tags` (checked here too: a tenant sees only its own)."""
    return [r for r in runs if all(r.tags.get(k) == v for k, v in tags.items())]


class ConnectorsResource:
    """The tenant's connectors (the tenant is always the caller's)."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._docs = collection(ctx)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        items = [_public(d) for d in self._docs.list(req.context.principal.tenant)]
        resp.media = {"items": items, "total": len(items)}
        resp.cache_control = ["no-store"]

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        spec: ConnectorSpec = req.context.body
        try:
            config = check_spec(spec.type, spec.target, spec.config)
        except ValueError as exc:
            raise ProblemError(422, str(exc), code="RECSYS_INVALID_CONNECTOR") from None
        cid = f"cn_{secrets.token_hex(8)}"
        body = {"name": spec.name, "type": spec.type, "target": spec.target, "config": config}
        doc = self._docs.create(tenant, cid, body)
        req.context.audit = {"target": f"connector/{cid}", "before": None, "after": doc.revision}
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/recs/connectors/{cid}"
        set_etag(resp, doc.revision)
        resp.media = _public(doc)

    def on_post_run(self, req: falcon.Request, resp: falcon.Response, connector_id: str) -> None:
        tenant = req.context.principal.tenant
        doc = self._docs.require(tenant, connector_id)
        dagster = client_for(self._ctx.config.dagster_url)
        tags = {TAG_TENANT: tenant, TAG_CONNECTOR: connector_id}
        running = _own(dagster.runs(tags=tags, statuses=ACTIVE, limit=10), tags)
        if running:
            raise ProblemError(
                409,
                f"Connector '{connector_id}' has a run in progress ({running[0].run_id}, "
                f"{running[0].status}); its logs are at /v1/recs/connectors/{connector_id}/logs.",
                code="RECSYS_CONNECTOR_BUSY",
            )
        config = {"tenant": tenant, "connector_id": connector_id}
        run_id = dagster.launch(
            JOB,
            {"ops": {"sync_connector": {"config": config}}},
            {**tags, TAG_TRIGGER: "api"},
        )
        req.context.audit = {
            "target": f"connector/{connector_id}",
            "before": doc.revision,
            "after": doc.revision,
        }
        resp.status = falcon.HTTP_202
        resp.location = f"/v1/recs/connectors/{connector_id}/logs"
        resp.media = {
            "job_id": run_id,
            "connector_id": connector_id,
            "status": "QUEUED",
            "dagster_url": dagster.ui_link(run_id),
        }

    def on_get_logs(self, req: falcon.Request, resp: falcon.Response, connector_id: str) -> None:
        tenant = req.context.principal.tenant
        self._docs.require(tenant, connector_id)
        dagster = client_for(self._ctx.config.dagster_url)
        tags = {TAG_TENANT: tenant, TAG_CONNECTOR: connector_id}
        runs = []
        for run in _own(dagster.runs(tags=tags, limit=req.context.query.runs), tags):
            page = dagster.events(run.run_id, limit=1000)
            events = page[0] if page is not None else []
            logs = [
                {
                    "timestamp": _iso(float(e["timestamp"]) / 1000 if e.get("timestamp") else None),
                    "level": e.get("level"),
                    "message": e.get("error") or e.get("message") or "",
                    "step": e.get("step"),
                }
                for e in events
                if e.get("message") and (e.get("level") or "DEBUG") != "DEBUG"
            ]
            runs.append(
                {
                    "job_id": run.run_id,
                    "status": run.status,
                    "trigger": run.tags.get(TAG_TRIGGER, "unknown"),
                    "created_at": _iso(run.created),
                    "started_at": _iso(run.started),
                    "ended_at": _iso(run.ended),
                    "dagster_url": dagster.ui_link(run.run_id),
                    "logs": logs,
                }
            )
        resp.media = {"connector_id": connector_id, "runs": runs}
        resp.cache_control = ["no-store"]


_ID = {"connector_id": ConnectorId}

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/recs/connectors",
        ("connectors", "on_get"),
        "The tenant's connectors",
        SCOPE_RECOMMEND,
        response=ConnectorList,
        tags=("connectors",),
    ),
    Route(
        "POST",
        "/v1/recs/connectors",
        ("connectors", "on_post"),
        "Add a connector (files/bucket, NATS JetStream, polled HTTP JSON); the source is not "
        "contacted",
        SCOPE_ADMIN,
        body=ConnectorSpec,
        status=201,
        response=Connector,
        errors=(409, 422),
        tags=("connectors",),
    ),
    Route(
        "POST",
        "/v1/recs/connectors/{connector_id}/run",
        ("connectors", "on_post_run"),
        "Start a run of the connector now (a Dagster run of connector_run)",
        SCOPE_ADMIN,
        params=_ID,
        status=202,
        response=RunStarted,
        errors=(409, 422, 503),
        tags=("connectors",),
    ),
    Route(
        "GET",
        "/v1/recs/connectors/{connector_id}/logs",
        ("connectors", "on_get_logs"),
        "The connector's newest runs with their status and log lines (from Dagster)",
        SCOPE_RECOMMEND,
        params=_ID,
        query=LogsQuery,
        response=ConnectorLogs,
        errors=(503,),
        tags=("connectors",),
    ),
)


def resources(ctx: Any) -> dict[str, Any]:
    return {"connectors": ConnectorsResource(ctx)}

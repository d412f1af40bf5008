"""Control plane: models, versions and deployments (/v1/recs/models), over the MLflow registry.

Data flows: a request -> `ModelsResource` -> `serving.control.registry.Registry` (MLflow) and,
for deployments, the tenant's snapshot folder and the experiments store:

* models and versions are MLflow registered models and model versions (`registry`); a version
  registered from an ``artifact_url`` (``runs:/<run>/<path>`` of the tenant's experiment, or a
  model folder under the tenant's ``models/`` folder) is loaded first (422 when it does not
  load), then logged / registered, so the version is immutable even when the folder changes;
* every published snapshot names the model version it was built from (manifest
  ``models.champion``: name, version, run id); deploying a version finds its snapshot there;
* ``deploy`` ``env=prod`` at 100 %: the version's snapshot becomes live (``CURRENT`` replaced
  atomically, the snapshot verified first), the ``champion`` alias moves, the version's
  ``deploy.*`` tags record the previous version and snapshot. ``traffic_pct`` < 100 (or
  ``env=canary``): a running experiment ``canary-...`` on the request's surface splits users
  deterministically between the live snapshot and the version's (alias ``canary``).
  ``env=staging``: a draft experiment ``staging-...`` that only requests naming it (and its
  variant ``staged``) read (alias ``staging``);
* ``rollback`` undoes a version's deployment: prod -> the previous version's snapshot is live
  again and the ``champion`` alias goes back; canary / staging -> the experiment and the alias go;
* one deployment per tenant at a time (an flock under ``<data root>/serving/deployments``):
  a second one answers 409 while the first runs;
* webhooks ``model.deployed`` / ``model.rolled_back`` through the outbox (`recsys.outbox`).

MLflow down: 503 naming MLflow (`registry.mlflow_unavailable`); recommendations keep serving
(nothing here is on their path).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

import falcon
from msgspec import UNSET, Meta, UnsetType

from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.control import registry as reg
from serving.errors import ProblemError
from serving.recs.schemas import Query
from serving.routing import Route
from serving.schemas import Body, Id, Reply

# --- schemas --------------------------------------------------------------------------------
ModelName = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$(?!\n)",
        description="1-64 ASCII letters, digits, '.', '_', '-' (the model id becomes "
        "recsys-<tenant>~<name>)",
    ),
]
ModelId = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9._~-]{1,200}$(?!\n)",
        description="a registered model name (recsys-<tenant> or recsys-<tenant>~<name>)",
    ),
]
VersionId = Annotated[
    str, Meta(pattern=r"^[0-9]{1,9}$(?!\n)", description="an MLflow model version number")
]
Short = Annotated[str, Meta(min_length=1, max_length=64)]
Text = Annotated[str, Meta(max_length=4096)]
Schema = Annotated[dict[str, Any], Meta(description="a JSON Schema (kept as a tag, <= 5000 chars)")]
Env = Literal["prod", "canary", "staging"]
Status = Literal["deployed", "canary", "staging", "archived", "registered"]


class ModelCreate(Body):
    name: ModelName
    type: Short = "recommender"
    framework: Short | None = None
    description: Text | None = None
    input_schema: Schema | None = None
    output_schema: Schema | None = None
    metadata: dict[str, Any] | None = None


class ModelPatch(Body):
    """Fields to change (absent: unchanged; null: removed)."""

    type: Short | None | UnsetType = UNSET
    framework: Short | None | UnsetType = UNSET
    description: Text | None | UnsetType = UNSET
    input_schema: Schema | None | UnsetType = UNSET
    output_schema: Schema | None | UnsetType = UNSET
    metadata: dict[str, Any] | None | UnsetType = UNSET


class Model(Reply):
    id: str
    name: str
    tenant: str
    type: str | None = None
    framework: str | None = None
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    aliases: dict[str, str] = {}
    latest_version: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class ModelList(Reply):
    items: list[Model]
    total: int


class VersionCreate(Body):
    artifact_url: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=2048,
            description="runs:/<run id>/<path> of the tenant's MLflow experiment, or a model "
            "folder under the tenant's models/ folder (absolute path or file://)",
        ),
    ]
    version: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    description: Text | None = None
    metadata: dict[str, Any] | None = None
    training_job_id: Id | None = None


class VersionPatch(Body):
    """Fields to change (absent: unchanged; null: removed)."""

    archived: bool | UnsetType = UNSET
    description: Text | None | UnsetType = UNSET
    metadata: dict[str, Any] | None | UnsetType = UNSET


class ModelVersion(Reply):
    id: str
    model_id: str
    status: Status
    aliases: list[str] = []
    label: str | None = None
    run_id: str | None = None
    source: str | None = None
    description: str | None = None
    metadata: dict[str, Any] | None = None
    training_job_id: str | None = None
    created_at: str | None = None
    deployment: dict[str, Any] | None = None


class VersionList(Reply):
    items: list[ModelVersion]
    total: int


class DeployRequest(Body):
    env: Env = "prod"
    traffic_pct: Annotated[float, Meta(gt=0, le=100)] = 100.0
    surface: Annotated[Id, Meta(description="canary: the surface split (default 'default')")] = (
        "default"
    )


class Deployment(Reply):
    id: str
    model_id: str
    version: str
    env: str
    traffic_pct: float
    status: str
    snapshot_id: str | None = None
    previous_version: str | None = None
    previous_snapshot_id: str | None = None
    experiment_id: str | None = None
    at: str | None = None
    by: str | None = None
    seconds: float | None = None
    event_id: str | None = None
    job: dict[str, Any] | None = None


class MetricsQuery(Query):
    version: VersionId | None = None
    since: Annotated[dt.datetime, Meta(tz=True, description="RFC 3339, inclusive")] | None = None
    until: Annotated[dt.datetime, Meta(tz=True, description="RFC 3339, exclusive")] | None = None


class Interval(Reply):
    value: float
    low: float | None = None
    high: float | None = None


class VersionMetrics(Reply):
    version: str
    run_id: str | None
    started_at: str | None
    served: dict[str, Interval]
    baselines: dict[str, dict[str, Interval]]
    training_seconds: float | None = None
    model_bytes: int | None = None
    data_rows: int | None = None


class MetricsReply(Reply):
    model_id: str
    items: list[VersionMetrics]


class FeatureImportance(Reply):
    model_id: str
    version: str
    run_id: str
    features: list[dict[str, Any]]
    gain: dict[str, Any]
    permutation: dict[str, Any]


class ExplainSchema(Reply):
    model_id: str
    version: str | None
    explanations: list[dict[str, Any]]
    features: list[str]
    unsupported: list[str] = []


# --- helpers --------------------------------------------------------------------------------
def _iso_ms(ms: int | None) -> str | None:
    if ms is None:
        return None
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat().replace("+00:00", "Z")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _tenant(req: falcon.Request) -> str:
    return req.context.principal.tenant


def _who(req: falcon.Request) -> str:
    return req.context.principal.subject


def model_view(tenant: str, m: Any) -> dict[str, Any]:
    tags = m.tags or {}
    prefix = f"recsys-{tenant}~"
    out: dict[str, Any] = {
        "id": m.name,
        "name": m.name[len(prefix) :] if m.name.startswith(prefix) else m.name,
        "tenant": tenant,
        "description": m.description or None,
        "aliases": {a: str(v) for a, v in (m.aliases or {}).items()},
        "latest_version": max((str(v.version) for v in m.latest_versions or ()), default=None),
        "created_at": _iso_ms(m.creation_timestamp),
        "updated_at": _iso_ms(m.last_updated_timestamp),
    }
    for key in reg.META_TAGS:
        out[key] = reg.tag_json(tags, f"recsys.{key}")
    if out["type"] is None and m.name == reg.pipeline_model(tenant):
        out["type"], out["framework"] = "hybrid", "recsys"
    return out


def version_view(v: Any) -> dict[str, Any]:
    tags = v.tags or {}
    deployment = {k[len("deploy.") :]: val for k, val in tags.items() if k.startswith("deploy.")}
    return {
        "id": str(v.version),
        "model_id": v.name,
        "status": reg.version_status(v),
        "aliases": list(v.aliases or ()),
        "label": tags.get("recsys.label"),
        "run_id": v.run_id or None,
        "source": v.source,
        "description": v.description or None,
        "metadata": reg.tag_json(tags, "recsys.metadata"),
        "training_job_id": tags.get("recsys.training_job_id"),
        "created_at": _iso_ms(v.creation_timestamp),
        "deployment": deployment or None,
    }


def _slug(name: str, version: str) -> str:
    """An experiment id part for a model version (<= 52 chars, experiment-id characters)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[-40:].lstrip("-._") + f"-v{version}"


def load_model_dir(path: str) -> Any:
    """The model a folder holds (`HybridRecommender.load`); 422 saying why when it does not load."""
    from recsys.models.hybrid import HybridRecommender

    try:
        return HybridRecommender.load(path)
    except Exception as ex:  # whatever the folder holds: it is not a loadable model
        raise ProblemError(
            422,
            f"The model artifacts do not load: {type(ex).__name__}: {str(ex)[:300]}",
            code="RECSYS_MODEL_UNLOADABLE",
        ) from None


# --- the resource ---------------------------------------------------------------------------
class ModelsResource:
    """Handlers of /v1/recs/models (see the module docstring)."""

    def __init__(self, ctx: Any, registry: reg.Registry | None = None) -> None:
        self._ctx = ctx
        self._reg = registry or reg.Registry(ctx.mlflow_uri)
        self._locks = os.path.join(ctx.serving_dir, "deployments")

    # -- models
    def on_get_models(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = _tenant(req)
        items = [model_view(tenant, m) for m in self._reg.models(tenant)]
        resp.media = {"items": items, "total": len(items)}
        resp.cache_control = ["no-store"]

    def on_post_models(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = _tenant(req)
        body: ModelCreate = req.context.body
        name = reg.api_model_name(tenant, body.name)
        self._require_quota(tenant)
        tags = {"tenant": tenant}
        for key in reg.META_TAGS:
            value = getattr(body, key)
            if value is not None:
                tags[f"recsys.{key}"] = reg.dump_tag(value, key)
        made = self._reg.call(
            lambda c: c.create_registered_model(name, tags=tags, description=body.description)
        )
        req.context.audit = {"target": f"model/{name}", "before": None, "after": "created"}
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/recs/models/{name}"
        resp.media = model_view(tenant, made)

    def _require_quota(self, tenant: str) -> None:
        from serving.control.access import require_quota

        require_quota(self._ctx, tenant, "models", used=len(self._reg.models(tenant)))

    def on_get_model(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        resp.media = model_view(_tenant(req), self._reg.model(_tenant(req), model_id))
        resp.cache_control = ["no-store"]

    def on_patch_model(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        tenant = _tenant(req)
        before = self._reg.model(tenant, model_id)
        patch: ModelPatch = req.context.body

        def change(client: Any) -> None:
            if patch.description is not UNSET:
                client.update_registered_model(model_id, description=patch.description or "")
            for key in reg.META_TAGS:
                value = getattr(patch, key)
                if value is UNSET:
                    continue
                if value is None:
                    if f"recsys.{key}" in (before.tags or {}):
                        client.delete_registered_model_tag(model_id, f"recsys.{key}")
                else:
                    client.set_registered_model_tag(
                        model_id, f"recsys.{key}", reg.dump_tag(value, key)
                    )

        self._reg.call(change)
        after = self._reg.model(tenant, model_id)
        req.context.audit = {
            "target": f"model/{model_id}",
            "before": str(before.last_updated_timestamp),
            "after": str(after.last_updated_timestamp),
        }
        resp.media = model_view(tenant, after)

    def on_delete_model(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        tenant = _tenant(req)
        model = self._reg.model(tenant, model_id)
        if model.aliases:
            raise ProblemError(
                409,
                f"Model '{model_id}' has versions in use (aliases "
                f"{', '.join(sorted(model.aliases))}); roll them back first.",
                code="RECSYS_MODEL_IN_USE",
            )
        self._reg.call(lambda c: c.delete_registered_model(model_id))
        req.context.audit = {
            "target": f"model/{model_id}",
            "before": str(model.last_updated_timestamp),
            "after": None,
        }
        resp.status = falcon.HTTP_204

    # -- versions
    def on_get_versions(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        model = self._reg.model(_tenant(req), model_id)
        items = [version_view(v) for v in self._reg.versions(model)]
        resp.media = {"items": items, "total": len(items)}
        resp.cache_control = ["no-store"]

    def on_get_version(
        self, req: falcon.Request, resp: falcon.Response, model_id: str, version_id: str
    ) -> None:
        resp.media = version_view(self._reg.version(_tenant(req), model_id, version_id))
        resp.cache_control = ["no-store"]

    def on_patch_version(
        self, req: falcon.Request, resp: falcon.Response, model_id: str, version_id: str
    ) -> None:
        tenant = _tenant(req)
        before = self._reg.version(tenant, model_id, version_id)
        patch: VersionPatch = req.context.body
        if patch.archived is True and before.aliases:
            raise ProblemError(
                409,
                f"Version {version_id} is {reg.version_status(before)}; roll it back before "
                "archiving it.",
                code="RECSYS_MODEL_IN_USE",
            )

        def change(client: Any) -> None:
            if patch.description is not UNSET:
                client.update_model_version(
                    model_id, version_id, description=patch.description or ""
                )
            if patch.archived is not UNSET:
                if patch.archived:
                    client.set_model_version_tag(model_id, version_id, reg.ARCHIVED_TAG, "true")
                elif reg.ARCHIVED_TAG in (before.tags or {}):
                    client.delete_model_version_tag(model_id, version_id, reg.ARCHIVED_TAG)
            if patch.metadata is not UNSET:
                if patch.metadata is None:
                    if "recsys.metadata" in (before.tags or {}):
                        client.delete_model_version_tag(model_id, version_id, "recsys.metadata")
                else:
                    value = reg.dump_tag(patch.metadata, "metadata")
                    client.set_model_version_tag(model_id, version_id, "recsys.metadata", value)

        self._reg.call(change)
        after = self._reg.version(tenant, model_id, version_id)
        req.context.audit = {
            "target": f"model/{model_id}/versions/{version_id}",
            "before": reg.version_status(before),
            "after": reg.version_status(after),
        }
        resp.media = version_view(after)

    def on_post_versions(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        tenant = _tenant(req)
        self._reg.model(tenant, model_id)
        body: VersionCreate = req.context.body
        tags = {"tenant": tenant}
        if body.version is not None:
            tags["recsys.label"] = body.version
        if body.metadata is not None:
            tags["recsys.metadata"] = reg.dump_tag(body.metadata, "metadata")
        if body.training_job_id is not None:
            tags["recsys.training_job_id"] = body.training_job_id
        url = body.artifact_url
        if "\x00" in url:  # (no path or run holds one: the OS would refuse it)
            raise ProblemError(
                422, "artifact_url cannot hold a NUL character.", code="RECSYS_BAD_ARTIFACT_URL"
            )
        if url.startswith("runs:/"):
            source, run_id = self._run_artifacts(tenant, url)
        else:
            source, run_id = self._folder_artifacts(tenant, url)
        made = self._reg.call(
            lambda c: c.create_model_version(
                model_id, source=source, run_id=run_id, tags=tags, description=body.description
            )
        )
        req.context.audit = {
            "target": f"model/{model_id}/versions/{made.version}",
            "before": None,
            "after": str(made.version),
        }
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/recs/models/{model_id}/versions/{made.version}"
        resp.media = version_view(made)

    def _run_artifacts(self, tenant: str, url: str) -> tuple[str, str]:
        """(source, run id) of ``runs:/<run id>/<path>`` after the folder loaded (422 if not)."""
        run_id, _, path = url[len("runs:/") :].partition("/")
        run = self._reg.find(lambda c: c.get_run(run_id)) if run_id else None
        if run is None or (run.data.tags or {}).get("tenant") != tenant:
            raise ProblemError(
                422, f"No MLflow run '{run_id}' of this tenant.", code="RECSYS_UNKNOWN_RUN"
            )
        source = f"{run.info.artifact_uri.rstrip('/')}/{path.strip('/')}".rstrip("/")
        with self._downloaded(source):
            pass
        return source, run_id

    def _folder_artifacts(self, tenant: str, url: str) -> tuple[str, str]:
        """A model folder of the tenant: loaded (422 if not), then logged as the artifacts of a
        new run of the tenant's experiment, so the version does not change with the folder."""
        from recsys.storage import Storage
        from recsys.tracking import ensure_experiment

        path = os.path.realpath(url.removeprefix("file://"))
        allowed = os.path.realpath(Storage(self._ctx.config.data_root).models_dir(tenant))
        if not path.startswith(allowed + os.sep) or not os.path.isdir(path):
            raise ProblemError(
                422,
                "artifact_url must be runs:/<run id>/<path> or a model folder under this "
                "tenant's models/ folder.",
                code="RECSYS_BAD_ARTIFACT_URL",
            )
        load_model_dir(path)

        # a local store (SQLite, files) keeps artifacts beside the pipeline's, never in the
        # server's working directory (MLflow's default); a tracking server decides its own
        uri = self._ctx.mlflow_uri
        local = not uri.startswith(("http://", "https://", "databricks"))
        root = Storage(self._ctx.config.data_root).mlflow_artifacts() if local else None

        def log(client: Any) -> tuple[str, str]:
            exp = ensure_experiment(client, tenant, root)
            run = client.create_run(exp, tags={"tenant": tenant}, run_name=f"register-{tenant}")
            client.log_artifacts(run.info.run_id, path, "model")
            client.set_terminated(run.info.run_id, "FINISHED")
            return f"{run.info.artifact_uri.rstrip('/')}/model", run.info.run_id

        return self._reg.call(log)

    @contextmanager
    def _downloaded(self, source: str) -> Iterator[Any]:
        """The model of an artifact URI, downloaded to a temporary folder and loaded: 422 when
        the artifacts are missing or do not load, 503 when MLflow does not answer."""
        import mlflow
        from mlflow.exceptions import MlflowException

        self._reg.call(lambda c: None)  # (the health check: 503 when MLflow is down)
        tmp = tempfile.mkdtemp(prefix="recsys-model-")
        try:
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=source, dst_path=tmp, tracking_uri=self._reg.uri
                )
            except (MlflowException, OSError) as ex:
                module = type(ex).__module__.split(".")[0]
                code = getattr(ex, "error_code", "")
                if module in ("requests", "urllib3") or code in (
                    "INTERNAL_ERROR",
                    "TEMPORARILY_UNAVAILABLE",
                ):
                    raise reg.mlflow_unavailable(f"{type(ex).__name__}: {str(ex)[:300]}") from None
                raise ProblemError(
                    422,
                    f"The artifacts at {source} cannot be read: {type(ex).__name__}.",
                    code="RECSYS_MODEL_UNLOADABLE",
                ) from None
            yield load_model_dir(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- deployments
    @contextmanager
    def _deploying(self, tenant: str) -> Iterator[None]:
        """One deployment or rollback per tenant at a time, across workers: 409 while one runs."""
        os.makedirs(self._locks, exist_ok=True)
        fd = os.open(os.path.join(self._locks, f"{tenant}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ProblemError(
                    409,
                    "Another deployment or rollback of this tenant is running; retry when it "
                    "has finished.",
                    code="RECSYS_DEPLOYMENT_RUNNING",
                    headers={"Retry-After": "5"},
                ) from None
            yield
        finally:
            os.close(fd)  # (releases the lock)

    def _snapshots(self, tenant: str) -> Any:
        holder = self._ctx.store.tenant(tenant)
        return None if holder is None else holder

    def _snapshot_of(self, tenant: str, name: str, version: str) -> str | None:
        """The newest kept snapshot built from `name`@`version` (its manifest says so)."""
        if self._snapshots(tenant) is None:
            return None
        return self._ctx.experiments.snapshot_of_model(tenant, f"{name}@{version}")

    def _switch(self, tenant: str, snapshot_id: str) -> str | None:
        """Make `snapshot_id` live (verified first; CURRENT replaced atomically); returns the
        snapshot that was live before."""
        from recsys.snapshot import SnapshotError

        holder = self._snapshots(tenant)
        previous = holder.store.current_id()
        try:
            holder.store.rollback(snapshot_id)
        except SnapshotError as ex:
            raise ProblemError(
                409,
                f"Snapshot '{snapshot_id}' cannot be made live: {ex}",
                code="RECSYS_NO_SNAPSHOT",
            ) from None
        holder.refresh(force=True)  # this worker serves it now; others within snapshot_check_s
        return previous

    def _not_kept(self, name: str, version: str) -> ProblemError:
        return ProblemError(
            409,
            f"No published snapshot of {name} version {version} is kept here; publish one "
            "(the pipeline's serving_snapshot) before deploying it.",
            code="RECSYS_SNAPSHOT_NOT_KEPT",
        )

    def on_post_deploy(
        self, req: falcon.Request, resp: falcon.Response, model_id: str, version_id: str
    ) -> None:
        tenant = _tenant(req)
        body: DeployRequest = req.context.body
        started = time.perf_counter()
        with self._deploying(tenant):
            version = self._reg.version(tenant, model_id, version_id)
            with self._downloaded(version.source):  # 422 when the artifacts do not load
                pass
            snapshot = self._snapshot_of(tenant, model_id, version_id)
            if snapshot is None:
                out = self._rebuild(req, tenant, version, body)
                req.context.audit = {
                    "target": f"model/{model_id}/versions/{version_id}",
                    "before": None,
                    "after": f"rebuild:{out['job']['run_id']}",
                }
                resp.status = falcon.HTTP_202
                resp.location = f"/v1/recs/jobs/{out['job']['run_id']}"
                resp.media = out
                return
            if body.env == "prod" and body.traffic_pct >= 100:
                out = self._deploy_prod(req, tenant, version, snapshot)
            else:
                out = self._deploy_split(req, tenant, version, snapshot, body)
            self._pin(tenant)
        out["seconds"] = round(time.perf_counter() - started, 3)
        out["event_id"] = self._emit(tenant, "model.deployed", out)
        req.context.audit = {
            "target": f"model/{model_id}/versions/{version_id}",
            "before": out.get("previous_version"),
            "after": f"{out['env']}:{version_id}",
        }
        resp.media = out

    def _rebuild(self, req, tenant: str, version: Any, body: DeployRequest) -> dict[str, Any]:
        """No kept snapshot of the version: a Dagster run of `publish_job` rebuilds one from the
        version's MLflow artifacts, without making it live; the answer (202) names the run.
        Deploying again once it has finished makes it live. While it runs, deploys are 409."""
        from serving.control.dagster import ACTIVE, client_for

        name, number = version.name, str(version.version)
        if name != reg.pipeline_model(tenant):
            raise self._not_kept(name, number)  # (the pipeline publishes its own model only)
        dagster = client_for(self._ctx.config.dagster_url)
        pending = (version.tags or {}).get("deploy.rebuild_run")
        if pending:
            run = dagster.run(pending)
            if run is not None and run.status in ACTIVE:
                raise ProblemError(
                    409,
                    f"The snapshot of version {number} is being rebuilt (Dagster run {pending}); "
                    "deploy again when it has finished.",
                    code="RECSYS_DEPLOYMENT_RUNNING",
                    headers={"Retry-After": "30"},
                    extra={"job": {"run_id": pending, "status": run.status}},
                )
        cfg = {
            "tenants": [tenant],
            "model_version": number,
            "make_live": False,
            "mlflow_uri": self._reg.uri,
        }
        assets = ("user_recommendations", "item_similarities", "fallback_lists", "serving_snapshot")
        run_id = dagster.launch(
            "publish_job",
            {"ops": {a: {"config": cfg} for a in assets}},
            {
                "recsys/tenant": tenant,
                "recsys/kind": "rebuild",
                "recsys/model_version": f"{name}@{number}",
            },
        )
        self._reg.call(
            lambda c: c.set_model_version_tag(name, number, "deploy.rebuild_run", run_id)
        )
        out = self._deployment(req, version, body.env, body.traffic_pct, "rebuilding")
        out["job"] = {"run_id": run_id, "job": "publish_job", "ui": dagster.ui_link(run_id)}
        return out

    def _deployment(self, req, version, env, pct, status, **extra) -> dict[str, Any]:
        return {
            "id": f"dep-{uuid.uuid4().hex[:12]}",
            "model_id": version.name,
            "version": str(version.version),
            "env": env,
            "traffic_pct": float(pct),
            "status": status,
            "at": _now(),
            "by": _who(req),
            **extra,
        }

    def _tag_deployment(self, client: Any, version: Any, out: dict[str, Any]) -> None:
        for key in ("id", "env", "traffic_pct", "at", "by", "snapshot_id", "experiment_id"):
            if out.get(key) is not None:
                client.set_model_version_tag(
                    version.name, version.version, f"deploy.{key}", str(out[key])
                )
        for key in ("previous_version", "previous_snapshot_id"):
            if out.get(key) is not None:
                client.set_model_version_tag(
                    version.name, version.version, f"deploy.{key}", str(out[key])
                )

    def _deploy_prod(self, req, tenant: str, version: Any, snapshot: str) -> dict[str, Any]:
        name, number = version.name, str(version.version)
        current = self._reg.alias_version(name, reg.CHAMPION)
        previous_version = None if current is None else str(current.version)
        self._end_split(tenant, name, "canary")
        previous_snapshot = self._switch(tenant, snapshot)
        out = self._deployment(
            req,
            version,
            "prod",
            100,
            "live",
            snapshot_id=snapshot,
            previous_version=previous_version if previous_version != number else None,
            previous_snapshot_id=previous_snapshot if previous_snapshot != snapshot else None,
        )

        def record(client: Any) -> None:
            client.set_registered_model_alias(name, reg.CHAMPION, number)
            if out["previous_version"] is None and previous_version == number:
                # a re-deploy of the live version keeps its recorded predecessor
                return
            self._tag_deployment(client, version, out)

        try:
            self._reg.call(record)
        except BaseException:
            if previous_snapshot and previous_snapshot != snapshot:
                self._switch(tenant, previous_snapshot)  # nothing changes when MLflow fails
            raise
        return out

    def _deploy_split(self, req, tenant, version, snapshot, body: DeployRequest) -> dict[str, Any]:
        name, number = version.name, str(version.version)
        env = "staging" if body.env == "staging" else "canary"
        pct = 100.0 if env == "staging" else min(body.traffic_pct, 99.9)
        exp_id = f"{env}-{_slug(name, number)}"
        self._end_split(tenant, name, env)
        if env == "canary":
            spec = {
                "id": exp_id,
                "name": f"canary of {name} version {number} ({pct:g} %)",
                "surface": body.surface,
                "status": "running",
                "variants": [
                    {"id": "live", "snapshot": "current", "traffic": 100.0 - pct},
                    {"id": f"v{number}", "model": f"{name}@{number}", "traffic": pct},
                ],
            }
        else:
            spec = {
                "id": exp_id,
                "name": f"staging of {name} version {number}",
                "description": "Read by requests naming this experiment and its variant 'staged'.",
                "surface": body.surface,
                "status": "draft",
                "variants": [
                    {"id": "staged", "model": f"{name}@{number}", "traffic": 1.0},
                    {"id": "live", "snapshot": "current", "traffic": 1.0},
                ],
            }
        self._ctx.experiments.create(tenant, spec)
        out = self._deployment(
            req, version, env, pct, env, snapshot_id=snapshot, experiment_id=exp_id
        )

        def record(client: Any) -> None:
            client.set_registered_model_alias(name, env, number)
            self._tag_deployment(client, version, out)

        try:
            self._reg.call(record)
        except BaseException:
            self._ctx.experiments.delete(tenant, exp_id)
            raise
        return out

    def _end_split(self, tenant: str, name: str, env: str) -> str | None:
        """Remove the `env` (canary / staging) experiment of model `name` and its alias; returns
        the version it held."""
        held = self._reg.alias_version(name, env)
        if held is None:
            return None
        exp_id = (held.tags or {}).get("deploy.experiment_id")
        if exp_id and self._ctx.experiments.read(tenant, exp_id) is not None:
            self._ctx.experiments.delete(tenant, exp_id)
        self._reg.call(lambda c: c.delete_registered_model_alias(name, env))
        return str(held.version)

    def on_post_rollback(
        self, req: falcon.Request, resp: falcon.Response, model_id: str, version_id: str
    ) -> None:
        tenant = _tenant(req)
        started = time.perf_counter()
        with self._deploying(tenant):
            version = self._reg.version(tenant, model_id, version_id)
            aliases = set(version.aliases)
            if reg.CHAMPION in aliases:
                out = self._rollback_prod(req, tenant, version)
            elif aliases & {"canary", "staging"}:
                env = "canary" if "canary" in aliases else "staging"
                self._end_split(tenant, model_id, env)
                out = self._deployment(
                    req,
                    version,
                    env,
                    0,
                    "rolled_back",
                    experiment_id=(version.tags or {}).get("deploy.experiment_id"),
                )
            else:
                raise ProblemError(
                    409,
                    f"Version {version_id} of '{model_id}' is not deployed (status "
                    f"{reg.version_status(version)}): nothing to roll back.",
                    code="RECSYS_NOT_DEPLOYED",
                )
            if out["status"] == "rebuilding":  # (nothing changed yet: 202 with the run)
                resp.status = falcon.HTTP_202
                resp.location = f"/v1/recs/jobs/{out['job']['run_id']}"
                resp.media = out
                return
            self._pin(tenant)
        out["seconds"] = round(time.perf_counter() - started, 3)
        out["event_id"] = self._emit(tenant, "model.rolled_back", out)
        req.context.audit = {
            "target": f"model/{model_id}/versions/{version_id}",
            "before": f"{out['env']}:{version_id}",
            "after": out.get("previous_version"),
        }
        resp.media = out

    def _rollback_prod(self, req, tenant: str, version: Any) -> dict[str, Any]:
        name, number = version.name, str(version.version)
        tags = version.tags or {}
        # deployed through the API: its deploy.* tags; promoted by the pipeline's gate: gate.*
        target = tags.get("deploy.previous_version") or tags.get("gate.champion_version")
        if target in (None, "", "None", number):
            raise ProblemError(
                409,
                f"Version {number} of '{name}' has no previous deployed version to go back to.",
                code="RECSYS_NOTHING_TO_ROLL_BACK",
            )
        snapshot = tags.get("deploy.previous_snapshot_id")
        kept = self._snapshots(tenant)
        if snapshot is None or kept is None or snapshot not in kept.store.ids():
            snapshot = self._snapshot_of(tenant, name, target)
        if snapshot is None:  # rebuilt from the previous version's artifacts: roll back again then
            previous = self._reg.version(tenant, name, target)
            out = self._rebuild(req, tenant, previous, DeployRequest())
            return {**out, "previous_version": target}
        previous_snapshot = self._switch(tenant, snapshot)

        def record(client: Any) -> None:
            client.set_registered_model_alias(name, reg.CHAMPION, target)
            client.set_model_version_tag(name, number, "deploy.rolled_back_at", _now())

        try:
            self._reg.call(record)
        except BaseException:
            if previous_snapshot:
                self._switch(tenant, previous_snapshot)
            raise
        return self._deployment(
            req,
            version,
            "prod",
            100,
            "rolled_back",
            snapshot_id=snapshot,
            previous_version=target,
            previous_snapshot_id=previous_snapshot,
        )

    def _pin(self, tenant: str) -> None:
        """Pin the snapshots the tenant's deployments refer to (each aliased version's snapshot
        and the one its rollback returns to), so the publish's pruning keeps them."""
        holder = self._snapshots(tenant)
        if holder is None:
            return
        ids: set[str] = set()
        for model in self._reg.models(tenant):
            for alias, number in (model.aliases or {}).items():
                if alias not in reg.ALIAS_STATUS:
                    continue
                v = self._reg.find(lambda c, n=number, m=model.name: c.get_model_version(m, str(n)))
                tags = {} if v is None else (v.tags or {})
                ids.update(
                    tags[k]
                    for k in ("deploy.snapshot_id", "deploy.previous_snapshot_id")
                    if k in tags
                )
        holder.store.pin(ids & set(holder.store.ids()))

    def _emit(self, tenant: str, event: str, payload: dict[str, Any]) -> str:
        """Record the webhook event in the outbox; its message id (`webhook-id`)."""
        from recsys.outbox import emit

        return emit(self._ctx.config.data_root, tenant, event, payload)

    # -- metrics, explanations
    def on_get_metrics(self, req: falcon.Request, resp: falcon.Response, model_id: str) -> None:
        tenant = _tenant(req)
        model = self._reg.model(tenant, model_id)
        q: MetricsQuery = req.context.query
        versions = self._reg.versions(model)
        if q.version is not None:
            versions = [v for v in versions if str(v.version) == q.version]
            if not versions:
                raise ProblemError(
                    404, f"No version '{q.version}' of model '{model_id}'.", code=reg._NO_VERSION
                )
        since = None if q.since is None else q.since.timestamp() * 1000
        until = None if q.until is None else q.until.timestamp() * 1000
        items = []
        for v in versions:
            run = self._reg.find(lambda c, rid=v.run_id: c.get_run(rid)) if v.run_id else None
            started = None if run is None else run.info.start_time
            if (since is not None or until is not None) and started is None:
                continue
            if since is not None and started < since or until is not None and started >= until:
                continue
            items.append(self._version_metrics(v, run))
        resp.media = {"model_id": model_id, "items": items}
        resp.cache_control = ["no-store"]

    def _version_metrics(self, v: Any, run: Any) -> dict[str, Any]:
        metrics = {} if run is None else dict(run.data.metrics)
        by_model: dict[str, dict[str, dict[str, float]]] = {}
        for key, value in metrics.items():
            head, dot, label = key.partition(".")
            if not dot or head == "validation":
                continue
            bound = None
            for suffix in ("_low", "_high"):
                if label.endswith(suffix):
                    label, bound = label[: -len(suffix)], suffix[1:]
            entry = by_model.setdefault(head, {}).setdefault(label.replace("_at_", "@"), {})
            entry[bound or "value"] = value
        clean = {m: {k: e for k, e in d.items() if "value" in e} for m, d in by_model.items()}
        served = clean.pop("served", {})
        return {
            "version": str(v.version),
            "run_id": v.run_id or None,
            "started_at": None if run is None else _iso_ms(run.info.start_time),
            "served": served,
            "baselines": clean,
            "training_seconds": metrics.get("training_seconds"),
            "model_bytes": None if run is None else self._model_bytes(run, v),
            "data_rows": int(metrics["data_rows"]) if "data_rows" in metrics else None,
        }

    def _model_bytes(self, run: Any, v: Any) -> int | None:
        """Bytes of the version's model folder (its run's artifacts under the source path)."""
        base = run.info.artifact_uri.rstrip("/") + "/"
        if not (v.source or "").startswith(base):
            return None
        root = v.source[len(base) :]

        def walk(client: Any) -> int:
            total, todo = 0, [root]
            while todo:
                for f in client.list_artifacts(run.info.run_id, todo.pop()):
                    if f.is_dir:
                        todo.append(f.path)
                    else:
                        total += f.file_size or 0
            return total

        return self._reg.call(walk)

    def _importance(self, run_id: str) -> dict[str, Any] | None:
        """The feature importance the training run logged (`feature_importance.json`)."""
        import json

        import mlflow

        tmp = tempfile.mkdtemp(prefix="recsys-fi-")
        try:
            with self._reg.errors():
                names = {f.path for f in self._reg.client().list_artifacts(run_id, "model")}
                if "model/feature_importance.json" not in names:
                    return None
                path = mlflow.artifacts.download_artifacts(
                    run_id=run_id,
                    artifact_path="model/feature_importance.json",
                    dst_path=tmp,
                    tracking_uri=self._reg.uri,
                )
            with open(path) as f:
                return json.load(f)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def on_get_feature_importance(
        self, req: falcon.Request, resp: falcon.Response, model_id: str, version_id: str
    ) -> None:
        v = self._reg.version(_tenant(req), model_id, version_id)
        found = self._importance(v.run_id) if v.run_id else None
        if found is None:
            raise ProblemError(
                404,
                f"Version {version_id} of '{model_id}' has no logged feature importance (it has "
                "no ranker, or was trained before importances were logged).",
                code="RECSYS_NO_FEATURE_IMPORTANCE",
            )
        resp.media = {"model_id": model_id, "version": version_id, "run_id": v.run_id, **found}
        resp.cache_control = ["no-store"]

    def on_get_explain_schema(
        self, req: falcon.Request, resp: falcon.Response, model_id: str
    ) -> None:
        tenant = _tenant(req)
        model = self._reg.model(tenant, model_id)
        q: ExplainQuery = req.context.query
        number = q.version or (model.aliases or {}).get(reg.CHAMPION)
        if number is None:
            number = max((int(v.version) for v in model.latest_versions or ()), default=None)
        found = None
        if number is not None:
            v = self._reg.version(tenant, model_id, str(number))
            found = self._importance(v.run_id) if v.run_id else None
        explanations = [
            {
                "kind": "reasons",
                "where": "POST /v1/recommend options.include_reasons",
                "what": "a reason per recommended item (personal, co-bought, similar, popular, "
                "trending, segment, category)",
            },
            {
                "kind": "signals",
                "where": "POST /v1/recommend options.explain (summary or full)",
                "what": "each item's per-signal scores: " + ", ".join(_signals()),
            },
            {
                "kind": "decision_trace",
                "where": "POST /v1/recommend options.include_trace",
                "what": "every candidate: kept, excluded by which rule, capped, pinned, "
                "back-filled",
            },
        ]
        if found is not None:
            explanations.append(
                {
                    "kind": "feature_importance",
                    "where": f"GET /v1/recs/models/{model_id}/versions/{number}/feature-importance",
                    "what": "the ranker's gain importances and permutation importance on "
                    "held-out users",
                }
            )
        resp.media = {
            "model_id": model_id,
            "version": None if number is None else str(number),
            "explanations": explanations,
            "features": [f["name"] for f in found["features"]] if found else [],
            "unsupported": ["shap"],
        }
        resp.cache_control = ["no-store"]


def _signals() -> tuple[str, ...]:
    from recsys.snapshot.format import SIGNALS

    return SIGNALS


class ExplainQuery(Query):
    version: VersionId | None = None


# --- the routes -----------------------------------------------------------------------------
_M = {"model_id": ModelId}
_MV = {"model_id": ModelId, "version_id": VersionId}
_TAGS = ("models",)
_MLFLOW = 503  # MLflow down

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/recs/models",
        ("models", "on_get_models"),
        "The tenant's models (MLflow registered models)",
        SCOPE_RECOMMEND,
        response=ModelList,
        errors=(_MLFLOW,),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/models",
        ("models", "on_post_models"),
        "Register a model (metadata only): an MLflow registered model recsys-<tenant>~<name>",
        SCOPE_ADMIN,
        body=ModelCreate,
        status=201,
        response=Model,
        errors=(409, 422, _MLFLOW),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/models/{model_id}",
        ("models", "on_get_model"),
        "One model",
        SCOPE_RECOMMEND,
        params=_M,
        response=Model,
        errors=(_MLFLOW,),
        tags=_TAGS,
    ),
    Route(
        "PATCH",
        "/v1/recs/models/{model_id}",
        ("models", "on_patch_model"),
        "Change a model's metadata (absent: unchanged, null: removed)",
        SCOPE_ADMIN,
        params=_M,
        body=ModelPatch,
        response=Model,
        errors=(422, _MLFLOW),
        tags=_TAGS,
    ),
    Route(
        "DELETE",
        "/v1/recs/models/{model_id}",
        ("models", "on_delete_model"),
        "Delete a model and its versions (409 while a version is deployed, canary or staging)",
        SCOPE_ADMIN,
        params=_M,
        status=204,
        errors=(409, _MLFLOW),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/models/{model_id}/versions",
        ("models", "on_get_versions"),
        "Versions with their status (deployed, canary, staging, archived, registered)",
        SCOPE_RECOMMEND,
        params=_M,
        response=VersionList,
        errors=(_MLFLOW,),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/models/{model_id}/versions",
        ("models", "on_post_versions"),
        "Register a version from artifact_url (422 unless the model loads)",
        SCOPE_ADMIN,
        params=_M,
        body=VersionCreate,
        status=201,
        response=ModelVersion,
        errors=(422, _MLFLOW),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/models/{model_id}/versions/{version_id}",
        ("models", "on_get_version"),
        "One version",
        SCOPE_RECOMMEND,
        params=_MV,
        response=ModelVersion,
        errors=(_MLFLOW,),
        tags=_TAGS,
    ),
    Route(
        "PATCH",
        "/v1/recs/models/{model_id}/versions/{version_id}",
        ("models", "on_patch_version"),
        "Archive (or un-archive) a version, change its description or metadata",
        SCOPE_ADMIN,
        params=_MV,
        body=VersionPatch,
        response=ModelVersion,
        errors=(409, 422, _MLFLOW),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/models/{model_id}/versions/{version_id}/deploy",
        ("models", "on_post_deploy"),
        "Deploy a version: prod at 100 % makes its snapshot live; below 100 % (or canary) "
        "splits users; staging serves requests naming it",
        SCOPE_ADMIN,
        params=_MV,
        body=DeployRequest,
        also=(202,),
        response=Deployment,
        errors=(409, 422, _MLFLOW),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/models/{model_id}/versions/{version_id}/rollback",
        ("models", "on_post_rollback"),
        "Roll a deployed version back: the previous version is live again (canary / staging: "
        "the split ends)",
        SCOPE_ADMIN,
        params=_MV,
        also=(202,),
        response=Deployment,
        errors=(409, _MLFLOW),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/models/{model_id}/metrics",
        ("models", "on_get_metrics"),
        "Offline metrics of the versions' MLflow runs (NDCG@k, recall, coverage with "
        "intervals, training time, model size), by version and time range",
        SCOPE_RECOMMEND,
        params=_M,
        query=MetricsQuery,
        response=MetricsReply,
        errors=(_MLFLOW,),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/models/{model_id}/explain-schema",
        ("models", "on_get_explain_schema"),
        "The explanations a version supports (default: the champion)",
        SCOPE_RECOMMEND,
        params=_M,
        query=ExplainQuery,
        response=ExplainSchema,
        errors=(_MLFLOW,),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/models/{model_id}/versions/{version_id}/feature-importance",
        ("models", "on_get_feature_importance"),
        "The ranker's gain and permutation importances, logged at training time",
        SCOPE_RECOMMEND,
        params=_MV,
        response=FeatureImportance,
        errors=(_MLFLOW,),
        tags=_TAGS,
    ),
)


def resources(ctx: Any) -> dict[str, Any]:
    return {"models": ModelsResource(ctx)}

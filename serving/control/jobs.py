"""Control plane: jobs. A job is a Dagster run of the code location's jobs, launched and read
through the webserver's GraphQL API (`serving.control.dagster`); nothing is stored here.

Routes (tenant-scoped through the run's `recsys/tenant` tag: another tenant's job id is 404;
writes need `admin`):

* ``POST /v1/recs/jobs/train``: `train_job` (ingest -> train -> evaluate -> champion gate) for
  the tenant; `hyperparameters` is the training assets' `TrainingConfig` and Dagster validates
  it against that schema before any run exists (422 with Dagster's messages).
* ``POST /v1/recs/jobs/evaluate``: `evaluate_version_job`: a registered version scored on a
  holdout file; the MLflow run holds the metrics, the table and the plot.
* ``GET /v1/recs/jobs`` (type, status, created_after / created_before), ``GET .../jobs/{id}``
  (status, step progress, Dagster UI link, MLflow run), ``GET .../jobs/{id}/results`` (the
  MLflow run's metrics, params, artifacts, the baseline comparison; an export's manifest),
  ``POST .../jobs/stop`` and ``DELETE .../jobs/{id}/cancel`` (terminate the run).
* ``POST /v1/recs/batch/precompute``: users (all / a segment / ids) x a version -> an export URI
  (`precompute_job`, one step per shard) or a new snapshot (`publish_job`: RECSYS_USER_SHARDS
  user shards of the code location, 16 by default, in one step in process, a step each on
  Celery; a step's key says how many it scores: `shard_step_count`);
  ``schedule`` a cron -> a Dagster schedule (a file the code location reads, then reload and
  start through GraphQL). ``GET /v1/recs/batch/jobs/{id}``: shards done / total, errors.
  ``GET /v1/recs/batch/schedules`` lists the tenant's schedules with their Dagster state;
  ``DELETE /v1/recs/batch/schedules/{name}`` stops one, removes its file and reloads.
* ``POST /v1/recs/exports``: recommendations, item features or embeddings of the live snapshot
  as Parquet / CSV / NDJSON to a URI through fsspec, in process (the snapshot is already
  computed: this is a copy with a join, bounded by the snapshot's size).
* ``POST /v1/recs/async/batch``: recommendations for a list of users as a `precompute_job`
  run: 202 with the job; ``GET /v1/recs/async/batch/{id}/results`` downloads NDJSON.

Local URIs (plain paths, ``file://``) are confined to the tenant's folders under the data root
(`exports/<tenant>/`, `landing/<tenant>/`): a tenant can neither read nor write elsewhere on the
server. Other fsspec schemes (s3://, gs://, memory:// ...) pass through.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from typing import Annotated, Any, Literal

import falcon
import msgspec
from msgspec import Meta

from recsys.contract import PATTERN_END
from recsys.durable import write_atomic
from recsys.snapshot.build import shard_step_count
from recsys.storage import Storage
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.control.dagster import DagsterClient, Run, client_for
from serving.errors import ProblemError
from serving.routing import NDJSON, Route
from serving.schemas import Body, Id, Reply

log = logging.getLogger("recsys.serving")

TENANT_TAG = "recsys/tenant"
TYPE_TAG = "recsys/job-type"
BY_TAG = "recsys/requested-by"
MODEL_TAG = "recsys/model-id"
NOTIFY_TAG = "recsys/notify-webhook"
DEST_TAG = "recsys/dest-uri"
MLFLOW_RUN_TAG = "dagster.run_id"

JobType = Literal["train", "evaluate", "precompute", "snapshot", "async_batch", "simulate"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "canceling", "canceled"]
Format = Literal["parquet", "csv", "ndjson"]
Uri = Annotated[str, Meta(min_length=1, max_length=2048)]
RunId = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[0-9a-fA-F-]+" + PATTERN_END)]
Cron = Annotated[str, Meta(max_length=100)]
Metric = Annotated[str, Meta(min_length=1, max_length=40)]

STATUS_OF = {
    "QUEUED": "queued",
    "NOT_STARTED": "queued",
    "MANAGED": "running",
    "STARTING": "running",
    "STARTED": "running",
    "SUSPENDED": "running",
    "SUCCESS": "succeeded",
    "FAILURE": "failed",
    "CANCELING": "canceling",
    "CANCELED": "canceled",
}
DAGSTER_STATUSES = {
    s: [d for d, ours in STATUS_OF.items() if ours == s]
    for s in ("queued", "running", "succeeded", "failed", "canceling", "canceled")
}
#: the remote schemes a tenant may name (object stores; `memory` is process-local, for tests)
OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"})
SHARD_STEPS = ("precompute_shard[", "user_recommendations.score_user_shard[")


# --- schemas ----------------------------------------------------------------------------------
class TrainRequest(Body):
    model_id: Id  # the tenant's registered model: recsys-<tenant>
    hyperparameters: dict[str, Any] = {}
    data_source: Literal["warehouse", "full_refresh"] = "warehouse"
    notify_webhook: Uri | None = None
    tolerance: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.005
    bootstrap_resamples: Annotated[int, Meta(ge=10, le=10_000)] = 1000


class EvaluateRequest(Body):
    model_version: Id  # a version number of recsys-<tenant>, or an alias ("champion")
    holdout_uri: Uri
    metrics: Annotated[list[Metric], Meta(max_length=20)] = []
    bootstrap_resamples: Annotated[int, Meta(ge=10, le=10_000)] = 200


class JobsQuery(msgspec.Struct, omit_defaults=True):
    type: JobType | None = None
    status: JobStatus | None = None
    created_after: Annotated[float, Meta(ge=0)] | None = None
    created_before: Annotated[float, Meta(ge=0)] | None = None
    limit: Annotated[int, Meta(ge=1, le=500)] = 50


class StopRequest(Body):
    job_id: RunId


class Step(Reply):
    key: str
    status: str | None = None
    started_at: float | None = None
    ended_at: float | None = None


class Progress(Reply):
    steps_done: int
    steps_total: int
    steps: list[Step]


class MlflowRun(Reply):
    run_id: str
    experiment_id: str
    status: str
    model_version: str | None = None


class JobView(Reply):
    job_id: str
    type: str
    status: JobStatus
    dagster_status: str
    tenant: str
    requested_by: str | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    progress: Progress
    dagster_url: str
    mlflow_run: MlflowRun | None = None
    model_id: str | None = None
    notify_webhook: str | None = None
    dest_uri: str | None = None


class JobList(Reply):
    jobs: list[JobView]


class JobResults(Reply):
    job_id: str
    type: str
    status: JobStatus
    mlflow_run: MlflowRun | None = None
    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    artifacts: list[str] = []
    baseline_comparison: list[dict[str, Any]] = []
    manifest: dict[str, Any] | None = None


class UserQuery(Body):
    """Which users: every user (the default), a segment, or a list of ids."""

    segment: Id | None = None
    user_ids: Annotated[list[Id], Meta(max_length=100_000)] | None = None


class Destination(Body):
    """A new snapshot (`snapshot: true`) or a folder URI (part files + _manifest.json)."""

    snapshot: bool = False
    uri: Uri | None = None
    format: Format = "parquet"


class PrecomputeRequest(Body):
    dest: Destination
    users: UserQuery = msgspec.field(default_factory=UserQuery)
    model_version: Id = "champion"
    k: Annotated[int, Meta(ge=1, le=1000)] = 20
    shards: Annotated[int, Meta(ge=1, le=64)] = 4
    schedule: Cron = "once"


class Schedule(Reply):
    name: str
    cron: str
    job: str
    status: str
    dagster_url: str


class BatchJob(Reply):
    job_id: str
    status: JobStatus
    shards_done: int
    shards_total: int
    errors: list[str]
    dagster_url: str
    dest_uri: str | None = None


class PrecomputeReply(Reply):
    job: BatchJob | None = None
    schedule: Schedule | None = None


class ScheduleList(Reply):
    schedules: list[Schedule]


#: The name `schedule` gives a schedule (precompute_<tenant, word characters>_<8 hex digits>).
ScheduleName = Annotated[
    str,
    Meta(
        min_length=1, max_length=100, pattern=r"^precompute_[A-Za-z0-9_]+_[0-9a-f]{8}" + PATTERN_END
    ),
]


class ExportRequest(Body):
    kind: Literal["recommendations", "item_features", "embeddings"]
    uri: Uri
    format: Format = "parquet"
    k: Annotated[int, Meta(ge=1, le=1000)] = 20


class ExportReply(Reply):
    kind: str
    uri: str
    format: str
    rows: int
    bytes: int
    snapshot_id: str
    done_in: Literal["process"] = "process"


class AsyncUser(Body):
    user_id: Id
    k: Annotated[int, Meta(ge=1, le=1000)] | None = None


class AsyncBatchRequest(Body):
    requests: Annotated[list[AsyncUser], Meta(min_length=1, max_length=100_000)]
    k: Annotated[int, Meta(ge=1, le=1000)] = 20
    model_version: Id = "champion"


JOB_PARAMS = {"jobId": RunId}
SCHEDULE_PARAMS = {"name": ScheduleName}
_TAGS = ("jobs",)

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/recs/jobs/train",
        ("jobs", "on_post_train"),
        "Train a new version of the tenant's model (a Dagster run of train_job: ingest, "
        "train, evaluate, champion gate, MLflow registration); hyperparameters are the "
        "training assets' TrainingConfig, validated by Dagster before any run (422)",
        SCOPE_ADMIN,
        body=TrainRequest,
        status=202,
        response=JobView,
        errors=(404, 422, 503),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/jobs/evaluate",
        ("jobs", "on_post_evaluate"),
        "Score a registered version on a holdout events file (a Dagster run; the MLflow run "
        "holds the metrics with intervals, the baselines, the table and the plot)",
        SCOPE_ADMIN,
        body=EvaluateRequest,
        status=202,
        response=JobView,
        errors=(404, 422, 503),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/jobs",
        ("jobs", "on_get_list"),
        "The tenant's jobs, newest first (filters: type, status, creation time)",
        SCOPE_RECOMMEND,
        query=JobsQuery,
        response=JobList,
        errors=(503,),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/jobs/{jobId}",
        ("jobs", "on_get_job"),
        "A job: status, step progress, the Dagster UI link, the MLflow run",
        SCOPE_RECOMMEND,
        params=JOB_PARAMS,
        response=JobView,
        errors=(503,),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/jobs/{jobId}/results",
        ("jobs", "on_get_results"),
        "A finished job's results: the MLflow run's metrics, params and artifacts and the "
        "baseline comparison (train, evaluate), or the written manifest (precompute); 409 "
        "while the job runs",
        SCOPE_RECOMMEND,
        params=JOB_PARAMS,
        response=JobResults,
        errors=(409, 503),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/jobs/stop",
        ("jobs", "on_post_stop"),
        "Stop a job (terminates its Dagster run); 409 when it has already finished",
        SCOPE_ADMIN,
        body=StopRequest,
        response=JobView,
        errors=(404, 409, 503),
        tags=_TAGS,
    ),
    Route(
        "DELETE",
        "/v1/recs/jobs/{jobId}/cancel",
        ("jobs", "on_delete_cancel"),
        "Cancel a job (terminates its Dagster run); 409 when it has already finished",
        SCOPE_ADMIN,
        params=JOB_PARAMS,
        response=JobView,
        errors=(409, 503),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/batch/precompute",
        ("jobs", "on_post_precompute"),
        "Precompute recommendations for all users, a segment or a list, from a version, to "
        "an export URI or a new snapshot; once (202 with the job) or on a cron schedule "
        "(201: a Dagster schedule)",
        SCOPE_ADMIN,
        body=PrecomputeRequest,
        status=202,
        also=(201,),
        response=PrecomputeReply,
        errors=(422, 503),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/batch/jobs/{jobId}",
        ("jobs", "on_get_batch"),
        "A precompute job's progress: shards done out of total, and the errors",
        SCOPE_RECOMMEND,
        params=JOB_PARAMS,
        response=BatchJob,
        errors=(503,),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/batch/schedules",
        ("jobs", "on_get_schedules"),
        "The tenant's precompute schedules (POST /v1/recs/batch/precompute with a cron) with "
        "their state in Dagster",
        SCOPE_RECOMMEND,
        response=ScheduleList,
        errors=(503,),
        tags=_TAGS,
    ),
    Route(
        "DELETE",
        "/v1/recs/batch/schedules/{name}",
        ("jobs", "on_delete_schedule"),
        "Stop a precompute schedule in Dagster and remove it from the code location",
        SCOPE_ADMIN,
        params=SCHEDULE_PARAMS,
        status=204,
        errors=(503,),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/exports",
        ("jobs", "on_post_export"),
        "Export the live snapshot's recommendations, item features or embeddings as "
        "Parquet / CSV / NDJSON to a URI (fsspec), in process",
        SCOPE_ADMIN,
        body=ExportRequest,
        status=201,
        response=ExportReply,
        errors=(404, 422),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/async/batch",
        ("jobs", "on_post_async"),
        "Recommendations for many users as a background job: 202 with the job; the results "
        "download from /v1/recs/async/batch/{jobId}/results when it has finished",
        SCOPE_ADMIN,
        body=AsyncBatchRequest,
        status=202,
        response=BatchJob,
        errors=(404, 422, 503),  # an unknown model version; a bad request; Dagster down
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/async/batch/{jobId}/results",
        ("jobs", "on_get_async_results"),
        "The results of an async batch job as NDJSON (user_id, rank, item_id, score); 409 "
        "while it runs",
        SCOPE_RECOMMEND,
        params=JOB_PARAMS,
        response=None,
        response_media=NDJSON,
        errors=(409, 503),
        tags=_TAGS,
    ),
)


# --- helpers ----------------------------------------------------------------------------------
def _not_found(job_id: str) -> ProblemError:
    return ProblemError(404, f"No job '{job_id}'.", code="RECSYS_UNKNOWN_JOB")


def _mlflow_down(ex: Exception) -> ProblemError:
    return ProblemError(
        503,
        f"MLflow (the model registry) is not available: {type(ex).__name__}: {ex}. "
        "Recommendations keep serving.",
        code="RECSYS_MLFLOW_UNAVAILABLE",
        title="MLflow unavailable",
        extra={"dependency": "mlflow"},
    )


def _progress(run: Run) -> Progress:
    steps = [s for s in run.steps if not s.key.endswith("[?]") or not _resolved(run, s.key)]
    done = sum(1 for s in steps if s.status in ("SUCCESS", "FAILURE", "SKIPPED"))
    return Progress(
        steps_done=done,
        steps_total=len(steps),
        steps=[Step(s.key, s.status, s.start, s.end) for s in steps],
    )


def _resolved(run: Run, placeholder: str) -> bool:
    prefix = placeholder[:-2]
    return any(s.key.startswith(prefix) and not s.key.endswith("[?]") for s in run.steps)


def _shards(run: Run) -> tuple[int, int]:
    shard_steps = [
        s for s in run.steps if s.key.startswith(SHARD_STEPS) and not s.key.endswith("[?]")
    ]
    # (a step may score several shards: in process, one step scores all of them)
    done = sum(shard_step_count(s.key) for s in shard_steps if s.status == "SUCCESS")
    # 0 until the run has planned its shards (their count is the code location's setting,
    # RECSYS_USER_SHARDS, which the server does not read: it would guess)
    return done, sum(shard_step_count(s.key) for s in shard_steps)


def _is_local(uri: str) -> bool:
    return uri.startswith("file://")  # (what check_uri answers for every local path)


def _local_path(uri: str) -> str:
    return os.path.realpath(uri[len("file://") :] if uri.startswith("file://") else uri)


class JobsResource:
    """The handlers of the job routes."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.root = ctx.config.data_root
        self.schedules_dir = Storage(self.root).schedules_dir()

    # --- plumbing -----------------------------------------------------------------------------
    def dagster(self) -> DagsterClient:
        return client_for(self.ctx.config.dagster_url)

    def mlflow(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.ctx.mlflow_uri)

    def tenant_dirs(self, tenant: str) -> tuple[str, ...]:
        return tuple(
            os.path.realpath(os.path.join(self.root, folder, tenant))
            for folder in ("exports", "landing")
        )

    def check_uri(self, tenant: str, uri: str, field: str, write: bool) -> str:
        """The URI as fsspec will open it, if the tenant may use it: a local path (no scheme,
        file://) only inside the tenant's folders; otherwise an object store (`OBJECT_STORES`:
        never http/ftp/ssh, which would make the server fetch what a tenant names), and no
        chained URLs (`a::b`)."""
        from fsspec.core import split_protocol
        from fsspec.registry import known_implementations

        if "\x00" in uri:  # (no path or URL holds one: the OS would refuse it)
            raise ProblemError(
                422, f"{field}: a URI cannot hold a NUL character.", code="RECSYS_BAD_URI"
            )
        protocol, path = split_protocol(uri)
        if protocol not in (None, "file", "local"):
            if "::" in uri or protocol not in known_implementations:
                raise ProblemError(
                    422,
                    f"{field}: unknown or chained URI scheme in '{uri}'.",
                    code="RECSYS_BAD_URI",
                )
            if protocol not in OBJECT_STORES:  # (no http/ftp/ssh...: the server would fetch it)
                raise ProblemError(
                    422,
                    f"{field}: scheme '{protocol}' is not an object store this API writes or "
                    f"reads ({', '.join(sorted(OBJECT_STORES))}).",
                    code="RECSYS_BAD_URI",
                )
            return uri
        real = os.path.realpath(path)
        allowed = self.tenant_dirs(tenant)[:1] if write else self.tenant_dirs(tenant)
        if not any(real == d or real.startswith(d + os.sep) for d in allowed):
            raise ProblemError(
                422,
                f"{field}: a local path must be inside {' or '.join(allowed)} "
                "(the tenant's folders under the data root); or use an object-store URI.",
                code="RECSYS_BAD_URI",
            )
        return "file://" + real

    def owned_run(self, tenant: str, job_id: str) -> Run:
        run = self.dagster().run(job_id)
        if run is None or run.tags.get(TENANT_TAG) != tenant or TYPE_TAG not in run.tags:
            raise _not_found(job_id)
        return run

    def mlflow_run(self, tenant: str, run: Run) -> MlflowRun | None:
        if run.tags.get(TYPE_TAG) not in ("train", "evaluate") or run.status in ("QUEUED",):
            return None
        from recsys import tracking

        try:
            client = self.mlflow()
            exp = client.get_experiment_by_name(tracking.experiment_name(tenant))
            if exp is None:
                return None
            found = client.search_runs(
                [exp.experiment_id],
                filter_string=f"tags.`{MLFLOW_RUN_TAG}` = '{run.run_id}'",
                max_results=1,
            )
        except Exception as ex:  # MLflow's store is down or unreadable
            raise _mlflow_down(ex) from None
        if not found:
            return None
        m = found[0]
        version = m.data.tags.get("recsys.model_version")
        if version is None and run.tags.get(TYPE_TAG) == "train":
            try:
                versions = client.search_model_versions(f"run_id = '{m.info.run_id}'")
            except Exception as ex:
                raise _mlflow_down(ex) from None
            version = str(versions[0].version) if versions else None
        return MlflowRun(m.info.run_id, m.info.experiment_id, m.info.status, version)

    def view(self, tenant: str, run: Run, with_mlflow: bool = True) -> JobView:
        return JobView(
            job_id=run.run_id,
            type=run.tags.get(TYPE_TAG, run.job),
            status=STATUS_OF.get(run.status, "running"),
            dagster_status=run.status,
            tenant=tenant,
            requested_by=run.tags.get(BY_TAG),
            created_at=run.created,
            started_at=run.started,
            ended_at=run.ended,
            progress=_progress(run),
            dagster_url=self.dagster().ui_link(run.run_id),
            mlflow_run=self.mlflow_run(tenant, run) if with_mlflow else None,
            model_id=run.tags.get(MODEL_TAG),
            notify_webhook=run.tags.get(NOTIFY_TAG),
            dest_uri=run.tags.get(DEST_TAG),
        )

    def batch_view(self, run: Run) -> BatchJob:
        done, total = _shards(run)
        errors: list[str] = []
        if run.status == "FAILURE" or any(s.status == "FAILURE" for s in run.steps):
            page = self.dagster().events(run.run_id, limit=1000)
            for event in page[0] if page else []:
                if event["error"] or event["type"] in ("ExecutionStepFailureEvent",):
                    where = f"{event['step']}: " if event.get("step") else ""
                    errors.append(f"{where}{event['error'] or event['message']}")
        return BatchJob(
            job_id=run.run_id,
            status=STATUS_OF.get(run.status, "running"),
            shards_done=done,
            shards_total=total,
            errors=errors,
            dagster_url=self.dagster().ui_link(run.run_id),
            dest_uri=run.tags.get(DEST_TAG),
        )

    def tags(self, req: falcon.Request, kind: str, **extra: str | None) -> dict[str, str]:
        principal = req.context.principal
        out = {TENANT_TAG: principal.tenant, TYPE_TAG: kind, BY_TAG: principal.subject}
        out.update({k: v for k, v in extra.items() if v is not None})
        return out

    def launched(self, req: falcon.Request, run_id: str) -> Run:
        req.context.audit = {"target": f"jobs/{run_id}", "before": None, "after": run_id}
        run = self.dagster().run(run_id)
        if run is None:  # (launched a moment ago: Dagster lost it)
            raise ProblemError(503, f"Dagster does not show the run it launched ({run_id}).")
        return run

    def version_exists(self, tenant: str, version: str) -> str:
        from mlflow.exceptions import MlflowException

        from recsys import tracking

        name = tracking.registered_model_name(tenant)
        try:
            client = self.mlflow()
            mv = (
                client.get_model_version(name, version)
                if version.isdigit()
                else client.get_model_version_by_alias(name, version)
            )
        except MlflowException as ex:
            # (no such model, version or alias; an alias that cannot exist: both unknown here)
            if ex.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise ProblemError(
                    404,
                    f"Model '{name}' has no version or alias '{version}'.",
                    code="RECSYS_UNKNOWN_VERSION",
                ) from None
            raise _mlflow_down(ex) from None
        except Exception as ex:
            raise _mlflow_down(ex) from None
        return str(mv.version)

    # --- train / evaluate -----------------------------------------------------------------------
    def on_post_train(self, req: falcon.Request, resp: falcon.Response) -> None:
        from recsys import tracking

        body: TrainRequest = req.context.body
        tenant = req.context.principal.tenant
        if body.model_id != tracking.registered_model_name(tenant):
            raise ProblemError(
                404,
                f"No model '{body.model_id}' to train here: this tenant trains "
                f"'{tracking.registered_model_name(tenant)}'.",
                code="RECSYS_UNKNOWN_MODEL",
            )
        if "tenants" in body.hyperparameters:
            raise ProblemError(
                422,
                "hyperparameters.tenants: a job trains the caller's tenant only.",
                code="RECSYS_INVALID_RUN_CONFIG",
            )
        if body.notify_webhook is not None and not re.match(r"^https?://", body.notify_webhook):
            raise ProblemError(
                422, "notify_webhook must be an http(s) URL.", code="RECSYS_BAD_WEBHOOK_URL"
            )
        config = {
            "tenant": tenant,
            "hyperparameters": body.hyperparameters,
            "tolerance": body.tolerance,
            "bootstrap_resamples": body.bootstrap_resamples,
            "full_refresh": body.data_source == "full_refresh",
        }
        tags = self.tags(
            req, "train", **{MODEL_TAG: body.model_id, NOTIFY_TAG: body.notify_webhook}
        )
        run_id = self.dagster().launch("train_job", config, tags)
        resp.media = msgspec.to_builtins(self.view(tenant, self.launched(req, run_id)))
        resp.status = falcon.HTTP_202

    def on_post_evaluate(self, req: falcon.Request, resp: falcon.Response) -> None:
        from recsys.evaluation.evaluate import METRIC_LABELS

        body: EvaluateRequest = req.context.body
        tenant = req.context.principal.tenant
        unknown = [m for m in body.metrics if m not in METRIC_LABELS]
        if unknown:
            raise ProblemError(
                422,
                f"Unknown metrics {unknown}; known: {', '.join(METRIC_LABELS)}.",
                code="RECSYS_UNKNOWN_METRIC",
            )
        holdout = self.check_uri(tenant, body.holdout_uri, "holdout_uri", write=False)
        if _is_local(holdout) and not os.path.isfile(_local_path(holdout)):
            raise ProblemError(422, f"holdout_uri: no file at {holdout}.", code="RECSYS_BAD_URI")
        version = self.version_exists(tenant, body.model_version)
        config = {
            "tenant": tenant,
            "version": version,
            "holdout_uri": holdout,
            "metrics": list(body.metrics),
            "bootstrap_resamples": body.bootstrap_resamples,
        }
        tags = self.tags(req, "evaluate", **{MODEL_TAG: f"recsys-{tenant}/{version}"})
        run_id = self.dagster().launch(
            "evaluate_version_job", {"ops": {"evaluate_version": {"config": config}}}, tags
        )
        resp.media = msgspec.to_builtins(self.view(tenant, self.launched(req, run_id)))
        resp.status = falcon.HTTP_202

    # --- reading and stopping -------------------------------------------------------------------
    def on_get_list(self, req: falcon.Request, resp: falcon.Response) -> None:
        q: JobsQuery = req.context.query
        tenant = req.context.principal.tenant
        tags = {TENANT_TAG: tenant}
        if q.type:
            tags[TYPE_TAG] = q.type
        runs = self.dagster().runs(
            tags=tags,
            statuses=DAGSTER_STATUSES[q.status] if q.status else None,
            created_after=q.created_after,
            created_before=q.created_before,
            limit=q.limit,
        )
        jobs = [self.view(tenant, r, with_mlflow=False) for r in runs if TYPE_TAG in r.tags]
        resp.media = msgspec.to_builtins(JobList(jobs))

    def on_get_job(self, req: falcon.Request, resp: falcon.Response, jobId: str) -> None:
        tenant = req.context.principal.tenant
        resp.media = msgspec.to_builtins(self.view(tenant, self.owned_run(tenant, jobId)))

    def on_get_results(self, req: falcon.Request, resp: falcon.Response, jobId: str) -> None:
        tenant = req.context.principal.tenant
        run = self.owned_run(tenant, jobId)
        if not run.finished:
            raise ProblemError(
                409,
                f"Job '{jobId}' has not finished ({run.status}).",
                code="RECSYS_JOB_NOT_FINISHED",
            )
        out = JobResults(
            job_id=run.run_id,
            type=run.tags.get(TYPE_TAG, run.job),
            status=STATUS_OF.get(run.status, "running"),
        )
        ml = self.mlflow_run(tenant, run)
        if ml is not None:
            try:
                client = self.mlflow()
                data = client.get_run(ml.run_id).data
                artifacts = [
                    f.path
                    for top in client.list_artifacts(ml.run_id)
                    for f in (client.list_artifacts(ml.run_id, top.path) if top.is_dir else [top])
                ]
            except Exception as ex:
                raise _mlflow_down(ex) from None
            out.mlflow_run = ml
            out.metrics = dict(data.metrics)
            out.params = dict(data.params)
            out.artifacts = artifacts
            out.baseline_comparison = _baselines(data.metrics)
        dest = run.tags.get(DEST_TAG)
        if dest and run.status == "SUCCESS":
            out.manifest = _read_manifest(dest)
        resp.media = msgspec.to_builtins(out)

    def _terminate(self, req: falcon.Request, tenant: str, job_id: str) -> JobView:
        run = self.owned_run(tenant, job_id)
        if run.finished:
            raise ProblemError(
                409,
                f"Job '{job_id}' has already finished ({run.status}).",
                code="RECSYS_JOB_FINISHED",
            )
        client = self.dagster()
        deadline = time.monotonic() + 10.0
        while True:  # (a run still STARTING cannot be terminated yet: Dagster says so)
            status = client.terminate(job_id)
            if status in ("CANCELING", "CANCELED", "SUCCESS", "FAILURE"):
                break
            if time.monotonic() > deadline:  # its worker is not up: never let it start
                client.terminate(job_id, force=True)
                break
            time.sleep(0.5)
        after = self.owned_run(tenant, job_id)
        req.context.audit = {
            "target": f"jobs/{job_id}",
            "before": run.status,
            "after": after.status,
        }
        return self.view(tenant, after, with_mlflow=False)

    def on_post_stop(self, req: falcon.Request, resp: falcon.Response) -> None:
        body: StopRequest = req.context.body
        tenant = req.context.principal.tenant
        resp.media = msgspec.to_builtins(self._terminate(req, tenant, body.job_id))

    def on_delete_cancel(self, req: falcon.Request, resp: falcon.Response, jobId: str) -> None:
        tenant = req.context.principal.tenant
        resp.media = msgspec.to_builtins(self._terminate(req, tenant, jobId))

    # --- batch ---------------------------------------------------------------------------------
    def on_post_precompute(self, req: falcon.Request, resp: falcon.Response) -> None:
        body: PrecomputeRequest = req.context.body
        tenant = req.context.principal.tenant
        dest = body.dest
        if dest.snapshot == (dest.uri is not None):
            raise ProblemError(
                422, "dest: give either snapshot: true or a uri.", code="RECSYS_BAD_DEST"
            )
        if dest.snapshot:
            if body.users.segment or body.users.user_ids or body.model_version != "champion":
                raise ProblemError(
                    422,
                    "A new snapshot holds every user of the champion: a user subset or another "
                    "version goes to an export uri (or deploy the version).",
                    code="RECSYS_BAD_DEST",
                )
            job = "publish_job"
            one = {"config": {"tenants": [tenant]}}
            steps = ("user_recommendations", "item_similarities", "fallback_lists")
            run_config: dict[str, Any] = {
                "ops": {**{s: one for s in steps}, "serving_snapshot": one}
            }
            tags = self.tags(req, "snapshot")
        else:
            uri = self.check_uri(tenant, dest.uri or "", "dest.uri", write=True)
            if body.schedule == "once":
                uri = f"{uri.rstrip('/')}/{uuid.uuid4().hex[:12]}"
            version = body.model_version
            if version != "champion":
                version = self.version_exists(tenant, version)
            cfg = {
                "tenant": tenant,
                "version": version,
                "user_ids": list(body.users.user_ids or []),
                "segment": body.users.segment or "",
                "k": body.k,
                "n_shards": body.shards,
                "dest_uri": uri,
                "format": dest.format,
            }
            job = "precompute_job"
            run_config = {
                "ops": {
                    op: {"config": cfg}
                    for op in ("plan_precompute", "precompute_shard", "precompute_manifest")
                }
            }
            tags = self.tags(req, "precompute", **{DEST_TAG: uri})
        client = self.dagster()
        if body.schedule != "once":
            resp.media = msgspec.to_builtins(
                PrecomputeReply(
                    schedule=self.schedule(req, tenant, body.schedule, job, run_config, tags)
                )
            )
            resp.status = falcon.HTTP_201
            return
        run_id = client.launch(job, run_config, tags)
        run = self.launched(req, run_id)
        resp.media = msgspec.to_builtins(PrecomputeReply(job=self.batch_view(run)))
        resp.status = falcon.HTTP_202

    def schedule(
        self,
        req: falcon.Request,
        tenant: str,
        cron: str,
        job: str,
        run_config: dict[str, Any],
        tags: dict[str, str],
    ) -> Schedule:
        if not valid_cron(cron):
            raise ProblemError(
                422,
                f"schedule: '{cron}' is neither 'once' nor a cron expression.",
                code="RECSYS_BAD_SCHEDULE",
            )
        name = f"precompute_{re.sub(r'[^A-Za-z0-9_]', '_', tenant)}_{uuid.uuid4().hex[:8]}"
        folder = self.schedules_dir
        os.makedirs(folder, exist_ok=True)
        spec = {"name": name, "cron": cron, "job": job, "run_config": run_config, "tags": tags}
        path = os.path.join(folder, f"{name}.json")
        client = self.dagster()  # (503 before anything is written when none is configured)
        write_atomic(path, json.dumps(spec).encode())
        try:
            client.reload()
            found = client.schedule(name)
        except ProblemError:  # (Dagster down: no schedule half-made)
            os.unlink(path)
            raise
        if found is None:  # (Dagster refused the cron, or reads another data root)
            os.unlink(path)
            raise ProblemError(
                422,
                f"Dagster did not accept schedule '{cron}' (its code location reads "
                f"schedules from <its data root>/serving/schedules).",
                code="RECSYS_BAD_SCHEDULE",
            )
        status = found["status"] if found["status"] == "RUNNING" else client.start_schedule(name)
        req.context.audit = {"target": f"schedules/{name}", "before": None, "after": cron}
        return Schedule(name, cron, job, status, f"{client.url}/locations/recsys/schedules/{name}")

    def schedule_files(self, tenant: str) -> dict[str, dict[str, str]]:
        """{name: {cron, job}} of the tenant's schedule files (the code location reads them)."""
        folder = self.schedules_dir
        out = {}
        for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
            if not entry.endswith(".json"):
                continue
            try:
                with open(os.path.join(folder, entry)) as f:
                    spec = json.load(f)
                owner = spec["tags"][TENANT_TAG]
                name, cron, job = str(spec["name"]), str(spec["cron"]), str(spec["job"])
            except (OSError, ValueError, KeyError, TypeError) as ex:  # (as the code location does)
                log.error("schedule file %s skipped: %s", entry, ex)
                continue
            if owner == tenant and entry == f"{name}.json":
                out[name] = {"cron": cron, "job": job}
        return out

    def on_get_schedules(self, req: falcon.Request, resp: falcon.Response) -> None:
        client = self.dagster()
        out = []
        files = self.schedule_files(req.context.principal.tenant)
        loaded = client.schedules() if files else {}
        for name, spec in files.items():
            found = loaded.get(name)  # (None: not loaded by the code location yet)
            status = found["status"] if found is not None else "NOT_LOADED"
            url = f"{client.url}/locations/recsys/schedules/{name}"
            out.append(Schedule(name, spec["cron"], spec["job"], status, url))
        resp.media = msgspec.to_builtins(ScheduleList(out))

    def on_delete_schedule(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        spec = self.schedule_files(req.context.principal.tenant).get(name)
        if spec is None:
            raise ProblemError(404, f"No schedule '{name}'.", code="RECSYS_UNKNOWN_SCHEDULE")
        client = self.dagster()  # (503 before anything changes when none is configured)
        client.stop_schedule(name)  # (None: the code location no longer has it)
        os.unlink(os.path.join(self.schedules_dir, f"{name}.json"))
        client.reload()
        req.context.audit = {"target": f"schedules/{name}", "before": spec["cron"], "after": None}
        resp.status = falcon.HTTP_204

    def on_get_batch(self, req: falcon.Request, resp: falcon.Response, jobId: str) -> None:
        tenant = req.context.principal.tenant
        run = self.owned_run(tenant, jobId)
        if run.tags.get(TYPE_TAG) not in ("precompute", "snapshot", "async_batch"):
            raise _not_found(jobId)
        resp.media = msgspec.to_builtins(self.batch_view(run))

    def on_post_async(self, req: falcon.Request, resp: falcon.Response) -> None:
        body: AsyncBatchRequest = req.context.body
        tenant = req.context.principal.tenant
        k = max([r.k or body.k for r in body.requests])
        version = body.model_version
        if version != "champion":
            version = self.version_exists(tenant, version)
        uri = "file://" + os.path.join(self.root, "exports", tenant, "async", uuid.uuid4().hex)
        cfg = {
            "tenant": tenant,
            "version": version,
            "user_ids": [r.user_id for r in body.requests],
            "k": k,
            "n_shards": 1 if len(body.requests) < 5000 else 4,
            "dest_uri": uri,
            "format": "ndjson",
        }
        ops = ("plan_precompute", "precompute_shard", "precompute_manifest")
        run_id = self.dagster().launch(
            "precompute_job",
            {"ops": {op: {"config": cfg} for op in ops}},
            self.tags(req, "async_batch", **{DEST_TAG: uri}),
        )
        resp.media = msgspec.to_builtins(self.batch_view(self.launched(req, run_id)))
        resp.status = falcon.HTTP_202

    def on_get_async_results(self, req: falcon.Request, resp: falcon.Response, jobId: str) -> None:
        tenant = req.context.principal.tenant
        run = self.owned_run(tenant, jobId)
        if run.tags.get(TYPE_TAG) != "async_batch":
            raise _not_found(jobId)
        if run.status != "SUCCESS":
            raise ProblemError(
                409,
                f"Job '{jobId}' has no results ({run.status}).",
                code="RECSYS_JOB_NOT_FINISHED",
            )
        manifest = _read_manifest(run.tags[DEST_TAG]) or {"parts": []}
        chunks = []
        for part in manifest["parts"]:
            with open(_local_path(part["uri"]), "rb") as f:
                chunks.append(f.read())
        resp.content_type = NDJSON
        resp.data = b"".join(chunks)

    # --- exports ---------------------------------------------------------------------------------
    def on_post_export(self, req: falcon.Request, resp: falcon.Response) -> None:
        from recsys.snapshot import SnapshotStore

        body: ExportRequest = req.context.body
        tenant = req.context.principal.tenant
        uri = self.check_uri(tenant, body.uri, "uri", write=True)
        snaps = SnapshotStore(os.path.join(self.root, "snapshots", tenant))
        sid = snaps.current_id()
        if sid is None:
            raise ProblemError(
                404, f"Tenant '{tenant}' has no published snapshot.", code="RECSYS_NO_SNAPSHOT"
            )
        frame = export_frame(snaps.path_of(sid), body.kind, body.k)
        try:
            size = write_frame(frame, uri, body.format)
        except (ValueError, ImportError, OSError) as ex:  # unknown scheme, no driver, refused
            raise ProblemError(
                422, f"uri: cannot write {uri}: {type(ex).__name__}: {ex}", code="RECSYS_BAD_URI"
            ) from None
        req.context.audit = {"target": f"exports/{body.kind}", "before": None, "after": uri}
        resp.media = msgspec.to_builtins(
            ExportReply(body.kind, uri, body.format, frame.height, size, sid)
        )
        resp.status = falcon.HTTP_201


def export_frame(snapshot_dir: str, kind: str, k: int):
    """What an export writes, read from a snapshot's Parquet files (and its factor arrays)."""
    import numpy as np
    import polars as pl

    pq = os.path.join(snapshot_dir, "parquet")
    if not os.path.exists(os.path.join(pq, "items.parquet")):
        raise ProblemError(
            422,
            "The live snapshot was published without its Parquet tables; nothing to export.",
            code="RECSYS_NO_PARQUET",
        )
    items = pl.read_parquet(os.path.join(pq, "items.parquet"))
    if kind == "item_features":
        return items.sort("item_idx").drop("item_idx")
    if kind == "embeddings":
        path = os.path.join(snapshot_dir, "item_factors.npy")
        if not os.path.exists(path):
            raise ProblemError(
                422, "The live snapshot has no item embeddings.", code="RECSYS_NO_EMBEDDINGS"
            )
        factors = np.load(path, mmap_mode="r")
        ids = items.sort("item_idx")["item_id"]
        return pl.DataFrame(
            {"item_id": ids, "embedding": np.asarray(factors[: len(ids)], dtype=np.float32)}
        )
    users = pl.read_parquet(os.path.join(pq, "users.parquet")).select("user_idx", "user_id")
    cand = (
        pl.scan_parquet(os.path.join(pq, "candidates", "*.parquet"))
        .filter(pl.col("rank") < k)
        .select("user_idx", "rank", "item_idx", "score")
        .collect()
    )
    return (
        cand.join(users, on="user_idx")
        .join(items.select("item_idx", "item_id"), on="item_idx")
        .select(
            "user_id",
            (pl.col("rank").cast(pl.Int32) + 1).alias("rank"),
            "item_id",
            pl.col("score").cast(pl.Float64),
        )
        .sort("user_id", "rank")
    )


def write_frame(frame: Any, uri: str, fmt: str) -> int:
    """Write a polars frame to an fsspec URI as parquet / csv / ndjson; the bytes written."""
    import io

    import fsspec

    buf = io.BytesIO()
    if fmt == "parquet":
        frame.write_parquet(buf)
    elif fmt == "csv":
        import polars as pl

        lists = [c for c, t in frame.schema.items() if isinstance(t, pl.List | pl.Array)]
        if lists:  # (CSV has no list type: tags and vectors as JSON text)
            frame = frame.with_columns(
                pl.col(c).map_elements(
                    lambda v: json.dumps(v.to_list() if hasattr(v, "to_list") else list(v)),
                    return_dtype=pl.String,
                )
                for c in lists
            )
        frame.write_csv(buf)
    else:
        frame.write_ndjson(buf)
    with fsspec.open(uri, "wb", auto_mkdir=True) as f:
        f.write(buf.getvalue())
    return len(buf.getvalue())


def _baselines(metrics: dict[str, float]) -> list[dict[str, Any]]:
    """The evaluation table's rows (served list, generators, popularity and EASE baselines)
    from the MLflow metrics `<row>.<metric>`, each with its delta to popularity."""
    rows: dict[str, dict[str, Any]] = {}
    for key, value in metrics.items():
        row, _, metric = key.partition(".")
        if not metric or row in ("validation", "data") or "." in metric:
            continue
        rows.setdefault(row, {"model": row})[metric] = value
    base = rows.get("popularity", {})
    out = []
    for name in sorted(rows, key=lambda r: (r != "served", r)):
        entry = dict(rows[name])
        ndcg = entry.get("NDCG_at_10")
        if ndcg is not None and base.get("NDCG_at_10") is not None:
            entry["NDCG_at_10_vs_popularity"] = ndcg - base["NDCG_at_10"]
        out.append(entry)
    return out


def _read_manifest(dest_uri: str) -> dict[str, Any] | None:
    import fsspec

    try:
        with fsspec.open(f"{dest_uri.rstrip('/')}/_manifest.json", "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,?-]+" + PATTERN_END)


def valid_cron(text: str) -> bool:
    """Five cron fields (Dagster checks the values when it loads the schedule)."""
    fields = text.split()
    return len(fields) == 5 and all(_CRON_FIELD.match(f) for f in fields)


def resources(ctx: Any) -> dict[str, Any]:
    return {"jobs": JobsResource(ctx)}

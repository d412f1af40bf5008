"""The jobs the control plane (`serving/control/jobs.py`) launches through Dagster's GraphQL API.

Each is an ordinary job of this code location, so its runs, steps, logs and config show in the
Dagster UI like any other; the serving process only launches them and reads them back.

* `train_job`: ingest -> interactions -> split -> train_models -> model_evaluation ->
  champion_model -> `mlflow_job_link`, for ONE tenant. Its config is a mapping
  (`TrainJobConfig`): `tenant`, `hyperparameters` (the `TrainingConfig` of the training assets,
  so Dagster itself validates every field and refuses unknown ones before any run exists), the
  gate's `tolerance`, `bootstrap_resamples` and ingest's `full_refresh`; the mapping sets
  `tenants: [tenant]` on every step, so a run never touches another tenant.
* `mlflow_job_link` (an asset, after champion_model): tags the MLflow run and the registered
  version the run produced with `dagster.run_id`, so a job id leads to its MLflow run.
* `evaluate_version_job`: scores a registered version (`recsys-<tenant>` vN, downloaded from
  MLflow) on a holdout events file (Parquet / CSV / NDJSON at any fsspec URI) against the
  tenant's warehouse events before it; logs an MLflow run (metrics per model row, the table
  and plot as artifacts) tagged `dagster.run_id`, `recsys.kind=evaluation`.
* `precompute_job`: top-k for a set of users (all, a segment, a list) from a version (or the
  champion), in shards (one step per shard, a dynamic fan-out), each shard written as a part
  file under `dest_uri` (Parquet / CSV / NDJSON through fsspec), then `_manifest.json`.
* A precompute whose destination is a new snapshot runs the location's `publish_job`
  (user_recommendations' 16 shards, the item lists, serving_snapshot) with every step's
  `tenants` set to the one tenant (the serving side builds that run config).
* `simulate_job`: a simulation too large for a request (`serving.simulation`): the plan the API
  resolved, replayed on the live snapshot; the figures are written to `dest_uri`'s
  `_manifest.json`, which the jobs API returns as the job's results.
* Precompute schedules: `precompute_schedules()` builds one `ScheduleDefinition` of
  `precompute_job` / `publish_job` per file in `<data root>/serving/schedules/*.json`
  (written by the API); the API reloads the code location and starts the schedule.
"""

import json
import os
from typing import Any

import dagster as dg

from pipelines.resources import MlflowResource, StorageResource
from pipelines.training.assets import model_path, read_inputs, read_json
from pipelines.training.config import TrainingConfig
from recsys.storage import Storage

RUN_TAG = "dagster.run_id"


# -- train ---------------------------------------------------------------------------------


class TrainJobConfig(dg.Config):
    """What `POST /v1/recs/jobs/train` sends (one tenant per run)."""

    tenant: str
    hyperparameters: TrainingConfig = TrainingConfig()
    tolerance: float = 0.005
    bootstrap_resamples: int = 1000
    full_refresh: bool = False


@dg.config_mapping
def _train_config(config: TrainJobConfig) -> dict[str, Any]:
    one = [config.tenant]
    hp = (
        config.hyperparameters.model_dump()
        if hasattr(config.hyperparameters, "model_dump")
        else dict(config.hyperparameters)
    )  # noqa: E501
    hp["tenants"] = one
    return {
        "ops": {
            "events_and_rejects": {"config": {"tenants": one, "full_refresh": config.full_refresh}},
            "interactions": {"config": {"tenants": one}},
            "data_split": {"config": {"tenants": one}},
            "train_models": {"config": hp},
            "model_evaluation": {
                "config": {"tenants": one, "bootstrap_resamples": config.bootstrap_resamples}
            },
            "champion_model": {"config": {"tenants": one, "tolerance": config.tolerance}},
            "mlflow_job_link": {"config": {"tenants": one}},
        }
    }


class LinkConfig(dg.Config):
    tenants: list[str] = []


@dg.asset(group_name="control", deps=["champion_model"], kinds={"mlflow"})
def mlflow_job_link(
    context: dg.AssetExecutionContext,
    config: LinkConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    """Tags the MLflow run and model version champion_model just logged with this Dagster run's
    id (`dagster.run_id`): the control plane finds a job's MLflow run by that tag."""
    import mlflow as mlf

    from pipelines.training.assets import tenants

    store = storage.storage()
    client = mlf.MlflowClient(tracking_uri=mlflow.resolve_tracking_uri(store))
    linked = {}
    for tenant in tenants(store, config.tenants):
        gate = read_json(store, model_path(store, tenant, "gate.json"))
        client.set_tag(gate["run_id"], RUN_TAG, context.run_id)
        if gate.get("version"):
            client.set_model_version_tag(gate["model"], gate["version"], RUN_TAG, context.run_id)
        linked[tenant] = {k: gate.get(k) for k in ("model", "version", "run_id", "promoted")}
    return dg.MaterializeResult(metadata={"linked": dg.MetadataValue.json(linked)})


TRAIN_SELECTION = (
    dg.AssetSelection.assets("mlflow_job_link").upstream().required_multi_asset_neighbors()
)

train_job = dg.define_asset_job(
    "train_job",
    selection=TRAIN_SELECTION,
    config=_train_config,
    executor_def=dg.in_process_executor,
    description="Train, evaluate and register a new version for one tenant (control plane).",
)


# -- evaluate a registered version ---------------------------------------------------------


class EvaluateVersionConfig(dg.Config):
    tenant: str
    version: str  # a version number or an alias ("champion")
    holdout_uri: str
    metrics: list[str] = []  # table columns to report (all when empty)
    bootstrap_resamples: int = 200
    seed: int = 0


def read_holdout(uri: str, tenant: str, event_types):
    """(valid events, rejected rows by reason) of a holdout events file at any fsspec URI
    (CSV, TSV, NDJSON or Parquet, by extension): read by the landing zone's tolerant reader
    (`recsys.readers.read_raw`) and checked by the events contract
    (`recsys.validation.validate_events`), with the version's own event types beside the
    built-in ones."""
    import polars as pl

    from recsys.errors import RecsysError
    from recsys.readers import read_raw
    from recsys.validation import validate_events

    try:
        raw, unreadable = read_raw(uri)
    except RecsysError as ex:
        raise dg.Failure(f"holdout {uri}: {ex}") from ex
    missing = {"user_id", "item_id", "event_type"} - set(raw.columns)
    if missing:
        raise dg.Failure(f"holdout lacks columns {sorted(missing)} (needs the events contract)")
    good, rejects = validate_events(raw, tenant=tenant, source=uri, extra_event_types=event_types)
    rejects = pl.concat([unreadable, rejects])
    return good, dict(rejects.group_by("reason").len().sort("reason").iter_rows())


@dg.op(out=dg.Out(dict))
def evaluate_version(
    context: dg.OpExecutionContext,
    config: EvaluateVersionConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dict:
    """Score `recsys-<tenant>` version `version` on the holdout file; one MLflow run."""
    import tempfile

    import mlflow as mlf
    import polars as pl

    from recsys import tracking
    from recsys.evaluation.evaluate import plot_table
    from recsys.evaluation.offline import evaluate_fitted

    store = storage.storage()
    uri = mlflow.resolve_tracking_uri(store)
    client = mlf.MlflowClient(tracking_uri=uri)
    name = tracking.registered_model_name(config.tenant)
    mv = (
        client.get_model_version(name, config.version)
        if config.version.isdigit()
        else client.get_model_version_by_alias(name, config.version)
    )
    model = tracking.load_registered_model(config.tenant, uri, mv.version)
    holdout, rejected = read_holdout(
        config.holdout_uri, config.tenant, (model.config.weights or {}).keys()
    )
    if rejected:
        context.log.warning(f"holdout rows rejected by the events contract: {rejected}")
    train, _, _ = read_inputs(store, config.tenant)
    if holdout.height:
        train = train.filter(pl.col("timestamp") < holdout["timestamp"].min())
    table, hold, _ = evaluate_fitted(model, train, holdout, config.bootstrap_resamples, config.seed)
    if hold.n_users == 0:
        raise dg.Failure(
            f"nothing to score: the holdout's {holdout.height} valid events hold no positive "
            f"pair of a user and an item version {mv.version} knows, new to the user "
            f"(rejected rows: {rejected or 'none'})"
        )
    context.log.info(f"{config.tenant} v{mv.version}: {hold.n_users} holdout users scored")
    wanted = set(config.metrics)
    metrics: dict[str, float] = {}
    for row in table.iter_rows(named=True):
        for col, v in row.items():
            if col in ("model", "users") or not isinstance(v, float):
                continue
            base = col.split(" ")[0]
            if wanted and col not in wanted and base not in wanted:
                continue
            metrics[f"{row['model']}.{tracking._metric_key(col)}"] = v
    exp = tracking.ensure_experiment(client, config.tenant, mlflow.artifact_root(store))
    tags = {
        "tenant": config.tenant,
        RUN_TAG: context.run_id,
        "recsys.kind": "evaluation",
        "recsys.model_version": str(mv.version),
    }
    run = client.create_run(exp, tags=tags, run_name=f"evaluate-{config.tenant}-v{mv.version}")
    rid = run.info.run_id
    client.log_param(rid, "holdout_uri", config.holdout_uri)
    client.log_param(rid, "model_version", str(mv.version))
    client.log_param(rid, "holdout_users", hold.n_users)
    client.log_param(rid, "holdout_rejected", json.dumps(rejected))
    for key, value in metrics.items():
        client.log_metric(rid, key, value)
    with tempfile.TemporaryDirectory() as tmp:
        if table.height:
            table.write_csv(os.path.join(tmp, "evaluation.csv"))
            plot_table(table, os.path.join(tmp, "evaluation.png"))
            client.log_artifacts(rid, tmp, "evaluation")
    client.set_terminated(rid, "FINISHED")
    return {"mlflow_run_id": rid, "version": str(mv.version), "users": hold.n_users}


@dg.job(description="Score a registered version on a holdout dataset (control plane).")
def evaluate_version_job():
    evaluate_version()


# -- precompute ----------------------------------------------------------------------------


class PrecomputeConfig(dg.Config):
    tenant: str
    version: str = "champion"  # version number or alias of recsys-<tenant>
    user_ids: list[str] = []  # a list of users (empty: by segment, else every user)
    segment: str = ""
    k: int = 20
    n_shards: int = 4
    dest_uri: str  # a folder URI (fsspec): part-NNNNN.<ext> files and _manifest.json
    format: str = "parquet"  # parquet | csv | ndjson


def _load_version(store, mlflow: MlflowResource, tenant: str, version: str):
    from recsys import tracking

    return tracking.load_registered_model(tenant, mlflow.resolve_tracking_uri(store), version)


def write_frame(frame, uri: str, fmt: str) -> int:
    """Write a polars frame to an fsspec URI as parquet / csv / ndjson; bytes written."""
    import io

    import fsspec

    buf = io.BytesIO()
    if fmt == "parquet":
        frame.write_parquet(buf)
    elif fmt == "csv":
        frame.write_csv(buf)
    elif fmt == "ndjson":
        frame.write_ndjson(buf)
    else:
        raise ValueError(f"unknown format {fmt!r}")
    with fsspec.open(uri, "wb", auto_mkdir=True) as f:
        f.write(buf.getvalue())
    return buf.tell()


@dg.op(out=dg.DynamicOut(dict))
def plan_precompute(
    context: dg.OpExecutionContext,
    config: PrecomputeConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
):
    """The users asked for, split into `n_shards` contiguous shards (one step each)."""
    import numpy as np

    store = storage.storage()
    model = _load_version(store, mlflow, config.tenant, config.version)
    ids = [str(u) for u in model.user_ids_]
    if config.user_ids:
        index = {u: i for i, u in enumerate(ids)}
        chosen = sorted({index[u] for u in config.user_ids if u in index})
        unknown = [u for u in config.user_ids if u not in index]
        if unknown:
            context.log.warning(f"{len(unknown)} users unknown to the model: {unknown[:10]}")
    elif config.segment:
        _, _, users = read_inputs(store, config.tenant)
        if users is None or "segment" not in users.columns:
            raise dg.Failure(f"{config.tenant}: no users table with segments")
        members = set(users.filter(users["segment"] == config.segment)["user_id"].to_list())
        chosen = [i for i, u in enumerate(ids) if u in members]
    else:
        chosen = list(range(len(ids)))
    parts = np.array_split(np.asarray(chosen, dtype=np.int64), max(1, config.n_shards))
    context.log.info(f"{len(chosen)} users in {len(parts)} shards")
    for n, part in enumerate(parts):
        yield dg.DynamicOutput(
            {"shard": n, "user_idx": part.tolist()}, mapping_key=f"shard_{n:03d}"
        )


@dg.op
def precompute_shard(
    context: dg.OpExecutionContext,
    config: PrecomputeConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
    task: dict,
) -> dict:
    """Top-k of one shard's users, written as one part file."""
    import numpy as np
    import polars as pl

    from recsys.models.serve import serve_top_n

    store = storage.storage()
    model = _load_version(store, mlflow, config.tenant, config.version)
    user_idx = np.asarray(task["user_idx"], dtype=np.int64)
    served = serve_top_n(model, user_idx, config.k)
    users = np.asarray([str(u) for u in model.user_ids_], dtype=object)
    items = np.asarray([str(i) for i in model.item_ids_], dtype=object)
    frame = pl.DataFrame(
        {
            "user_id": users[served.user_idx].tolist(),
            "rank": (served.rank + 1).astype(np.int32),
            "item_id": items[served.item_idx].tolist(),
            "score": served.final_score.astype(np.float64),
        }
    )
    ext = {"parquet": "parquet", "csv": "csv", "ndjson": "ndjson"}[config.format]
    uri = f"{config.dest_uri.rstrip('/')}/part-{task['shard']:05d}.{ext}"
    size = write_frame(frame, uri, config.format)
    context.log.info(f"shard {task['shard']}: {len(user_idx)} users, {frame.height} rows")
    return {"shard": task["shard"], "users": len(user_idx), "rows": frame.height, "uri": uri,
            "bytes": size}  # fmt: skip


@dg.op
def precompute_manifest(
    context: dg.OpExecutionContext, config: PrecomputeConfig, done: list[dict]
) -> dg.Output:
    import fsspec

    done = sorted(done, key=lambda d: d["shard"])
    manifest = {
        "tenant": config.tenant,
        "version": config.version,
        "k": config.k,
        "format": config.format,
        "run_id": context.run_id,
        "users": sum(d["users"] for d in done),
        "rows": sum(d["rows"] for d in done),
        "parts": done,
    }
    with fsspec.open(f"{config.dest_uri.rstrip('/')}/_manifest.json", "w", auto_mkdir=True) as f:
        json.dump(manifest, f)
    return dg.Output(manifest, metadata={"rows": manifest["rows"], "users": manifest["users"]})


@dg.job(description="Top-k for a set of users from a version, in shards, to a URI.")
def precompute_job():
    precompute_manifest(plan_precompute().map(precompute_shard).collect())


# -- simulate (a large POST /v1/recs/simulate) --------------------------------------------


class SimulateJobConfig(dg.Config):
    """What the API resolved (`serving.simulation.Simulator.plan`, as JSON text: its rules and
    pipelines were checked at request time) and where the figures go."""

    tenant: str
    plan: str
    dest_uri: str


@dg.op
def simulate_configurations(
    context: dg.OpExecutionContext, config: SimulateJobConfig, storage: StorageResource
) -> dg.Output[dict]:
    """Replay the plan's configurations over the last evaluation's holdout (or its dataset) on
    the tenant's live snapshot - the request path's own code (`serving.simulation.run_plan`) -
    and write the figures as the job's results (``<dest_uri>/_manifest.json``: {"kind",
    "run_id", "result"})."""
    import fsspec

    from recsys.simulate import SimulationError
    from serving.errors import ProblemError
    from serving.simulation import simulate_offline

    plan = json.loads(config.plan)
    if plan.get("tenant") != config.tenant:
        raise dg.Failure(f"the plan is of tenant {plan.get('tenant')!r}, not {config.tenant!r}")
    try:
        result = simulate_offline(storage.root, plan)
    except (SimulationError, ProblemError) as ex:
        raise dg.Failure(f"cannot simulate for {config.tenant}: {ex}") from ex
    manifest = {"kind": "simulation", "run_id": context.run_id, "result": result}
    with fsspec.open(f"{config.dest_uri.rstrip('/')}/_manifest.json", "w", auto_mkdir=True) as f:
        json.dump(manifest, f)
    context.log.info(
        f"{config.tenant}: {result['users']} users, {len(result['configurations'])} "
        f"configuration(s) in {result['timings_s']['total']} s"
    )
    return dg.Output(
        manifest,
        metadata={
            "users": result["users"],
            "configurations": len(result["configurations"]),
            "seconds": result["timings_s"]["total"],
            "live_ndcg@10": result["live"]["metrics"]["NDCG@10"]["value"],
        },
    )


@dg.job(
    description="A large simulation (POST /v1/recs/simulate): rules, pipelines or an "
    "experiment's variants replayed over the last evaluation's holdout.",
    executor_def=dg.in_process_executor,
)
def simulate_job():
    simulate_configurations()


# -- schedules written by the API -----------------------------------------------------------


def precompute_schedules(root: str | None = None) -> list[dg.ScheduleDefinition]:
    """One schedule per `<data root>/serving/schedules/<name>.json` ({name, cron, job,
    run_config, tags}); a file that does not parse is skipped (and logged by the loader)."""
    folder = Storage(root or os.environ.get("RECSYS_DATA_ROOT", "data")).schedules_dir()
    out: list[dg.ScheduleDefinition] = []
    if not os.path.isdir(folder):
        return out
    for entry in sorted(os.listdir(folder)):
        if not entry.endswith(".json"):
            continue
        try:
            with open(os.path.join(folder, entry)) as f:
                spec = json.load(f)
            out.append(
                dg.ScheduleDefinition(
                    name=spec["name"],
                    job_name=spec["job"],
                    cron_schedule=spec["cron"],
                    run_config=spec["run_config"],
                    tags=spec.get("tags") or {},
                    execution_timezone="UTC",
                    default_status=dg.DefaultScheduleStatus.RUNNING,
                    description=f"precompute schedule of tenant {spec.get('tags', {}).get('recsys/tenant')}",  # noqa: E501
                )
            )
            if spec["job"] not in ("precompute_job", "publish_job"):
                raise ValueError(f"job {spec['job']!r} cannot be scheduled here")
        except Exception as ex:  # a broken file must not break the code location
            import logging

            logging.getLogger(__name__).error("schedule file %s skipped: %s", entry, ex)
    return out


assets = [mlflow_job_link]
jobs = [train_job, evaluate_version_job, precompute_job, simulate_job]

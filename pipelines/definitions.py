"""The one Definitions object of the recsys code location, assembled from the domain folders
in the order data flows through them."""

import os

import dagster as dg

from pipelines import (
    connector_sensors,
    control_jobs,
    evaluation,
    ingest,
    publish,
    training,
    webhook_sensors,
)
from pipelines.distributed import StorageIOManager, executor_name, job_executor
from pipelines.publish.partitions import SHARD_STEPS_TAG
from pipelines.resources import IngestPolicy, MlflowResource, StorageResource
from recsys.models.allocator import fix_mmap_threshold

# every process that runs the pipeline's steps loads this module first: their large arrays
# go back to the system when freed (recsys/models/allocator.py)
fix_mmap_threshold()

DATA_ROOT = os.environ.get("RECSYS_DATA_ROOT", "data")
#: user shards of user_recommendations (one step, partition and Celery task each)
PUBLISH_ASSETS = publish.build_assets(
    publish.user_shard_count(os.environ.get("RECSYS_USER_SHARDS"))
)
#: in process, the steps run one after another: all of a tenant's user shards in one step
#: (two side by side), not a step each; on Celery each shard stays a task of its own
IN_PROCESS_TAGS = {} if executor_name() == "celery" else {SHARD_STEPS_TAG: "one_step"}

recsys_pipeline = dg.define_asset_job(
    "recsys_pipeline",
    selection=dg.AssetSelection.all(),
    description="The main job: ingest, train, evaluate, gate and publish, end to end.",
    # One process for the whole run: the steps form a chain, and a fresh process per step
    # (importing dagster, polars, scikit-learn, loading models again) cost more than the
    # little they could overlap on a small machine. Sharded backfills of
    # user_recommendations still run through the default (multiprocess) executor.
    # RECSYS_EXECUTOR=celery: every step, each user shard its own, is a task on Celery workers
    # (pipelines/distributed.py).
    executor_def=job_executor(dg.in_process_executor),
    tags=IN_PROCESS_TAGS,
)

publish_job = dg.define_asset_job(
    "publish_job",
    selection=dg.AssetSelection.assets(
        "user_recommendations", "item_similarities", "fallback_lists", "serving_snapshot"
    ),
    executor_def=job_executor(dg.in_process_executor),
    tags=IN_PROCESS_TAGS,
    description="Publish again from the current champion: every user shard (in one step in "
    "process), the item lists and the snapshot. Under RECSYS_EXECUTOR=celery each shard is a "
    "Celery task.",
)

user_shards_job = dg.define_asset_job(
    "user_shards_job",
    selection=dg.AssetSelection.assets("user_recommendations"),
    partitions_def=PUBLISH_ASSETS[0].partitions_def,
    executor_def=job_executor(dg.multiprocess_executor),
    description="Recompute user-shard top-N lists; backfill several shards to run them as "
    "separate processes (or pods, under a Kubernetes/Celery/Docker executor), then "
    "materialise serving_snapshot to publish.",
)

daily_retrain = dg.ScheduleDefinition(
    name="daily_retrain",
    job=recsys_pipeline,
    cron_schedule="0 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every night: ingest what landed, retrain, evaluate, gate and publish. A run "
    "that fails at any step leaves the live snapshot untouched (publication is its last step).",
)

defs = dg.Definitions(
    assets=[
        *ingest.assets,
        *training.assets,
        *evaluation.assets,
        *PUBLISH_ASSETS,
        *control_jobs.assets,
    ],
    asset_checks=[
        *ingest.asset_checks,
        *training.asset_checks,
        *evaluation.asset_checks,
        *publish.asset_checks,
    ],
    jobs=[
        recsys_pipeline,
        publish_job,
        user_shards_job,
        *ingest.jobs,
        *control_jobs.jobs,
        *connector_sensors.jobs,
    ],
    sensors=[*ingest.sensors, *webhook_sensors.sensors, *connector_sensors.sensors],
    # precompute schedules the API wrote (<data root>/serving/schedules/*.json)
    schedules=[daily_retrain, *control_jobs.precompute_schedules()],
    resources={
        # The data root is configuration: RECSYS_DATA_ROOT, else ./data beside workspace.yaml.
        "storage": StorageResource(root=DATA_ROOT, require_reachable=executor_name() == "celery"),
        # step outputs (the user-shard tasks) through the storage URI, not the local disk
        "io_manager": StorageIOManager(root=DATA_ROOT),
        "mlflow": MlflowResource(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or None),
        "policy": IngestPolicy(),
    },
)

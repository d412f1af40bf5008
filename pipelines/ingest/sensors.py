"""New landing files trigger the ingest job."""

import hashlib
import time

import dagster as dg

from pipelines.resources import StorageResource
from recsys import ingest
from recsys.storage import LANDING_KINDS

ingest_job = dg.define_asset_job(
    "ingest_job",
    selection=dg.AssetSelection.groups("ingest"),
    description="Validate new landing files into events, rejected_events, items and users.",
)


@dg.sensor(
    job=ingest_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts an ingest run when new files land in data/landing/<tenant>/<kind>/.",
)
def landing_sensor(context: dg.SensorEvaluationContext, storage: StorageResource):
    store = storage.storage()
    now = time.time()
    # (the run key names each pending file's key - a file replaced by another of that name is
    # new - and whether it has settled: an unreadable event file that changed less than
    # LANDING_SETTLE_S ago is left pending by the run, and becomes a reject in the next one)
    pending = sorted(
        f"{key}:{'settled' if now - mtime >= ingest.LANDING_SETTLE_S else 'fresh'} {path}"
        for tenant in ingest.tenants_with_landing(store)
        for kind in LANDING_KINDS
        for path, key, mtime in ingest.landing_entries(store, tenant, kind, pending=True)
    )
    if not pending:
        return dg.SkipReason("no new landing files")
    run_key = hashlib.sha256("\n".join(pending).encode()).hexdigest()[:16]
    context.log.info(f"{len(pending)} new landing files")
    return dg.RunRequest(run_key=run_key, tags={"recsys/new_files": str(len(pending))})

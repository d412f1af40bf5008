"""Run-status sensors that turn finished Dagster runs into webhook events.

A run that ends SUCCESS becomes ``job.completed``; FAILURE or CANCELED becomes ``job.failed``
(with the status and Dagster's message). Each is written to the webhook outbox
(`recsys.outbox`), which ``recsys webhooks deliver`` delivers, signed, to the subscribed
endpoints.

Which tenant hears of a run: a run tagged with its tenant (``recsys/tenant``, or ``tenant``:
the control plane's jobs carry one) notifies that tenant only. An untagged run (the nightly
schedule, the landing sensor, ``recsys run``) works for every tenant, so every tenant with a
webhook endpoint hears of it. The message id is derived from (tenant, run, status): a sensor
tick evaluated twice emits nothing new.
"""

from __future__ import annotations

import hashlib

import dagster as dg

from pipelines.resources import StorageResource
from recsys.outbox import Outbox, subscribed_tenants
from recsys.tenancy import is_valid_tenant

TENANT_TAGS = ("recsys/tenant", "tenant")
#: How often the daemon evaluates each sensor (seconds): a webhook follows a run's end within it.
INTERVAL_S = 5


def run_tenants(tags: dict[str, str], data_root: str) -> list[str]:
    """The tenants told about a run with these tags (see the module docstring)."""
    for key in TENANT_TAGS:
        tenant = tags.get(key)
        if tenant:
            return [tenant] if is_valid_tenant(tenant) else []
    return subscribed_tenants(data_root)


def failed_steps(instance: dg.DagsterInstance, run_id: str) -> list[dict[str, str]]:
    """The steps of a run that failed, each with its error (type: message)."""
    out = []
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        event = record.dagster_event
        error = event.step_failure_data.error if event and event.step_failure_data else None
        while error is not None and error.cause is not None:  # the user's exception
            error = error.cause
        text = error.message.strip() if error else ""  # ("RuntimeError: ...")
        out.append({"step": event.step_key if event else "", "error": text[:1000]})
    return out


def emit_run_event(
    data_root: str,
    run: dg.DagsterRun,
    status: str,
    message: str | None,
    steps: list[dict[str, str]] | None = None,
) -> list[str]:
    """Emit the webhook event of a finished run for each of its tenants; the message ids."""
    event_type = "job.completed" if status == "SUCCESS" else "job.failed"
    payload: dict = {
        "job_id": run.run_id,
        "job_name": run.job_name,
        "status": status,
        "tags": {k: v for k, v in run.tags.items() if not k.startswith("dagster/")},
    }
    if status != "SUCCESS":
        payload["error"] = (message or status)[:2000]
        payload["failed_steps"] = steps or []
    outbox = Outbox.of(data_root)
    ids = []
    for tenant in run_tenants(dict(run.tags), data_root):
        digest = hashlib.sha256(f"{tenant}\0{run.run_id}\0{status}".encode()).hexdigest()
        ids.append(outbox.emit(tenant, event_type, payload, msg_id=f"msg_run_{digest[:32]}"))
    return ids


def _sensor(status: dg.DagsterRunStatus, name: str, what: str) -> dg.SensorDefinition:
    @dg.run_status_sensor(
        run_status=status,
        name=name,
        minimum_interval_seconds=INTERVAL_S,
        monitor_all_code_locations=True,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=f"Writes a webhook event to the outbox when a run {what}.",
    )
    def sensor(context: dg.RunStatusSensorContext, storage: StorageResource) -> None:
        run = context.dagster_run
        message = context.dagster_event.message if context.dagster_event else None
        steps = failed_steps(context.instance, run.run_id) if status.value == "FAILURE" else []
        ids = emit_run_event(storage.root, run, status.value, message, steps)
        context.log.info(f"run {context.dagster_run.run_id} {status.value}: {len(ids)} events")

    return sensor


job_completed_sensor = _sensor(dg.DagsterRunStatus.SUCCESS, "webhook_job_completed", "succeeds")
job_failed_sensor = _sensor(dg.DagsterRunStatus.FAILURE, "webhook_job_failed", "fails")
job_canceled_sensor = _sensor(dg.DagsterRunStatus.CANCELED, "webhook_job_canceled", "is canceled")

sensors = [job_completed_sensor, job_failed_sensor, job_canceled_sensor]

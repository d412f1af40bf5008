"""Where the pipeline's steps run: in one process (the default), or as Celery tasks on workers.

``RECSYS_EXECUTOR=celery`` gives `recsys_pipeline`, `publish_job` and `user_shards_job` the
Celery executor (dagster-celery): every step, and so every user shard of `user_recommendations`
(one `score_user_shard` step each), is a task on the broker, run by whichever worker takes it.
The executor's settings live in one file, ``deploy/celery.yaml`` (``RECSYS_CELERY_CONFIG``
overrides the path), read here by the run and by every worker (``scripts/celery_workers.sh``
passes it to ``dagster-celery worker start``), so both agree on the broker and on the delivery
guarantees: a task is acknowledged only when it finished (``task_acks_late``) and a worker that
dies mid-task gives its task back to the queue (``task_reject_on_worker_lost``), so another
worker runs the shard again. Shards are written atomically, so a dead task leaves nothing half
done, and the snapshot is assembled only when every shard step succeeded.

Before any step is sent, the run checks that the broker answers and that the data root is
reachable, and fails with a message naming the one that is not (never a hang).

Step outputs (the small shard descriptions passed from the fan-out to the shard steps) go
through `StorageIOManager`, under the data root, so they need no disk shared other than the
storage URI the steps already use.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import dagster as dg

from recsys.durable import write_atomic
from recsys.storage import Storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CELERY_CONFIG = os.path.join(ROOT, "deploy", "celery.yaml")
DEFAULT_BROKER = "amqp://guest:guest@127.0.0.1:5672//"


def executor_name() -> str:
    """'celery' or 'default' (each job's own executor), from RECSYS_EXECUTOR."""
    name = os.environ.get("RECSYS_EXECUTOR", "").strip().lower() or "default"
    if name not in ("default", "celery"):
        raise ValueError(f"RECSYS_EXECUTOR={name!r}: expected 'celery' or unset")
    return name


def celery_config(path: str | None = None) -> dict[str, Any]:
    """The Celery executor's config block of deploy/celery.yaml (env sources resolved by
    Dagster when the executor is configured)."""
    import yaml

    path = path or os.environ.get("RECSYS_CELERY_CONFIG") or DEFAULT_CELERY_CONFIG
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    return dict(doc.get("execution", {}).get("config", {}))


def _redact(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)


def check_broker(url: str, timeout: float = 5.0) -> None:
    """Connect to the broker once; raise `dg.Failure` naming it when it does not answer."""
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=timeout) as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:
        raise dg.Failure(
            f"the Celery broker {_redact(url)} is unreachable ({type(exc).__name__}: {exc}); "
            "start it or set RECSYS_CELERY_BROKER"
        ) from exc


def check_storage(root: str) -> None:
    """The data root must exist and answer here (a worker without the shared volume or the
    object-store credentials fails before it does any work)."""
    try:
        Storage(root).check_reachable()
    except OSError as exc:
        raise dg.Failure(str(exc)) from exc


def _celery_executor_def() -> dg.ExecutorDefinition:
    """dagster-celery's executor, after checking the broker and the data root (imported only
    when asked for: dagster-celery is the optional ``distributed`` extra)."""
    from dagster._core.execution.retries import RetryMode
    from dagster_celery.executor import CELERY_CONFIG, CeleryExecutor

    @dg.executor(
        name="recsys_celery",
        config_schema=CELERY_CONFIG,
        requirements=dg.multiple_process_executor_requirements(),
    )
    def recsys_celery_executor(init_context: dg.InitExecutorContext) -> CeleryExecutor:
        cfg = init_context.executor_config
        broker = cfg.get("broker") or DEFAULT_BROKER
        check_broker(broker)
        check_storage(os.environ.get("RECSYS_DATA_ROOT", "data"))
        return CeleryExecutor(
            broker=broker,
            backend=cfg.get("backend"),
            config_source=cfg.get("config_source"),
            include=cfg.get("include"),
            retries=RetryMode.from_config(cfg["retries"]),
        )

    return recsys_celery_executor


def job_executor(default: dg.ExecutorDefinition) -> dg.ExecutorDefinition:
    """`default` unless RECSYS_EXECUTOR=celery: then the configured Celery executor."""
    if executor_name() != "celery":
        return default
    return _celery_executor_def().configured(celery_config(), name="recsys_celery")


class StorageIOManager(dg.ConfigurableIOManager):
    """Pickles step outputs under ``<root>/.dagster-io/`` through the storage's filesystem
    (fsspec), so a step on one worker reads what a step on another wrote without a shared
    Dagster home. The recsys assets return MaterializeResult (no output); what goes through
    here are the user-shard tasks and their summaries (a few hundred bytes each)."""

    root: str = "data"

    def _path(self, context: dg.OutputContext) -> str:
        parts = [p.replace("/", "_") for p in context.get_identifier()]
        return Storage(self.root).path(".dagster-io", *parts) + ".pickle"

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None:
            return
        store = Storage(self.root)
        path = self._path(context)
        store.makedirs(os.path.dirname(path))
        write_atomic(path, pickle.dumps(obj, protocol=5), store.fs, sync=False)

    def load_input(self, context: dg.InputContext) -> Any:
        store = Storage(self.root)
        with store.fs.open(self._path(context.upstream_output), "rb") as f:
            return pickle.load(f)

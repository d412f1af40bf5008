"""The user shards on a real distributed executor: dagster-celery on the local RabbitMQ, two
workers started by scripts/celery_workers.sh (as an operator does).

One in-process `recsys run` publishes snapshot A; `publish_job` under RECSYS_EXECUTOR=celery
then scores every user shard as a Celery task on the workers and publishes snapshot B, while
the test SIGKILLs the worker that took a shard: the broker gives the shard to the other worker,
and B equals A array for array. A broker that is down and a data root that is not there fail
the run at once, naming them.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.services]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
BROKER = os.environ.get("RECSYS_TEST_BROKER", "amqp://guest:guest@127.0.0.1:5672//")


def _broker_up() -> bool:
    from kombu import Connection

    try:
        with Connection(BROKER, connect_timeout=2) as c:
            c.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A data root with demo events and one in-process pipeline run (snapshot A)."""
    pytest.importorskip("dagster_celery", reason="the distributed extra is not installed")
    if not _broker_up():
        pytest.skip(f"RabbitMQ not reachable at {BROKER}")
    from recsys.demo import DemoSpec, generate
    from recsys.storage import Storage

    work = tmp_path_factory.mktemp("distributed")
    data, home = str(work / "data"), str(work / "dagster_home")
    os.makedirs(home)
    shutil.copy(os.path.join(ROOT, "dagster_home", "dagster.yaml"), home)
    generate(DemoSpec(events=60_000, seed=5, end_date="2026-11-01"), Storage(data))
    env = {
        **os.environ,
        "DAGSTER_HOME": home,
        "RECSYS_DATA_ROOT": data,
        "RECSYS_CELERY_BROKER": BROKER,
        "RECSYS_WORKER_PIDS": str(work / "workers"),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RECSYS_EXECUTOR", None)
    done = subprocess.run(
        [os.path.join(BIN, "recsys"), "--data-root", data, "run", "--quiet"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"work": work, "data": data, "home": home, "env": env}


@pytest.fixture(scope="module")
def workers(site):
    """Two workers from the operator's script, in one process group killed at teardown."""
    from celery import Celery

    app = Celery(broker=BROKER, backend="rpc://")
    # no steps left over from an aborted session (the queue may not exist yet)
    with app.connection_for_write() as conn, contextlib.suppress(Exception):
        conn.default_channel.queue_purge("dagster")
    log = open(site["work"] / "workers.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen(
        ["bash", os.path.join(ROOT, "scripts", "celery_workers.sh"), "2"],
        env={**site["env"], "RECSYS_WORKER_LOGLEVEL": "INFO"},
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        host = socket.gethostname()
        deadline = time.monotonic() + 180
        names: set[str] = set()
        while time.monotonic() < deadline and names != {f"recsys-1@{host}", f"recsys-2@{host}"}:
            replies = app.control.ping(timeout=1.0) or []
            names = {n for r in replies for n in r}
            time.sleep(0.5)
        assert len(names) == 2, f"workers did not answer: {names}; see {log.name}"
        yield {"app": app, "pids": site["work"] / "workers", "log": log.name}
    finally:
        for f in glob.glob(str(site["work"] / "workers" / "*.pgid")):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(Path(f).read_text()), signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _execute(site, job: str, extra_env: dict | None = None, **kw) -> subprocess.Popen:
    env = {**site["env"], "RECSYS_EXECUTOR": "celery", **(extra_env or {})}
    return subprocess.Popen(
        [os.path.join(BIN, "dagster"), "job", "execute", "-m", "pipelines.definitions",
         "-j", job],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, **kw,
    )  # fmt: skip


def _snapshot_arrays(path: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.npy"))):
        out[os.path.basename(f)] = np.load(f, allow_pickle=False)
    for f in sorted(glob.glob(os.path.join(path, "parquet", "**", "*.parquet"), recursive=True)):
        out[os.path.relpath(f, path)] = pl.read_parquet(f)
    return out


def _current(site) -> str:
    d = os.path.join(site["data"], "snapshots", "default")
    with open(os.path.join(d, "CURRENT")) as f:
        return os.path.join(d, f.read().strip())


def _score_step_workers(instance, run_id: str) -> dict[str, list[str]]:
    """step key -> the Celery workers that started it, in order (from the run's events)."""
    seen: dict[str, list[str]] = {}
    for rec in instance.all_logs(run_id):
        ev = rec.dagster_event
        if ev is None or ev.event_type_value != "ENGINE_EVENT" or not ev.step_key:
            continue
        md = ev.engine_event_data.metadata if ev.engine_event_data else {}
        worker = md.get("Celery worker")
        if worker is not None and ev.step_key.startswith("user_recommendations.score"):
            seen.setdefault(ev.step_key, []).append(worker.value)
    return seen


def test_shards_on_celery_workers_survive_a_killed_worker_and_match_in_process(site, workers):
    import dagster as dg

    snapshot_a = _current(site)
    os.environ["DAGSTER_HOME"] = site["home"]
    instance = dg.DagsterInstance.get()
    before = {r.run_id for r in instance.get_runs()}
    proc = _execute(site, "publish_job")
    killed: tuple[str, str] | None = None
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        runs = [r for r in instance.get_runs(limit=5) if r.run_id not in before]
        if runs and killed is None:
            started = _score_step_workers(instance, runs[0].run_id)
            if started:
                step, (worker, *_) = next(iter(started.items()))
                number = worker.split("@")[0].rsplit("-", 1)[1]
                os.killpg(int((workers["pids"] / f"{number}.pgid").read_text()), signal.SIGKILL)
                killed = (step, worker)
        time.sleep(0.05)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-4000:]
    assert killed is not None, "no shard step was seen on a worker"

    run = next(r for r in instance.get_runs(limit=5) if r.run_id not in before)
    assert run.status == dg.DagsterRunStatus.SUCCESS
    started = _score_step_workers(instance, run.run_id)
    assert len(started) == 16  # one step per user shard
    step, worker = killed
    # the shard the dead worker held ran again, on the other worker
    assert started[step][0] == worker and len(started[step]) >= 2, started[step]
    assert started[step][-1] != worker
    assert {w for ws in started.values() for w in ws} == {worker, started[step][-1]}

    snapshot_b = _current(site)
    assert snapshot_b != snapshot_a
    a, b = _snapshot_arrays(snapshot_a), _snapshot_arrays(snapshot_b)
    assert a.keys() == b.keys() and "cand.item.npy" in a
    for name in a:
        if isinstance(a[name], np.ndarray):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name].equals(b[name]), name


def test_a_broker_that_is_down_fails_the_run_naming_it(site):
    t = time.monotonic()
    proc = _execute(
        site, "publish_job", {"RECSYS_CELERY_BROKER": "amqp://guest:guest@127.0.0.1:1//"}
    )
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert "Celery broker amqp://guest:**@127.0.0.1:1//" in out and "unreachable" in out
    assert time.monotonic() - t < 60


def test_a_data_root_that_is_not_there_fails_before_any_work(site, tmp_path):
    missing = str(tmp_path / "not-mounted")
    proc = _execute(site, "publish_job", {"RECSYS_DATA_ROOT": missing})
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert f"data root {missing} does not exist here" in out
    assert not os.path.exists(missing)


def test_user_shards_job_partition_runs_its_shard_on_a_worker(site, workers):
    """One partition of user_shards_job (what a backfill launches per shard) under Celery:
    the shard step runs on a worker and stages the same rows as scoring in process."""
    import dagster as dg

    from recsys.models.hybrid import HybridRecommender
    from recsys.snapshot import build as snapbuild

    os.environ["DAGSTER_HOME"] = site["home"]
    instance = dg.DagsterInstance.get()
    before = {r.run_id for r in instance.get_runs()}
    proc = subprocess.Popen(
        [os.path.join(BIN, "dagster"), "job", "execute", "-m", "pipelines.definitions",
         "-j", "user_shards_job", "--tags", '{"dagster/partition": "shard-03"}'],
        env={**site["env"], "RECSYS_EXECUTOR": "celery"}, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-4000:]
    run = next(r for r in instance.get_runs(limit=5) if r.run_id not in before)
    started = _score_step_workers(instance, run.run_id)
    assert list(started) == ["user_recommendations.score_user_shard[default_03]"]
    staged = glob.glob(
        os.path.join(
            site["data"], "snapshots", "default", ".staging", "*", "shard-03-of-16.parquet"
        )
    )
    assert len(staged) == 1
    model = HybridRecommender.load(
        os.path.join(site["data"], "models", "default", "final", "hybrid")
    )
    start, stop = snapbuild.shard_bounds(len(model.user_ids_), 3, 16)
    expected = snapbuild.shard_candidates(model, start, stop, k=200)
    assert pl.read_parquet(staged[0]).equals(expected)


def test_the_whole_pipeline_on_workers_publishes_the_in_process_snapshot(site, workers):
    """`RECSYS_EXECUTOR=celery recsys run`: every step of recsys_pipeline (ingest, training,
    evaluation, the gate, each user shard, the snapshot) is a task on the workers, and the
    retrained, republished snapshot equals the in-process run's array for array."""
    import dagster as dg

    first = sorted(
        d for d in os.listdir(os.path.join(site["data"], "snapshots", "default")) if d[0].isdigit()
    )[0]
    snapshot_a = os.path.join(site["data"], "snapshots", "default", first)
    os.environ["DAGSTER_HOME"] = site["home"]
    instance = dg.DagsterInstance.get()
    before = {r.run_id for r in instance.get_runs()}
    done = subprocess.run(
        [os.path.join(BIN, "recsys"), "--data-root", site["data"], "run", "--quiet"],
        env={**site["env"], "RECSYS_EXECUTOR": "celery"}, cwd=ROOT,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    run = next(r for r in instance.get_runs(limit=5) if r.run_id not in before)
    on_workers = set()
    for rec in instance.all_logs(run.run_id):
        ev = rec.dagster_event
        if ev is None or ev.event_type_value != "ENGINE_EVENT" or not ev.engine_event_data:
            continue
        if "Celery worker" in (ev.engine_event_data.metadata or {}):
            on_workers.add(ev.step_key)
    assert {"events_and_rejects", "train_models", "serving_snapshot"} <= on_workers
    assert sum(k.startswith("user_recommendations.score_user_shard") for k in on_workers) == 16
    a, c = _snapshot_arrays(snapshot_a), _snapshot_arrays(_current(site))
    assert _current(site) != snapshot_a and a.keys() == c.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            np.testing.assert_array_equal(a[name], c[name], err_msg=name)
        else:
            assert a[name].equals(c[name]), name

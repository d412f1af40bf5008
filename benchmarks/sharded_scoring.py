"""User-shard scoring in process vs on 1, 2 and 4 Celery workers (RabbitMQ broker).

    .venv/bin/python benchmarks/sharded_scoring.py [--events 200000] [--workers 1 2 4]

Generates demo events into a fresh data root, runs ``recsys run`` once in process (trains and
publishes), then runs ``publish_job`` again: in process, and with RECSYS_EXECUTOR=celery on N
workers started by scripts/celery_workers.sh. For each it prints, from Dagster's step records,
the 16 shard steps' summed time (the work), their span from the first start to the last end
(what the workers' parallelism buys), the whole run's wall time, and the overhead per shard:
(celery shard-step time - in-process shard-step time) plus the dispatch gap (span x workers -
summed time) / 16. The machine is shared: the load average is printed with the figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
BROKER = os.environ.get("RECSYS_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672//")


def load() -> str:
    return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def shard_figures(home: str) -> dict[str, float]:
    os.environ["DAGSTER_HOME"] = home
    import dagster as dg

    instance = dg.DagsterInstance.get()
    run = instance.get_runs(limit=1)[0]
    assert run.status == dg.DagsterRunStatus.SUCCESS, run.status
    stats = [s for s in instance.get_run_step_stats(run.run_id) if "score_user_shard" in s.step_key]
    rs = instance.get_run_stats(run.run_id)
    return {
        "shards": len(stats),
        "sum": sum(s.end_time - s.start_time for s in stats),
        "span": max(s.end_time for s in stats) - min(s.start_time for s in stats),
        "run": rs.end_time - rs.start_time,
    }


def run_publish(env: dict[str, str]) -> None:
    subprocess.run(
        [os.path.join(BIN, "dagster"), "job", "execute", "-m", "pipelines.definitions",
         "-j", "publish_job"],
        env=env, cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="recsys-shards-")
    data, home = os.path.join(work, "data"), os.path.join(work, "home")
    os.makedirs(home)
    shutil.copy(os.path.join(ROOT, "dagster_home", "dagster.yaml"), home)
    env = {**os.environ, "DAGSTER_HOME": home, "RECSYS_DATA_ROOT": data}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RECSYS_EXECUTOR", None)
    try:
        recsys = os.path.join(BIN, "recsys")
        subprocess.run([recsys, "--data-root", data, "demo-data", "--events", str(args.events),
                        "--quiet"], env=env, cwd=ROOT, check=True)  # fmt: skip
        subprocess.run([recsys, "--data-root", data, "run", "--quiet"], env=env, cwd=ROOT,
                       check=True)  # fmt: skip
        run_publish(env)
        base = shard_figures(home)
        print(f"{args.events:,} events; in process: 16 shards {base['sum']:.1f} s of steps, "
              f"span {base['span']:.1f} s, run {base['run']:.1f} s ({load()})")  # fmt: skip
        for n in args.workers:
            wenv = {**env, "RECSYS_CELERY_BROKER": BROKER, "RECSYS_WORKER_LOGLEVEL": "WARNING",
                    "RECSYS_WORKER_PIDS": os.path.join(work, f"pids-{n}")}  # fmt: skip
            proc = subprocess.Popen(
                ["bash", os.path.join(ROOT, "scripts", "celery_workers.sh"), str(n)],
                env=wenv, cwd=ROOT, start_new_session=True,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                from celery import Celery

                app = Celery(broker=BROKER)
                deadline = time.monotonic() + 300
                while len(app.control.ping(timeout=1.0) or []) < n:
                    if time.monotonic() > deadline:
                        raise RuntimeError("workers did not start")
                run_publish({**wenv, "RECSYS_EXECUTOR": "celery"})
                f = shard_figures(home)
                overhead = (f["sum"] - base["sum"]) / 16 + max(0.0, f["span"] * n - f["sum"]) / 16
                print(f"{n} worker(s): 16 shards {f['sum']:.1f} s of steps, span {f['span']:.1f} s "
                      f"({16 / f['span']:.2f} shards/s), run {f['run']:.1f} s, overhead "
                      f"{overhead:.2f} s per shard ({load()})")  # fmt: skip
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

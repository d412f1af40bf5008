"""The whole pipeline as a user runs it: landing files -> published snapshot, through Dagster.

    .venv/bin/python benchmarks/pipeline_e2e.py [--events 1000000] [--keep]

Generates the demo events into a fresh data root (not timed: that is the user's data arriving),
then runs ``recsys run`` (the ``recsys_pipeline`` job) in a subprocess with a fresh
DAGSTER_HOME, exactly like the README's commands, and prints the wall time of that command,
each step's duration from Dagster's own run records, and the id of the published snapshot.
The load average is printed with the figures (a shared 2-core machine: they are noisy), and
so is the CPU time the run used (user + system, of the command and its children): at a high
load the wall times stretch with the neighbours' work, the CPU time much less, so compare
CPU times when the loads differ (the run uses two threads in places: wall < CPU at low load).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_avg() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    recsys = os.path.join(os.path.dirname(sys.executable), "recsys")
    work = tempfile.mkdtemp(prefix="recsys-e2e-")
    data, home = os.path.join(work, "data"), os.path.join(work, "dagster_home")
    os.makedirs(home)
    shutil.copy(os.path.join(ROOT, "dagster_home", "dagster.yaml"), home)
    env = {**os.environ, "DAGSTER_HOME": home}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store under the fresh data root
    try:
        t = time.perf_counter()
        subprocess.run(
            [recsys, "--data-root", data, "demo-data", "--events", str(args.events),
             "--seed", str(args.seed), "--quiet"],
            check=True, env=env, cwd=ROOT,
        )  # fmt: skip
        print(f"generated {args.events:,} events in {time.perf_counter() - t:.1f}s ({load_avg()})")

        print(f"before the run: {load_avg()}")
        t, cpu0 = time.perf_counter(), _children_cpu()
        done = subprocess.run(
            [recsys, "--data-root", data, "run"], env=env, cwd=ROOT, capture_output=True, text=True
        )
        wall, cpu = time.perf_counter() - t, _children_cpu() - cpu0
        after = load_avg()
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
            print(f"recsys run failed after {wall:.1f}s", file=sys.stderr)
            return 1

        os.environ["DAGSTER_HOME"] = home
        import dagster as dg

        instance = dg.DagsterInstance.get()
        run = instance.get_runs(limit=1)[0]
        stats = sorted(instance.get_run_step_stats(run.run_id), key=lambda s: s.start_time or 0)
        print(f"\n{'step':<46} {'seconds':>8}")
        for s in stats:
            seconds = (s.end_time or 0) - (s.start_time or 0)
            print(f"{s.step_key:<46} {seconds:8.1f}")
        run_stats = instance.get_run_stats(run.run_id)
        in_run = (run_stats.end_time or 0) - (run_stats.start_time or 0)
        with open(os.path.join(data, "snapshots", "default", "CURRENT")) as f:
            snapshot = f.read().strip()
        print(f"\nrecsys run wall time: {wall:.1f}s (run start to end in Dagster: {in_run:.1f}s)")
        print(f"recsys run CPU time: {cpu:.1f}s (user + system)")
        print(f"published snapshot: {snapshot}")
        print(f"after the run: {after} (2 cores shared with other work: figures are noisy)")
        return 0
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

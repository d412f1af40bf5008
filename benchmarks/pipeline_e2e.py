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

Memory: the resident set of the command and its children is sampled every 0.2 s (from
/proc), and each step's peak is the highest sample taken while it ran, so the table shows
where memory grows with the number of events; so is their CPU time (a step's CPU is the
difference of the samples at its start and end: in process the steps run one at a time, a
few steps in parallel under another executor overlap); the run's peak RSS (getrusage of the
children, as /usr/bin/time -v reports it) is printed too. ``--executor celery`` runs the job with
RECSYS_EXECUTOR=celery (start the workers first: scripts/celery_workers.sh, with the same
RECSYS_DATA_ROOT and DAGSTER_HOME; then the workers' memory is theirs, not the command's).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_avg() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_usage(pid: int) -> tuple[int, float]:
    """(resident bytes, CPU seconds) of `pid` and all its descendants (Linux /proc): the CPU
    of live processes plus what `pid` and they collected from their exited children."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    cpu: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
            cpu[int(entry)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        except (OSError, IndexError, ValueError):
            continue
    total, ticks, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        ticks += cpu.get(p, 0)
        todo.extend(children.get(p, []))
    return total, ticks / os.sysconf("SC_CLK_TCK")


class RssSampler(threading.Thread):
    """(time, resident bytes, CPU seconds of a process tree) every `interval` seconds until
    stopped."""

    def __init__(self, pid: int, interval: float = 0.2, log: str | None = None) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.log = pid, interval, log
        self.samples: list[tuple[float, int, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        out = open(self.log, "a") if self.log else None  # noqa: SIM115 (closed below)
        try:
            while not self._halt.wait(self.interval):
                sample = (time.time(), *tree_usage(self.pid))
                self.samples.append(sample)
                if out is not None:  # a run cut short keeps its figures so far
                    out.write(f"{sample[0]:.2f} {sample[1]} {sample[2]:.2f}\n")
                    out.flush()
        finally:
            if out is not None:
                out.close()

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def peak(self, start: float | None = None, end: float | None = None) -> int:
        return max(
            (
                b
                for t, b, _ in self.samples
                if (start is None or t >= start) and (end is None or t <= end)
            ),
            default=0,
        )

    def cpu(self, start: float, end: float) -> float:
        """CPU seconds the tree used between the samples nearest `start` and `end` (a step's
        CPU, to the sampling interval: steps run one at a time in process)."""
        if not self.samples:
            return 0.0
        times = [t for t, _, _ in self.samples]
        at = [min(range(len(times)), key=lambda i: abs(times[i] - x)) for x in (start, end)]
        return self.samples[at[1]][2] - self.samples[at[0]][2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--executor", choices=("default", "celery"), default="default")
    ap.add_argument("--data-root", help="use (and keep) this data root instead of a temporary one")
    ap.add_argument("--samples", help="append each sample (unix time, RSS bytes, CPU s) here")
    args = ap.parse_args()
    recsys = os.path.join(os.path.dirname(sys.executable), "recsys")
    work = tempfile.mkdtemp(prefix="recsys-e2e-")
    data, home = args.data_root or os.path.join(work, "data"), os.path.join(work, "dagster_home")
    os.makedirs(home)
    shutil.copy(os.path.join(ROOT, "dagster_home", "dagster.yaml"), home)
    env = {**os.environ, "DAGSTER_HOME": home, "RECSYS_DATA_ROOT": data}
    if args.executor == "celery":
        env["RECSYS_EXECUTOR"] = "celery"
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
        proc = subprocess.Popen(
            [recsys, "--data-root", data, "run"], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        sampler = RssSampler(proc.pid, log=args.samples)
        sampler.start()
        out, err = proc.communicate()
        sampler.stop()
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        wall, cpu = time.perf_counter() - t, _children_cpu() - cpu0
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
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
        print(f"\n{'step':<52} {'seconds':>8} {'CPU s':>7} {'peak RSS MiB':>12}")
        for s in stats:
            seconds = (s.end_time or 0) - (s.start_time or 0)
            mib = sampler.peak(s.start_time, s.end_time) / 2**20
            step_cpu = sampler.cpu(s.start_time or 0, s.end_time or 0)
            print(f"{s.step_key:<52} {seconds:8.1f} {step_cpu:7.1f} {mib:12.0f}")
        run_stats = instance.get_run_stats(run.run_id)
        in_run = (run_stats.end_time or 0) - (run_stats.start_time or 0)
        with open(os.path.join(data, "snapshots", "default", "CURRENT")) as f:
            snapshot = f.read().strip()
        print(f"\nrecsys run wall time: {wall:.1f}s (run start to end in Dagster: {in_run:.1f}s)")
        print(f"recsys run CPU time: {cpu:.1f}s (user + system)")
        print(
            f"peak RSS: {peak_rss / 2**20:.0f} MiB (largest child, as /usr/bin/time -v); "
            f"sampled tree peak {sampler.peak() / 2**20:.0f} MiB"
        )
        print(f"published snapshot: {snapshot}")
        print(f"after the run: {after} (2 cores shared with other work: figures are noisy)")
        return 0
    finally:
        if args.keep or args.data_root:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

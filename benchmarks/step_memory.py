"""Peak memory and CPU of pipeline steps, each run alone in a fresh process, on a data root a
whole run has filled (``benchmarks/pipeline_e2e.py --data-root DIR`` keeps one).

    .venv/bin/python benchmarks/step_memory.py --data-root DIR [--config JSON] [step ...]

A step is named as in the run (`train_models`, `user_recommendations`) or by an asset key it
materialises (`ranker_model` runs `train_models`).

Each step is its asset materialised by itself (``dg.materialize`` with the code location's
asset definition, its default config and the resources on DIR; an ephemeral instance)
in a child process, and its peak is the child's peak resident set (``ru_maxrss``): neither
the earlier steps of a run nor the memory their frees left with the allocator count, which
in ``pipeline_e2e.py`` (one process, a step's peak is the highest 0.2 s sample while it
ran) they do. The child's CPU time (user + system) is printed beside, and so is a baseline:
a child that imports the code location and materialises nothing, the floor under every
figure. The step rewrites its outputs on DIR (the same data: the same outputs; the
``events`` step, the ingest, takes only the landing files not ingested yet, so a data root
from ``recsys demo-data`` alone can be ingested and then measured step by step, without a
whole run; ``champion_model`` registers one more MLflow version each time).

To compare code versions on the same data, run the script of each checkout (its folder is
put first on the child's path).

``--stacks`` names the phase of a step that holds its peak: the step's process is sampled
every 0.2 s (resident set, from /proc), and at each new high (``--stacks-step`` MiB above the
last one dumped) `py-spy dump` takes every thread's Python stack; after the step, the highs are
printed, each with the innermost frames of each busy thread (py-spy: ``pip install py-spy``;
sampling misses a high shorter than 0.2 s, and a dump pauses the process for a few ms).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.pipeline_e2e import tree_usage  # noqa: E402

CHILD = """
import json, os, resource, sys, time
step, root, config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import dagster as dg
from pipelines.definitions import defs
from pipelines.resources import IngestPolicy, MlflowResource, StorageResource
resources = dict(
    storage=StorageResource(root=root), policy=IngestPolicy(), mlflow=MlflowResource()
)
t = time.perf_counter()
if step != "-":  # a step (op) name, or an asset key of it (a multi-asset's: any one)
    steps = {a.node_def.name: a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}
    asset = steps.get(step) or defs.get_assets_def(dg.AssetKey(step))
    run = {"ops": {asset.node_def.name: {"config": config}}} if config else None
    result = dg.materialize([asset], resources=resources, raise_on_error=True, run_config=run)
    assert result.success
print(f"{time.perf_counter() - t:.2f}")
"""


def load_avg() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_step(step: str, root: str, config: str = "{}") -> tuple[float, float, float]:
    """(peak RSS MiB, CPU s, wall s of the step itself) of `step` in a fresh child, its op
    config `config` (JSON)."""
    env = {**os.environ, "RECSYS_DATA_ROOT": root, "PYTHONPATH": ROOT}
    # one child at a time: RUSAGE_CHILDREN's maxrss is the largest child so far, so each
    # step runs in a fresh grandchild measured by its own wrapper
    wrapper = (
        "import resource, subprocess, sys\n"
        "out = subprocess.run(sys.argv[1:], check=True, capture_output=True, text=True).stdout\n"
        "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
        "print(out.strip().splitlines()[-1], u.ru_maxrss, u.ru_utime + u.ru_stime)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", wrapper, sys.executable, "-c", CHILD, step, root, config],
        check=True, capture_output=True, text=True, env=env, cwd=ROOT,
    ).stdout  # fmt: skip
    wall, maxrss_kib, cpu = out.split()
    return int(maxrss_kib) / 1024, float(cpu), float(wall)


def _busy_frames(dump: str, depth: int = 6) -> list[str]:
    """Per thread of a `py-spy dump`, its innermost `depth` frames (idle threads left out)."""
    threads, out = [], []
    for line in dump.splitlines():
        if line.startswith("Thread "):
            threads.append([line.split(" (")[0], []])
        elif line.startswith("    ") and threads:
            threads[-1][1].append(line.strip())
    idle = {"wait", "_worker", "select", "poll", "sleep"}  # (innermost function's name)
    for name, frames in threads:
        if frames and frames[0].split(" (")[0].rsplit(".", 1)[-1] not in idle:
            out.append(f"  {name}: " + " <- ".join(frames[:depth]))
    return out


def stacks_at_highs(step: str, root: str, config: str, step_mib: float) -> list[str]:
    """Run `step` as `run_step` does, dumping its Python stacks at each new high of its
    resident set (see the module docstring); the report's lines."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        raise SystemExit("--stacks needs py-spy: pip install py-spy")
    env = {**os.environ, "RECSYS_DATA_ROOT": root, "PYTHONPATH": ROOT}
    with tempfile.TemporaryFile() as log:  # the step's own log, shown if it fails
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, step, root, config],
            stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT,
        )  # fmt: skip
        start, high, dumped, report = time.monotonic(), 0.0, 0.0, []
        while proc.poll() is None:
            mib = tree_usage(proc.pid)[0] / 2**20
            high = max(high, mib)
            if mib >= dumped + step_mib:
                dumped = mib
                dump = subprocess.run(
                    [spy, "dump", "--pid", str(proc.pid)], capture_output=True, text=True
                ).stdout
                report.append(f"{time.monotonic() - start:7.1f} s {mib:8.0f} MiB")
                report += _busy_frames(dump)
            time.sleep(0.2)
        if proc.returncode:
            log.seek(0)
            tail = log.read()[-3000:].decode(errors="replace")
            raise SystemExit(f"{step} failed (exit {proc.returncode}):\n{tail}")
    return [*report, f"sampled peak {high:.0f} MiB"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("steps", nargs="*", default=["interactions", "model_evaluation"])
    ap.add_argument(
        "--config",
        default="{}",
        help="the steps' op config as JSON, e.g. '{\"refits_beside_max_events\": 0}' for "
        "train_models with its refits one after another (default: the step's defaults)",
    )
    ap.add_argument(
        "--stacks",
        action="store_true",
        help="also run each step once more, sampled, and print its Python stacks at each new "
        "high of its resident set (needs py-spy)",
    )
    ap.add_argument("--stacks-step", type=float, default=50.0, help="MiB between dumps")
    args = ap.parse_args()
    root = os.path.abspath(args.data_root)
    print(f"code {ROOT}, data root {root}, config {args.config} ({load_avg()})")
    print(f"{'step':<24} {'peak RSS MiB':>12} {'CPU s':>8} {'step wall s':>11}")
    for step in ["-", *args.steps]:
        mib, cpu, wall = run_step(step, root, args.config if step != "-" else "{}")
        name = "(imports only)" if step == "-" else step
        print(f"{name:<24} {mib:12.0f} {cpu:8.1f} {wall:11.1f}", flush=True)
        if args.stacks and step != "-":
            print(f"{step}, sampled: new highs and what each busy thread ran")
            print("\n".join(stacks_at_highs(step, root, args.config, args.stacks_step)))
    print(f"after: {load_avg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

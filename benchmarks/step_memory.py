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
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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
    args = ap.parse_args()
    root = os.path.abspath(args.data_root)
    print(f"code {ROOT}, data root {root}, config {args.config} ({load_avg()})")
    print(f"{'step':<24} {'peak RSS MiB':>12} {'CPU s':>8} {'step wall s':>11}")
    for step in ["-", *args.steps]:
        mib, cpu, wall = run_step(step, root, args.config if step != "-" else "{}")
        name = "(imports only)" if step == "-" else step
        print(f"{name:<24} {mib:12.0f} {cpu:8.1f} {wall:11.1f}", flush=True)
    print(f"after: {load_avg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

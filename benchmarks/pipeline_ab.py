"""The end-to-end pipeline time of two trees, interleaved: is HEAD slower than a base commit?

    .venv/bin/python benchmarks/pipeline_ab.py BASE_REF [--events 1000000] [--rounds 3]

On this shared 2-core machine one tree's 1M-event run took 82 and 102 s in Dagster within an
hour (2026-12-03; 115 s on its first run in a new worktree, which compiled its Numba kernels),
so a single pair of runs cannot tell two trees apart. This runs
`pipeline_e2e.py` for the base commit (a temporary git worktree, imported through
PYTHONPATH with this checkout's virtualenv) and for this checkout alternately, base first in
odd rounds and HEAD first in even ones (ABBA...), each on freshly generated events, after one
small untimed run of each (a new worktree compiles its Numba kernels first), and prints
every run's time in Dagster, wall and CPU, then the median of each and the per-round ratios
HEAD / base (the machine's speed drifts between rounds, less within one).

``--exclude-step NAME`` (repeatable) prints the same figures once more with that step's
seconds (and CPU) taken off in whichever tree runs it: to tell a change's own cost from a step
another change added to the job since the base (the base never ran it).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = re.compile(
    r"recsys run wall time: (?P<wall>[\d.]+)s \(run start to end in Dagster: (?P<dagster>[\d.]+)s\)"
    r"\nrecsys run CPU time: (?P<cpu>[\d.]+)s"
)


STEP_ROW = re.compile(r"^(?P<step>\S+)\s+(?P<seconds>[\d.]+)\s+(?P<cpu>[\d.]+)\s+\d+$", re.M)


def run_e2e(tree: str, events: int) -> dict[str, float]:
    """One `pipeline_e2e.py` run of the code in `tree`: {dagster, wall, cpu} seconds, and
    each step's {"step:<name>": seconds, "cpu:<name>": CPU seconds} from its step table."""
    env = {**os.environ, "PYTHONPATH": tree}
    done = subprocess.run(
        [sys.executable, os.path.join(tree, "benchmarks", "pipeline_e2e.py"),
         "--events", str(events)],
        cwd=tree, env=env, capture_output=True, text=True,
    )  # fmt: skip
    found = FIGURES.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise SystemExit(
            f"pipeline_e2e.py failed in {tree}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    figures = {k: float(v) for k, v in found.groupdict().items()}
    for row in STEP_ROW.finditer(done.stdout):
        figures[f"step:{row['step']}"] = float(row["seconds"])
        figures[f"cpu:{row['step']}"] = float(row["cpu"])
    return figures


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", help="the base commit (any git ref of this repository)")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup-events", type=int, default=20_000, help="an untimed run first")
    ap.add_argument(
        "--exclude-step",
        action="append",
        default=[],
        help="also print the times without this step (in whichever tree runs it; e.g. a step "
        "another change added to the job), once per step to leave out",
    )
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="recsys-ab-")
    base_tree = os.path.join(work, "base")
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-f", base_tree, args.base],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    runs: dict[str, list[dict[str, float]]] = {"base": [], "HEAD": []}
    try:
        # untimed: a new worktree compiles its Numba kernels on its first run (~30 s, then
        # cached beside the sources), which would count against the base
        for tree in (base_tree, ROOT):
            run_e2e(tree, args.warmup_events)
        for r in range(args.rounds):
            order = [("base", base_tree), ("HEAD", ROOT)]
            for name, tree in order if r % 2 == 0 else order[::-1]:
                figures = run_e2e(tree, args.events)
                runs[name].append(figures)
                print(
                    f"round {r + 1} {name:<4}: {figures['dagster']:6.1f} s in Dagster, "
                    f"{figures['wall']:6.1f} s wall, {figures['cpu']:6.1f} s CPU "
                    f"(load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.events:,} events, {args.rounds} round(s), base {args.base}:")
    for key in ("dagster", "wall", "cpu"):
        base = [f[key] for f in runs["base"]]
        head = [f[key] for f in runs["HEAD"]]
        ratios = ", ".join(f"{h / b:.2f}" for b, h in zip(base, head, strict=True))
        print(
            f"  {key:<7} median base {statistics.median(base):6.1f} s, "
            f"HEAD {statistics.median(head):6.1f} s; HEAD / base per round: {ratios}"
        )
    if args.exclude_step:
        # the step's own seconds (its wall time in the run; CPU from its samples) taken off
        # the run's Dagster time and CPU time, in each tree that ran it
        def without(f: dict[str, float], key: str, prefix: str) -> float:
            return f[key] - sum(f.get(f"{prefix}:{s}", 0.0) for s in args.exclude_step)

        print(f"  without {', '.join(args.exclude_step)}:")
        for name in ("base", "HEAD"):
            took = [sum(f.get(f"step:{s}", 0.0) for s in args.exclude_step) for f in runs[name]]
            print(f"    the step(s) in {name}: " + ", ".join(f"{t:.1f} s" for t in took))
        for key, prefix in (("dagster", "step"), ("cpu", "cpu")):
            base = [without(f, key, prefix) for f in runs["base"]]
            head = [without(f, key, prefix) for f in runs["HEAD"]]
            ratios = ", ".join(f"{h / b:.2f}" for b, h in zip(base, head, strict=True))
            print(
                f"    {key:<7} median base {statistics.median(base):6.1f} s, "
                f"HEAD {statistics.median(head):6.1f} s; HEAD / base per round: {ratios}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

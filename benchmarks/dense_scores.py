"""LightFM's dense scores: `recsys.models.dense.dot_scores` against BLAS's sgemm, one thread.

    .venv/bin/python benchmarks/dense_scores.py [--users 512] [--items 100000] [--factors 32]

Prints the CPU time of each for one batch (best of `--repeat`), and how many entries of the
batch sgemm and `dot_scores` give differently when the same users are scored in batches of
1, 3 and 16 (`dot_scores`: 0 by construction; sgemm: machine-dependent).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recsys.models.dense import dot_scores  # noqa: E402


def best_cpu(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=512)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--factors", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    rng = np.random.default_rng(0)
    u = rng.standard_normal((a.users, a.factors)).astype(np.float32)
    v = rng.standard_normal((a.items, a.factors)).astype(np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        dot_scores(u[:9], v)  # (compiled, or read from Numba's cache)
        blas = best_cpu(lambda: u @ v.T, a.repeat)
        ours = best_cpu(lambda: dot_scores(u, v), a.repeat)
        print(f"{a.users} users x {a.items} items x {a.factors} factors, one thread, CPU s:")
        print(f"  sgemm {blas:.3f}   dot_scores {ours:.3f}   ratio {ours / blas:.2f}")
        whole = {"sgemm": u @ v.T, "dot_scores": dot_scores(u, v)}
        for batch in (1, 3, 16):
            for name, fn in (
                ("sgemm", lambda x: x @ v.T),
                ("dot_scores", lambda x: dot_scores(x, v)),
            ):
                parts = np.vstack([fn(u[s : s + batch]) for s in range(0, a.users, batch)])
                differ = int((parts != whole[name]).sum())
                print(f"  batches of {batch:>2}: {name:<10} {differ:>10,} entries differ")


if __name__ == "__main__":
    main()

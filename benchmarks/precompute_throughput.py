"""Throughput of the precompute kernel (recsys.snapshot.scoring) in users per second.

Default problem: 20k items, 64 factors, top 200, 20 seen items per user, float32.
    .venv/bin/python benchmarks/precompute_throughput.py [--users 40000] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_limits

from recsys.snapshot.scoring import TopNScorer, csr_from_pairs


def baseline(uf: np.ndarray, vt: np.ndarray, n: int, block: int) -> None:
    """Plain matmul + argpartition over every item (the reference point)."""
    for a in range(0, uf.shape[0], block):
        s = uf[a : a + block] @ vt
        top = np.argpartition(s, s.shape[1] - n, axis=1)[:, s.shape[1] - n :]
        np.take_along_axis(s, top, axis=1)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--users", type=int, default=40_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seen", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    uf = rng.standard_normal((args.users, args.dim), dtype=np.float32)
    itf = rng.standard_normal((args.items, args.dim), dtype=np.float32)
    bias = rng.standard_normal(args.items, dtype=np.float32)
    rows = np.repeat(np.arange(args.users), args.seen)
    seen = csr_from_pairs(rows, rng.integers(0, args.items, rows.shape[0]), args.users)

    scorer = TopNScorer(itf, args.n, item_bias=bias, block_size=args.block, threads=args.threads)
    print(
        f"{args.users} users x {args.items} items, d={args.dim}, N={args.n}, seen={args.seen}, "
        f"threads={args.threads}, block={args.block}, groups={scorer.groups}"
    )
    # The machine may be shared: wall-clock rates drop with other load, so the CPU time of the
    # process is reported too (users per CPU-second; x cores = the rate on an idle machine).
    best, best_cpu = 0.0, 0.0
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        for _a, _items, _scores in scorer.iter_blocks(uf, seen):
            pass
        rate = args.users / (time.perf_counter() - t)
        cpu_rate = args.users / (time.process_time() - c)
        best, best_cpu = max(best, rate), max(best_cpu, cpu_rate)
        print(f"  kernel: {rate:,.0f} users/s wall, {cpu_rate:,.0f} users per CPU-second")
    vt = np.ascontiguousarray(itf.T)
    with threadpool_limits(args.threads, user_api="blas"):
        t = time.perf_counter()
        baseline(uf, vt, args.n, 512)
        base = args.users / (time.perf_counter() - t)
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(
        f"best kernel: {best:,.0f} users/s wall ({best_cpu:,.0f} per CPU-second); "
        f"plain matmul+argpartition "
        f"(no seen, no sort): {base:,.0f} users/s"
    )


if __name__ == "__main__":
    main()

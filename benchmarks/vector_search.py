"""Vector search at scale: recall@10 of `recsys.vectors.VectorIndex` (faiss IVF) against exact
search, and per-query latency (p50 / p99), at 1M x 64 by default.

    .venv/bin/python benchmarks/vector_search.py [--n 1000000] [--dim 64] [--queries 500]
        [--nprobe 16,32,64] [--data clustered|gaussian]

Data: `clustered` (default) draws vectors around 2,000 random centres (what learned embeddings
look like: items group by topic); `gaussian` is isotropic noise, the hardest case for an
inverted file (no structure to exploit). Queries are held-out points of the same distribution.
Exact search is the same index's exact path (one BLAS product over every row). Latencies are
wall-clock per single-query call on a shared machine (noisy: quote them with the load average);
the thread CPU time per query (p50 / p99: what the search costs without the waits of a busy
machine) and the process CPU time of the whole loop are printed too.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from recsys.vectors import VectorIndex  # noqa: E402


def make_data(n: int, dim: int, kind: str, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((n, dim), dtype=np.float32)
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    which = rng.integers(0, centres.shape[0], size=n)
    return centres[which] + 0.35 * rng.standard_normal((n, dim), dtype=np.float32)


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--nprobe", default="8,16,32,64")
    ap.add_argument("--data", default="clustered", choices=("clustered", "gaussian"))
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args()

    data = make_data(args.n + args.queries, args.dim, args.data)
    base, queries = data[: args.n], data[args.n :]
    index = VectorIndex(args.dim, "cosine")
    t0, c0 = time.perf_counter(), cpu()
    index.upsert([f"v{i}" for i in range(args.n)], base)
    print(f"load: {args.n:,} x {args.dim} in {time.perf_counter() - t0:.1f} s")
    t0, c0 = time.perf_counter(), cpu()
    index._trained()
    print(f"IVF build (train + add): {time.perf_counter() - t0:.1f} s wall, {cpu() - c0:.1f} s CPU")

    truth, exact_ms = [], []
    for q in queries:
        t = time.perf_counter()
        rows, _ = index.search(q, args.k, exact=True)
        exact_ms.append((time.perf_counter() - t) * 1e3)
        truth.append(set(rows.tolist()))
    print(
        f"exact: p50 {np.percentile(exact_ms, 50):.2f} ms, p99 {np.percentile(exact_ms, 99):.2f} ms"
    )
    for nprobe in [int(x) for x in args.nprobe.split(",")]:
        index.nprobe = nprobe
        hits, lat, cpu_ms = 0, [], []
        c0 = cpu()
        for q, want in zip(queries, truth, strict=True):
            t, tc = time.perf_counter(), time.thread_time()
            rows, _ = index.search(q, args.k)
            cpu_ms.append((time.thread_time() - tc) * 1e3)
            lat.append((time.perf_counter() - t) * 1e3)
            hits += len(want & set(rows.tolist()))
        used = (cpu() - c0) / len(queries) * 1e3
        print(
            f"ivf nprobe={nprobe}: recall@{args.k} {hits / (args.k * len(queries)):.4f}, "
            f"wall p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms; "
            f"thread CPU p50 {np.percentile(cpu_ms, 50):.2f} ms, "
            f"p99 {np.percentile(cpu_ms, 99):.2f} ms; process CPU {used:.2f} ms/query"
        )
    # a filter admitting half the rows (a metadata filter), searched through the ID selector
    allow = np.zeros(index.rows, dtype=bool)
    allow[::2] = True
    index.nprobe = int(args.nprobe.split(",")[-1])
    hits, lat, cpu_ms = 0, [], []
    for q in queries[: min(200, len(queries))]:
        want = set(index.search(q, args.k, allow=allow, exact=True)[0].tolist())
        t, tc = time.perf_counter(), time.thread_time()
        rows, _ = index.search(q, args.k, allow=allow)
        cpu_ms.append((time.thread_time() - tc) * 1e3)
        lat.append((time.perf_counter() - t) * 1e3)
        hits += len(want & set(rows.tolist()))
        assert allow[rows].all()
    print(
        f"filtered (half the rows), nprobe={index.nprobe}: recall@{args.k} "
        f"{hits / (args.k * len(lat)):.4f}, wall p50 {np.percentile(lat, 50):.2f} ms, "
        f"p99 {np.percentile(lat, 99):.2f} ms; thread CPU p50 {np.percentile(cpu_ms, 50):.2f} "
        f"ms, p99 {np.percentile(cpu_ms, 99):.2f} ms"
    )
    print(f"load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

"""Instructions per event of the durable event log, in process (no HTTP), under valgrind.

    python benchmarks/events_log_instructions.py [--events 400] [--phase submit ...]

Each phase runs in two processes under `valgrind --tool=callgrind` (N and 2N events, fresh
data roots in /dev/shm); the difference of the two totals divided by N is the cost of one
event without the fixed costs (imports, start-up; the start-up heap is frozen as
`serving/wsgi.py` freezes it, so a full garbage collection falling in one run but not the
other does not weigh on the figure). Counted in user space only, so the figure
repeats on a busy machine where wall-clock figures do not (each process takes a minute or two
under valgrind):

* submit:  `TenantEventLog.submit` of one event at a time (the POST /v1/recs/events path
  behind the HTTP layer: raw row, group commit, contract validation, append, fsync),
* bulk:    submits of 100 events each (POST /v1/recs/events/bulk),
* catchup: a second worker's log reading the others' records (`SegmentLog.refresh`),
* flush:   the closed segment landed as Parquet (`flush_events`).

Only `serving.events_log.TenantEventLog` and `flush_events` are used, so the script measures
older checkouts too (run it with `--repo` pointing at one for an A/B).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile

PHASES = ("submit", "bulk", "catchup", "flush")
TENANT = "bench"


def event(i: int) -> dict:
    return {
        "event_id": f"e{i:08d}",
        "type": "click",
        "user_id": f"u{i % 997}",
        "item_id": f"i{i % 4999}",
        "timestamp": "2025-01-01T10:00:00Z",
        "session_id": "s1",
        "metadata": {"page": "home"},
    }


def run_phase(phase: str, n: int, root: str) -> None:
    """One phase over `n` events (what valgrind counts)."""
    from serving.events_log import TenantEventLog, flush_events

    writer = TenantEventLog(root, TENANT, linger_s=0.0)
    gc.collect()
    gc.freeze()  # as serving/wsgi.py does: no full collection over the start-up heap mid-run
    if phase in ("catchup", "flush"):  # set-up: the records to read back or land
        for start in range(0, n, 1000):
            writer.submit([event(i) for i in range(start, min(n, start + 1000))])
    if phase == "submit":
        for i in range(n):
            writer.submit([event(i)])
    elif phase == "bulk":
        for start in range(0, n, 100):
            writer.submit([event(i) for i in range(start, min(n, start + 100))])
    elif phase == "catchup":
        TenantEventLog(root, TENANT)  # a second worker reads every record the writer appended
    elif phase == "flush":
        flush_events(root, [TENANT])


def count(repo: str, phase: str, n: int) -> int:
    """Instructions of one process running `phase` over `n` events (callgrind's total, every
    thread included: the group commit's threads do most of the work)."""
    work = tempfile.mkdtemp(prefix="evlog-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    out = os.path.join(work, "callgrind.out")
    try:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            os.path.abspath(__file__),
            "--run",
            phase,
            "--events",
            str(n),
            "--root",
            os.path.join(work, "data"),
        ]
        env = {**os.environ, "PYTHONPATH": repo, "PYTHONHASHSEED": "0"}
        subprocess.run(cmd, check=True, cwd=repo, env=env, capture_output=True)
        with open(out) as f:
            return int(re.search(r"^summary: (\d+)", f.read(), re.M).group(1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=400, help="N (the second run has 2N)")
    ap.add_argument("--phase", action="append", choices=PHASES, help="repeatable; default all")
    ap.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        sys.path.insert(0, os.getcwd())
        run_phase(args.run, args.events, args.root)
        return
    n = args.events
    print(f"repo {args.repo}, N = {n} events (instructions per event = (Ir(2N) - Ir(N)) / N)")
    for phase in args.phase or PHASES:
        one, two = count(args.repo, phase, n), count(args.repo, phase, 2 * n)
        print(f"{phase:8s} {(two - one) / n:12,.0f} instructions per event", flush=True)


if __name__ == "__main__":
    main()

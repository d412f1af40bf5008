"""Event ingestion over HTTP against the real server on loopback, then kill -9 under load.

    python benchmarks/events_ingest.py [--seconds 8] [--workers 2] [--threads 64]
        [--connections 64] [--repeat 1] [--server granian --server gthread ...]

Starts the server as `recsys serve --threads` does (granian's WSGI server, `--server granian`,
the default) or gunicorn with another worker class (`--server gthread`, `--server sync`; the
option is repeatable for an A/B: the runs alternate) on a fresh data root and prints, with the
load average:

* single events/s: POST /v1/recs/events from wrk (`benchmarks/events_wrk.lua`: unique valid
  events) over `--connections` keep-alive connections, and the workers' CPU per request
  (utime + stime from /proc: less sensitive to the other load on a shared machine),
* bulk events/s: POST /v1/recs/events/bulk with 1,000 NDJSON events per request,
* kill -9 of the master and every worker in the middle of a load of single events (Python
  clients, which know which events were acknowledged), then a count: every acknowledged event
  (201) is in landing Parquet exactly once after the flush, and nothing is unreadable.

The load generator is wrk (C and LuaJIT, /usr/bin/wrk) because it shares the cores with the
server: Python clients took about as much CPU as the server they measured.

Every loop is bounded (time and count); everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import orjson

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from serving.auth import mint_token  # noqa: E402
from serving.cli import granian_argv, gunicorn_argv  # noqa: E402

SECRET = "benchmark-secret-0123456789abcdef0123456789"
TENANT = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    root: str,
    port: int,
    workers: int,
    threads: int,
    extra_env: dict[str, str] | None = None,
    server: str = "granian",
) -> subprocess.Popen:
    """`recsys serve --threads` (granian) or gunicorn with the worker class `server` (sync
    workers get one thread each) on 127.0.0.1:`port`; returns when /healthz answers."""
    bind = f"127.0.0.1:{port}"
    if server == "granian":
        argv = granian_argv(bind, workers, threads)  # (backlog 2048, as below)
    else:
        threads = 1 if server == "sync" else threads
        argv = gunicorn_argv(bind, workers, threads=threads, worker_class=server)
        argv += ["--backlog", "2048"]
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_ACCESS_LOG": "0",
        "RECSYS_RATE_LIMIT": "100000000/60",
        "RECSYS_TENANT_RATE_LIMIT": "100000000/60",
        "RECSYS_MAX_BODY_BYTES": str(4 << 20),
        "PYTHONPATH": REPO,
        **(extra_env or {}),
    }
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200 and all_booted(proc.pid, workers):
                return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{server} exited: " + proc.stderr.read().decode()[-2000:])
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{server} did not become ready in 60 s")


def all_booted(master: int, workers: int) -> bool:
    """Whether every worker has booted: `workers` of them, each idle for 0.5 s (a booting
    worker is busy importing the app). A load started while one worker still boots would hand
    the other all its keep-alive connections for the whole run."""
    pids = server_pids(master)[1:]
    if len(pids) < workers:
        return False
    before = [cpu_ticks([pid]) for pid in pids]
    time.sleep(0.5)
    return all(cpu_ticks([pid]) - t <= 1 for pid, t in zip(pids, before, strict=True))


def server_pids(master: int) -> list[int]:
    """The master and its worker processes (children found through /proc)."""
    pids = [master]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == master:
                pids.append(int(entry))
    return pids


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the master and its workers at once (no graceful shutdown of anything): the whole
    process group the server was started in, so no worker the master restarts meanwhile is left
    running without it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in reversed(server_pids(proc.pid)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)


def event(prefix: str, n: int) -> dict:
    return {
        "event_id": f"{prefix}-{n}",
        "type": "click",
        "user_id": f"u{n % 5000}",
        "item_id": f"i{n % 997}",
        "timestamp": 1_735_689_600 + n % 86_400,
        "session_id": f"s{n % 300}",
    }


def _client(
    port: int,
    token: str,
    mode: str,
    prefix: str,
    seconds: float,
    connections: int,
    bulk_size: int,
    out: mp.Queue,
) -> None:
    """One load process: `connections` threads, each a keep-alive connection, until time is up;
    puts (acknowledged ids, requests, errors) on `out`."""
    stop_at = time.time() + seconds
    acked: list[list[str]] = [[] for _ in range(connections)]
    counts = [[0, 0] for _ in range(connections)]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def run(t: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        n = 0
        while time.time() < stop_at and n < 10_000_000:
            try:
                if mode == "single":
                    ev = event(f"{prefix}-{t}", n)
                    n += 1
                    conn.request("POST", "/v1/recs/events", orjson.dumps(ev), headers)
                    resp = conn.getresponse()
                    resp.read()
                    counts[t][0] += 1
                    if resp.status == 201:
                        acked[t].append(ev["event_id"])
                    else:
                        counts[t][1] += 1
                else:
                    evs = [event(f"{prefix}-{t}", n + k) for k in range(bulk_size)]
                    n += bulk_size
                    body = b"\n".join(orjson.dumps(e) for e in evs)
                    conn.request("POST", "/v1/recs/events/bulk", body, headers)
                    resp = conn.getresponse()
                    payload = resp.read()
                    counts[t][0] += 1
                    if resp.status == 200:
                        res = orjson.loads(payload)
                        acked[t].extend(e for e in res["event_ids"] if e)
                        counts[t][1] += res["rejected"]
                    else:
                        counts[t][1] += 1
            except (OSError, http.client.HTTPException):
                counts[t][1] += 1  # the server died (kill test) or refused: not acknowledged
                conn.close()
                if time.time() >= stop_at:
                    break
                time.sleep(0.05)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(connections)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    out.put(([i for a in acked for i in a], sum(c[0] for c in counts), sum(c[1] for c in counts)))


def load(
    port: int,
    mode: str,
    seconds: float,
    clients: int,
    connections: int = 16,
    bulk_size: int = 1000,
    prefix: str = "ev",
    during: tuple[float, callable] | None = None,
) -> tuple[list[str], int, int, float]:
    """Run `clients` load processes; returns (acknowledged ids, requests, errors, elapsed s).
    `during=(after_s, fn)` calls fn after that many seconds (the kill)."""
    token = mint_token(SECRET, TENANT, ["recommend", "admin"], 3600)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_client,
            args=(port, token, mode, f"{prefix}{c}", seconds, connections, bulk_size, out),
        )
        for c in range(clients)
    ]
    started = time.time()
    for p in procs:
        p.start()
    if during is not None:
        time.sleep(during[0])
        during[1]()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    elapsed = time.time() - started
    ids = [i for r in results for i in r[0]]
    return ids, sum(r[1] for r in results), sum(r[2] for r in results), elapsed


def stored_ids(root: str) -> tuple[list[str], int]:
    """Every event id in landing Parquet after flushing the whole log (which also repairs torn
    tails), and the number of landing files."""
    import polars as pl

    from recsys.storage import Storage
    from serving.events_log import flush_events

    flush_events(root, [TENANT])
    files = Storage(root).landing_files(TENANT, "events")
    if not files:
        return [], 0
    return pl.read_parquet(files)["event_id"].to_list(), len(files)


def check_exactly_once(acked: list[str], stored: list[str]) -> dict[str, int]:
    from collections import Counter

    counts = Counter(stored)
    missing = sum(1 for i in acked if counts[i] == 0)
    duplicated = sum(1 for i, c in counts.items() if c > 1)
    return {
        "acknowledged": len(acked),
        "stored": len(stored),
        "missing": missing,
        "duplicated": duplicated,
    }


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime of `pids` in clock ticks (processes that are gone count 0)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


WRK_SCRIPT = os.path.join(REPO, "benchmarks", "events_wrk.lua")


def wrk_load(
    port: int, proc: subprocess.Popen, seconds: float, connections: int, prefix: str, bulk: int = 0
) -> dict[str, float]:
    """wrk (2 threads) posting unique events for `seconds`; events/s, requests/s and the
    server's CPU per request (master + workers, microseconds)."""
    token = mint_token(SECRET, TENANT, ["recommend"], 3600)
    pids = server_pids(proc.pid)
    before = cpu_ticks(pids)
    argv = [
        shutil.which("wrk") or "/usr/bin/wrk",
        "-t2",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "30s",
        "-s",
        WRK_SCRIPT,
        f"http://127.0.0.1:{port}",
        "--",
        prefix,
        str(bulk),
    ]
    out = subprocess.run(
        argv, env={**os.environ, "TOKEN": token}, capture_output=True, text=True, check=True
    ).stdout
    cpu_s = (cpu_ticks(pids) - before) / os.sysconf("SC_CLK_TCK")
    line = next(x for x in out.splitlines() if x.startswith("result "))
    res = {k: int(v) for k, v in (kv.split("=") for kv in line.split()[1:])}
    secs = res["us"] / 1e6
    return {
        "events_s": res["acked"] / secs,
        "requests_s": res["answered"] / secs,
        "failed": res["failed"] + res["errors"],
        "acked": res["acked"],
        "cpu_us_per_request": cpu_s * 1e6 / max(res["answered"], 1),
        "seconds": secs,
    }


def throughput(args: argparse.Namespace, server: str, run: int) -> None:
    """Single and bulk events/s of one fresh server; checks every acknowledged event landed."""
    root = tempfile.mkdtemp(prefix="events-bench-")
    port = free_port()
    proc = start_server(root, port, args.workers, args.threads, SERVER_ENV, server)
    acked = 0
    label = server
    try:
        for name, bulk, conns in (
            ("single events  ", 0, args.connections),
            ("bulk (1000/req)", 1000, 4),
        ):
            load_before = load_average()
            r = wrk_load(port, proc, args.seconds, conns, f"{name[0]}{run}", bulk)
            acked += r["acked"]
            print(
                f"[{label}] {name}: {r['events_s']:7.0f} events/s  {r['requests_s']:6.0f} req/s  "
                f"server CPU {r['cpu_us_per_request']:6.0f} us/request  "
                f"({r['failed']} failed, {r['seconds']:.1f} s; load average "
                f"{load_before} -> {load_average()})"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    stored, _ = stored_ids(root)
    missing = acked - len(set(stored))
    print(f"[{label}] stored {len(stored)} events, {acked} acknowledged, {max(0, missing)} missing")
    shutil.rmtree(root, ignore_errors=True)


SERVER_ENV = {"RECSYS_EVENTS_SEGMENT_BYTES": str(8 << 20), "RECSYS_EVENTS_FLUSH_S": "5"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--connections", type=int, default=64, help="wrk connections, single events")
    ap.add_argument("--repeat", type=int, default=1, help="throughput runs (kill test once)")
    ap.add_argument(
        "--server",
        action="append",
        help="granian (recsys serve --threads, the default) or a gunicorn worker class "
        "(gthread, sync); repeatable: the runs alternate",
    )
    args = ap.parse_args()
    servers = args.server or ["granian"]
    print(
        f"{args.workers} workers x {args.threads} threads; wrk 2 threads x "
        f"{args.connections} connections; {os.cpu_count()} cores"
    )
    for run in range(args.repeat):
        for server in servers:
            throughput(args, server, run)

    root = tempfile.mkdtemp(prefix="events-kill-")
    port = free_port()
    proc = start_server(root, port, args.workers, args.threads, SERVER_ENV, servers[0])
    t0 = time.time()
    acked_single, *_ = load(
        port, "single", 4.0, 2, 16, prefix="ks", during=(2.0, lambda: kill9(proc))
    )
    print(f"kill -9 after {time.time() - t0:.1f} s of load: ", end="")
    stored, files = stored_ids(root)
    report = check_exactly_once(acked_single, stored)
    print(report, f"landing files {files}")
    ok = report["missing"] == 0 and report["duplicated"] == 0
    print("every acknowledged event present exactly once:", "yes" if ok else "NO")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Load test of the serving API under real gunicorn, over loopback, with wrk.

    python benchmarks/serve_load.py [--data-root data/bench] [--duration 10] [--rounds 4]
        [--server gunicorn|granian] [--threads 1]

Builds (or reuses) a synthetic 1M-user x 100k-item, N=200 snapshot, starts the real server and a
trivial Falcon endpoint (a fixed 20-item list; benchmarks/trivial_app.py) with the same gunicorn
settings (2 sync workers; `--server granian` runs both under granian instead, as `recsys serve
--threads N` does, to compare the servers), and prints:

* throughput of POST /v1/recommend (k=20, 5 excluded ids, a forbidden tag, max_per_tag) vs the
  trivial endpoint (goal >= 75 %, issue 12; 70 % before it), in alternating slices (the
  ratio's median over the rounds),
* p99 latency at ~70 % of the recommend throughput (goal < 5 ms), paced with a wrk `delay()`
  (closed loop with think time, so the offered rate is approximate; the achieved rate is printed),
* single-client median latency (goal <= 0.25 ms, issue 12; 0.3 ms before it),
* memory per worker beyond the shared snapshot mapping, from /proc/<pid>/smaps (goal < 150 MB),
* a snapshot switch under load with zero failed requests.

Both servers run with the production defaults: the JSON access log on (`--no-access-log` to
compare; its lines go to a file in the run's temporary folder, and their count is printed),
and rate limits on, with quotas far above the offered load. `--log-ab` adds a third server,
the real one with the access log off, to the alternating throughput slices and prints what the
log costs (issue 12: under a fifth of the throughput).

Needs `wrk` (apt-get install -y wrk). Everything stays on 127.0.0.1; every loop is bounded.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._snapshots import TENANT, ensure_snapshot  # noqa: E402
from recsys.snapshot import SnapshotStore  # noqa: E402
from recsys.snapshot.format import MANIFEST  # noqa: E402
from recsys.snapshot.writer import new_snapshot_id  # noqa: E402
from serving.auth import mint_token  # noqa: E402
from serving.cli import granian_argv, gunicorn_argv  # noqa: E402

SECRET = "benchmark-secret-0123456789abcdef0123456789"

LUA = r"""
local token = "%(token)s"
local n_users = %(n_users)d
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. token
local counter = 0
local tid = 0
local delay_ms = %(delay_ms)f
setup = function(thread) tid = tid + 1; thread:set("tid", tid) end
init = function(args) math.randomseed(1234 + (tid or 0)) end
request = function()
  counter = counter + 1
  local uid = string.format("u%%07d", math.random(0, n_users - 1))
  local body = '{"surface":"home","k":20,"user":{"user_id":"' .. uid .. '"},' ..
    '"candidates":{"exclude_ids":["i0000001","i0000002","i0000003","i0000004","i0000005"]},' ..
    '"constraints":{"forbidden_tags":["tag007"],"max_per_tag":{"tag001":2}}}'
  return wrk.format(nil, nil, nil, body)
end
if delay_ms > 0 then
  delay = function() return delay_ms end
end
"""


def server_env(data_root: str, access_log: bool = True, **extra: str) -> dict[str, str]:
    """The environment of the benchmarked server: the bench tenant, the access log on (as by
    default) or off, rate limits on with quotas out of the way, in-process counters (no
    Redis)."""
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": data_root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_TENANTS": TENANT,
        "RECSYS_ACCESS_LOG": "1" if access_log else "0",
        "RECSYS_RATE_LIMIT": "1000000000/60",
        "RECSYS_TENANT_RATE_LIMIT": "1000000000/60",
        "PYTHONPATH": REPO,
        **extra,
    }
    env.pop("RECSYS_REDIS_URL", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    app: str,
    port: int,
    env: dict[str, str],
    log_path: str,
    server: str = "gunicorn",
    threads: int = 1,
    argv: list[str] | None = None,
) -> subprocess.Popen:
    """`server` serving `app` with 2 workers (gunicorn: sync workers; granian: `threads` app
    threads each, as `recsys serve --threads`), its stderr (the access log) into `log_path`;
    or the command line `argv`, which serves `app` on `port`."""
    bind = f"127.0.0.1:{port}"
    if argv is None and server == "granian":
        argv = granian_argv(bind, 2, threads, app=app)
    elif argv is None:
        argv = gunicorn_argv(bind, 2, app=app)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    deadline = time.time() + 120
    path = "/readyz" if app.startswith("serving") else None
    while time.time() < deadline:
        try:
            if path:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    if r.status == 200:
                        return proc
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return proc
        except OSError:
            time.sleep(0.3)
        if proc.poll() is not None:
            with open(log_path, "rb") as log:
                raise RuntimeError(f"{app} exited: {log.read().decode()[-2000:]}")
    proc.kill()
    raise RuntimeError(f"{app} did not become ready")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def _ms(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", value)
    number, unit = float(m.group(1)), m.group(2)
    return number / 1000 if unit == "us" else number * 1000 if unit == "s" else number


def wrk(url: str, script: str, duration: int, connections: int, threads: int = 1) -> dict:
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            script,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    ).stdout
    res = {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "requests": int(re.search(r"(\d+) requests in", out).group(1)),
        "non2xx": int(m.group(1))
        if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out))
        else 0,
        "socket_errors": sum(int(x) for x in m.groups())
        if (
            m := re.search(
                r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
            )
        )
        else 0,
        "raw": out,
    }
    for pct in ("50", "90", "99"):
        m = re.search(rf"^\s+{pct}(?:\.000)?%\s+([\d.]+(?:us|ms|s))", out, re.M)
        res[f"p{pct}_ms"] = _ms(m.group(1)) if m else float("nan")
    return res


def lua_file(tmp: str, name: str, n_users: int, delay_ms: float = 0.0) -> str:
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(
            LUA
            % {
                "token": mint_token(SECRET, TENANT, ["recommend"], 7200),
                "n_users": n_users,
                "delay_ms": delay_ms,
            }
        )
    return path


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes, in seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def worker_pids(master: int) -> list[int]:
    """The worker processes of a server (children of `master` that serve: granian's
    multiprocessing also starts a resource tracker, which is left out)."""
    out = subprocess.run(["pgrep", "-P", str(master)], capture_output=True, text=True).stdout
    pids = []
    for pid in map(int, out.split()):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"resource_tracker" not in f.read():
                pids.append(pid)
    return pids


def memory(pid: int, snapshot_dir: str) -> dict[str, float]:
    """MB: smaps_rollup totals and private memory outside the snapshot's file mappings."""
    rollup = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                rollup[parts[0].rstrip(":")] = int(parts[1]) / 1024
    private_outside = 0.0
    in_snapshot = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                in_snapshot = path.startswith(snapshot_dir)
            elif first in ("Private_Clean:", "Private_Dirty:") and not in_snapshot:
                private_outside += int(line.split()[1]) / 1024
    return {
        "rss": rollup.get("Rss", 0),
        "pss": rollup.get("Pss", 0),
        "private": rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0),
        "anonymous": rollup.get("Anonymous", 0),
        "private_outside_snapshot": private_outside,
    }


def copy_snapshot(store: SnapshotStore, source_id: str) -> str:
    """Publish a new snapshot id holding the same arrays (hard links) as `source_id`."""
    src = store.path_of(source_id)
    tmp = store.new_tmp_dir()
    for name in os.listdir(src):
        full = os.path.join(src, name)
        if name == MANIFEST:
            continue
        if os.path.isdir(full):
            shutil.copytree(full, os.path.join(tmp, name), copy_function=os.link)
        else:
            os.link(full, os.path.join(tmp, name))
    with open(os.path.join(src, MANIFEST)) as f:
        manifest = json.load(f)
    manifest["snapshot_id"] = new_snapshot_id()
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return store.publish(tmp, checksums=False, prune=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.path.join(REPO, "data", "bench"))
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--duration", type=int, default=10, help="seconds per measurement")
    ap.add_argument(
        "--rounds", type=int, default=4, help="alternating throughput slices per endpoint"
    )
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument(
        "--server",
        choices=("gunicorn", "granian"),
        default="gunicorn",
        help="the HTTP server of both endpoints: gunicorn's sync workers (`recsys serve`, the "
        "default) or granian (`recsys serve --threads N`)",
    )
    ap.add_argument("--threads", type=int, default=1, help="with --server granian: app threads")
    ap.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the servers' JSON access log (default: on, as in production)",
    )
    ap.add_argument(
        "--log-ab",
        action="store_true",
        help="also measure the server with its access log off, in the same slices",
    )
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    data_root = os.path.abspath(args.data_root)
    sid = ensure_snapshot(data_root, args.users, args.items)
    store = SnapshotStore(os.path.join(data_root, "snapshots", TENANT))
    print(f"snapshot {sid}: {args.users} users x {args.items} items", flush=True)

    env = server_env(data_root, access_log=args.access_log)
    tmp = tempfile.mkdtemp(prefix="serve_load-")
    logs = {name: os.path.join(tmp, f"{name}.log") for name in ("recommend", "trivial")}
    full = lua_file(tmp, "full.lua", args.users)
    port_app, port_triv = free_port(), free_port()
    how = {"server": args.server, "threads": args.threads}
    print(
        f"server: {args.server}, 2 workers"
        + (f", {args.threads} app threads each" if args.server == "granian" else " (sync)"),
        flush=True,
    )
    server = start("serving.wsgi:app", port_app, env, logs["recommend"], **how)
    trivial = start("benchmarks.trivial_app:app", port_triv, env, logs["trivial"], **how)
    log_off = None  # (--log-ab: the same server without its access log)
    if args.log_ab and args.access_log:
        port_off = free_port()
        env_off = server_env(data_root, access_log=False)
        log_off = start("serving.wsgi:app", port_off, env_off, os.path.join(tmp, "off.log"), **how)
    results: dict[str, object] = {}
    try:
        url_app = f"http://127.0.0.1:{port_app}/v1/recommend"
        url_triv = f"http://127.0.0.1:{port_triv}/v1/recommend"
        wrk(url_app, full, 3, args.connections)  # warm-up: page in the hot parts of the mapping
        wrk(url_triv, full, 2, args.connections)

        # Throughput: the two endpoints in alternating slices (the speed of a shared box drifts
        # by tens of percent within a minute; a ratio of neighbouring slices follows it less).
        triv_pids, app_pids = worker_pids(trivial.pid), worker_pids(server.pid)
        servers = [("trivial", url_triv, triv_pids), ("recommend", url_app, app_pids)]
        if log_off is not None:
            url_off = f"http://127.0.0.1:{port_off}/v1/recommend"
            wrk(url_off, full, 3, args.connections)
            servers.append(("log off", url_off, worker_pids(log_off.pid)))
        ratios, runs = [], {name: [] for name, _, _ in servers}
        for _ in range(args.rounds):
            for name, url, pids in servers:
                cpu0 = cpu_seconds(pids)
                res = wrk(url, full, args.duration, args.connections)
                res["cpu_us"] = (cpu_seconds(pids) - cpu0) / max(1, res["requests"]) * 1e6
                runs[name].append(res)
            ratios.append(runs["recommend"][-1]["rps"] / runs["trivial"][-1]["rps"])
        ratio = statistics.median(ratios)
        rec_rps = statistics.median(r["rps"] for r in runs["recommend"])
        triv_rps = statistics.median(r["rps"] for r in runs["trivial"])
        each = ", ".join(f"{r:.0%}" for r in ratios)
        print(
            f"throughput: recommend {rec_rps:.0f} req/s vs trivial {triv_rps:.0f} req/s "
            f"(medians of {args.rounds} alternating {args.duration} s slices); ratio of "
            f"neighbouring slices: median {ratio:.0%}, each {each} (goal >= 75%); "
            f"recommend non-2xx {sum(r['non2xx'] for r in runs['recommend'])}",
            flush=True,
        )
        cpu_rec = statistics.median(r["cpu_us"] for r in runs["recommend"])
        cpu_triv = statistics.median(r["cpu_us"] for r in runs["trivial"])
        print(
            f"worker CPU per request: recommend {cpu_rec:.0f} us, trivial {cpu_triv:.0f} us "
            f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs during the run)",
            flush=True,
        )
        if log_off is not None:
            stop(log_off)
            off = runs["log off"]
            costs = [1 - on["rps"] / o["rps"] for on, o in zip(runs["recommend"], off, strict=True)]
            print(
                f"access log: recommend with it off {statistics.median(r['rps'] for r in off):.0f}"
                f" req/s, {statistics.median(r['cpu_us'] for r in off):.0f} us of worker CPU; "
                f"the log costs {statistics.median(costs):.1%} of the throughput (each slice: "
                f"{', '.join(f'{c:.1%}' for c in costs)}; goal < 20%)",
                flush=True,
            )

        single = wrk(url_app, full, args.duration, 1)
        single_triv = wrk(url_triv, full, args.duration, 1)
        print(
            f"single client: median {single['p50_ms']:.3f} ms, p99 {single['p99_ms']:.3f} ms, "
            f"{single['rps']:.0f} req/s (trivial endpoint: median {single_triv['p50_ms']:.3f} ms; "
            "goal <= 0.25 ms)",
            flush=True,
        )

        # ~70 % of the saturated throughput: each connection waits so that one cycle
        # (service time + delay) takes connections / target seconds.
        target = 0.7 * rec_rps
        delay = max(0.0, args.connections / target * 1000 - single["p50_ms"])
        paced = wrk(
            url_app, lua_file(tmp, "paced.lua", args.users, delay), args.duration, args.connections
        )
        print(
            f"p99 at ~70% load: {paced['p99_ms']:.2f} ms (p50 {paced['p50_ms']:.2f} ms, "
            f"target {target:.0f} req/s, achieved {paced['rps']:.0f} req/s; goal < 5 ms)",
            flush=True,
        )

        snapshot_dir = store.root
        for pid in worker_pids(server.pid):
            m = memory(pid, snapshot_dir)
            print(
                f"worker {pid}: RSS {m['rss']:.0f} MB (shared snapshot pages included), "
                f"private outside the snapshot mapping {m['private_outside_snapshot']:.1f} MB, "
                f"anonymous {m['anonymous']:.1f} MB, PSS {m['pss']:.0f} MB (goal < 150 MB)",
                flush=True,
            )
        for pid in worker_pids(trivial.pid):
            m = memory(pid, snapshot_dir)
            print(f"trivial worker {pid}: private {m['private']:.1f} MB (baseline interpreter)")

        # Snapshot switch under load.
        switch_len = max(8, args.duration)
        proc = subprocess.Popen(
            [
                "wrk",
                "-t1",
                f"-c{args.connections}",
                f"-d{switch_len}s",
                "--latency",
                "-s",
                full,
                url_app,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(switch_len / 3)
        new_sid = copy_snapshot(store, sid)
        out = proc.communicate(timeout=switch_len + 60)[0]
        non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
        errs = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
        )
        total = int(re.search(r"(\d+) requests in", out).group(1))
        live = set()
        for _ in range(10):
            with urllib.request.urlopen(f"http://127.0.0.1:{port_app}/readyz", timeout=5) as r:
                live.add(json.loads(r.read())["tenants"][TENANT]["snapshot_id"])
        print(
            f"snapshot switch under load: {total} requests, non-2xx {non2xx}, socket errors "
            f"{errs.groups() if errs else (0, 0, 0, 0)}; workers now serve {sorted(live)} "
            f"(published {new_sid})",
            flush=True,
        )
        results = {
            "ratio": ratio,
            "p99_ms": paced["p99_ms"],
            "median_ms": single["p50_ms"],
            "switch_failed": non2xx,
            "switched": live == {new_sid},
        }
        store.prune(keep=1)  # the copy (same arrays) stays current; the next run reuses it
    finally:
        stop(server)
        stop(trivial)
        if log_off is not None:
            stop(log_off)  # (stopped after the slices already, unless they failed)
        lines, failed = 0, collections.Counter()
        with open(logs["recommend"], "rb") as f:
            for line in f:
                if line.startswith(b'{"ts":'):
                    lines += 1
                    status = json.loads(line)["status"]
                    if status >= 300:
                        failed[status] += 1
        print(f"access log: {lines} lines" if args.access_log else "access log: off", flush=True)
        if failed:  # (the server's side of wrk's non-2xx: which statuses)
            print(f"non-2xx answers in the access log, by status: {dict(failed)}", flush=True)
            with open(logs["recommend"], "rb") as f:  # (and the server's last other lines)
                tail = [ln for ln in f if not ln.startswith(b'{"ts":')][-20:]
            print(b"".join(tail).decode(errors="replace"), flush=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

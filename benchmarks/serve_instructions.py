"""Instructions per request in one gunicorn worker, counted by valgrind (callgrind).

    python benchmarks/serve_instructions.py [--data-root data/bench] [--requests 2000]

Wall-clock throughput on a shared 2-core box swings by +-15 % from run to run; the number of
instructions a worker executes per request does not. For the trivial endpoint
(benchmarks/trivial_app.py) and for POST /v1/recommend (the load of serve_load.py: k=20, 5
excluded ids, a forbidden tag, max_per_tag) this starts gunicorn with one sync worker under
callgrind, warms it up with `--warmup` requests, zeroes the counters, sends `--requests` more,
dumps the counters and prints instructions per request (accept, HTTP parsing, the app, the
response, close: everything the worker does). The requests are the bytes wrk sends for
serve_load.py's script (one connection each, as the sync worker closes it), for users drawn
from a seeded generator, so a run repeats its figure: over a window of fixed seconds of wrk
load (before 2026-12-01) the warm-up's share moved it by a few percent. The client's own work
is not counted, so it need not be wrk.

Each thread is counted apart (callgrind's --separate-threads): the request thread's count
per request, and the worker's other threads (the metrics share, the access log writer) per
request and per second of the counted window. Those threads wake on a timer, and under
valgrind a request takes ~50x longer, so per request they count ~50x more than in a worker
at full speed (and more the busier the machine: the same code counted 1,029k and 1,839k at
different loads): the request thread's figure is the one that does not depend on the load.
The printed total is the sum of both, as before. `--keep DIR` keeps the dumps for
callgrind_annotate.

Under serve_load.py the worker CPU per request follows these counts (0.48 and 0.47 for the
trivial/recommend ratio before the compiled kernels). Needs valgrind. Numba compiles
for the CPU valgrind reports, so NUMBA_CPU_NAME=generic is set for the server and the kernels
are compiled natively first (a compilation under valgrind takes minutes).
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._snapshots import TENANT, ensure_snapshot  # noqa: E402
from benchmarks.serve_load import SECRET, free_port, server_env  # noqa: E402
from serving.auth import mint_token  # noqa: E402
from serving.cli import GUNICORN_CONFIG  # noqa: E402


def recommend_bodies(n: int, seed: int, n_users: int = 1_000_000) -> list[bytes]:
    """`n` bodies of serve_load.py's recommend request (k=20, 5 excluded ids, a forbidden tag,
    max_per_tag) for seeded random users."""
    rng = random.Random(seed)
    return [
        (
            f'{{"surface":"home","k":20,"user":{{"user_id":"u{rng.randrange(n_users):07d}"}},'
            '"candidates":{"exclude_ids":["i0000001","i0000002","i0000003","i0000004",'
            '"i0000005"]},"constraints":{"forbidden_tags":["tag007"],"max_per_tag":{"tag001":2}}}'
        ).encode()
        for _ in range(n)
    ]


def requests_for(port: int, n: int, seed: int, n_users: int = 1_000_000) -> list[bytes]:
    """`n` POST /v1/recommend requests as wrk writes them for serve_load.py's script (k=20,
    5 excluded ids, a forbidden tag, max_per_tag), for seeded random users."""
    token = mint_token(SECRET, TENANT, ["recommend"], 7200)
    out = []
    for body in recommend_bodies(n, seed, n_users):
        head = (
            f"POST /v1/recommend HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        out.append(head + body)
    return out


def send(port: int, requests: list[bytes]) -> None:
    """Each request on a connection of its own, its whole answer read; fails on a non-200."""
    for raw in requests:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            sock.sendall(raw)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        if not answer.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"non-200 answer under callgrind: {answer[:300]!r}")


class Counts:
    """A worker's instructions over the counted requests, by thread (the request thread first:
    the main thread, callgrind's thread 1)."""

    def __init__(self, requests: int, by_thread: dict[int, int], seconds: float) -> None:
        self.requests = requests
        self.by_thread = by_thread
        self.seconds = seconds

    @property
    def total(self) -> int:
        return sum(self.by_thread.values())

    @property
    def request_thread(self) -> int:
        return self.by_thread[min(self.by_thread)]

    @property
    def other_threads(self) -> int:
        return self.total - self.request_thread


def _dumps(out: str, pid: str) -> dict[int, str]:
    """{thread: file} of the last dump of process `pid` (files ``<out>.<pid>.<part>-<thread>``)."""
    parts: dict[int, dict[int, str]] = {}
    for path in glob.glob(f"{out}.{pid}.*-*"):
        found = re.search(r"\.(\d+)-(\d+)$", path)
        if found:
            parts.setdefault(int(found.group(1)), {})[int(found.group(2))] = path
    return parts[max(parts)]


def _summary(path: str) -> int:
    with open(path) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("summary:"))


def count(
    app: str, env: dict[str, str], warmup: int, measured: int, tmp: str, keep: str | None = None
) -> Counts:
    """The instructions of one worker over `measured` requests, after `warmup`."""
    port = free_port()
    out = os.path.join(tmp, f"cg-{port}")
    master = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",
            "--separate-threads=yes",
            f"--callgrind-out-file={out}.%p",
            sys.executable,
            "-m",
            "serving.gunicorn_server",  # (as served: `recsys serve`'s gunicorn)
            app,
            "--config",
            GUNICORN_CONFIG,  # (as served: the master preloads the serving modules)
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--worker-class",
            "sync",
            "--timeout",
            "900",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 3600  # (valgrind on a busy box: the master alone takes minutes)
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).close()
                break
            except OSError as e:
                if getattr(e, "code", None):  # an HTTP answer (the trivial app has no /healthz)
                    break
                time.sleep(1)
        else:
            raise RuntimeError(f"{app} did not start under valgrind")
        worker = subprocess.run(
            ["pgrep", "-P", str(master.pid)], capture_output=True, text=True
        ).stdout.split()[0]
        send(port, requests_for(port, warmup, seed=1234))
        subprocess.run(["callgrind_control", "-z", worker], capture_output=True, timeout=60)
        t0 = time.perf_counter()
        send(port, requests_for(port, measured, seed=99))  # other users than the warm-up's
        seconds = time.perf_counter() - t0
        subprocess.run(["callgrind_control", "-d", worker], capture_output=True, timeout=120)
        dumps = _dumps(out, worker)  # (the dump after the zeroing)
        if keep:
            os.makedirs(keep, exist_ok=True)
            for path in dumps.values():
                shutil.copy(path, keep)
        by_thread = {thread: _summary(path) for thread, path in dumps.items()}
        return Counts(measured, by_thread, seconds)
    finally:
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(timeout=60)
        except subprocess.TimeoutExpired:
            master.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.path.join(REPO, "data", "bench"))
    ap.add_argument("--requests", type=int, default=2000, help="measured requests per endpoint")
    ap.add_argument("--warmup", type=int, default=1000, help="requests before the counting")
    ap.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the server's JSON access log (default: on, as in production)",
    )
    ap.add_argument("--keep", help="copy the worker's callgrind dumps into this folder")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install -y valgrind", file=sys.stderr)
            return 2
    data_root = os.path.abspath(args.data_root)
    ensure_snapshot(data_root)
    env = server_env(
        data_root,
        access_log=args.access_log,
        RECSYS_DEADLINE_MS="600000",  # (valgrind runs the worker ~50x slower)
        NUMBA_CPU_NAME="generic",
    )
    subprocess.run([sys.executable, "-c", "import serving.kernels"], env=env, check=True)
    tmp = tempfile.mkdtemp(prefix="serve_instructions-")
    try:
        results = {}
        for name, app in (
            ("trivial", "benchmarks.trivial_app:app"),
            ("recommend", "serving.wsgi:app"),
        ):
            keep = os.path.join(args.keep, name) if args.keep else None
            c = count(app, env, args.warmup, args.requests, tmp, keep)
            results[name] = c.total / c.requests
            print(
                f"{name}: {c.total / c.requests:,.0f} instructions per request ({c.requests} "
                f"requests): request thread {c.request_thread / c.requests:,.0f}, other threads "
                f"{c.other_threads / c.requests:,.0f} ({len(c.by_thread) - 1} threads, "
                f"{c.other_threads / c.seconds:,.0f} per second of the {c.seconds:.0f} s "
                "counted)",
                flush=True,
            )
        print(
            f"trivial / recommend = {results['trivial'] / results['recommend']:.2f} "
            "(the worker-CPU ratio; throughput adds the load generator's share to both)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

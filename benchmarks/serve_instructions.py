"""Instructions per request in one gunicorn worker, counted by valgrind (callgrind).

    python benchmarks/serve_instructions.py [--data-root data/bench] [--seconds 20]

Wall-clock throughput on a shared 2-core box swings by +-15 % from run to run; the number of
instructions a worker executes per request does not. For the trivial endpoint
(benchmarks/trivial_app.py) and for POST /v1/recommend (the load of serve_load.py: k=20, 5
excluded ids, a forbidden tag, max_per_tag) this starts gunicorn with one sync worker under
callgrind, warms it up with wrk, zeroes the counters, runs wrk with one connection for
`--seconds`, dumps the counters and prints instructions per request (accept, HTTP parsing,
the app, the response, close: everything the worker does).

Under serve_load.py the worker CPU per request follows these counts (0.48 and 0.47 for the
trivial/recommend ratio before the compiled kernels). Needs valgrind and wrk. Numba compiles
for the CPU valgrind reports, so NUMBA_CPU_NAME=generic is set for the server and the kernels
are compiled natively first (a compilation under valgrind takes minutes).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._snapshots import ensure_snapshot  # noqa: E402
from benchmarks.serve_load import free_port, lua_file, server_env  # noqa: E402
from serving.cli import GUNICORN_CONFIG  # noqa: E402


def count(app: str, env: dict[str, str], script: str, seconds: int, tmp: str) -> tuple[int, int]:
    """(requests, instructions) of one worker over `seconds` of single-connection load."""
    port = free_port()
    out = os.path.join(tmp, f"cg-{port}")
    master = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            "--trace-children=yes",
            f"--callgrind-out-file={out}.%p",
            sys.executable,
            "-m",
            "gunicorn",
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
        deadline = time.time() + 900
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
        url = f"http://127.0.0.1:{port}/v1/recommend"
        wrk = ["wrk", "-t1", "-c1", "--timeout", "30s", "-s", script, url]
        subprocess.run([*wrk[:3], "-d10s", *wrk[3:]], capture_output=True, timeout=120)
        subprocess.run(["callgrind_control", "-z", worker], capture_output=True, timeout=60)
        res = subprocess.run(
            [*wrk[:3], f"-d{seconds}s", *wrk[3:]], capture_output=True, text=True, timeout=600
        ).stdout
        subprocess.run(["callgrind_control", "-d", worker], capture_output=True, timeout=120)
        requests = int(re.search(r"(\d+) requests in", res).group(1))
        if re.search(r"Non-2xx or 3xx responses: (\d+)", res):
            raise RuntimeError(f"{app}: non-2xx answers under callgrind:\n{res}")
        dump = sorted(glob.glob(f"{out}.{worker}.*"))[-1]  # the dump after the zeroing
        with open(dump) as f:
            total = next(int(line.split()[1]) for line in f if line.startswith("summary:"))
        return requests, total
    finally:
        master.send_signal(signal.SIGTERM)
        try:
            master.wait(timeout=60)
        except subprocess.TimeoutExpired:
            master.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.path.join(REPO, "data", "bench"))
    ap.add_argument("--seconds", type=int, default=20, help="measured seconds per endpoint")
    args = ap.parse_args()
    for tool in ("valgrind", "callgrind_control", "wrk"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install -y valgrind wrk", file=sys.stderr)
            return 2
    data_root = os.path.abspath(args.data_root)
    ensure_snapshot(data_root)
    env = server_env(
        data_root,
        RECSYS_DEADLINE_MS="600000",  # (valgrind runs the worker ~50x slower)
        NUMBA_CPU_NAME="generic",
    )
    subprocess.run([sys.executable, "-c", "import serving.kernels"], env=env, check=True)
    tmp = tempfile.mkdtemp(prefix="serve_instructions-")
    try:
        script = lua_file(tmp, "full.lua", 1_000_000)
        results = {}
        for name, app in (
            ("trivial", "benchmarks.trivial_app:app"),
            ("recommend", "serving.wsgi:app"),
        ):
            n, total = count(app, env, script, args.seconds, tmp)
            results[name] = total / n
            print(f"{name}: {total / n:,.0f} instructions per request ({n} requests)", flush=True)
        print(
            f"trivial / recommend = {results['trivial'] / results['recommend']:.2f} "
            "(the worker-CPU ratio; throughput adds the load generator's share to both)"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

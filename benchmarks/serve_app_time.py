"""How long the app itself takes for one client's requests, timed inside the gunicorn worker.

    python benchmarks/serve_app_time.py [--data-root data/bench] [--duration 8] [--workers 2]

`serve_load.py`'s single-client median is the whole round trip: wrk, the kernel, gunicorn's
accept, parsing and response, and the app. This serves each app wrapped in
`benchmarks/timed_app.py` (which times every call of it inside the worker) under the server's
gunicorn settings (sync workers, the serving modules preloaded in the master), warms it up
with 8 connections for 3 s, then sends serve_load.py's request from one wrk connection for
`--duration` seconds and prints, for the calls of that window: the app's median and 90th
percentile, next to wrk's median round trip. Three runs: the trivial endpoint, recommend for
random users of the benchmark snapshot (1M users x 100k items), and recommend for one user
asked again and again (what is left when the user's rows are in the caches).

Then the same apps are called back to back in this process (`serve_bytecodes.py`'s setup: the
app of `create_app` with the server's environment, the same requests as WSGI calls, after a
warm-up), and their median printed beside: the difference is what the worker's caches lose
between two requests.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._snapshots import ensure_snapshot  # noqa: E402
from benchmarks.serve_instructions import recommend_bodies  # noqa: E402
from benchmarks.serve_load import (  # noqa: E402
    SECRET,
    free_port,
    lua_file,
    server_env,
    start,
    stop,
    wrk,
)
from serving.cli import GUNICORN_CONFIG, gunicorn_argv  # noqa: E402

RUNS = (
    ("trivial endpoint", "benchmarks.trivial_app:app", False),
    ("recommend, random users", "serving.wsgi:app", False),
    ("recommend, one user", "serving.wsgi:app", True),
)


def timed_run(
    data_root: str, app: str, same_user: bool, duration: int, workers: int, n_users: int
) -> tuple[list[float], float]:
    """(the app's durations in the measured window, s; wrk's median round trip, ms)."""
    tmp = tempfile.mkdtemp(prefix="serve_app_time-")
    try:
        script = lua_file(tmp, "full.lua", n_users)
        if same_user:
            with open(script) as f:
                text = f.read().replace("math.random(0, n_users - 1)", "42")
            with open(script, "w") as f:
                f.write(text)
        env = server_env(data_root, TIMED_APP=app, TIMED_APP_OUT=tmp)
        port = free_port()
        argv = gunicorn_argv(f"127.0.0.1:{port}", workers, app="benchmarks.timed_app:app")
        argv[argv.index(GUNICORN_CONFIG)] = "python:benchmarks.timed_conf"
        server = start(app, port, env, os.path.join(tmp, "server.log"), argv=argv)
        try:
            url = f"http://127.0.0.1:{port}/v1/recommend"
            wrk(url, script, 3, 8)  # (warm-up: pages in the hot parts of the mapping)
            window = time.time()
            round_trip = wrk(url, script, duration, 1)["p50_ms"]
        finally:
            stop(server)
        calls = []
        for path in glob.glob(os.path.join(tmp, "*.txt")):
            with open(path) as f:
                for line in f:
                    started, seconds = map(float, line.split())
                    if started >= window:
                        calls.append(seconds)
        return calls, round_trip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_APPS: dict[str, object] = {}


def back_to_back(data_root: str, app_uri: str, same_user: bool, n: int = 2000) -> list[float]:
    """The durations of `n` calls of the app in this process, one after another (after 300)."""
    from falcon import testing

    from serving.auth import mint_token

    app = _APPS.get(app_uri)
    if app is None:  # (one app of each: the recommend runs share theirs, as a worker would)
        os.environ.update(server_env(data_root))
        if app_uri.startswith("serving"):
            from serving.app import create_app
        else:
            from benchmarks.trivial_app import create_app
        app = _APPS[app_uri] = create_app()
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer " + mint_token(SECRET, "bench", ["recommend"], 7200),
    }
    bodies = recommend_bodies(300 + n, seed=1)
    if same_user:
        bodies = [re.sub(rb'"user_id":"u\d+"', b'"user_id":"u0000042"', b) for b in bodies]
    environs = [
        testing.create_environ(path="/v1/recommend", method="POST", body=body, headers=headers)
        for body in bodies
    ]

    def start_response(status, _headers, exc_info=None):
        if not status.startswith("200"):
            raise RuntimeError(f"answered {status}")

    seconds = []
    for env in environs:
        t = time.perf_counter()
        b"".join(app(env, start_response))
        seconds.append(time.perf_counter() - t)
    return seconds[300:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", default=os.path.join(REPO, "data", "bench"))
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--duration", type=int, default=8, help="seconds of the measured window")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install -y wrk", file=sys.stderr)
        return 2
    data_root = os.path.abspath(args.data_root)
    ensure_snapshot(data_root, args.users, args.items)
    served = {}
    for name, app, same_user in RUNS:
        served[name] = timed_run(data_root, app, same_user, args.duration, args.workers, args.users)
    for name, app, same_user in RUNS:  # (after the servers: this process imports the apps)
        calls, round_trip = served[name]
        calls.sort()
        hot = statistics.median(back_to_back(data_root, app, same_user))
        print(
            f"{name}: the app {statistics.median(calls) * 1e6:.1f} us median, "
            f"{calls[int(len(calls) * 0.9)] * 1e6:.1f} us p90 inside the worker "
            f"({len(calls)} calls, {args.workers} workers; round trip {round_trip:.3f} ms "
            f"median); back to back in process {hot * 1e6:.1f} us median",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

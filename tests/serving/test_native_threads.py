"""The server's workers run NumPy's BLAS (and OpenMP) single-threaded: `serving.gunicorn_conf`
sets it up in the master before it forks them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, os, sys
from serving.gunicorn_conf import preload
import numpy  # noqa: F401  (loaded before the preload when the argument says so)
preload(reload=True)
from threadpoolctl import threadpool_info
read, write = os.pipe()
if os.fork() == 0:  # a worker
    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    os.write(write, json.dumps(blas).encode())
    os._exit(0)
os.close(write)
os.wait()
child = json.loads(os.read(read, 4096))
print(json.dumps({"child": child, "env": os.environ.get("OPENBLAS_NUM_THREADS")}))
"""


def probe(env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**env, **env_extra},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_forked_worker_has_one_blas_thread():
    got = probe({})
    assert got["child"] and all(n == 1 for n in got["child"]), got
    assert got["env"] == "1"


def test_an_operators_own_setting_is_kept():
    got = probe({"OPENBLAS_NUM_THREADS": "2"})
    assert got["env"] == "2"
    assert got["child"] and all(n == 2 for n in got["child"]), got

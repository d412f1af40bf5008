"""A WSGI app that times each call of another one, inside the server's worker
(`benchmarks/serve_app_time.py`).

``TIMED_APP`` names the app (``module:attribute``); each call's wall-clock start and duration
are kept in memory and written at the worker's exit to ``TIMED_APP_OUT/<pid>.txt`` (one
``start duration`` line a call, seconds), so that the runner can leave out a warm-up by time.
"""

from __future__ import annotations

import atexit
import importlib
import os
import time

_module, _attribute = os.environ["TIMED_APP"].split(":", 1)
_app = getattr(importlib.import_module(_module), _attribute)
_calls: list[tuple[float, float]] = []


def app(env, start_response):
    started = time.time()
    t = time.perf_counter()
    out = _app(env, start_response)
    _calls.append((started, time.perf_counter() - t))
    return out


@atexit.register
def _write() -> None:
    if _calls:
        path = os.path.join(os.environ["TIMED_APP_OUT"], f"{os.getpid()}.txt")
        with open(path, "w") as f:
            f.writelines(f"{start:.6f} {seconds:.9f}\n" for start, seconds in _calls)

"""gunicorn settings of the server: ``gunicorn -c python:serving.gunicorn_conf serving.wsgi:app``
(`recsys serve` and the benchmarks pass it: `serving.cli.gunicorn_argv`).

Its one hook, `on_starting`, runs in the master before any worker is forked and imports what
every worker would otherwise import (and compile) itself: NumPy, Numba, Falcon, orjson, PyJWT,
scikit-learn's text vectorizer and the serving modules up to `serving.app` - among them
`serving.kernels`, whose compiled kernels are built at import (from Numba's on-disk cache, or
compiled when the cache is empty or stale). The workers inherit them copy-on-write: none
compiles, none loads the cache, and the pages of the imported modules, of LLVM and of the
machine code are shared instead of private to each worker (private memory per worker outside
the snapshot mapping, 1M users x 100k items: 170 -> 55 MB when the cache was empty, 109 -> 49 MB
when it was warm).

It does not create the app, open a snapshot or start a thread: `serving.wsgi` (the app, its
snapshots and the threads of the event intake) is still imported by each worker. Nor does it
import the modules only the event routes need (Polars, DuckDB, PyArrow): importing Polars
starts its thread pool, which a forked child must not inherit.

The preload applies only to an app of this package (`serving.*`); another app under these
settings (the benchmarks' trivial endpoint) is left as it is. With ``--reload`` only the
third-party modules are preloaded, so that a worker restarted after a code change imports the
changed `serving` modules. (Likewise a ``HUP`` keeps the master's `serving` modules: deploy new
code by restarting, or with ``USR2``, which starts a new master.)

`preload` is also what `serving.granian_server` (``recsys serve --threads``) runs before
granian forks its workers.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import time

#: Imported by the master before forking (in this order; `serving.app` imports the rest).
THIRD_PARTY = (
    "numpy",
    "numba",
    "falcon",
    "orjson",
    "jwt",
    # (text embedding at request time, POST /v1/recs/embeddings/generate: recsys.content
    # imports it only where it is used, so that the pipelines' processes do not pay for it)
    "sklearn.feature_extraction.text",
)
SERVING = ("serving.kernels", "serving.app")

log = logging.getLogger("recsys.serving")

#: No request-line bound of gunicorn's own (its default, 4094 bytes, answers longer lines with an
#: HTML 400 before the app runs): the API's schemas bound every path and query parameter (ids
#: of <= 256 characters, which percent-encode to ~3 KB each; id lists), so any request the spec
#: allows gets the app's answer. A proxy in front bounds URIs for the deployment as a whole.
limit_request_line = 0


def serves_this_package(app_uri: str | None) -> bool:
    """Is the gunicorn app (``module:attribute``) one of this package's?"""
    return bool(app_uri) and app_uri.split(":", 1)[0].split(".", 1)[0] == "serving"


#: One thread per worker for the native pools (OpenBLAS/MKL, OpenMP): a worker answers one
#: request at a time, and pools of their own spin on every core the other workers need (the
#: exact content-vector search: 4.4 ms of CPU per call with OpenBLAS' default threads on two
#: cores, 1.0 ms single-threaded). An operator's own setting of these variables is kept.
NATIVE_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded_native_pools() -> None:
    """Set `NATIVE_THREAD_VARIABLES` to 1 where unset (read by each library as it loads:
    NumPy's OpenBLAS, faiss' OpenMP in a worker) and cap the pools loaded already (an embedding
    process that imported NumPy first) to as many threads; forked workers inherit both."""
    from threadpoolctl import threadpool_limits

    for name in NATIVE_THREAD_VARIABLES:
        os.environ.setdefault(name, "1")
    threadpool_limits(limits=int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")
    threadpool_limits(limits=int(os.environ["OMP_NUM_THREADS"]), user_api="openmp")


def preload(reload: bool = False) -> list[str]:
    """Import the modules the workers share (only the third-party ones when `reload`) with
    single-threaded native pools (`single_threaded_native_pools`), then move everything
    allocated so far out of the garbage collector's passes (`gc.freeze`), so that a collection
    in a worker does not write to - and so copy - the inherited pages. Returns the modules
    imported."""
    names = THIRD_PARTY if reload else THIRD_PARTY + SERVING
    single_threaded_native_pools()  # (before NumPy loads OpenBLAS, which reads the variable)
    for name in names:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()
    return list(names)


def on_starting(server) -> None:
    """gunicorn hook (master, before the listeners and workers): `preload` for our apps. A
    failure is logged and left to the workers, which import the same modules and report it
    the usual way."""
    app_uri = getattr(server.app, "app_uri", None) or server.cfg.wsgi_app
    if not serves_this_package(app_uri):
        return
    t0 = time.perf_counter()
    try:
        names = preload(reload=bool(server.cfg.reload))
    except Exception:  # noqa: BLE001 (the workers will fail the same import and say why)
        server.log.exception("preloading the serving modules failed; each worker imports them")
        return
    server.log.info(
        "preloaded %s in %.1f s (shared by the workers)", ", ".join(names), time.perf_counter() - t0
    )

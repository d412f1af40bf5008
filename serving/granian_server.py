"""`recsys serve --threads N`: the app under granian's WSGI server (a Rust HTTP/1.1 and HTTP/2
front), N threads per worker process running the app.

    python -m serving.granian_server --bind 127.0.0.1:8000 --workers 2 --threads 64

For event intake: concurrent event posts to one worker share one validation pass and one
fsync (the event log's group commit collects the threads that wait), which the sync workers
of plain `recsys serve` cannot do (one request at a time per process). Measured against the
alternatives with `benchmarks/events_ingest.py` (docs/serving.md, "Event intake"): server
CPU per single event about 0.8 of the thread-per-connection gunicorn worker this replaced and
about 0.4 of gunicorn's gthread worker, in the same minutes.

Like `serving.gunicorn_conf` for gunicorn, the parent process imports the modules the workers
share (`preload`: NumPy, Numba, Falcon, the serving modules and their compiled kernels)
before the workers are forked, so none compiles or loads the kernels itself; the app, its
snapshots and its threads are still made by each worker (`serving.wsgi`). Workers that die
are started again; on SIGTERM or SIGINT the workers finish the requests in progress (at most
`GRACEFUL_S`) and exit.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing

from serving.gunicorn_conf import preload, serves_this_package

#: Seconds the workers get to finish their requests on SIGTERM before they are killed.
GRACEFUL_S = 10

log = logging.getLogger("recsys.serving")


def serve(bind: str, workers: int, threads: int, app: str = "serving.wsgi:app") -> None:
    """Run granian (WSGI, `workers` processes x `threads` app threads) on `bind`
    (``host:port``) until it is stopped; preloads this package's modules first."""
    from granian import Granian
    from granian.constants import Interfaces
    from granian.log import LogLevels

    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--bind must be host:port, not {bind!r}")
    if serves_this_package(app):
        # the workers are forked from this process (granian uses multiprocessing), so they
        # inherit what it imported
        if multiprocessing.get_start_method() != "fork":
            log.warning("workers are not forked: each imports the serving modules itself")
        preload()
    Granian(
        app,
        address=host.strip("[]"),
        port=int(port),
        interface=Interfaces.WSGI,
        workers=workers,
        blocking_threads=threads,
        backlog=2048,
        log_level=LogLevels.warning,
        respawn_failed_workers=True,
        workers_kill_timeout=GRACEFUL_S,
    ).serve()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serving.granian_server", description=__doc__)
    ap.add_argument("--bind", default="127.0.0.1:8000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=64)
    ap.add_argument("--app", default="serving.wsgi:app")
    args = ap.parse_args(argv)
    serve(args.bind, args.workers, args.threads, args.app)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""gunicorn settings of `benchmarks/serve_app_time.py`: the server's own
(`serving.gunicorn_conf`), with its preload in the master for the timed wrapper too (whose
app, `benchmarks.timed_app`, is not one of the `serving` package's, so the server's hook would
leave it to each worker)."""

from __future__ import annotations

import os

from serving.gunicorn_conf import limit_request_line, preload, serves_this_package  # noqa: F401


def on_starting(server) -> None:
    if serves_this_package(os.environ.get("TIMED_APP")):
        preload()

"""`recsys token` and `recsys serve`: `register(subparsers)` adds them to the project CLI."""

from __future__ import annotations

import argparse
import os
import sys

from recsys.tenancy import tenant_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `token` and `serve` sub-commands (each sets `func(args) -> int`)."""
    tok = subparsers.add_parser("token", help="mint a development JWT for the serving API")
    tok.add_argument(
        "--tenant", required=True, type=tenant_arg, help="tenant the token grants access to"
    )
    tok.add_argument(
        "--scope",
        action="append",
        choices=["recommend", "admin"],
        help="scope (repeatable; default: recommend)",
    )
    tok.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    tok.add_argument("--subject", help="the token's sub claim (default dev-<tenant>)")
    tok.add_argument("--secret", help="HS256 secret (default: $RECSYS_JWT_SECRET)")
    tok.add_argument("--private-key", help="PEM file of an RS256 private key (instead of a secret)")
    tok.set_defaults(func=_token)

    srv = subparsers.add_parser(
        "serve", help="run the Falcon API under gunicorn (or granian, with --threads)"
    )
    srv.add_argument("--bind", default="127.0.0.1:8000", help="host:port (default 127.0.0.1:8000)")
    srv.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    srv.add_argument("--timeout", type=int, default=30, help="gunicorn's worker timeout in seconds")
    srv.add_argument(
        "--threads",
        type=int,
        default=1,
        help="app threads per worker; 1: gunicorn's sync workers (for /v1/recommend); >1: "
        "granian's WSGI server (serving.granian_server: better for event collection, whose "
        "validation and fsync are then shared by concurrent requests)",
    )
    srv.add_argument("--data-root", help="sets RECSYS_DATA_ROOT for the server")
    srv.add_argument(
        "--reload", action="store_true", help="restart on code changes (development; gunicorn)"
    )
    srv.set_defaults(func=_serve)

    ev = subparsers.add_parser("events", help="the API's durable event log")
    ev_sub = ev.add_subparsers(dest="events_command", required=True)
    flush = ev_sub.add_parser(
        "flush", help="land every acknowledged API event as Parquet for the ingest sensor now"
    )
    flush.add_argument(
        "--tenant", action="append", type=tenant_arg, help="tenant (repeatable; default: all)"
    )
    flush.set_defaults(func=_flush_events)


def _token(args: argparse.Namespace) -> int:
    from serving.auth import mint_token

    scopes = args.scope or ["recommend"]
    if args.private_key:
        with open(args.private_key, encoding="utf-8") as f:
            key, alg = f.read(), "RS256"
    else:
        key, alg = args.secret or os.environ.get("RECSYS_JWT_SECRET"), "HS256"
        if not key:
            print(
                "error: give --secret or set RECSYS_JWT_SECRET (or use --private-key)",
                file=sys.stderr,
            )
            return 2
    print(mint_token(key, args.tenant, scopes, args.ttl, subject=args.subject, algorithm=alg))
    return 0


def _flush_events(args: argparse.Namespace) -> int:
    from recsys.storage import default_root
    from serving.events_log import flush_events

    root = getattr(args, "data_root", None) or default_root()
    landed = flush_events(root, args.tenant)
    for tenant, files in landed.items():
        print(f"{tenant}: {len(files)} event file(s) landed")
    if not landed:
        print(f"no event logs under {root}/serving/events")
    return 0


#: The gunicorn settings module (serving/gunicorn_conf.py: the master imports and compiles what
#: the workers share before forking them).
GUNICORN_CONFIG = "python:serving.gunicorn_conf"


def gunicorn_argv(
    bind: str,
    workers: int,
    timeout: int = 30,
    reload: bool = False,
    app: str = "serving.wsgi:app",
    threads: int = 1,
    worker_class: str | None = None,
) -> list[str]:
    """The gunicorn command line `recsys serve` runs (also used by the benchmarks): sync
    workers, or gunicorn's gthread worker when threads > 1 (unless `worker_class` names
    another; `recsys serve --threads` runs `granian_argv` instead: less CPU per event). The
    settings module `GUNICORN_CONFIG` preloads the serving modules (and the compiled kernels)
    in the master when `app` is one of this package's."""
    worker_class = worker_class or ("gthread" if threads > 1 else "sync")
    argv = [
        sys.executable,
        "-m",
        "serving.gunicorn_server",  # (gunicorn's command line: serving.gunicorn_server)
        app,
        "--config",
        GUNICORN_CONFIG,
        "--bind",
        bind,
        "--workers",
        str(workers),
        "--worker-class",
        worker_class,
        "--timeout",
        str(timeout),
        "--graceful-timeout",
        "10",
        "--keep-alive",
        "5",
        "--log-level",
        "warning",
    ]
    if threads > 1:
        argv += ["--threads", str(threads)]
    if reload:
        argv.append("--reload")
    return argv


def granian_argv(bind: str, workers: int, threads: int, app: str = "serving.wsgi:app") -> list[str]:
    """The command line of `recsys serve --threads N` (N > 1): granian's WSGI server with N app
    threads per worker, the serving modules preloaded (`serving.granian_server`)."""
    return [
        sys.executable,
        "-m",
        "serving.granian_server",
        "--bind",
        bind,
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--app",
        app,
    ]


def _serve(args: argparse.Namespace) -> int:
    from serving.config import ServingConfig

    if args.data_root:
        os.environ["RECSYS_DATA_ROOT"] = args.data_root
    try:  # a bad setting (an API key of an invalid tenant id, ...) stops here, in one line
        ServingConfig.from_env()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads > 1:
        if args.reload:
            print("error: --reload needs the gunicorn server (--threads 1)", file=sys.stderr)
            return 2
        argv = granian_argv(args.bind, args.workers, args.threads)
    else:
        argv = gunicorn_argv(args.bind, args.workers, args.timeout, args.reload)
    os.execv(argv[0], argv)  # replaces this process; the server handles signals from here on
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m serving.cli``) until the lead wires `register`."""
    parser = argparse.ArgumentParser(prog="recsys-serving")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

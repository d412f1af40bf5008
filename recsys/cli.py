"""The `recsys` command line: import data, make demo data, run the pipeline, manage snapshots.

Each command prints a short summary; user mistakes (a missing file, a bad option, an empty
input) end with a one-line message and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import posixpath
import sys
import time
from collections.abc import Callable

from recsys.contract import DEFAULT_TENANT
from recsys.errors import EmptyInputError, RecsysError
from recsys.storage import Storage, default_root
from recsys.tenancy import tenant_arg

#: Modules that add their own sub-commands through `register(subparsers)`.
COMMAND_MODULES: tuple[str, ...] = (
    "recsys.snapshot.cli",
    "serving.cli",
    "recsys.outbox",
    "recsys.connectors",
    "serving.control.audit",
)


def _progress(label: str, quiet: bool) -> Callable[[int, int], None]:
    started = time.perf_counter()

    def report(done: int, total: int) -> None:
        if quiet:
            return
        rate = done / max(time.perf_counter() - started, 1e-9)
        end = "\n" if done >= total else ""
        print(
            f"\r{label}: {done:,}/{total:,} ({100 * done / total:.0f}%, {rate:,.0f}/s)",
            end=end,
            file=sys.stderr,
            flush=True,
        )

    return report


def _parse_mapping(pairs: list[str]) -> dict[str, str]:
    mapping = {}
    for pair in pairs:
        if "=" not in pair:
            raise RecsysError(f"--map expects SOURCE=CONTRACT_COLUMN, got {pair!r}")
        src, dst = pair.split("=", 1)
        mapping[src.strip()] = dst.strip()
    return mapping


def cmd_import(args: argparse.Namespace) -> int:
    from recsys.ingest import import_file
    from recsys.readers import TextLayout
    from serving.documents import declared_event_types

    layout = None
    if args.delimiter or args.no_header or args.columns or args.encoding:
        delimiter = {"tab": "\t", "\\t": "\t"}.get(args.delimiter or "", args.delimiter)
        layout = TextLayout(
            delimiter=delimiter or ("\t" if args.format == "tsv" else ","),
            has_header=not args.no_header,
            column_names=tuple(args.columns.split(",")) if args.columns else None,
            encoding=args.encoding or "utf-8",
        )
    storage = Storage(args.data_root)
    try:
        result = import_file(
            storage,
            args.kind,
            args.file,
            tenant=args.tenant,
            adapter=args.adapter,
            fmt=args.format,
            layout=layout,
            mapping=_parse_mapping(args.map),
            # (the types the tenant declared, as the ingest will take them: no false rejects)
            extra_event_types=declared_event_types(storage, args.tenant),
        )
    except EmptyInputError as exc:
        print(f"nothing to import: {exc}", file=sys.stderr)
        return 2
    bad = sum(result.would_reject.values()) + result.unparsable
    where = os.path.relpath(result.landed) if storage.is_local else result.landed
    if not result.pending:  # (imported before, and ingested since: moved out of landing)
        print(
            f"{result.rows:,} {args.kind} rows from {args.file} were imported before as "
            f"{posixpath.basename(where)} and have been ingested since; nothing landed"
        )
        return 0
    verb = "already landed as" if result.already_landed else "landed"
    print(f"{result.rows:,} {args.kind} rows from {args.file} {verb} {where}")
    if bad:
        reasons = dict(result.would_reject)
        if result.unparsable:
            reasons["unparsable"] = reasons.get("unparsable", 0) + result.unparsable
        detail = ", ".join(f"{k}: {v:,}" for k, v in sorted(reasons.items()))
        print(
            f"{bad:,} rows will be rejected at ingest ({detail}); see rejected_{args.kind} "
            f"after the next run"
        )
    print("the landing sensor (or `recsys run`) ingests it")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from recsys.demo import DemoSpec, generate

    kwargs = {"events": args.events, "seed": args.seed, "days": args.days, "tenant": args.tenant}
    if args.end_date:
        kwargs["end_date"] = args.end_date
    if args.items:
        kwargs["items"] = args.items
    if args.users:
        kwargs["users"] = args.users
    if args.events <= 0:
        raise RecsysError("--events must be positive")
    spec = DemoSpec(**kwargs)
    started = time.perf_counter()
    summary = generate(
        spec,
        Storage(args.data_root),
        _progress("demo events", args.quiet),
        overwrite=args.overwrite,
    )
    if summary.skipped:
        if not args.quiet:
            print(
                f"demo data for seed {spec.seed} and {spec.events:,} events is already in "
                f"landing/{spec.tenant}/ (use --overwrite to write it again)"
            )
        return 0
    if not args.quiet:
        print(
            f"wrote {summary.events_written:,} events ({summary.malformed:,} malformed, "
            f"{summary.duplicates:,} resent duplicates on purpose), {summary.items:,} items, "
            f"{summary.users:,} users for {summary.start[:10]}..{summary.end[:10]} into "
            f"landing/{spec.tenant}/ in {time.perf_counter() - started:.1f}s"
        )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    os.environ.setdefault("RECSYS_DATA_ROOT", args.data_root)
    from recsys.runner import run_job

    return run_job(args.job, quiet=args.quiet, log_level="DEBUG" if args.verbose else "WARNING")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        dest="global_data_root",
        default=default_root(),
        help="data folder or fsspec URI (env RECSYS_DATA_ROOT, default ./data)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import", help="land a CSV/TSV/NDJSON/Parquet file for ingest")
    p.add_argument("kind", choices=["events", "items", "users"])
    p.add_argument("file")
    p.add_argument("--tenant", default=DEFAULT_TENANT, type=tenant_arg)
    from recsys.adapters import ADAPTER_NAMES

    p.add_argument(
        "--adapter",
        choices=[*ADAPTER_NAMES, "generic"],
        help="a ready-made mapping (guessed from well-known file names)",
    )
    p.add_argument("--format", choices=["csv", "tsv", "ndjson", "parquet"])
    p.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="SOURCE=COLUMN",
        help="rename a source column to a contract column (repeatable)",
    )
    p.add_argument("--delimiter")
    p.add_argument("--no-header", action="store_true")
    p.add_argument("--columns", help="comma-separated column names for files without a header")
    p.add_argument("--encoding")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("demo-data", help="generate the deterministic demo data set into landing")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--items", type=int)
    p.add_argument("--users", type=int)
    p.add_argument("--days", type=int, default=60)
    p.add_argument("--end-date", help="last day of the data (YYYY-MM-DD, default today)")
    p.add_argument("--tenant", default=DEFAULT_TENANT, type=tenant_arg)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("run", help="run a Dagster job in-process on the DAGSTER_HOME instance")
    p.add_argument("--job", default="recsys_pipeline")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print Dagster's step log")
    p.set_defaults(func=cmd_run)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # a sub-command's own --data-root wins; otherwise the global one applies
    if getattr(args, "data_root", None) is None:
        args.data_root = args.global_data_root
    try:
        return int(args.func(args) or 0)
    except RecsysError as exc:
        print(f"recsys {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

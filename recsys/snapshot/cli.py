"""`recsys snapshot list|rollback|diff|fetch`: inspect and switch the published serving snapshots.

The main CLI wires it with ``recsys.snapshot.cli.register(subparsers, default_data_root=...)``;
every sub-command sets ``args.func(args) -> int`` (the exit code). Runnable alone as
``python -m recsys.snapshot.cli``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence

from recsys.contract import DEFAULT_TENANT
from recsys.snapshot.reader import SnapshotError
from recsys.snapshot.store import SnapshotStore
from recsys.storage import Storage, default_root
from recsys.tenancy import tenant_arg


def register(
    subparsers: argparse._SubParsersAction, default_data_root: str | None = None
) -> argparse.ArgumentParser:
    """Add the `snapshot` command (with list, rollback, diff) to an argparse subparsers object."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--data-root",
        default=default_data_root,
        help="data root (default: $RECSYS_DATA_ROOT or ./data)",
    )
    parent.add_argument(
        "--tenant", default=DEFAULT_TENANT, type=tenant_arg, help="tenant (default: %(default)s)"
    )
    parent.add_argument("--json", action="store_true", help="print JSON instead of a table")

    snap = subparsers.add_parser("snapshot", help="list, roll back or compare serving snapshots")
    sub = snap.add_subparsers(dest="snapshot_command", metavar="{list,rollback,diff,fetch}")
    sub.required = True

    p = sub.add_parser("list", parents=[parent], help="published snapshots, newest first")
    p.set_defaults(func=_friendly(_list))

    p = sub.add_parser(
        "rollback",
        parents=[parent],
        help="make an older snapshot live (default: the one before the current)",
    )
    p.add_argument("snapshot_id", nargs="?", help="snapshot to switch to")
    p.set_defaults(func=_friendly(_rollback))

    p = sub.add_parser(
        "diff", parents=[parent], help="how many users' top-k differ between two snapshots"
    )
    p.add_argument("a", nargs="?", help="first snapshot (default: the one before the current)")
    p.add_argument("b", nargs="?", help="second snapshot (default: the current one)")
    p.add_argument("-k", type=int, default=10, help="list length compared (default: %(default)s)")
    p.set_defaults(func=_friendly(_diff))

    p = sub.add_parser(
        "fetch",
        parents=[parent],
        help="copy the live snapshot from another data root (any fsspec URI) to this one, "
        "verified by its checksums, and make it live here",
    )
    p.add_argument("--from", dest="source", required=True, help="the pipeline's data root URI")
    p.add_argument("--snapshot", help="snapshot id (default: the source's CURRENT)")
    p.set_defaults(func=_friendly(_fetch))
    return snap


def _fetch(args: argparse.Namespace) -> int:
    from recsys.snapshot.fetch import fetch_snapshot

    res = fetch_snapshot(Storage(args.source), args.tenant, _store(args), args.snapshot)
    if args.json:
        print(json.dumps(res.__dict__))
    elif res.copied_bytes:
        print(f"{res.snapshot_id}: fetched {res.copied_bytes:,} bytes, verified, live")
    else:
        print(f"{res.snapshot_id}: already here, verified, live")
    return 0


def _friendly(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected failures (bad id, damaged snapshot, unreadable folder) -> one line on stderr, 1."""

    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        try:
            return int(handler(args))
        except (SnapshotError, ValueError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1

    return wrapped


def _store(args: argparse.Namespace) -> SnapshotStore:
    storage = Storage(args.data_root or default_root())
    return SnapshotStore(storage.snapshots_dir(args.tenant))


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    infos = store.list()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "snapshot_id": s.snapshot_id,
                        "created_at": s.created_at.isoformat(),
                        "current": s.is_current,
                        "bytes": s.bytes,
                        "counts": s.counts,
                    }
                    for s in infos
                ]
            )
        )
        return 0
    if not infos:
        print(f"no snapshots for tenant {args.tenant!r} in {store.root}")
        return 0
    print(f"{'':2}{'snapshot':34} {'created (UTC)':20} {'users':>10} {'items':>9} {'size':>10}")
    for s in infos:
        mark = "* " if s.is_current else "  "
        created = s.created_at.strftime("%Y-%m-%d %H:%M:%S")
        print(
            f"{mark}{s.snapshot_id:34} {created:20} {s.counts.get('users', 0):>10,} "
            f"{s.counts.get('items', 0):>9,} {_human_bytes(s.bytes):>10}"
        )
    return 0


def _rollback(args: argparse.Namespace) -> int:
    store = _store(args)
    before = store.current_id()
    new = store.rollback(args.snapshot_id)
    if args.json:
        print(json.dumps({"previous": before, "current": new}))
    else:
        print(f"tenant {args.tenant!r}: live snapshot {before} -> {new}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.k < 1:
        raise SnapshotError("-k must be at least 1")
    a, b = args.a, args.b
    if b is None:
        b = store.current_id()
        if b is None:
            raise SnapshotError(f"no current snapshot for tenant {args.tenant!r}")
    if a is None:
        older = [s for s in store.ids() if s < b]
        if not older:
            raise SnapshotError(f"no snapshot older than {b} to compare with")
        a = older[-1]
    known = set(store.ids())
    for sid in (a, b):
        if sid not in known:
            raise SnapshotError(f"unknown snapshot {sid!r}; see `recsys snapshot list`")
    report = store.diff(a, b, k=args.k)
    if args.json:
        print(json.dumps({**report.__dict__, "changed_fraction": report.changed_fraction}))
        return 0
    print(f"{report.a} -> {report.b} (top-{report.k})")
    print(f"  users compared        {report.users_compared:,}")
    print(
        f"  top-{report.k} changed         {report.users_changed:,} ({report.changed_fraction:.1%})"
    )
    print(f"  mean overlap          {report.mean_overlap:.1%}")
    print(f"  users only in a / b   {report.users_only_in_a:,} / {report.users_only_in_b:,}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="recsys")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

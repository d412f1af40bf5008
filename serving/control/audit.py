"""The audit log: an append-only, hash-chained record of every write on an admin route.

Every non-GET request on a route of scope ``admin`` (the admin and control-plane routes) is
recorded by `AuditHook.after`, which `serving.middleware.ServingMiddleware.process_response`
calls for each such request whatever its answer, refused ones (4xx: scope, X-Org-Id, 409/412,
schema violations, 429 ...) included. A request refused before its caller was known (401: no or
bad credentials) has no tenant to be recorded for; the access log keeps those.

An entry says who (the credential's subject: ``jwt:<sub>``, ``key:<key id>`` of a stored key,
``key:<first 8 chars>`` of an environment key), the tenant, the method and route template (and
the path), the status, the request id, when, and what the handler put on
``req.context.audit``: ``{"target": "<kind>/<id>", "before": <revision|None>, "after": ...}``.

Storage: one SQLite file per tenant, ``<data root>/serving/audit/<tenant>.sqlite`` (WAL,
``synchronous=FULL``: each entry is on disk before the answer leaves). An append is one
``BEGIN IMMEDIATE`` transaction - SQLite's write lock, shared by every gunicorn worker and
process on the host - which reads the last entry's hash, and inserts the new entry with
``prev`` = that hash and ``hash`` = SHA-256 of the entry's canonical encoding (`_canonical`:
every column but ``hash``, in a fixed order, as JSON). `verify` recomputes the chain from the
first entry: an edited column, a removed or inserted row, or a re-ordering breaks it at the
first entry touched, which it reports. (Cutting entries off the end leaves a valid, shorter
chain: compare the last hash with one kept elsewhere to detect that.)

`AuditLog.query` reads entries by time, actor and route with a cursor (the entry's sequence
number) for `GET /v1/recs/audit/logs`; ``recsys audit verify`` runs `verify`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from recsys.tenancy import check_tenant

log = logging.getLogger("recsys.serving")

GENESIS = "0" * 64  # the `prev` of a chain's first entry
COLUMNS = (
    "seq",
    "ts",
    "tenant",
    "actor",
    "method",
    "route",
    "path",
    "status",
    "request_id",
    "target",
    "before",
    "after",
    "prev",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts TEXT NOT NULL,
    tenant TEXT NOT NULL,
    actor TEXT NOT NULL,
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    request_id TEXT,
    target TEXT,
    before TEXT,
    after TEXT,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_ts ON audit (ts);
CREATE INDEX IF NOT EXISTS audit_actor ON audit (actor, seq);
CREATE INDEX IF NOT EXISTS audit_route ON audit (route, seq);
"""
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def _canonical(row: tuple[Any, ...]) -> bytes:
    """The bytes an entry's hash covers: its columns but the hash, in `COLUMNS` order."""
    return orjson.dumps(list(row))


def entry_hash(row: tuple[Any, ...]) -> str:
    return hashlib.sha256(_canonical(row)).hexdigest()


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Broken:
    """The first entry where a chain does not hold: its sequence number and why."""

    seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class Verified:
    entries: int
    last_hash: str
    broken: Broken | None

    @property
    def ok(self) -> bool:
        return self.broken is None


def _set_wal(conn: sqlite3.Connection, deadline: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the file: SQLite
    answers that pragma "database is locked" at once, without its busy timeout, when two
    workers open a new log together (seen in CI). Once one has set it, it is a no-op."""
    pause = 0.005
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as ex:
            if "locked" not in str(ex) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.2)


class AuditLog:
    """The audit files under ``<root>`` (``<data root>/serving/audit``): one per tenant."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self._local = threading.local()  # this thread's connections: {tenant: connection}

    def path(self, tenant: str) -> str:
        return os.path.join(self.root, check_tenant(tenant) + ".sqlite")

    def _connection(self, tenant: str) -> sqlite3.Connection:
        conns = getattr(self._local, "conns", None)
        pid = os.getpid()
        if conns is None or self._local.pid != pid:  # (never a connection of the parent)
            conns = self._local.conns = {}
            self._local.pid = pid
        conn = conns.get(tenant)
        if conn is None:
            os.makedirs(self.root, exist_ok=True)
            conn = sqlite3.connect(self.path(tenant), timeout=30.0, isolation_level=None)
            _set_wal(conn, deadline=time.monotonic() + 30.0)
            conn.execute("PRAGMA synchronous=FULL")
            conn.executescript(_SCHEMA)
            conns[tenant] = conn
        return conn

    def append(
        self,
        tenant: str,
        actor: str,
        method: str,
        route: str,
        path: str,
        status: int,
        request_id: str | None,
        target: str | None = None,
        before: str | None = None,
        after: str | None = None,
        ts: str | None = None,
    ) -> tuple[int, str]:
        """Append one entry (under the file's write lock); its (sequence number, hash)."""
        conn = self._connection(tenant)
        conn.execute("BEGIN IMMEDIATE")
        try:
            last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (last[0] + 1, last[1]) if last else (1, GENESIS)
            row = (
                seq,
                ts or now_iso(),
                tenant,
                actor,
                method,
                route,
                path,
                int(status),
                request_id,
                target,
                before,
                after,
                prev,
            )
            digest = entry_hash(row)
            conn.execute(
                f"INSERT INTO audit ({', '.join(COLUMNS)}, hash) VALUES ({', '.join('?' * 14)})",
                (*row, digest),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return seq, digest

    def query(
        self,
        tenant: str,
        *,
        since: str | None = None,
        until: str | None = None,
        actor: str | None = None,
        route: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Entries in sequence order after `after_seq` (the cursor), filtered: `since` <= ts <
        `until` (ISO-8601 UTC text), the exact actor and route template."""
        if not os.path.exists(self.path(tenant)):
            return []
        where, args = ["seq > ?"], [after_seq]
        for clause, value in (
            ("ts >= ?", since),
            ("ts < ?", until),
            ("actor = ?", actor),
            ("route = ?", route),
        ):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = (
            f"SELECT {', '.join(COLUMNS)}, hash FROM audit WHERE {' AND '.join(where)} "
            "ORDER BY seq LIMIT ?"
        )
        cursor = self._connection(tenant).execute(sql, (*args, limit))
        return [dict(zip((*COLUMNS, "hash"), row, strict=True)) for row in cursor]

    def tenants(self) -> list[str]:
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        return sorted(n[: -len(".sqlite")] for n in names if n.endswith(".sqlite"))

    def verify(self, tenant: str) -> Verified:
        return verify_file(self.path(tenant))


def _rows(path: str) -> Iterator[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        yield from conn.execute(f"SELECT {', '.join(COLUMNS)}, hash FROM audit ORDER BY seq")
    finally:
        conn.close()


def verify_file(path: str) -> Verified:
    """Walk a tenant's chain from its first entry; the first entry that does not hold."""
    prev, expected_seq, count = GENESIS, 1, 0
    for row in _rows(path):
        *fields, digest = row
        seq = fields[0]
        if seq != expected_seq:
            return Verified(count, prev, Broken(seq, f"sequence gap: expected {expected_seq}"))
        if fields[-1] != prev:
            return Verified(count, prev, Broken(seq, "prev is not the hash of the entry before"))
        if entry_hash(tuple(fields)) != digest:
            return Verified(count, prev, Broken(seq, "content does not match its hash"))
        prev, expected_seq, count = digest, seq + 1, count + 1
    return Verified(count, prev, None)


class AuditHook:
    """What `ServingMiddleware` calls after every request: records the writes of admin routes.

    `scope_of(method, path)` finds the scope of a request that was refused before routing (its
    resource unknown to the middleware) from the route table (`serving.routes.ROUTES`).
    """

    def __init__(self, log_: AuditLog) -> None:
        self.log = log_
        self._router = None

    def _route_of(self, method: str, path: str) -> tuple[str | None, str | None]:
        """(scope, template) of the table's route for `method` and `path`."""
        if self._router is None:
            from falcon.routing import CompiledRouter

            from serving.routes import ROUTES

            router = CompiledRouter()
            scopes: dict[str, dict[str, str | None]] = {}
            for r in ROUTES:
                scopes.setdefault(r.path, {})[r.method] = r.scope
            for template, by_method in scopes.items():
                router.add_route(template, _Scopes(by_method))
            self._router = router
        found = self._router.find(path.rstrip("/") or "/")
        if found is None:
            return None, None
        resource, _, _, template = found
        return resource.required_scope.get(method), template

    def after(self, req, resp, resource) -> None:
        """Record `req` when it is a write on an admin route by a known caller."""
        method = req.method
        if method not in _WRITES:
            return
        ctx = req.context
        principal = getattr(ctx, "principal", None)
        if principal is None:
            return
        template = req.uri_template
        scope = getattr(resource, "required_scope", None) if resource is not None else None
        if isinstance(scope, dict):
            scope = scope.get(method)
        if resource is None or template is None:
            scope, template = self._route_of(method, req.path)
        if scope != "admin":
            return
        change = getattr(ctx, "audit", None) or {}
        try:
            self.log.append(
                principal.tenant,
                principal.subject,
                method,
                template or "unmatched",
                req.path,
                resp.status_code,
                getattr(ctx, "request_id", None),
                change.get("target"),
                change.get("before"),
                change.get("after"),
            )
        except Exception:  # the answer is decided; make the lost entry loud in the logs
            log.exception(
                "audit entry not written: %s %s by %s (%s)",
                method,
                req.path,
                principal.subject,
                principal.tenant,
            )


@dataclass(frozen=True, slots=True)
class _Scopes:
    required_scope: dict[str, str | None]


# --- `recsys audit verify` -----------------------------------------------------------------------
def register(subparsers) -> None:
    """Add ``recsys audit verify [--tenant T]`` (exit 1 when a chain is broken)."""
    audit = subparsers.add_parser("audit", help="the audit log of admin writes")
    sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = sub.add_parser("verify", help="verify each tenant's hash chain")
    verify.add_argument("--tenant", help="one tenant (default: every tenant with a log)")
    verify.add_argument("--data-root", dest="data_root", default=None)
    verify.set_defaults(func=_cmd_verify)


def _cmd_verify(args) -> int:
    log_ = AuditLog(os.path.join(args.data_root, "serving", "audit"))
    tenants = [args.tenant] if args.tenant else log_.tenants()
    if not tenants:
        print("no audit logs")
        return 0
    bad = 0
    for tenant in tenants:
        if not os.path.exists(log_.path(tenant)):
            print(f"{tenant}: no audit log")
            bad += 1
            continue
        result = log_.verify(tenant)
        if result.ok:
            print(f"{tenant}: ok, {result.entries} entries, last hash {result.last_hash}")
        else:
            broken = result.broken
            print(
                f"{tenant}: BROKEN at entry {broken.seq}: {broken.reason} "
                f"({result.entries} entries verified before it)"
            )
            bad += 1
    return 1 if bad else 0

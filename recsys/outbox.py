"""The webhook outbox: events are written durably first, then delivered, signed, at least once.

Data flow::

    emit(data_root, tenant, type, payload)      (the deploy path, the Dagster run-status sensor)
        -> messages row in <data root>/serving/outbox.db     (SQLite WAL, fsync'd at commit)
    Deliverer (`recsys webhooks deliver`, one per data root: it holds outbox.db.lock)
        -> fans each new message out to the tenant's subscribed, enabled endpoints
           (the webhooks documents, <data root>/serving/webhooks/<tenant>/<id>.json)
        -> POSTs each due delivery from a thread pool, signed per Standard Webhooks
           (webhook-id = the message id, the same on every attempt; webhook-timestamp;
           webhook-signature = v1,base64(HMAC-SHA256(secret, "id.timestamp.body")))
        -> 2xx: delivered; anything else: retried with exponential backoff and jitter;
           `disable_after` failures in a row disable the endpoint (its pending deliveries
           are skipped) -- all of it recorded per endpoint and per attempt.

`emit` returns once the message is on disk, so a crash after it loses nothing; the deliverer
records an attempt's outcome only after it, so a kill -9 between the POST and the record sends
that message again, with the same webhook-id and body (receivers drop duplicates by id).
A slow or unreachable endpoint never blocks the others: every request has a timeout, and at most
`per_endpoint` deliveries of one endpoint are in flight at a time.

This module imports neither falcon nor dagster: the serving process (which reads the delivery
log for ``GET /v1/recs/webhooks``) and the pipelines both call it.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import fcntl
import os
import random
import secrets
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import urllib3

from recsys.tenancy import check_tenant, is_valid_tenant

#: The event types an endpoint can subscribe to.
EVENT_TYPES: tuple[str, ...] = (
    "job.completed",
    "job.failed",
    "model.deployed",
    "model.rolled_back",
    "experiment.completed",
)
SECRET_PREFIX = "whsec_"
#: Where the webhook endpoint documents live under ``<data root>/serving`` (the serving layer's
#: document store writes them: ``{"id", "revision", "created_at", "updated_at", "body"}``).
ENDPOINTS_FOLDER = "webhooks"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    type TEXT NOT NULL,
    body BLOB NOT NULL,
    created_at REAL NOT NULL,
    fanned_out INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_new ON messages (fanned_out) WHERE fanned_out = 0;
CREATE TABLE IF NOT EXISTS deliveries (
    message_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    created_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    delivered_at REAL,
    PRIMARY KEY (message_id, endpoint_id)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_endpoint ON deliveries (tenant, endpoint_id, created_at);
CREATE TABLE IF NOT EXISTS attempts (
    message_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    at REAL NOT NULL,
    status INTEGER,
    error TEXT,
    duration_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_endpoint ON attempts (tenant, endpoint_id, at);
CREATE TABLE IF NOT EXISTS endpoints (
    tenant TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    failures_in_a_row INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    last_attempt_at REAL,
    last_success_at REAL,
    disabled_at REAL,
    disabled_reason TEXT,
    PRIMARY KEY (tenant, endpoint_id)
);
"""


def outbox_path(data_root: str) -> str:
    """``<data root>/serving/outbox.db`` (the data root must be a local folder: SQLite)."""
    if "://" in data_root and not data_root.startswith("file://"):
        raise ValueError(f"the webhook outbox needs a local data root, not {data_root!r}")
    root = data_root.removeprefix("file://")
    return os.path.join(root, "serving", "outbox.db")


def new_secret() -> str:
    """A signing secret as Standard Webhooks writes them: ``whsec_`` + base64 of 32 bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def new_message_id() -> str:
    """``msg_<time><random>``: unique, roughly ordered by time."""
    return f"msg_{time.time_ns():x}{uuid.uuid4().hex[:12]}"


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Outbox:
    """The outbox database of one data root. Thread-safe: one SQLite connection per thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self._db().executescript(_SCHEMA)  # (executescript commits on its own)

    @classmethod
    def of(cls, data_root: str) -> Outbox:
        return cls(outbox_path(data_root))

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            self._local.db = db
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # --- writing -------------------------------------------------------------------------------
    def emit(
        self, tenant: str, event_type: str, payload: dict[str, Any], msg_id: str | None = None
    ) -> str:
        """Record one event for the tenant's endpoints; returns its message id once it is on
        disk. The body every endpoint receives is fixed here:
        ``{"type", "timestamp", "data": payload}``. With `msg_id`, emitting it again is a
        no-op (an idempotent producer, such as a sensor re-run, passes a stable id)."""
        check_tenant(tenant)
        if event_type not in EVENT_TYPES:
            raise ValueError(f"unknown webhook event type {event_type!r}: one of {EVENT_TYPES}")
        now = time.time()
        msg_id = msg_id or new_message_id()
        body = orjson.dumps({"type": event_type, "timestamp": _iso(now), "data": payload})
        with self.transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO messages (id, tenant, type, body, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (msg_id, tenant, event_type, body, now),
            )
        return msg_id

    def forget_endpoint(self, tenant: str, endpoint_id: str) -> None:
        """An endpoint was deleted: its pending deliveries are cancelled."""
        with self.transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'cancelled', last_error = 'endpoint deleted'"
                " WHERE tenant = ? AND endpoint_id = ? AND state = 'pending'",
                (tenant, endpoint_id),
            )

    def prune(self, keep_days: float) -> int:
        """Forget messages older than `keep_days` whose deliveries are all finished (and
        attempts that old); returns how many messages went."""
        cutoff = time.time() - keep_days * 86400
        with self.transaction() as db:
            gone = db.execute(
                "DELETE FROM messages WHERE created_at < ? AND fanned_out = 1 AND id NOT IN"
                " (SELECT message_id FROM deliveries WHERE state = 'pending')",
                (cutoff,),
            ).rowcount
            db.execute(
                "DELETE FROM deliveries WHERE state != 'pending' AND message_id NOT IN"
                " (SELECT id FROM messages)"
            )
            db.execute("DELETE FROM attempts WHERE at < ?", (cutoff,))
        return gone

    # --- reading (the API's delivery log) ------------------------------------------------------
    def endpoint_log(self, tenant: str, endpoint_id: str, recent: int = 10) -> dict[str, Any]:
        """The delivery log of one endpoint: counts, last status and error, whether it is
        disabled and why, and its `recent` newest deliveries."""
        db = self._db()
        row = db.execute(
            "SELECT attempts, delivered, failures_in_a_row, last_status, last_error,"
            " last_attempt_at, last_success_at, disabled_at, disabled_reason"
            " FROM endpoints WHERE tenant = ? AND endpoint_id = ?",
            (tenant, endpoint_id),
        ).fetchone() or (0, 0, 0, None, None, None, None, None, None)
        pending = db.execute(
            "SELECT count(*) FROM deliveries WHERE tenant = ? AND endpoint_id = ?"
            " AND state = 'pending'",
            (tenant, endpoint_id),
        ).fetchone()[0]
        rows = db.execute(
            "SELECT d.message_id, m.type, d.state, d.attempts, d.last_status, d.last_error,"
            " d.created_at, d.delivered_at, d.next_at FROM deliveries d"
            " JOIN messages m ON m.id = d.message_id"
            " WHERE d.tenant = ? AND d.endpoint_id = ? ORDER BY d.created_at DESC LIMIT ?",
            (tenant, endpoint_id, recent),
        ).fetchall()
        return {
            "attempts": row[0],
            "delivered": row[1],
            "failures_in_a_row": row[2],
            "pending": pending,
            "last_status": row[3],
            "last_error": row[4],
            "last_attempt_at": _iso(row[5]),
            "last_success_at": _iso(row[6]),
            "disabled": row[7] is not None,
            "disabled_at": _iso(row[7]),
            "disabled_reason": row[8],
            "recent": [
                {
                    "message_id": r[0],
                    "type": r[1],
                    "state": r[2],
                    "attempts": r[3],
                    "last_status": r[4],
                    "last_error": r[5],
                    "created_at": _iso(r[6]),
                    "delivered_at": _iso(r[7]),
                    "next_attempt_at": _iso(r[8]) if r[2] == "pending" else None,
                }
                for r in rows
            ],
        }

    def message(self, msg_id: str) -> tuple[str, str, bytes, float] | None:
        """(tenant, type, body, created_at) of a message."""
        row = (
            self._db()
            .execute("SELECT tenant, type, body, created_at FROM messages WHERE id = ?", (msg_id,))
            .fetchone()
        )
        return None if row is None else (row[0], row[1], bytes(row[2]), row[3])


# --- the endpoints, as the serving layer stores them ---------------------------------------------
@dataclass(frozen=True, slots=True)
class Endpoint:
    """One webhook endpoint of a tenant (a document body of the webhooks collection)."""

    id: str
    tenant: str
    url: str
    secret: str
    events: tuple[str, ...]


def stored_endpoints(data_root: str, tenant: str) -> dict[str, Endpoint]:
    """The tenant's endpoint documents ({id: Endpoint}), read from their files now."""
    folder = os.path.join(
        os.path.dirname(outbox_path(data_root)), ENDPOINTS_FOLDER, check_tenant(tenant)
    )
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        try:
            with open(os.path.join(folder, name), "rb") as f:
                raw = orjson.loads(f.read())
            body = raw["body"]
            endpoint = Endpoint(
                raw["id"], tenant, body["url"], body["secret"], tuple(body["events"])
            )
        except FileNotFoundError:  # deleted between listdir and open
            continue
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:  # not an endpoint document
            _log(f"webhooks/{tenant}/{name}: not an endpoint document ({exc!r}); skipped")
            continue
        out[endpoint.id] = endpoint
    return out


def subscribed_tenants(data_root: str) -> list[str]:
    """The tenants that have at least one webhook endpoint document."""
    folder = os.path.join(os.path.dirname(outbox_path(data_root)), ENDPOINTS_FOLDER)
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    return [
        t
        for t in names
        if is_valid_tenant(t)
        and any(n.endswith(".json") for n in os.listdir(os.path.join(folder, t)))
    ]


# --- delivery ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard the deliverer tries.

    backoff_s * 2**(attempt-1), capped at max_backoff_s, times a jitter factor in [0.5, 1):
    the wait before the next attempt. max_attempts: attempts per message (then 'failed').
    disable_after: failed attempts in a row (over any messages) that disable the endpoint.
    """

    timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    backoff_s: float = 2.0
    max_backoff_s: float = 3600.0
    max_attempts: int = 10
    disable_after: int = 20
    workers: int = 8
    per_endpoint: int = 2
    poll_s: float = 0.05
    keep_days: float = 7.0  # finished deliveries and their messages are kept this long

    def delay(self, attempts: int, rng: random.Random) -> float:
        base = min(self.max_backoff_s, self.backoff_s * 2 ** max(attempts - 1, 0))
        return base * (0.5 + 0.5 * rng.random())


@dataclass
class _Due:
    message_id: str
    tenant: str
    endpoint_id: str
    attempts: int
    body: bytes = field(repr=False)


class Deliverer:
    """Delivers the outbox of one data root (run one per data root; `run` takes a lock)."""

    def __init__(
        self,
        data_root: str,
        policy: DeliveryPolicy | None = None,
        endpoints: Callable[[str], dict[str, Endpoint]] | None = None,
        seed: int | None = None,
    ) -> None:
        self.data_root = data_root
        self.outbox = Outbox.of(data_root)
        self.policy = policy or DeliveryPolicy()
        self._endpoints = endpoints or (lambda tenant: stored_endpoints(data_root, tenant))
        self._rng = random.Random(seed)
        self._http = urllib3.PoolManager(
            num_pools=64,
            maxsize=self.policy.per_endpoint,
            retries=False,
            timeout=urllib3.Timeout(
                connect=self.policy.connect_timeout_s, read=self.policy.timeout_s
            ),
        )
        self._pool = ThreadPoolExecutor(self.policy.workers, thread_name_prefix="webhook")
        self._inflight: dict[tuple[str, str], set[str]] = {}
        self._mutex = threading.Lock()
        self._wake = threading.Event()

    # --- the loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None) -> None:
        """Deliver until `stop` is set, holding the data root's deliverer lock."""
        stop = stop or threading.Event()
        lock = open(self.outbox.path + ".lock", "a+b")  # noqa: SIM115 (held while running)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a second deliverer waits here
            pruned_at = 0.0
            while not stop.is_set():
                try:
                    started = self.tick()
                    if time.monotonic() - pruned_at > 3600:
                        pruned_at = time.monotonic()
                        self.outbox.prune(self.policy.keep_days)
                except sqlite3.Error as exc:  # a busy or full disk: said, and tried again
                    _log(f"webhook deliverer: {type(exc).__name__}: {exc}; retrying in 1 s")
                    stop.wait(1.0)
                    continue
                if not started:
                    self._wake.wait(self.policy.poll_s)
                    self._wake.clear()
        finally:
            self._pool.shutdown(wait=True)
            lock.close()

    def tick(self) -> int:
        """Fan new messages out, start the due deliveries there is room for; returns how many
        were started."""
        self._fan_out()
        return self._start_due()

    def drain(self, timeout_s: float = 30.0) -> None:
        """Run ticks until no message waits for fan-out, no delivery is pending (due or
        waiting for its retry) and none is in flight, or `timeout_s` passed (tests, one-shot
        runs)."""
        deadline = time.monotonic() + timeout_s
        db = self.outbox._db()
        while time.monotonic() < deadline:
            self.tick()
            with self._mutex:
                busy = any(self._inflight.values())
            waiting = db.execute(
                "SELECT (SELECT count(*) FROM deliveries WHERE state = 'pending')"
                " + (SELECT count(*) FROM messages WHERE fanned_out = 0)"
            ).fetchone()[0]
            if not busy and not waiting:
                return
            time.sleep(0.005)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # --- fan-out -------------------------------------------------------------------------------
    def _fan_out(self) -> None:
        db = self.outbox._db()
        new = db.execute(
            "SELECT id, tenant, type, created_at FROM messages WHERE fanned_out = 0 ORDER BY seq"
            " LIMIT 1000"
        ).fetchall()
        if not new:
            return
        endpoints: dict[str, dict[str, Endpoint]] = {}
        disabled: dict[str, set[str]] = {}
        rows = []
        for msg_id, tenant, event_type, created_at in new:
            if tenant not in endpoints:
                endpoints[tenant] = self._endpoints(tenant)
                disabled[tenant] = {
                    r[0]
                    for r in db.execute(
                        "SELECT endpoint_id FROM endpoints WHERE tenant = ?"
                        " AND disabled_at IS NOT NULL",
                        (tenant,),
                    )
                }
            for ep in endpoints[tenant].values():
                if event_type in ep.events and ep.id not in disabled[tenant]:
                    rows.append((msg_id, tenant, ep.id, created_at, created_at))
        with self.outbox.transaction() as tx:
            tx.executemany(
                "INSERT OR IGNORE INTO deliveries"
                " (message_id, tenant, endpoint_id, state, next_at, created_at)"
                " VALUES (?, ?, ?, 'pending', ?, ?)",
                rows,
            )
            tx.executemany(
                "UPDATE messages SET fanned_out = 1 WHERE id = ?", [(m[0],) for m in new]
            )

    # --- attempts ------------------------------------------------------------------------------
    def _start_due(self) -> int:
        db = self.outbox._db()
        due = db.execute(
            "SELECT d.message_id, d.tenant, d.endpoint_id, d.attempts, m.body"
            " FROM deliveries d JOIN messages m ON m.id = d.message_id"
            " WHERE d.state = 'pending' AND d.next_at <= ? ORDER BY d.next_at LIMIT 500",
            (time.time(),),
        ).fetchall()
        started = 0
        endpoints: dict[str, dict[str, Endpoint]] = {}
        for msg_id, tenant, endpoint_id, attempts, body in due:
            key = (tenant, endpoint_id)
            with self._mutex:
                flying = self._inflight.setdefault(key, set())
                if msg_id in flying or len(flying) >= self.policy.per_endpoint:
                    continue
            if tenant not in endpoints:
                endpoints[tenant] = self._endpoints(tenant)
            ep = endpoints[tenant].get(endpoint_id)
            if ep is None:  # deleted since the fan-out
                self.outbox.forget_endpoint(tenant, endpoint_id)
                continue
            with self._mutex:
                flying.add(msg_id)
            self._pool.submit(self._attempt, ep, _Due(msg_id, tenant, endpoint_id, attempts, body))
            started += 1
        return started

    def _attempt(self, ep: Endpoint, due: _Due) -> None:
        try:
            status, error, took = self._post(ep, due)
            self._record(ep, due, status, error, took)
        except sqlite3.Error as exc:  # not recorded: the delivery stays due and is sent again
            _log(f"webhook {due.message_id} -> {ep.id}: outcome not recorded: {exc}")
        finally:
            with self._mutex:
                self._inflight[(due.tenant, due.endpoint_id)].discard(due.message_id)
            self._wake.set()

    def _post(self, ep: Endpoint, due: _Due) -> tuple[int | None, str | None, float]:
        from standardwebhooks.webhooks import Webhook

        now = dt.datetime.now(dt.UTC)
        text = due.body.decode()
        headers = {
            "content-type": "application/json",
            "user-agent": "recsys-webhooks/1",
            "webhook-id": due.message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": Webhook(ep.secret).sign(due.message_id, now, text),
        }
        started = time.perf_counter()
        try:
            resp = self._http.request(
                "POST", ep.url, body=due.body, headers=headers, redirect=False, preload_content=True
            )
        except Exception as ex:  # network errors are the endpoint's failure, recorded
            return None, f"{type(ex).__name__}: {ex}"[:500], _ms(started)
        error = None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        return resp.status, error, _ms(started)

    def _record(
        self, ep: Endpoint, due: _Due, status: int | None, error: str | None, took: float
    ) -> None:
        now = time.time()
        attempts = due.attempts + 1
        policy = self.policy
        key = (due.tenant, due.endpoint_id)
        with self.outbox.transaction() as db:
            db.execute("INSERT OR IGNORE INTO endpoints (tenant, endpoint_id) VALUES (?, ?)", key)
            db.execute(
                "INSERT INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?)",
                (due.message_id, due.tenant, due.endpoint_id, now, status, error, took),
            )
            if error is None:
                db.execute(
                    "UPDATE deliveries SET state = 'delivered', attempts = ?, last_status = ?,"
                    " last_error = NULL, delivered_at = ? WHERE message_id = ? AND endpoint_id = ?",
                    (attempts, status, now, due.message_id, due.endpoint_id),
                )
                db.execute(
                    "UPDATE endpoints SET attempts = attempts + 1, delivered = delivered + 1,"
                    " failures_in_a_row = 0, last_status = ?, last_error = NULL,"
                    " last_attempt_at = ?, last_success_at = ?"
                    " WHERE tenant = ? AND endpoint_id = ?",
                    (status, now, now, *key),
                )
                return
            state = "failed" if attempts >= policy.max_attempts else "pending"
            db.execute(
                "UPDATE deliveries SET state = ?, attempts = ?, last_status = ?, last_error = ?,"
                " next_at = ? WHERE message_id = ? AND endpoint_id = ?",
                (
                    state,
                    attempts,
                    status,
                    error,
                    now + policy.delay(attempts, self._rng),
                    due.message_id,
                    due.endpoint_id,
                ),
            )
            db.execute(
                "UPDATE endpoints SET attempts = attempts + 1,"
                " failures_in_a_row = failures_in_a_row + 1, last_status = ?, last_error = ?,"
                " last_attempt_at = ? WHERE tenant = ? AND endpoint_id = ?",
                (status, error, now, *key),
            )
            in_a_row = db.execute(
                "SELECT failures_in_a_row FROM endpoints WHERE tenant = ? AND endpoint_id = ?",
                key,
            ).fetchone()[0]
            if in_a_row >= policy.disable_after or status == 410:
                reason = (
                    "the endpoint answered 410 Gone"
                    if status == 410
                    else f"{in_a_row} failed attempts in a row; last: {error}"
                )
                db.execute(
                    "UPDATE endpoints SET disabled_at = ?, disabled_reason = ?"
                    " WHERE tenant = ? AND endpoint_id = ? AND disabled_at IS NULL",
                    (now, reason, *key),
                )
                db.execute(
                    "UPDATE deliveries SET state = 'skipped', last_error = 'endpoint disabled'"
                    " WHERE tenant = ? AND endpoint_id = ? AND state = 'pending'",
                    key,
                )


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0


def emit(data_root: str, tenant: str, event_type: str, payload: dict[str, Any]) -> str:
    """Record a webhook event of `tenant` in the data root's outbox (durable when it returns);
    returns the message id its deliveries carry as ``webhook-id``."""
    return Outbox.of(data_root).emit(tenant, event_type, payload)


# --- the command line: `recsys webhooks deliver` -----------------------------------------------
def register(sub: Any) -> None:
    """Add ``recsys webhooks deliver`` to the `recsys` command line."""
    p = sub.add_parser("webhooks", help="deliver the webhook outbox")
    verbs = p.add_subparsers(dest="webhooks_command", required=True)
    d = verbs.add_parser("deliver", help="deliver webhook events until stopped (one per data root)")
    d.add_argument("--data-root", default=None, help="data root (default RECSYS_DATA_ROOT)")
    d.add_argument("--timeout", type=float, default=5.0, help="seconds per request (5)")
    d.add_argument("--backoff", type=float, default=2.0, help="first retry delay in s (2)")
    d.add_argument("--max-attempts", type=int, default=10, help="attempts per message (10)")
    d.add_argument(
        "--disable-after", type=int, default=20, help="failures in a row that disable (20)"
    )
    d.set_defaults(func=_cmd_deliver)


def _cmd_deliver(args: argparse.Namespace) -> int:
    import signal

    from recsys.storage import default_root

    root = args.data_root or default_root()
    policy = DeliveryPolicy(
        timeout_s=args.timeout,
        backoff_s=args.backoff,
        max_attempts=args.max_attempts,
        disable_after=args.disable_after,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"delivering webhooks of {outbox_path(root)}", file=sys.stderr, flush=True)
    Deliverer(root, policy).run(stop)
    return 0

"""Control plane: access - API keys, rate limits, quotas, policies and the audit log.

Every document here is a collection of the one versioned store (``<data root>/serving``), per
tenant; the tenant is always the caller's (`req.context.principal.tenant`).

* Keys (``keys/<tenant>/<key id>.json``): ``POST /v1/recs/keys`` makes a key
  ``rsk_<key id>_<secret>`` and answers it once; only ``HMAC-SHA256(server secret, key)`` is
  stored (`server_secret`: ``RECSYS_SERVER_SECRET`` or a 0600 file under the data root).
  `KeyRing` is what `serving.auth.Authenticator` asks about a presented ``rsk_`` key: a map
  digest -> key of every tenant, rebuilt when the change marker ``serving/keys.changed`` that
  every create and revoke rewrites has changed (one stat, at most every `KEY_CHECK_S` and on an
  unknown key), so a revoked (deleted) key stops working on every worker within that. Its
  last use is written at most once a minute per key and worker (``key_usage/<tenant>/``).
* Rate limits (``rate_limits/<tenant>/rate_limits.json``): per-key and per-tenant windows that
  `serving.ratelimit.LimitTable` reads for the middleware (re-read within `LIMIT_CHECK_S`).
* Quotas (``quotas/<tenant>/quotas.json``, `QUOTA_DEFAULTS`): `require_quota` (403) before a
  model, webhook or key is created; ``inference_qps`` is a per-tenant one-second window on the
  inference routes (429, in the middleware); `quota_usage` reports limits against use.
* Policies (``policies/<tenant>/<id>.json``): named rule sets (`serving.rules` rules); the
  enabled ones are appended to the tenant's rules by `effective_rules`, which the request-time
  engine reads. The tenant's own rules document is listed as the policy ``tenant-rules``.
* Audit (`serving.control.audit`): ``GET /v1/recs/audit/logs``.

Limits and quotas a tenant admin sets are bounded by the server's: a rate at most the
configured ``RECSYS_RATE_LIMIT`` / ``RECSYS_TENANT_RATE_LIMIT``, a quota at most its default
(422 above): an admin of a tenant tightens its own limits, it cannot lift the operator's.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import falcon
import msgspec
from msgspec import Meta

from recsys.contract import PATTERN_END
from recsys.durable import fsync_dir, write_atomic
from recsys.tenancy import is_valid_tenant
from serving.auth import SCOPE_ADMIN, Principal
from serving.control.audit import AuditLog
from serving.documents import (
    CONFLICT_STATUSES,
    Collection,
    Document,
    DocumentStore,
    Preconditions,
    set_etag,
)
from serving.errors import ProblemError
from serving.routing import Route
from serving.schemas import Rule

log = logging.getLogger("recsys.serving")

#: The quotas of a tenant that never set its own; also the most a tenant may set.
QUOTA_DEFAULTS: dict[str, int] = {
    "inference_qps": 100_000,  # inference requests per second, per worker (429 above)
    "events_per_day": 10_000_000,  # events accepted per UTC day (reported, see docs/access.md)
    "storage_bytes": 50 * 1024**3,  # bytes under the tenant's data folders (reported)
    "models": 50,  # registered model versions (403 on the next)
    "keys": 100,  # stored API keys (403 on the next)
    "webhooks": 50,  # webhook endpoints (403 on the next)
}
QUOTA_NAMES = tuple(QUOTA_DEFAULTS)
KEY_PREFIX = "rsk_"
KEY_CHECK_S = 0.5  # a revoked key is refused on every worker within this (plus a stat)
LIMIT_CHECK_S = 0.5  # a changed rate limit or quota is applied within this
KEY_MISS_CHECK_S = 0.0  # an unknown key re-checks the change marker (one stat)
KEY_SCAN_S = 5.0  # the keys folders are re-listed at least this often, marker or not
LAST_USED_EVERY_S = 60.0  # a key's last use is written at most this often per worker
_POLICY_VIEW = "tenant-rules"  # the tenant's rules document, seen as a policy


# --- the collections -----------------------------------------------------------------------
@functools.cache
def _collections(root: str) -> dict[str, Collection]:
    """The area's collections under one store root (one set per process: their caches live as
    long as the app)."""
    store = DocumentStore(root, LIMIT_CHECK_S)
    return {
        "keys": store.collection("keys", prefix="key"),
        "key_usage": store.collection("key_usage", prefix="use"),
        "quotas": store.collection("quotas", ids=("quotas",), prefix="quota"),
        "rate_limits": store.collection("rate_limits", ids=("rate_limits",), prefix="rl"),
        "policies": store.collection("policies", prefix="pol"),
    }


def collections(ctx: Any) -> dict[str, Collection]:
    return _collections(ctx.documents.root)


def store_collections(data_root: str) -> dict[str, Collection]:
    """The same collections from a data root (the middleware and the authenticator)."""
    return _collections(os.path.abspath(os.path.join(data_root, "serving")))


# --- quotas ----------------------------------------------------------------------------------
def effective_quotas(docs: dict[str, Collection], tenant: str) -> dict[str, int]:
    doc = docs["quotas"].cached(tenant, "quotas")
    if doc is None:
        return dict(QUOTA_DEFAULTS)
    return {**QUOTA_DEFAULTS, **{k: v for k, v in doc.body.items() if k in QUOTA_DEFAULTS}}


def quotas(ctx: Any, tenant: str) -> dict[str, int]:
    """The tenant's effective quotas: its document over the defaults (another worker's change
    is seen within `LIMIT_CHECK_S`)."""
    return effective_quotas(collections(ctx), tenant)


def quota_exceeded(
    name: str, limit: int, used: int, status: int = 403, headers: dict[str, str] | None = None
) -> ProblemError:
    """The Problem of a request over quota `name` (403; 429 for the inference rate)."""
    return ProblemError(
        status,
        f"Quota '{name}' exceeded: {used} used of {limit}.",
        code="RECSYS_QUOTA_EXCEEDED",
        title="Quota exceeded",
        headers=headers,
        extra={"quota": name, "limit": limit, "used": used},
    )


def require_quota(ctx: Any, tenant: str, name: str, used: int) -> None:
    """403 Problem naming quota `name` when the tenant has used all of it (``used >= limit``);
    call before creating one more of what it counts ("models", "webhooks", "keys")."""
    if name not in QUOTA_DEFAULTS:
        raise ValueError(f"unknown quota {name!r}: one of {', '.join(QUOTA_NAMES)}")
    limit = quotas(ctx, tenant)[name]
    if used >= limit:
        raise quota_exceeded(name, limit, used)


def _tenant_bytes(data_root: str, tenant: str) -> int:
    """Bytes of the tenant's files: landing, warehouse, snapshots, event logs, documents."""
    total = 0
    roots = [
        os.path.join(data_root, part, tenant) for part in ("landing", "warehouse", "snapshots")
    ]
    serving = os.path.join(data_root, "serving")
    if os.path.isdir(serving):
        roots += [os.path.join(serving, kind, tenant) for kind in os.listdir(serving)]
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(folder, name)).st_size
                except FileNotFoundError:
                    continue
    return total


def _model_versions(ctx: Any, tenant: str) -> int | None:
    """Registered versions of the tenant's model (None: MLflow is not reachable)."""
    uri = ctx.mlflow_uri
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///") :]):
        return 0  # no registry yet: no model (and reading must not create one)
    try:
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        return len(client.search_model_versions(f"name='recsys-{tenant}'"))
    except Exception as e:  # noqa: BLE001 (any MLflow failure: reported as unknown, logged)
        log.warning("quota usage: MLflow not readable for %s (%s)", tenant, e)
        return None


def quota_usage(ctx: Any, tenant: str) -> dict[str, dict[str, int | None]]:
    """{quota: {"limit", "used"}} of the tenant (for /v1/recs/usage). ``used`` is None for the
    inference rate (a per-second window) and for models when MLflow cannot be read; events per
    day are those `charge_events` counted (as of the last merge, within `EVENTS_SYNC_S`)."""
    from serving.control import webhooks

    limits = quotas(ctx, tenant)
    docs = collections(ctx)
    used: dict[str, int | None] = {
        "inference_qps": None,
        "events_per_day": _event_counter(ctx.config.data_root).used(tenant),
        "storage_bytes": _tenant_bytes(ctx.config.data_root, tenant),
        "models": _model_versions(ctx, tenant),
        "keys": docs["keys"].count(tenant),
        "webhooks": webhooks.collection(ctx).count(tenant),
    }
    return {name: {"limit": limits[name], "used": used[name]} for name in QUOTA_NAMES}


# --- events per day ---------------------------------------------------------------------------
EVENTS_SYNC_S = 1.0  # a worker gives its lease back and reads the totals at most this often
#: The share of the quota left (beyond a request's events) that a worker takes as its lease.
LEASE_SHARE = 8


class EventDayCounter:
    """Events accepted per tenant and UTC day, shared by the workers of a data root, never
    past the quota.

    The shared row of a tenant and day (``<data root>/serving/event_counts.sqlite``) counts
    the events accepted plus the quota the workers hold as leases (`n`), and those leases apart
    (`leased`). A worker accepts events out of its lease with a few dict operations. When the
    lease cannot cover a request, one ``BEGIN IMMEDIATE`` transaction (the workers' lock) gives
    the lease's rest back and takes the request's events plus a `LEASE_SHARE` of what is left
    beyond them, or refuses (429 naming ``events_per_day``) when even the request's events do
    not fit. So `n` never passes the quota, whatever the workers do at once, and near the quota
    every request takes a transaction.

    Every `EVENTS_SYNC_S` a worker gives its lease's rest back and reads the totals: `used` is
    ``n - leased`` as of then (the events other workers accepted out of their leases since their
    last sync are not in it yet). A lease another worker holds is not free to this one: near
    the quota a request can be refused while another worker's lease still has room, until that
    worker's next sync (a worker that is killed leaves its rest counted: the day's quota is
    then under-used by that rest, never overrun)."""

    def __init__(self, data_root: str) -> None:
        self._path = os.path.join(data_root, "serving", "event_counts.sqlite")
        self._local = threading.Lock()
        # (tenant, day) -> [events left, the limit it was taken under, leased when taken]
        self._leases: dict[tuple[str, str], list[int]] = {}
        self._total: dict[tuple[str, str], int] = {}  # the shared used count last read
        self._synced = 0.0
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: (c := ref()) and c._forget_parent())

    def _forget_parent(self) -> None:
        """In a forked child: the parent's leases and connection are the parent's."""
        self._local = threading.Lock()
        self._leases, self._total, self._synced = {}, {}, 0.0
        self._conn, self._pid = None, 0

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():  # (never a parent's connection)
            os.makedirs(os.path.dirname(self._path), exist_ok=True)
            conn = sqlite3.connect(
                self._path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # (a count: no fsync per merge)
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS counts (tenant TEXT, day TEXT, n INTEGER, "
                    "leased INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (tenant, day))"
                )
                columns = {row[1] for row in conn.execute("PRAGMA table_info(counts)")}
                if "leased" not in columns:  # (a file of the release before leases)
                    conn.execute("ALTER TABLE counts ADD COLUMN leased INTEGER NOT NULL DEFAULT 0")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _transaction(self, step):
        """`step(conn)` in one ``BEGIN IMMEDIATE`` transaction (call with `_local` held)."""
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = step(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return result

    @staticmethod
    def _give_back(conn: sqlite3.Connection, key: tuple[str, str], lease: list[int]) -> None:
        conn.execute(
            "UPDATE counts SET n = n - ?, leased = leased - ? WHERE tenant = ? AND day = ?",
            (lease[0], lease[2], *key),
        )

    def sync(self) -> None:
        """Give every lease's rest back and read every total of today."""
        with self._local:
            leases = self._leases
            day = _today()

            def step(conn):
                for key, lease in leases.items():
                    self._give_back(conn, key, lease)
                rows = conn.execute("SELECT tenant, n - leased FROM counts WHERE day = ?", (day,))
                return {(tenant, day): used for tenant, used in rows}

            self._total = self._transaction(step)
            self._leases = {}
            self._synced = time.monotonic()

    def used(self, tenant: str) -> int:
        """Today's events of the tenant, as of the last sync (at most `EVENTS_SYNC_S` ago)."""
        if time.monotonic() - self._synced >= EVENTS_SYNC_S:
            self.sync()
        return self._total.get((tenant, _today()), 0)

    def charge(self, tenant: str, n: int, limit: int) -> None:
        """Count `n` accepted events of `tenant`, or refuse them all (429) if they would pass
        `limit` today."""
        if time.monotonic() - self._synced >= EVENTS_SYNC_S:
            self.sync()
        key = (tenant, _today())
        with self._local:
            lease = self._leases.get(key)
            if lease is not None and lease[1] == limit and lease[0] >= n:
                lease[0] -= n
                return
            used = self._take(key, n, limit)
        if used is not None:
            raise quota_exceeded(
                "events_per_day", limit, used, 429, {"Retry-After": str(_seconds_to_midnight())}
            )

    def _take(self, key: tuple[str, str], n: int, limit: int) -> int | None:
        """Give the key's lease back and take `n` events and a new lease (None), or take none
        (the events used, for the refusal). Call with `_local` held."""
        old = self._leases.pop(key, None)

        def step(conn):
            if old is not None:
                self._give_back(conn, key, old)
            row = conn.execute(
                "SELECT n, leased FROM counts WHERE tenant = ? AND day = ?", key
            ).fetchone()
            counted, leased = row if row is not None else (0, 0)
            free = limit - counted
            if free < n:
                return None, counted - leased
            rest = (free - n) // LEASE_SHARE
            conn.execute(
                "INSERT INTO counts (tenant, day, n, leased) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (tenant, day) DO UPDATE SET n = n + excluded.n, "
                "leased = leased + excluded.leased",
                (*key, n + rest, rest),
            )
            return [rest, limit, rest], counted - leased + n

        try:
            lease, used = self._transaction(step)
        except BaseException:
            if old is not None:
                self._leases[key] = old  # (rolled back: still held)
            raise
        self._total[key] = used
        if lease is None:
            return used
        self._leases[key] = lease
        return None


def _today() -> str:
    return time.strftime("%Y-%m-%d", time.gmtime())


def _seconds_to_midnight() -> int:
    return 86400 - int(time.time()) % 86400


@functools.cache
def _event_counter(data_root: str) -> EventDayCounter:
    return EventDayCounter(data_root)


def charge_events(ctx: Any, tenant: str, n: int) -> None:
    """Before events are accepted for `tenant`: count `n` more today, or a 429 Problem naming
    the ``events_per_day`` quota when they would pass it (none of them is then accepted)."""
    if n > 0:
        limit = quotas(ctx, tenant)["events_per_day"]
        _event_counter(ctx.config.data_root).charge(tenant, n, limit)


# --- the server secret and stored keys -------------------------------------------------------
def server_secret(config: Any) -> bytes:
    """``RECSYS_SERVER_SECRET``, or the data root's secret file (``serving/server_secret``,
    0600), made once: written to a temporary file and linked into place, so concurrent workers
    agree on one."""
    if config.server_secret:
        return config.server_secret.encode()
    folder = os.path.join(config.data_root, "serving")
    path = os.path.join(folder, "server_secret")
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except FileNotFoundError:
        pass
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_hex(32).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)  # fails if another process made it first: its secret wins
        fsync_dir(folder)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(path, "rb") as f:
        return f.read().strip()


@dataclass(frozen=True, slots=True)
class StoredKey:
    id: str
    tenant: str
    expires_at: float | None
    principal: Principal


def _expires_ts(text: str | None) -> float | None:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None


def keys_marker(data_root: str) -> str:
    """The file every key change through the API rewrites (`mark_keys_changed`): one stat of
    it tells a worker whether to re-list the keys folders."""
    return os.path.join(data_root, "serving", "keys.changed")


def mark_keys_changed(data_root: str) -> None:
    path = keys_marker(data_root)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_atomic(path, secrets.token_hex(8).encode())  # (a new inode: seen whatever the mtime)


def _signature(path: str) -> tuple:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class KeyRing:
    """The stored keys of every tenant by HMAC digest (see the module docstring).

    Every `KEY_CHECK_S` (and on a presented key it does not know) it stats the change marker
    (`keys_marker`); when the marker changed, or `KEY_SCAN_S` passed, it re-lists the keys
    folders and rebuilds the map if any folder changed. So neither a revocation check nor an
    unknown key costs more than a stat, however many tenants there are."""

    def __init__(self, data_root: str, secret: Callable[[], bytes]) -> None:
        docs = store_collections(data_root)
        # (its own view of the keys folders, re-stated on every scan: the ring sets the pace)
        self._keys = DocumentStore(docs["keys"].root, 0.0).collection("keys", prefix="key")
        self._usage = docs["key_usage"]
        self._root = os.path.join(self._keys.root, "keys")
        self._secret_of = secret
        self._secret: bytes | None = None
        self._checked = float("-inf")
        self._marker_path = keys_marker(data_root)
        self._marker: tuple = ()
        self._scanned = float("-inf")
        self._seen: tuple = ()
        self._by_digest: dict[str, StoredKey] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def digest(self, key: str) -> str:
        if self._secret is None:
            self._secret = self._secret_of()
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def find(self, presented: str) -> StoredKey | None:
        """The stored key `presented` is, if any. A key not in the map is looked for again
        after a re-scan (at most every `KEY_MISS_CHECK_S`), so a key works as soon as it is
        made."""
        self._refresh(KEY_CHECK_S)
        digest = self.digest(presented)
        found = self._by_digest.get(digest)
        if found is None:
            self._refresh(KEY_MISS_CHECK_S)
            found = self._by_digest.get(digest)
        return found

    def _refresh(self, interval: float) -> None:
        now = time.monotonic()
        if now - self._checked < interval:
            return
        with self._lock:
            self._checked = now
            marker = _signature(self._marker_path)
            if marker == self._marker and now - self._scanned < KEY_SCAN_S:
                return
            self._marker, self._scanned = marker, now
            try:
                tenants = sorted(t for t in os.listdir(self._root) if is_valid_tenant(t))
            except FileNotFoundError:
                tenants = []
            seen = tuple((t, self._keys.cached_list(t)) for t in tenants)
            if len(seen) == len(self._seen) and all(
                a[0] == b[0] and a[1] is b[1] for a, b in zip(seen, self._seen, strict=True)
            ):
                return
            ring: dict[str, StoredKey] = {}
            for tenant, docs in seen:
                for doc in docs.values():
                    body = doc.body
                    principal = Principal(tenant, frozenset(body["scopes"]), "key:" + doc.id)
                    ring[body["hash"]] = StoredKey(
                        doc.id, tenant, _expires_ts(body.get("expires_at")), principal
                    )
            self._by_digest, self._seen = ring, seen

    def touch(self, key: StoredKey) -> None:
        """Note a use of `key`: written at most once per `LAST_USED_EVERY_S` (per worker)."""
        now = time.time()
        if now - self._touched.get(key.id, 0.0) < LAST_USED_EVERY_S:
            return
        self._touched[key.id] = now
        stamp = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="seconds")
        try:
            self._usage.put(key.tenant, key.id, {"last_used_at": stamp.replace("+00:00", "Z")})
        except OSError as e:  # a full or read-only disk must not refuse the request
            log.warning("last use of key %s not written: %s", key.id, e)


# --- schemas ---------------------------------------------------------------------------------
Scope = Literal["recommend", "admin"]
Name = Annotated[str, Meta(min_length=1, max_length=100)]
KeyIdText = Annotated[str, Meta(pattern=r"^key_[0-9a-f]{16}" + PATTERN_END, description="a key id")]
PolicyId = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}" + PATTERN_END, description="a policy id")
]
Seconds = Annotated[int, Meta(ge=60, le=10 * 365 * 86400)]
Limit = Annotated[int, Meta(ge=1, le=10**9)]
Window = Annotated[int, Meta(ge=1, le=86400)]
QuotaValue = Annotated[int, Meta(ge=0, le=10**15)]


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    name: Name
    scopes: Annotated[list[Scope], Meta(min_length=1, max_length=2)] = msgspec.field(
        default_factory=lambda: ["recommend"]
    )
    expires_in: Seconds | None = None


class KeyInfo(msgspec.Struct, omit_defaults=True):
    id: str
    name: str
    prefix: str
    scopes: list[str]
    created_at: str | None
    expires_at: str | None
    last_used_at: str | None
    version: str


class KeyCreated(KeyInfo):
    key: Annotated[str, Meta(description="the key: shown in this answer only, never again")] = ""


class KeyList(msgspec.Struct):
    items: list[KeyInfo]
    total: int


class Window_(msgspec.Struct, forbid_unknown_fields=True):
    limit: Limit
    window_s: Window


class RateLimits(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    key: Window_ | None = None
    tenant: Window_ | None = None
    keys: Annotated[dict[str, Window_], Meta(max_length=1000)] = {}
    version: str | None = None
    tenant_id: str | None = None


class Quotas(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    inference_qps: QuotaValue | None = None
    events_per_day: QuotaValue | None = None
    storage_bytes: QuotaValue | None = None
    models: QuotaValue | None = None
    keys: QuotaValue | None = None
    webhooks: QuotaValue | None = None
    version: str | None = None


class QuotaUse(msgspec.Struct):
    limit: int
    used: int | None


class QuotaReport(msgspec.Struct):
    quotas: dict[str, int]
    usage: dict[str, QuotaUse]
    version: str


class PolicyBody(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Name
    rules: Annotated[list[Rule], Meta(max_length=1000)]
    description: Annotated[str, Meta(max_length=2000)] | None = None
    enabled: bool = True


class PolicyCreate(PolicyBody, forbid_unknown_fields=True):
    id: PolicyId | None = None


class Policy(msgspec.Struct, omit_defaults=True):
    id: str
    name: str
    rules: list[dict[str, Any]]
    enabled: bool
    version: str
    description: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    view: str | None = None  # "tenant-rules": the tenant's rules document


class PolicyList(msgspec.Struct):
    items: list[Policy]
    total: int


class AuditQuery(msgspec.Struct, omit_defaults=True):
    since: Annotated[dt.datetime, Meta(tz=True, description="RFC 3339, inclusive")] | None = None
    until: Annotated[dt.datetime, Meta(tz=True, description="RFC 3339, exclusive")] | None = None
    actor: Annotated[str, Meta(max_length=300)] | None = None
    route: Annotated[str, Meta(max_length=300)] | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100
    cursor: Annotated[int, Meta(ge=0, le=2**62)] = 0


class AuditEntry(msgspec.Struct):
    seq: int
    ts: str
    tenant: str
    actor: str
    method: str
    route: str
    path: str
    status: int
    request_id: str | None
    target: str | None
    before: str | None
    after: str | None
    prev: str
    hash: str


class AuditPage(msgspec.Struct):
    items: list[AuditEntry]
    next_cursor: str | None


def _iso(ts: float) -> str:
    return (
        dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


# --- resources -------------------------------------------------------------------------------
class KeysResource:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._docs = collections(ctx)["keys"]
        self._usage = collections(ctx)["key_usage"]
        self._ring = KeyRing(ctx.config.data_root, lambda: server_secret(ctx.config))

    def _info(self, tenant: str, doc: Document) -> dict[str, Any]:
        used = self._usage.get(tenant, doc.id)
        body = doc.body
        return {
            "id": doc.id,
            "name": body["name"],
            "prefix": body["prefix"],
            "scopes": body["scopes"],
            "created_at": doc.created_at,
            "expires_at": body.get("expires_at"),
            "last_used_at": used.body.get("last_used_at") if used else None,
            "version": doc.revision,
        }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        items = [self._info(tenant, doc) for doc in self._docs.list(tenant)]
        resp.media = {"items": items, "total": len(items)}
        resp.cache_control = ["no-store"]

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        spec: KeyCreate = req.context.body
        require_quota(self._ctx, tenant, "keys", used=self._docs.count(tenant))
        key_id = f"key_{secrets.token_hex(8)}"
        plaintext = f"{KEY_PREFIX}{key_id[4:]}_{secrets.token_urlsafe(32)}"
        expires = _iso(time.time() + spec.expires_in) if spec.expires_in else None
        body = {
            "name": spec.name,
            "prefix": plaintext[: len(KEY_PREFIX) + 16],
            "scopes": sorted(set(spec.scopes)),
            "expires_at": expires,
            "hash": self._ring.digest(plaintext),
        }
        doc = self._docs.create(tenant, key_id, body)
        mark_keys_changed(self._ctx.config.data_root)
        req.context.audit = {"target": f"key/{key_id}", "before": None, "after": doc.revision}
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/recs/keys/{key_id}"
        set_etag(resp, doc.revision)
        resp.media = {**self._info(tenant, doc), "key": plaintext}

    def on_delete_one(self, req: falcon.Request, resp: falcon.Response, key_id: str) -> None:
        tenant = req.context.principal.tenant
        before = self._docs.delete(tenant, key_id, Preconditions.of(req)).revision
        mark_keys_changed(self._ctx.config.data_root)
        if self._usage.get(tenant, key_id) is not None:
            self._usage.delete(tenant, key_id)
        req.context.audit = {"target": f"key/{key_id}", "before": before, "after": None}
        resp.status = falcon.HTTP_204


class RateLimitsResource:
    def __init__(self, ctx: Any) -> None:
        self._config = ctx.config
        self._docs = collections(ctx)["rate_limits"]

    def _defaults(self) -> dict[str, Any]:
        c = self._config
        return {
            "key": {"limit": c.rate_limit.limit, "window_s": c.rate_limit.window_s},
            "tenant": {
                "limit": c.tenant_rate_limit.limit,
                "window_s": c.tenant_rate_limit.window_s,
            },
            "keys": {},
        }

    def _send(self, resp: falcon.Response, tenant: str, doc: Document) -> None:
        resp.media = {**doc.body, "version": doc.revision, "tenant_id": tenant}
        set_etag(resp, doc.revision)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        self._send(resp, tenant, self._docs.get(tenant, "rate_limits", self._defaults()))

    def _bounded(self, name: str, window: Window_ | None, default: dict[str, int]) -> dict:
        if window is None:
            return dict(default)
        ceiling = (default["limit"], default["window_s"])
        if window.limit * ceiling[1] > ceiling[0] * window.window_s:
            raise ProblemError(
                422,
                f"{name}: {window.limit}/{window.window_s}s is above the server's limit "
                f"{ceiling[0]}/{ceiling[1]}s.",
                code="RECSYS_LIMIT_ABOVE_SERVER",
            )
        return {"limit": window.limit, "window_s": window.window_s}

    def on_put(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        spec: RateLimits = req.context.body
        if spec.tenant_id not in (None, tenant):
            raise ProblemError(422, "tenant_id in the body is not the caller's tenant.")
        defaults = self._defaults()
        body = {
            "key": self._bounded("key", spec.key, defaults["key"]),
            "tenant": self._bounded("tenant", spec.tenant, defaults["tenant"]),
            "keys": {
                k: self._bounded(f"keys.{k}", w, defaults["key"])
                for k, w in sorted(spec.keys.items())
            },
        }
        pre = Preconditions.of(req).matching(spec.version)
        doc, _, before = self._docs.put_replacing(
            tenant, "rate_limits", body, pre, default=defaults
        )
        req.context.audit = {
            "target": "rate-limits/rate_limits",
            "before": before,
            "after": doc.revision,
        }
        self._send(resp, tenant, doc)


class QuotasResource:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._docs = collections(ctx)["quotas"]

    def _send(self, resp: falcon.Response, tenant: str, doc: Document) -> None:
        limits = {**QUOTA_DEFAULTS, **doc.body}
        usage = quota_usage(self._ctx, tenant)
        resp.media = {"quotas": limits, "usage": usage, "version": doc.revision}
        set_etag(resp, doc.revision)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        self._send(resp, tenant, self._docs.get(tenant, "quotas", QUOTA_DEFAULTS))

    def on_patch(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        spec: Quotas = req.context.body
        change = {
            k: v
            for k, v in msgspec.structs.asdict(spec).items()
            if k in QUOTA_DEFAULTS and v is not None
        }
        for name, value in change.items():
            if value > QUOTA_DEFAULTS[name]:
                raise ProblemError(
                    422,
                    f"Quota '{name}' may be at most {QUOTA_DEFAULTS[name]} (the server's).",
                    code="RECSYS_QUOTA_ABOVE_SERVER",
                    extra={"quota": name},
                )
        pre = Preconditions.of(req).matching(spec.version)
        doc, _, before = self._docs.put_replacing(
            tenant,
            "quotas",
            lambda current: {**(current.body if current else QUOTA_DEFAULTS), **change},
            pre,
            default=QUOTA_DEFAULTS,
        )
        req.context.audit = {"target": "quotas/quotas", "before": before, "after": doc.revision}
        self._send(resp, tenant, doc)


def _check_rules(rules: list[dict[str, Any]], ctx: Any) -> list[dict[str, Any]]:
    """The rules of a policy, checked as the tenant rules document's are (422 otherwise)."""
    from serving.validation import validate_rules

    return validate_rules({"rules": rules}, ctx.config)["rules"]


class PoliciesResource:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._docs = collections(ctx)["policies"]
        self._tenant_rules = ctx.tenant_store.collection("rules")
        self._rules_default: dict[str, Any] = {"rules": []}

    def _view(self, tenant: str) -> dict[str, Any]:
        doc = self._tenant_rules.get(tenant, "rules", self._rules_default)
        return {
            "id": _POLICY_VIEW,
            "name": "Tenant rules",
            "rules": doc.body.get("rules", []),
            "enabled": True,
            "version": doc.revision,
            "updated_at": doc.updated_at,
            "view": "tenant-rules",
            "description": "The tenant's rules document (PUT /v1/admin/tenants/{id}/rules).",
        }

    @staticmethod
    def _public(doc: Document) -> dict[str, Any]:
        body = doc.body
        out = {
            "id": doc.id,
            "name": body["name"],
            "rules": body["rules"],
            "enabled": body.get("enabled", True),
            "version": doc.revision,
            "created_at": doc.created_at,
            "updated_at": doc.updated_at,
        }
        if body.get("description") is not None:
            out["description"] = body["description"]
        return out

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        items = [self._view(tenant)] + [self._public(d) for d in self._docs.list(tenant)]
        resp.media = {"items": items, "total": len(items)}
        resp.cache_control = ["no-store"]

    def _body(self, spec: PolicyBody) -> dict[str, Any]:
        return {
            "name": spec.name,
            "rules": _check_rules(msgspec.to_builtins(spec.rules), self._ctx),
            "description": spec.description,
            "enabled": spec.enabled,
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        spec: PolicyCreate = req.context.body
        policy_id = spec.id or f"pol_{secrets.token_hex(6)}"
        if policy_id == _POLICY_VIEW:
            raise ProblemError(409, f"'{_POLICY_VIEW}' is the tenant's rules document.")
        doc = self._docs.create(tenant, policy_id, self._body(spec))
        req.context.audit = {"target": f"policy/{policy_id}", "before": None, "after": doc.revision}
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/recs/policies/{policy_id}"
        set_etag(resp, doc.revision)
        resp.media = self._public(doc)

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, policy_id: str) -> None:
        tenant = req.context.principal.tenant
        if policy_id == _POLICY_VIEW:
            view = self._view(tenant)
            set_etag(resp, view["version"])
            resp.media = view
            return
        doc = self._docs.require(tenant, policy_id)
        set_etag(resp, doc.revision)
        resp.media = self._public(doc)

    def _not_the_view(self, policy_id: str) -> None:
        if policy_id == _POLICY_VIEW:
            raise ProblemError(
                409,
                f"'{_POLICY_VIEW}' is the tenant's rules document: change it with "
                "PUT /v1/admin/tenants/{tenant_id}/rules.",
                code="RECSYS_POLICY_IS_A_VIEW",
            )

    def on_put_one(self, req: falcon.Request, resp: falcon.Response, policy_id: str) -> None:
        self._not_the_view(policy_id)
        tenant = req.context.principal.tenant
        spec: PolicyBody = req.context.body
        body = self._body(spec)
        doc, created, before = self._docs.put_replacing(
            tenant, policy_id, body, Preconditions.of(req)
        )
        req.context.audit = {
            "target": f"policy/{policy_id}",
            "before": before,
            "after": doc.revision,
        }
        if created:
            resp.status = falcon.HTTP_201
        set_etag(resp, doc.revision)
        resp.media = self._public(doc)

    def on_delete_one(self, req: falcon.Request, resp: falcon.Response, policy_id: str) -> None:
        self._not_the_view(policy_id)
        tenant = req.context.principal.tenant
        before = self._docs.delete(tenant, policy_id, Preconditions.of(req)).revision
        req.context.audit = {"target": f"policy/{policy_id}", "before": before, "after": None}
        resp.status = falcon.HTTP_204


def _entry_time(value: dt.datetime | None) -> str | None:
    """A time as the audit entries write theirs (UTC, microseconds, Z): they compare as text."""
    if value is None:
        return None
    if value.tzinfo is None:  # (the query type requires an offset; UTC all the same)
        value = value.replace(tzinfo=dt.UTC)
    stamp = value.astimezone(dt.UTC).isoformat(timespec="microseconds")
    return stamp.replace("+00:00", "Z")


class AuditResource:
    def __init__(self, ctx: Any) -> None:
        self._log = AuditLog(os.path.join(ctx.serving_dir, "audit"))

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        q: AuditQuery = req.context.query
        rows = self._log.query(
            tenant,
            since=_entry_time(q.since),
            until=_entry_time(q.until),
            actor=q.actor,
            route=q.route,
            after_seq=q.cursor,
            limit=q.limit + 1,
        )
        more = len(rows) > q.limit
        rows = rows[: q.limit]
        resp.media = {
            "items": rows,
            "next_cursor": str(rows[-1]["seq"]) if more else None,
        }
        resp.cache_control = ["no-store"]


# --- policies in the engine --------------------------------------------------------------------
@functools.cache
def _policy_collection(data_root: str) -> Collection:
    return store_collections(data_root)["policies"]


def effective_rules(
    data_root: str, tenant: str, rules: list[dict[str, Any]], version: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """The tenant's rules followed by those of its enabled policies (each rule id prefixed
    with its policy's id), and a version naming every part; unchanged without policies."""
    policies = _policy_collection(data_root).cached_list(tenant)
    active = [d for d in policies.values() if d.body.get("enabled", True)]
    if not active:
        return rules, version
    merged = list(rules)
    parts = [version or "none"]
    for doc in sorted(active, key=lambda d: d.id):
        merged += [{**r, "id": f"{doc.id}:{r['id']}"} for r in doc.body["rules"]]
        parts.append(doc.revision)
    return merged, "+".join(parts)


# --- the route table ---------------------------------------------------------------------------
_KEY = {"key_id": KeyIdText}
_POLICY = {"policy_id": PolicyId}
TAGS = ("access",)

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/recs/keys",
        ("access_keys", "on_get"),
        "The tenant's API keys (prefix, scopes, created, expires, last used; never the key)",
        SCOPE_ADMIN,
        response=KeyList,
        tags=TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/keys",
        ("access_keys", "on_post"),
        "A new API key, shown in this answer only (403 when the keys quota is used up)",
        SCOPE_ADMIN,
        body=KeyCreate,
        status=201,
        response=KeyCreated,
        errors=(403, 409),
        tags=TAGS,
    ),
    Route(
        "DELETE",
        "/v1/recs/keys/{key_id}",
        ("access_keys", "on_delete_one"),
        "Revoke a key (refused on every worker within a second)",
        SCOPE_ADMIN,
        params=_KEY,
        status=204,
        errors=CONFLICT_STATUSES,
        headers=("If-Match",),
        tags=TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/rate-limits",
        ("access_rate_limits", "on_get"),
        "Rate limits per key and per tenant (ETag: their version)",
        SCOPE_ADMIN,
        response=RateLimits,
        tags=TAGS,
    ),
    Route(
        "PUT",
        "/v1/recs/rate-limits",
        ("access_rate_limits", "on_put"),
        "Replace the rate limits (applied by every worker within a second; at most the server's)",
        SCOPE_ADMIN,
        body=RateLimits,
        response=RateLimits,
        errors=(422, *CONFLICT_STATUSES),
        headers=("If-Match", "If-None-Match"),
        tags=TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/quotas",
        ("access_quotas", "on_get"),
        "The tenant's quotas and their use",
        SCOPE_ADMIN,
        response=QuotaReport,
        tags=TAGS,
    ),
    Route(
        "PATCH",
        "/v1/recs/quotas",
        ("access_quotas", "on_patch"),
        "Change some quotas (each at most the server's default)",
        SCOPE_ADMIN,
        body=Quotas,
        response=QuotaReport,
        errors=(422, *CONFLICT_STATUSES),
        headers=("If-Match",),
        tags=TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/policies",
        ("access_policies", "on_get"),
        "Named business-rule sets (the tenant's rules document is the policy 'tenant-rules')",
        SCOPE_ADMIN,
        response=PolicyList,
        tags=TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/policies",
        ("access_policies", "on_post"),
        "A new policy; its rules apply to recommendations while it is enabled",
        SCOPE_ADMIN,
        body=PolicyCreate,
        status=201,
        response=Policy,
        errors=(409, 422),
        tags=TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/policies/{policy_id}",
        ("access_policies", "on_get_one"),
        "One policy (ETag: its version)",
        SCOPE_ADMIN,
        params=_POLICY,
        response=Policy,
        tags=TAGS,
    ),
    Route(
        "PUT",
        "/v1/recs/policies/{policy_id}",
        ("access_policies", "on_put_one"),
        "Create or replace a policy",
        SCOPE_ADMIN,
        params=_POLICY,
        body=PolicyBody,
        also=(201,),
        response=Policy,
        errors=(422, *CONFLICT_STATUSES),
        headers=("If-Match", "If-None-Match"),
        tags=TAGS,
    ),
    Route(
        "DELETE",
        "/v1/recs/policies/{policy_id}",
        ("access_policies", "on_delete_one"),
        "Delete a policy",
        SCOPE_ADMIN,
        params=_POLICY,
        status=204,
        errors=CONFLICT_STATUSES,
        headers=("If-Match",),
        tags=TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/audit/logs",
        ("access_audit", "on_get"),
        "The audit log of every write on an admin route (filters: time, actor, route; cursor)",
        SCOPE_ADMIN,
        query=AuditQuery,
        response=AuditPage,
        tags=TAGS,
    ),
)


def resources(ctx: Any) -> dict[str, Any]:
    return {
        "access_keys": KeysResource(ctx),
        "access_rate_limits": RateLimitsResource(ctx),
        "access_quotas": QuotasResource(ctx),
        "access_policies": PoliciesResource(ctx),
        "access_audit": AuditResource(ctx),
    }

"""Control plane: monitoring - health, metrics, usage, logs; cache control; the event stream.

Routes (every one the caller's tenant only):

* ``GET /v1/recs/health``: each dependency's state and check latency - the tenant's live
  snapshot, its event log, the MLflow store, the Dagster webserver, Redis and PostgreSQL where
  configured; 503 when the tenant cannot be served (no snapshot), else 200 (``degraded`` when an
  optional dependency is down: recommendations keep serving).
* ``GET /v1/recs/metrics?from=&to=&route=&step=&online=``: QPS, error rate and p50/p95/p99
  latency per route and model over a time range, from the server's per-minute time series
  (`serving.control.timeseries`, written by each worker's metrics thread); with ``online=true``
  also CTR, conversion and revenue per impression per model, surface and experiment variant
  (`serving.control.online`, from the event log).
* ``GET /v1/recs/usage``: requests and inferences over a range, events, storage bytes, index
  sizes and quota use.
* ``GET /v1/recs/logs``: the tenant's access log lines by time, route, method, status and request
  id (DuckDB over the rotated JSON-lines files `serving.accesslog.RotatingFiles` writes under
  ``<data root>/serving/logs/access``).
* ``GET /v1/recs/cache/status``, ``POST /v1/recs/cache/invalidate``,
  ``POST /v1/recs/cache/prewarm``: `serving.control.cache`.
* ``GET /v1/recs/events/stream``: Server-Sent Events, `serving.control.eventstream`.

`resources(ctx)` also switches on what feeds them in each worker: the shared /metrics view
(`Metrics.share`), the minute recorder and the access-log files.
"""

from __future__ import annotations

import datetime as dt
import glob
import os
import re
import sqlite3
import time
import urllib.error
import urllib.request
from typing import Annotated, Any, Literal

import falcon
import msgspec
from msgspec import Meta

from recsys.storage import Storage
from serving import accesslog
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.control import cache, eventstream, timeseries
from serving.errors import ProblemError
from serving.events_log import landed_api_files
from serving.metrics import server_id
from serving.routing import Route
from serving.schemas import Reply

ADMIN, READ = SCOPE_ADMIN, SCOPE_RECOMMEND
#: Seconds a dependency check may take before it counts as down.
CHECK_TIMEOUT_S = 2.0
#: The default range of /metrics, /usage and /logs queries (seconds back from now).
DEFAULT_RANGE_S = 3600
MAX_LOG_LINES = 1000

Time = Annotated[
    str,
    Meta(
        max_length=40,
        description="RFC 3339 time (2026-12-02T13:00:00Z) or epoch seconds",
        examples=["2026-12-02T13:00:00Z"],
    ),
]


class RangeQuery(msgspec.Struct, omit_defaults=True):
    from_: Time | None = msgspec.field(default=None, name="from")
    to: Time | None = None


class MetricsQuery(RangeQuery):
    route: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    online: Annotated[
        bool,
        Meta(description="also the online evaluation (CTR, conversion, revenue per impression)"),
    ] = False
    step: Annotated[int, Meta(ge=60, le=86400, description="seconds per series point")] | None = (
        None
    )


class LogsQuery(RangeQuery):
    route: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"] | None = None
    status: Annotated[int, Meta(ge=100, le=599)] | None = None
    request_id: Annotated[str, Meta(min_length=1, max_length=128)] | None = None
    limit: Annotated[int, Meta(ge=1, le=MAX_LOG_LINES)] = 100
    cursor: Annotated[int, Meta(ge=0, le=2**31 - 1, description="offset of the next page")] = 0


class Dependency(Reply):
    name: str
    state: Literal["ok", "down", "not_configured"]
    latency_ms: float | None
    detail: str | None = None


class HealthReport(Reply):
    tenant_id: str
    status: Literal["ok", "degraded", "down"]
    checked_at: str
    dependencies: list[Dependency]


class Latency(Reply):
    mean: float | None
    p50: float | None
    p95: float | None
    p99: float | None


class Figures(Reply):
    requests: int
    qps: float
    error_rate: float
    client_error_rate: float
    latency_ms: Latency


class RouteFigures(Figures):
    route: str
    model: str | None


class SeriesPoint(Figures):
    start: str


class OnlineFigures(Reply):
    day: str
    model: str | None
    surface: str | None
    variant: str | None
    impressions: int
    requests: int
    clicks: int
    purchases: int
    revenue: float
    ctr: float
    conversion: float
    revenue_per_impression: float


class MetricsReport(Reply):
    tenant_id: str
    from_: str = msgspec.field(name="from")
    to: str
    routes: list[RouteFigures]
    series: list[SeriesPoint]
    source: str
    online: list[OnlineFigures] | None = None


class StorageUse(Reply):
    total_bytes: int
    by_area: dict[str, int]


class IndexSize(Reply):
    snapshot_id: str | None
    users: int
    items: int
    candidates: int
    bytes: int


class UsageReport(Reply):
    tenant_id: str
    from_: str = msgspec.field(name="from")
    to: str
    requests: int
    inferences: int
    errors: int
    events: dict[str, int]
    storage: StorageUse
    index: IndexSize
    quotas: dict[str, Any]


class LogLine(Reply):
    ts: str
    request_id: str | None
    method: str
    path: str
    route: str
    status: int
    duration_ms: float
    remote: str | None
    user_agent: str | None


class LogsPage(Reply):
    items: list[LogLine]
    next_cursor: str | None


_TAGS = ("monitoring",)

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/recs/health",
        ("monitoring", "on_get_health"),
        "Each dependency's state and check latency (503: the tenant cannot be served)",
        READ,
        also=(503,),
        response=HealthReport,
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/metrics",
        ("monitoring", "on_get_metrics"),
        "QPS, error rate and p50/p95/p99 latency per route and model over a time range",
        ADMIN,
        query=MetricsQuery,
        response=MetricsReport,
        errors=(422,),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/usage",
        ("monitoring", "on_get_usage"),
        "Requests, inferences, events, storage, index size and quota use of the tenant",
        ADMIN,
        query=RangeQuery,
        response=UsageReport,
        errors=(422,),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/logs",
        ("monitoring", "on_get_logs"),
        "The tenant's access log lines by time, route, method, status and request id",
        ADMIN,
        query=LogsQuery,
        response=LogsPage,
        errors=(422,),
        tags=_TAGS,
    ),
    *cache.ROUTES,
    *eventstream.ROUTES,
)


def resources(ctx: Any) -> dict[str, Any]:
    return {
        "monitoring": MonitoringResource(ctx),
        "cache": cache.CacheResource(ctx),
        "event_stream": eventstream.EventStreamResource(ctx),
    }


# --- time ranges -------------------------------------------------------------------------------
def parse_time(text: str | None, default: float) -> float:
    """Epoch seconds of an RFC 3339 time or a number of epoch seconds, from 1970 to 9999 (422
    otherwise)."""
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        try:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise _bad_time(text) from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        value = when.timestamp()
    if not 0 <= value <= _MAX_TIME:  # (also NaN)
        raise _bad_time(text)
    return value


_MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z


def _bad_time(text: str) -> ProblemError:
    return ProblemError(
        422,
        f"'{text}' is not an RFC 3339 time or epoch seconds between 1970 and 9999.",
        code="RECSYS_BAD_TIME",
    )


def time_range(query: RangeQuery) -> tuple[float, float]:
    now = time.time()
    end = parse_time(query.to, now)
    start = parse_time(query.from_, end - DEFAULT_RANGE_S)
    if start >= end:
        raise ProblemError(422, "'from' must be before 'to'.", code="RECSYS_BAD_RANGE")
    return start, end


def iso(ts: float) -> str:
    return (
        dt.datetime.fromtimestamp(ts, dt.UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


# --- the feeds, switched on per worker ---------------------------------------------------------
def metrics_dir(ctx: Any) -> str:
    return os.path.join(ctx.serving_dir, "metrics")


def timeseries_path(ctx: Any) -> str:
    return os.path.join(metrics_dir(ctx), "timeseries.sqlite")


def access_log_dir(ctx: Any) -> str:
    return os.path.join(ctx.serving_dir, "logs", "access")


def _model_of(store: Any):
    def model_of(tenant: str) -> str | None:
        live = store.live(tenant)
        return live.snapshot_id if live is not None else None

    return model_of


def start_feeds(ctx: Any) -> None:
    """The shared /metrics view and the minute recorder (one thread per worker), and the
    access log's files when the access log is on."""
    recorder = timeseries.MinuteRecorder(
        timeseries_path(ctx), f"{server_id()}/{os.getpid()}", _model_of(ctx.store)
    )
    ctx.metrics.share(metrics_dir(ctx), on_tick=recorder.tick)
    ctx.metrics.recorder = recorder
    if ctx.config.access_log:
        accesslog.log_to_files(access_log_dir(ctx))


# --- the resource ------------------------------------------------------------------------------
class MonitoringResource:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        start_feeds(ctx)

    # health -----------------------------------------------------------------------------------
    def on_get_health(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        checks = [
            self._check("snapshot", lambda: self._snapshot(tenant)),
            self._check("event_log", lambda: self._event_log(tenant)),
            self._check("mlflow", self._mlflow),
            self._check("dagster", self._dagster),
            self._check("redis", self._redis),
            self._check("postgres", self._postgres),
        ]
        if checks[0].state != "ok":
            status = "down"
        elif any(c.state == "down" for c in checks):
            status = "degraded"
        else:
            status = "ok"
        resp.status = falcon.HTTP_503 if status == "down" else falcon.HTTP_200
        resp.cache_control = ["no-store"]
        resp.media = msgspec.to_builtins(
            HealthReport(tenant, status, iso(time.time()), checks)  # type: ignore[arg-type]
        )

    @staticmethod
    def _check(name: str, probe) -> Dependency:
        t = time.perf_counter()
        try:
            detail = probe()
        except _NotConfigured as e:
            return Dependency(name, "not_configured", None, str(e))
        except Exception as e:  # noqa: BLE001 (any failure of a dependency is its state)
            ms = round((time.perf_counter() - t) * 1000, 3)
            return Dependency(name, "down", ms, f"{type(e).__name__}: {e}"[:500])
        return Dependency(name, "ok", round((time.perf_counter() - t) * 1000, 3), detail)

    def _snapshot(self, tenant: str) -> str:
        live = self._ctx.store.live(tenant)
        if live is None:
            holder = self._ctx.store.tenant(tenant)
            why = holder.last_error if holder is not None and holder.last_error else None
            raise RuntimeError(why or f"no snapshot is loaded for tenant '{tenant}'")
        age = time.time() - live.created_ts
        return f"{live.snapshot_id} ({live.algo_version}), {age:.0f} s old"

    def _event_log(self, tenant: str) -> str:
        tlog = self._ctx.event_logs.tenant(tenant)
        wal = tlog.log.wal_dir
        if not os.access(wal, os.W_OK):
            raise RuntimeError(f"{wal} is not writable")
        return f"{tlog.log.active_bytes()} bytes in the active segment"

    def _mlflow(self) -> str:
        uri = self._ctx.mlflow_uri
        if uri.startswith("sqlite:///"):
            path = uri[len("sqlite:///") :]
            if not os.path.exists(path):
                raise RuntimeError(f"{path} does not exist")
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=CHECK_TIMEOUT_S)
            try:
                (n,) = conn.execute("SELECT count(*) FROM experiments").fetchone()
            finally:
                conn.close()
            return f"sqlite store, {n} experiments"
        if uri.startswith(("http://", "https://")):
            _http_get(uri.rstrip("/") + "/health")
            return "tracking server answers /health"
        import mlflow  # (other stores: through the client)

        mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        return "store answers"

    def _dagster(self) -> str:
        url = self._ctx.config.dagster_url
        if not url:
            raise _NotConfigured("RECSYS_DAGSTER_URL is not set")
        body = _http_get(url.rstrip("/") + "/server_info")
        return body.decode(errors="replace")[:200]

    def _redis(self) -> str:
        url = self._ctx.config.redis_url
        if not url:
            raise _NotConfigured("RECSYS_REDIS_URL is not set")
        import redis

        client = redis.Redis.from_url(
            url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S
        )
        try:
            client.ping()
        finally:
            client.close()
        return "PING answered"

    def _postgres(self) -> str:
        url = self._ctx.config.postgres_url
        if not url:
            raise _NotConfigured("RECSYS_PG_URL is not set")
        import psycopg

        url = re.sub(r"^postgresql\+\w+://", "postgresql://", url)  # (SQLAlchemy's form)
        with psycopg.connect(url, connect_timeout=int(CHECK_TIMEOUT_S)) as conn:
            conn.execute("SELECT 1")
        return "SELECT 1 answered"

    # metrics ----------------------------------------------------------------------------------
    def on_get_metrics(self, req: falcon.Request, resp: falcon.Response) -> None:
        query: MetricsQuery = req.context.query
        tenant = req.context.principal.tenant
        start, end = time_range(query)
        self._record_now()
        figures = timeseries.query(
            timeseries_path(self._ctx), tenant, start, end, query.route, query.step
        )
        body = {
            "tenant_id": tenant,
            "from": iso(start),
            "to": iso(end),
            **figures,
            "source": "server time series (per minute, every worker)",
        }
        if query.online:
            from serving.control.online import online_figures

            tlog = self._ctx.event_logs.tenant(tenant)
            body["online"] = online_figures(self._ctx.config.data_root, tenant, start, end, tlog)
        resp.cache_control = ["no-store"]
        resp.media = body

    def _record_now(self) -> None:
        """Write this worker's current minute now (other workers' rows are <= 5 s old)."""
        recorder = getattr(self._ctx.metrics, "recorder", None)
        if recorder is not None:
            recorder.tick(self._ctx.metrics.state(), force=True)

    # usage ------------------------------------------------------------------------------------
    def on_get_usage(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        start, end = time_range(req.context.query)
        self._record_now()
        figures = timeseries.query(timeseries_path(self._ctx), tenant, start, end)
        requests = sum(r["requests"] for r in figures["routes"])
        errors = sum(round(r["requests"] * r["error_rate"]) for r in figures["routes"])
        inferences = sum(
            r["requests"] * (1 - r["error_rate"] - r["client_error_rate"])
            for r in figures["routes"]
            if r["route"] in timeseries.SERVING_ROUTES
        )
        resp.media = {
            "tenant_id": tenant,
            "from": iso(start),
            "to": iso(end),
            "requests": requests,
            "inferences": round(inferences),
            "errors": errors,
            "events": self._events(tenant),
            "storage": self._storage(tenant),
            "index": self._index(tenant),
            "quotas": self._quotas(tenant),
        }

    def _events(self, tenant: str) -> dict[str, int]:
        import pyarrow.parquet as pq

        root = self._ctx.config.data_root
        out = {"warehouse": 0, "landed_from_api": 0, "in_log_bytes": 0}
        from recsys.ingest import event_parts  # (heavy: only this report needs it)

        for path in event_parts(Storage(root), tenant):
            out["warehouse"] += pq.ParquetFile(path).metadata.num_rows
        # (flushed from the log, not yet ingested: ingest moves them into the warehouse's folder)
        for path in landed_api_files(Storage(root), tenant):
            out["landed_from_api"] += pq.ParquetFile(path).metadata.num_rows
        wal = os.path.join(root, "serving", "events", tenant, "wal")
        out["in_log_bytes"] = disk_usage(wal)
        return out

    def _storage(self, tenant: str) -> dict[str, Any]:
        root = self._ctx.config.data_root
        areas = {
            "landing": os.path.join(root, "landing", tenant),
            "warehouse": os.path.join(root, "warehouse", tenant),
            "snapshots": os.path.join(root, "snapshots", tenant),
            "event_log": os.path.join(root, "serving", "events", tenant),
            "feedback_log": os.path.join(root, "serving", "feedback", tenant),
            "evaluation": os.path.join(root, "evaluation", tenant),
        }
        by_area = {name: disk_usage(path) for name, path in areas.items()}
        return {"total_bytes": sum(by_area.values()), "by_area": by_area}

    def _index(self, tenant: str) -> dict[str, Any]:
        live = self._ctx.store.live(tenant)
        if live is None:
            return {"snapshot_id": None, "users": 0, "items": 0, "candidates": 0, "bytes": 0}
        snap = live.snap
        return {
            "snapshot_id": live.snapshot_id,
            "users": int(snap.n_users),
            "items": int(snap.n_items),
            "candidates": int(snap.candidate_offsets[-1]),
            "bytes": disk_usage(snap.path),
        }

    def _quotas(self, tenant: str) -> dict[str, Any]:
        from serving.control import access

        usage = getattr(access, "quota_usage", None)
        if usage is not None:
            return usage(self._ctx, tenant)
        return {"limits": access.quotas(self._ctx, tenant)}

    # logs -------------------------------------------------------------------------------------
    def on_get_logs(self, req: falcon.Request, resp: falcon.Response) -> None:
        query: LogsQuery = req.context.query
        tenant = req.context.principal.tenant
        start, end = time_range(query)
        accesslog.flush()  # (this worker's waiting lines; the others' are <= 0.5 s old)
        lines = query_logs(access_log_dir(self._ctx), tenant, start, end, query)
        more = len(lines) > query.limit
        resp.cache_control = ["no-store"]
        resp.media = {
            "items": [{**line, "ts": iso(line["ts"])} for line in lines[: query.limit]],
            "next_cursor": str(query.cursor + query.limit) if more else None,
        }


class _NotConfigured(Exception):
    pass


def _http_get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=CHECK_TIMEOUT_S) as r:
            return r.read(4096)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"GET {url} answered {e.code}") from None


def disk_usage(path: str) -> int:
    """Bytes of the files under `path` (0 when absent)."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
    return total


_LOG_COLUMNS = {
    "ts": "DOUBLE",
    "request_id": "VARCHAR",
    "method": "VARCHAR",
    "path": "VARCHAR",
    "route": "VARCHAR",
    "status": "INTEGER",
    "duration_ms": "DOUBLE",
    "tenant": "VARCHAR",
    "remote": "VARCHAR",
    "user_agent": "VARCHAR",
}


def log_files(folder: str, start: float, end: float) -> list[str]:
    """The access log files whose hour overlaps [start, end] (their names carry the hour)."""
    first = time.strftime("%Y%m%d%H", time.gmtime(start))
    last = time.strftime("%Y%m%d%H", time.gmtime(end))
    out = []
    for path in sorted(glob.glob(os.path.join(folder, "access-*.jsonl"))):
        hour = os.path.basename(path).split("-")[1]
        if first <= hour <= last and os.path.getsize(path):
            out.append(path)
    return out


def query_logs(
    folder: str, tenant: str, start: float, end: float, query: LogsQuery
) -> list[dict[str, Any]]:
    """Up to `query.limit` + 1 lines of `tenant` (newest first, from `query.cursor`)."""
    files = log_files(folder, start, end)
    if not files:
        return []
    import duckdb

    where = ["tenant = ?", "ts >= ?", "ts <= ?"]
    args: list[Any] = [tenant, start, end]
    for name in ("route", "method", "status", "request_id"):
        value = getattr(query, name)
        if value is not None:
            where.append(f"{name} = ?")
            args.append(value)
    sql = (
        "SELECT ts, request_id, method, path, route, status, duration_ms, remote, user_agent "
        f"FROM read_json(?, format='newline_delimited', columns={_LOG_COLUMNS!r}, "
        "ignore_errors=true) "
        f"WHERE {' AND '.join(where)} ORDER BY ts DESC, request_id LIMIT ? OFFSET ?"
    )
    conn = duckdb.connect()
    try:
        cur = conn.execute(sql, [files, *args, query.limit + 1, query.cursor])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    finally:
        conn.close()

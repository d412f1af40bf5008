"""The server's own small time series of requests: per minute, worker, tenant, route, method,
status and model, in one SQLite file (``<data root>/serving/metrics/timeseries.sqlite``).

Data flow: a request is counted in its worker's memory (`serving.metrics.Metrics`); the worker's
metrics thread (`Metrics.share`) hands its state (every 0.5 s) to `MinuteRecorder.tick`, which
every `every_s` seconds (5) writes the current minute's counts - the worker's totals now minus
its totals when the minute began - as upserts of that minute's rows, unless they are the rows it
wrote last (an idle worker writes nothing). Nothing touches the file on the request path. The
rows of a minute are final once the next minute has begun (the last tick of a minute is written
on the first tick of the next); rows older than `keep_days` are deleted once an hour.

`query` reads them back for `/v1/recs/metrics`: per route and model over a time range, QPS,
error rate and p50/p95/p99 latency, the quantiles interpolated inside the latency histogram's
buckets (`serving.metrics.quantile`, as Prometheus's histogram_quantile), and optionally a
series per `step_s`. The "model" of a row is the snapshot the worker served the tenant from
during that minute (its live snapshot when the minute's row is written), for the serving
routes (`SERVING_ROUTES`); other routes have none.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from serving.metrics import LATENCY_BUCKETS, quantile

#: Routes whose answers come from a tenant's snapshot (their rows name the model).
SERVING_ROUTES = frozenset(
    {
        "/v1/recommend",
        "/v1/similar",
        "/v1/recs/predict",
        "/v1/recs/users/{user_id}",
        "/v1/recs/users/{user_id}/realtime",
        "/v1/recs/batch/predict",
        "/v1/recs/item/{item_id}/related",
        "/v1/recs/score",
        "/v1/recs/rerank",
        "/v1/crr/users/{uid}/recommendations",
        "/v1/crr/users/{uid}/predictions",
    }
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    minute INTEGER NOT NULL,          -- epoch seconds of the minute's start (UTC)
    worker TEXT NOT NULL,             -- <server id>/<pid>
    tenant TEXT NOT NULL,
    route TEXT NOT NULL,
    method TEXT NOT NULL,
    status INTEGER NOT NULL,
    model TEXT NOT NULL,              -- the snapshot id served ('' when none)
    count INTEGER NOT NULL,
    sum_s REAL NOT NULL,
    buckets TEXT NOT NULL,            -- JSON list: count per latency bucket, then +Inf
    PRIMARY KEY (minute, worker, tenant, route, method, status, model)
);
CREATE INDEX IF NOT EXISTS requests_tenant_minute ON requests (tenant, minute);
"""


def connect(path: str) -> sqlite3.Connection:
    """A connection to the time series file (created with its table), WAL mode, waiting up to
    10 s for another worker's write."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(_SCHEMA)
    return conn


class MinuteRecorder:
    """A worker's writer of its per-minute rows (`tick` is the `Metrics.share` callback).

    model_of(tenant) -> the snapshot id the worker serves the tenant from (or None)."""

    def __init__(
        self,
        path: str,
        worker: str,
        model_of: Callable[[str], str | None],
        every_s: float = 5.0,
        keep_days: float = 14.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self.worker = worker
        self._model_of = model_of
        self._every = every_s
        self._keep_s = keep_days * 86400
        self._clock = clock
        self._conn: sqlite3.Connection | None = None
        self._minute: int | None = None
        self._base: dict[tuple, list[float]] = {}  # totals when the current minute began
        self._last: dict[tuple, list[float]] = {}  # totals at the last tick
        self._written_at = 0.0
        self._written: tuple | None = None  # (minute, totals) of the last regular write
        self._pruned_at = 0.0
        self._lock = threading.Lock()

    def tick(self, state: dict[str, Any], force: bool = False) -> None:
        """Take a worker state (`Metrics.state`); write the minute's rows when `every_s` has
        passed, the minute changed, or `force`."""
        now = self._clock()
        minute = int(now // 60) * 60
        totals = {tuple(r[:4]): r[4:] for r in state["requests"]}
        with self._lock:
            if self._minute is None:
                self._minute = minute
            if minute != self._minute:  # close the previous minute with the last totals
                self._write(self._minute, self._last)
                self._base, self._minute = self._last, minute
                self._written_at = now
            self._last = totals
            if force or now - self._written_at >= self._every:
                if force or self._written != (minute, totals):  # (else the same rows again)
                    self._write(minute, totals)
                    self._written = (minute, totals)
                self._written_at = now
            if now - self._pruned_at >= 3600:
                self._prune(now)
                self._pruned_at = now

    def _write(self, minute: int, totals: dict[tuple, list[float]]) -> None:
        rows = []
        models: dict[str, str] = {}
        for key, values in totals.items():
            base = self._base.get(key)
            delta = values if base is None else [v - b for v, b in zip(values, base, strict=True)]
            count = sum(delta[:-1])
            if count <= 0:
                continue
            route, method, status, tenant = key
            model = ""
            if tenant and route in SERVING_ROUTES:
                if tenant not in models:
                    models[tenant] = self._model_of(tenant) or ""
                model = models[tenant]
            rows.append(
                (
                    minute,
                    self.worker,
                    tenant,
                    route,
                    method,
                    int(status),
                    model,
                    int(count),
                    delta[-1],
                    orjson.dumps([int(c) for c in delta[:-1]]).decode(),
                )
            )
        if not rows:
            return
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            # (a minute's rows are replaced whole: a model change within it moves them)
            conn.execute(
                "DELETE FROM requests WHERE minute = ? AND worker = ?", (minute, self.worker)
            )
            conn.executemany("INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _prune(self, now: float) -> None:
        self._connection().execute("DELETE FROM requests WHERE minute < ?", (now - self._keep_s,))

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = connect(self.path)
        return self._conn


def query(
    path: str,
    tenant: str,
    start: float,
    end: float,
    route: str | None = None,
    step_s: int | None = None,
) -> dict[str, Any]:
    """The tenant's figures between `start` and `end` (epoch seconds; whole minutes that begin
    in the range): per (route, model), and with `step_s` a series per step of the whole."""
    if not os.path.exists(path):
        return {"routes": [], "series": []}
    sql = (
        "SELECT minute, route, method, status, model, count, sum_s, buckets FROM requests "
        "WHERE tenant = ? AND minute >= ? AND minute < ?"
    )
    args: list[Any] = [tenant, int(start // 60) * 60, end]
    if route is not None:
        sql += " AND route = ?"
        args.append(route)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
    try:
        rows = conn.execute(sql, args).fetchall()
    finally:
        conn.close()
    seconds = max(end - start, 1.0)
    groups: dict[tuple[str, str], _Acc] = {}
    steps: dict[int, _Acc] = {}
    for minute, rroute, method, status, model, count, sum_s, buckets in rows:
        hist = orjson.loads(buckets)
        groups.setdefault((rroute, model), _Acc()).add(count, status, sum_s, hist, method)
        if step_s:
            at = int(start + ((minute - start) // step_s) * step_s)
            steps.setdefault(at, _Acc()).add(count, status, sum_s, hist, method)
    out_routes = [
        {"route": r, "model": m or None, **acc.figures(seconds)}
        for (r, m), acc in sorted(groups.items())
    ]
    series = []
    if step_s:
        series = [
            {"start": _iso(at), **acc.figures(min(step_s, max(end - at, 1.0)))}
            for at, acc in sorted(steps.items())
        ]
    return {"routes": out_routes, "series": series}


class _Acc:
    """Sums of rows: requests, errors (5xx), client errors (4xx), latency histogram."""

    __slots__ = ("requests", "errors", "client_errors", "sum_s", "hist", "methods")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.client_errors = 0
        self.sum_s = 0.0
        self.hist = [0.0] * (len(LATENCY_BUCKETS) + 1)
        self.methods: set[str] = set()

    def add(self, count: int, status: int, sum_s: float, hist: list[int], method: str) -> None:
        self.requests += count
        if status >= 500:
            self.errors += count
        elif status >= 400:
            self.client_errors += count
        self.sum_s += sum_s
        for j, c in enumerate(hist):
            self.hist[j] += c
        self.methods.add(method)

    def figures(self, seconds: float) -> dict[str, Any]:
        def ms(q: float) -> float | None:
            v = quantile(LATENCY_BUCKETS, self.hist, q)
            return None if v is None else round(v * 1000, 3)

        n = self.requests
        return {
            "requests": n,
            "qps": n / seconds,
            "error_rate": self.errors / n if n else 0.0,
            "client_error_rate": self.client_errors / n if n else 0.0,
            "latency_ms": {
                "mean": round(self.sum_s / n * 1000, 3) if n else None,
                "p50": ms(0.5),
                "p95": ms(0.95),
                "p99": ms(0.99),
            },
        }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

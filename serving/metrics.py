"""A small Prometheus text-format registry (counters, gauges, histograms with labels).

Metrics are per worker process: each gunicorn worker answers /metrics from its own counters (the
`recsys_worker_pid` gauge says which one answered), so a scrape through gunicorn sees one worker
at a time; counters are monotonic per worker, so rate() over scrapes stays meaningful.
(prometheus_client's multiprocess mode would aggregate across workers; it is not a dependency.)
"""

from __future__ import annotations

import bisect
import os
import threading
from collections.abc import Callable, Iterable

#: Latency buckets in seconds, tuned for a sub-millisecond hot path.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

LabelKey = tuple[str, ...]


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: LabelKey, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class Counter:
    def __init__(self, name: str, doc: str, labels: tuple[str, ...]) -> None:
        self.name, self.doc, self.label_names = name, doc, labels
        self.values: dict[LabelKey, float] = {}
        self._lock = threading.Lock()

    def inc(self, labels: LabelKey, amount: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def inc_each(self, first: str, amounts: dict[str, float]) -> None:
        """`inc((first, name), amount)` for each name -> amount (one lock)."""
        if not amounts:
            return
        values = self.values
        with self._lock:
            for name, amount in amounts.items():
                key = (first, name)
                values[key] = values.get(key, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} counter"
        for key, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.label_names, key)} {value:g}"


class Histogram:
    def __init__(self, name: str, doc: str, labels: tuple[str, ...], buckets=LATENCY_BUCKETS):
        self.name, self.doc, self.label_names = name, doc, labels
        self.buckets = tuple(buckets)
        self.values: dict[LabelKey, list[float]] = {}  # bucket counts..., +Inf count, sum
        self._lock = threading.Lock()

    def observe(self, labels: LabelKey, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            row = self.values.get(labels)
            if row is None:
                row = self.values[labels] = [0.0] * (len(self.buckets) + 2)
            row[i] += 1
            row[-1] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} histogram"
        for key, row in sorted(self.values.items()):
            cumulative = 0.0
            for bound, count in zip(self.buckets, row, strict=False):
                cumulative += count
                le = f'le="{bound}"'
                yield f"{self.name}_bucket{_labels(self.label_names, key, le)} {cumulative:g}"
            cumulative += row[len(self.buckets)]
            inf = _labels(self.label_names, key, 'le="+Inf"')
            yield f"{self.name}_bucket{inf} {cumulative:g}"
            yield f"{self.name}_sum{_labels(self.label_names, key)} {row[-1]:.6f}"
            yield f"{self.name}_count{_labels(self.label_names, key)} {cumulative:g}"


class Metrics:
    """The server's metrics; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.requests = Counter(
            "recsys_http_requests_total",
            "HTTP requests by route, method and status.",
            ("route", "method", "status"),
        )
        self.latency = Histogram(
            "recsys_http_request_duration_seconds",
            "Request latency by route and status.",
            ("route", "method", "status"),
        )
        self.filtered = Counter(
            "recsys_candidates_filtered_total",
            "Candidates removed, by tenant and reason.",
            ("tenant", "reason"),
        )
        self.backfilled = Counter(
            "recsys_backfilled_items_total",
            "Items added from fallback lists, by tenant and list.",
            ("tenant", "source"),
        )
        self.snapshot_loads = Counter(
            "recsys_snapshot_loads_total",
            "Snapshot load attempts by tenant and outcome.",
            ("tenant", "outcome"),
        )
        self._gauges: list[Callable[[], Iterable[str]]] = []
        # (one lock for the two per-request updates: `observe_request`)
        self.latency._lock = self.requests._lock

    def observe_request(self, labels: LabelKey, seconds: float) -> None:
        """`requests.inc(labels)` and `latency.observe(labels, seconds)` under one lock."""
        latency = self.latency
        i = bisect.bisect_left(latency.buckets, seconds)
        counts = self.requests.values
        with self.requests._lock:
            counts[labels] = counts.get(labels, 0.0) + 1.0
            row = latency.values.get(labels)
            if row is None:
                row = latency.values[labels] = [0.0] * (len(latency.buckets) + 2)
            row[i] += 1
            row[-1] += seconds

    def add_gauge_source(self, source: Callable[[], Iterable[str]]) -> None:
        """Register a callable yielding already formatted gauge lines at scrape time."""
        self._gauges.append(source)

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.latency,
            self.filtered,
            self.backfilled,
            self.snapshot_loads,
        ):
            lines.extend(metric.render())
        for source in self._gauges:
            lines.extend(source())
        lines.append("# HELP recsys_worker_pid The pid of the worker that answered this scrape.")
        lines.append("# TYPE recsys_worker_pid gauge")
        lines.append(f"recsys_worker_pid {os.getpid()}")
        return "\n".join(lines) + "\n"

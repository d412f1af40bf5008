"""A small Prometheus text-format registry (counters, gauges, histograms with labels), one view
across the server's worker processes.

Each worker counts in its own memory (`Metrics.observe_request`: one lock, two dict updates;
nothing else on the request path). Requests are counted per route, method, status *and tenant*
(the tenant feeds `/v1/recs/metrics`; /metrics sums it away, so its series keep their labels).

One view across workers (the equivalent of prometheus_client's multiprocess mode, without a
per-increment mmap write): once `Metrics.share(folder)` is called (the monitoring area does it
for the server), a daemon thread of each worker writes its counters every `interval_s`, when
they changed, to ``<folder>/<server>/<pid>.json`` (a whole file, renamed into place), where
``<server>`` names the worker's parent process and its start time, so one gunicorn (or granian)
master's workers share a folder and a restarted server starts from zero. /metrics, answered by
any worker, first writes that worker's own file, then sums every file of the folder: the counts
of the other workers are at most `interval_s` old, and those of workers that exited (gunicorn's
max_requests, a crash) stay in the sum, so counters never go down. Folders of servers that are
gone are removed when a worker starts. Gauges (the snapshot lines) are the answering worker's.

The same thread calls the `on_tick` callbacks with the state every `interval_s` (the
per-minute time series of `serving.control.timeseries` is one).
"""

from __future__ import annotations

import atexit
import bisect
import logging
import os
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import orjson

#: Latency buckets in seconds, tuned for a sub-millisecond hot path.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: Seconds between a worker's writes of its counters (the staleness of other workers' counts).
SHARE_INTERVAL_S = 0.5

LabelKey = tuple[str, ...]
log = logging.getLogger("recsys.serving")


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

    def render(self, values: dict[LabelKey, float] | None = None) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} counter"
        for key, value in sorted((self.values if values is None else values).items()):
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

    def render(self, values: dict[LabelKey, list[float]] | None = None) -> Iterable[str]:
        yield f"# HELP {self.name} {self.doc}"
        yield f"# TYPE {self.name} histogram"
        for key, row in sorted((self.values if values is None else values).items()):
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


def quantile(buckets: tuple[float, ...], row: list[float], q: float) -> float | None:
    """The `q` quantile (0..1) of a histogram row (bucket counts..., +Inf count[, sum]), linearly
    interpolated inside its bucket as Prometheus's histogram_quantile does; the last finite
    bound when it falls in +Inf; None for an empty row."""
    counts = row[: len(buckets) + 1]
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0.0
    for i, count in enumerate(counts):
        if count and cumulative + count >= rank:
            if i == len(buckets):
                return buckets[-1]
            lower = buckets[i - 1] if i else 0.0
            return lower + (buckets[i] - lower) * (rank - cumulative) / count
        cumulative += count
    return buckets[-1]


#: The counters besides the requests, by their name in a shared state.
_COUNTERS = ("filtered", "backfilled", "snapshot_loads", "answers")


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
        self.answers = Counter(
            "recsys_cache_answers_total",
            "Recommend answers by tenant, surface and source: a user's precomputed list (a cache "
            "hit), anchors' similar items, fallback lists.",
            ("tenant", "surface", "source"),
        )
        self._gauges: list[Callable[[], Iterable[str]]] = []
        self._share: _Share | None = None

    def observe_request(self, labels: LabelKey, seconds: float) -> None:
        """Count one request of `labels` = (route, method, status, tenant) that took `seconds`:
        one latency row (bucket counts, +Inf count, sum) per key, whose counts sum to the
        requests (`render` derives recsys_http_requests_total from it)."""
        latency = self.latency
        i = bisect.bisect_left(latency.buckets, seconds)
        with latency._lock:
            row = latency.values.get(labels)
            if row is None:
                row = latency.values[labels] = [0.0] * (len(latency.buckets) + 2)
            row[i] += 1
            row[-1] += seconds

    def add_gauge_source(self, source: Callable[[], Iterable[str]]) -> None:
        """Register a callable yielding already formatted gauge lines at scrape time."""
        self._gauges.append(source)

    # --- one view across workers -------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """This process's counters as plain JSON values: ``requests`` rows [route, method,
        status, tenant, bucket counts..., +Inf count, sum seconds] and each other counter's
        rows [label, label, value]."""
        with self.latency._lock:
            rows = [[*key, *row] for key, row in self.latency.values.items()]
        out: dict[str, Any] = {"pid": os.getpid(), "at": time.time(), "requests": rows}
        for name in _COUNTERS:
            counter: Counter = getattr(self, name)
            with counter._lock:
                out[name] = [[*key, value] for key, value in counter.values.items()]
        return out

    def share(
        self,
        folder: str,
        interval_s: float = SHARE_INTERVAL_S,
        on_tick: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Write this worker's counters under `folder` every `interval_s` and answer /metrics
        with the sum of every worker of the server (see the module docstring); `on_tick` is
        called with each state written. Calling it again adds `on_tick` (one thread)."""
        if self._share is None:
            self._share = _Share(self, folder, interval_s)
        if on_tick is not None:
            self._share.callbacks.append(on_tick)
        self._share.start()

    @property
    def shared(self) -> _Share | None:
        return self._share

    def render(self) -> str:
        share = self._share
        if share is None:
            states, workers = [self.state()], 1
        else:
            states = share.all_states()
            workers = len(states)
        merged = merge_states(states)
        by_route: dict[LabelKey, list[float]] = {}
        for key, row in merged["requests"].items():
            acc = by_route.get(key[:3])
            if acc is None:
                by_route[key[:3]] = list(row)
            else:
                for j, v in enumerate(row):
                    acc[j] += v
        counts = {key: float(sum(row[:-1])) for key, row in by_route.items()}
        lines: list[str] = []
        lines.extend(self.requests.render(counts))
        lines.extend(self.latency.render(by_route))
        for name in _COUNTERS:
            counter: Counter = getattr(self, name)
            lines.extend(counter.render(merged[name]))
        for source in self._gauges:
            lines.extend(source())
        lines.append("# HELP recsys_worker_pid The pid of the worker that answered this scrape.")
        lines.append("# TYPE recsys_worker_pid gauge")
        lines.append(f"recsys_worker_pid {os.getpid()}")
        lines.append("# HELP recsys_workers_reporting Worker processes summed in this scrape.")
        lines.append("# TYPE recsys_workers_reporting gauge")
        lines.append(f"recsys_workers_reporting {workers}")
        return "\n".join(lines) + "\n"


def merge_states(states: Iterable[dict[str, Any]]) -> dict[str, dict[LabelKey, Any]]:
    """The sum of worker states (`Metrics.state`): ``requests`` {(route, method, status,
    tenant): [bucket counts..., +Inf count, sum]} and {labels: value} per other counter."""
    out: dict[str, dict[LabelKey, Any]] = {"requests": {}, **{n: {} for n in _COUNTERS}}
    requests = out["requests"]
    for state in states:
        for row in state.get("requests", ()):
            key, values = tuple(row[:4]), row[4:]
            acc = requests.get(key)
            if acc is None:
                requests[key] = list(values)
            else:
                for j, v in enumerate(values):
                    acc[j] += v
        for name in _COUNTERS:
            acc_c = out[name]
            for row in state.get(name, ()):
                key = tuple(row[:-1])
                acc_c[key] = acc_c.get(key, 0.0) + row[-1]
    return out


def server_id(pid: int | None = None) -> str:
    """``<parent pid>-<parent start time>`` of this process: the same for the workers of one
    gunicorn/granian master, another for the next server (pids are reused, start times not)."""
    ppid = os.getppid() if pid is None else pid
    return f"{ppid}-{_start_ticks(ppid)}"


def _start_ticks(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2 :].split()[19].decode()
    except (OSError, ValueError, IndexError):
        return "0"


class _Share:
    """A worker's side of the shared view: the writer thread and the reader of the folder.

    The thread and the exit hook hold it weakly: an app that is dropped (tests build many)
    stops its thread at the next tick."""

    def __init__(self, metrics: Metrics, folder: str, interval_s: float) -> None:
        self._metrics = weakref.ref(metrics)
        self.root = os.path.abspath(folder)
        self.interval_s = interval_s
        self.callbacks: list[Callable[[dict[str, Any]], None]] = []
        self._pid = 0
        self._lock = threading.Lock()
        self.dir = ""
        self._written: tuple = ()  # the counts of the last state written (`_counts`)
        self._failing = False  # (a failure is logged when it starts and when it ends)

    def start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self.dir = os.path.join(self.root, server_id())
            os.makedirs(self.dir, exist_ok=True)
            _remove_gone_servers(self.root)
            self.write()
            ref = weakref.ref(self)
            threading.Thread(
                target=_share_loop, args=(ref, self.interval_s), name="metrics-share", daemon=True
            ).start()
            atexit.register(_share_at_exit, ref, os.getpid())

    def _state(self) -> dict[str, Any]:
        metrics = self._metrics()
        return metrics.state() if metrics is not None else {"pid": os.getpid(), "requests": []}

    def write(self, state: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write this worker's state (now, or `state`) to its file (also called by a scrape);
        returns it. Plain os calls: this runs every `interval_s` in every worker."""
        if state is None:
            state = self._state()
        data = orjson.dumps(state)
        path = os.path.join(self.dir, f"{state['pid']}.json")
        tmp = f"{path}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
        self._written = _counts(state)
        return state

    def tick(self) -> None:
        """Write the state when it changed since the last write (an idle worker writes
        nothing), then hand it to the `callbacks`."""
        state = self._state()
        try:
            if _counts(state) != self._written:
                self.write(state)
        except OSError:
            if not self._failing:  # (once, not on every tick of a folder that is gone)
                log.exception("writing the shared metrics failed; retried every tick")
            self._failing = True
            return
        if self._failing:
            log.warning("writing the shared metrics works again")
            self._failing = False
        for callback in list(self.callbacks):
            try:
                callback(state)
            except Exception:  # noqa: BLE001 (a failing consumer must not stop the writer)
                log.exception("a metrics consumer failed; retried on the next tick")

    def all_states(self) -> list[dict[str, Any]]:
        """Every worker's state of this server (this worker's written first)."""
        own = self.write()
        states = [own]
        for name in os.listdir(self.dir):
            if not name.endswith(".json") or name == f"{own['pid']}.json":
                continue
            try:
                with open(os.path.join(self.dir, name), "rb") as f:
                    states.append(orjson.loads(f.read()))
            except (OSError, orjson.JSONDecodeError):
                continue  # (removed meanwhile)
        return states


def _counts(state: dict[str, Any]) -> tuple:
    """What a state counts (without its pid and time): equal for two states of an idle worker."""
    return (state["requests"], *(state.get(name) for name in _COUNTERS))


def _share_loop(ref: weakref.ref, interval_s: float) -> None:
    pid = os.getpid()
    while os.getpid() == pid:
        time.sleep(interval_s)
        share = ref()
        if share is None or share._metrics() is None:
            return
        share.tick()
        del share


def _share_at_exit(ref: weakref.ref, pid: int) -> None:
    share = ref()
    if share is not None and os.getpid() == pid and share._metrics() is not None:
        try:
            share.write()
        except FileNotFoundError:  # the data root is gone (a temporary app's): nothing to share
            return


def _remove_gone_servers(root: str) -> None:
    """Remove the folders of servers whose master is no longer running."""
    for name in os.listdir(root):
        ppid, _, ticks = name.partition("-")
        if not ppid.isdigit() or not os.path.isdir(os.path.join(root, name)):
            continue
        if _start_ticks(int(ppid)) != ticks:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)

"""GET /healthz, /readyz, /metrics, /version (no credentials)."""

from __future__ import annotations

import falcon

from serving.config import ServingConfig
from serving.metrics import Metrics
from serving.snapshot import SnapshotRegistry


class HealthResource:
    """Liveness: the process answers."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok"}


class ReadyResource:
    """Readiness: every served tenant has a valid snapshot loaded (503 otherwise)."""

    def __init__(self, registry: SnapshotRegistry) -> None:
        self._registry = registry

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenants = self._registry.status()
        ready = bool(tenants) and all(t["snapshot_id"] for t in tenants.values())
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"status": "ready" if ready else "not_ready", "tenants": tenants}
        resp.cache_control = ["no-store"]


class MetricsResource:
    """Prometheus text exposition (this worker's counters; see serving/metrics.py)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.text = self._metrics.render()
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"


class VersionResource:
    """Build metadata."""

    def __init__(self, config: ServingConfig) -> None:
        self._body = {
            "service": "recsys-svc",
            "version": config.version,
            "git_sha": config.git_sha,
            "built_at": config.built_at,
        }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self._body

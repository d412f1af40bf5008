"""The Falcon application factory: `create_app(config, store)`; no module-level state."""

from __future__ import annotations

import os

import falcon
import orjson

from serving import errors
from serving.auth import Authenticator
from serving.config import ServingConfig
from serving.documents import TenantDocuments
from serving.fastpath import ServingApp
from serving.metrics import Metrics
from serving.middleware import ServingMiddleware
from serving.ratelimit import InProcessLimiter, RedisLimiter
from serving.resources.admin import CacheInvalidateResource, TenantDocumentResource
from serving.resources.docs import DocsResource, OpenApiResource
from serving.resources.ops import HealthResource, MetricsResource, ReadyResource, VersionResource
from serving.resources.public import RecommendResource, SimilarResource
from serving.service import RecommendService
from serving.snapshot import SnapshotRegistry


def _json_handler() -> falcon.media.JSONHandler:
    return falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)


def create_app(
    config: ServingConfig | None = None,
    store: SnapshotRegistry | None = None,
    *,
    limiter=None,
    tenant_store: TenantDocuments | None = None,
) -> falcon.App:
    """Build the WSGI app.

    config: server settings (default: `ServingConfig.from_env()`).
    store:  the snapshots of all tenants (default: a `SnapshotRegistry` over
            `<data_root>/snapshots`).
    limiter / tenant_store: overrides for tests (default: Redis or in-process counters; the
            admin store under `<data_root>/serving`).
    """
    config = config or ServingConfig.from_env()
    metrics = Metrics()
    if store is None:
        store = SnapshotRegistry(
            os.path.join(config.data_root, "snapshots"),
            config.tenants,
            config.snapshot_check_s,
            metrics,
        )
    else:
        store.bind_metrics(metrics)
    metrics.add_gauge_source(store.gauges)
    store.warm()
    tenant_store = tenant_store or TenantDocuments(
        os.path.join(config.data_root, "serving"), config.snapshot_check_s
    )
    if limiter is None:
        limiter = RedisLimiter(config.redis_url) if config.redis_url else InProcessLimiter()

    serving = ServingMiddleware(
        metrics=metrics,
        access_log=config.access_log,
        max_body_bytes=config.max_body_bytes,
        authenticator=Authenticator(config),
        limiter=limiter,
        config=config,
        gzip_min_bytes=config.gzip_min_bytes,
    )
    middleware: list = [serving]
    if config.cors_origins:  # (its process_response runs before ServingMiddleware's)
        middleware.append(
            falcon.CORSMiddleware(
                allow_origins="*" if config.cors_origins == ("*",) else list(config.cors_origins),
                expose_headers=[
                    "X-Request-Id",
                    "traceparent",
                    "RateLimit",
                    "RateLimit-Policy",
                    "Retry-After",
                    "ETag",
                ],
            )
        )
    app = ServingApp(middleware=middleware)
    handler = _json_handler()
    app.req_options.media_handlers[falcon.MEDIA_JSON] = handler
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = handler
    app.req_options.strip_url_path_trailing_slash = True
    errors.install(app, config.problem_base)

    service = RecommendService(config, store, tenant_store, metrics)
    recommend = RecommendResource(service)
    app.add_route("/v1/recommend", recommend)
    app.add_route("/v1/recommend/validate", recommend, suffix="validate")
    app.enable_fast_path(
        serving, recommend, cors=bool(config.cors_origins), problem_base=config.problem_base
    )
    app.add_route("/v1/similar", SimilarResource(service))
    for kind in ("config", "rules"):
        app.add_route(
            f"/v1/admin/tenants/{{tenant_id}}/{kind}",
            TenantDocumentResource(kind, tenant_store, store, config),
        )
    app.add_route(
        "/v1/admin/tenants/{tenant_id}/cache/invalidate",
        CacheInvalidateResource(tenant_store, store),
    )
    app.add_route("/healthz", HealthResource())
    app.add_route("/readyz", ReadyResource(store))
    app.add_route("/metrics", MetricsResource(metrics))
    app.add_route("/version", VersionResource(config))
    app.add_route("/openapi.json", OpenApiResource(config))
    app.add_route("/docs", DocsResource())

    # --- issue 6: /v1/recs (events, feedback, runtime, experiments, CRR); serving/recs/ ---
    from serving.recs import register as register_recs

    register_recs(app, config, service=service, store=store, tenant_store=tenant_store)
    # --- end issue 6 ---
    return app


def configure_logging(config: ServingConfig) -> None:
    """Plain-message INFO logs on stderr (access lines are already JSON) for the server."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("recsys.access", "recsys.serving"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if not config.access_log:
        logging.getLogger("recsys.access").setLevel(logging.WARNING)

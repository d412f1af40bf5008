"""The Falcon application factory: `create_app(config, store)`; no module-level state."""

from __future__ import annotations

import os
from functools import partial

import falcon
import orjson

from serving import control, errors
from serving.auth import Authenticator
from serving.config import ServingConfig
from serving.control.access import charge_events
from serving.crr.records import RecordStore
from serving.crr.resources import CrrEventResources, CrrResources
from serving.documents import DocumentStore, TenantDocuments
from serving.events_log import EventLogs
from serving.experiments import ExperimentStore
from serving.fastpath import ServingApp
from serving.metrics import Metrics
from serving.middleware import ServingMiddleware
from serving.openapi import build_spec
from serving.ratelimit import limiter_for
from serving.recs.events import EventResource, EventsResource, FeedbackResource
from serving.recs.experiments import ExperimentsResource
from serving.recs.rerank import RerankExplainResources
from serving.recs.runtime import RuntimeResources
from serving.recs.seeds import SeedResource, SeedStore
from serving.resources.admin import (
    CacheInvalidateResource,
    TenantDocumentResource,
    effective_config,
)
from serving.resources.demo import DemoResources
from serving.resources.docs import DocsResource, OpenApiResource
from serving.resources.ops import HealthResource, MetricsResource, ReadyResource, VersionResource
from serving.resources.public import RecommendResource, SimilarResource
from serving.routes import ROUTES
from serving.routing import find, mount, public_paths
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
    event_logs: EventLogs | None = None,
) -> falcon.App:
    """Build the WSGI app: its collaborators, then every route of `serving.routes.ROUTES`.

    config: server settings (default: `ServingConfig.from_env()`).
    store:  the snapshots of all tenants (default: a `SnapshotRegistry` over
            `<data_root>/snapshots`).
    limiter / tenant_store / event_logs: overrides for tests (default: `limiter_for(config)`,
            Redis or the host's table; the admin store under `<data_root>/serving`; the
            event logs under `<data_root>`). The app's event logs are `app.event_logs`.
    """
    config = config or ServingConfig.from_env()
    metrics = Metrics()
    if store is None:
        store = SnapshotRegistry(
            os.path.join(config.data_root, "snapshots"),
            config.tenants,
            config.snapshot_check_s,
            metrics,
            background=True,  # (a deploy: the old snapshot answers while the new one opens)
        )
    else:
        store.bind_metrics(metrics)
    metrics.add_gauge_source(store.gauges)
    store.warm()
    serving_dir = os.path.join(config.data_root, "serving")
    tenant_store = tenant_store or TenantDocuments(
        serving_dir,
        config.snapshot_check_s,
        defaults={"config": effective_config(config), "rules": {"rules": []}},
    )
    if limiter is None:
        limiter = limiter_for(config)
    if event_logs is None:
        event_logs = EventLogs(
            config.data_root,
            config.events_flush_s,
            config.events_segment_bytes,
            config.events_linger_ms / 1000,
        )
    experiments = ExperimentStore(
        os.path.join(serving_dir, "experiments"), store, config.snapshot_check_s
    )
    seeds = SeedStore(os.path.join(serving_dir, "seeds"), config.snapshot_check_s)
    service = RecommendService(
        config, store, tenant_store, metrics, experiments=experiments, seeds=seeds
    )
    records = RecordStore(config.data_root)
    spec = build_spec(config.version, ROUTES)

    serving = ServingMiddleware(
        metrics=metrics,
        access_log=config.access_log,
        max_body_bytes=config.max_body_bytes,
        authenticator=Authenticator(config),
        limiter=limiter,
        config=config,
        gzip_min_bytes=config.gzip_min_bytes,
        public_paths=public_paths(ROUTES),
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

    resources = {
        "recommend": RecommendResource(service),
        "similar": SimilarResource(service),
        "config": TenantDocumentResource("config", tenant_store, store, config),
        "rules": TenantDocumentResource("rules", tenant_store, store, config),
        "invalidate": CacheInvalidateResource(tenant_store, store),
        "health": HealthResource(),
        "ready": ReadyResource(store),
        "metrics": MetricsResource(metrics),
        "version": VersionResource(config),
        "openapi": OpenApiResource(spec),
        "docs": DocsResource(spec),
        "events": EventsResource(event_logs),
        "event": EventResource(event_logs),
        "feedback": FeedbackResource(config.data_root),
        "runtime": RuntimeResources(service, store, config.deadline_ms),
        "experiments": ExperimentsResource(experiments, event_logs),
        "rerank": RerankExplainResources(service, store, config.deadline_ms),
        "seeds": SeedResource(seeds),
        "crr": CrrResources(records, event_logs, service, store),
        "crr_events": CrrEventResources(records, event_logs, service, store),
        "demo": DemoResources(config, store),
    }
    control_ctx = control.ControlContext(
        config=config,
        store=store,
        tenant_store=tenant_store,
        documents=DocumentStore(serving_dir, config.snapshot_check_s),
        metrics=metrics,
        event_logs=event_logs,
        service=service,
        experiments=experiments,
        limiter=limiter,
    )
    resources |= control.resources(control_ctx)
    event_logs.admit = partial(charge_events, control_ctx)  # the events-per-day quota
    event_logs.event_types = service.declared_event_types  # (beside the built-in ones)
    mount(app, ROUTES, resources)
    app.enable_fast_path(
        serving,
        resources["recommend"],
        find(ROUTES, "POST", "/v1/recommend"),
        cors=bool(config.cors_origins),
        problem_base=config.problem_base,
    )
    app.event_logs = event_logs
    return app


def configure_logging(config: ServingConfig) -> None:
    """Plain-message INFO logs on stderr for the server; the JSON access lines go to stderr
    in batches, from a thread (`serving.accesslog.AccessLog`), when `config.access_log`."""
    import logging
    import sys

    from serving import accesslog

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("recsys.access", "recsys.serving"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    if config.access_log:
        accesslog.install(accesslog.AccessLog(sys.stderr.fileno()))
    else:
        logging.getLogger("recsys.access").setLevel(logging.WARNING)

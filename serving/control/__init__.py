"""The control plane: models, jobs, webhooks, keys and quotas, monitoring, features, pipelines.

It is a door onto the real engines, not a copy of them: a model version is an MLflow model
version (`serving.control.registry`), a job is a Dagster run launched through the webserver's
GraphQL API (`serving.control.dagster`); what the API shows, the MLflow and Dagster UIs show too.
The serving process never imports dagster or pipelines.

Each area is one module here with two names:

* ``ROUTES``: its section of the route table (`serving.routes.ROUTES` joins the sections; the
  entries are ordinary `serving.routing.Route`s, so validation and /openapi.json come from them);
* ``resources(ctx)``: the resource objects its routes name, built from the `ControlContext`.

Documents an area edits (webhooks, keys, policies, pipelines, ...) are collections of the one
versioned store, ``ctx.documents`` (`serving.documents`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from recsys.storage import Storage
from serving.config import ServingConfig
from serving.documents import DocumentStore, TenantDocuments


@dataclass(frozen=True)
class ControlContext:
    """What the control-plane resources are built from (`serving.app.create_app` makes it)."""

    config: ServingConfig
    store: Any  # serving.snapshot.SnapshotRegistry
    tenant_store: TenantDocuments
    documents: DocumentStore  # <data root>/serving
    metrics: Any  # serving.metrics.Metrics
    event_logs: Any  # serving.events_log.EventLogs
    service: Any  # serving.service.RecommendService
    experiments: Any  # serving.experiments.ExperimentStore
    limiter: Any

    @property
    def mlflow_uri(self) -> str:
        return self.config.mlflow_uri or Storage(self.config.data_root).mlflow_uri()

    @property
    def serving_dir(self) -> str:
        return os.path.join(self.config.data_root, "serving")


def areas() -> tuple[Any, ...]:
    """The area modules, in the order their routes appear in the table."""
    from serving.control import (
        access,
        connectors,
        features,
        jobs,
        models,
        monitoring,
        pipelines,
        webhooks,
    )

    return (models, jobs, webhooks, access, monitoring, connectors, features, pipelines)


def routes() -> tuple[Any, ...]:
    return tuple(route for area in areas() for route in area.ROUTES)


def resources(ctx: ControlContext) -> dict[str, Any]:
    built: dict[str, Any] = {}
    for area in areas():
        built.update(area.resources(ctx))
    return built

"""Admin routes (scope `admin`, own tenant only):

GET/PUT /v1/admin/tenants/{tenant_id}/config and .../rules (ETag / If-Match / If-None-Match
through `serving.documents`; 409 on a stale revision) and POST .../cache/invalidate.

A tenant that never stored a config (or rules) is answered its effective defaults
(`effective_config`: the weights, k, surface and limits a request of it gets) with the ETag of
those defaults, which its first PUT may send in If-Match (or `If-None-Match: *`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon

from recsys.contract import DEFAULT_EVENT_WEIGHTS
from serving.auth import SCOPE_ADMIN
from serving.config import ServingConfig
from serving.documents import Preconditions, TenantDocuments, set_etag
from serving.errors import ProblemError
from serving.routing import json_body
from serving.rules import DEFAULT_ANCHOR_HALF_LIFE
from serving.snapshot import SnapshotRegistry
from serving.validation import (
    DEFAULT_K,
    DEFAULT_SURFACE,
    Limits,
    validate_config,
    validate_rules,
)

_VERSION_FIELD = {"config": "config_version", "rules": "rules_version"}


def effective_config(config: ServingConfig) -> dict[str, Any]:
    """The config a tenant without one is served with, written out in full: PUT back
    unchanged, it changes nothing."""
    limits = Limits.for_tenant(config, {})
    return {
        # (no weights: the snapshot's stored score ranks)
        "defaults": {
            "weights": None,
            "k": min(DEFAULT_K, limits.max_k),
            "surface": DEFAULT_SURFACE,
            "anchor_half_life": DEFAULT_ANCHOR_HALF_LIFE,
        },
        "limits": {
            "max_k": limits.max_k,
            "max_include_ids": limits.max_include_ids,
            "max_exclude_ids": limits.max_exclude_ids,
            "max_anchors": limits.max_anchors,
        },
        "surfaces": [],
        "experiments": {},
        "strict_similar": False,
        "event_types": dict(DEFAULT_EVENT_WEIGHTS),
    }


class TenantDocumentResource:
    """One versioned document (config or rules) of a tenant."""

    required_scope = SCOPE_ADMIN

    def __init__(
        self, kind: str, store: TenantDocuments, registry: SnapshotRegistry, config: ServingConfig
    ) -> None:
        self._kind = kind
        self._documents = store.collection(kind)
        self._store = store
        self._registry = registry
        self._validate: Callable[[Any, ServingConfig], dict] = (
            validate_config if kind == "config" else validate_rules
        )
        self._config = config
        self._default = store.defaults[kind]

    def _known(self, tenant: str) -> None:
        if not (self._store.exists(tenant) or self._registry.tenant(tenant) is not None):
            raise ProblemError(
                404, f"Tenant '{tenant}' is not known here.", code="RECSYS_UNKNOWN_TENANT"
            )

    def _send(self, resp: falcon.Response, tenant: str, doc) -> None:
        resp.media = {"tenant_id": tenant, _VERSION_FIELD[self._kind]: doc.revision, **doc.body}
        set_etag(resp, doc.revision)

    def on_get(self, req: falcon.Request, resp: falcon.Response, tenant_id: str) -> None:
        self._known(tenant_id)
        self._send(resp, tenant_id, self._documents.get(tenant_id, self._kind, self._default))

    def on_put(self, req: falcon.Request, resp: falcon.Response, tenant_id: str) -> None:
        self._known(tenant_id)
        try:
            raw = json_body(req)
        except falcon.MediaMalformedError:
            raise ProblemError(400, "The body is not valid JSON.") from None
        body = self._validate(raw, self._config)
        if isinstance(raw, dict) and raw.get("tenant_id") not in (None, tenant_id):
            raise ProblemError(422, "tenant_id in the body differs from the URL.")
        doc, _, before = self._documents.put_replacing(
            tenant_id, self._kind, body, Preconditions.of(req), default=self._default
        )
        req.context.audit = {"target": self._kind, "before": before, "after": doc.revision}
        self._send(resp, tenant_id, doc)


class CacheInvalidateResource:
    """Drop this worker's cached config/rules/snapshot state of a tenant (others follow within
    the check interval, since they re-stat the files)."""

    required_scope = SCOPE_ADMIN
    TARGETS = ("config", "rules", "snapshot", "popularity")

    def __init__(self, store: TenantDocuments, registry: SnapshotRegistry) -> None:
        self._store = store
        self._registry = registry

    def invalidate(self, tenant_id: str, targets: list[str]) -> None:
        """Drop this worker's cached `targets` of the tenant (also POST /v1/recs/cache/invalidate's
        `pipeline`: `serving.control.cache`)."""
        kinds = tuple(t for t in targets if t in TenantDocuments.KINDS)
        self._store.invalidate(tenant_id, kinds)
        holder = self._registry.tenant(tenant_id)
        if holder is not None and ("snapshot" in targets or "popularity" in targets):
            holder.refresh(force=True)
            live = holder.live()
            if live is not None:
                live.compiled.clear()

    def on_post(self, req: falcon.Request, resp: falcon.Response, tenant_id: str) -> None:
        raw = json_body(req) if req.content_length else {}
        if not isinstance(raw, dict):
            raise ProblemError(400, "The body must be an object.")
        targets = raw.get("targets") or list(self.TARGETS)
        if not isinstance(targets, list) or any(t not in self.TARGETS for t in targets):
            raise ProblemError(400, f"targets must be a list of {', '.join(self.TARGETS)}.")
        self.invalidate(tenant_id, targets)
        resp.status = falcon.HTTP_202
        resp.media = {
            "tenant_id": tenant_id,
            "invalidated": targets,
            "surface": raw.get("surface"),
            "detail": "this worker now; other workers within the check interval",
        }

"""Admin routes (scope `admin`, own tenant only):

GET/PUT /v1/admin/tenants/{tenant_id}/config and .../rules (ETag / If-Match, 409 on a stale
version) and POST .../cache/invalidate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon

from serving.auth import SCOPE_ADMIN
from serving.config import ServingConfig
from serving.errors import ProblemError
from serving.snapshot import SnapshotRegistry
from serving.tenant_store import KINDS, TenantStore, VersionConflict
from serving.validation import if_match, validate_config, validate_rules

_VERSION_FIELD = {"config": "config_version", "rules": "rules_version"}


class TenantDocumentResource:
    """One versioned document (config or rules) of a tenant."""

    required_scope = SCOPE_ADMIN

    def __init__(
        self, kind: str, store: TenantStore, registry: SnapshotRegistry, config: ServingConfig
    ) -> None:
        assert kind in KINDS
        self._kind = kind
        self._store = store
        self._registry = registry
        self._validate: Callable[[Any, ServingConfig], dict] = (
            validate_config if kind == "config" else validate_rules
        )
        self._config = config

    def _exists(self, tenant: str) -> bool:
        return self._store.exists(tenant) or self._registry.tenant(tenant) is not None

    def _send(self, resp: falcon.Response, tenant: str, version: str | None, body: dict) -> None:
        resp.media = {"tenant_id": tenant, _VERSION_FIELD[self._kind]: version, **body}
        if version:
            resp.etag = f'"{version}"'
        resp.cache_control = ["no-store"]

    def on_get(self, req: falcon.Request, resp: falcon.Response, tenant_id: str) -> None:
        if not self._exists(tenant_id):
            raise ProblemError(
                404, f"Tenant '{tenant_id}' is not known here.", code="RECSYS_UNKNOWN_TENANT"
            )
        doc = self._store.read(tenant_id, self._kind)
        body = doc.body if doc.version else ({"rules": []} if self._kind == "rules" else {})
        self._send(resp, tenant_id, doc.version, body)

    def on_put(self, req: falcon.Request, resp: falcon.Response, tenant_id: str) -> None:
        if not self._exists(tenant_id):
            raise ProblemError(
                404, f"Tenant '{tenant_id}' is not known here.", code="RECSYS_UNKNOWN_TENANT"
            )
        try:
            raw = req.get_media()
        except falcon.MediaMalformedError:
            raise ProblemError(400, "The body is not valid JSON.") from None
        body = self._validate(raw, self._config)
        if isinstance(raw, dict) and raw.get("tenant_id", tenant_id) != tenant_id:
            raise ProblemError(422, "tenant_id in the body differs from the URL.")
        try:
            doc = self._store.write(tenant_id, self._kind, body, if_match(req))
        except VersionConflict as e:
            raise ProblemError(
                409,
                f"The {self._kind} changed: stored version is {e.current!r}; GET it, "
                "re-apply your change and send its ETag in If-Match.",
                extra={"current_version": e.current},
            ) from None
        self._send(resp, tenant_id, doc.version, doc.body)


class CacheInvalidateResource:
    """Drop this worker's cached config/rules/snapshot state of a tenant (others follow within
    the check interval, since they re-stat the files)."""

    required_scope = SCOPE_ADMIN
    TARGETS = ("config", "rules", "snapshot", "popularity")

    def __init__(self, store: TenantStore, registry: SnapshotRegistry) -> None:
        self._store = store
        self._registry = registry

    def on_post(self, req: falcon.Request, resp: falcon.Response, tenant_id: str) -> None:
        raw = req.get_media(default_when_empty={}) if req.content_length else {}
        if not isinstance(raw, dict):
            raise ProblemError(400, "The body must be an object.")
        targets = raw.get("targets") or list(self.TARGETS)
        if not isinstance(targets, list) or any(t not in self.TARGETS for t in targets):
            raise ProblemError(400, f"targets must be a list of {', '.join(self.TARGETS)}.")
        kinds = tuple(t for t in targets if t in KINDS)
        self._store.invalidate(tenant_id, kinds)
        holder = self._registry.tenant(tenant_id)
        if holder is not None and ("snapshot" in targets or "popularity" in targets):
            holder.refresh(force=True)
            live = holder.live()
            if live is not None:
                live.compiled.clear()
        resp.status = falcon.HTTP_202
        resp.media = {
            "tenant_id": tenant_id,
            "invalidated": targets,
            "surface": raw.get("surface"),
            "detail": "this worker now; other workers within the check interval",
        }

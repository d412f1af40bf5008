"""/v1/recs/experiments: create (POST), list (GET), read / change / delete one (GET, PATCH,
DELETE with ETag + If-Match), force-assign a user (POST .../assign), results (GET .../results).

Reads need the `recommend` scope, writes `admin`. The tenant is always the caller's.
"""

from __future__ import annotations

import hashlib
from typing import Any

import falcon
import msgspec

from recsys.outbox import Outbox
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.documents import Preconditions, set_etag
from serving.errors import ProblemError
from serving.events_log import EventLogs, scan_all_events
from serving.experiments import ExperimentStore, compute_results
from serving.recs.schemas import AssignRequest


def _public(doc: dict[str, Any]) -> dict[str, Any]:
    return dict(doc)


def _experiment_completed(data_root: str, tenant: str, doc: dict[str, Any]) -> None:
    """The webhook event of an experiment that was stopped (`recsys.outbox`); its id is the
    stopped version's, so a retried request does not emit twice."""
    digest = hashlib.sha256(f"{tenant}\0{doc['id']}\0{doc['version']}".encode()).hexdigest()
    payload = {
        "experiment_id": doc["id"],
        "surface": doc.get("surface"),
        "variants": [v.get("id") or v.get("name") for v in doc.get("variants", [])],
        "stopped_at": doc["updated_at"],
        "version": doc["version"],
        "results": f"/v1/recs/experiments/{doc['id']}/results",
    }
    Outbox.of(data_root).emit(tenant, "experiment.completed", payload, f"msg_exp_{digest[:32]}")


def _send(resp: falcon.Response, doc: dict[str, Any]) -> None:
    resp.media = _public(doc)
    set_etag(resp, doc["version"])


class ExperimentsResource:
    """The collection (on_get / on_post), one experiment (`_one`), assign, results."""

    required_scope = {
        "GET": SCOPE_RECOMMEND,
        "POST": SCOPE_ADMIN,
        "PATCH": SCOPE_ADMIN,
        "DELETE": SCOPE_ADMIN,
    }

    def __init__(self, store: ExperimentStore, logs: EventLogs) -> None:
        self._store = store
        self._logs = logs

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        doc = self._store.create(req.context.principal.tenant, req.context.body)
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/recs/experiments/{doc['id']}"
        _send(resp, doc)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        docs = self._store.list(req.context.principal.tenant)
        for name in ("status", "surface"):
            value = getattr(req.context.query, name)
            if value is not None:
                docs = [d for d in docs if d[name] == value]
        resp.media = {"items": [_public(d) for d in docs], "total": len(docs)}
        resp.cache_control = ["no-store"]

    def _get(self, tenant: str, experiment_id: str) -> dict[str, Any]:
        doc = self._store.read(tenant, experiment_id)
        if doc is None:
            raise ProblemError(
                404, f"No experiment '{experiment_id}'.", code="RECSYS_UNKNOWN_EXPERIMENT"
            )
        return doc

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, experiment_id: str) -> None:
        _send(resp, self._get(req.context.principal.tenant, experiment_id))

    def on_patch_one(self, req: falcon.Request, resp: falcon.Response, experiment_id: str) -> None:
        patch = msgspec.to_builtins(req.context.body)  # (fields not sent are left out)
        tenant = req.context.principal.tenant
        before = self._store.read(tenant, experiment_id)
        doc = self._store.update(tenant, experiment_id, patch, Preconditions.of(req))
        if doc["status"] == "stopped" and before is not None and before["status"] != "stopped":
            _experiment_completed(self._logs.data_root, tenant, doc)
        _send(resp, doc)

    def on_delete_one(self, req: falcon.Request, resp: falcon.Response, experiment_id: str) -> None:
        self._store.delete(req.context.principal.tenant, experiment_id, Preconditions.of(req))
        resp.status = falcon.HTTP_204

    def on_post_assign(
        self, req: falcon.Request, resp: falcon.Response, experiment_id: str
    ) -> None:
        """Body ``{"user_id": "...", "variant": "B" | null}``: pin (or un-pin) a user."""
        body: AssignRequest = req.context.body
        unit, variant = body.user_id, body.variant
        tenant = req.context.principal.tenant
        doc = self._store.force_assign(tenant, experiment_id, unit, variant, Preconditions.of(req))
        chosen, forced = self._store.assign(tenant, doc, unit)
        resp.media = {
            "experiment_id": experiment_id,
            "user_id": unit,
            "variant": chosen["id"],
            "forced": forced,
            "version": doc["version"],
        }
        set_etag(resp, doc["version"])

    def on_get_assignment(
        self, req: falcon.Request, resp: falcon.Response, experiment_id: str
    ) -> None:
        """?user_id=...: the variant the user gets (hashed or forced)."""
        unit = req.context.query.user_id
        doc = self._get(req.context.principal.tenant, experiment_id)
        chosen, forced = self._store.assign(req.context.principal.tenant, doc, unit)
        resp.media = {
            "experiment_id": experiment_id,
            "user_id": unit,
            "variant": chosen["id"],
            "forced": forced,
            "version": doc["version"],
        }
        resp.cache_control = ["no-store"]

    def on_get_results(
        self, req: falcon.Request, resp: falcon.Response, experiment_id: str
    ) -> None:
        tenant = req.context.principal.tenant
        doc = self._get(tenant, experiment_id)
        query = req.context.query
        events = scan_all_events(self._logs.data_root, tenant, self._logs.tenant(tenant))
        resp.media = compute_results(events, doc, query.alpha, query.bucket)
        resp.cache_control = ["no-store"]

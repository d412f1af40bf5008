"""Control plane: webhooks - endpoints that receive signed notifications of what happened.

``POST /v1/recs/webhooks`` stores an endpoint document (``url``, ``events``, ``description``
and its signing ``secret``) in the versioned store, collection ``webhooks``
(``<data root>/serving/webhooks/<tenant>/<id>.json``) and answers the secret, once: no other
answer carries it. ``GET`` lists the tenant's endpoints with each one's delivery log (attempts,
delivered, last status and error, disabled and why, the newest deliveries) read from the outbox;
``DELETE .../{webhook_id}`` removes one and cancels its pending deliveries.

Events (`recsys.outbox.EVENT_TYPES`) are written to the outbox (`recsys.outbox.emit`) by what
really happens -- the deploy path (model.deployed / model.rolled_back), the Dagster run-status
sensor (job.completed / job.failed, `pipelines/webhook_sensors.py`) -- and delivered by
``recsys webhooks deliver``, a process of its own (see docs/webhooks.md).
"""

from __future__ import annotations

import base64
import binascii
import functools
import secrets
from typing import Annotated, Any, Literal

import falcon
from msgspec import Meta

from recsys.contract import PATTERN_END
from recsys.outbox import EVENT_TYPES, SECRET_PREFIX, Outbox, new_secret
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.control.access import require_quota
from serving.documents import Collection, DocumentStore, Preconditions, set_etag
from serving.errors import ProblemError
from serving.routing import Route
from serving.schemas import Body, Reply, Timestamp

EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]
WebhookId = Annotated[
    str,
    Meta(
        pattern=r"^wh_[0-9a-f]{16}" + PATTERN_END, description="a webhook id (wh_ + 16 hex digits)"
    ),
]
Url = Annotated[str, Meta(min_length=1, max_length=2048, description="an http(s) URL")]
#: Endpoints a tenant may subscribe (besides the `webhooks` quota, which is per tenant too).
MAX_EVENTS = len(EVENT_TYPES)


class WebhookSpec(Body):
    """A new endpoint: where to POST, which events; a secret of your own, or one is made."""

    url: Url
    events: Annotated[list[EventType], Meta(min_length=1, max_length=MAX_EVENTS)]
    description: Annotated[str, Meta(max_length=500)] | None = None
    secret: (
        Annotated[
            str,
            Meta(
                min_length=10,
                max_length=200,
                description="whsec_ + base64 of 24 to 64 random bytes (made when absent)",
            ),
        ]
        | None
    ) = None


class Delivery(Reply):
    message_id: str
    type: str
    state: Literal["pending", "delivered", "failed", "skipped", "cancelled"]
    attempts: int
    created_at: Timestamp
    last_status: int | None = None
    last_error: str | None = None
    delivered_at: Timestamp | None = None
    next_attempt_at: Timestamp | None = None


class DeliveryLog(Reply):
    """What the deliverer did for this endpoint (`recsys.outbox.Outbox.endpoint_log`)."""

    attempts: int
    delivered: int
    failures_in_a_row: int
    pending: int
    disabled: bool
    recent: list[Delivery]
    last_status: int | None = None
    last_error: str | None = None
    last_attempt_at: Timestamp | None = None
    last_success_at: Timestamp | None = None
    disabled_at: Timestamp | None = None
    disabled_reason: str | None = None


class Webhook(Reply):
    id: str
    url: str
    events: list[str]
    version: str
    created_at: Timestamp
    status: Literal["enabled", "disabled"]
    delivery: DeliveryLog
    description: str | None = None


class WebhookCreated(Reply):
    """The created endpoint with its signing secret: the only answer that carries it."""

    id: str
    url: str
    events: list[str]
    version: str
    created_at: Timestamp
    secret: str
    description: str | None = None


class WebhookList(Reply):
    items: list[Webhook]
    total: int


@functools.cache
def _collection(root: str, check_interval_s: float) -> Collection:
    return DocumentStore(root, check_interval_s).collection("webhooks", prefix="wh")


def collection(ctx: Any) -> Collection:
    """The webhooks collection of the app's document store (one per process and store)."""
    return _collection(ctx.documents.root, ctx.documents.check_interval_s)


def _check_url(url: str) -> str:
    from urllib3.exceptions import LocationParseError
    from urllib3.util import parse_url

    try:
        parsed = parse_url(url)
    except LocationParseError:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise ProblemError(
            422,
            f"The webhook URL must be an http:// or https:// URL with a host, not {url!r}.",
            code="RECSYS_INVALID_WEBHOOK_URL",
        )
    return url


def _check_secret(secret: str | None) -> str:
    if secret is None:
        return new_secret()
    raw = None
    if secret.startswith(SECRET_PREFIX):
        try:
            raw = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or not 24 <= len(raw) <= 64:
        raise ProblemError(
            422,
            "A webhook secret is 'whsec_' followed by the base64 of 24 to 64 random bytes "
            "(leave it out and one is made).",
            code="RECSYS_INVALID_WEBHOOK_SECRET",
        )
    return secret


class WebhooksResource:
    """The tenant's webhook endpoints (the tenant is always the caller's)."""

    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._docs = collection(ctx)

    @functools.cached_property
    def _outbox(self) -> Outbox:
        return Outbox.of(self._ctx.config.data_root)

    def _public(self, doc: Any, tenant: str) -> dict[str, Any]:
        log = self._outbox.endpoint_log(tenant, doc.id)
        return {
            "id": doc.id,
            "url": doc.body["url"],
            "events": doc.body["events"],
            "description": doc.body.get("description"),
            "version": doc.revision,
            "created_at": doc.created_at,
            "status": "disabled" if log["disabled"] else "enabled",
            "delivery": log,
        }

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        items = [self._public(doc, tenant) for doc in self._docs.list(tenant)]
        resp.media = {"items": items, "total": len(items)}
        resp.cache_control = ["no-store"]

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        spec: WebhookSpec = req.context.body
        _check_url(spec.url)
        secret = _check_secret(spec.secret)
        require_quota(self._ctx, tenant, "webhooks", used=self._docs.count(tenant))
        body = {
            "url": spec.url,
            "events": sorted(set(spec.events), key=EVENT_TYPES.index),
            "description": spec.description,
            "secret": secret,
        }
        hook_id = f"wh_{secrets.token_hex(8)}"
        doc = self._docs.create(tenant, hook_id, body)
        req.context.audit = {"target": f"webhook/{hook_id}", "before": None, "after": doc.revision}
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/recs/webhooks/{hook_id}"
        set_etag(resp, doc.revision)
        resp.media = {
            "id": hook_id,
            "url": body["url"],
            "events": body["events"],
            "description": body["description"],
            "version": doc.revision,
            "created_at": doc.created_at,
            "secret": secret,
        }

    def on_delete_one(self, req: falcon.Request, resp: falcon.Response, webhook_id: str) -> None:
        tenant = req.context.principal.tenant
        before = self._docs.delete(tenant, webhook_id, Preconditions.of(req)).revision
        self._outbox.forget_endpoint(tenant, webhook_id)
        req.context.audit = {"target": f"webhook/{webhook_id}", "before": before, "after": None}
        resp.status = falcon.HTTP_204


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/recs/webhooks",
        ("webhooks", "on_get"),
        "The tenant's webhook endpoints with their delivery logs (never their secrets)",
        SCOPE_RECOMMEND,
        response=WebhookList,
        tags=("webhooks",),
    ),
    Route(
        "POST",
        "/v1/recs/webhooks",
        ("webhooks", "on_post"),
        "Subscribe an http(s) endpoint to events; the answer carries its signing secret, once",
        SCOPE_ADMIN,
        body=WebhookSpec,
        status=201,
        response=WebhookCreated,
        errors=(403, 409, 422),
        tags=("webhooks",),
        description=(
            "Deliveries are signed per Standard Webhooks: webhook-id (the same on every "
            "attempt), webhook-timestamp and webhook-signature (v1, HMAC-SHA256 of "
            "'id.timestamp.body' with the secret)."
        ),
    ),
    Route(
        "DELETE",
        "/v1/recs/webhooks/{webhook_id}",
        ("webhooks", "on_delete_one"),
        "Remove an endpoint; its pending deliveries are cancelled",
        SCOPE_ADMIN,
        params={"webhook_id": WebhookId},
        status=204,
        errors=(409, 412),
        headers=("If-Match",),
        tags=("webhooks",),
    ),
)


def resources(ctx: Any) -> dict[str, Any]:
    return {"webhooks": WebhooksResource(ctx)}

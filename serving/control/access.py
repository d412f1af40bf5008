"""Control plane: access - API keys, rate limits, quotas, policies and the audit log.

Quotas are one document per tenant (``<data root>/serving/quotas/<tenant>/quotas.json``); a
tenant that never set one has `QUOTA_DEFAULTS`. `require_quota(ctx, tenant, name, used)` is what
the handlers creating a counted thing (a model, a webhook, a key) call first: a 403 Problem
naming the quota when ``used >= limit``.
"""

from __future__ import annotations

import functools
from typing import Any

from serving.documents import Collection, DocumentStore
from serving.errors import ProblemError
from serving.routing import Route

#: The quotas of a tenant that never set its own (`PATCH /v1/recs/quotas` changes them).
QUOTA_DEFAULTS: dict[str, int] = {
    "inference_qps": 1000,  # recommendation requests per second (429 above)
    "events_per_day": 10_000_000,  # events accepted per UTC day
    "storage_bytes": 50 * 1024**3,  # bytes under the tenant's data folders
    "models": 50,  # registered model versions
    "keys": 100,  # stored API keys
    "webhooks": 50,  # webhook subscriptions
}
QUOTA_NAMES = tuple(QUOTA_DEFAULTS)


@functools.cache
def _collections(root: str, check_interval_s: float) -> dict[str, Collection]:
    """The access area's collections of one document store (one per process and store, so
    their caches live as long as the app)."""
    store = DocumentStore(root, check_interval_s)
    return {
        "quotas": store.collection("quotas", ids=("quotas",), prefix="quota"),
    }


def collections(ctx: Any) -> dict[str, Collection]:
    return _collections(ctx.documents.root, ctx.documents.check_interval_s)


def quotas(ctx: Any, tenant: str) -> dict[str, int]:
    """The tenant's effective quotas: its document over the defaults (re-read at most once a
    second: another worker's change is seen within that)."""
    doc = collections(ctx)["quotas"].cached(tenant, "quotas")
    if doc is None:
        return dict(QUOTA_DEFAULTS)
    return {**QUOTA_DEFAULTS, **{k: v for k, v in doc.body.items() if k in QUOTA_DEFAULTS}}


def quota_exceeded(name: str, limit: int, used: int, status: int = 403) -> ProblemError:
    return ProblemError(
        status,
        f"Quota '{name}' exceeded: {used} used of {limit}.",
        code="RECSYS_QUOTA_EXCEEDED",
        title="Quota exceeded",
        extra={"quota": name, "limit": limit, "used": used},
    )


def require_quota(ctx: Any, tenant: str, name: str, used: int) -> None:
    """403 Problem naming quota `name` when the tenant has used all of it (``used >= limit``);
    call before creating one more of what it counts ("models", "webhooks", "keys")."""
    if name not in QUOTA_DEFAULTS:
        raise ValueError(f"unknown quota {name!r}: one of {', '.join(QUOTA_NAMES)}")
    limit = quotas(ctx, tenant)[name]
    if used >= limit:
        raise quota_exceeded(name, limit, used)


ROUTES: tuple[Route, ...] = ()


def resources(ctx: Any) -> dict[str, Any]:
    return {}

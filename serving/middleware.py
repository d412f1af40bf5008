"""Falcon middleware: small classes, each doing one thing and testable alone.

Order in `create_app` (process_request runs top-down, process_response bottom-up):
RequestId -> Metrics/AccessLog -> CORS (Falcon's) -> BodyLimits -> Auth -> RateLimit -> Gzip.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import time

import falcon
import orjson

from serving.auth import Authenticator, Principal
from serving.config import ServingConfig
from serving.errors import ProblemError
from serving.metrics import Metrics

access_log = logging.getLogger("recsys.access")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

#: Paths served without credentials (liveness, readiness, metrics, build info, API docs).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/version", "/openapi.json", "/docs"})


def new_request_id() -> str:
    """A random UUID (version 4) string; a third of the cost of ``str(uuid.uuid4())``."""
    h = os.urandom(16).hex()
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"


class RequestIdMiddleware:
    """Echo a well-formed `X-Request-Id` or generate one; continue the W3C trace context.

    A valid incoming `traceparent` is continued: the response's keeps the caller's trace id and
    flags with a new span id (this server's span), and `tracestate` is passed through. Requests
    without one get none back (the request id already correlates logs; every response header
    costs gunicorn a few microseconds).
    """

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        env, ctx = req.env, req.context  # (headers straight from the WSGI environ)
        rid = env.get("HTTP_X_REQUEST_ID")
        ctx.request_id = rid if rid and _REQUEST_ID_OK.match(rid) else new_request_id()
        ctx.traceparent = None
        incoming = env.get("HTTP_TRACEPARENT")
        if incoming:
            match = _TRACEPARENT.match(incoming)
            if match and match.group(2) != "0" * 32 and match.group(1) != "ff":
                span = os.urandom(8).hex()
                ctx.traceparent = f"00-{match.group(2)}-{span}-{match.group(4)}"
                ctx.tracestate = env.get("HTTP_TRACESTATE")

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        ctx = req.context
        resp.set_header("X-Request-Id", ctx.request_id)
        if ctx.traceparent:
            resp.set_header("traceparent", ctx.traceparent)
            if ctx.tracestate:
                resp.set_header("tracestate", ctx.tracestate)


class MetricsMiddleware:
    """Request counts and latency per route template and status; optional JSON access log."""

    def __init__(self, metrics: Metrics, access_log_enabled: bool = True) -> None:
        self._metrics = metrics
        self._log = access_log_enabled

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        elapsed = time.perf_counter() - req.context.started
        route = req.uri_template or "unmatched"
        status = resp.status_code
        key = (route, req.method, str(status))
        self._metrics.requests.inc(key)
        self._metrics.latency.observe(key, elapsed)
        if self._log and access_log.isEnabledFor(logging.INFO):
            principal = getattr(req.context, "principal", None)
            access_log.info(
                orjson.dumps(
                    {
                        "ts": time.time(),
                        "request_id": req.context.request_id,
                        "method": req.method,
                        "path": req.path,
                        "route": route,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 3),
                        "tenant": principal.tenant if principal else None,
                        "remote": req.remote_addr,
                        "user_agent": req.user_agent,
                    }
                ).decode()
            )


DEFAULT_MEDIA: tuple[str, ...] = ("application/json",)


class BodyLimitMiddleware:
    """413 for bodies over the cap, 415 for non-JSON bodies, 411 for bodies without a length."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.method not in ("POST", "PUT", "PATCH"):
            return
        length = req.content_length
        if length is None:
            if req.get_header("Transfer-Encoding"):
                raise ProblemError(411, "Send a Content-Length; chunked bodies are not accepted.")
            length = 0
        if length > self._max:
            raise ProblemError(413, f"The body is {length} bytes; the limit is {self._max}.")
        req.context.body_length = length

    def process_resource(self, req: falcon.Request, resp: falcon.Response, resource,
                         params) -> None:
        # A resource may accept more media types than JSON (the bulk events route: NDJSON).
        if not getattr(req.context, "body_length", 0):
            return
        accepted = getattr(resource, "accepted_media", DEFAULT_MEDIA)
        content_type = (req.content_type or "").lower()
        if not content_type.startswith(accepted):
            raise ProblemError(
                415, f"Content-Type must be {' or '.join(accepted)}, not {req.content_type!r}."
            )


class AuthMiddleware:
    """Authenticate every non-public route and enforce scope and tenant.

    A resource declares `required_scope` (one string, or a dict method -> scope). When the route
    has a `tenant_id` parameter it must equal the caller's tenant; `X-Org-Id`, when sent, too.
    """

    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.principal = None
        if req.method == "OPTIONS" or req.path in PUBLIC_PATHS:
            return
        env = req.env
        principal = self._auth.authenticate(
            env.get("HTTP_AUTHORIZATION"), env.get("HTTP_X_API_KEY")
        )
        org = env.get("HTTP_X_ORG_ID")
        if org is not None and org != principal.tenant:
            raise ProblemError(
                403,
                "X-Org-Id does not match the tenant of the credentials.",
                code="RECSYS_TENANT_MISMATCH",
            )
        req.context.principal = principal

    def process_resource(self, req, resp, resource, params) -> None:
        principal: Principal | None = req.context.principal
        if principal is None or resource is None:
            return
        scope = getattr(resource, "required_scope", None)
        if isinstance(scope, dict):
            scope = scope.get(req.method)
        if scope and not principal.has_scope(scope):
            raise ProblemError(
                403, f"This operation needs the {scope!r} scope.", code="RECSYS_INSUFFICIENT_SCOPE"
            )
        tenant = params.get("tenant_id")
        if tenant is not None and tenant != principal.tenant:
            raise ProblemError(
                403,
                "The credentials do not grant access to this tenant.",
                code="RECSYS_TENANT_MISMATCH",
            )


class RateLimitMiddleware:
    """Per-credential and per-tenant fixed windows; RateLimit headers on every limited route."""

    def __init__(self, limiter, config: ServingConfig) -> None:
        self._limiter = limiter
        self._key_spec = config.rate_limit
        self._tenant_spec = config.tenant_rate_limit
        self._policy = (
            f'"key";q={self._key_spec.limit};w={self._key_spec.window_s}, '
            f'"tenant";q={self._tenant_spec.limit};w={self._tenant_spec.window_s}'
        )

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal: Principal | None = getattr(req.context, "principal", None)
        if principal is None:
            return
        by_key = self._limiter.hit(f"k:{principal.tenant}:{principal.subject}", self._key_spec)
        by_tenant = self._limiter.hit(f"t:{principal.tenant}", self._tenant_spec)
        name, tight = (
            ("key", by_key) if by_key.remaining <= by_tenant.remaining else ("tenant", by_tenant)
        )
        if not by_key.allowed:
            name, tight = "key", by_key
        elif not by_tenant.allowed:
            name, tight = "tenant", by_tenant
        state = f'"{name}";r={tight.remaining};t={tight.reset_s}'
        if not (by_key.allowed and by_tenant.allowed):
            raise ProblemError(
                429,
                f"Rate limit of the {name} exceeded; retry in {tight.reset_s} s.",
                headers={
                    "RateLimit-Policy": self._policy,
                    "RateLimit": state,
                    "Retry-After": str(tight.reset_s),
                },
            )
        req.context.ratelimit_state = state

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        state = getattr(req.context, "ratelimit_state", None)
        if state:
            resp.set_header("RateLimit-Policy", self._policy)
            resp.set_header("RateLimit", state)


class GzipMiddleware:
    """Compress bodies of at least `min_bytes` when the client accepts gzip."""

    def __init__(self, min_bytes: int = 1024, level: int = 5) -> None:
        self._min = min_bytes
        self._level = level

    def process_response(self, req, resp, resource, req_succeeded) -> None:
        accept = req.env.get("HTTP_ACCEPT_ENCODING")
        if not accept or "gzip" not in accept.lower() or resp.stream is not None:
            return
        body = resp.render_body()
        resp.append_header("Vary", "Accept-Encoding")
        if body is None or len(body) < self._min:
            return
        resp.data = gzip.compress(body, compresslevel=self._level, mtime=0)
        resp.text = None
        resp.set_header("Content-Encoding", "gzip")

"""Falcon middleware: the whole per-request stack in one class, `ServingMiddleware`.

One object with one process_request / process_resource / process_response (instead of a chain
of small classes): every middleware method Falcon calls, and every attribute put on
`req.context`, costs on each request. Its steps, in order:

* request: request id + W3C trace context -> start time -> body limits (411/413) ->
  authentication + X-Org-Id (401/403) -> rate limits (429);
* resource: media type (415) -> scope and `{tenant_id}` (403);
* response: RateLimit headers -> X-Request-Id / traceparent -> gzip -> metrics + access log.

Each step can be switched off (`None`), which is how the small factories below
(`RequestIdMiddleware`, `BodyLimitMiddleware`, `GzipMiddleware`, ...) build a one-step
middleware for tests and small apps; Falcon's `CORSMiddleware` is added after it by
`create_app` when origins are configured.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import re
import time

import falcon

from recsys.tenancy import TENANT_ID_RULE, is_valid_tenant
from serving import accesslog
from serving.auth import Authenticator, Principal
from serving.config import ServingConfig
from serving.errors import ProblemError
from serving.metrics import Metrics

access_log = logging.getLogger("recsys.access")

_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

#: Paths served without credentials by default (the app passes its route table's).
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/version", "/openapi.json", "/docs"})


_UUID4_CLEAR = (0xF000 << 64) | (0xC000 << 48)  # version nibble, variant bits
_UUID4_SET = (0x4000 << 64) | (0x8000 << 48)  # version 4, RFC 4122 variant


def new_request_id(_bits=random.getrandbits) -> str:
    """A random UUID (version 4) string, from the process's Mersenne Twister (reseeded by
    Python in every forked worker) rather than a getrandom() syscall: a request id correlates
    logs, it is not a secret. About a fifth of the cost of ``str(uuid.uuid4())``."""
    h = "%032x" % ((_bits(128) & ~_UUID4_CLEAR) | _UUID4_SET)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def new_span_id() -> str:
    """This server's span id in a propagated W3C ``traceparent``: 8 random bytes, hex."""
    return os.urandom(8).hex()


class ServingMiddleware:
    """The serving stack (see the module docstring); a step given `None` is skipped.

    metrics / access_log: request counts and latency per route template, method, status and
        tenant (the caller's; "" before authentication), and one JSON access line per request
        (when the `recsys.access` logger is at INFO).
    max_body_bytes: 413 above it, 411 for chunked bodies, 415 for non-JSON bodies (a resource
        may accept more media types through `accepted_media`).
    authenticator: every route but `PUBLIC_PATHS` (and OPTIONS) needs credentials; a resource
        declares `required_scope` (a string, or a dict method -> scope); a `tenant_id` route
        parameter and `X-Org-Id`, when sent, must equal the caller's tenant.
    limiter + config: per-credential and per-tenant limits (GCRA, `serving.ratelimit`);
        `RateLimit-Policy` and `RateLimit` headers on every limited route, 429 with
        `Retry-After`.
    gzip_min_bytes: compress bodies of at least that size when the client accepts gzip.
    request_ids: echo a well-formed `X-Request-Id` or generate one; continue a valid incoming
        `traceparent` (same trace id and flags, this server's span id; `tracestate` passed
        through). Requests without one get none back (every response header costs gunicorn a
        few microseconds).
    """

    def __init__(
        self,
        *,
        request_ids: bool = True,
        metrics: Metrics | None = None,
        access_log: bool = False,
        max_body_bytes: int | None = None,
        authenticator: Authenticator | None = None,
        limiter=None,
        config: ServingConfig | None = None,
        gzip_min_bytes: int | None = None,
        gzip_level: int = 5,
        public_paths: frozenset[str] = PUBLIC_PATHS,
    ) -> None:
        self._request_ids = request_ids
        self._public = public_paths
        self._metrics = metrics
        self._log = access_log
        self._max_body = max_body_bytes
        self._auth = authenticator
        self._limiter = limiter
        if limiter is not None:
            if config is None:
                raise ValueError("rate limits need the config (its limit specs)")
            self._key_spec = config.rate_limit
            self._tenant_spec = config.tenant_rate_limit
            self._policy = (
                f'"key";q={self._key_spec.limit};w={self._key_spec.window_s}, '
                f'"tenant";q={self._tenant_spec.limit};w={self._tenant_spec.window_s}'
            )
            # each tenant's own windows and inference quota (`serving.control.access`)
            from serving.control.access import quota_exceeded
            from serving.ratelimit import INFERENCE_PATHS, LimitTable

            self._limits = LimitTable(config)
            self._inference_paths = INFERENCE_PATHS
            self._quota_exceeded = quota_exceeded
        self._gzip_min = gzip_min_bytes
        self._gzip_level = gzip_level
        # the audit log of admin writes (`serving.control.audit`), in an app with credentials
        self._audit = None
        if authenticator is not None and config is not None:
            from serving.control.audit import AuditHook, AuditLog

            self._audit = AuditHook(AuditLog(os.path.join(config.data_root, "serving", "audit")))

    @property
    def complete(self) -> bool:
        """Whether every step is on (what `serving.fastpath` needs to stand in for Falcon)."""
        return self._request_ids and None not in (
            self._auth,
            self._limiter,
            self._metrics,
            self._max_body,
            self._gzip_min,
        )

    # --- request -------------------------------------------------------------------------
    # (Each step reads the WSGI environ and writes `ctx`, so that `serving.fastpath` runs the
    # very same steps without a Falcon Request; the Falcon methods below only sequence them.)
    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        env, ctx = req.env, req.context  # (headers straight from the WSGI environ)
        self.start(env, ctx)
        method = req.method
        if self._max_body is not None:
            ctx.body_length = (
                self.body_length(req.content_length, env) if method in (_BODY_METHODS) else 0
            )
        if self._auth is None:
            return
        ctx.principal = None
        ctx.ratelimit_state = None
        if method == "OPTIONS" or req.path in self._public:
            return
        self.admit(env, ctx)

    def start(self, env: dict, ctx) -> None:
        """Request id and trace context (when enabled), and the start time."""
        if self._request_ids:
            rid = env.get("HTTP_X_REQUEST_ID")
            ctx.request_id = rid if rid and _REQUEST_ID_OK.match(rid) else new_request_id()
            ctx.traceparent = None
            incoming = env.get("HTTP_TRACEPARENT")
            if incoming:
                match = _TRACEPARENT.match(incoming)
                if match and match.group(2) != "0" * 32 and match.group(1) != "ff":
                    span = new_span_id()
                    ctx.traceparent = f"00-{match.group(2)}-{span}-{match.group(4)}"
                    ctx.tracestate = env.get("HTTP_TRACESTATE")
        ctx.started = time.perf_counter()

    def body_length(self, length: int | None, env: dict) -> int:
        """The Content-Length of a body method's request, checked against the limit (411/413)."""
        if length is None:
            if env.get("HTTP_TRANSFER_ENCODING"):
                raise ProblemError(411, "Send a Content-Length; chunked bodies are not accepted.")
            return 0
        if length > self._max_body:
            raise ProblemError(413, f"The body is {length} bytes; the limit is {self._max_body}.")
        return length

    def admit(self, env: dict, ctx) -> None:
        """Authentication, X-Org-Id and rate limits of a route that needs credentials."""
        principal = self._auth.authenticate(
            env.get("HTTP_AUTHORIZATION"), env.get("HTTP_X_API_KEY")
        )
        ctx.principal = principal  # (known to the audit log even when X-Org-Id refuses it)
        org = env.get("HTTP_X_ORG_ID")
        if org is not None and org != principal.tenant:
            if not is_valid_tenant(org):
                raise ProblemError(
                    400,
                    f"X-Org-Id is not a tenant id ({TENANT_ID_RULE}).",
                    code="RECSYS_BAD_TENANT",
                )
            raise ProblemError(
                403,
                "X-Org-Id does not match the tenant of the credentials.",
                code="RECSYS_TENANT_MISMATCH",
            )
        if self._limiter is not None:
            ctx.ratelimit_state = self._rate_limit(principal, env.get("PATH_INFO"))

    def _rate_limit(self, principal: Principal, path: str | None) -> tuple[str, str]:
        """The `RateLimit-Policy` and `RateLimit` header values of an allowed request; 429
        otherwise (the tenant's windows and inference quota: `serving.ratelimit.LimitTable`)."""
        limits = self._limits.limits(principal.tenant)
        subject = principal.subject
        key_spec = limits.per_key.get(subject, limits.key) if limits.per_key else limits.key
        policy = limits.policies.get(subject) or limits.policies[""]
        key, tenant_key = principal.limit_keys
        by_key, by_tenant = self._limiter.hit_pair(key, key_spec, tenant_key, limits.tenant)
        if not by_key.allowed:
            name, tight = "key", by_key
        elif not by_tenant.allowed:
            name, tight = "tenant", by_tenant
        elif by_key.remaining <= by_tenant.remaining:
            name, tight = "key", by_key
        else:
            name, tight = "tenant", by_tenant
        state = f'"{name}";r={tight.remaining};t={tight.reset_s}'
        if not (by_key.allowed and by_tenant.allowed):
            raise ProblemError(
                429,
                f"Rate limit of the {name} exceeded; retry in {tight.reset_s} s.",
                headers={
                    "RateLimit-Policy": policy,
                    "RateLimit": state,
                    "Retry-After": str(tight.reset_s),
                },
            )
        if limits.inference is not None and path in self._inference_paths:
            qps = self._limiter.hit("q:" + principal.tenant, limits.inference)
            if not qps.allowed:
                raise self._quota_exceeded(
                    "inference_qps",
                    qps.limit,
                    qps.limit + 1,
                    429,
                    {"Retry-After": str(qps.reset_s)},
                )
        return policy, state

    # --- resource ------------------------------------------------------------------------
    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource, params
    ) -> None:
        self.check_resource(req.context, req.content_type, req.method, resource, params)

    def check_resource(self, ctx, content_type: str | None, method: str, resource, params) -> None:
        """Media type (415), then the resource's scope and `{tenant_id}` (403)."""
        if self._max_body is not None and ctx.body_length:
            # A resource may accept more media types than JSON (the bulk events route: NDJSON).
            check_media(content_type, getattr(resource, "accepted_media", DEFAULT_MEDIA))
        if self._auth is None:
            return
        principal: Principal | None = ctx.principal
        if principal is None or resource is None:
            return
        scope = getattr(resource, "required_scope", None)
        if isinstance(scope, dict):
            scope = scope.get(method)
        if scope:
            check_scope(principal, scope)
        tenant = params.get("tenant_id")
        if tenant is not None and tenant != principal.tenant:
            if not is_valid_tenant(tenant):
                raise ProblemError(
                    400,
                    f"{{tenant_id}} is not a tenant id ({TENANT_ID_RULE}).",
                    code="RECSYS_BAD_TENANT",
                )
            raise ProblemError(
                403,
                "The credentials do not grant access to this tenant.",
                code="RECSYS_TENANT_MISMATCH",
            )

    # --- response ------------------------------------------------------------------------
    def process_response(self, req, resp, resource, req_succeeded) -> None:
        ctx = req.context
        for name, value in self.response_headers(ctx):
            resp.set_header(name, value)
        if self._gzip_min is not None:
            self._gzip(req, resp)
        if self._audit is not None and req.method in _BODY_METHODS_AND_DELETE:
            self._audit.after(req, resp, resource)
        if self._metrics is not None and hasattr(ctx, "started"):
            self.observe(ctx, req.uri_template, req.method, resp.status_code, req.path, req.env)

    def response_headers(self, ctx) -> list[tuple[str, str]]:
        """RateLimit headers, then X-Request-Id / traceparent / tracestate (lowercase names, as
        Falcon sends them)."""
        out = []
        # (getattr: Falcon runs process_response even when process_request did not run)
        state = getattr(ctx, "ratelimit_state", None) if self._limiter is not None else None
        if state:
            out.append(("ratelimit-policy", state[0]))
            out.append(("ratelimit", state[1]))
        if self._request_ids and hasattr(ctx, "request_id"):
            out.append(("x-request-id", ctx.request_id))
            if ctx.traceparent:
                out.append(("traceparent", ctx.traceparent))
                if ctx.tracestate:
                    out.append(("tracestate", ctx.tracestate))
        return out

    def _gzip(self, req, resp) -> None:
        if resp.stream is not None or not self.accepts_gzip(req.env):
            return
        body = resp.render_body()
        resp.append_header("Vary", "Accept-Encoding")
        zipped = self.gzipped(body)
        if zipped is not None:
            resp.data = zipped
            resp.text = None
            resp.set_header("Content-Encoding", "gzip")

    def accepts_gzip(self, env: dict) -> bool:
        accept = env.get("HTTP_ACCEPT_ENCODING")
        return bool(accept) and "gzip" in accept.lower()

    def gzipped(self, body: bytes | None) -> bytes | None:
        """The compressed body of a client that accepts gzip, or None when it is too small."""
        if body is None or len(body) < self._gzip_min:
            return None
        return gzip.compress(body, compresslevel=self._gzip_level, mtime=0)

    def observe(self, ctx, route: str | None, method: str, status: int, path: str, env) -> None:
        """Request count and latency of the route, and the access log line."""
        elapsed = time.perf_counter() - ctx.started
        route = route or "unmatched"
        principal = getattr(ctx, "principal", None)
        tenant = principal.tenant if principal else ""
        key = (route, method, _STATUS_TEXT.get(status) or str(status), tenant)
        self._metrics.observe_request(key, elapsed)
        if self._log and (sink := accesslog.sink()) is not None:
            sink.write(
                {
                    "ts": time.time(),
                    "request_id": getattr(ctx, "request_id", None),
                    "method": method,
                    "path": path,
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "tenant": tenant or None,
                    "remote": env.get("REMOTE_ADDR", "127.0.0.1"),
                    "user_agent": env.get("HTTP_USER_AGENT"),
                }
            )


def check_media(content_type: str | None, accepted: tuple[str, ...]) -> None:
    """415 unless the body's Content-Type is one of `accepted`."""
    if not (content_type or "").lower().startswith(accepted):
        raise ProblemError(
            415, f"Content-Type must be {' or '.join(accepted)}, not {content_type!r}."
        )


def check_scope(principal: Principal, scope: str) -> None:
    """403 unless the caller holds `scope`."""
    if not principal.has_scope(scope):
        raise ProblemError(
            403, f"This operation needs the {scope!r} scope.", code="RECSYS_INSUFFICIENT_SCOPE"
        )


DEFAULT_MEDIA: tuple[str, ...] = ("application/json",)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_BODY_METHODS_AND_DELETE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_STATUS_TEXT = {code: str(code) for code in range(100, 600)}


# --- one-step middlewares (tests, small apps): configurations of ServingMiddleware -----------
def RequestIdMiddleware() -> ServingMiddleware:  # noqa: N802 (used like the class it was)
    return ServingMiddleware()


def BodyLimitMiddleware(max_bytes: int) -> ServingMiddleware:  # noqa: N802
    return ServingMiddleware(request_ids=False, max_body_bytes=max_bytes)


def GzipMiddleware(min_bytes: int = 1024, level: int = 5) -> ServingMiddleware:  # noqa: N802
    return ServingMiddleware(request_ids=False, gzip_min_bytes=min_bytes, gzip_level=level)

"""`POST /v1/recommend` without Falcon's Request / Response objects and middleware dispatch.

`ServingApp` is the Falcon app of `create_app`; a call for exactly ``POST /v1/recommend`` is
answered by `_recommend`, which runs the very same steps Falcon would (the `ServingMiddleware`
steps: request id and trace context, body limits, authentication, X-Org-Id, rate limits, media
type, scope; the route table's body decoder; `RecommendResource.answer`; the Problem Details of
any error; RateLimit, request id and gzip response headers; metrics and access log) on the
WSGI environ, and answers with the same status, headers (same order, Falcon's lowercase names)
and body. Everything else - another
path or method, a Content-Length that is not plain digits (Falcon's own 400 for it), a browser
request (`Origin`) while CORS is configured - goes through Falcon. Both paths answer the same
requests alike: `tests/serving/test_serving_fastpath.py` runs each request class through both.

(Falcon's Request and Response construction, routing and middleware calls were ~100k
instructions per request, as much as the trivial endpoint's whole app.)
"""

from __future__ import annotations

import falcon
import orjson

from serving.errors import PROBLEM_JSON, internal_error, problem_document
from serving.middleware import DEFAULT_MEDIA, check_media, check_scope
from serving.routing import Route, decoder

PATH = "/v1/recommend"


class _Context:
    """What the middleware steps record about a request (Falcon's `req.context` elsewhere)."""

    __slots__ = (
        "request_id",
        "traceparent",
        "tracestate",
        "started",
        "body_length",
        "principal",
        "ratelimit_state",
    )


class ServingApp(falcon.App):
    """A Falcon app whose `POST /v1/recommend` takes the direct path once `enable_fast_path`
    has been called (see the module docstring)."""

    _fast = False

    def enable_fast_path(
        self, middleware, resource, route: Route, *, cors: bool, problem_base: str
    ) -> None:
        """Answer POST /v1/recommend (`route`, of the route table) with `resource` behind the
        whole `middleware` (a ServingMiddleware with every step on, the app's only middleware
        besides CORS)."""
        if not middleware.complete:
            raise ValueError("the fast path needs a ServingMiddleware with every step on")
        if (route.method, route.path) != ("POST", PATH) or route.media != DEFAULT_MEDIA:
            raise ValueError("the fast path answers POST /v1/recommend with a JSON body")
        if route.query is not None or route.params or route.body is None:
            raise ValueError("the fast path decodes a body, no query or path parameters")
        self._mw = middleware
        self._resource = resource
        self._scope = route.scope
        self._decode = decoder(route.body)
        self._cors = cors
        self._base = problem_base
        self._fast = True

    def __call__(self, env, start_response):
        if self._fast and env.get("PATH_INFO") == PATH and env.get("REQUEST_METHOD") == "POST":
            length = env.get("CONTENT_LENGTH")
            if (not length or (length.isascii() and length.isdigit())) and not (
                self._cors and "HTTP_ORIGIN" in env
            ):
                return self._recommend(env, start_response, int(length) if length else None)
        return super().__call__(env, start_response)

    def _recommend(self, env, start_response, length: int | None):
        mw = self._mw
        ctx = _Context()
        route = None  # (until routed: the metrics' "unmatched", as with Falcon)
        try:
            # process_request
            mw.start(env, ctx)
            ctx.body_length = mw.body_length(length, env)
            ctx.principal = ctx.ratelimit_state = None
            mw.admit(env, ctx)
            route = PATH
            # process_resource, the responder
            if ctx.body_length:  # (check_resource, for this resource: no route parameters)
                check_media(env.get("CONTENT_TYPE"), DEFAULT_MEDIA)
            check_scope(ctx.principal, self._scope)
            # (exactly Content-Length bytes of the WSGI input, capped by `body_length`)
            request = self._decode(env["wsgi.input"].read(length) if length else b"")
            body = self._resource.answer(ctx, request)
        except Exception as ex:
            return self._problem(env, start_response, ctx, route, ex)
        # process_response (the header order and names Falcon gives them)
        headers = [("cache-control", "no-store"), *mw.response_headers(ctx)]
        if mw.accepts_gzip(env):
            headers.append(("vary", "Accept-Encoding"))
            zipped = mw.gzipped(body)
            if zipped is not None:
                body = zipped
                headers.append(("content-encoding", "gzip"))
        mw.observe(ctx, route, "POST", 200, PATH, env)
        headers.append(("content-length", str(len(body))))
        headers.append(("content-type", falcon.MEDIA_JSON))
        start_response("200 OK", headers)
        return [body]

    def _problem(self, env, start_response, ctx, route, ex: Exception):
        """The Problem Details answer of an error raised while answering (as Falcon's error
        serializer, `serving.errors.install`, and the middleware's process_response give it)."""
        mw = self._mw
        if not isinstance(ex, falcon.HTTPError):
            ex = internal_error(ctx.request_id)
        status = ex.status_code
        headers = {name.lower(): value for name, value in (ex.headers or {}).items()}
        headers["content-type"] = PROBLEM_JSON
        body = orjson.dumps(problem_document(ex, PATH, ctx.request_id, self._base))
        for name, value in mw.response_headers(ctx):
            headers[name] = value
        if mw.accepts_gzip(env):
            headers["vary"] = "Accept-Encoding"
            zipped = mw.gzipped(body)
            if zipped is not None:
                body = zipped
                headers["content-encoding"] = "gzip"
        mw.observe(ctx, route, "POST", status, PATH, env)
        headers["content-length"] = str(len(body))
        start_response(falcon.code_to_http_status(status), list(headers.items()))
        return [body]

"""POST /v1/recommend, /v1/recommend/validate and /v1/similar."""

from __future__ import annotations

import falcon
import orjson

from serving.auth import SCOPE_RECOMMEND
from serving.errors import ProblemError
from serving.service import RecommendService


def _body(req: falcon.Request):
    return body_of(req.stream, req.content_length)


def body_of(stream, length: int | None):
    """The JSON body, parsed once with orjson (the middleware has already checked its length
    and Content-Type; Falcon's media machinery is skipped on the hot path)."""
    return raw_body_of(stream, length)[0]


def raw_body_of(stream, length: int | None):
    """(the parsed JSON body, its bytes)."""
    if not length:
        raise ProblemError(400, "The request needs a JSON body.")
    # Exactly Content-Length bytes from the WSGI input (already capped by the middleware):
    # what `req.bounded_stream` would do, without building its wrapper per request.
    raw = stream.read(length)
    try:
        return orjson.loads(raw), raw
    except orjson.JSONDecodeError:
        raise ProblemError(
            400, "The body is not valid JSON.", code="RECSYS_MALFORMED_JSON"
        ) from None


def _send(resp: falcon.Response, result: dict, no_store: bool = True) -> None:
    """Serialize once, straight to bytes (the Content-Type stays application/json)."""
    resp.data = orjson.dumps(result)
    if no_store:
        resp.set_header("Cache-Control", "no-store")


class RecommendResource:
    """Recommendations for a user or an anonymous session (`suffix="validate"`: dry run)."""

    required_scope = SCOPE_RECOMMEND

    def __init__(self, service: RecommendService) -> None:
        self._service = service

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self.answer(req.context, req.stream, req.content_length)
        resp.set_header("Cache-Control", "no-store")

    def answer(self, ctx, stream, length: int | None) -> bytes:
        """The JSON answer (bytes) of the request whose middleware state is `ctx` and whose body
        is `length` bytes of `stream` (shared with `serving.fastpath`)."""
        body, raw = raw_body_of(stream, length)
        return self._service.recommend_json(
            ctx.principal.tenant, body, ctx.started, ctx.request_id, raw
        )

    def on_post_validate(self, req: falcon.Request, resp: falcon.Response) -> None:
        result = self._service.validate(req.context.principal.tenant, _body(req))
        result["meta"]["request_id"] = req.context.request_id
        _send(resp, result)


class SimilarResource:
    """Items similar to one item."""

    required_scope = SCOPE_RECOMMEND

    def __init__(self, service: RecommendService) -> None:
        self._service = service

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        result = self._service.similar(
            req.context.principal.tenant, _body(req), req.context.started
        )
        result["meta"]["request_id"] = req.context.request_id
        _send(resp, result, no_store=False)

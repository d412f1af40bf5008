"""POST /v1/recommend, /v1/recommend/validate and /v1/similar (bodies decoded and checked by
the route table: `req.context.body` is a `serving.schemas` Struct)."""

from __future__ import annotations

import falcon
import orjson

from serving.service import RecommendService


def _send(resp: falcon.Response, result: dict, no_store: bool = True) -> None:
    """Serialize once, straight to bytes (the Content-Type stays application/json)."""
    resp.data = orjson.dumps(result)
    if no_store:
        resp.set_header("Cache-Control", "no-store")


class RecommendResource:
    """Recommendations for a user or an anonymous session (`on_post_validate`: dry run)."""

    def __init__(self, service: RecommendService) -> None:
        self._service = service

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self.answer(req.context, req.context.body)
        resp.set_header("Cache-Control", "no-store")

    def answer(self, ctx, body) -> bytes:
        """The JSON answer (bytes) to the decoded `body` of the request whose middleware state
        is `ctx` (shared with `serving.fastpath`)."""
        return self._service.recommend_json(ctx.principal.tenant, body, ctx.started, ctx.request_id)

    def on_post_validate(self, req: falcon.Request, resp: falcon.Response) -> None:
        result = self._service.validate(req.context.principal.tenant, req.context.body)
        result["meta"]["request_id"] = req.context.request_id
        _send(resp, result)


class SimilarResource:
    """Items similar to one item."""

    def __init__(self, service: RecommendService) -> None:
        self._service = service

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        result = self._service.similar(
            req.context.principal.tenant, req.context.body, req.context.started
        )
        result["meta"]["request_id"] = req.context.request_id
        _send(resp, result, no_store=False)

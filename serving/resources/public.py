"""POST /v1/recommend, /v1/recommend/validate and /v1/similar."""

from __future__ import annotations

import falcon

from serving.auth import SCOPE_RECOMMEND
from serving.errors import ProblemError
from serving.service import RecommendService


def _body(req: falcon.Request):
    if not req.content_length:
        raise ProblemError(400, "The request needs a JSON body.")
    try:
        return req.get_media()
    except falcon.MediaMalformedError:
        raise ProblemError(
            400, "The body is not valid JSON.", code="RECSYS_MALFORMED_JSON"
        ) from None


class RecommendResource:
    """Recommendations for a user or an anonymous session (`suffix="validate"`: dry run)."""

    required_scope = SCOPE_RECOMMEND

    def __init__(self, service: RecommendService) -> None:
        self._service = service

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        result = self._service.recommend(tenant, _body(req), req.context.started)
        result["meta"]["request_id"] = req.context.request_id
        resp.media = result
        resp.cache_control = ["no-store"]

    def on_post_validate(self, req: falcon.Request, resp: falcon.Response) -> None:
        result = self._service.validate(req.context.principal.tenant, _body(req))
        result["meta"]["request_id"] = req.context.request_id
        resp.media = result
        resp.cache_control = ["no-store"]


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
        resp.media = result

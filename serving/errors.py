"""RFC 9457 Problem Details: the one way every error leaves the server.

`ProblemError` is the HTTP error the resources raise; `install(app, base)` makes Falcon render
it, its own routing errors (404, 405), and unexpected exceptions (500) the same way:
``application/problem+json`` with type, title, status, detail, instance, code and request_id.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import falcon
import orjson

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("recsys.serving")

#: status -> (slug of the type URI, title, code) used when an error does not name its own.
_DEFAULTS: dict[int, tuple[str, str, str]] = {
    400: ("invalid-request", "Invalid request", "RECSYS_INVALID_REQUEST"),
    401: ("unauthorized", "Unauthorized", "RECSYS_UNAUTHORIZED"),
    403: ("forbidden", "Forbidden", "RECSYS_FORBIDDEN"),
    404: ("not-found", "Not found", "RECSYS_NOT_FOUND"),
    405: ("method-not-allowed", "Method not allowed", "RECSYS_METHOD_NOT_ALLOWED"),
    409: ("conflict", "Conflict", "RECSYS_VERSION_CONFLICT"),
    411: ("length-required", "Length required", "RECSYS_LENGTH_REQUIRED"),
    412: ("precondition-failed", "Precondition failed", "RECSYS_PRECONDITION_FAILED"),
    413: ("payload-too-large", "Payload too large", "RECSYS_PAYLOAD_TOO_LARGE"),
    415: ("unsupported-media-type", "Unsupported media type", "RECSYS_UNSUPPORTED_MEDIA_TYPE"),
    422: ("unprocessable", "Unprocessable request", "RECSYS_UNPROCESSABLE"),
    428: ("precondition-required", "Precondition required", "RECSYS_PRECONDITION_REQUIRED"),
    429: ("rate-limited", "Too many requests", "RECSYS_RATE_LIMITED"),
    500: ("internal", "Internal server error", "RECSYS_INTERNAL"),
    503: ("unavailable", "Service unavailable", "RECSYS_UNAVAILABLE"),
    504: ("deadline-exceeded", "Deadline exceeded", "RECSYS_DEADLINE_EXCEEDED"),
}


class ProblemError(falcon.HTTPError):
    """An HTTP error with a Problem Details `code` (and optional extension members)."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        code: str | None = None,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        slug, default_title, default_code = _DEFAULTS.get(
            status, ("error", "Error", "RECSYS_ERROR")
        )
        super().__init__(
            status,
            title=title or default_title,
            description=detail,
            headers=dict(headers) if headers else None,
            code=None,
        )
        self.problem_code = code or default_code
        self.slug = slug
        self.extra = dict(extra or {})


def bad_request(detail: str, code: str = "RECSYS_INVALID_REQUEST") -> ProblemError:
    return ProblemError(400, detail, code=code)


def unprocessable(detail: str, code: str = "RECSYS_UNPROCESSABLE") -> ProblemError:
    return ProblemError(422, detail, code=code)


def problem_body(req: falcon.Request, exc: falcon.HTTPError, base: str) -> dict[str, Any]:
    """The Problem Details object for an HTTP error raised while handling `req`."""
    return problem_document(exc, req.path, getattr(req.context, "request_id", None), base)


def problem_document(
    exc: falcon.HTTPError, path: str, request_id: str | None, base: str
) -> dict[str, Any]:
    """The Problem Details object of an HTTP error raised while handling a request for `path`."""
    status = exc.status_code
    slug, title, code = _DEFAULTS.get(status, ("error", "Error", "RECSYS_ERROR"))
    if isinstance(exc, ProblemError):
        slug, code = exc.slug, exc.problem_code
    body: dict[str, Any] = {
        "type": base + slug,
        "title": exc.title or title,
        "status": status,
        "detail": exc.description or exc.title or title,
        "instance": path,
        "code": code,
        "request_id": request_id,
    }
    if isinstance(exc, ProblemError) and exc.extra:
        body.update(exc.extra)
    return body


def internal_error(request_id: str | None) -> ProblemError:
    """The 500 Problem of an unexpected exception (being handled), after logging it."""
    log.exception("unhandled error", extra={"request_id": request_id})
    return ProblemError(500, "The server failed to handle this request; see its logs.")


def install(app: falcon.App, base: str) -> None:
    """Route every error of `app` through the Problem Details serializer."""

    def serialize(req: falcon.Request, resp: falcon.Response, exc: falcon.HTTPError) -> None:
        resp.data = orjson.dumps(problem_body(req, exc, base))
        resp.content_type = PROBLEM_JSON

    def unexpected(req: falcon.Request, resp: falcon.Response, ex: Exception, params) -> None:
        raise internal_error(getattr(req.context, "request_id", None))

    app.set_error_serializer(serialize)
    app.add_error_handler(Exception, unexpected)
    # Falcon's own HTTPError handler must win over the catch-all above (handlers are matched
    # by the most specific class in the exception's MRO, so re-registering is not needed).

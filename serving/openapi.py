"""The OpenAPI 3.1 document (`/openapi.json`), generated from the route table and its msgspec
types: nothing in it is written by hand, so it cannot drift from what the server checks.

Schemas are JSON Schema 2020-12 (msgspec's output), so tests validate real requests and
responses with jsonschema against `spec["components"]["schemas"]`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec

from serving.routing import JSON, NDJSON, ORG_HEADER, Route, TenantId
from serving.schemas import Problem

PROBLEM_JSON = "application/problem+json"
_REF = "#/components/schemas/{name}"
_SECURED = [{"bearer": []}, {"apiKey": []}]

_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No content",
    400: "Malformed request: a field has the wrong type, is out of range or unknown",
    401: "Missing or invalid credentials",
    403: "Wrong tenant or missing scope",
    404: "Not found",
    409: "Version conflict",
    410: "Deleted",
    411: "Content-Length required",
    412: "Precondition failed (stale If-Match)",
    413: "Body too large",
    415: "Unsupported media type",
    422: "Well-formed but semantically invalid (limits, impossible constraints, unknown ids)",
    428: "Precondition required (send If-Match, or If-None-Match: * to create)",
    429: "Rate limited (see Retry-After)",
    500: "Unexpected error",
    503: "Not ready (no snapshot loaded) or a dependency is unavailable",
    504: "Deadline exceeded",
}


def _types(routes: Iterable[Route]) -> list[Any]:
    out: list[Any] = [Problem, TenantId]
    for r in routes:
        for t in (r.body, r.response, *r.params.values()):
            if t is not None and t not in out:
                out.append(t)
    return out


def _operation_id(route: Route) -> str:
    words = re.sub(r"[{}]", "", route.path).strip("/").replace(".", "_")
    return route.method.lower() + "_" + re.sub(r"[^A-Za-z0-9]+", "_", words)


def _query_parameters(query: type, schema_of) -> list[dict[str, Any]]:
    info = msgspec.inspect.type_info(query)
    out = []
    for field in info.fields:
        out.append(
            {
                "name": field.encode_name,
                "in": "query",
                "required": field.required,
                "schema": _not_null(schema_of(field_type(query, field.name))),
            }
        )
    return out


def _not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without its ``null`` alternative: a query has no null (an
    optional parameter is left out), and ``?since=`` is the empty string, not a null."""
    options = schema.get("anyOf")
    if not options or {"type": "null"} not in options:
        return schema
    rest = [o for o in options if o != {"type": "null"}]
    others = {k: v for k, v in schema.items() if k != "anyOf"}
    return {**rest[0], **others} if len(rest) == 1 else {**others, "anyOf": rest}


def field_type(struct: type, name: str) -> Any:
    """The annotated type of a Struct field (for its JSON Schema)."""
    import typing

    return typing.get_type_hints(struct, include_extras=True)[name]


def build_spec(version: str, routes: Iterable[Route]) -> dict[str, Any]:
    """The OpenAPI document of a server of `version` answering `routes`."""
    routes = tuple(routes)
    types = _types(routes)
    for r in routes:
        if r.query is not None:
            types.extend(field_type(r.query, f) for f in r.query.__struct_fields__)
    schemas, components = msgspec.json.schema_components(types, ref_template=_REF)
    schema_of = dict(zip(map(_key, types), schemas, strict=True)).__getitem__

    def schema(t: Any) -> dict[str, Any]:
        return schema_of(_key(t))

    problem = {"content": {PROBLEM_JSON: {"schema": schema(Problem)}}}
    org_header = {
        "name": ORG_HEADER,
        "in": "header",
        "required": False,
        "description": "The tenant the call is for: the credentials' own (400 when it is not "
        "a tenant id, 403 when it is another tenant).",
        "schema": schema(TenantId),
    }
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        op: dict[str, Any] = {
            "operationId": _operation_id(r),
            "summary": r.summary,
            "security": [] if r.scope is None else _SECURED,
        }
        if r.tags:
            op["tags"] = list(r.tags)
        if r.scope is not None:
            op["x-scope"] = r.scope
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": schema(t)}
            for name, t in r.params.items()
        ]
        if r.query is not None:
            parameters += _query_parameters(r.query, schema)
        parameters += [
            {"name": h, "in": "header", "required": False, "schema": {"type": "string"}}
            for h in r.headers
        ]
        if r.scope is not None:
            parameters.append(org_header)
        if parameters:
            op["parameters"] = parameters
        if r.body is not None:
            content = {JSON: {"schema": schema(r.body)}}
            if NDJSON in r.media:
                content[NDJSON] = {
                    "schema": {"type": "string", "description": "one JSON object per line"}
                }
            op["requestBody"] = {"required": r.body_required, "content": content}
        responses: dict[str, Any] = {}
        for status in (r.status, *r.also):
            ok: dict[str, Any] = {"description": _STATUS_TEXT.get(status, "OK")}
            if r.response is not None:
                ok["content"] = {r.response_media: {"schema": schema(r.response)}}
            responses[str(status)] = ok
        for status in r.statuses():
            if str(status) not in responses:
                responses[str(status)] = {"description": _STATUS_TEXT[status], **problem}
        op["responses"] = responses
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "recsys-svc",
            "version": version,
            "description": "Recommendations from precomputed snapshots. Errors are RFC 9457 "
            "Problem Details (application/problem+json).",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
        },
        "paths": paths,
    }


def _key(t: Any) -> Any:
    # types as dict keys: unions and annotated types hash by value
    return repr(t) if not isinstance(t, type) else t

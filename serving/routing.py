"""How a `Route` of the one route table (`serving.routes.ROUTES`) becomes a Falcon responder and
an OpenAPI operation.

A route declares its method, path, handler (a resource of `create_app` and one of its
methods), scope, the types of its path parameters, query and JSON body (msgspec types), its
success status and body, and the error statuses it can answer. `mount` adds every route to the
app: before the handler runs, the path parameters, the query and the body are decoded and
checked against those types (400 Problem Details naming the field on any mismatch): the path
parameters are passed on to the handler, the query and the body are left on `req.context`
(`query`, `body`; `json_body(req)` gives the body as plain JSON values). `serving.openapi`
builds `/openapi.json` from the same routes and types, so the contract and its checks cannot
drift apart.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from typing import Annotated, Any

import falcon
import msgspec
import orjson

from recsys.tenancy import TENANT_ID_PATTERN
from serving.errors import ProblemError

JSON = "application/json"
NDJSON = "application/x-ndjson"

TenantId = Annotated[
    str,
    msgspec.Meta(
        pattern=TENANT_ID_PATTERN,
        description="a tenant id: 1-64 ASCII letters, digits, '_', '-', '.' (never '..')",
    ),
]
#: The header a caller may send on every secured route to name the tenant the call is for: it
#: must be the credentials' own tenant (400 when it is not a tenant id, 403 when it is another).
ORG_HEADER = "X-Org-Id"


@dataclasses.dataclass(frozen=True, slots=True)
class Route:
    """One operation of the HTTP API."""

    method: str
    path: str
    handler: tuple[str, str]  # (resource name in create_app, its method)
    summary: str
    scope: str | None  # None: public (no credentials)
    params: dict[str, Any] = dataclasses.field(default_factory=dict)  # path parameter types
    query: type | None = None  # a Struct of query parameters
    body: Any = None  # the JSON body's type (None: no body)
    body_required: bool = True
    media: tuple[str, ...] = (JSON,)  # accepted body media types (NDJSON: parsed by the handler)
    body_by_handler: bool = False  # the handler decodes the body itself (its own error answers)
    status: int = 200
    also: tuple[int, ...] = ()  # other success statuses with the same body (200 + 201 ...)
    response: Any = None  # the success body's type (None: no body)
    response_media: str = JSON
    errors: tuple[int, ...] = ()  # statuses beyond the ones the route's shape implies
    headers: tuple[str, ...] = ()  # request headers it reads (If-Match, If-None-Match, ...)
    tags: tuple[str, ...] = ()
    description: str | None = None

    def statuses(self) -> tuple[int, ...]:
        """Every error status the route can answer: its own plus what its shape implies."""
        out = set(self.errors) | {500}
        if self.scope is not None:  # (400: an `ORG_HEADER` that is not a tenant id)
            out |= {400, 401, 403, 429}
        if self.body is not None:
            out |= {400, 411, 413, 415}
        if self.query is not None or self.params:
            out.add(400)
        if self.params:
            out.add(404)
        return tuple(sorted(out))


def _decode_error(ex: msgspec.ValidationError, where: str) -> ProblemError:
    # msgspec names the field as a JSON path ("... - at `$.k`"); say where it is
    detail = str(ex).replace("`$", f"`{where}")
    return ProblemError(400, f"Invalid {where}: {detail}.", code=INVALID)


def read_body(req: falcon.Request) -> bytes:
    """The request's body bytes, read once (the middleware has checked its length)."""
    raw = getattr(req.context, "raw_body", None)
    if raw is None:
        length = req.content_length
        raw = req.stream.read(length) if length else b""
        req.context.raw_body = raw
    return raw


def json_body(req: falcon.Request) -> Any:
    """The body as plain JSON values (for handlers that keep a document as sent)."""
    return parse_json(read_body(req))


def parse_json(raw: bytes) -> Any:
    """Plain JSON values of a body; 400 for an empty or malformed one."""
    if not raw:
        raise ProblemError(400, "The request needs a JSON body.")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProblemError(400, "The body is not valid JSON.", code=MALFORMED) from None


MALFORMED = "RECSYS_MALFORMED_JSON"
INVALID = "RECSYS_INVALID_REQUEST"


@functools.cache
def decoder(type_: Any) -> Callable[[bytes], Any]:
    """A function decoding a JSON body into `type_` (in C), with the route table's errors: 400
    for an empty or malformed body, and 400 naming the field that does not conform."""
    decode = msgspec.json.Decoder(type_).decode

    def decode_body(raw: bytes) -> Any:
        if not raw:
            raise ProblemError(400, "The request needs a JSON body.")
        try:
            return decode(raw)
        except msgspec.ValidationError as ex:
            if "got `float`" not in str(ex):
                raise _decode_error(ex, "body") from None
            # JSON has one number type: 5.0 is the integer 5 (as JSON Schema's "integer" says),
            # which msgspec's strict decoding refuses; checked again with such numbers as ints
            return check(_integral_floats_as_ints(orjson.loads(raw)), type_, "body")
        except msgspec.DecodeError:
            raise ProblemError(400, "The body is not valid JSON.", code=MALFORMED) from None

    return decode_body


def encodable(value: Any) -> bool:
    """Whether a free-form JSON value of a body (attributes, context, metadata...) can be stored
    and answered as JSON text: orjson's integers (64 bits) and nesting (254 levels). JSON bounds
    neither, so no schema refuses them; each place that stores such a value checks it with this
    and answers 422 (a batch: that item alone), since one stored would fail every later read."""
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def _integral_floats_as_ints(value: Any) -> Any:
    if type(value) is float:
        return int(value) if value.is_integer() else value
    if type(value) is list:
        return [_integral_floats_as_ints(v) for v in value]
    if type(value) is dict:
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    return value


def check(value: Any, type_: Any, where: str) -> Any:
    """`value` (plain JSON values) as `type_`; 400 naming the field when it does not conform."""
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as ex:
        if "got `float`" in str(ex):  # (5.0 is the integer 5: see `decoder`)
            try:
                return msgspec.convert(_integral_floats_as_ints(value), type_)
            except msgspec.ValidationError as again:
                ex = again
        raise _decode_error(ex, where) from None


class _Endpoint:
    """The Falcon resource of one path: a responder per method of its routes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.required_scope: dict[str, str | None] = {}
        self.accepted_media: tuple[str, ...] = (JSON,)

    def add(self, route: Route, handler: Callable) -> None:
        self.required_scope[route.method] = route.scope
        media = set(self.accepted_media) | set(route.media)
        self.accepted_media = tuple(sorted(media))
        setattr(self, "on_" + route.method.lower(), _responder(route, handler))


def _query_decoder(query: type) -> Callable[[dict[str, Any]], Any]:
    """The query Struct of a request's parameters (strings converted to the field types).

    msgspec's lax conversion (strings to the field types) reads more than the spec allows; two
    such readings are refused: ``0.5`` as a Unix time where a date-time must be RFC 3339 text,
    and ``null`` as no value where a parameter is not a string (a query has no null: an
    optional parameter is left out)."""
    info = msgspec.inspect.type_info(query)
    times, not_text = set(), set()

    def kinds(t: Any) -> list[Any]:
        if isinstance(t, msgspec.inspect.Metadata):  # (Annotated with constraints)
            return kinds(t.type)
        if isinstance(t, msgspec.inspect.UnionType):
            return [k for member in t.types for k in kinds(member)]
        return [t]

    for field in info.fields:
        types = kinds(field.type)
        if any(isinstance(t, msgspec.inspect.DateTimeType) for t in types):
            times.add(field.encode_name)
        if not any(isinstance(t, msgspec.inspect.StrType) for t in types):
            not_text.add(field.encode_name)

    def decode(params: dict[str, Any]) -> Any:
        for name in not_text & params.keys():
            if params[name] == "null":
                raise msgspec.ValidationError(f"Expected a value, got `null` - at `$.{name}`")
        for name in times & params.keys():
            value = params[name]
            if isinstance(value, str) and value.lstrip("+-").replace(".", "", 1).isdigit():
                raise msgspec.ValidationError(f"Invalid RFC3339 encoded datetime - at `$.{name}`")
        return msgspec.convert(params, query, strict=False)

    return decode


def _responder(route: Route, handler: Callable) -> Callable:
    params = tuple(route.params.items())
    query_type = route.query
    decode_query = _query_decoder(query_type) if query_type is not None else None
    # (an NDJSON body is split into lines and checked by its handler)
    checked = route.body is not None and route.media == (JSON,) and not route.body_by_handler
    decode = decoder(route.body) if checked else None

    def respond(req: falcon.Request, resp: falcon.Response, **kwargs: str) -> None:
        ctx = req.context
        for name, type_ in params:
            where = f"path parameter '{name}'"
            if "\x00" in kwargs[name]:  # (no id holds one; ids name files, which end at it)
                raise ProblemError(400, f"Invalid {where}: a NUL character.", code=INVALID)
            kwargs[name] = check(kwargs[name], type_, where)
        if query_type is not None:
            try:
                ctx.query = decode_query(req.params)
            except msgspec.ValidationError as ex:
                raise _decode_error(ex, "query") from None
        if decode is not None:
            raw = read_body(req)
            ctx.body = decode(raw) if raw or route.body_required else None
        handler(req, resp, **kwargs)

    respond.__name__ = f"{route.handler[0]}.{route.handler[1]}"
    return respond


def mount(app: falcon.App, routes: Iterable[Route], resources: dict[str, Any]) -> None:
    """Add every route to `app`, its handler taken from `resources`."""
    endpoints: dict[str, _Endpoint] = {}
    for route in routes:
        name, method = route.handler
        endpoint = endpoints.get(route.path)
        if endpoint is None:
            endpoint = endpoints[route.path] = _Endpoint(route.path)
        endpoint.add(route, getattr(resources[name], method))
    for path, endpoint in endpoints.items():
        app.add_route(path, endpoint)


def public_paths(routes: Iterable[Route]) -> frozenset[str]:
    """Paths whose every route needs no credentials."""
    secured = {r.path for r in routes if r.scope is not None}
    return frozenset(r.path for r in routes if r.path not in secured)


def find(routes: Iterable[Route], method: str, path: str) -> Route:
    """The route of `method` and `path`."""
    for route in routes:
        if route.method == method and route.path == path:
            return route
    raise KeyError((method, path))

"""`validation.ParsedShapes` (a recommend body whose shape - the body without its user member -
was validated before is not validated again) gives exactly what `parse_recommend` gives, for
every body, and is used only when that is certain."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from serving.config import ServingConfig
from serving.errors import ProblemError
from serving.validation import Limits, ParsedShapes, RecommendRequest, parse_recommend

CONFIG = ServingConfig.from_env({})
TCONF: dict = {"defaults": {"k": 7}}
LIMITS = Limits.for_tenant(CONFIG, TCONF)


def parsed(body_bytes: bytes, shapes: ParsedShapes, tconf=TCONF, limits=LIMITS):
    """(request, warnings, from the cache?) as RecommendService.parse answers."""
    body = orjson.loads(body_bytes)
    key = ParsedShapes.key("acme", body, body_bytes)
    if key is not None:
        found = shapes.get(key[0], tconf, limits, key[1])
        if found is not None:
            return (*found, True)
    req, warnings = parse_recommend(body, limits, tconf)
    if key is not None:
        shapes.put(key[0], tconf, limits, req, warnings)
    return req, warnings, False


def expected(body_bytes: bytes, tconf=TCONF, limits=LIMITS):
    return parse_recommend(orjson.loads(body_bytes), limits, tconf)


def same(a: tuple, b: tuple) -> bool:
    return dataclasses.asdict(a[0]) == dataclasses.asdict(b[0]) and a[1] == b[1]


BODIES = [
    b'{"k":20,"user":{"user_id":"%s"},"candidates":{"exclude_ids":["i1","i2"]},'
    b'"constraints":{"forbidden_tags":["t7"],"max_per_tag":{"t1":2,"t2":1}}}',
    b'{"user":{"user_id":"%s"}}',  # defaults: surface and k warned/applied
    b'{"surface":"home","user":{"user_id":"%s"},"options":{"include_reasons":true}}',
    # the member is nested (context) while the top-level user is written with spaces
    b'{"context":{"user":{"user_id":"%s"}},"user": {"user_id": "u1"}}',
    # a duplicate key: the last user wins
    b'{"user":{"user_id":"%s"},"surface":"x","user":{"user_id":"last"}}',
    b'{"user":{"user_id":"%s"},"surface":"x","user":{"user_id":"%s"}}',
    b'{"user":{"user_id":"%s","session_id":"s"}}',  # more than a user id: not cached
    b'{"user":{"user_id":"%s"},"context":{"note":"\\"user\\":{\\"user_id\\":\\"a\\"}"}}',
]


@pytest.mark.parametrize("template", BODIES)
def test_every_body_parses_as_without_the_cache(template):
    shapes = ParsedShapes()
    for uid in ["u1", "u2", "u1", "a", "é", 'q"uote', "x" * 256, "last", "u%d", "\\"]:
        raw = template.replace(b"%s", orjson.dumps(uid)[1:-1])
        got = parsed(raw, shapes)
        assert same(got[:2], expected(raw)), (raw, got)


def test_a_shape_is_validated_once_then_served_for_other_users():
    shapes = ParsedShapes()
    raw = BODIES[0]
    assert parsed(raw.replace(b"%s", b"u1"), shapes)[2] is False
    req, warnings, cached = parsed(raw.replace(b"%s", b"u2"), shapes)
    assert cached and req.user_id == "u2" and req.max_per_tag == {"t1": 2, "t2": 1}
    assert isinstance(req, RecommendRequest)
    # another tenant config (or limits) validates again
    other = {"defaults": {"k": 3}}
    req, _, cached = parsed(raw.replace(b"%s", b"u3"), shapes, tconf=other)
    assert not cached and req.k == 20
    req, _, cached = parsed(b'{"user":{"user_id":"u3"}}', shapes, tconf=other)
    assert not cached and req.k == 3
    # a too long id is not taken from the cache: it fails validation as always
    with pytest.raises(ProblemError):
        parsed(raw.replace(b"%s", b"x" * 257), shapes)


def test_warnings_are_copies():
    shapes = ParsedShapes()
    raw = b'{"user":{"user_id":"%s"}}'
    _, warnings, _ = parsed(raw.replace(b"%s", b"u1"), shapes)
    warnings.append({"code": "X"})
    warnings[0]["detail"] = "changed"
    _, again, cached = parsed(raw.replace(b"%s", b"u2"), shapes)
    assert cached and again == expected(raw.replace(b"%s", b"u2"))[1]


def test_with_user_copies_every_field():
    req, _ = parse_recommend(orjson.loads(BODIES[0].replace(b"%s", b"u1")), LIMITS, TCONF)
    copy = req.with_user("u9")
    assert dataclasses.asdict(copy) == {**dataclasses.asdict(req), "user_id": "u9"}

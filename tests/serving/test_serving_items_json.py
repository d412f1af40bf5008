"""The plain items of a recommend answer, written directly (`serving.service.items_json`), are
byte for byte what orjson.dumps writes for the dicts; so is a whole answer."""

from __future__ import annotations

import random

import orjson
from serving_helpers import auth

from serving.service import items_json

TRICKY = [
    "a",
    "",
    "x,y",
    '","',
    'q"',
    "back\\",
    "\\",
    "é",
    "😀",
    "\n\t",
    "\x00",
    "a b",
    "[]{}:",
    "%b",
    "%%",
    "%s",
]


def _dicts(ids, scores):
    return orjson.dumps(
        [
            {"item_id": i, "rank": r, "score": s}
            for r, (i, s) in enumerate(zip(ids, scores, strict=True), 1)
        ]
    )


def test_items_json_matches_orjson():
    rng = random.Random(5)
    specials = [0.0, -0.0, 1.0, 1e-06, 5e-05, 0.1 + 0.2, 123456.789012, 1e16, -3.5, 2.0**-30]
    specials += [float("nan"), float("inf")]
    for _ in range(3000):
        n = rng.choice((rng.randrange(0, 40), rng.randrange(250, 300)))
        ids = [
            rng.choice(TRICKY) + str(rng.randrange(10**6)) if rng.random() < 0.3 else f"i{j}"
            for j in range(n)
        ]
        scores = [
            rng.choice(specials) if rng.random() < 0.3 else round(rng.uniform(-2, 2), 6)
            for _ in range(n)
        ]
        got = items_json(ids, scores)
        if got is None:  # only where a quote or a trailing backslash makes the split ambiguous
            assert any('"' in i or i.endswith("\\") for i in ids), ids
            continue
        assert got == _dicts(ids, scores), (ids, scores)


def test_answer_bytes_match_the_object(client, monkeypatch):
    """recommend_json == orjson.dumps(recommend + request id) on the same ranked answer."""
    import serving.service as service_module

    captured = []
    real = service_module.RecommendService._recommend

    def twice(self, tenant, body, started, *raw):
        parts = real(self, tenant, body, started, *raw)
        captured.append((self, parts))
        return parts

    monkeypatch.setattr(service_module.RecommendService, "_recommend", twice)
    bodies = [
        {"k": 5, "user": {"user_id": "u1"}},
        {"k": 10, "user": {"user_id": "u2"}, "segment": "s1"},
        {"user": {"session_id": "s"}, "options": {"include_trace": True}},
        {"user": {"user_id": "u1"}, "options": {"explain": "summary"}},
        {"user": {"user_id": "u1"}, "options": {"include_reasons": True}},
        {"user": {"anonymous_id": "x"}, "anchors": {"item_ids": ["a0"]}, "k": 0 + 3},
    ]
    for body in bodies:
        resp = client.simulate_post("/v1/recommend", json=body, headers=auth())
        assert resp.status_code == 200, resp.text
        service, (live, req, ranked, meta, warnings) = captured[-1]
        expected = orjson.dumps(service._response(live, req, ranked, meta, warnings))
        assert resp.content == expected
        assert orjson.loads(resp.content)["meta"]["request_id"] == resp.headers["X-Request-Id"]

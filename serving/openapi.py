"""The OpenAPI 3.1 document of the server (served at /openapi.json).

Schemas are JSON Schema 2020-12, so tests validate real requests and responses with jsonschema
against `SPEC["components"]["schemas"]`.
"""

from __future__ import annotations

from typing import Any

from recsys.snapshot.format import SIGNALS

_STR = {"type": "string", "minLength": 1, "maxLength": 256}
_STR_LIST = {"type": "array", "items": _STR}
_NULLABLE_STR = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


SCHEMAS: dict[str, Any] = {
    "Problem": {
        "type": "object",
        "required": ["type", "title", "status", "detail", "instance", "code", "request_id"],
        "properties": {
            "type": {"type": "string", "format": "uri"},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": "string"},
            "instance": {"type": "string"},
            "code": {"type": "string", "pattern": "^RECSYS_[A-Z_]+$"},
            "request_id": {"type": "string"},
            "current_version": _NULLABLE_STR,
        },
    },
    "Warning": {
        "type": "object",
        "required": ["code", "detail"],
        "additionalProperties": False,
        "properties": {"code": {"type": "string"}, "detail": {"type": "string"}},
    },
    "Weights": {
        "type": "object",
        "additionalProperties": False,
        "properties": {s: {"type": "number", "minimum": 0} for s in SIGNALS},
    },
    "Constraints": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "required_tags": _STR_LIST,
            "forbidden_tags": _STR_LIST,
            "max_per_tag": {
                "type": "object",
                "additionalProperties": {"type": "integer", "minimum": 1},
                "description": "cap per tag; keys may also be brand:<b> or category:<c>",
            },
        },
    },
    "Candidates": {
        "type": "object",
        "additionalProperties": False,
        "properties": {"include_ids": _STR_LIST, "exclude_ids": _STR_LIST},
    },
    "Options": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "include_reasons": {"type": "boolean"},
            "explain": {"enum": ["none", "summary", "full"]},
            "include_trace": {"type": "boolean"},
            "seed": {"type": "integer", "minimum": 0},
        },
    },
    "RecommendRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["user"],
        "properties": {
            "surface": _STR,
            "segment": _STR,
            "k": {"type": "integer", "minimum": 1, "maximum": 200},
            "user": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"user_id": _STR, "anonymous_id": _STR, "session_id": _STR},
                "anyOf": [
                    {"required": ["user_id"]},
                    {"required": ["anonymous_id"]},
                    {"required": ["session_id"]},
                ],
            },
            "context": {"type": "object"},
            "anchors": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "item_ids": _STR_LIST,
                    "max_anchors": {"type": "integer", "minimum": 1},
                },
            },
            "candidates": _ref("Candidates"),
            "constraints": _ref("Constraints"),
            "weights": _ref("Weights"),
            "options": _ref("Options"),
            "experiment": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id"],
                "properties": {"id": _STR, "variant": _STR},
            },
        },
    },
    "SimilarRequest": {
        "type": "object",
        "additionalProperties": False,
        "required": ["item_id"],
        "properties": {
            "surface": _STR,
            "segment": _STR,
            "item_id": _STR,
            "k": {"type": "integer", "minimum": 1, "maximum": 200},
            "kind": {"enum": ["emb", "cooc", "blend"]},
            "candidates": _ref("Candidates"),
            "constraints": _ref("Constraints"),
            "options": _ref("Options"),
            "context": {"type": "object"},
        },
    },
    "Item": {
        "type": "object",
        "required": ["item_id", "rank", "score"],
        "additionalProperties": False,
        "properties": {
            "item_id": {"type": "string"},
            "rank": {"type": "integer", "minimum": 1},
            "score": {"type": "number"},
            "reasons": {"type": "array", "items": {"type": "string"}},
            "explain": {
                "type": "object",
                "required": ["signals", "rules"],
                "properties": {
                    "signals": {"type": "object", "additionalProperties": {"type": "number"}},
                    "rules": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
    "TraceEntry": {
        "type": "object",
        "required": ["item_id", "source", "outcome"],
        "properties": {
            "item_id": {"type": "string"},
            "source": {"type": "string"},
            "outcome": {
                "enum": [
                    "kept",
                    "excluded",
                    "capped",
                    "pinned",
                    "pin_skipped",
                    "backfilled",
                    "below_k",
                ]
            },
            "rule": {"type": "string"},
            "detail": {"type": "string"},
            "position": {"type": "integer"},
            "rank_before_postrank": {"type": "integer"},
        },
    },
    "Meta": {
        "type": "object",
        "required": [
            "tenant_id",
            "surface",
            "segment",
            "algo_version",
            "snapshot_id",
            "config_version",
            "rules_version",
            "request_id",
            "timings_ms",
            "counts",
        ],
        "properties": {
            "tenant_id": {"type": "string"},
            "surface": {"type": "string"},
            "segment": {"type": "string"},
            "algo_version": {"type": "string"},
            "snapshot_id": {"type": "string"},
            "config_version": _NULLABLE_STR,
            "rules_version": _NULLABLE_STR,
            "request_id": {"type": "string"},
            "timings_ms": {
                "type": "object",
                "required": ["candidates", "scoring", "postrank", "total"],
                "additionalProperties": {"type": "number"},
            },
            "counts": {
                "type": "object",
                "required": ["candidates_in", "filtered", "returned", "backfilled"],
                "additionalProperties": {"type": "integer"},
            },
            "experiment": {
                "type": "object",
                "required": ["id", "variant", "snapshot_id"],
                "properties": {
                    "id": {"type": "string"},
                    "variant": {"type": "string"},
                    "assigned": {"type": "boolean"},
                    "snapshot_id": {"type": "string"},
                },
            },
            "weights": {"type": "object", "additionalProperties": {"type": "number"}},
        },
    },
    "RecommendResponse": {
        "type": "object",
        "required": ["items", "meta", "warnings"],
        "additionalProperties": False,
        "properties": {
            "items": {"type": "array", "items": _ref("Item")},
            "meta": _ref("Meta"),
            "warnings": {"type": "array", "items": _ref("Warning")},
            "trace": {"type": "array", "items": _ref("TraceEntry")},
        },
    },
    "ValidateResponse": {
        "type": "object",
        "required": ["normalized_request", "warnings", "meta"],
        "properties": {
            "normalized_request": {
                "type": "object",
                "required": ["surface", "segment", "k", "options"],
            },
            "warnings": {"type": "array", "items": _ref("Warning")},
            "meta": {
                "type": "object",
                "required": ["request_id"],
                "properties": {"request_id": {"type": "string"}},
            },
        },
    },
    "TenantConfig": {
        "type": "object",
        "properties": {
            "tenant_id": {"type": "string"},
            "config_version": _NULLABLE_STR,
            "defaults": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "weights": _ref("Weights"),
                    "k": {"type": "integer", "minimum": 1},
                    "surface": _STR,
                },
            },
            "limits": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    key: {"type": "integer", "minimum": 0}
                    for key in ("max_k", "max_include_ids", "max_exclude_ids", "max_anchors")
                },
            },
            "surfaces": _STR_LIST,
            "experiments": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["variants"],
                    "properties": {
                        "variants": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {
                                    "name": _STR,
                                    "weight": {"type": "number", "exclusiveMinimum": 0},
                                    "snapshot": {
                                        "type": "string",
                                        "description": "'current' or a snapshot id",
                                    },
                                },
                            },
                        }
                    },
                },
            },
            "strict_similar": {"type": "boolean"},
        },
    },
    "Rule": {
        "type": "object",
        "required": ["id", "type"],
        "properties": {
            "id": _STR,
            "type": {"enum": ["pin", "boost", "bury", "block"]},
            "surfaces": _STR_LIST,
            "segments": _STR_LIST,
            "enabled": {"type": "boolean"},
            "note": {"type": "string"},
            "item_id": _STR,
            "position": {"type": "integer", "minimum": 1},
            "tag": _STR,
            "factor": {"type": "number", "exclusiveMinimum": 0},
            "item_ids": _STR_LIST,
            "tags": _STR_LIST,
        },
    },
    "TenantRules": {
        "type": "object",
        "required": ["rules"],
        "properties": {
            "tenant_id": {"type": "string"},
            "rules_version": _NULLABLE_STR,
            "rules": {"type": "array", "items": _ref("Rule")},
        },
    },
    "InvalidateRequest": {
        "type": "object",
        "properties": {
            "targets": {
                "type": "array",
                "items": {"enum": ["config", "rules", "snapshot", "popularity"]},
            },
            "surface": {"type": "string"},
        },
    },
    "InvalidateResponse": {
        "type": "object",
        "required": ["tenant_id", "invalidated"],
        "properties": {
            "tenant_id": {"type": "string"},
            "invalidated": {"type": "array", "items": {"type": "string"}},
            "surface": _NULLABLE_STR,
            "detail": {"type": "string"},
        },
    },
    "Ready": {
        "type": "object",
        "required": ["status", "tenants"],
        "properties": {
            "status": {"enum": ["ready", "not_ready"]},
            "tenants": {
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "required": ["snapshot_id", "age_s", "error"],
                    "properties": {
                        "snapshot_id": _NULLABLE_STR,
                        "age_s": {"type": ["number", "null"]},
                        "error": _NULLABLE_STR,
                    },
                },
            },
        },
    },
    "Version": {
        "type": "object",
        "required": ["service", "version", "git_sha", "built_at"],
        "properties": {
            k: {"type": "string"} for k in ("service", "version", "git_sha", "built_at")
        },
    },
}


def _problem(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/problem+json": {"schema": _ref("Problem")}},
    }


def _json(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


_COMMON_ERRORS = {
    "400": _problem("Malformed request"),
    "401": _problem("Missing or invalid credentials"),
    "403": _problem("Wrong tenant or missing scope"),
    "413": _problem("Body too large"),
    "415": _problem("Not application/json"),
    "422": _problem("Semantically invalid request"),
    "429": _problem("Rate limited (Retry-After)"),
    "500": _problem("Unexpected error"),
    "503": _problem("No snapshot loaded"),
    "504": _problem("Deadline exceeded"),
}
_ADMIN_ERRORS = {k: v for k, v in _COMMON_ERRORS.items() if k not in ("503", "504")}
_TENANT_PARAM = [
    {"name": "tenant_id", "in": "path", "required": True, "schema": {"type": "string"}}
]
_IF_MATCH = {
    "name": "If-Match",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "the ETag of the version being replaced; 409 when stale",
}
_SECURED = [{"bearer": []}, {"apiKey": []}]


def _body(schema: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema)}}}


def _doc_ops(kind: str, schema: str) -> dict[str, Any]:
    return {
        "parameters": _TENANT_PARAM,
        "get": {
            "summary": f"Get the tenant's {kind}",
            "security": _SECURED,
            "responses": {"200": _json(schema), "404": _problem("Unknown tenant"), **_ADMIN_ERRORS},
        },
        "put": {
            "summary": f"Replace the tenant's {kind} (versioned)",
            "security": _SECURED,
            "parameters": [_IF_MATCH],
            "requestBody": _body(schema),
            "responses": {
                "200": _json(schema),
                "404": _problem("Unknown tenant"),
                "409": _problem("Version conflict"),
                **_ADMIN_ERRORS,
            },
        },
    }


def build_spec(version: str) -> dict[str, Any]:
    """The OpenAPI document for a server of `version`."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "recsys-svc",
            "version": version,
            "description": "Recommendations from precomputed snapshots. Errors are RFC 9457 "
            "Problem Details (application/problem+json).",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
            },
        },
        "paths": {
            "/v1/recommend": {
                "post": {
                    "summary": "Recommend items for a user or an anonymous session",
                    "security": _SECURED,
                    "requestBody": _body("RecommendRequest"),
                    "responses": {"200": _json("RecommendResponse"), **_COMMON_ERRORS},
                }
            },
            "/v1/recommend/validate": {
                "post": {
                    "summary": "Validate and normalize a recommend request",
                    "security": _SECURED,
                    "requestBody": _body("RecommendRequest"),
                    "responses": {"200": _json("ValidateResponse"), **_COMMON_ERRORS},
                }
            },
            "/v1/similar": {
                "post": {
                    "summary": "Items similar to an item",
                    "security": _SECURED,
                    "requestBody": _body("SimilarRequest"),
                    "responses": {
                        "200": _json("RecommendResponse"),
                        "404": _problem("Unknown item (strict_similar)"),
                        **_COMMON_ERRORS,
                    },
                }
            },
            "/v1/admin/tenants/{tenant_id}/config": _doc_ops("config", "TenantConfig"),
            "/v1/admin/tenants/{tenant_id}/rules": _doc_ops("rules", "TenantRules"),
            "/v1/admin/tenants/{tenant_id}/cache/invalidate": {
                "parameters": _TENANT_PARAM,
                "post": {
                    "summary": "Invalidate cached state of the tenant",
                    "security": _SECURED,
                    "requestBody": {
                        "required": False,
                        "content": {"application/json": {"schema": _ref("InvalidateRequest")}},
                    },
                    "responses": {"202": _json("InvalidateResponse", "Accepted"), **_ADMIN_ERRORS},
                },
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "alive",
                            "content": {"application/json": {"schema": {"type": "object"}}},
                        }
                    },
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness (a valid snapshot per tenant)",
                    "security": [],
                    "responses": {"200": _json("Ready"), "503": _json("Ready", "Not ready")},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics (per worker)",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/version": {
                "get": {
                    "summary": "Build info",
                    "security": [],
                    "responses": {"200": _json("Version")},
                }
            },
            **recs_paths(),
        },
    }


# --- issue 6: the /v1/recs surface (serving/recs/), merged into build_spec's paths ---------------
def recs_paths() -> dict[str, Any]:
    """Paths of /v1/recs (events, feedback, runtime). Bodies are JSON objects described in the
    summaries; errors are the same Problem Details as everywhere."""
    obj = {"type": "object"}

    def op(summary: str, ok: str = "200", body: bool = False, params=(), errors=_COMMON_ERRORS):
        out: dict[str, Any] = {
            "summary": summary,
            "security": _SECURED,
            "responses": {
                ok: {"description": "OK", "content": {"application/json": {"schema": obj}}},
                **errors,
            },
        }
        if body:
            out["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": obj}},
            }
        if params:
            out["parameters"] = [
                {"name": n, "in": where, "required": where == "path", "schema": {"type": t}}
                for n, where, t in params
            ]
        return out

    event_id = [("event_id", "path", "string")]
    user_id = [("user_id", "path", "string")]
    return {
        "/v1/recs/events": {
            "post": op(
                "Ingest one event (type|event_type, user_id, item_id, timestamp, session_id, "
                "metadata|context, value, event_id); fsync'd before the answer: 201 accepted, "
                "200 duplicate event_id, 422 invalid with the contract's reason",
                "201",
                True,
            )
        },
        "/v1/recs/events/bulk": {
            "post": op(
                "Ingest many events: a JSON array or NDJSON (one event per line); valid lines are "
                "kept, invalid ones reported by line with a reason",
                body=True,
            )
        },
        "/v1/recs/events/{event_id}": {
            "get": op(
                "An event from the log or the API's landing files (410 when deleted)",
                params=event_id,
            ),
            "delete": op(
                "Delete an event (scope admin): a durable tombstone; the flusher drops "
                "it before landing, ingest drops already-landed ones",
                params=event_id,
            ),
        },
        "/v1/recs/feedback": {
            "post": op(
                "Submit a label {user_id, item_id, label: relevant|not_relevant, source, "
                "confidence, feedback_id}",
                "201",
                True,
            ),
            "get": op(
                "List labels",
                params=[
                    ("user_id", "query", "string"),
                    ("item_id", "query", "string"),
                    ("label", "query", "string"),
                    ("source", "query", "string"),
                    ("limit", "query", "integer"),
                    ("cursor", "query", "string"),
                ],
            ),
        },
        "/v1/recs/feedback/{feedback_id}": {
            "get": op("One label", params=[("feedback_id", "path", "string")])
        },
        "/v1/recs/predict": {
            "post": op(
                "Recommendations (user_id, context, candidate_ids, exclude_ids, filters.tags|"
                "exclude_tags, diversity.max_per_tag, limit, explain, seed, timeout_ms, model, "
                "return_scores); options the engine cannot honour are 422",
                body=True,
            )
        },
        "/v1/recs/users/{user_id}": {
            "get": op(
                "Cached top-N of a user",
                params=user_id
                + [
                    ("limit", "query", "integer"),
                    ("strategy", "query", "string"),
                    ("model", "query", "string"),
                    ("fresh", "query", "boolean"),
                ],
            )
        },
        "/v1/recs/users/{user_id}/realtime": {
            "post": op(
                "Recommendations for one user with full context (predict's body)",
                body=True,
                params=user_id,
            )
        },
        "/v1/recs/batch/predict": {
            "post": op(
                "Up to 100 predict requests; a status and result or problem per request", body=True
            )
        },
        "/v1/recs/item/{item_id}/related": {
            "get": op(
                "Related items",
                params=[
                    ("item_id", "path", "string"),
                    ("limit", "query", "integer"),
                    ("strategy", "query", "string"),
                ],
            )
        },
        "/v1/recs/score": {
            "post": op(
                "Score and order a caller's candidates with the snapshot's factors", body=True
            )
        },
        "/v1/recs/embeddings/search": {
            "post": op(
                "Exact k-NN over item factors (vector or item_id, k, metric cosine|dot, filters "
                "category|available)",
                body=True,
            )
        },
        "/v1/recs/embeddings/{embedding_id}": {
            "get": op(
                "A stored vector: item:<id> or user:<id>",
                params=[("embedding_id", "path", "string")],
            )
        },
        **recs_loop_paths(),
        **crr_paths(),
    }


_RATE = {
    "type": "object",
    "required": ["successes", "trials", "rate", "ci_low", "ci_high"],
    "properties": {
        "successes": {"type": "integer", "minimum": 0},
        "trials": {"type": "integer", "minimum": 0},
        "rate": {"type": ["number", "null"]},
        "ci_low": {"type": ["number", "null"]},
        "ci_high": {"type": ["number", "null"]},
    },
}
RECS_SCHEMAS: dict[str, Any] = {
    "Experiment": {
        "type": "object",
        "required": [
            "id",
            "surface",
            "status",
            "variants",
            "metrics",
            "primary_metric",
            "alpha",
            "assignments",
            "version",
            "created_at",
            "updated_at",
        ],
        "properties": {
            "id": _STR,
            "name": _NULLABLE_STR,
            "description": _NULLABLE_STR,
            "surface": _STR,
            "status": {"enum": ["draft", "running", "paused", "stopped"]},
            "variants": {
                "type": "array",
                "minItems": 2,
                "items": {
                    "type": "object",
                    "required": ["id", "traffic"],
                    "properties": {
                        "id": _STR,
                        "traffic": {"type": "number", "exclusiveMinimum": 0},
                        "snapshot": {"type": "string", "description": "'current' or an id"},
                        "model": {"type": "string", "description": "<name>@<version>"},
                    },
                },
            },
            "metrics": {"type": "array", "items": {"enum": ["ctr", "conversion"]}},
            "primary_metric": {"enum": ["ctr", "conversion"]},
            "alpha": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 0.5},
            "start": _NULLABLE_STR,
            "end": _NULLABLE_STR,
            "assignments": {"type": "object", "additionalProperties": {"type": "string"}},
            "version": {"type": "string"},
            "created_at": {"type": "string"},
            "updated_at": {"type": "string"},
        },
    },
    "ExperimentResults": {
        "type": "object",
        "required": [
            "experiment_id",
            "alpha",
            "primary_metric",
            "variants",
            "comparisons",
            "winner",
            "left_out",
        ],
        "properties": {
            "experiment_id": {"type": "string"},
            "alpha": {"type": "number"},
            "corrected_alpha": {"type": "number"},
            "variants": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": [
                        "id",
                        "users",
                        "impressions",
                        "clicks",
                        "purchases",
                        "converters",
                        "ctr",
                        "conversion",
                    ],
                    "properties": {"ctr": _RATE, "conversion": _RATE},
                },
            },
            "comparisons": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["metric", "a", "b", "z", "p_value", "significant"],
                    "properties": {
                        "z": {"type": ["number", "null"]},
                        "p_value": {"type": ["number", "null"]},
                        "significant": {"type": "boolean"},
                    },
                },
            },
            "winner": {
                "oneOf": [
                    {"type": "null"},
                    {"type": "object", "required": ["variant", "metric", "p_value"]},
                ]
            },
            "left_out": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    },
    "CrrEvents": {
        "type": "object",
        "required": ["events", "total", "next_cursor"],
        "properties": {
            "events": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["eid", "type", "uid", "iid", "timestamp", "value"],
                    "properties": {
                        "eid": {"type": "string"},
                        "type": {"type": "string"},
                        "uid": {"type": "string"},
                        "iid": {"type": "string"},
                        "timestamp": {"type": "number"},
                        "value": {"type": ["number", "null"]},
                    },
                },
            },
            "total": {"type": "integer"},
            "next_cursor": _NULLABLE_STR,
        },
    },
    "CrrRecord": {
        "type": "object",
        "required": ["rid", "created_at", "updated_at"],
        "properties": {
            "uid": {"type": "string"},
            "iid": {"type": "string"},
            "rid": {"type": "string"},
            "tags": {"type": ["array", "null"], "items": {"type": "string"}},
            "price": {"type": ["number", "null"]},
            "available": {"type": ["boolean", "null"]},
            "attributes": {"type": ["object", "null"]},
        },
    },
}
SCHEMAS.update(RECS_SCHEMAS)


def _op(
    summary: str,
    ok: str = "200",
    schema: str | None = None,
    body: bool = False,
    params=(),
    errors=_COMMON_ERRORS,
    extra: dict | None = None,
) -> dict[str, Any]:
    content = _ref(schema) if schema else {"type": "object"}
    out: dict[str, Any] = {
        "summary": summary,
        "security": _SECURED,
        "responses": {
            ok: {"description": "OK", "content": {"application/json": {"schema": content}}},
            **(extra or {}),
            **errors,
        },
    }
    if ok == "204":
        out["responses"][ok] = {"description": "No content"}
    if body:
        out["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    if params:
        out["parameters"] = [
            {"name": n, "in": where, "required": where == "path", "schema": {"type": t}}
            for n, where, t in params
        ]
    return out


_CONFLICT = {
    "409": _problem("Stale If-Match / revision, or a conflicting experiment"),
    "404": _problem("Unknown id"),
}


def recs_loop_paths() -> dict[str, Any]:
    """Experiments, rerank, explain and cold-start seeds (serving/recs/experiments.py,
    rerank.py, seeds.py)."""
    exp = [("experiment_id", "path", "string")]
    return {
        "/v1/recs/experiments": {
            "post": _op(
                "Create an experiment (scope admin): name, surface, status draft|running"
                "|paused|stopped, variants [{id, traffic, snapshot|model}], metrics, "
                "primary_metric, alpha, start, end",
                "201",
                "Experiment",
                True,
                extra=_CONFLICT,
            ),
            "get": _op(
                "List experiments",
                params=[("status", "query", "string"), ("surface", "query", "string")],
            ),
        },
        "/v1/recs/experiments/{experiment_id}": {
            "get": _op(
                "One experiment (ETag = version)", schema="Experiment", params=exp, extra=_CONFLICT
            ),
            "patch": _op(
                "Change an experiment with a JSON merge patch (If-Match; scope admin)",
                schema="Experiment",
                body=True,
                params=exp + [("If-Match", "header", "string")],
                extra=_CONFLICT,
            ),
            "delete": _op(
                "Delete an experiment (If-Match; scope admin)",
                "204",
                params=exp + [("If-Match", "header", "string")],
                extra=_CONFLICT,
            ),
        },
        "/v1/recs/experiments/{experiment_id}/assign": {
            "post": _op(
                "Force-assign a user to a variant for debugging ({user_id, variant|null}; admin)",
                body=True,
                params=exp,
                extra=_CONFLICT,
            )
        },
        "/v1/recs/experiments/{experiment_id}/assignment": {
            "get": _op(
                "The variant a user gets (hashed or forced)",
                params=exp + [("user_id", "query", "string")],
                extra=_CONFLICT,
            )
        },
        "/v1/recs/experiments/{experiment_id}/results": {
            "get": _op(
                "CTR and conversion per variant with Wilson intervals, z-tests, winner at alpha",
                schema="ExperimentResults",
                params=exp + [("alpha", "query", "number")],
                extra=_CONFLICT,
            )
        },
        "/v1/recs/rerank": {
            "post": _op(
                "Order a caller's candidates for a user (stored signals / factors) with the "
                "tenant's rules: {user_id, candidates, limit, weights, filters, business_rules, "
                "exclude_seen, explain}",
                body=True,
            )
        },
        "/v1/recs/explain": {
            "post": _op(
                "Why an item is (not) recommended to a user: signals, contributions, factors, the "
                "pipeline's outcome and rules",
                body=True,
                extra={"404": _problem("Unknown item")},
            )
        },
        "/v1/recs/seed": {
            "get": _op("The tenant's cold-start seeds per surface"),
            "post": _op(
                "Set the seed of a surface {surface, item_ids, strategy} (admin)",
                body=True,
                extra=_CONFLICT,
            ),
        },
        "/v1/recs/seed/{surface}": {
            "get": _op(
                "The seed of one surface", params=[("surface", "path", "string")], extra=_CONFLICT
            ),
            "delete": _op(
                "Remove the seed of a surface (admin)",
                params=[("surface", "path", "string")],
                extra=_CONFLICT,
            ),
        },
    }


def crr_paths() -> dict[str, Any]:
    """The Common Recommender REST API under /v1/crr (serving/crr/)."""
    uid, iid = [("uid", "path", "string")], [("iid", "path", "string")]
    etype = [("event_type", "path", "string")]
    filters = [
        ("history", "query", "string"),
        ("null", "query", "boolean"),
        ("limit", "query", "integer"),
        ("cursor", "query", "string"),
    ]
    ufilters = [("item", "query", "string"), *filters]
    ifilters = [("user", "query", "string"), *filters]
    rec = {"428": _problem("Update without the current rid"), **_CONFLICT}
    out: dict[str, Any] = {}
    for kind, key, one in (("users", uid, "user"), ("items", iid, "item")):
        out[f"/v1/crr/{kind}"] = {
            "post": _op(
                f"Add a {one} (id optional: generated; 409 when it exists); "
                "returns its rid (admin)",
                "201",
                "CrrRecord",
                True,
                extra=rec,
            )
        }
        out[f"/v1/crr/{kind}/{{{key[0][0]}}}"] = {
            "put": _op(
                f"Add or update a {one} (an update needs the current rid: body 'rid' or "
                "If-Match); landed for the pipeline (admin)",
                schema="CrrRecord",
                body=True,
                params=key,
                extra={"201": _json("CrrRecord", "Created"), **rec},
            ),
            "get": _op(f"The {one}'s record", schema="CrrRecord", params=key, extra=rec),
            "delete": _op(f"Delete the {one} (admin)", params=key, extra=rec),
        }
        out[f"/v1/crr/{kind}/{{{key[0][0]}}}/statistics"] = {
            "get": _op(f"Statistics of a {one}", params=key)
        }
    out["/v1/crr/users/{uid}/predictions"] = {
        "get": _op(
            "Score predictions (item repeatable; useStoredRatings)",
            params=uid
            + [
                ("item", "query", "string"),
                ("useStoredRatings", "query", "boolean"),
                ("limit", "query", "integer"),
            ],
            extra=rec,
        )
    }
    out["/v1/crr/users/{uid}/recommendations"] = {
        "get": _op(
            "Ranked recommendations (count)",
            params=uid + [("count", "query", "integer"), ("surface", "query", "string")],
        )
    }
    out["/v1/crr/users/{uid}/events"] = {
        "get": _op("The user's events", schema="CrrEvents", params=uid + ufilters)
    }
    out["/v1/crr/users/{uid}/events/{event_type}"] = {
        "get": _op(
            "The user's events of a type (purchases, ratings, ...)",
            schema="CrrEvents",
            params=uid + etype + ufilters,
            extra=rec,
        ),
        "post": _op(
            "Add an event (or an array) of this type to the user's history (admin)",
            "201",
            body=True,
            params=uid + etype,
            extra=rec,
        ),
    }
    out["/v1/crr/users/{uid}/currentRatings"] = {
        "get": _op("The latest rating of each item the user rated", params=uid)
    }
    out["/v1/crr/items/{iid}/events"] = {
        "get": _op("The item's events", schema="CrrEvents", params=iid + ifilters)
    }
    out["/v1/crr/items/{iid}/events/{event_type}"] = {
        "get": _op(
            "The item's events of a type",
            schema="CrrEvents",
            params=iid + etype + ifilters,
            extra=rec,
        )
    }
    out["/v1/crr/events/{eid}"] = {
        "get": _op(
            "One event (410 when deleted)",
            params=[("eid", "path", "string")],
            extra={"410": _problem("Deleted"), **rec},
        ),
        "delete": _op("Delete an event (admin)", params=[("eid", "path", "string")]),
    }
    out["/v1/crr/statistics"] = {"get": _op("System statistics of the tenant")}
    return out

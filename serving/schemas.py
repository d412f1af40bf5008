"""Typed bodies of the core routes (recommend, similar, tenant admin, ops), as msgspec Structs.

A Struct is both the validator (decoded in C: types, ranges, lengths, enums, required and unknown
fields -> 400) and the source of the JSON Schema in `/openapi.json`. What a schema cannot state
(a tenant's own limits, at least one positive weight, a tag both required and forbidden) is the
second pass in `serving.validation`, answered 422.

Bounds here are the ceilings of the API; the server's configured limits and each tenant's limits
lie at or below them (the config refuses larger values) and are checked by the second pass.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from recsys.contract import EVENT_TYPE_PATTERN, PATTERN_END
from recsys.snapshot.format import SIGNALS

#: Ceilings of the API (the config's RECSYS_MAX_* settings may only lower them).
MAX_K = 1000
MAX_LIST_IDS = 10_000
MAX_ANCHORS = 500
MAX_TAGS = 256
MAX_ID_LENGTH = 256
MAX_SEED = 2**63 - 1

Id = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH, description="an id")]
IdList = Annotated[list[Id], Meta(max_length=MAX_LIST_IDS)]
TagList = Annotated[list[Id], Meta(max_length=MAX_TAGS)]
K = Annotated[int, Meta(ge=1, le=MAX_K)]
Count = Annotated[int, Meta(ge=0)]
Weight = Annotated[float, Meta(ge=0)]
Timestamp = Annotated[str, Meta(description="RFC 3339 time")]
EventType = Annotated[str, Meta(pattern=EVENT_TYPE_PATTERN, description="an event type")]


class Body(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A request body: unknown fields are an error; defaults are left out when re-encoded."""


class Reply(msgspec.Struct, omit_defaults=True):
    """A response body (documentation of what the server sends)."""


# --- problems -----------------------------------------------------------------------------
class Problem(Reply):
    """RFC 9457 Problem Details (`application/problem+json`), the body of every error."""

    type: str
    title: str
    status: Annotated[int, Meta(ge=400, le=599)]
    detail: str
    instance: str
    code: Annotated[str, Meta(pattern="^RECSYS_[A-Z_]+" + PATTERN_END)]
    request_id: str | None
    current_version: str | None = None


class Warning(Reply):  # (the schema's name; shadows the builtin only here)
    code: str
    detail: str


# --- recommend / similar ------------------------------------------------------------------
Weights = msgspec.defstruct(
    "Weights",
    [(s, Weight | None, None) for s in SIGNALS],
    bases=(Body,),
)
Weights.__doc__ = "Weight per signal (at least one positive; an absent signal weighs 0)."


class Constraints(Body):
    required_tags: TagList = []
    forbidden_tags: TagList = []
    max_per_tag: Annotated[
        dict[Id, K],
        Meta(
            max_length=MAX_TAGS,
            description="cap per tag in the answer; keys may also be brand:<b> or "
            "category:<c>; pinned items and an exploration slot's item count toward it and "
            "are never removed by it",
        ),
    ] = {}


class Candidates(Body):
    include_ids: IdList | None = None
    exclude_ids: IdList = []


class Options(Body):
    include_reasons: bool = False
    explain: Literal["none", "summary", "full"] = "none"
    include_trace: bool = False
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None


class User(Body):
    """Who is asking: a known `user_id`, or an anonymous or session id (at least one)."""

    user_id: Id | None = None
    anonymous_id: Id | None = None
    session_id: Id | None = None


class Anchors(Body):
    item_ids: Annotated[list[Id], Meta(max_length=MAX_ANCHORS)] = []
    max_anchors: Annotated[int, Meta(ge=1, le=MAX_ANCHORS)] | None = None


class ExperimentRef(Body):
    id: Id
    variant: Id | None = None


class RecommendRequest(Body):
    user: User
    surface: Id | None = None
    segment: Id | None = None
    k: K | None = None
    context: dict[str, Any] | None = None
    anchors: Anchors | None = None
    candidates: Candidates | None = None
    constraints: Constraints | None = None
    weights: Weights | None = None  # type: ignore[valid-type]
    options: Options | None = None
    experiment: ExperimentRef | None = None


class SimilarRequest(Body):
    item_id: Id
    surface: Id | None = None
    segment: Id | None = None
    k: K | None = None
    kind: Annotated[
        Literal["emb", "cooc", "blend", "content"],
        Meta(
            description="blend: emb + cooc neighbours, content neighbours for an item without "
            "any (a cold item); content: the content model's neighbours only"
        ),
    ] = "blend"
    candidates: Candidates | None = None
    constraints: Constraints | None = None
    options: Options | None = None
    context: dict[str, Any] | None = None


class Explanation(Reply):
    signals: dict[str, float]
    rules: list[str]


class Item(Reply, forbid_unknown_fields=True):
    item_id: str
    rank: Annotated[int, Meta(ge=1)]
    score: float
    reasons: list[str] | None = None
    explain: Explanation | None = None


class TraceEntry(Reply):
    item_id: str
    source: str
    outcome: Literal["kept", "excluded", "capped", "pinned", "pin_skipped", "backfilled", "below_k"]
    rule: str | None = None
    detail: str | None = None
    position: int | None = None
    rank_before_postrank: int | None = None


class ServedExperiment(Reply):
    id: str
    variant: str
    snapshot_id: str
    assigned: bool | None = None
    bandit: Annotated[str, Meta(description="the bandit that chose the variant")] | None = None


class ServedBandit(Reply):
    """The exploration slot a bandit filled: tag the impressions with ``{"bandit": {"id",
    "arm"}}`` and the request id so its rewards are counted."""

    id: str
    arm: str
    slot: Annotated[int, Meta(ge=1)]
    item_id: str


class ResponseMeta(Reply):
    tenant_id: str
    surface: str
    segment: str
    algo_version: str
    snapshot_id: str
    config_version: str | None
    rules_version: str | None
    request_id: str
    timings_ms: dict[str, float]
    counts: dict[str, int]
    experiment: ServedExperiment | None = None
    bandit: ServedBandit | None = None
    weights: dict[str, float] | None = None
    pipeline: dict[str, str] | None = None  # the surface's pipeline: id and revision


class RecommendResponse(Reply):
    items: list[Item]
    meta: ResponseMeta
    warnings: list[Warning]
    trace: list[TraceEntry] | None = None


class ValidateMeta(Reply):
    request_id: str


class ValidateResponse(Reply):
    normalized_request: dict[str, Any]
    warnings: list[Warning]
    meta: ValidateMeta


# --- tenant admin documents ----------------------------------------------------------------
class TenantDefaults(Body):
    weights: Weights | None = None  # type: ignore[valid-type]
    k: K | None = None
    surface: Id | None = None
    anchor_half_life: (
        Annotated[
            float,
            Meta(
                ge=0,
                le=1000,
                description="anchors are listed in the order they happened, the newest last; "
                "in an anonymous session's list the anchor r places before the newest weighs "
                "0.5 ** (r / anchor_half_life); 0: all anchors alike; null: the server's "
                "default (1)",
            ),
        ]
        | None
    ) = None


class TenantLimits(Body):
    max_k: Annotated[int, Meta(ge=1, le=MAX_K)] | None = None
    max_include_ids: Annotated[int, Meta(ge=0, le=MAX_LIST_IDS)] | None = None
    max_exclude_ids: Annotated[int, Meta(ge=0, le=MAX_LIST_IDS)] | None = None
    max_anchors: Annotated[int, Meta(ge=0, le=MAX_ANCHORS)] | None = None


class ConfigVariant(Body):
    name: Id
    snapshot: Annotated[str, Meta(description="'current' or a snapshot id")] | None = None
    weight: Annotated[float, Meta(gt=0)] = 1.0


class ConfigExperiment(Body):
    variants: Annotated[list[ConfigVariant], Meta(min_length=1, max_length=100)]


class TenantConfig(Body):
    """The tenant's serving configuration (a GET answers the effective one, defaults filled)."""

    tenant_id: str | None = None
    config_version: str | None = None
    defaults: TenantDefaults | None = None
    limits: TenantLimits | None = None
    surfaces: Annotated[list[Id], Meta(max_length=1000)] | None = None
    experiments: dict[Id, ConfigExperiment] | None = None
    strict_similar: bool | None = None
    #: surface -> the id of the declared pipeline (/v1/recs/pipelines) that answers it
    pipelines: dict[Id, Id] | None = None
    event_types: (
        Annotated[
            dict[EventType, Annotated[float, Meta(ge=-100, le=100)]],
            Meta(
                max_length=100,
                description="event type -> its weight in training's interactions: a built-in "
                "type's weight changed, or a type of the tenant's own declared (accepted by the "
                "event intake and the ingest beside the built-in ones); the built-in types keep "
                "their weights where not listed",
            ),
        ]
        | None
    ) = None


class Rule(Body):
    """A merchandising rule; which fields apply depends on `type` (checked by the second pass:
    pin needs item_id and position, boost/bury a tag and a factor, block item_ids or tags)."""

    id: Id
    type: Literal["pin", "boost", "bury", "block"]
    surfaces: Annotated[list[Id], Meta(max_length=1000)] | None = None
    segments: Annotated[list[Id], Meta(max_length=1000)] | None = None
    enabled: bool | None = None
    note: Annotated[str, Meta(max_length=2000)] | None = None
    item_id: Id | None = None
    position: Annotated[int, Meta(ge=1, le=MAX_K)] | None = None
    tag: Id | None = None
    factor: Annotated[float, Meta(gt=0)] | None = None
    item_ids: IdList | None = None
    tags: Annotated[list[Id], Meta(max_length=1000)] | None = None


class TenantRules(Body):
    rules: Annotated[list[Rule], Meta(max_length=1000)] = []
    tenant_id: str | None = None
    rules_version: str | None = None


class InvalidateRequest(Body):
    targets: list[Literal["config", "rules", "snapshot", "popularity"]] | None = None
    surface: Id | None = None


class InvalidateResponse(Reply):
    tenant_id: str
    invalidated: list[str]
    surface: str | None = None
    detail: str | None = None


# --- ops ---------------------------------------------------------------------------------
class Health(Reply):
    status: Literal["ok"]


class TenantReadiness(Reply):
    snapshot_id: str | None
    age_s: float | None
    error: str | None


class Ready(Reply):
    status: Literal["ready", "not_ready"]
    tenants: dict[str, TenantReadiness]


class Version(Reply):
    service: str
    version: str
    git_sha: str
    built_at: str

"""Typed query parameters, bodies and answers of the /v1/recs routes (see `serving.schemas` for
the conventions: a `Body` Struct validates (400 naming the field) and documents; a `Reply`
documents what a handler sends; what no schema can state is a second pass answered 422).

Two bodies are checked line by line by their handlers instead of by the route table: an event
(`Event`, also each line of a bulk body) answers 422 with the data contract's reason
(`event_reason`), and a bulk body keeps its valid lines and reports the others by line.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from recsys.contract import PATTERN_END
from recsys.validation import MISSING_ITEM, MISSING_USER, OVERSIZE_EVENT_FIELD
from serving.schemas import (
    MAX_ANCHORS,
    MAX_ID_LENGTH,
    MAX_SEED,
    MAX_TAGS,
    Body,
    ExperimentRef,
    Explanation,
    Id,
    IdList,
    K,
    Reply,
    ResponseMeta,
    ServedExperiment,
    TagList,
    Warning,
    Weights,
)

#: A JSON object not described further (free-form context, stored as sent).
Object = dict[str, Any]

Limit = Annotated[int, Meta(ge=1, le=1000)]
Count = Annotated[int, Meta(ge=0)]
Cursor = Annotated[int, Meta(ge=0, le=2**31 - 1, description="offset of the next page")]


class Query(msgspec.Struct, omit_defaults=True):
    """Query parameters (unknown ones are ignored, as HTTP clients expect)."""


# --- events -----------------------------------------------------------------------------------
#: An optional text of the contract: blank is the same as absent.
_Text = Annotated[str, Meta(max_length=MAX_ID_LENGTH)]


class Event(Body):
    """One interaction. `type` / `event_type` and `metadata` / `context` are two spellings of
    one field (give one). The data contract decides the rest (422 with its `reason`): a
    declared event type, a timestamp from 1990 to a day ahead, ids of at most 256 bytes, a
    context of at most 16 KiB, the caller's tenant."""

    user_id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    item_id: Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH)]
    type: _Text | None = None
    event_type: _Text | None = None
    timestamp: (
        Annotated[
            str | int | float,
            Meta(
                description="ISO-8601 (with or without offset) or epoch seconds / "
                "milliseconds / microseconds; absent: the time of receipt"
            ),
        ]
        | None
    ) = None
    value: Annotated[float, Meta(description="rating, quantity (finite)")] | None = None
    session_id: _Text | None = None
    event_id: (
        Annotated[_Text, Meta(description="absent: derived from the event's content")] | None
    ) = None
    context: Object | None = None
    metadata: Object | None = None
    tenant: Annotated[str, Meta(description="the caller's tenant, if given")] | None = None


_ID_FIELDS = ("user_id", "item_id")


def event_reason(error: msgspec.ValidationError) -> tuple[str, str]:
    """The data contract's (reason, detail) of an event that does not conform to `Event`,
    as the contract's validation names the same fault (`recsys.validation`)."""
    message = str(error)
    field = message.rpartition("`$.")[2].rstrip("`") if " - at `$." in message else None
    if field is None:  # a fault of the object itself: a missing or unknown field, not an object
        for name, detail in zip(_ID_FIELDS, (MISSING_USER, MISSING_ITEM), strict=True):
            if message == f"Object missing required field `{name}`":
                return "missing_id", detail
        return "unparsable", message
    if "of length <=" in message or "of length <" in message:
        return "oversize_field", OVERSIZE_EVENT_FIELD
    if field in _ID_FIELDS and "of length >=" in message:
        return "missing_id", MISSING_USER if field == "user_id" else MISSING_ITEM
    if field == "value":
        return "bad_value", message
    return "unparsable", message


class EventReceipt(Reply):
    status: Literal["accepted", "duplicate"]
    event_id: str


class LineError(Reply):
    line: Annotated[int, Meta(ge=1, description="1-based position of the line (or element)")]
    reason: str
    detail: str | None


class BulkReceipt(Reply):
    received: Count
    accepted: Count
    duplicates: Count
    rejected: Count
    errors: list[LineError]
    event_ids: Annotated[
        list[str | None], Meta(description="per line, its event id (null: rejected)")
    ]


BulkEvent = Annotated[
    Any,
    Meta(
        description="an Event; a line that is not one is rejected in the answer (by line, with "
        "the contract's reason), not the request"
    ),
]
BulkBody = (
    Annotated[list[BulkEvent], Meta(min_length=1)]
    | Annotated[Object, Meta(description="one event")]
)


class StoredEvent(Reply):
    event_id: str
    tenant: str
    user_id: str
    item_id: str
    event_type: str
    timestamp: str
    value: float | None
    session_id: str | None
    context: Object | None


class EventDeletion(Reply):
    event_id: str
    status: Literal["deleted", "already_deleted"]
    known: bool


# --- feedback ---------------------------------------------------------------------------------
FeedbackLabel = Literal["relevant", "not_relevant"]


class FeedbackRequest(Body):
    user_id: Id
    item_id: Id
    label: FeedbackLabel
    feedback_id: Annotated[Id, Meta(description="absent: generated")] | None = None
    source: Id | None = None
    confidence: Annotated[float, Meta(ge=0, le=1)] | None = None
    note: Id | None = None


class Feedback(Reply):
    feedback_id: str
    user_id: str
    item_id: str
    label: FeedbackLabel
    created_at: str
    source: str | UnsetType = UNSET
    confidence: float | UnsetType = UNSET
    note: str | UnsetType = UNSET


class FeedbackPage(Reply):
    items: list[Feedback]
    total: Count
    next_cursor: Annotated[str, Meta(description="the next page's cursor")] | None


class FeedbackQuery(Query):
    user_id: Id | None = None
    item_id: Id | None = None
    label: FeedbackLabel | None = None
    source: Id | None = None
    limit: Limit = 100
    cursor: Cursor = 0


# --- runtime: predict, users, batch, related, score, embeddings -----------------------------
Strategy = Literal["hybrid", "collab", "content", "graph"]
_NOT_HONOURED = Meta(
    description="refused (422 RECSYS_UNSUPPORTED_OPTION): the precomputed snapshot has no such "
    "signal"
)


class PredictFilters(Body):
    tags: Annotated[TagList, Meta(description="items must carry every tag")] = []
    exclude_tags: Annotated[TagList, Meta(description="items must carry none")] = []


class Diversity(Body):
    max_per_tag: Annotated[
        dict[Id, K],
        Meta(
            max_length=MAX_TAGS,
            description="cap per tag; keys may also be brand:<b> or category:<c>",
        ),
    ]


Timeout = Annotated[float, Meta(gt=0, description="only ever tightens the deadline")]


class PredictRequest(Body):
    """A /v1/recommend request in the /v1/recs spelling; options the engine cannot honour are
    refused with 422 (never ignored)."""

    user_id: Id | None = None
    context: (
        Annotated[Object, Meta(description="free; its session_id identifies an anonymous session")]
        | None
    ) = None
    candidate_ids: IdList | None = None
    exclude_ids: IdList | None = None
    filters: PredictFilters | None = None
    limit: K | None = None
    strategy: Annotated[Strategy, Meta(description="only hybrid is served (else 422)")] = "hybrid"
    model: Annotated[Id, Meta(description="must be the live model (else 422)")] | None = None
    return_scores: bool = True
    explain: bool = False
    seed: Annotated[int, Meta(ge=0, le=MAX_SEED)] | None = None
    diversity: Diversity | None = None
    timeout_ms: Timeout | None = None
    surface: Id | None = None
    anchor_ids: Annotated[list[Id], Meta(max_length=MAX_ANCHORS)] | None = None
    experiment: ExperimentRef | None = None
    novelty: Annotated[Any, _NOT_HONOURED] | UnsetType = UNSET
    freshness: Annotated[Any, _NOT_HONOURED] | UnsetType = UNSET
    serendipity_score_threshold: Annotated[Any, _NOT_HONOURED] | UnsetType = UNSET
    filter_query: Annotated[Any, _NOT_HONOURED] | UnsetType = UNSET

    def refused(self) -> list[str]:
        """The options given that the engine cannot honour."""
        return [
            name
            for name in ("novelty", "freshness", "serendipity_score_threshold", "filter_query")
            if getattr(self, name) is not UNSET
        ]


class PredictItem(Reply, forbid_unknown_fields=True):
    item_id: str
    rank: Annotated[int, Meta(ge=1)]
    reason: str | None
    score: float | UnsetType = UNSET
    explain: Explanation | UnsetType = UNSET


class PredictResponse(Reply):
    request_id: str
    model: str
    items: list[PredictItem]
    served_at: str
    meta: ResponseMeta
    warnings: list[Warning]


class UserQuery(Query):
    limit: Limit | None = None
    strategy: Strategy | None = None
    model: Id | None = None
    fresh: Annotated[bool, Meta(description="true is refused (422): lists are precomputed")] = False


class BatchPredictRequest(Body):
    requests: Annotated[list[PredictRequest], Meta(min_length=1, max_length=100)]


class BatchProblem(Reply):
    code: str
    detail: str
    title: str


class BatchResult(Reply):
    status: Annotated[int, Meta(ge=200, le=599)]
    result: PredictResponse | UnsetType = UNSET
    problem: BatchProblem | UnsetType = UNSET


class BatchPredictResponse(Reply):
    request_id: str
    results: list[BatchResult]


RelatedStrategy = Literal["co_view", "co_buy", "content", "blend"]


class RelatedQuery(Query):
    limit: Limit | None = None
    strategy: RelatedStrategy = "blend"


class ScoredItem(Reply):
    item_id: str
    rank: Annotated[int, Meta(ge=1)]
    score: float


class RelatedResponse(Reply):
    item_id: str
    strategy: RelatedStrategy
    items: list[ScoredItem]
    meta: ResponseMeta
    warnings: list[Warning]


class Candidate(Body):
    item_id: Id


Candidates = Annotated[list[Id | Candidate], Meta(min_length=1, max_length=1000)]


class ScoreRequest(Body):
    user_id: Id
    candidates: Annotated[Candidates, Meta(description="item ids, or {item_id} objects")]
    return_sorted: bool = True
    model: Annotated[Id, Meta(description="must be the live model (else 422)")] | None = None


class ItemScore(Reply):
    item_id: str
    score: Annotated[float, Meta(description="user . item factors + item bias")] | None
    known: bool
    available: bool | None


class ScoreResponse(Reply):
    user_id: str
    items: list[ItemScore]
    model: str
    snapshot_id: str


class SearchFilters(Body):
    """Item factors: category, brand, availability, tags (every one). A client index: each
    (key, value) of `metadata` and every tag of `tags` (its metadata's ``tags`` list);
    category / brand / available are metadata keys there too."""

    category: Id | None = None
    brand: Id | None = None
    available: bool | None = None
    tags: TagList | None = None
    metadata: Annotated[dict[str, str | int | float | bool], Meta(max_length=64)] | None = None


#: Vector components: bounded so that products and norms stay finite in float32.
Component = Annotated[float, Meta(ge=-1e12, le=1e12)]


class SearchRequest(Body):
    """Give `item_id` (its factors are the query; the item itself is left out) or a `vector`
    of the snapshot's dimension (else 422)."""

    item_id: Id | None = None
    vector: Annotated[list[Component], Meta(min_length=1, max_length=4096)] | None = None
    k: Annotated[int, Meta(ge=1, le=1000)] = 10
    metric: Literal["cosine", "dot"] = "cosine"
    filters: SearchFilters | None = None
    index: (
        Annotated[
            str,
            Meta(
                pattern=r"^[a-z0-9][a-z0-9_-]{0,63}" + PATTERN_END,
                description="items (default) or users: the live snapshot's factors; any other "
                "name: a client index (POST /v1/recs/embeddings/index; its own metric)",
            ),
        ]
        | None
    ) = None


class Neighbour(Reply):
    id: Annotated[str, Meta(description="item:<item_id> (a client index: the vector's id)")]
    item_id: Annotated[str, Meta(description="the id without an item:/user: prefix")]
    score: float
    metadata: dict[str, Any] | None | UnsetType = UNSET


class SearchResponse(Reply):
    metric: Literal["cosine", "dot"]
    items: list[Neighbour]
    snapshot_id: str | None
    index: str | UnsetType = UNSET
    approximate: bool | UnsetType = UNSET


EmbeddingId = Annotated[
    str,
    Meta(
        min_length=6,
        max_length=MAX_ID_LENGTH + 5,
        pattern=r"^(item|user):[\s\S]",
        description="item:<item_id> or user:<user_id>",
    ),
]


class Embedding(Reply):
    id: str
    dim: Annotated[int, Meta(ge=0)]
    vector: list[float]
    snapshot_id: str


# --- experiments ------------------------------------------------------------------------------
ExperimentId = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}" + PATTERN_END)]
Status = Literal["draft", "running", "paused", "stopped"]
Metric = Literal["ctr", "conversion"]
Time = Annotated[dt.datetime, Meta(tz=True, description="RFC 3339 date-time with an offset")]
Share = Annotated[float, Meta(gt=0, description="a traffic share (shares need not sum to 100)")]
Model = Annotated[
    str, Meta(pattern=r"^[^@]+@[\s\S]+$(?!\n)", description="<name>@<version> (meta.algo_version)")
]
SnapshotName = Annotated[str, Meta(min_length=1, description="'current' or a snapshot id")]
_READ_ONLY = Meta(description="read-only: ignored when sent back")


class VariantSpec(Body):
    """A variant; `name` / `weight` are the admin config's spellings of `id` / `traffic`."""

    id: ExperimentId | None = None
    name: ExperimentId | None = None
    traffic: Share | None = None
    weight: Share | None = None
    snapshot: SnapshotName | None = None
    model: Model | None = None


class ExperimentSpec(Body):
    """An experiment as created; a second pass answers 422 for a variant id used twice, a
    variant naming both a snapshot and a model, a primary metric not among `metrics`, an end
    not after its start."""

    variants: Annotated[list[VariantSpec], Meta(min_length=2, max_length=10)]
    id: Annotated[ExperimentId, Meta(description="absent: generated")] | None = None
    name: Annotated[str, Meta(min_length=1, max_length=256)] | None = None
    description: Annotated[str, Meta(max_length=4096)] | None = None
    surface: Id = "home"
    status: Status = "draft"
    metrics: Annotated[list[Metric], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["ctr", "conversion"]
    )
    primary_metric: Annotated[Metric, Meta(description="default: the last metric")] | None = None
    alpha: Annotated[float, Meta(gt=0, lt=0.5)] = 0.05
    start: Time | None = None
    end: Time | None = None
    version: Annotated[Any, _READ_ONLY] | UnsetType = UNSET
    assignments: Annotated[Any, _READ_ONLY] | UnsetType = UNSET
    created_at: Annotated[Any, _READ_ONLY] | UnsetType = UNSET
    updated_at: Annotated[Any, _READ_ONLY] | UnsetType = UNSET


class ExperimentPatch(Body):
    """A JSON merge patch (RFC 7396) of an experiment: null removes a field (its default
    applies); the result is checked as an `ExperimentSpec`."""

    variants: Annotated[list[VariantSpec], Meta(min_length=2, max_length=10)] | None | UnsetType = (
        UNSET
    )
    id: ExperimentId | None | UnsetType = UNSET
    name: Annotated[str, Meta(min_length=1, max_length=256)] | None | UnsetType = UNSET
    description: Annotated[str, Meta(max_length=4096)] | None | UnsetType = UNSET
    surface: Id | None | UnsetType = UNSET
    status: Status | None | UnsetType = UNSET
    metrics: Annotated[list[Metric], Meta(min_length=1)] | None | UnsetType = UNSET
    primary_metric: Metric | None | UnsetType = UNSET
    alpha: Annotated[float, Meta(gt=0, lt=0.5)] | None | UnsetType = UNSET
    start: Time | None | UnsetType = UNSET
    end: Time | None | UnsetType = UNSET
    version: Annotated[Any, _READ_ONLY] | UnsetType = UNSET
    assignments: Annotated[Any, _READ_ONLY] | UnsetType = UNSET
    created_at: Annotated[Any, _READ_ONLY] | UnsetType = UNSET
    updated_at: Annotated[Any, _READ_ONLY] | UnsetType = UNSET


class Variant(Reply):
    id: str
    traffic: float
    snapshot: Annotated[str, Meta(description="'current' or a snapshot id")] | UnsetType = UNSET
    model: Annotated[str, Meta(description="<name>@<version>")] | UnsetType = UNSET


class Experiment(Reply):
    id: str
    name: str | None
    description: str | None
    surface: str
    status: Status
    variants: list[Variant]
    metrics: list[Metric]
    primary_metric: Metric
    alpha: float
    start: str | None
    end: str | None
    assignments: Annotated[dict[str, str], Meta(description="forced: user id -> variant id")]
    version: Annotated[str, Meta(description="the revision (also the ETag)")]
    created_at: str | None
    updated_at: str | None


class ExperimentList(Reply):
    items: list[Experiment]
    total: Count


class ExperimentsQuery(Query):
    status: Status | None = None
    surface: Id | None = None


class AssignRequest(Body):
    user_id: Id
    variant: Annotated[Id, Meta(description="a variant id; null: back to the hashed one")] | None


class Assignment(Reply):
    experiment_id: str
    user_id: str
    variant: str
    forced: bool
    version: str


class AssignmentQuery(Query):
    user_id: Id


class ResultsQuery(Query):
    alpha: Annotated[float, Meta(gt=0, lt=0.5)] | None = None
    bucket: Annotated[
        Literal["hour", "day"], Meta(description="the allocation's time bucket (UTC)")
    ] = "day"


class Rate(Reply):
    successes: Count
    trials: Count
    rate: float | None
    ci_low: float | None
    ci_high: float | None


class VariantResult(Reply):
    id: str
    users: Count
    impressions: Count
    clicks: Count
    purchases: Count
    converters: Count
    purchase_value: float
    ctr: Rate
    conversion: Rate


class Comparison(Reply):
    metric: Metric
    a: str
    b: str
    difference: float | None
    z: float | None
    p_value: float | None
    significant: bool


class Winner(Reply):
    variant: str
    metric: Metric
    p_value: float


class ArmTraffic(Reply):
    impressions: Count
    requests: Count
    units: Count  # (distinct users reached)


class AllocationBucket(Reply):
    start: Annotated[str, Meta(description="the bucket's start (UTC)")]
    variants: dict[str, ArmTraffic]


class Allocation(Reply):
    """The traffic each variant got per time bucket: tagged impressions, their requests and
    the users they reached (a bandit's shifting split shows here)."""

    bucket: Literal["hour", "day"]
    series: list[AllocationBucket]


class ExperimentResults(Reply):
    experiment_id: str
    status: Status
    alpha: float
    corrected_alpha: float
    primary_metric: Metric
    variants: list[VariantResult]
    comparisons: list[Comparison]
    winner: Winner | None
    left_out: dict[str, Count]
    allocation: Allocation
    computed_at: str


# --- rerank, explain --------------------------------------------------------------------------
class RerankRequest(Body):
    candidates: Annotated[Candidates, Meta(description="item ids, or {item_id} objects")]
    user_id: Id | None = None
    surface: Id | None = None
    segment: Id | None = None
    limit: K | None = None
    weights: Weights | None = None  # type: ignore[valid-type]
    business_rules: Annotated[bool, Meta(description="apply the tenant's rules")] = True
    filters: PredictFilters | None = None
    exclude_seen: bool = False
    explain: bool = False


class RerankedItem(Reply, forbid_unknown_fields=True):
    item_id: str
    rank: Annotated[int, Meta(ge=1)]
    score: float
    explain: Explanation | UnsetType = UNSET


class Excluded(Reply):
    item_id: str
    outcome: str
    rule: str | None


class RerankMeta(Reply):
    tenant_id: str
    surface: str
    segment: str
    scored_by: Literal["weights", "factors", "candidates", "popularity"]
    snapshot_id: str
    algo_version: str
    counts: dict[str, int]
    request_id: str


class RerankResponse(Reply):
    user_id: str | None
    items: list[RerankedItem]
    excluded: list[Excluded]
    meta: RerankMeta
    warnings: list[Warning]


class ExplainRequest(Body):
    user_id: Id
    item_id: Id
    surface: Id | None = None
    segment: Id | None = None
    model: Annotated[Id, Meta(description="must be the live model (else 422)")] | None = None
    context: Object | None = None


class ItemFacts(Reply):
    available: bool
    category: str | None
    tags: list[str]


class CandidateFacts(Reply):
    precomputed_rank: Annotated[int, Meta(ge=1)]
    score: float
    reason: str
    signals: dict[str, float]
    contributions: dict[str, float]
    contributions_from: str


class FactorScore(Reply):
    dot: float
    bias: float
    score: float


class PipelineOutcome(Reply):
    outcome: str
    rank: int | None
    rules: list[str]
    surface: str
    segment: str
    score: float | UnsetType = UNSET
    reasons: list[str] | UnsetType = UNSET
    rank_before_postrank: int | None | UnsetType = UNSET
    experiment: ServedExperiment | UnsetType = UNSET


class ExplainResponse(Reply):
    user_id: str
    item_id: str
    known_user: bool
    model: str
    snapshot_id: str
    item: ItemFacts
    candidate: CandidateFacts | None
    pipeline: PipelineOutcome
    warnings: list[Warning]
    seen: Annotated[bool, Meta(description="known users only")] | UnsetType = UNSET
    factors: Annotated[FactorScore, Meta(description="known users only")] | UnsetType = UNSET


# --- cold-start seeds -------------------------------------------------------------------------
SeedStrategy = Annotated[
    str,
    Meta(
        max_length=MAX_ID_LENGTH,
        pattern=r"^(popular|trending|(category|tag|segment):[\s\S]*)" + PATTERN_END,
        description="a fallback list of the snapshot: popular, trending, category:<c>, tag:<t>, "
        "segment:<s>",
    ),
]


class SeedRequest(Body):
    """A seed needs item_ids, a strategy, or both (else 422)."""

    surface: Annotated[Id, Meta(description="'*': every surface without its own seed")] = "*"
    item_ids: Annotated[list[Id], Meta(max_length=1000)] = []
    strategy: SeedStrategy | None = None


class Seed(Reply):
    surface: str
    item_ids: list[str]
    strategy: str | None
    updated_at: str


class Seeds(Reply):
    tenant_id: str
    version: Annotated[str, Meta(description="the revision (also the ETag)")] | None
    surfaces: dict[str, Seed]


class OneSeed(Seed):
    version: str

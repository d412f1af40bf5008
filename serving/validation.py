"""The second pass of request validation: what the typed schemas (`serving.schemas`) cannot
state. A body reaches here already decoded and checked by its schema (types, ranges, lengths,
enums, unknown fields: 400); this pass applies the server's and the tenant's own limits and
the semantic rules (an unknown surface, a tag both required and forbidden, at least one positive
weight, ...), each a 422 Problem that the spec lists for the route.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from recsys.snapshot.format import SIGNALS
from serving import schemas
from serving.config import ServingConfig
from serving.errors import unprocessable
from serving.routing import check

DEFAULT_K = 20
DEFAULT_SURFACE = "default"
DEFAULT_SEGMENT = "default"
LIMIT_EXCEEDED = "RECSYS_LIMIT_EXCEEDED"


@dataclass(slots=True)
class Limits:
    """Effective limits for one tenant: the server's caps, lowered by tenant config."""

    max_k: int
    max_include_ids: int
    max_exclude_ids: int
    max_anchors: int
    max_tags: int

    @classmethod
    def for_tenant(cls, config: ServingConfig, tenant_config: dict[str, Any]) -> Limits:
        lim = tenant_config.get("limits") or {}
        return cls(
            max_k=min(config.max_k, lim.get("max_k") or config.max_k),
            max_include_ids=min(
                config.max_list_ids, _given(lim.get("max_include_ids"), config.max_list_ids)
            ),
            max_exclude_ids=min(
                config.max_list_ids, _given(lim.get("max_exclude_ids"), config.max_list_ids)
            ),
            max_anchors=min(config.max_anchors, _given(lim.get("max_anchors"), config.max_anchors)),
            max_tags=config.max_tags,
        )

    def as_dict(self) -> dict[str, int]:
        return {
            "max_k": self.max_k,
            "max_include_ids": self.max_include_ids,
            "max_exclude_ids": self.max_exclude_ids,
            "max_anchors": self.max_anchors,
        }


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


class RecommendRequest(msgspec.Struct):
    """A recommend (or similar) request as the engine executes it: the body's fields with the
    tenant's defaults applied."""

    surface: str = DEFAULT_SURFACE
    segment: str | None = None  # None: the user's segment from the snapshot, else 'default'
    k: int = DEFAULT_K
    user_id: str | None = None
    anonymous_id: str | None = None
    session_id: str | None = None
    context: dict[str, Any] = msgspec.field(default_factory=dict)
    anchors: list[str] = msgspec.field(default_factory=list)
    include_ids: list[str] | None = None
    exclude_ids: list[str] = msgspec.field(default_factory=list)
    required_tags: list[str] = msgspec.field(default_factory=list)
    forbidden_tags: list[str] = msgspec.field(default_factory=list)
    max_per_tag: dict[str, int] = msgspec.field(default_factory=dict)
    weights: dict[str, float] | None = None
    include_reasons: bool = False
    explain: str = "none"
    include_trace: bool = False
    seed: int | None = None
    experiment_id: str | None = None
    experiment_variant: str | None = None
    # /v1/similar only
    item_id: str | None = None
    kind: str = "blend"

    def normalized(self) -> dict[str, Any]:
        """The request as the server will execute it (the /validate answer)."""
        out: dict[str, Any] = {
            "surface": self.surface,
            "segment": self.segment or DEFAULT_SEGMENT,
            "k": self.k,
            "user": {
                key: value
                for key, value in (
                    ("user_id", self.user_id),
                    ("anonymous_id", self.anonymous_id),
                    ("session_id", self.session_id),
                )
                if value is not None
            },
            "options": {
                "include_reasons": self.include_reasons,
                "explain": self.explain,
                "include_trace": self.include_trace,
                "seed": self.seed if self.seed is not None else 0,
            },
        }
        if self.context:
            out["context"] = self.context
        if self.anchors:
            out["anchors"] = {"item_ids": self.anchors}
        cands: dict[str, Any] = {"exclude_ids": self.exclude_ids}
        if self.include_ids is not None:
            cands["include_ids"] = self.include_ids
        out["candidates"] = cands
        out["constraints"] = {
            "required_tags": self.required_tags,
            "forbidden_tags": self.forbidden_tags,
            "max_per_tag": self.max_per_tag,
        }
        if self.weights is not None:
            out["weights"] = self.weights
        if self.experiment_id is not None:
            out["experiment"] = {"id": self.experiment_id, "variant": self.experiment_variant}
        return out


def _limit(n: int, limit: int, where: str) -> None:
    if n > limit:
        raise unprocessable(
            f"'{where}' holds {n} entries; this tenant's limit is {limit}.", code=LIMIT_EXCEEDED
        )


def check_weights(weights: Any, where: str) -> dict[str, float] | None:
    """The given weights as a dict (absent signals left out); 422 unless one is positive."""
    if weights is None:
        return None
    out = {s: float(w) for s in SIGNALS if (w := getattr(weights, s)) is not None}
    if out and not any(out.values()):
        raise unprocessable(f"At least one weight in '{where}' must be positive.")
    return out


def parse_recommend(
    body: Any, limits: Limits, tenant_config: dict[str, Any], similar: bool = False
) -> tuple[RecommendRequest, list[dict[str, str]]]:
    """The engine's request of a /v1/recommend (or /v1/similar) body, and its warnings.

    `body` is the decoded schema type (`schemas.RecommendRequest` / `SimilarRequest`), or plain
    JSON values, which are checked against it first (400)."""
    kind = schemas.SimilarRequest if similar else schemas.RecommendRequest
    if type(body) is not kind:
        body = check(body, kind, "body")
    warnings: list[dict[str, str]] = []
    r = RecommendRequest()
    defaults = tenant_config.get("defaults") or {}

    surface = body.surface
    if surface is None:
        surface = defaults.get("surface") or DEFAULT_SURFACE
        warnings.append({"code": "DEFAULT_APPLIED", "detail": f"surface defaulted to '{surface}'"})
    allowed_surfaces = tenant_config.get("surfaces") or ()
    if allowed_surfaces and surface not in allowed_surfaces:
        raise unprocessable(
            f"Unknown surface '{surface}'; this tenant has: {', '.join(allowed_surfaces)}.",
            code="RECSYS_UNKNOWN_SURFACE",
        )
    r.surface = surface
    r.segment = body.segment
    k = body.k
    if k is None:
        k = min(int(defaults.get("k") or DEFAULT_K), limits.max_k)
    elif k > limits.max_k:
        raise unprocessable(
            f"Field 'k' = {k} exceeds this tenant's limit of {limits.max_k}.", code=LIMIT_EXCEEDED
        )
    r.k = k

    if similar:
        r.item_id = body.item_id
        r.kind = body.kind
    else:
        user = body.user
        r.user_id, r.anonymous_id, r.session_id = user.user_id, user.anonymous_id, user.session_id
        if not (r.user_id or r.anonymous_id or r.session_id):
            raise unprocessable("Field 'user' needs a user_id, or an anonymous_id or session_id.")
        if (anchors := body.anchors) is not None:
            _limit(len(anchors.item_ids), limits.max_anchors, "anchors.item_ids")
            r.anchors = anchors.item_ids[: anchors.max_anchors or limits.max_anchors]
        if body.weights is not None:
            r.weights = check_weights(body.weights, "weights")
        if (exp := body.experiment) is not None:
            r.experiment_id, r.experiment_variant = exp.id, exp.variant
    if body.context is not None:
        r.context = body.context

    if (cands := body.candidates) is not None:
        if cands.include_ids is not None:
            _limit(len(cands.include_ids), limits.max_include_ids, "candidates.include_ids")
            r.include_ids = cands.include_ids or None  # [] means "no allow-list" (contract)
        if len(cands.exclude_ids) > limits.max_exclude_ids:
            _limit(len(cands.exclude_ids), limits.max_exclude_ids, "candidates.exclude_ids")
        r.exclude_ids = cands.exclude_ids

    if (cons := body.constraints) is not None:
        max_tags = limits.max_tags
        if max(len(cons.required_tags), len(cons.forbidden_tags), len(cons.max_per_tag)) > max_tags:
            _limit(len(cons.required_tags), max_tags, "constraints.required_tags")
            _limit(len(cons.forbidden_tags), max_tags, "constraints.forbidden_tags")
            _limit(len(cons.max_per_tag), max_tags, "constraints.max_per_tag")
        r.required_tags, r.forbidden_tags = cons.required_tags, cons.forbidden_tags
        for tag, cap in cons.max_per_tag.items():
            if cap > limits.max_k:
                raise unprocessable(
                    f"'constraints.max_per_tag.{tag}' = {cap} exceeds the k limit {limits.max_k}.",
                    code=LIMIT_EXCEEDED,
                )
        r.max_per_tag = cons.max_per_tag
    both = r.required_tags and r.forbidden_tags and set(r.required_tags) & set(r.forbidden_tags)
    if both:
        raise unprocessable(
            f"Tag(s) both required and forbidden: {', '.join(sorted(both))}.",
            code="RECSYS_IMPOSSIBLE_CONSTRAINTS",
        )
    if r.include_ids is not None and not set(r.include_ids) - set(r.exclude_ids):
        raise unprocessable(
            "Every id of candidates.include_ids is also excluded.",
            code="RECSYS_IMPOSSIBLE_CONSTRAINTS",
        )

    if (opts := body.options) is not None:
        r.include_reasons = opts.include_reasons
        r.explain = opts.explain
        r.include_trace = opts.include_trace
        r.seed = opts.seed
    if r.segment is None and not similar and r.user_id is None:
        warnings.append(
            {"code": "DEFAULT_APPLIED", "detail": f"segment defaulted to '{DEFAULT_SEGMENT}'"}
        )
    return r, warnings


# --- admin documents -----------------------------------------------------------------------
def validate_config(body: Any, config: ServingConfig) -> dict[str, Any]:
    """A tenant config document (plain JSON values), checked; returns what is stored (without
    `tenant_id` / `config_version`). 400 when it does not fit the schema, 422 when impossible."""
    doc = check(body, schemas.TenantConfig, "config")
    defaults, limits = doc.defaults, doc.limits
    if defaults is not None:
        check_weights(defaults.weights, "defaults.weights")
    hard = {
        "max_k": config.max_k,
        "max_include_ids": config.max_list_ids,
        "max_exclude_ids": config.max_list_ids,
        "max_anchors": config.max_anchors,
    }
    given = {} if limits is None else msgspec.structs.asdict(limits)
    for key, value in given.items():
        if value is not None and value > hard[key]:
            raise unprocessable(
                f"Field 'limits.{key}' = {value} is impossible; the server's limit is {hard[key]}.",
                code=LIMIT_EXCEEDED,
            )
    k = defaults.k if defaults is not None else None
    if k is not None:
        max_k = given.get("max_k") or config.max_k
        if k > max_k:
            raise unprocessable(f"defaults.k = {k} exceeds limits.max_k ({max_k}).")
    surface = defaults.surface if defaults is not None else None
    if doc.surfaces and surface and surface not in doc.surfaces:
        raise unprocessable("defaults.surface is not one of surfaces.")
    for exp_id, exp in (doc.experiments or {}).items():
        names = {v.name for v in exp.variants}
        if len(names) != len(exp.variants):
            raise unprocessable(f"experiments.{exp_id} has duplicate variant names.")
    return {k: v for k, v in body.items() if k not in ("tenant_id", "config_version")}


def validate_rules(body: Any, config: ServingConfig) -> dict[str, Any]:
    """A tenant rules document ``{"rules": [...]}`` (plain JSON values), checked; returns what is
    stored. 400 when it does not fit the schema, 422 when a rule is impossible."""
    doc = check(body, schemas.TenantRules, "rules")
    seen_ids = set()
    for i, rule in enumerate(doc.rules):
        where = f"rules[{i}]"
        if rule.id in seen_ids:
            raise unprocessable(f"Duplicate rule id '{rule.id}'.")
        seen_ids.add(rule.id)
        fields = _RULE_FIELDS[rule.type]
        extra = sorted(f for f in _TYPED_FIELDS - fields if getattr(rule, f) is not None)
        if extra:
            raise unprocessable(f"{where} ({rule.type}) does not take {', '.join(extra)}.")
        if rule.type == "pin":
            if rule.item_id is None or rule.position is None:
                raise unprocessable(f"{where}: a pin needs item_id and position.")
            if rule.position > config.max_k:
                raise unprocessable(f"{where}.position must be between 1 and {config.max_k}.")
        elif rule.type in ("boost", "bury"):
            if rule.tag is None or rule.factor is None:
                raise unprocessable(f"{where}: a {rule.type} needs a tag and a factor.")
            if rule.type == "boost" and rule.factor <= 1:
                raise unprocessable(f"{where}.factor of a boost must be > 1.")
            if rule.type == "bury" and not 0 < rule.factor < 1:
                raise unprocessable(f"{where}.factor of a bury must be in (0, 1).")
        elif not rule.item_ids and not rule.tags:
            raise unprocessable(f"{where} blocks nothing: give item_ids or tags.")
    return {"rules": body.get("rules", [])}


_TYPED_FIELDS = frozenset({"item_id", "position", "tag", "factor", "item_ids", "tags"})
_RULE_FIELDS = {
    "pin": frozenset({"item_id", "position"}),
    "boost": frozenset({"tag", "factor"}),
    "bury": frozenset({"tag", "factor"}),
    "block": frozenset({"item_ids", "tags"}),
}

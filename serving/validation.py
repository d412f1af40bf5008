"""Request, tenant-config and rules validation (hand-written: the hot path cannot afford a
schema engine). 400 = malformed (wrong type, out of range, unknown field); 422 = well-formed
but semantically impossible (unknown surface, a tag both required and forbidden, ...).

The OpenAPI document (serving/openapi.py) describes the same shapes; a test checks both agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from itertools import repeat
from typing import Any

import falcon
import orjson

from recsys.snapshot.format import SIGNALS
from serving.config import ServingConfig
from serving.errors import bad_request, unprocessable

EXPLAIN_LEVELS = ("none", "summary", "full")
SIMILAR_KINDS = ("emb", "cooc", "blend")
DEFAULT_K = 20
DEFAULT_SURFACE = "default"
DEFAULT_SEGMENT = "default"
MAX_SEED = 2**63 - 1
MAX_ID_LENGTH = 256


@dataclass(slots=True)
class Limits:
    """Effective limits for one tenant: the server's hard caps, lowered by tenant config."""

    max_k: int
    max_include_ids: int
    max_exclude_ids: int
    max_anchors: int
    max_tags: int

    @classmethod
    def for_tenant(cls, config: ServingConfig, tenant_config: dict[str, Any]) -> Limits:
        lim = tenant_config.get("limits", {})
        return cls(
            max_k=min(config.max_k, lim.get("max_k", config.max_k)),
            max_include_ids=min(
                config.max_list_ids, lim.get("max_include_ids", config.max_list_ids)
            ),
            max_exclude_ids=min(
                config.max_list_ids, lim.get("max_exclude_ids", config.max_list_ids)
            ),
            max_anchors=min(config.max_anchors, lim.get("max_anchors", config.max_anchors)),
            max_tags=config.max_tags,
        )


@dataclass(slots=True)
class RecommendRequest:
    surface: str = DEFAULT_SURFACE
    segment: str | None = None  # None: the user's segment from the snapshot, else 'default'
    k: int = DEFAULT_K
    user_id: str | None = None
    anonymous_id: str | None = None
    session_id: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    anchors: list[str] = field(default_factory=list)
    include_ids: list[str] | None = None
    exclude_ids: list[str] = field(default_factory=list)
    required_tags: list[str] = field(default_factory=list)
    forbidden_tags: list[str] = field(default_factory=list)
    max_per_tag: dict[str, int] = field(default_factory=dict)
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

    def with_user(self, user_id: str) -> RecommendRequest:  # (replaced below: _copier)
        """A copy of this request for another `user_id` (the lists and dicts are shared:
        requests are never modified once parsed)."""
        raise NotImplementedError

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


def _copier():
    """`RecommendRequest.with_user`, one attribute copy per field (generated like the
    dataclass's own __init__: a fifth of the cost of dataclasses.replace)."""
    names = [f.name for f in fields(RecommendRequest)]
    lines = [f"    n.{x} = r.{x}" for x in names if x != "user_id"]
    src = "def with_user(r, user_id, _new=object.__new__, _cls=RecommendRequest):\n"
    src += "    n = _new(_cls)\n" + "\n".join(lines) + "\n    n.user_id = user_id\n    return n\n"
    scope: dict[str, Any] = {"RecommendRequest": RecommendRequest}
    exec(src, scope)  # noqa: S102 (fixed source built from the dataclass's field names)
    return scope["with_user"]


RecommendRequest.with_user = _copier()


class ParsedShapes:
    """Validated recommend requests by their body's "shape": the raw body with its
    ``"user":{"user_id":"<id>"}`` member cut out (a page template sends the same body for every
    user). A body whose shape was validated before (same tenant config) is the cached request
    for its user id, without a second validation.

    Exact, not heuristic: the member is cut only when it occurs once in the raw bytes, with the
    user id of the parsed body written as orjson writes it. Two bodies with the same shape then
    differ only inside that member; if it is not the member the parsed body took its user from
    (a nested `context.user`, or an earlier duplicate key), the effective member lies in the
    shared bytes, so both bodies hold the same user id and are the same bytes. Bounded: cleared
    when it holds `size` shapes."""

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._cache: dict[tuple, tuple] = {}

    @staticmethod
    def key(tenant: str, body: Any, raw: bytes) -> tuple[tuple, str] | None:
        """(shape key, user id) of a body whose user is exactly {"user_id": <valid id>}."""
        if type(body) is not dict:
            return None
        user = body.get("user")
        if type(user) is not dict or len(user) != 1:
            return None
        uid = user.get("user_id")
        if type(uid) is not str or not 0 < len(uid) <= MAX_ID_LENGTH:
            return None
        member = b'"user":{"user_id":' + orjson.dumps(uid) + b"}"
        if raw.count(member) != 1:
            return None
        before, _, after = raw.partition(member)
        return (tenant, before, after), uid

    def get(self, key: tuple, tenant_config: dict, limits: Limits, user_id: str):
        """(request, warnings) for `user_id` of a shape validated under this tenant config and
        these limits, or None."""
        found = self._cache.get(key)
        if found is None or found[0] is not tenant_config or found[1] is not limits:
            return None
        return found[2].with_user(user_id), [dict(w) for w in found[3]]

    def put(self, key: tuple, tenant_config: dict, limits: Limits, req, warnings) -> None:
        if len(self._cache) >= self._size:
            self._cache.clear()
        self._cache[key] = (tenant_config, limits, req, [dict(w) for w in warnings])


# --- small typed getters -------------------------------------------------------------------
def _obj(value: Any, where: str, allowed: frozenset[str] | None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"'{where}' must be an object.")
    if allowed is not None and not value.keys() <= allowed:
        unknown = sorted(value.keys() - allowed)
        raise bad_request(f"Unknown field(s) in '{where}': {', '.join(unknown)}.")
    return value


def _str(value: Any, where: str, required: bool = False) -> str | None:
    if value is None:
        if required:
            raise bad_request(f"Field '{where}' is required.")
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_ID_LENGTH:
        raise bad_request(
            f"Field '{where}' must be a non-empty string of at most {MAX_ID_LENGTH} characters."
        )
    return value


def _int(value: Any, where: str, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise bad_request(f"Field '{where}' must be an integer between {lo} and {hi}.")
    return value


def _bool(value: Any, where: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise bad_request(f"Field '{where}' must be true or false.")
    return value


def _str_list(value: Any, where: str, max_len: int) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request(f"Field '{where}' must be an array of strings.")
    if len(value) > max_len:
        raise bad_request(f"Field '{where}' holds {len(value)} entries; the limit is {max_len}.")
    # (C-level passes: every entry a str, none empty, none too long)
    if value and (
        not all(map(isinstance, value, repeat(str)))
        or not all(value)
        or max(map(len, value)) > MAX_ID_LENGTH
    ):
        raise bad_request(
            f"Field '{where}' must hold non-empty strings (<= {MAX_ID_LENGTH} chars)."
        )
    return value


def _weights(value: Any, where: str) -> dict[str, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(f"'{where}' must be an object of signal -> number.")
    out = {}
    for name, w in value.items():
        if name not in SIGNALS:
            raise unprocessable(
                f"Unknown signal '{name}' in '{where}'; known: {', '.join(SIGNALS)}."
            )
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
            raise bad_request(f"Weight '{where}.{name}' must be a finite number.")
        if w < 0:
            raise unprocessable(f"Weight '{where}.{name}' must not be negative.")
        out[name] = float(w)
    if out and not any(out.values()):
        raise unprocessable(f"At least one weight in '{where}' must be positive.")
    return out


_TOP = frozenset(
    {
        "surface",
        "segment",
        "k",
        "user",
        "context",
        "anchors",
        "candidates",
        "constraints",
        "weights",
        "options",
        "experiment",
    }
)
_USER = frozenset({"user_id", "anonymous_id", "session_id"})
_ANCHORS = frozenset({"item_ids", "max_anchors"})
_EXPERIMENT = frozenset({"id", "variant"})
_CANDIDATES = frozenset({"include_ids", "exclude_ids"})
_CONSTRAINTS = frozenset({"required_tags", "forbidden_tags", "max_per_tag"})
_OPTIONS = frozenset({"include_reasons", "explain", "include_trace", "seed"})
_SIMILAR_TOP = frozenset(
    {
        "surface",
        "segment",
        "item_id",
        "k",
        "kind",
        "candidates",
        "constraints",
        "options",
        "context",
    }
)


def parse_recommend(
    body: Any, limits: Limits, tenant_config: dict[str, Any], similar: bool = False
) -> tuple[RecommendRequest, list[dict[str, str]]]:
    """Validate a /v1/recommend (or /v1/similar) body; returns the request and its warnings."""
    body = _obj(body, "body", _SIMILAR_TOP if similar else _TOP)
    warnings: list[dict[str, str]] = []
    r = RecommendRequest()
    defaults = tenant_config.get("defaults", {})

    surface = _str(body.get("surface"), "surface")
    if surface is None:
        surface = defaults.get("surface", DEFAULT_SURFACE)
        warnings.append({"code": "DEFAULT_APPLIED", "detail": f"surface defaulted to '{surface}'"})
    allowed_surfaces = tenant_config.get("surfaces") or ()
    if allowed_surfaces and surface not in allowed_surfaces:
        raise unprocessable(
            f"Unknown surface '{surface}'; this tenant has: {', '.join(allowed_surfaces)}.",
            code="RECSYS_UNKNOWN_SURFACE",
        )
    r.surface = surface
    # (absent optional fields keep their defaults without a validator call)
    if (segment := body.get("segment")) is not None:
        r.segment = _str(segment, "segment")

    k = _int(body.get("k"), "k", 1, limits.max_k)
    if k is None:
        k = min(int(defaults.get("k", DEFAULT_K)), limits.max_k)
    r.k = k

    if similar:
        r.item_id = _str(body.get("item_id"), "item_id", required=True)
        kind = body.get("kind", "blend")
        if kind not in SIMILAR_KINDS:
            raise bad_request(f"Field 'kind' must be one of {', '.join(SIMILAR_KINDS)}.")
        r.kind = kind
    else:
        user = _obj(body.get("user"), "user", _USER)
        if (uid := user.get("user_id")) is not None:
            r.user_id = _str(uid, "user.user_id")
        if (uid := user.get("anonymous_id")) is not None:
            r.anonymous_id = _str(uid, "user.anonymous_id")
        if (uid := user.get("session_id")) is not None:
            r.session_id = _str(uid, "user.session_id")
        if not (r.user_id or r.anonymous_id or r.session_id):
            raise bad_request("Field 'user' needs a user_id, or an anonymous_id or session_id.")
        anchors = body.get("anchors")  # (absent optional blocks keep their defaults)
        if anchors is not None:
            anchors = _obj(anchors, "anchors", _ANCHORS)
            max_anchors = _int(
                anchors.get("max_anchors"), "anchors.max_anchors", 1, limits.max_anchors
            )
            ids = _str_list(anchors.get("item_ids"), "anchors.item_ids", limits.max_anchors) or []
            r.anchors = ids[: max_anchors or limits.max_anchors]
        weights = body.get("weights")
        if weights is not None:
            r.weights = _weights(weights, "weights")
        exp = body.get("experiment")
        if exp is not None and (exp := _obj(exp, "experiment", _EXPERIMENT)):
            r.experiment_id = _str(exp.get("id"), "experiment.id", required=True)
            r.experiment_variant = _str(exp.get("variant"), "experiment.variant")
    context = body.get("context")
    if context is not None:
        r.context = _obj(context, "context", None)

    cands = body.get("candidates")
    if cands is not None:
        cands = _obj(cands, "candidates", _CANDIDATES)
        if (ids := cands.get("include_ids")) is not None:
            include = _str_list(ids, "candidates.include_ids", limits.max_include_ids)
            r.include_ids = include if include else None  # [] means "no allow-list" (contract)
        if (ids := cands.get("exclude_ids")) is not None:
            r.exclude_ids = _str_list(ids, "candidates.exclude_ids", limits.max_exclude_ids) or []

    cons = body.get("constraints")
    if cons is not None:
        cons = _obj(cons, "constraints", _CONSTRAINTS)
        if (tags := cons.get("required_tags")) is not None:
            r.required_tags = _str_list(tags, "constraints.required_tags", limits.max_tags) or []
        if (tags := cons.get("forbidden_tags")) is not None:
            r.forbidden_tags = _str_list(tags, "constraints.forbidden_tags", limits.max_tags) or []
        mpt = cons.get("max_per_tag")
        mpt = {} if mpt is None else _obj(mpt, "constraints.max_per_tag", None)
        if len(mpt) > limits.max_tags:
            raise bad_request(
                f"'constraints.max_per_tag' holds more than {limits.max_tags} entries."
            )
        max_k = limits.max_k
        for tag, cap in mpt.items():
            if type(cap) is not int or not 1 <= cap <= max_k:
                _int(cap, f"constraints.max_per_tag.{tag}", 1, max_k)  # (raises the 400)
        r.max_per_tag = dict(mpt)
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

    opts = body.get("options")
    if opts is not None:
        opts = _obj(opts, "options", _OPTIONS)
        r.include_reasons = bool(_bool(opts.get("include_reasons"), "options.include_reasons"))
        explain = opts.get("explain", "none")
        if explain not in EXPLAIN_LEVELS:
            raise bad_request(
                f"Field 'options.explain' must be one of {', '.join(EXPLAIN_LEVELS)}."
            )
        r.explain = explain
        r.include_trace = bool(_bool(opts.get("include_trace"), "options.include_trace"))
        r.seed = _int(opts.get("seed"), "options.seed", 0, MAX_SEED)
    if r.segment is None and not similar and r.user_id is None:
        warnings.append(
            {"code": "DEFAULT_APPLIED", "detail": f"segment defaulted to '{DEFAULT_SEGMENT}'"}
        )
    return r, warnings


# --- admin documents -----------------------------------------------------------------------
_CONFIG_TOP = frozenset({"defaults", "limits", "surfaces", "experiments", "strict_similar"})
_LIMIT_KEYS = ("max_k", "max_include_ids", "max_exclude_ids", "max_anchors")


def validate_config(body: Any, config: ServingConfig) -> dict[str, Any]:
    """A tenant config document, checked; raises 400/422 Problems."""
    body = _obj(body, "config", _CONFIG_TOP | {"tenant_id", "config_version"})
    body = {k: v for k, v in body.items() if k not in ("tenant_id", "config_version")}
    defaults = _obj(body.get("defaults"), "defaults", frozenset({"weights", "k", "surface"}))
    _weights(defaults.get("weights"), "defaults.weights")
    hard = {
        "max_k": config.max_k,
        "max_include_ids": config.max_list_ids,
        "max_exclude_ids": config.max_list_ids,
        "max_anchors": config.max_anchors,
    }
    limits = _obj(body.get("limits"), "limits", frozenset(_LIMIT_KEYS))
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad_request(f"Field 'limits.{key}' must be an integer.")
        if not 1 <= value <= hard[key] and not (key != "max_k" and value == 0):
            raise unprocessable(
                f"Field 'limits.{key}' = {value} is impossible; "
                f"it must be between {0 if key != 'max_k' else 1} and {hard[key]}."
            )
    k = defaults.get("k")
    if k is not None:
        _int(k, "defaults.k", 1, config.max_k)
        if k > limits.get("max_k", config.max_k):
            raise unprocessable(f"defaults.k = {k} exceeds limits.max_k.")
    _str(defaults.get("surface"), "defaults.surface")
    surfaces = _str_list(body.get("surfaces"), "surfaces", 1000) or []
    if surfaces and defaults.get("surface") and defaults["surface"] not in surfaces:
        raise unprocessable("defaults.surface is not one of surfaces.")
    exps = _obj(body.get("experiments"), "experiments", None)
    for exp_id, exp in exps.items():
        exp = _obj(exp, f"experiments.{exp_id}", frozenset({"variants"}))
        variants = exp.get("variants")
        if not isinstance(variants, list) or not variants:
            raise bad_request(f"experiments.{exp_id}.variants must be a non-empty array.")
        names = set()
        for i, v in enumerate(variants):
            where = f"experiments.{exp_id}.variants[{i}]"
            v = _obj(v, where, frozenset({"name", "snapshot", "weight"}))
            names.add(_str(v.get("name"), f"{where}.name", required=True))
            _str(v.get("snapshot"), f"{where}.snapshot")
            w = v.get("weight", 1)
            if isinstance(w, bool) or not isinstance(w, int | float) or w <= 0:
                raise unprocessable(f"{where}.weight must be a positive number.")
        if len(names) != len(variants):
            raise unprocessable(f"experiments.{exp_id} has duplicate variant names.")
    if "strict_similar" in body:
        _bool(body["strict_similar"], "strict_similar")
    return body


_RULE_KEYS = {
    "pin": frozenset({"item_id", "position"}),
    "boost": frozenset({"tag", "factor"}),
    "bury": frozenset({"tag", "factor"}),
    "block": frozenset({"item_ids", "tags"}),
}
_COMMON_RULE_KEYS = frozenset({"id", "type", "surfaces", "segments", "enabled", "note"})


def validate_rules(body: Any, config: ServingConfig) -> dict[str, Any]:
    """A tenant rules document ``{"rules": [...]}``, checked; raises 400/422 Problems."""
    body = _obj(body, "rules", frozenset({"rules", "tenant_id", "rules_version"}))
    rules = body.get("rules", [])
    if not isinstance(rules, list):
        raise bad_request("Field 'rules' must be an array.")
    if len(rules) > 1000:
        raise unprocessable("At most 1000 rules per tenant.")
    seen_ids = set()
    for i, rule in enumerate(rules):
        where = f"rules[{i}]"
        if not isinstance(rule, dict):
            raise bad_request(f"{where} must be an object.")
        kind = rule.get("type")
        if kind not in _RULE_KEYS:
            raise bad_request(f"{where}.type must be one of {', '.join(_RULE_KEYS)}.")
        _obj(rule, where, _RULE_KEYS[kind] | _COMMON_RULE_KEYS)
        rid = _str(rule.get("id"), f"{where}.id", required=True)
        if rid in seen_ids:
            raise unprocessable(f"Duplicate rule id '{rid}'.")
        seen_ids.add(rid)
        _str_list(rule.get("surfaces"), f"{where}.surfaces", 1000)
        _str_list(rule.get("segments"), f"{where}.segments", 1000)
        _bool(rule.get("enabled"), f"{where}.enabled")
        if kind == "pin":
            _str(rule.get("item_id"), f"{where}.item_id", required=True)
            pos = rule.get("position")
            if isinstance(pos, bool) or not isinstance(pos, int):
                raise bad_request(f"{where}.position must be an integer.")
            if not 1 <= pos <= config.max_k:
                raise unprocessable(f"{where}.position must be between 1 and {config.max_k}.")
        elif kind in ("boost", "bury"):
            _str(rule.get("tag"), f"{where}.tag", required=True)
            f = rule.get("factor")
            if isinstance(f, bool) or not isinstance(f, int | float) or not math.isfinite(f):
                raise bad_request(f"{where}.factor must be a number.")
            if kind == "boost" and f <= 1:
                raise unprocessable(f"{where}.factor of a boost must be > 1.")
            if kind == "bury" and not 0 < f < 1:
                raise unprocessable(f"{where}.factor of a bury must be in (0, 1).")
        else:
            ids = _str_list(rule.get("item_ids"), f"{where}.item_ids", 10000)
            tags = _str_list(rule.get("tags"), f"{where}.tags", 1000)
            if not ids and not tags:
                raise unprocessable(f"{where} blocks nothing: give item_ids or tags.")
    return {"rules": rules}


def if_match(req: falcon.Request) -> str | None:
    """The If-Match header as a bare version ('*' kept; weak prefix and quotes removed)."""
    value = req.get_header("If-Match")
    if value is None:
        return None
    value = value.strip()
    if value == "*":
        return "*"
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"')

"""The request-time engine: candidates -> re-score -> filter -> rules -> caps -> pins -> back-fill.

Everything per candidate is a NumPy operation over the few hundred candidates of one request;
the only Python loops are over the k items of the answer (and, when `max_per_tag` is asked for,
over the ranked candidates until k are taken). Nothing here allocates per item of the catalogue.

Outcome codes (`OUTCOMES`) say what happened to each candidate; they feed the filter counters,
`meta.counts` and, when asked for, `trace`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Any

import msgspec
import numpy as np

from recsys.snapshot.format import REASON_CODES, REASONS, SIGNALS
from serving import kernels
from serving.errors import ProblemError
from serving.kernels import BLOCKED, KEPT, PLAN_HAS_INCLUDE, PLAN_REQUIRED_MISSING
from serving.snapshot import LiveSnapshot
from serving.validation import DEFAULT_SEGMENT, RecommendRequest

# Names of the outcome codes of a candidate (uint8, serving.kernels); the order is the order
# filters take precedence in.
OUTCOMES = (
    "kept",
    "unavailable",
    "exclude_ids",
    "not_in_include_ids",
    "seen",
    "blocked",
    "forbidden_tag",
    "missing_required_tag",
)

_NO_ITEMS = np.zeros(0, dtype=np.int32)
_NO_ITEMS.flags.writeable = False
_NO_ROWS = np.zeros(0, dtype=np.intp)
_NO_ROWS.flags.writeable = False
PINNED_REASON, PINNED_TEXT = -1, "featured"
_FILTERS = OUTCOMES[1:]  # the outcomes that remove a candidate
_SIGNAL_INDEX = {s: j for j, s in enumerate(SIGNALS)}

#: The half-life (in anchors) of an anonymous session's anchors when the tenant sets none:
#: on MovieLens 100K's test users shopping anonymously from their 5 newest items
#: (benchmarks/quality_anonymous.py), NDCG@10 0.058 with all anchors alike, 0.077 at 1
#: (+0.019, interval +0.004 to +0.038), 0.073 at 2, 0.066 at 4.
DEFAULT_ANCHOR_HALF_LIFE = 1.0


class DeadlineExceeded(ProblemError):
    def __init__(self, stage: str) -> None:
        super().__init__(504, f"The request deadline passed during {stage}.")


# --- tenant rules, compiled against one snapshot -------------------------------------------
@dataclass(frozen=True, slots=True)
class Pin:
    rule_id: str
    item: int
    position: int  # 1-based


@dataclass(frozen=True, slots=True)
class Boost:
    rule_id: str
    tag: int
    factor: float


@dataclass(slots=True)
class CompiledRules:
    """The rules of one (rules version, snapshot, surface, segment), with ids resolved."""

    pins: list[Pin] = field(default_factory=list)
    boosts: list[Boost] = field(default_factory=list)
    blocked_items: np.ndarray = field(default_factory=lambda: _NO_ITEMS)
    blocked_item_rules: list[str] = field(default_factory=list)  # rule id per blocked item
    blocked_tags: np.ndarray = field(default_factory=lambda: _NO_ITEMS)
    blocked_tag_rules: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)  # rule ids naming unknown items/tags
    #: The blocked items and tags as the tail of a kernel plan (`Filters.plan`, `user`):
    #: [number of items, number of tags, items..., tags...].
    plan_tail: list[int] = field(default_factory=lambda: [0, 0])


def compile_rules(
    live: LiveSnapshot,
    rules: Sequence[dict[str, Any]],
    version: str | None,
    surface: str,
    segment: str,
) -> CompiledRules:
    """Rules applying to `surface` x `segment`, resolved to indices; cached per snapshot."""
    key = (version, surface, segment)
    cached = live.compiled.get(key)
    if cached is not None:
        return cached
    snap = live.snap
    out = CompiledRules()
    b_items: list[int] = []
    b_tags: list[int] = []
    for rule in rules:
        if rule.get("enabled") is False:
            continue
        if rule.get("surfaces") and surface not in rule["surfaces"]:
            continue
        if rule.get("segments") and segment not in rule["segments"]:
            continue
        rid, kind = rule["id"], rule["type"]
        if kind == "pin":
            iidx = snap.item_index(rule["item_id"])
            if iidx is None:
                out.unresolved.append(rid)
            else:
                out.pins.append(Pin(rid, iidx, int(rule["position"])))
        elif kind in ("boost", "bury"):
            tid = snap.tag_id(rule["tag"])
            if tid is None:
                out.unresolved.append(rid)
            else:
                out.boosts.append(Boost(rid, tid, float(rule["factor"])))
        elif kind == "block":
            for item_id in rule.get("item_ids") or ():
                iidx = snap.item_index(item_id)
                if iidx is not None:
                    b_items.append(iidx)
                    out.blocked_item_rules.append(rid)
            for tag in rule.get("tags") or ():
                tid = snap.tag_id(tag)
                if tid is not None:
                    b_tags.append(tid)
                    out.blocked_tag_rules.append(rid)
    out.pins.sort(key=lambda p: p.position)
    out.blocked_items = np.asarray(b_items, dtype=np.int32)
    out.blocked_tags = np.asarray(b_tags, dtype=np.int32)
    out.plan_tail = [len(b_items), len(b_tags), *b_items, *b_tags]
    live.compiled[key] = out
    while len(live.compiled) > 256:
        live.compiled.popitem(last=False)
    return out


# --- the per-request filter context ----------------------------------------------------------
class Filters(msgspec.Struct):
    """Hard filters of one request, resolved to item and tag indices (plain lists: they go
    into the kernels' `plan`)."""

    exclude: list[int]
    include: list[int] | None
    seen: np.ndarray | UserPool  # (a UserPool: that user's seen items, sliced when needed)
    forbidden_tags: list[int]  # tag ids
    required_tags: list[int]
    required_missing: bool  # a required tag the snapshot does not know: nothing can match
    rules: CompiledRules

    @classmethod
    def build(
        cls,
        live: LiveSnapshot,
        req: RecommendRequest,
        rules: CompiledRules,
        seen: np.ndarray | UserPool,
        warnings: list[dict[str, str]],
    ) -> Filters:
        forbidden = required = _NO_IDS
        missing = False
        if req.forbidden_tags or req.required_tags:
            forbidden, required, warning = _resolved_tags(live, req)
            if warning is not None:
                warnings.append(dict(warning))
                missing = True
        return cls(
            _indices(live, req.exclude_ids),
            _indices(live, req.include_ids) if req.include_ids is not None else None,
            seen,
            forbidden,
            required,
            missing,
            rules,
        )

    def plan(self, n: int = 0, caps: Caps | None = None, user: int | None = None) -> np.ndarray:
        """The int64 `plan` of the kernels (layout: `serving.kernels.P_N`): these filters, the
        number of rows to choose and the caps' groups with zero counts; with `user`, then that
        user's row and the rules' blocked items and tags (`kernels.outcomes_select_user`)."""
        include = self.include
        flags = PLAN_REQUIRED_MISSING if self.required_missing else 0
        if include is not None:
            flags |= PLAN_HAS_INCLUDE
        else:
            include = _NO_IDS
        exclude, forbidden, required = self.exclude, self.forbidden_tags, self.required_tags
        groups = caps.groups if caps else _NO_IDS
        if user is not None:
            return np.array(
                [n, flags, len(caps.names) if caps else 0, len(exclude), len(include),
                 len(forbidden), len(required), *exclude, *include, *forbidden, *required,
                 *groups, user, *self.rules.plan_tail],
                np.int64,
            )  # fmt: skip
        return np.array(
            [n, flags, len(caps.names) if caps else 0, len(exclude), len(include), len(forbidden),
             len(required), *exclude, *include, *forbidden, *required, *groups],
            np.int64,
        )  # fmt: skip

    def args(self, live: LiveSnapshot) -> tuple:
        """The kernel arguments between the items and the plan (`serving.kernels.outcomes`)."""
        r = self.rules
        seen = self.seen
        return (
            live.tag_offsets,
            live.tag_ids,
            live.unavailable_or_empty,
            live.marks,
            live.roles,
            seen.seen if isinstance(seen, UserPool) else seen,
            r.blocked_items,
            r.blocked_tags,
        )

    def outcomes(self, live: LiveSnapshot, items: np.ndarray) -> tuple[np.ndarray, list[int], list]:
        """uint8 outcome per item (KEPT or the first failed filter, in the order of OUTCOMES),
        how many items got each outcome, and the blocking rules (`blocked_by`). One compiled
        pass over the items (`serving.kernels.outcomes`)."""
        code = np.empty(items.shape[0], dtype=np.uint8)
        tally = np.empty(len(OUTCOMES), dtype=np.int64)
        live.call_kernel(kernels.outcomes, items, *self.args(live), self.plan(), code, tally)
        tally_list = tally.tolist()
        return code, tally_list, self.blocked_by(live, items, code, tally_list)

    def blocked_by(
        self, live: LiveSnapshot, items: np.ndarray, code: np.ndarray, tally: list[int]
    ) -> list:
        """The blocking rule id per item when some item was blocked by a rule, else []."""
        r = self.rules
        if not tally[BLOCKED] or not (r.blocked_items.size or r.blocked_tags.size):
            return []
        return [
            self._blocking_rule(live, i) if c == BLOCKED else None
            for i, c in zip(items.tolist(), code.tolist(), strict=True)
        ]

    def _blocking_rule(self, live: LiveSnapshot, item: int) -> str:
        r = self.rules
        hits = np.flatnonzero(r.blocked_items == item)
        if hits.size:
            return r.blocked_item_rules[int(hits[0])]
        one = np.asarray([item], dtype=np.int32)
        for j, tag in enumerate(r.blocked_tags.tolist()):
            if live.tag_hits(one, tag)[0]:
                return r.blocked_tag_rules[j]
        return "block"


_NO_IDS: list[int] = []  # (shared, never modified)


def _resolved_tags(live: LiveSnapshot, req: RecommendRequest):
    """(forbidden tag ids, required tag ids, warning about unknown required tags or None),
    memoized per snapshot: a page template sends the same tag constraints on every request."""
    key = ("tags", tuple(req.forbidden_tags), tuple(req.required_tags))
    found = live.resolved.get(key)
    if found is None:
        tag_id = live.snap.tag_id
        forbidden = [t for t in map(tag_id, req.forbidden_tags) if t is not None]
        required_ids = [tag_id(x) for x in req.required_tags]
        missing = [t for t, i in zip(req.required_tags, required_ids, strict=True) if i is None]
        warning = None
        if missing:
            warning = {
                "code": "UNKNOWN_TAG",
                "detail": f"required tag(s) unknown to the catalogue: {', '.join(missing)}",
            }
        found = (forbidden, [i for i in required_ids if i is not None], warning)
        live.remember(key, found)
    return found


def _indices(live: LiveSnapshot, ids: list[str] | None) -> list[int]:
    return live.item_indices(ids) if ids else _NO_IDS


# --- caps ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Caps:
    """`max_per_tag` resolved against a snapshot: one group per key, each a (kind, id) pair (a
    tag, `brand:<b>` or `category:<c>`) with its cap. Shared by the requests that send the same
    caps (memoized per snapshot); the counts of a request live in its kernel plan."""

    names: list[str]
    kinds: np.ndarray  # int32 per group: serving.kernels.GROUP_TAG / _BRAND / _CATEGORY
    values: np.ndarray  # int32 per group: the tag, brand or category id
    caps: list[int]
    groups: list[int]  # the plan's groups: kinds, values, caps, zero counts

    @property
    def n_groups(self) -> int:
        return len(self.names)

    @classmethod
    def build(
        cls, live: LiveSnapshot, max_per_tag: dict[str, int], warnings: list[dict[str, str]]
    ) -> Caps | None:
        """The caps of a request (the resolution is memoized per snapshot)."""
        if not max_per_tag:
            return None
        key = ("caps", tuple(max_per_tag.items()))
        found = live.resolved.get(key)
        if found is None:
            found = cls._resolve(live, max_per_tag)
            live.remember(key, found)
        caps, warning = found
        if warning is not None:
            warnings.append(dict(warning))
        return caps

    @classmethod
    def _resolve(cls, live: LiveSnapshot, max_per_tag: dict[str, int]):
        snap = live.snap
        names, kinds, values, caps = [], [], [], []
        unknown = []
        for key, cap in max_per_tag.items():
            tid = snap.tag_id(key)
            prefix, _, value = key.partition(":")
            if tid is not None:
                kind, vid = kernels.GROUP_TAG, tid
            elif prefix == "brand" and (vid := snap.brand_index(value)) is not None:
                kind = kernels.GROUP_BRAND
            elif prefix == "category" and (vid := snap.category_index(value)) is not None:
                kind = kernels.GROUP_CATEGORY
            else:
                unknown.append(key)
                continue
            names.append(key)
            kinds.append(kind)
            values.append(vid)
            caps.append(int(cap))
        warning = None
        if unknown:
            warning = {
                "code": "UNKNOWN_TAG",
                "detail": f"max_per_tag key(s) match nothing: {', '.join(unknown)}",
            }
        resolved = None
        if names:
            resolved = cls(
                names,
                np.array(kinds, dtype=np.int32),
                np.array(values, dtype=np.int32),
                caps,
                kinds + values + caps + [0] * len(names),
            )
        return resolved, warning

    def members(self, live: LiveSnapshot, items: np.ndarray) -> np.ndarray:
        """bool[len(items), groups]: which capped groups each item belongs to."""
        return kernels.group_members(
            items,
            live.tag_offsets,
            live.tag_ids,
            live.brand_id,
            live.category_id,
            self.kinds,
            self.values,
        )

    def take(self, flags: list[bool], counts: list[int]) -> str | None:
        """Count one item in `counts` (back-fill); or the name of the cap that refuses it."""
        groups = [g for g, f in enumerate(flags) if f]
        for g in groups:
            if counts[g] >= self.caps[g]:
                return self.names[g]
        for g in groups:
            counts[g] += 1
        return None


# --- result ----------------------------------------------------------------------------------
class Ranked(msgspec.Struct):
    """The answer before JSON: parallel lists of the k returned items."""

    items: list[int] = msgspec.field(default_factory=list)
    scores: list[float] = msgspec.field(default_factory=list)
    # (reasons: only with reasons or explain asked)
    reasons: list[list[str]] = msgspec.field(default_factory=list)
    signals: list[list[float] | None] = msgspec.field(default_factory=list)
    rules: list[Sequence[str]] = msgspec.field(default_factory=list)
    trace: list[dict[str, Any]] | None = None
    counts: dict[str, int] = msgspec.field(default_factory=dict)
    filtered_by: dict[str, int] = msgspec.field(default_factory=dict)
    backfilled_from: dict[str, int] = msgspec.field(default_factory=dict)
    timings: dict[str, float] = msgspec.field(default_factory=dict)  # ms, rounded to microseconds

    def explanation(self, i: int) -> dict[str, Any]:
        """The `explain` object of returned item `i`: stored signals and the rules that fired."""
        sig = self.signals[i]
        signals = dict(zip(SIGNALS, (round(v, 6) for v in sig), strict=True)) if sig else {}
        return {"signals": signals, "rules": self.rules[i]}


@dataclass(slots=True)
class Pool:
    """Scored candidates, best first: items, scores, signals (or None), reason codes."""

    items: np.ndarray
    scores: np.ndarray
    signals: np.ndarray | None
    reasons: np.ndarray
    source: str
    sorted: bool = False  # True when scores are known to be descending (skips a sort)

    @property
    def n_candidates(self) -> int:
        return self.items.shape[0]


class UserPool:
    """A known user's stored candidates (best first, seen items already excluded) with a
    Pool's fields, plus `seen`: each is sliced from the snapshot when first read. The common
    request reads none of them: its compiled kernel reads the user's rows itself
    (`kernels.outcomes_select_user`)."""

    __slots__ = ("_snap", "uidx", "n_candidates", "_parts", "_seen")
    source = "personal"
    sorted = True  # (the snapshot stores each user's candidates best first)

    def __init__(self, snap, uidx: int, n_candidates: int) -> None:
        self._snap = snap
        self.uidx = uidx
        self.n_candidates = n_candidates
        self._parts = None
        self._seen = None

    def _get(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        parts = self._parts
        if parts is None:
            parts = self._parts = self._snap.user_candidates(self.uidx)
        return parts

    @property
    def items(self) -> np.ndarray:
        return self._get()[0]

    @property
    def scores(self) -> np.ndarray:
        return self._get()[1]

    @property
    def signals(self) -> np.ndarray:
        return self._get()[2]

    @property
    def reasons(self) -> np.ndarray:
        return self._get()[3]

    @property
    def seen(self) -> np.ndarray:
        """int32[]: the items the user interacted with (sorted ascending)."""
        seen = self._seen
        if seen is None:
            seen = self._seen = self._snap.user_seen(self.uidx)
        return seen


def assign_variant(experiment_id: str, unit: str, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Deterministic variant for `unit` (user or anonymous id): hash bucket over weights."""
    digest = hashlib.blake2b(f"{experiment_id}:{unit}".encode(), digest_size=8).digest()
    point = int.from_bytes(digest, "big") / 2**64
    total = float(sum(v.get("weight", 1) for v in variants))
    acc = 0.0
    for v in variants:
        acc += v.get("weight", 1) / total
        if point < acc:
            return v
    return variants[-1]


class Engine:
    """Runs one request against one live snapshot."""

    def __init__(
        self,
        live: LiveSnapshot,
        req: RecommendRequest,
        rules: CompiledRules,
        deadline: float,
        warnings: list[dict[str, str]],
    ) -> None:
        self.live = live
        self.snap = live.snap
        self.req = req
        self.rules = rules
        self.deadline = deadline
        self.warnings = warnings
        self.trace: list[dict[str, Any]] | None = [] if req.include_trace else None
        self.t0 = time.perf_counter()

    # ---- candidate pools ----
    def user_pool(self, uidx: int) -> UserPool:
        """The user's candidates (and seen items: `UserPool.seen`), read when needed."""
        return UserPool(self.snap, uidx, self.live.candidate_count(uidx))

    def anchor_pool(
        self,
        anchors: np.ndarray,
        kinds: Sequence[str] = ("emb", "cooc"),
        half_life: float = DEFAULT_ANCHOR_HALF_LIFE,
    ) -> Pool:
        """Items similar to any anchor; per kind the scores are summed over anchors and each
        list is scaled by its best score so emb and cooc weigh alike. The anchors are in the
        order they happened (the newest last): the anchor r places before the newest weighs
        ``0.5 ** (r / half_life)`` (the weights average to 1; `half_life` 0: all alike)."""
        n = anchors.shape[0]
        weight = np.ones(n)
        if half_life and n > 1:
            weight = np.power(0.5, np.arange(n - 1, -1, -1) / half_life)
            weight *= n / weight.sum()
        parts_items, parts_scores, parts_kind = [], [], []
        for a, w in zip(anchors.tolist(), weight.tolist(), strict=True):
            for j, kind in enumerate(kinds):
                it, sc = self.snap.similar(a, kind)
                if it.shape[0]:
                    parts_items.append(np.asarray(it))
                    top = float(sc[0]) or 1.0
                    parts_scores.append(np.asarray(sc, dtype=np.float32) * np.float32(w / top))
                    parts_kind.append(np.full(it.shape[0], j, dtype=np.int8))
        if not parts_items:
            return Pool(
                _NO_ITEMS,
                np.zeros(0, np.float32),
                np.zeros((0, len(SIGNALS)), np.float32),
                np.zeros(0, np.uint8),
                "similar",
            )
        all_items = np.concatenate(parts_items)
        all_scores = np.concatenate(parts_scores)
        all_kind = np.concatenate(parts_kind)
        uniq, inv = np.unique(all_items, return_inverse=True)
        signals = np.zeros((uniq.shape[0], len(SIGNALS)), dtype=np.float32)
        n_anchor = max(1, anchors.shape[0])
        for j, kind in enumerate(kinds):
            sel = all_kind == j
            signals[:, _SIGNAL_INDEX[kind]] = (
                np.bincount(inv[sel], weights=all_scores[sel], minlength=uniq.shape[0]) / n_anchor
            )
        score = signals.sum(axis=1)
        reason = np.where(
            signals[:, _SIGNAL_INDEX["emb"]] >= signals[:, _SIGNAL_INDEX["cooc"]],
            REASON_CODES["emb"],
            REASON_CODES["cooc"],
        ).astype(np.uint8)
        order = np.argsort(-score, kind="stable")
        return Pool(
            uniq[order].astype(np.int32),
            score[order].astype(np.float32),
            signals[order],
            reason[order],
            "similar",
        )

    def fallback_pool(self, name: str) -> Pool | None:
        fb = self.snap.fallback(name)
        if fb is None or not fb[0].shape[0]:
            return None
        items, scores = fb
        code = REASON_CODES["popular"]
        if name.startswith("segment:"):
            code = REASON_CODES["segment"]
        elif name.startswith("category:"):
            code = REASON_CODES["category"]
        elif name == "trending":
            code = REASON_CODES["trending"]
        return Pool(
            np.asarray(items),
            np.asarray(scores),
            None,
            np.full(items.shape[0], code, dtype=np.uint8),
            name,
        )

    # ---- the pipeline ----
    def run(
        self,
        pool: Pool,
        seen: np.ndarray,
        weights: dict[str, float] | None,
        backfill_sources: Sequence[str] | Callable[[], Sequence[str]],
    ) -> Ranked:
        """Filter, re-score, rank, cap, pin and back-fill `pool` into the answer.

        backfill_sources: fallback list names (or a callable returning them, called only when
        the candidates leave fewer than k items).
        """
        req, live = self.req, self.live
        k = req.k
        t_cand = time.perf_counter()
        if t_cand > self.deadline:
            raise DeadlineExceeded("candidate generation")
        filters = Filters.build(live, req, self.rules, seen, self.warnings)

        # Re-score from stored signals when weights are given.
        scores = None  # (None: the stored scores, pool.scores)
        if weights and pool.signals is not None and pool.items.shape[0]:
            w = np.zeros(len(SIGNALS), dtype=np.float32)
            for name, value in weights.items():
                w[_SIGNAL_INDEX[name]] = value
            scores = pool.signals @ w
            dead = [
                s for s, j in _SIGNAL_INDEX.items() if w[j] > 0 and not pool.signals[:, j].any()
            ]
            if dead:
                self.warnings.append(
                    {
                        "code": "SIGNAL_UNAVAILABLE",
                        "detail": f"{', '.join(dead)} signal unavailable for these "
                        "candidates; scored with the other weights",
                    }
                )
        pins = self._valid_pins(filters) if self.rules.pins else []
        n_take = max(0, k - len(pins))
        pinned_item_set = {p.item for p in pins}
        caps = Caps.build(live, req.max_per_tag, self.warnings)
        n_cand = pool.n_candidates
        answer = np.empty(kernels.answer_size(n_take, n_cand), dtype=np.int64)
        order = None  # kept rows in rank order (None: the kept rows in stored order)
        applied_boosts: dict[int, list[str]] = {}  # pool row -> boost/bury rules applied
        ranked_as_stored = (
            not (self.rules.boosts or req.seed is not None) and scores is None and pool.sorted
        )
        if (
            ranked_as_stored
            and not pins
            and filters.seen is pool  # (a UserPool: the user's own seen items)
            and live.kernel_ctx is not None
        ):
            # The common case: a known user's stored scores (stored best first), without
            # boosts, a seed or pins. Filters and caps take one compiled pass over the kept rows
            # in stored order, the kernel reading the user's rows itself.
            plan = filters.plan(n_take, caps, pool.uidx)
            live.call_kernel(kernels.outcomes_select_user, live.kernel_ctx, plan, answer)
            code = None  # (in the answer; read only when needed)
        elif ranked_as_stored and not pins:
            # The same for other pools (or an experiment's snapshot whose arrays the kernel
            # cannot read directly).
            plan = filters.plan(n_take, caps)
            live.call_kernel(
                kernels.outcomes_select,
                pool.items,
                *filters.args(live),
                plan,
                pool.scores,
                pool.reasons,
                live.brand_id,
                live.category_id,
                answer,
            )
            code = None  # (in the answer; read only when needed)
        else:
            plan = filters.plan(n_take, caps)
            pinned = np.fromiter(pinned_item_set, dtype=np.int32) if pins else None
            if pins and caps is not None:
                # Pins count toward the caps (they are placed whatever the caps say): with
                # brand:nike capped at 2 and a nike item pinned, one ranked nike item may join it.
                at = kernels.counts_at(plan[: kernels.PLAN_HEAD].tolist())
                plan[at : at + caps.n_groups] += caps.members(live, pinned).sum(axis=0)
            if scores is None:
                scores = pool.scores
            code = np.empty(n_cand, dtype=np.uint8)
            live.call_kernel(
                kernels.outcomes,
                pool.items,
                *filters.args(live),
                plan,
                code,
                answer[2 : kernels.HEAD],
            )
            row_scores = scores
            if not ranked_as_stored:
                row_scores, order, applied_boosts = self._rank(pool, scores, code)
            if pins:
                if order is None:
                    order = (code == KEPT).nonzero()[0]
                not_pinned = ~live.item_member(pool.items.take(order), pinned)
                order = order[not_pinned]
            kernels.select(
                code,
                _NO_ROWS if order is None else order,
                order is None,
                pool.items,
                live.tag_offsets,
                live.tag_ids,
                row_scores,
                pool.reasons,
                live.brand_id,
                live.category_id,
                plan,
                answer,
            )
        head, e_items, e_scores = kernels.chosen(answer, n_take)
        n_chosen, n_refused, tally = head[0], head[1], head[2:]
        blocked_by = []
        if tally[BLOCKED]:
            if code is None:
                code = kernels.codes(answer, n_take, n_cand)
            blocked_by = filters.blocked_by(live, pool.items, code, tally)
        t_score = time.perf_counter()
        if t_score > self.deadline:
            raise DeadlineExceeded("scoring")
        capped = {}  # (row -> refusing cap; read by the trace only: the rows are distinct)
        if n_refused and self.trace is not None:
            refused, groups = kernels.refused(answer, n_take, n_cand, n_refused)
            capped = {row: caps.names[g] for row, g in zip(refused, groups, strict=True)}
        explain = req.explain != "none"
        chosen_rows: list[int] = []
        e_reasons: list[int] = []
        if explain or req.include_reasons or applied_boosts or self.trace is not None:
            chosen_rows, e_reasons = kernels.chosen_rows(answer, n_take, n_chosen)
        e_signals: list = (
            pool.signals[chosen_rows].tolist()
            if explain and pool.signals is not None
            else [None] * n_chosen
        )
        if applied_boosts:
            e_rules = [list(applied_boosts.get(row, ())) for row in chosen_rows]
        else:
            e_rules = [()] * n_chosen  # (one shared empty tuple: no rule fired)
        counts_filtered = n_cand - tally[KEPT]
        backfilled_from: dict[str, int] = {}

        # Back-fill.
        backfilled = 0
        if len(e_items) + len(pins) < k:
            taken = set(e_items) | pinned_item_set
            cap_counts = None
            if callable(backfill_sources):
                backfill_sources = backfill_sources()
            for source in backfill_sources:
                need = k - len(e_items) - len(pins)
                if need <= 0:
                    break
                fb = self.fallback_pool(source)
                if fb is None:
                    continue
                fcode, _, _ = filters.outcomes(live, fb.items)
                fb_keep = np.flatnonzero(fcode == KEPT)
                fb_groups = None
                if caps is not None:
                    fb_groups = caps.members(live, fb.items[fb_keep]).tolist()
                    if cap_counts is None:  # (the counts the selection left in the plan)
                        at = kernels.counts_at(plan[: kernels.PLAN_HEAD].tolist())
                        cap_counts = plan[at : at + caps.n_groups].tolist()
                for j, row in enumerate(fb_keep.tolist()):
                    if need <= 0:
                        break
                    item = int(fb.items[row])
                    if item in taken:
                        continue
                    if caps is not None and caps.take(fb_groups[j], cap_counts):
                        continue
                    taken.add(item)
                    e_items.append(item)
                    e_scores.append(kernels.round6(float(fb.scores[row])))
                    e_reasons.append(int(fb.reasons[row]))
                    e_signals.append(None)
                    e_rules.append([f"backfill:{source}"])
                    backfilled_from[source] = backfilled_from.get(source, 0) + 1
                    backfilled += 1
                    need -= 1
                    if self.trace is not None:
                        self.trace.append(
                            {
                                "item_id": self.snap.item_id(item),
                                "source": source,
                                "outcome": "backfilled",
                            }
                        )
            if backfilled:
                srcs = ", ".join(f"{s} ({n})" for s, n in backfilled_from.items())
                self.warnings.append(
                    {
                        "code": "BACKFILLED",
                        "detail": f"filters left fewer than k={k} items; "
                        f"{backfilled} back-filled from {srcs}",
                    }
                )
        if len(e_items) + len(pins) < k:
            self.warnings.append(
                {
                    "code": "FEWER_THAN_K",
                    "detail": f"only {len(e_items) + len(pins)} items satisfy the request (k={k})",
                }
            )

        # Pins at their positions (1-based); past the end they go last.
        for p in pins:
            pos = min(p.position - 1, len(e_items))
            e_scores.insert(pos, e_scores[pos] if pos < len(e_scores) else 0.0)
            e_items.insert(pos, p.item)
            e_reasons.insert(pos, PINNED_REASON)
            e_signals.insert(pos, None)
            e_rules.insert(pos, [f"pin:{p.rule_id}"])
        t_post = time.perf_counter()

        items = e_items[:k]
        reasons = []
        if req.include_reasons or explain:
            reasons = [
                [PINNED_TEXT if c == PINNED_REASON else REASONS.get(c, REASONS[0])]
                for c in e_reasons[:k]
            ]
        if self.trace is not None:
            if code is None:
                code = kernels.codes(answer, n_take, n_cand)
            if order is None:
                order = (code == KEPT).nonzero()[0]
                if pins:
                    order = order[~np.isin(pool.items.take(order), list(pinned_item_set))]
            self._trace_candidates(
                pool, code, blocked_by, order, chosen_rows, capped, set(items), pins
            )
        filtered_by: dict[str, int] = {}
        if counts_filtered:  # (outcome name -> count for the non-zero filter counts)
            removed = tally[1:]
            filtered_by.update(zip(compress(_FILTERS, removed), filter(None, removed), strict=True))
        if n_refused:
            filtered_by["max_per_tag"] = n_refused
        return Ranked(
            items,
            e_scores[:k],  # (rounded: kernels.round6)
            reasons,
            e_signals[:k],
            e_rules[:k],
            self.trace,
            {
                "candidates_in": n_cand,
                "filtered": counts_filtered,
                "capped": n_refused,
                "pinned": len(pins),
                "backfilled": backfilled,
                "returned": len(items),
            },
            filtered_by,
            backfilled_from,
            {  # (ms to microseconds, as round(ms, 3) gives it at a fifth of its cost)
                "candidates": round((t_cand - self.t0) * 1e6) / 1000,
                "scoring": round((t_score - t_cand) * 1e6) / 1000,
                "postrank": round((t_post - t_score) * 1e6) / 1000,
            },
        )

    def _rank(
        self, pool: Pool, scores: np.ndarray, code: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[int, list[str]]]:
        """Rank the kept rows by (re-weighted) score, boosts and the seed's tie-break: (score
        per pool row, kept rows in rank order, {row: boost/bury rules applied})."""
        keep = (code == KEPT).nonzero()[0]
        adj = scores.take(keep).astype(np.float32, copy=False)
        applied: dict[int, list[str]] = {}
        if self.rules.boosts and keep.size:
            kept_items = pool.items.take(keep)
            # Factors act on a positive scale: scores are mapped onto [span, 2 * span], so a
            # factor of 2 lifts the weakest candidate to the level of the strongest.
            lo, span = adj.min(), adj.max() - adj.min()
            adj = adj - lo + (span if span > 0 else np.float32(1.0))
            for b in self.rules.boosts:
                slots = np.flatnonzero(self.live.tag_hits(kept_items, b.tag))
                if slots.size:
                    adj[slots] *= np.float32(b.factor)
                    rule = f"{'boost' if b.factor > 1 else 'bury'}:{b.rule_id}"
                    for row in keep.take(slots).tolist():
                        applied.setdefault(row, []).append(rule)
        row_scores = np.zeros(code.shape[0], dtype=np.float32)
        row_scores.put(keep, adj)
        if self.req.seed is not None and keep.size > 1:
            jitter = np.random.default_rng(self.req.seed).random(keep.size)  # tie-break only
            order = keep.take(np.lexsort((jitter, -adj)))
        elif scores is pool.scores and not applied and pool.sorted:
            order = keep  # stored order is already best first
        else:
            order = keep.take(np.argsort(-adj, kind="stable"))
        return row_scores, order, applied

    def admissible(self, items: np.ndarray, seen: np.ndarray | UserPool) -> np.ndarray:
        """Which of `items` (int32 snapshot rows) pass this request's filters - availability,
        seen, the request's constraints and the rules' blocks: what a pin is checked against
        (for an item placed after `run`, such as an exploration slot's)."""
        filters = Filters.build(self.live, self.req, self.rules, seen, [])
        code, _, _ = filters.outcomes(self.live, np.asarray(items, dtype=np.int32))
        return code == KEPT

    def _valid_pins(self, filters: Filters) -> list[Pin]:
        if not self.rules.pins:
            return []
        items = np.asarray([p.item for p in self.rules.pins], dtype=np.int32)
        code, _, _ = filters.outcomes(self.live, items)
        valid, seen_items = [], set()
        for p, c in zip(self.rules.pins, code.tolist(), strict=True):
            if c == KEPT and p.item not in seen_items and p.position <= self.req.k:
                valid.append(p)
                seen_items.add(p.item)
            elif self.trace is not None:
                reason = OUTCOMES[c] if c != KEPT else "duplicate or beyond k"
                self.trace.append(
                    {
                        "item_id": self.snap.item_id(p.item),
                        "source": "pin",
                        "outcome": "pin_skipped",
                        "rule": f"pin:{p.rule_id}",
                        "detail": reason,
                    }
                )
        return valid

    def _trace_candidates(
        self, pool, code, blocked_by, ranked_rows, chosen_rows, capped, returned, pins
    ) -> None:
        rank_of = {row: r for r, row in enumerate(ranked_rows.tolist())}
        chosen = set(chosen_rows)
        for p in pins:
            self.trace.append(
                {
                    "item_id": self.snap.item_id(p.item),
                    "source": "pin",
                    "outcome": "pinned",
                    "rule": f"pin:{p.rule_id}",
                    "position": p.position,
                }
            )
        for row, (item, c) in enumerate(zip(pool.items.tolist(), code.tolist(), strict=True)):
            entry: dict[str, Any] = {"item_id": self.snap.item_id(item), "source": pool.source}
            if c != KEPT:
                entry["outcome"] = "excluded"
                entry["rule"] = blocked_by[row] if c == BLOCKED and blocked_by else OUTCOMES[c]
                if c == BLOCKED and blocked_by:
                    entry["rule"] = f"block:{blocked_by[row]}"
            elif row in capped:
                entry["outcome"] = "capped"
                entry["rule"] = f"max_per_tag:{capped[row]}"
            elif row in chosen and item in returned:
                entry["outcome"] = "kept"
            elif item in {p.item for p in pins}:
                entry["outcome"] = "pinned"
            else:
                entry["outcome"] = "below_k"
            if row in rank_of:
                entry["rank_before_postrank"] = rank_of[row] + 1
            self.trace.append(entry)


def backfill_sources(
    live: LiveSnapshot, req: RecommendRequest, segment: str, category_hint: int | None
) -> list[str]:
    """The fallback lists to back-fill from, most specific first: required tag, category,
    segment, then global popularity."""
    names = set(live.snap.fallback_names)
    out = [f"tag:{t}" for t in req.required_tags if f"tag:{t}" in names]
    if category_hint is not None and category_hint >= 0:
        cname = live.snap.category_name(category_hint)
        if f"category:{cname}" in names:
            out.append(f"category:{cname}")
    if segment != DEFAULT_SEGMENT and f"segment:{segment}" in names:
        out.append(f"segment:{segment}")
    for name in ("popular", "trending"):
        if name in names:
            out.append(name)
    return out

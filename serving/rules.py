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
from typing import Any

import numpy as np

from recsys.snapshot.format import REASON_CODES, REASONS, SIGNALS
from serving.errors import ProblemError
from serving.snapshot import LiveSnapshot
from serving.validation import DEFAULT_SEGMENT, RecommendRequest

# Outcome codes of a candidate (uint8); the order is the order filters are checked in.
KEPT, UNAVAILABLE, EXCLUDED, NOT_INCLUDED, SEEN, BLOCKED, FORBIDDEN_TAG, MISSING_TAG = range(8)
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
PINNED_REASON, PINNED_TEXT = -1, "featured"
_SIGNAL_INDEX = {s: j for j, s in enumerate(SIGNALS)}
_REASON_SLUGS = {code: slug for slug, code in REASON_CODES.items()}


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
    blocked_tags_list: list[int] = field(default_factory=list)  # = blocked_tags, as a list
    unresolved: list[str] = field(default_factory=list)  # rule ids naming unknown items/tags


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
    out.blocked_tags_list = b_tags
    live.compiled[key] = out
    while len(live.compiled) > 256:
        live.compiled.popitem(last=False)
    return out


# --- the per-request filter context ----------------------------------------------------------
@dataclass(slots=True)
class Filters:
    """Hard filters of one request, resolved to index arrays."""

    exclude: np.ndarray
    include: np.ndarray | None
    seen: np.ndarray
    forbidden_tags: list[int]  # tag ids (plain lists: only ever looped over)
    required_tags: list[int]
    required_missing: bool  # a required tag the snapshot does not know: nothing can match
    rules: CompiledRules

    @classmethod
    def build(
        cls,
        live: LiveSnapshot,
        req: RecommendRequest,
        rules: CompiledRules,
        seen: np.ndarray,
        warnings: list[dict[str, str]],
    ) -> Filters:
        snap = live.snap
        exclude = _indices(live, req.exclude_ids)
        include = _indices(live, req.include_ids) if req.include_ids is not None else None
        forbidden: list[int] = []
        required: list[int] = []
        if req.forbidden_tags:
            forbidden = [t for t in map(snap.tag_id, req.forbidden_tags) if t is not None]
        missing = []
        if req.required_tags:
            required_ids = [snap.tag_id(x) for x in req.required_tags]
            missing = [t for t, i in zip(req.required_tags, required_ids, strict=True) if i is None]
            if missing:
                warnings.append(
                    {
                        "code": "UNKNOWN_TAG",
                        "detail": f"required tag(s) unknown to the catalogue: {', '.join(missing)}",
                    }
                )
            required = [i for i in required_ids if i is not None]
        return cls(
            exclude=exclude,
            include=include,
            seen=seen,
            forbidden_tags=forbidden,
            required_tags=required,
            required_missing=bool(missing),
            rules=rules,
        )

    def outcomes(self, live: LiveSnapshot, items: np.ndarray) -> tuple[np.ndarray, list]:
        """uint8 outcome per item (KEPT or the first failed filter) and, when some item was
        blocked by a rule, the blocking rule id per item (else an empty list).

        Filters are applied from the last to the first, each overwriting, so an item ends with
        the first filter it fails (the order of OUTCOMES). The item-list filters (blocked items,
        seen, exclude_ids) take one gather together (`LiveSnapshot.list_codes`).
        """
        r = self.rules
        n = items.shape[0]
        code = None  # tag outcomes (the lowest priorities), allocated when some tag applies
        if self.required_missing:
            code = np.full(n, MISSING_TAG, dtype=np.uint8)
        elif self.required_tags:
            have = np.zeros(n, dtype=np.int32)
            for tag in self.required_tags:
                have += live.tag_hits(items, tag)
            code = (have < len(self.required_tags)).astype(np.uint8)
            code *= MISSING_TAG
        for codes, tags in ((FORBIDDEN_TAG, self.forbidden_tags), (BLOCKED, r.blocked_tags_list)):
            for tag in tags:
                if code is None:
                    code = np.zeros(n, dtype=np.uint8)
                np.putmask(code, live.tag_hits(items, tag), codes)
        lists = [(r.blocked_items, BLOCKED), (self.seen, SEEN)]
        if self.include is None:  # else exclude_ids must overwrite not_in_include_ids below
            lists.append((self.exclude, EXCLUDED))
        listed = live.list_codes(items, lists)
        if listed is None:
            if code is None:
                code = np.zeros(n, dtype=np.uint8)
        elif code is None:
            code = listed
        else:
            np.copyto(code, listed, where=listed.astype(bool))
        if self.include is not None:
            code[~live.item_member(items, self.include)] = NOT_INCLUDED
            if self.exclude.size:
                code[live.item_member(items, self.exclude)] = EXCLUDED
        if live.any_unavailable:
            np.putmask(code, live.unavailable.take(items), UNAVAILABLE)
        blocked_by: list = []
        if (r.blocked_items.size or r.blocked_tags.size) and (code == BLOCKED).any():
            blocked_by = [
                self._blocking_rule(live, i) if c == BLOCKED else None
                for i, c in zip(items.tolist(), code.tolist(), strict=True)
            ]
        return code, blocked_by

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


def _indices(live: LiveSnapshot, ids: Sequence[str] | None) -> np.ndarray:
    if not ids:
        return _NO_ITEMS
    lookup = live.item_index
    found = [i for i in map(lookup, ids) if i is not None]
    return np.asarray(found, dtype=np.int32)


# --- caps ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Caps:
    """`max_per_tag` resolved: group name -> cap, and how to find the groups of an item."""

    names: list[str]
    caps: list[int]
    tag_groups: dict[int, int]  # tag id -> group
    brand_groups: dict[int, int]  # brand id -> group
    category_groups: dict[int, int]  # category id -> group
    counts: list[int]

    @classmethod
    def build(
        cls, live: LiveSnapshot, max_per_tag: dict[str, int], warnings: list[dict[str, str]]
    ) -> Caps | None:
        if not max_per_tag:
            return None
        snap = live.snap
        caps = cls([], [], {}, {}, {}, [])
        unknown = []
        for key, cap in max_per_tag.items():
            g = len(caps.names)
            tid = snap.tag_id(key)
            prefix, _, value = key.partition(":")
            if tid is not None:
                caps.tag_groups[tid] = g
            elif prefix == "brand" and snap.brand_index(value) is not None:
                caps.brand_groups[snap.brand_index(value)] = g
            elif prefix == "category" and snap.category_index(value) is not None:
                caps.category_groups[snap.category_index(value)] = g
            else:
                unknown.append(key)
                continue
            caps.names.append(key)
            caps.caps.append(int(cap))
            caps.counts.append(0)
        if unknown:
            warnings.append(
                {
                    "code": "UNKNOWN_TAG",
                    "detail": f"max_per_tag key(s) match nothing: {', '.join(unknown)}",
                }
            )
        return caps if caps.names else None

    def members(self, live: LiveSnapshot, items: np.ndarray) -> np.ndarray:
        """bool[len(items), groups]: which capped groups each item belongs to (vectorized)."""
        if len(self.tag_groups) == 1 and len(self.names) == 1:  # the common case: one tag
            return live.tag_hits(items, next(iter(self.tag_groups)))[:, None]
        m = np.zeros((items.shape[0], len(self.names)), dtype=bool)
        for tag, g in self.tag_groups.items():
            m[:, g] = live.tag_hits(items, tag)
        for ids, groups in (
            (live.brand_id, self.brand_groups),
            (live.category_id, self.category_groups),
        ):
            if groups:
                values = ids.take(items)
                for value, g in groups.items():
                    m[:, g] |= values == value
        return m

    def select(self, m: np.ndarray, n: int) -> tuple[list[int], dict[int, str]]:
        """Greedy top-`n` under the caps, over rows already in rank order.

        Returns (chosen row positions, {refused position: cap name}) and counts the chosen in.
        A plain loop that stops at the n-th chosen row: it visits about n rows, and only the
        member rows look at their groups (cheaper than vector passes over every row).
        """
        caps, names = self.caps, self.names
        counts_now = list(self.counts)
        member = (m[:, 0] if m.shape[1] == 1 else m.any(axis=1)).tolist()
        chosen: list[int] = []
        refused: dict[int, str] = {}
        single = [0] if m.shape[1] == 1 else None  # one capped group: no per-row lookup
        for pos, is_member in enumerate(member):
            if is_member:
                groups = single or [g for g, f in enumerate(m[pos].tolist()) if f]
                full = next((g for g in groups if counts_now[g] >= caps[g]), None)
                if full is not None:
                    refused[pos] = names[full]
                    continue
                for g in groups:
                    counts_now[g] += 1
            if len(chosen) < n:
                chosen.append(pos)
                if len(chosen) == n:
                    break  # refusals past the n-th chosen row do not matter
        if n > 0:  # (n == 0: nothing is taken; the scan only reports what the caps refuse)
            self.counts[:] = counts_now
        return chosen, refused

    def take(self, flags: list[bool]) -> str | None:
        """Count one item in (back-fill); or the name of the cap that refuses it."""
        groups = [g for g, f in enumerate(flags) if f]
        for g in groups:
            if self.counts[g] >= self.caps[g]:
                return self.names[g]
        for g in groups:
            self.counts[g] += 1
        return None


# --- result ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Ranked:
    """The answer before JSON: parallel lists of the k returned items."""

    items: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    reasons: list[list[str]] = field(default_factory=list)  # only with reasons or explain asked
    signals: list[list[float] | None] = field(default_factory=list)
    rules: list[list[str]] = field(default_factory=list)
    trace: list[dict[str, Any]] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    filtered_by: dict[str, int] = field(default_factory=dict)
    backfilled_from: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

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

    def _check_deadline(self, stage: str) -> None:
        if time.perf_counter() > self.deadline:
            raise DeadlineExceeded(stage)

    # ---- candidate pools ----
    def user_pool(self, uidx: int) -> tuple[Pool, np.ndarray]:
        items, score, signals, reason = self.snap.user_candidates(uidx)
        return Pool(
            np.asarray(items),
            np.asarray(score),
            np.asarray(signals),
            np.asarray(reason),
            "personal",
            sorted=True,  # the snapshot stores each user's candidates best first
        ), np.asarray(self.snap.user_seen(uidx))

    def anchor_pool(self, anchors: np.ndarray, kinds: Sequence[str] = ("emb", "cooc")) -> Pool:
        """Items similar to any anchor; per kind the scores are summed over anchors and each
        list is scaled by its best score so emb and cooc weigh alike."""
        parts_items, parts_scores, parts_kind = [], [], []
        for a in anchors.tolist():
            for j, kind in enumerate(kinds):
                it, sc = self.snap.similar(a, kind)
                if it.shape[0]:
                    parts_items.append(np.asarray(it))
                    top = float(sc[0]) or 1.0
                    parts_scores.append(np.asarray(sc, dtype=np.float32) / top)
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
        out = Ranked(trace=self.trace)
        t_cand = time.perf_counter()
        self._check_deadline("candidate generation")
        filters = Filters.build(live, req, self.rules, seen, self.warnings)

        # Re-score from stored signals when weights are given.
        scores = pool.scores
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
        code, blocked_by = filters.outcomes(live, pool.items)
        keep = (code == KEPT).nonzero()[0]
        adj = scores[keep]  # a copy (fancy indexing)
        if adj.dtype != np.float32:
            adj = adj.astype(np.float32)
        applied_boosts: dict[int, list[str]] = {}
        if self.rules.boosts and keep.size:
            kept_items = pool.items[keep]
            # Factors act on a positive scale: scores are mapped onto [span, 2 * span], so a
            # factor of 2 lifts the weakest candidate to the level of the strongest.
            lo, span = adj.min(), adj.max() - adj.min()
            adj = adj - lo + (span if span > 0 else np.float32(1.0))
            for b in self.rules.boosts:
                rows = np.flatnonzero(live.tag_hits(kept_items, b.tag))
                if rows.size:
                    adj[rows] *= np.float32(b.factor)
                    for r in rows.tolist():
                        applied_boosts.setdefault(r, []).append(
                            f"{'boost' if b.factor > 1 else 'bury'}:{b.rule_id}"
                        )
        if req.seed is not None and keep.size > 1:
            jitter = np.random.default_rng(req.seed).random(keep.size)  # tie-break only
            order = np.lexsort((jitter, -adj))
            ranked_rows, ranked_adj = keep[order], adj[order]
        elif scores is pool.scores and not applied_boosts and pool.sorted:
            ranked_rows, ranked_adj = keep, adj  # stored order is already best first
        else:
            order = np.argsort(-adj, kind="stable")
            ranked_rows, ranked_adj = keep[order], adj[order]
        t_score = time.perf_counter()
        self._check_deadline("scoring")

        # Caps, pins and k.
        pins = self._valid_pins(filters)
        n_free = k - len(pins)
        pinned_item_set = {p.item for p in pins}
        if pins and ranked_rows.size:
            not_pinned = ~live.item_member(
                pool.items[ranked_rows], np.fromiter(pinned_item_set, dtype=np.int32)
            )
            ranked_rows, ranked_adj = ranked_rows[not_pinned], ranked_adj[not_pinned]
        caps = Caps.build(live, req.max_per_tag, self.warnings)
        capped: dict[int, str] = {}
        n_take = max(0, n_free)
        if caps is None:
            chosen, chosen_adj = ranked_rows[:n_take], ranked_adj[:n_take]
        else:
            positions, refused = caps.select(caps.members(live, pool.items[ranked_rows]), n_take)
            at = np.array(positions, dtype=np.intp)  # (one conversion for both gathers)
            chosen, chosen_adj = ranked_rows[at], ranked_adj[at]
            capped = {int(ranked_rows[pos]): name for pos, name in refused.items()}
        chosen_rows: list[int] = chosen.tolist()
        chosen_adj = chosen_adj.tolist()
        e_items: list[int] = pool.items[chosen].tolist()
        e_scores: list[float] = chosen_adj
        e_reasons: list[int] = pool.reasons[chosen].tolist()
        e_signals: list = (
            pool.signals[chosen].tolist()
            if pool.signals is not None and req.explain != "none"
            else [None] * len(chosen_rows)
        )
        if applied_boosts:
            slots = np.searchsorted(keep, chosen).tolist()
            e_rules = [list(applied_boosts.get(slot, ())) for slot in slots]
        else:
            e_rules = [[] for _ in chosen_rows]
        counts_filtered = int(pool.items.shape[0] - keep.size)

        # Back-fill.
        backfilled = 0
        if len(e_items) + len(pins) < k:
            taken = set(e_items) | pinned_item_set
            if callable(backfill_sources):
                backfill_sources = backfill_sources()
            for source in backfill_sources:
                need = k - len(e_items) - len(pins)
                if need <= 0:
                    break
                fb = self.fallback_pool(source)
                if fb is None:
                    continue
                fcode, _ = filters.outcomes(live, fb.items)
                fb_keep = np.flatnonzero(fcode == KEPT)
                fb_groups = caps.members(live, fb.items[fb_keep]).tolist() if caps else None
                for j, row in enumerate(fb_keep.tolist()):
                    if need <= 0:
                        break
                    item = int(fb.items[row])
                    if item in taken:
                        continue
                    if caps is not None and caps.take(fb_groups[j]):
                        continue
                    taken.add(item)
                    e_items.append(item)
                    e_scores.append(float(fb.scores[row]))
                    e_reasons.append(int(fb.reasons[row]))
                    e_signals.append(None)
                    e_rules.append([f"backfill:{source}"])
                    out.backfilled_from[source] = out.backfilled_from.get(source, 0) + 1
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
                srcs = ", ".join(f"{s} ({n})" for s, n in out.backfilled_from.items())
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

        out.items = e_items[:k]
        out.scores = np.array(e_scores[:k], dtype=np.float64).round(6).tolist()
        if req.include_reasons or req.explain != "none":
            out.reasons = [
                [PINNED_TEXT if c == PINNED_REASON else REASONS.get(c, REASONS[0])]
                for c in e_reasons[:k]
            ]
        out.signals = e_signals[:k]
        out.rules = e_rules[:k]

        if self.trace is not None:
            self._trace_candidates(
                pool, code, blocked_by, keep, ranked_rows, chosen_rows, capped, set(out.items), pins
            )
        if counts_filtered:
            # bytes.count per outcome: cheaper than np.bincount(...).tolist() on ~200 codes
            raw = code.tobytes()
            for c in range(1, len(OUTCOMES)):
                n_c = raw.count(c)
                if n_c:
                    out.filtered_by[OUTCOMES[c]] = n_c
        if capped:
            out.filtered_by["max_per_tag"] = len(capped)
        out.counts = {
            "candidates_in": int(pool.items.shape[0]),
            "filtered": counts_filtered,
            "capped": len(capped),
            "pinned": len(pins),
            "backfilled": backfilled,
            "returned": len(out.items),
        }
        out.timings = {
            "candidates": (t_cand - self.t0) * 1000,
            "scoring": (t_score - t_cand) * 1000,
            "postrank": (t_post - t_score) * 1000,
        }
        return out

    def _valid_pins(self, filters: Filters) -> list[Pin]:
        if not self.rules.pins:
            return []
        items = np.asarray([p.item for p in self.rules.pins], dtype=np.int32)
        code, _ = filters.outcomes(self.live, items)
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
        self, pool, code, blocked_by, keep, ranked_rows, chosen_rows, capped, returned, pins
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


def reason_slug(code: int) -> str:
    return _REASON_SLUGS.get(code, "personal")

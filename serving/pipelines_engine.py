"""Declared recommendation pipelines: candidate generators, filters, a ranker, post-processing,
run against one live snapshot.

A pipeline is a JSON document (`validate_spec` checks it at write time):

    {"name": "homepage", "stages": [
        {"type": "candidate", "generator": "collab", "limit": 200},
        {"type": "candidate", "generator": "graph", "limit": 100, "weight": 0.5},
        {"type": "filter", "rules": {"available": true, "exclude_seen": true,
                                     "exclude_tags": ["adult"], "price_max": 100}},
        {"type": "ranker", "model": "stored"},
        {"type": "postprocess", "diversity": "category", "max_per_group": 2, "limit": 20}]}

Data flow of `run`: each candidate stage asks its generator (`generate`) for scored items; the
candidates are merged (union; each generator's scores divided by its best, times the stage's
weight, summed: the ``blend`` score); filter stages drop candidates; the ranker re-scores them;
post-processing re-orders for diversity and cuts to `limit`. Every stage's output is kept, so
``POST /v1/recs/pipelines/{id}/run`` can show it.

What each generator is in the snapshot (the pipeline's models, precomputed at publish time):

* ``popularity``: a fallback list - ``popular`` (default), ``trending``, ``category:<c>``,
  ``segment:<s>``, ``tag:<t>``, or ``segment`` for the user's own segment;
* ``collab``: the user's stored candidates - the union of the LightFM, EASE, co-occurrence,
  popularity and recent generators' candidates of the published hybrid, scored by its ranker;
* ``graph``: item-item co-occurrence (co-view / co-buy, shrunk cosine): the neighbours
  (``similar_cooc``) of the user's interacted items and of the request's anchors, summed;
* ``embedding``: factor dot products - LightFM user factors . item factors + item bias over the
  whole catalogue (anonymous: the mean factors of the anchors);
* ``content``: text-embedding neighbours of the user's items and anchors - the items nearest
  their mean vector in the tenant's content model (`recsys.content`: TF-IDF + SVD of the item
  texts, fitted by the pipeline), so items without events are found too; without a content
  model, 422 "not available for this snapshot".

Rankers: ``stored`` (the hybrid's learned ranker score of the user's stored candidates; the
others follow in blend order), ``factors`` (user . item factors + bias), ``blend`` (the merged
candidate score as is).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from serving.errors import ProblemError

GENERATORS: dict[str, str] = {
    "popularity": "a fallback list of the snapshot (popular, trending, category:, segment:, tag:)",
    "collab": "the user's stored candidates (LightFM, EASE, co-occurrence, popularity, recent "
    "generators of the published hybrid, scored by its ranker)",
    "graph": "item-item co-occurrence neighbours (similar_cooc) of the user's items and anchors",
    "embedding": "LightFM factor dot products (user . item + item bias) over the catalogue",
    "content": "text-embedding neighbours (the content model: TF-IDF + SVD of item texts) of "
    "the user's items and anchors",
}
ALIASES = {"co_view": "graph", "co_buy": "graph", "cooc": "graph", "cf": "collab"}
RANKERS: dict[str, str] = {
    "stored": "the hybrid's learned ranker score of the user's stored candidates",
    "factors": "user . item factors + item bias",
    "blend": "the merged candidate score (each generator scaled by its best, weighted)",
}
DIVERSITY = ("category", "brand", "tag")
FILTER_RULES = {
    "available": bool,
    "exclude_seen": bool,
    "categories": list,
    "exclude_categories": list,
    "brands": list,
    "exclude_brands": list,
    "tags_any": list,
    "exclude_tags": list,
    "price_min": (int, float),
    "price_max": (int, float),
}
MAX_LIMIT = 1000
_STAGE_ORDER = {"candidate": 0, "filter": 1, "ranker": 1, "postprocess": 2}


def _invalid(detail: str) -> ProblemError:
    return ProblemError(422, detail, code="RECSYS_INVALID_PIPELINE")


def _limit(stage: dict[str, Any], where: str, default: int) -> int:
    limit = stage.get("limit", default)
    if type(limit) is not int or not 1 <= limit <= MAX_LIMIT:
        raise _invalid(f"{where}: limit must be an integer from 1 to {MAX_LIMIT}.")
    return limit


def _name(value: Any) -> str | None:
    """A name field as a string (None for any other JSON value: never a lookup key)."""
    return value if isinstance(value, str) else None


def validate_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The pipeline with generator aliases resolved, or a 422 naming the first problem: an
    unknown stage type, generator, ranker, filter rule or diversity key, or stages that cannot
    chain (candidates first, at most one ranker, post-processing last)."""
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise _invalid("A pipeline needs a non-empty list of stages.")
    out: list[dict[str, Any]] = []
    rank_seen = 0
    last_order = 0
    for n, raw in enumerate(stages, start=1):
        where = f"stage {n}"
        if not isinstance(raw, dict):
            raise _invalid(f"{where} is not an object.")
        stage = dict(raw)
        kind = _name(stage.get("type"))
        if kind not in _STAGE_ORDER:
            raise _invalid(
                f"{where}: unknown stage type {kind!r} (candidate, filter, ranker, postprocess)."
            )
        order = _STAGE_ORDER[kind]
        if n == 1 and kind != "candidate":
            raise _invalid(
                f"{where}: a pipeline starts with a candidate stage; a {kind} stage "
                "has nothing to take."
            )
        if order < last_order:
            raise _invalid(
                f"{where}: a {kind} stage cannot follow a "
                f"{out[-1]['type']} stage (candidates, then filters and the ranker, "
                "then post-processing)."
            )
        last_order = order
        if kind == "candidate":
            gen = _name(stage.get("generator"))
            gen = ALIASES.get(gen, gen)
            if gen not in GENERATORS:
                raise _invalid(
                    f"{where}: unknown generator {stage.get('generator')!r} "
                    f"({', '.join(GENERATORS)})."
                )
            stage["generator"] = gen
            stage["limit"] = _limit(stage, where, 200)
            weight = stage.get("weight", 1.0)
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not (0 < weight < 1e6)
            ):
                raise _invalid(f"{where}: weight must be a positive number.")
            if "list" in stage and (gen != "popularity" or not isinstance(stage["list"], str)):
                raise _invalid(
                    f"{where}: 'list' names a fallback list of the popularity generator."
                )
        elif kind == "filter":
            rules = stage.get("rules")
            if not isinstance(rules, dict) or not rules:
                raise _invalid(
                    f"{where}: a filter stage needs 'rules', an object of "
                    f"{', '.join(FILTER_RULES)}."
                )
            for key, value in rules.items():
                want = FILTER_RULES.get(key)
                if want is None:
                    raise _invalid(
                        f"{where}: unknown filter rule {key!r} ({', '.join(FILTER_RULES)})."
                    )
                if not isinstance(value, want) or (want is not bool and isinstance(value, bool)):
                    raise _invalid(f"{where}: filter rule {key!r} has the wrong type.")
                if want is list and not all(isinstance(v, str) for v in value):
                    raise _invalid(f"{where}: filter rule {key!r} is a list of strings.")
        elif kind == "ranker":
            rank_seen += 1
            if rank_seen > 1:
                raise _invalid(f"{where}: a pipeline has at most one ranker stage.")
            if _name(stage.get("model")) not in RANKERS:
                raise _invalid(
                    f"{where}: unknown ranker {stage.get('model')!r} ({', '.join(RANKERS)})."
                )
        else:
            div = stage.get("diversity")
            if div is not None and _name(div) not in DIVERSITY:
                raise _invalid(f"{where}: diversity is one of {', '.join(DIVERSITY)}.")
            mpg = stage.get("max_per_group", 2)
            if type(mpg) is not int or mpg < 1:
                raise _invalid(f"{where}: max_per_group must be a positive integer.")
            stage["max_per_group"] = mpg
            stage["limit"] = _limit(stage, where, 20)
        out.append(stage)
    return {**spec, "stages": out}


# --- running -------------------------------------------------------------------------------------
@dataclass
class Request:
    """Who and what a pipeline runs for: a known user (snapshot row) and/or anchor items."""

    user: int | None
    anchors: np.ndarray  # int32 item indices
    segment: str | None = None
    content: Any = None  # the tenant's content model (`recsys.content.ContentModel`), if any


@dataclass
class Candidates:
    """Scored items, best first (item indices of the snapshot)."""

    items: np.ndarray
    scores: np.ndarray
    sources: list[list[str]] = field(default_factory=list)

    def take(self, keep: np.ndarray) -> Candidates:
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep
        return Candidates(
            self.items[idx], self.scores[idx], [self.sources[i] for i in idx.tolist()]
        )


def not_available(what: str) -> ProblemError:
    return ProblemError(
        422, f"{what} is not available for this snapshot.", code="RECSYS_NOT_AVAILABLE"
    )


def _top(items: np.ndarray, scores: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((items, -scores))[:limit]
    return items[order].astype(np.int32), scores[order].astype(np.float64)


def _neighbours(snap, anchors: np.ndarray, kind: str, limit: int):
    parts_i, parts_s = [], []
    for a in anchors.tolist():
        it, sc = snap.similar(a, kind)
        if it.shape[0]:
            parts_i.append(np.asarray(it))
            parts_s.append(np.asarray(sc, dtype=np.float64))
    if not parts_i:
        return np.zeros(0, np.int32), np.zeros(0)
    items = np.concatenate(parts_i)
    uniq, inv = np.unique(items, return_inverse=True)
    summed = np.bincount(inv, weights=np.concatenate(parts_s), minlength=uniq.shape[0])
    mine = np.isin(uniq, anchors)  # (an anchor is not its own neighbour)
    return _top(uniq[~mine], summed[~mine], limit)


def _content_neighbours(snap, model, anchors: np.ndarray, limit: int):
    """Items nearest the mean text embedding of the anchors (the tenant's content model:
    TF-IDF + SVD of item texts, `recsys.content`), anchors left out; cosine scores."""
    from recsys.content import neighbours

    rows = [model.row_of.get(snap.item_id(int(a))) for a in anchors.tolist()]
    rows = [r for r in rows if r is not None]
    if not rows:
        return np.zeros(0, np.int32), np.zeros(0)
    vec = np.asarray(model.item_vectors[rows], dtype=np.float64).mean(axis=0)
    norm = float(np.linalg.norm(vec))
    if norm == 0.0:
        return np.zeros(0, np.int32), np.zeros(0)
    found, scores = neighbours(model, (vec / norm).astype(np.float32), limit + len(rows))
    mine = set(rows)
    items, kept = [], []
    for r, sc in zip(found.tolist(), scores.tolist(), strict=True):
        if r in mine:
            continue
        idx = snap.item_index(model.item_ids[r])
        if idx is not None:
            items.append(idx)
            kept.append(sc)
    return _top(np.asarray(items, np.int32), np.asarray(kept, np.float64), limit)


def has_content(snap) -> bool:
    try:
        snap.similar(0, "content")
    except (ValueError, IndexError):
        return False
    return True


def _anchors_of(snap, req: Request, cap: int = 100) -> np.ndarray:
    """The request's anchors plus (for a known user) the items it interacted with."""
    parts = [req.anchors]
    if req.user is not None:
        parts.append(np.asarray(snap.user_seen(req.user))[:cap])
    return np.unique(np.concatenate(parts).astype(np.int32))


def user_vector(snap, req: Request) -> np.ndarray | None:
    """LightFM user factors (a known user) or the anchors' mean item factors; None without."""
    if not snap.has_factors:
        raise not_available("The embedding generator (LightFM factors)")
    if req.user is not None:
        return np.asarray(snap.user_factors(req.user), dtype=np.float64)
    if req.anchors.size:
        return np.asarray(snap.item_factors[req.anchors], dtype=np.float64).mean(axis=0)
    return None


def generate(snap, gen: str, req: Request, limit: int, stage: dict[str, Any] | None = None):
    """(items, scores) of generator `gen` for `req`, best first, at most `limit`."""
    stage = stage or {}
    if gen == "popularity":
        name = stage.get("list", "popular")
        if name == "segment":
            name = f"segment:{req.segment}" if req.segment else "popular"
            if snap.fallback(name) is None:
                name = "popular"
        fb = snap.fallback(name)
        if fb is None:
            raise ProblemError(
                422,
                f"The snapshot has no fallback list '{name}'.",
                code="RECSYS_NOT_AVAILABLE",
            )
        items, scores = fb
        return np.asarray(items[:limit], np.int32), np.asarray(scores[:limit], np.float64)
    if gen == "collab":
        if req.user is None:
            return np.zeros(0, np.int32), np.zeros(0)
        items, scores, _, _ = snap.user_candidates(req.user)
        return np.asarray(items[:limit], np.int32), np.asarray(scores[:limit], np.float64)
    if gen == "graph":
        return _neighbours(snap, _anchors_of(snap, req), "cooc", limit)
    if gen == "content":
        if req.content is not None:
            return _content_neighbours(snap, req.content, _anchors_of(snap, req), limit)
        if not has_content(snap):
            raise not_available("The content generator (text embeddings)")
        return _neighbours(snap, _anchors_of(snap, req), "content", limit)
    if gen == "embedding":
        vec = user_vector(snap, req)
        if vec is None:
            return np.zeros(0, np.int32), np.zeros(0)
        scores = np.asarray(snap.item_factors, dtype=np.float64) @ vec + np.asarray(
            snap.item_bias, dtype=np.float64
        )
        n = scores.shape[0]
        k = min(limit, n)
        part = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
        return _top(part.astype(np.int32), scores[part], limit)
    raise _invalid(f"unknown generator {gen!r}")


def merge(parts: list[tuple[str, float, np.ndarray, np.ndarray]]) -> Candidates:
    """The union of generators' candidates: each one's scores divided by its best (absolute)
    score, times its weight, summed per item; best first."""
    all_i, all_s, names = [], [], []
    for _name, weight, items, scores in parts:
        if not items.shape[0]:
            continue
        top = float(np.max(np.abs(scores))) or 1.0
        all_i.append(items)
        all_s.append(scores / top * weight)
        names.append(np.full(items.shape[0], len(names), np.int32))
    if not all_i:
        return Candidates(np.zeros(0, np.int32), np.zeros(0), [])
    items = np.concatenate(all_i)
    scores = np.concatenate(all_s)
    src = np.concatenate(names)
    uniq, inv = np.unique(items, return_inverse=True)
    total = np.bincount(inv, weights=scores, minlength=uniq.shape[0])
    labels = [p[0] for p in parts if p[2].shape[0]]
    sources: list[list[str]] = [[] for _ in range(uniq.shape[0])]
    for row, s in zip(inv.tolist(), src.tolist(), strict=True):
        if labels[s] not in sources[row]:
            sources[row].append(labels[s])
    order = np.lexsort((uniq, -total))
    return Candidates(
        uniq[order].astype(np.int32), total[order], [sources[i] for i in order.tolist()]
    )


def apply_filter(snap, live, cands: Candidates, rules: dict[str, Any], req: Request) -> Candidates:
    """The candidates passing every rule (names of categories, brands, tags the snapshot does
    not know match nothing)."""
    it = cands.items
    keep = np.ones(it.shape[0], dtype=bool)
    if not it.shape[0]:
        return cands
    if rules.get("available"):
        keep &= np.asarray(live.available)[it]
    if rules.get("exclude_seen") and req.user is not None:
        keep &= ~np.isin(it, np.asarray(snap.user_seen(req.user)))
    if rules.get("exclude_seen") and req.anchors.size:
        keep &= ~np.isin(it, req.anchors)
    cat = np.asarray(live.category_id)[it]
    brand = np.asarray(live.brand_id)[it]

    def ids(names, index) -> list[int]:
        return [i for i in (index(n) for n in names) if i is not None]

    if "categories" in rules:
        keep &= np.isin(cat, ids(rules["categories"], snap.category_index))
    if "exclude_categories" in rules:
        keep &= ~np.isin(cat, ids(rules["exclude_categories"], snap.category_index))
    if "brands" in rules:
        keep &= np.isin(brand, ids(rules["brands"], snap.brand_index))
    if "exclude_brands" in rules:
        keep &= ~np.isin(brand, ids(rules["exclude_brands"], snap.brand_index))
    if "tags_any" in rules:
        hit = np.zeros(it.shape[0], dtype=bool)
        for t in ids(rules["tags_any"], snap.tag_id):
            hit |= live.tag_hits(it, t)
        keep &= hit
    if "exclude_tags" in rules:
        for t in ids(rules["exclude_tags"], snap.tag_id):
            keep &= ~live.tag_hits(it, t)
    price = np.asarray(snap.price, dtype=np.float64)[it]
    if "price_min" in rules:
        keep &= price >= rules["price_min"]  # (unknown prices, NaN, fail both bounds)
    if "price_max" in rules:
        keep &= price <= rules["price_max"]
    return cands.take(keep)


def rank(snap, cands: Candidates, model: str, req: Request) -> Candidates:
    """The candidates re-scored by `model` (see RANKERS), best first."""
    it = cands.items
    if model == "blend" or not it.shape[0]:
        scores = cands.scores
    elif model == "stored":
        scores = np.full(it.shape[0], np.nan)
        if req.user is not None:
            stored_i, stored_s, _, _ = snap.user_candidates(req.user)
            stored_i = np.asarray(stored_i)
            pos = {int(i): j for j, i in enumerate(stored_i.tolist())}
            for row, item in enumerate(it.tolist()):
                j = pos.get(item)
                if j is not None:
                    scores[row] = float(stored_s[j])
        known = ~np.isnan(scores)
        # those the ranker did not score follow, in blend order
        order = np.concatenate(
            [
                np.flatnonzero(known)[np.lexsort((it[known], -scores[known]))],
                np.flatnonzero(~known),
            ]
        )
        out = cands.take(order)
        out.scores = scores[order]
        return out
    elif model == "factors":
        vec = user_vector(snap, req)
        if vec is None:
            raise ProblemError(
                422,
                "The factors ranker needs a known user or anchors.",
                code="RECSYS_NOT_AVAILABLE",
            )
        scores = np.asarray(snap.item_factors[it], dtype=np.float64) @ vec + np.asarray(
            snap.item_bias[it], dtype=np.float64
        )
    else:
        raise _invalid(f"unknown ranker {model!r}")
    order = np.lexsort((it, -scores))
    out = cands.take(order)
    out.scores = np.asarray(scores)[order]
    return out


def diversify(snap, live, cands: Candidates, by: str | None, max_per_group: int, limit: int):
    """Greedy pass in rank order: an item whose group (its category, brand, or any of its
    tags) already has `max_per_group` items is set aside; the set-aside items follow, in
    order, if fewer than `limit` were taken."""
    if by is None:
        return cands.take(np.arange(min(limit, cands.items.shape[0])))
    taken, later = [], []
    counts: dict[int, int] = {}
    for row, item in enumerate(cands.items.tolist()):
        if len(taken) >= limit:
            break
        if by == "category":
            groups = [int(live.category_id[item])]
        elif by == "brand":
            groups = [int(live.brand_id[item])]
        else:
            groups = [int(t) for t in snap.item_tags(item)]
        groups = [g for g in groups if g >= 0]
        if any(counts.get(g, 0) >= max_per_group for g in groups):
            later.append(row)
            continue
        for g in groups:
            counts[g] = counts.get(g, 0) + 1
        taken.append(row)
    rows = (taken + later)[:limit]
    return cands.take(np.asarray(rows, dtype=np.intp))


@dataclass
class StageOutput:
    index: int
    stage: dict[str, Any]
    output: Candidates
    ms: float


def run(snap, live, spec: dict[str, Any], req: Request) -> list[StageOutput]:
    """Run a validated pipeline for `req`; every stage's output, in order. The merge of the
    candidate stages is reported as its own step (index 0 in its ``stage``: ``merge``)."""
    stages = spec["stages"]
    outputs: list[StageOutput] = []
    parts = []
    current: Candidates | None = None
    for n, stage in enumerate(stages, start=1):
        t0 = time.perf_counter()
        kind = stage["type"]
        if kind == "candidate":
            gen = stage["generator"]
            items, scores = generate(snap, gen, req, stage["limit"], stage)
            parts.append((gen, float(stage.get("weight", 1.0)), items, scores))
            out = Candidates(items, scores, [[gen]] * items.shape[0])
        else:
            if current is None:
                t_m = time.perf_counter()
                current = merge(parts)
                outputs.append(
                    StageOutput(0, {"type": "merge"}, current, (time.perf_counter() - t_m) * 1e3)
                )
            if kind == "filter":
                out = apply_filter(snap, live, current, stage["rules"], req)
            elif kind == "ranker":
                out = rank(snap, current, stage["model"], req)
            else:
                out = diversify(
                    snap,
                    live,
                    current,
                    stage.get("diversity"),
                    stage["max_per_group"],
                    stage["limit"],
                )
            current = out
        outputs.append(StageOutput(n, stage, out, (time.perf_counter() - t0) * 1e3))
    if current is None:  # (candidate stages only)
        current = merge(parts)
        outputs.append(StageOutput(0, {"type": "merge"}, current, 0.0))
    return outputs


# --- a surface's pipeline in /v1/recommend -------------------------------------------------------
_REASON_OF = {"popularity": 1, "collab": 0, "graph": 2, "embedding": 3, "content": 3}


def surface_pool(
    docs,
    tenant: str,
    pipeline_id: str,
    live,
    uidx: int | None,
    anchors: np.ndarray,
    segment,
    content: Any = None,
):
    """(the request-time engine's Pool of the pipeline's output, its revision) for a surface
    whose tenant config names `pipeline_id`; raises ProblemError when the pipeline is missing
    or cannot run on this snapshot (the caller answers with today's pool and a warning).

    `docs`: the `pipelines` collection (`Collection.cached`: a change shows on every worker
    within its check interval). Reason codes: the generator that proposed the item first."""
    from serving.rules import Pool  # (serving.rules imports the snapshot layer; keep it local)

    doc = docs.cached(tenant, pipeline_id)
    if doc is None:
        raise ProblemError(422, f"No pipeline '{pipeline_id}'.", code="RECSYS_UNKNOWN_PIPELINE")
    out = run(live.snap, live, doc.body, Request(uidx, anchors, segment, content))[-1].output
    reasons = np.fromiter(
        (_REASON_OF.get(s[0], 0) if s else 0 for s in out.sources),
        dtype=np.uint8,
        count=out.items.shape[0],
    )
    scores = out.scores.astype(np.float32)
    unscored = ~np.isfinite(scores)  # (the ranker's unscored items: last, in their order)
    if unscored.any():
        floor = float(scores[~unscored].min()) if (~unscored).any() else 0.0
        scores[unscored] = floor - 1.0 - np.arange(int(unscored.sum())) * 1e-6
    return Pool(out.items, scores, None, reasons, f"pipeline:{pipeline_id}", sorted=True), (
        doc.revision
    )

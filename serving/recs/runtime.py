"""The /v1/recs runtime routes, answered by the serving engineer's `RecommendService` (rules,
filters, experiments, deadlines) and the live snapshot's stored factors:

POST /v1/recs/predict, GET /v1/recs/users/{user_id}, POST /v1/recs/users/{user_id}/realtime,
POST /v1/recs/batch/predict, GET /v1/recs/item/{item_id}/related, POST /v1/recs/score,
POST /v1/recs/embeddings/search, GET /v1/recs/embeddings/{embedding_id}.

Options the engine cannot honour are refused with 422 RECSYS_UNSUPPORTED_OPTION (never ignored).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import falcon
import numpy as np

from serving.auth import SCOPE_RECOMMEND
from serving.errors import ProblemError
from serving.service import RecommendService
from serving.snapshot import SnapshotRegistry

_PREDICT_KEYS = frozenset(
    {
        "user_id",
        "context",
        "candidate_ids",
        "filters",
        "exclude_ids",
        "limit",
        "strategy",
        "model",
        "return_scores",
        "explain",
        "seed",
        "diversity",
        "timeout_ms",
        "surface",
        "anchor_ids",
        "experiment",
    }
)
_UNSUPPORTED = frozenset({"novelty", "freshness", "serendipity_score_threshold", "filter_query"})
_FILTER_KEYS = {"tags": "required_tags", "exclude_tags": "forbidden_tags"}
_RELATED = {"co_view": "cooc", "co_buy": "cooc", "content": "emb", "blend": "blend"}
MAX_BATCH = 100
MAX_SCORE_CANDIDATES = 1000


def _unsupported(detail: str) -> ProblemError:
    return ProblemError(422, detail, code="RECSYS_UNSUPPORTED_OPTION")


def to_recommend_body(p: Any, deadline_ms: float) -> tuple[dict[str, Any], float, dict]:
    """A /v1/recs predict body as a /v1/recommend body; also (deadline shift s, output flags)."""
    if not isinstance(p, dict):
        raise ProblemError(400, "The body must be an object.")
    refused = sorted(set(p) & _UNSUPPORTED)
    if refused:
        raise _unsupported(
            f"Option(s) {', '.join(refused)} cannot be honoured: recommendations "
            "come from a precomputed snapshot without those signals."
        )
    unknown = sorted(set(p) - _PREDICT_KEYS - _UNSUPPORTED)
    if unknown:
        raise ProblemError(400, f"Unknown field(s): {', '.join(unknown)}.")
    strategy = p.get("strategy", "hybrid")
    if strategy != "hybrid":
        raise _unsupported(
            f"strategy '{strategy}' is not served; predictions are the snapshot's "
            "hybrid ranking (use /item/{id}/related for content or co-occurrence)."
        )
    context = p.get("context") or {}
    if not isinstance(context, dict):
        raise ProblemError(400, "Field 'context' must be an object.")
    user: dict[str, Any] = {}
    if p.get("user_id") is not None:
        user["user_id"] = p["user_id"]
    if context.get("session_id") is not None:
        user["session_id"] = context["session_id"]
    body: dict[str, Any] = {"user": user, "context": context}
    for src, dst in (("limit", "k"), ("surface", "surface"), ("experiment", "experiment")):
        if src in p:
            body[dst] = p[src]
    cands = {}
    if p.get("candidate_ids") is not None:
        cands["include_ids"] = p["candidate_ids"]
    if p.get("exclude_ids") is not None:
        cands["exclude_ids"] = p["exclude_ids"]
    if cands:
        body["candidates"] = cands
    if p.get("anchor_ids") is not None:
        body["anchors"] = {"item_ids": p["anchor_ids"]}
    constraints: dict[str, Any] = {}
    filters = p.get("filters") or {}
    if not isinstance(filters, dict):
        raise ProblemError(400, "Field 'filters' must be an object.")
    bad = sorted(set(filters) - set(_FILTER_KEYS))
    if bad:
        raise _unsupported(
            f"Filter(s) {', '.join(bad)} are not supported; use tags / "
            "exclude_tags (a tenant's catalogue tags such as category:shoes)."
        )
    for key, dst in _FILTER_KEYS.items():
        if key in filters:
            constraints[dst] = filters[key]
    div = p.get("diversity")
    if div is not None:
        if not isinstance(div, dict) or set(div) != {"max_per_tag"}:
            raise _unsupported(
                'diversity is supported as {"max_per_tag": {tag: cap}} (keys may '
                "be tags, brand:<b> or category:<c>)."
            )
        constraints["max_per_tag"] = div["max_per_tag"]
    if constraints:
        body["constraints"] = constraints
    options: dict[str, Any] = {"include_reasons": True}
    explain = p.get("explain", False)
    if not isinstance(explain, bool):
        raise ProblemError(400, "Field 'explain' must be a boolean.")
    if explain:
        options["explain"] = "full"
    if p.get("seed") is not None:
        options["seed"] = p["seed"]
    body["options"] = options
    shift = 0.0
    timeout = p.get("timeout_ms")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ProblemError(400, "Field 'timeout_ms' must be a positive number.")
        shift = max(0.0, deadline_ms - float(timeout)) / 1000.0  # only ever tightens
    flags = {
        "return_scores": p.get("return_scores", True),
        "explain": explain,
        "model": p.get("model"),
    }
    return body, shift, flags


class RuntimeResources:
    """Thin resources over `RecommendService` and the live snapshots of the caller's tenant."""

    required_scope = SCOPE_RECOMMEND

    def __init__(
        self, service: RecommendService, store: SnapshotRegistry, deadline_ms: float
    ) -> None:
        self._service = service
        self._store = store
        self._deadline_ms = deadline_ms

    # -- helpers
    def predict(self, req: falcon.Request, payload: Any) -> dict[str, Any]:
        body, shift, flags = to_recommend_body(payload, self._deadline_ms)
        result = self._service.recommend(
            req.context.principal.tenant, body, req.context.started - shift
        )
        meta = result["meta"]
        if shift:
            meta["timings_ms"]["total"] = round(meta["timings_ms"]["total"] - shift * 1000, 3)
        if flags["model"] is not None and flags["model"] != meta["algo_version"]:
            raise _unsupported(
                f"model '{flags['model']}' is not loaded; the live snapshot serves "
                f"'{meta['algo_version']}' (compare models with an experiment)."
            )
        items = []
        for it in result["items"]:
            out: dict[str, Any] = {"item_id": it["item_id"], "rank": it["rank"]}
            if flags["return_scores"]:
                out["score"] = it["score"]
            out["reason"] = (it.get("reasons") or [None])[0]
            if flags["explain"]:
                out["explain"] = it["explain"]
            items.append(out)
        return {
            "request_id": req.context.request_id,
            "model": meta["algo_version"],
            "items": items,
            "served_at": _now(),
            "meta": meta,
            "warnings": result["warnings"],
        }

    # -- routes
    def on_post_predict(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = self.predict(req, req.context.body)
        resp.cache_control = ["no-store"]

    def on_get_user(self, req: falcon.Request, resp: falcon.Response, user_id: str) -> None:
        if req.get_param_as_bool("fresh", default=False):
            raise _unsupported(
                "fresh=true cannot be honoured: top-N lists are precomputed per "
                "snapshot; a new snapshot is published by the pipeline."
            )
        payload: dict[str, Any] = {"user_id": user_id}
        limit = req.get_param_as_int("limit", min_value=1)
        if limit is not None:
            payload["limit"] = limit
        for name in ("strategy", "model"):
            if req.get_param(name) is not None:
                payload[name] = req.get_param(name)
        resp.media = self.predict(req, payload)

    def on_post_realtime(self, req: falcon.Request, resp: falcon.Response, user_id: str) -> None:
        payload = req.context.body
        if not isinstance(payload, dict):
            raise ProblemError(400, "The body must be an object.")
        if payload.get("user_id", user_id) != user_id:
            raise ProblemError(422, "user_id in the body differs from the URL.")
        resp.media = self.predict(req, {**payload, "user_id": user_id})
        resp.cache_control = ["no-store"]

    def on_post_batch(self, req: falcon.Request, resp: falcon.Response) -> None:
        payload = req.context.body
        reqs = payload.get("requests") if isinstance(payload, dict) else None
        if not isinstance(reqs, list) or not reqs:
            raise ProblemError(400, "Field 'requests' must be a non-empty array.")
        if len(reqs) > MAX_BATCH:
            raise ProblemError(413, f"{len(reqs)} requests; the limit is {MAX_BATCH}.")
        results = []
        for one in reqs:
            try:
                results.append({"status": 200, "result": self.predict(req, one)})
            except ProblemError as e:
                results.append(
                    {
                        "status": e.status_code,
                        "problem": {
                            "code": e.problem_code,
                            "detail": e.description,
                            "title": e.title,
                        },
                    }
                )
        resp.media = {"request_id": req.context.request_id, "results": results}

    def on_get_related(self, req: falcon.Request, resp: falcon.Response, item_id: str) -> None:
        strategy = req.get_param("strategy", default="blend")
        if strategy not in _RELATED:
            raise ProblemError(400, f"strategy must be one of {', '.join(_RELATED)}.")
        body: dict[str, Any] = {
            "item_id": item_id,
            "kind": _RELATED[strategy],
            "options": {"include_reasons": True},
        }
        limit = req.get_param_as_int("limit", min_value=1)
        if limit is not None:
            body["k"] = limit
        result = self._service.similar(req.context.principal.tenant, body, req.context.started)
        if strategy in ("co_view", "co_buy"):
            result["warnings"].append(
                {
                    "code": "COOCCURRENCE",
                    "detail": "co_view and co_buy share the snapshot's one "
                    "co-occurrence list (weighted by event type)",
                }
            )
        resp.media = {
            "item_id": item_id,
            "strategy": strategy,
            "items": [
                {"item_id": it["item_id"], "rank": it["rank"], "score": it["score"]}
                for it in result["items"]
            ],
            "meta": result["meta"],
            "warnings": result["warnings"],
        }

    def on_post_score(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Score a caller's candidates for a user with the snapshot's factors (dot product plus
        item bias); the user's precomputed signals are returned where the item is a candidate."""
        payload = req.context.body
        if not isinstance(payload, dict) or not isinstance(payload.get("user_id"), str):
            raise ProblemError(400, "Field 'user_id' (a string) is required.")
        cands = payload.get("candidates")
        if not isinstance(cands, list) or not cands or len(cands) > MAX_SCORE_CANDIDATES:
            raise ProblemError(400, f"Field 'candidates' must hold 1..{MAX_SCORE_CANDIDATES} ids.")
        ids = [c.get("item_id") if isinstance(c, dict) else c for c in cands]
        if not all(isinstance(i, str) for i in ids):
            raise ProblemError(400, 'Each candidate is an item id or {"item_id": ...}.')
        live = self._store.require_live(req.context.principal.tenant)
        snap = live.snap
        if not snap.has_factors:
            raise _unsupported("This snapshot stores no factors to score with.")
        uidx = snap.user_index(payload["user_id"])
        if uidx is None:
            raise ProblemError(
                404,
                f"User '{payload['user_id']}' is not in the snapshot.",
                code="RECSYS_UNKNOWN_USER",
            )
        uf = np.asarray(snap.user_factors(uidx), dtype=np.float32)
        idx = [snap.item_index(i) for i in ids]
        known = np.asarray([i for i in idx if i is not None], dtype=np.int64)
        scores = (
            np.asarray(snap.item_factors)[known] @ uf + np.asarray(snap.item_bias)[known]
            if known.size
            else np.zeros(0, dtype=np.float32)
        )
        by_item = dict(zip(known.tolist(), scores.tolist(), strict=True))
        out = [
            {
                "item_id": i,
                "score": round(float(by_item[x]), 6) if x is not None else None,
                "known": x is not None,
                "available": bool(live.available[x]) if x is not None else None,
            }
            for i, x in zip(ids, idx, strict=True)
        ]
        if payload.get("return_sorted", True):
            out.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
        resp.media = {
            "user_id": payload["user_id"],
            "items": out,
            "model": live.algo_version,
            "snapshot_id": live.snapshot_id,
        }

    def on_post_search(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Exact k-NN over the item factors (cosine or dot), with category/availability filters."""
        payload = req.context.body
        if not isinstance(payload, dict):
            raise ProblemError(400, "The body must be an object.")
        live = self._store.require_live(req.context.principal.tenant)
        snap = live.snap
        if not snap.has_factors:
            raise _unsupported("This snapshot stores no item factors to search.")
        factors = np.asarray(snap.item_factors, dtype=np.float32)
        exclude = None
        if payload.get("item_id") is not None:
            i = snap.item_index(payload["item_id"])
            if i is None:
                raise ProblemError(
                    404, f"Item '{payload['item_id']}' is unknown.", code="RECSYS_UNKNOWN_ITEM"
                )
            query, exclude = factors[i], i
        else:
            vec = payload.get("vector")
            if (
                not isinstance(vec, list)
                or len(vec) != factors.shape[1]
                or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vec)
            ):
                raise ProblemError(
                    422, f"Give 'item_id' or a 'vector' of {factors.shape[1]} numbers."
                )
            query = np.asarray(vec, dtype=np.float32)
        k = payload.get("k", 10)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise ProblemError(400, "Field 'k' must be an integer in 1..1000.")
        metric = payload.get("metric", "cosine")
        if metric not in ("cosine", "dot"):
            raise ProblemError(400, "Field 'metric' must be cosine or dot.")
        scores = factors @ query
        if metric == "cosine":
            norms = np.linalg.norm(factors, axis=1) * (np.linalg.norm(query) or 1.0)
            scores = np.divide(scores, norms, out=np.zeros_like(scores), where=norms > 0)
        mask = np.ones(len(scores), dtype=bool)
        filters = payload.get("filters") or {}
        if not isinstance(filters, dict) or set(filters) - {"category", "available"}:
            raise _unsupported("filters supports 'category' and 'available'.")
        if "category" in filters:
            cid = snap.category_index(filters["category"])
            mask &= live.category_id == (cid if cid is not None else -2)
        if filters.get("available") is not None:
            mask &= live.available == bool(filters["available"])
        if exclude is not None:
            mask[exclude] = False
        cand = np.flatnonzero(mask)
        top = cand[np.argsort(-scores[cand], kind="stable")[:k]]
        resp.media = {
            "metric": metric,
            "items": [
                {"id": f"item:{iid}", "item_id": iid, "score": round(float(scores[j]), 6)}
                for j, iid in zip(top.tolist(), live.item_ids(top.tolist()), strict=True)
            ],
            "snapshot_id": live.snapshot_id,
        }

    def on_get_embedding(
        self, req: falcon.Request, resp: falcon.Response, embedding_id: str
    ) -> None:
        kind, _, key = embedding_id.partition(":")
        if kind not in ("item", "user") or not key:
            raise ProblemError(400, "An embedding id is item:<item_id> or user:<user_id>.")
        live = self._store.require_live(req.context.principal.tenant)
        snap = live.snap
        if not snap.has_factors:
            raise ProblemError(404, "This snapshot stores no factors.", code="RECSYS_NOT_FOUND")
        idx = snap.item_index(key) if kind == "item" else snap.user_index(key)
        if idx is None:
            raise ProblemError(404, f"No {kind} '{key}' in the snapshot.", code="RECSYS_NOT_FOUND")
        vec = snap.item_factors[idx] if kind == "item" else snap.user_factors(idx)
        resp.media = {
            "id": embedding_id,
            "dim": int(len(vec)),
            "vector": [round(float(v), 7) for v in vec],
            "snapshot_id": live.snapshot_id,
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

"""The /v1/recs runtime routes, answered by the serving engineer's `RecommendService` (rules,
filters, experiments, deadlines) and the live snapshot's stored factors:

POST /v1/recs/predict, GET /v1/recs/users/{user_id}, POST /v1/recs/users/{user_id}/realtime,
POST /v1/recs/batch/predict, GET /v1/recs/item/{item_id}/related, POST /v1/recs/score,
POST /v1/recs/embeddings/search, GET /v1/recs/embeddings/{embedding_id}.

Options the engine cannot honour are refused with 422 RECSYS_UNSUPPORTED_OPTION (never ignored).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import falcon
import msgspec
import numpy as np

from serving import schemas as s
from serving.auth import SCOPE_RECOMMEND
from serving.errors import ProblemError
from serving.recs.schemas import (
    Candidate,
    PredictFilters,
    PredictRequest,
    RelatedQuery,
    ScoreRequest,
    SearchFilters,
    SearchRequest,
    UserQuery,
)
from serving.routing import check
from serving.service import RecommendService
from serving.snapshot import SnapshotRegistry

_RELATED = {"co_view": "cooc", "co_buy": "cooc", "content": "emb", "blend": "blend"}


def _unsupported(detail: str) -> ProblemError:
    return ProblemError(422, detail, code="RECSYS_UNSUPPORTED_OPTION")


def to_recommend_request(p: PredictRequest) -> s.RecommendRequest:
    """A /v1/recs predict body as the /v1/recommend request it stands for; 422 for the
    options the engine cannot honour."""
    refused = p.refused()
    if refused:
        raise _unsupported(
            f"Option(s) {', '.join(refused)} cannot be honoured: recommendations "
            "come from a precomputed snapshot without those signals."
        )
    if p.strategy != "hybrid":
        raise _unsupported(
            f"strategy '{p.strategy}' is not served; predictions are the snapshot's "
            "hybrid ranking (use /item/{id}/related for content or co-occurrence)."
        )
    context = p.context or {}
    session_id = check(context.get("session_id"), s.Id | None, "body field 'context.session_id'")
    cands = None
    if p.candidate_ids is not None or p.exclude_ids is not None:
        cands = s.Candidates(include_ids=p.candidate_ids, exclude_ids=p.exclude_ids or [])
    constraints = None
    if p.filters is not None or p.diversity is not None:
        f = p.filters or PredictFilters()
        constraints = s.Constraints(
            required_tags=f.tags,
            forbidden_tags=f.exclude_tags,
            max_per_tag=p.diversity.max_per_tag if p.diversity is not None else {},
        )
    return s.RecommendRequest(
        user=s.User(user_id=p.user_id, session_id=session_id),
        context=context,
        k=p.limit,
        surface=p.surface,
        experiment=p.experiment,
        candidates=cands,
        anchors=s.Anchors(item_ids=p.anchor_ids) if p.anchor_ids is not None else None,
        constraints=constraints,
        options=s.Options(
            include_reasons=True, explain="full" if p.explain else "none", seed=p.seed
        ),
    )


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
    def predict(self, req: falcon.Request, p: PredictRequest) -> dict[str, Any]:
        body = to_recommend_request(p)
        shift = 0.0
        if p.timeout_ms is not None:  # only ever tightens the deadline
            shift = max(0.0, self._deadline_ms - p.timeout_ms) / 1000.0
        result = self._service.recommend(
            req.context.principal.tenant, body, req.context.started - shift
        )
        meta = result["meta"]
        meta["request_id"] = req.context.request_id
        if shift:
            meta["timings_ms"]["total"] = round(meta["timings_ms"]["total"] - shift * 1000, 3)
        if p.model is not None and p.model != meta["algo_version"]:
            raise _unsupported(
                f"model '{p.model}' is not loaded; the live snapshot serves "
                f"'{meta['algo_version']}' (compare models with an experiment)."
            )
        items = []
        for it in result["items"]:
            out: dict[str, Any] = {"item_id": it["item_id"], "rank": it["rank"]}
            if p.return_scores:
                out["score"] = it["score"]
            out["reason"] = (it.get("reasons") or [None])[0]
            if p.explain:
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
        query: UserQuery = req.context.query
        if query.fresh:
            raise _unsupported(
                "fresh=true cannot be honoured: top-N lists are precomputed per "
                "snapshot; a new snapshot is published by the pipeline."
            )
        payload = PredictRequest(
            user_id=user_id,
            limit=query.limit,
            strategy=query.strategy or "hybrid",
            model=query.model,
        )
        resp.media = self.predict(req, payload)

    def on_post_realtime(self, req: falcon.Request, resp: falcon.Response, user_id: str) -> None:
        payload: PredictRequest = req.context.body
        if payload.user_id is not None and payload.user_id != user_id:
            raise ProblemError(422, "user_id in the body differs from the URL.")
        resp.media = self.predict(req, msgspec.structs.replace(payload, user_id=user_id))
        resp.cache_control = ["no-store"]

    def on_post_batch(self, req: falcon.Request, resp: falcon.Response) -> None:
        results = []
        for one in req.context.body.requests:
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
        query: RelatedQuery = req.context.query
        strategy = query.strategy
        models = getattr(self._store, "content", None)
        model = models.get(req.context.principal.tenant) if models is not None else None
        if strategy == "content" and model is not None:
            self._content_related(req, resp, item_id, model)
            return
        body = s.SimilarRequest(
            item_id=item_id,
            kind=_RELATED[strategy],
            k=query.limit,
            options=s.Options(include_reasons=True),
        )
        result = self._service.similar(req.context.principal.tenant, body, req.context.started)
        result["meta"]["request_id"] = req.context.request_id
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

    def _content_related(self, req, resp, item_id: str, model) -> None:
        """Content neighbours (`recsys.content`: TF-IDF + SVD of the item texts, fitted by the
        pipeline): any catalogue item, one with no events too; unavailable items (the
        overlaid snapshot's) are left out."""
        from recsys.content import neighbours

        tenant = req.context.principal.tenant
        started = req.context.started
        row = model.row_of.get(item_id)
        if row is None:
            raise ProblemError(
                404, f"No item '{item_id}' in the content model.", code="RECSYS_UNKNOWN_ITEM"
            )
        live = self._store.require_live(tenant)
        k = req.context.query.limit or 10
        rows, scores = neighbours(model, model.item_vectors[row], k + 50, exclude=row)
        items = []
        for r, sc in zip(rows.tolist(), scores.tolist(), strict=True):
            other = model.item_ids[r]
            idx = live.item_index(other)
            if idx is not None and not live.available[idx]:
                continue
            items.append({"item_id": other, "rank": len(items) + 1, "score": round(sc, 6)})
            if len(items) == k:
                break
        resp.media = {
            "item_id": item_id,
            "strategy": "content",
            "items": items,
            "meta": {
                "tenant_id": tenant,
                "surface": "related",
                "segment": "default",
                "algo_version": f"content@{model.version}",
                "snapshot_id": live.snapshot_id,
                "config_version": None,
                "rules_version": None,
                "request_id": req.context.request_id,
                "timings_ms": {"total": round((time.perf_counter() - started) * 1e3, 3)},
                "counts": {"candidates": len(rows), "returned": len(items)},
            },
            "warnings": [],
        }

    def on_post_score(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Score a caller's candidates for a user with the snapshot's factors (dot product plus
        item bias); the user's precomputed signals are returned where the item is a candidate."""
        payload: ScoreRequest = req.context.body
        ids = candidate_ids(payload.candidates)
        live = self._store.require_live(req.context.principal.tenant)
        snap = live.snap
        if payload.model is not None and payload.model != live.algo_version:
            raise _unsupported(
                f"model '{payload.model}' is not loaded; the live snapshot serves "
                f"'{live.algo_version}'."
            )
        if not snap.has_factors:
            raise _unsupported("This snapshot stores no factors to score with.")
        uidx = snap.user_index(payload.user_id)
        if uidx is None:
            raise ProblemError(
                404,
                f"User '{payload.user_id}' is not in the snapshot.",
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
        if payload.return_sorted:
            out.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0)))
        resp.media = {
            "user_id": payload.user_id,
            "items": out,
            "model": live.algo_version,
            "snapshot_id": live.snapshot_id,
        }

    def on_post_search(self, req: falcon.Request, resp: falcon.Response) -> None:
        """k-NN over the item factors (cosine or dot; exact), with category, brand, availability
        and tag filters (the overlaid snapshot's: upserts count); or over a client index
        (`index`: serving.control.embeddings, exact up to 50k vectors, faiss IVF beyond)."""
        payload: SearchRequest = req.context.body
        if payload.index not in (None, "items"):
            self._search_index(req, resp, payload)
            return
        live = self._store.require_live(req.context.principal.tenant)
        snap = live.snap
        if not snap.has_factors:
            raise _unsupported("This snapshot stores no item factors to search.")
        factors = np.asarray(snap.item_factors, dtype=np.float32)
        exclude = None
        if payload.item_id is not None:
            i = snap.item_index(payload.item_id)
            if i is None:
                raise ProblemError(
                    404, f"Item '{payload.item_id}' is unknown.", code="RECSYS_UNKNOWN_ITEM"
                )
            query, exclude = factors[i], i
        else:
            vec = payload.vector
            if vec is None or len(vec) != factors.shape[1]:
                raise ProblemError(
                    422, f"Give 'item_id' or a 'vector' of {factors.shape[1]} numbers."
                )
            query = np.asarray(vec, dtype=np.float32)
        k, metric = payload.k, payload.metric
        scores = factors @ query
        if metric == "cosine":
            norms = np.linalg.norm(factors, axis=1) * (np.linalg.norm(query) or 1.0)
            scores = np.divide(scores, norms, out=np.zeros_like(scores), where=norms > 0)
        mask = np.ones(len(scores), dtype=bool)
        filters = payload.filters or SearchFilters()
        if filters.category is not None:
            cid = snap.category_index(filters.category)
            mask &= live.category_id == (cid if cid is not None else -2)
        if filters.brand is not None:
            bid = snap.brand_index(filters.brand)
            mask &= live.brand_id == (bid if bid is not None else -2)
        if filters.available is not None:
            mask &= live.available == filters.available
        all_items = None
        for tag in filters.tags or ():
            tid = snap.tag_id(tag)
            if tid is None:
                mask[:] = False
                break
            if all_items is None:
                all_items = np.arange(len(mask), dtype=np.int32)
            mask &= live.tag_hits(all_items, tid)
        if filters.metadata:
            raise ProblemError(
                422,
                "Metadata filters apply to client indexes; filter item factors by category, "
                "brand, available or tags.",
            )
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

    def _search_index(self, req: falcon.Request, resp: falcon.Response, payload) -> None:
        """Search the snapshot's user factors (`index: users`) or a client index."""
        tenant = req.context.principal.tenant
        filters = payload.filters or SearchFilters()
        if payload.index == "users":
            live = self._store.require_live(tenant)
            snap = live.snap
            if not snap.has_factors or payload.vector is None:
                raise ProblemError(422, "Search users with a 'vector' of the factors' dimension.")
            factors = np.asarray(snap.user_factor_matrix, dtype=np.float32)
            if len(payload.vector) != factors.shape[1]:
                raise ProblemError(422, f"The user factors have {factors.shape[1]} numbers.")
            q = np.asarray(payload.vector, dtype=np.float32)
            scores = factors @ q
            if payload.metric == "cosine":
                norms = np.linalg.norm(factors, axis=1) * (np.linalg.norm(q) or 1.0)
                scores = np.divide(scores, norms, out=np.zeros_like(scores), where=norms > 0)
            top = np.argsort(-scores, kind="stable")[: payload.k]
            resp.media = {
                "metric": payload.metric,
                "index": "users",
                "items": [
                    {"id": f"user:{u}", "item_id": u, "score": round(float(scores[j]), 6)}
                    for j, u in zip(top.tolist(), map(snap.user_id, top.tolist()), strict=True)
                ],
                "snapshot_id": live.snapshot_id,
            }
            return
        if payload.index == "content":  # (the content model's item vectors, read-only)
            models = getattr(self._store, "content", None)
            loaded = models.loaded(tenant) if models is not None else None
        else:
            vectors = getattr(self._store, "vectors", None)
            loaded = vectors.loaded(tenant, payload.index) if vectors is not None else None
        index = loaded.index if loaded is not None else None
        if index is None:
            raise ProblemError(404, f"No index '{payload.index}'.", code="RECSYS_UNKNOWN_INDEX")
        exclude = None
        if payload.item_id is not None:
            found = index.get(payload.item_id) or index.get(f"item:{payload.item_id}")
            if found is None:
                raise ProblemError(
                    404,
                    f"No vector '{payload.item_id}' in index '{payload.index}'.",
                    code="RECSYS_NOT_FOUND",
                )
            query = found[0]
            exclude = index.row_of.get(payload.item_id, index.row_of.get(f"item:{payload.item_id}"))
        elif payload.vector is None or len(payload.vector) != index.dim:
            raise ProblemError(
                422,
                f"Give 'item_id' or a 'vector' of {index.dim} numbers (index '{payload.index}').",
                code="RECSYS_INVALID_VECTOR",
                extra={"reason": "wrong_dimension"},
            )
        else:
            query = np.asarray(payload.vector, dtype=np.float32)
        wanted: dict[str, Any] = dict(filters.metadata or {})
        for key in ("category", "brand", "available"):
            if getattr(filters, key) is not None:
                wanted[key] = getattr(filters, key)
        if filters.tags:
            wanted["tags"] = list(filters.tags)
        allow = loaded.allow(wanted)
        if exclude is not None:
            allow = np.ones(index.rows, dtype=bool) if allow is None else allow.copy()
            allow[exclude] = False
        try:
            rows, scores = index.search(query, payload.k, allow)
        except ValueError as e:
            raise ProblemError(
                422, str(e), code="RECSYS_INVALID_VECTOR", extra={"reason": "bad_vector"}
            ) from None
        items = []
        for r, sc in zip(rows.tolist(), scores.tolist(), strict=True):
            key = index.ids[r]
            items.append(
                {
                    "id": key,
                    "item_id": key.split(":", 1)[1] if key.startswith(("item:", "user:")) else key,
                    "score": round(float(sc), 6),
                    "metadata": index.metadata[r],
                }
            )
        resp.media = {
            "metric": index.metric,
            "index": payload.index,
            "items": items,
            "snapshot_id": None,
            "approximate": index.approximate,
        }

    def on_get_embedding(
        self, req: falcon.Request, resp: falcon.Response, embedding_id: str
    ) -> None:
        kind, _, key = embedding_id.partition(":")  # (the route's pattern: item:... / user:...)
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


def candidate_ids(candidates: list[str | Candidate]) -> list[str]:
    """The item ids of a candidate list (ids, or {item_id} objects)."""
    return [c if type(c) is str else c.item_id for c in candidates]


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

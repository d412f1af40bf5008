"""POST /v1/recs/rerank and POST /v1/recs/explain, on the serving engine (`serving.rules`).

rerank: order a caller's candidates for a user. Base scores, the first that applies:
  ``weights`` (in the body, else the tenant's default weights) x the user's stored signals;
  the snapshot's factors (user . item + bias); the user's stored candidate scores; the
  ``popular`` fallback score. Candidates without a score get 0 and keep the caller's order
  among themselves. Then the tenant's business rules (boost / bury / block; a pin only when
  its item is among the candidates) and the request's filters run through `Engine.run`, the
  same code as /v1/recommend. Candidates the rules or filters remove are listed in `excluded`.

explain: why an item is (or is not) recommended to a user: its stored signals and their
  weighted contributions, the factor score, and what the full /v1/recommend pipeline did with
  it (rank, or the filter / rule that removed it).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import falcon
import numpy as np

from recsys.snapshot.format import REASONS, SIGNALS
from serving import schemas
from serving.auth import SCOPE_RECOMMEND
from serving.errors import ProblemError
from serving.recs.runtime import candidate_ids
from serving.recs.schemas import ExplainRequest, RerankRequest
from serving.rules import CompiledRules, Engine, Pool
from serving.service import RecommendService
from serving.snapshot import LiveSnapshot, SnapshotRegistry
from serving.validation import DEFAULT_SEGMENT


class RerankExplainResources:
    required_scope = SCOPE_RECOMMEND

    def __init__(
        self,
        service: RecommendService,
        store: SnapshotRegistry,
        deadline_ms: float,
    ) -> None:
        self._service = service
        self._store = store
        self._deadline_s = deadline_ms / 1000.0

    # -- rerank
    def on_post_rerank(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        p: RerankRequest = req.context.body
        ids = list(dict.fromkeys(candidate_ids(p.candidates)))
        user_id = p.user_id
        filters = p.filters
        body = schemas.RecommendRequest(
            user=schemas.User(user_id=user_id)
            if user_id is not None
            else schemas.User(anonymous_id="rerank"),
            surface=p.surface,
            segment=p.segment,
            weights=p.weights,
            k=p.limit if p.limit is not None else min(len(ids), self._service.limits(tenant).max_k),
            constraints=schemas.Constraints(
                required_tags=filters.tags, forbidden_tags=filters.exclude_tags
            )
            if filters is not None
            else None,
            options=schemas.Options(include_reasons=True, explain="full", include_trace=True),
        )
        rq, warnings, tconf, _ = self._service.parse(tenant, body)
        live = self._store.require_live(tenant)
        snap = live.snap
        uidx = snap.user_index(user_id) if user_id is not None else None
        idx = [live.item_index(i) for i in ids]
        unknown_ids = [i for i, x in zip(ids, idx, strict=True) if x is None]
        items = np.asarray([x for x in idx if x is not None], dtype=np.int32)
        weights = (
            rq.weights if rq.weights is not None else (tconf.get("defaults") or {}).get("weights")
        )
        scores, signals, reasons, scored_by = self._base_scores(live, uidx, items, weights)
        segment = rq.segment or (
            (snap.user_segment(uidx) if uidx is not None else None) or DEFAULT_SEGMENT
        )
        if p.business_rules:
            # the same rules as /v1/recommend: the tenant's, its policies', invalidated items
            rules, _ = self._service.rules(tenant, live, rq.surface, segment)
            in_list = set(items.tolist())
            rules = dataclasses.replace(rules, pins=[x for x in rules.pins if x.item in in_list])
        else:
            rules = CompiledRules()
        seen = (
            np.asarray(snap.user_seen(uidx))
            if uidx is not None and p.exclude_seen
            else np.zeros(0, dtype=np.int32)
        )
        started = req.context.started
        engine = Engine(live, rq, rules, started + self._deadline_s, warnings)
        pool = Pool(items, scores, signals, reasons, "rerank")
        ranked = engine.run(pool, seen, None, [])
        out_items = []
        for rank, (item_id, score) in enumerate(
            zip(live.item_ids(ranked.items), ranked.scores, strict=True), start=1
        ):
            entry: dict[str, Any] = {"item_id": item_id, "rank": rank, "score": score}
            if p.explain:
                entry["explain"] = ranked.explanation(rank - 1)
            out_items.append(entry)
        excluded = [
            {"item_id": t["item_id"], "outcome": t["outcome"], "rule": t.get("rule")}
            for t in (ranked.trace or [])
            if t["outcome"] in ("excluded", "capped", "below_k")
        ]
        excluded += [{"item_id": i, "outcome": "unknown", "rule": None} for i in unknown_ids]
        if unknown_ids:
            warnings.append(
                {"code": "UNKNOWN_ITEM", "detail": f"{len(unknown_ids)} candidate(s) unknown"}
            )
        resp.media = {
            "user_id": user_id,
            "items": out_items,
            "excluded": excluded,
            "meta": {
                "tenant_id": tenant,
                "surface": rq.surface,
                "segment": segment,
                "scored_by": scored_by,
                "snapshot_id": live.snapshot_id,
                "algo_version": live.algo_version,
                "counts": ranked.counts,
                "request_id": req.context.request_id,
            },
            "warnings": warnings,
        }
        resp.cache_control = ["no-store"]

    @staticmethod
    def _base_scores(live: LiveSnapshot, uidx: int | None, items: np.ndarray, weights):
        snap = live.snap
        n = items.shape[0]
        signals = np.zeros((n, len(SIGNALS)), dtype=np.float32)
        reasons = np.full(n, 0, dtype=np.uint8)
        stored = np.full(n, np.nan, dtype=np.float32)
        if uidx is not None and n:
            c_items, c_score, c_signals, c_reason = snap.user_candidates(uidx)
            pos = {int(it): j for j, it in enumerate(np.asarray(c_items).tolist())}
            for row, it in enumerate(items.tolist()):
                j = pos.get(it)
                if j is not None:
                    stored[row] = c_score[j]
                    signals[row] = c_signals[j]
                    reasons[row] = c_reason[j]
        if weights:
            w = np.asarray([float(weights.get(s, 0.0)) for s in SIGNALS], dtype=np.float32)
            return (signals @ w).astype(np.float32), signals, reasons, "weights"
        if uidx is not None and snap.has_factors and n:
            uf = np.asarray(snap.user_factors(uidx), dtype=np.float32)
            scores = np.asarray(snap.item_factors)[items] @ uf + np.asarray(snap.item_bias)[items]
            return scores.astype(np.float32), signals, reasons, "factors"
        if uidx is not None and not np.isnan(stored).all():
            return np.nan_to_num(stored, nan=0.0), signals, reasons, "candidates"
        scores = np.zeros(n, dtype=np.float32)
        fb = snap.fallback("popular")
        if fb is not None and n:
            pop = dict(zip(np.asarray(fb[0]).tolist(), np.asarray(fb[1]).tolist(), strict=True))
            scores = np.asarray([pop.get(i, 0.0) for i in items.tolist()], dtype=np.float32)
        return scores, signals, np.full(n, 1, dtype=np.uint8), "popularity"

    # -- explain
    def on_post_explain(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        p: ExplainRequest = req.context.body
        user_id, item_id = p.user_id, p.item_id
        live = self._store.require_live(tenant)
        snap = live.snap
        if p.model is not None and p.model != live.algo_version:
            raise ProblemError(
                422,
                f"model '{p.model}' is not loaded; the live snapshot serves '{live.algo_version}'.",
                code="RECSYS_UNSUPPORTED_OPTION",
            )
        iidx = live.item_index(item_id)
        if iidx is None:
            raise ProblemError(
                404, f"Item '{item_id}' is not in the catalogue.", code="RECSYS_UNKNOWN_ITEM"
            )
        uidx = snap.user_index(user_id)
        tconf, _ = self._service.tenant_config(tenant)
        weights = (tconf.get("defaults") or {}).get("weights")
        out: dict[str, Any] = {
            "user_id": user_id,
            "item_id": item_id,
            "known_user": uidx is not None,
            "model": live.algo_version,
            "snapshot_id": live.snapshot_id,
            "item": {
                "available": bool(live.available[iidx]),
                "category": snap.category_name(int(live.category_id[iidx]))
                if live.category_id[iidx] >= 0
                else None,
                "tags": [snap.tag_name(t) for t in np.asarray(snap.item_tags(iidx)).tolist()],
            },
        }
        candidate = None
        if uidx is not None:
            c_items, c_score, c_signals, c_reason = snap.user_candidates(uidx)
            hits = np.flatnonzero(np.asarray(c_items) == iidx)
            if hits.size:
                j = int(hits[0])
                sig = dict(zip(SIGNALS, (round(float(v), 6) for v in c_signals[j]), strict=True))
                candidate = {
                    "precomputed_rank": j + 1,
                    "score": round(float(c_score[j]), 6),
                    "reason": REASONS.get(int(c_reason[j]), REASONS[0]),
                    "signals": sig,
                    "contributions": {
                        s: round(float(weights.get(s, 0.0)) * v, 6) for s, v in sig.items()
                    }
                    if weights
                    else sig,
                    "contributions_from": "tenant default weights x signals"
                    if weights
                    else "stored signal parts of the precomputed score",
                }
            out["seen"] = bool(np.isin(iidx, np.asarray(snap.user_seen(uidx))))
            if snap.has_factors:
                uf = np.asarray(snap.user_factors(uidx), dtype=np.float32)
                dot = float(np.asarray(snap.item_factors)[iidx] @ uf)
                bias = float(np.asarray(snap.item_bias)[iidx])
                out["factors"] = {
                    "dot": round(dot, 6),
                    "bias": round(bias, 6),
                    "score": round(dot + bias, 6),
                }
        out["candidate"] = candidate
        # What the whole /v1/recommend pipeline does with the item, for this user and surface.
        body = schemas.RecommendRequest(
            user=schemas.User(user_id=user_id),
            k=self._service.limits(tenant).max_k,
            surface=p.surface,
            segment=p.segment,
            context=p.context,
            options=schemas.Options(explain="full", include_trace=True, include_reasons=True),
        )
        result = self._service.recommend(tenant, body, time.perf_counter())
        pipeline: dict[str, Any] = {"outcome": "not_a_candidate", "rank": None, "rules": []}
        for it in result["items"]:
            if it["item_id"] == item_id:
                pipeline = {
                    "outcome": "recommended",
                    "rank": it["rank"],
                    "score": it["score"],
                    "reasons": it.get("reasons", []),
                    "rules": it["explain"]["rules"],
                }
                break
        else:
            for t in result.get("trace") or ():
                if t["item_id"] == item_id:
                    pipeline = {
                        "outcome": t["outcome"],
                        "rank": None,
                        "rank_before_postrank": t.get("rank_before_postrank"),
                        "rules": [t["rule"]] if t.get("rule") else [],
                    }
                    break
        pipeline["surface"] = result["meta"]["surface"]
        pipeline["segment"] = result["meta"]["segment"]
        if "experiment" in result["meta"]:
            pipeline["experiment"] = result["meta"]["experiment"]
        out["pipeline"] = pipeline
        out["warnings"] = result["warnings"]
        resp.media = out
        resp.cache_control = ["no-store"]

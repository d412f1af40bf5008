"""Control plane: candidate generators, declared pipelines, simulation before deploy, model
checks and exploration bandits.

``POST /v1/recs/candidates/generate`` asks one generator of the live snapshot for a user's (or
anchors') candidates; ``GET /v1/recs/candidates/{generator}/status`` says how much of the
catalogue and of the users it covers, and how old it is. What each generator maps to in the
snapshot, the stages of a pipeline and how they chain: `serving.pipelines_engine`.

``/v1/recs/pipelines`` (POST, GET) and ``/v1/recs/pipelines/{pipeline_id}`` (GET, PATCH,
DELETE) hold declared pipelines, a versioned document each (collection ``pipelines`` of
``ctx.documents``; ETag = revision, If-Match on changes), checked at write time (422 naming the
stage that is wrong). ``POST /v1/recs/pipelines/{pipeline_id}/run`` runs one for a user and
context and returns every stage's output.

``POST /v1/recs/simulate`` replays rules, a pipeline or an experiment's variants over the last
evaluation's holdout and ``POST /v1/recs/health/check-model`` checks the live model, a model
version or a pipeline on sample payloads: both in `serving.simulation` (over `recsys.simulate`).

``POST /v1/recs/exploration/bandit`` configures a bandit (a versioned document of
``ctx.documents``, collection ``bandits``) and/or asks it which arm a unit gets;
``GET /v1/recs/exploration/bandit?bandit_id=`` shows its state. A bandit's arms are the
variants of an experiment (``experiment_id``) or free names competing for an exploration slot
of a surface's lists (``slot``, ``surface``, and a ``fill`` per arm: an item or a generator).
The state these routes show is counted from the event log on each call
(`serving.bandit_routing.count_bandit`: impressions tagged with the arm, clicks and purchases
attributed to them by request id and item), so every worker answers alike; the policy math is
`recsys.bandits` (numpy, no Falcon). A bandit also routes /v1/recommend traffic (unless
``route`` is false): `serving.bandit_routing.BanditRouter`, installed here on the experiments
store and the recommend service, reads counts cached on the bandit's ``refresh_s``.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Annotated, Any, Literal

import falcon
import msgspec
import numpy as np
import orjson
from msgspec import Meta

from recsys import bandits
from recsys.simulate import SimulationError
from serving import pipelines_engine as engine
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.bandit_routing import DEFAULT_REFRESH_S, BanditRouter, count_bandit
from serving.control.dagster import client_for
from serving.control.jobs import BY_TAG, DEST_TAG, TENANT_TAG, TYPE_TAG
from serving.documents import DOCUMENT_ID, Preconditions, set_etag
from serving.errors import ProblemError
from serving.routing import Route
from serving.schemas import MAX_ANCHORS, Id, IdList
from serving.simulation import Simulator, check_model
from serving.validation import DEFAULT_SURFACE

DocId = Annotated[str, Meta(pattern=DOCUMENT_ID.pattern, description="a document id")]
ArmName = Annotated[str, Meta(pattern=DOCUMENT_ID.pattern, description="an arm name")]
Unit = Annotated[str, Meta(min_length=1, max_length=256)]


# --- bandits: schemas ---------------------------------------------------------------------------
class SlotFill(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What an arm of a slot bandit puts in the slot: one item, or the best candidate of a
    generator that the list does not hold yet (give exactly one)."""

    item_id: Id | None = None
    generator: Literal["popularity", "collab", "content", "graph", "embedding"] | None = None


class BanditRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Configure a bandit (when `policy` is given: creates it, or replaces it with If-Match)
    and/or choose an arm for `unit` (when given)."""

    bandit_id: DocId
    policy: Literal["epsilon_greedy", "ucb1", "thompson"] | None = None
    arms: Annotated[list[ArmName], Meta(min_length=2, max_length=50)] | None = None
    experiment_id: DocId | None = None
    slot: Annotated[int, Meta(ge=1, le=500)] | None = None
    surface: Annotated[Id, Meta(description="the slot's surface (default: default)")] | None = None
    fill: (
        Annotated[
            dict[ArmName, SlotFill],
            Meta(description="what each arm puts in the slot (a slot bandit routes with it)"),
        ]
        | None
    ) = None
    route: Annotated[
        bool, Meta(description="route /v1/recommend traffic (false: query it only)")
    ] = True
    refresh_s: Annotated[
        float,
        Meta(ge=0.1, le=3600.0, description="how often routing re-counts the arms (seconds)"),
    ] = DEFAULT_REFRESH_S
    epsilon: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.1
    seed: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0
    reward_events: Annotated[
        list[Literal["click", "purchase", "add_to_cart", "like"]], Meta(min_length=1)
    ] = msgspec.field(default_factory=lambda: ["click", "purchase"])
    unit: Unit | None = None


class BanditQuery(msgspec.Struct, forbid_unknown_fields=True):
    bandit_id: DocId


class ArmState(msgspec.Struct):
    arm: str
    pulls: int
    rewards: int
    mean: float | None
    ucb1: float | None  # None: never pulled (infinite bound)
    alpha: float
    beta: float
    prob_best: float
    share: float


class Chosen(msgspec.Struct):
    unit: str
    arm: str


class BanditState(msgspec.Struct):
    bandit_id: str
    policy: str
    over: dict[str, Any]
    seed: int
    epsilon: float
    reward_events: list[str]
    route: bool
    refresh_s: float
    fill: dict[str, SlotFill] | None
    revision: str
    arms: list[ArmState]
    total_pulls: int
    best_arm: str | None
    allocation: list[dict[str, Any]]
    left_out: dict[str, int]
    chosen: Chosen | None = None


BANDIT_ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/recs/exploration/bandit",
        ("bandits", "on_post"),
        "Configure a bandit (epsilon-greedy, UCB1, Thompson sampling over experiment variants "
        "or an exploration slot) and/or choose an arm for a unit, deterministic given its seed",
        SCOPE_ADMIN,
        body=BanditRequest,
        response=BanditState,
        also=(201,),
        errors=(404, 409, 412, 422),
        headers=("If-Match",),
        tags=("exploration",),
    ),
    Route(
        "GET",
        "/v1/recs/exploration/bandit",
        ("bandits", "on_get"),
        "A bandit's state: per-arm pulls, rewards, posterior and bounds, allocation over time",
        SCOPE_RECOMMEND,
        query=BanditQuery,
        response=BanditState,
        errors=(404,),
        tags=("exploration",),
    ),
)


# --- bandits: resource --------------------------------------------------------------------------
class BanditsResource:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._docs = ctx.documents.collection(
            "bandits", prefix="bandit", missing_code="RECSYS_UNKNOWN_BANDIT"
        )
        # (the hot path's view of the bandits: the experiments store and the recommend service
        # ask it which bandit routes a request; serving.bandit_routing)
        self.router = BanditRouter(self._docs, ctx.event_logs, ctx.config.data_root)
        ctx.experiments.bandits = self.router
        ctx.service.bandits = self.router

    def _spec(self, tenant: str, body: BanditRequest) -> dict[str, Any]:
        if (body.experiment_id is None) == (body.slot is None):
            raise ProblemError(
                422,
                "A bandit runs over an experiment's variants (experiment_id) or an "
                "exploration slot (slot): give exactly one.",
                code="RECSYS_INVALID_BANDIT",
            )
        if body.experiment_id is not None and (body.surface or body.fill):
            raise ProblemError(
                422,
                "surface and fill belong to a slot bandit; a bandit over an experiment serves "
                "the experiment's surface and variants.",
                code="RECSYS_INVALID_BANDIT",
            )
        arms = body.arms
        if body.experiment_id is not None:
            exp = self._ctx.experiments.read(tenant, body.experiment_id)
            if exp is None:
                raise ProblemError(
                    422,
                    f"No experiment '{body.experiment_id}'.",
                    code="RECSYS_UNKNOWN_EXPERIMENT",
                )
            variants = [v["id"] for v in exp["variants"]]
            if arms is None:
                arms = variants
            elif not set(arms) <= set(variants):
                raise ProblemError(
                    422,
                    f"Arms {sorted(set(arms) - set(variants))} are not variants of experiment "
                    f"'{body.experiment_id}' ({', '.join(variants)}).",
                    code="RECSYS_INVALID_BANDIT",
                )
        if arms is None or len(arms) < 2:
            raise ProblemError(
                422, "A bandit needs at least two arms.", code="RECSYS_INVALID_BANDIT"
            )
        if len(set(arms)) != len(arms):
            raise ProblemError(422, "Arm names repeat.", code="RECSYS_INVALID_BANDIT")
        fill = None
        if body.fill is not None:
            if set(body.fill) != set(arms):
                raise ProblemError(
                    422,
                    f"fill needs exactly one entry per arm ({', '.join(arms)}).",
                    code="RECSYS_INVALID_BANDIT",
                )
            for arm, f in body.fill.items():
                if (f.item_id is None) == (f.generator is None):
                    raise ProblemError(
                        422,
                        f"fill of arm '{arm}' names an item_id or a generator: exactly one.",
                        code="RECSYS_INVALID_BANDIT",
                    )
            fill = {arm: msgspec.to_builtins(body.fill[arm]) for arm in arms}
        over = (
            {"experiment_id": body.experiment_id}
            if body.experiment_id is not None
            else {"slot": body.slot, "surface": body.surface or DEFAULT_SURFACE}
        )
        return {
            "policy": body.policy,
            "arms": list(arms),
            "over": over,
            "fill": fill,
            "route": body.route,
            "refresh_s": body.refresh_s,
            "epsilon": body.epsilon,
            "seed": body.seed,
            "reward_events": list(dict.fromkeys(body.reward_events)),
        }

    def _unique_route(self, tenant: str, bandit_id: str, spec: dict[str, Any]) -> None:
        """At most one routing bandit per experiment and per slot surface (read from disk:
        called under the collection's lock)."""
        if not spec["route"]:
            return
        over = spec["over"]
        for other in self._docs.list(tenant):
            theirs = other.body
            if other.id == bandit_id or not theirs.get("route", True):
                continue
            same_exp = (
                "experiment_id" in over
                and theirs["over"].get("experiment_id") == over["experiment_id"]
            )
            same_slot = (
                spec["fill"] is not None
                and theirs.get("fill") is not None
                and theirs["over"].get("surface") == over.get("surface")
            )
            if same_exp or same_slot:
                what = (
                    f"experiment '{over['experiment_id']}'"
                    if same_exp
                    else f"the exploration slot of surface '{over['surface']}'"
                )
                raise ProblemError(
                    409,
                    f"Bandit '{other.id}' already routes {what}; set its route to false or "
                    "configure that bandit instead.",
                    code="RECSYS_BANDIT_CONFLICT",
                )

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: BanditRequest = req.context.body
        if body.policy is not None:
            spec = self._spec(tenant, body)
            before = self._docs.get(tenant, body.bandit_id)

            def checked(_current) -> dict[str, Any]:
                self._unique_route(tenant, body.bandit_id, spec)
                return spec

            doc, created = self._docs.put(tenant, body.bandit_id, checked, Preconditions.of(req))
            req.context.audit = {
                "target": f"bandit/{body.bandit_id}",
                "before": before.revision if before else None,
                "after": doc.revision,
            }
            if created:
                resp.status = falcon.HTTP_201
        else:
            if body.unit is None:
                raise ProblemError(
                    422,
                    "Give a policy (to configure the bandit) or a unit (to choose an arm).",
                    code="RECSYS_INVALID_BANDIT",
                )
            doc = self._docs.require(tenant, body.bandit_id)
        resp.media = self._state(tenant, doc, body.unit)
        set_etag(resp, doc.revision)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        doc = self._docs.require(tenant, req.context.query.bandit_id)
        resp.media = self._state(tenant, doc, None)
        set_etag(resp, doc.revision)

    def _state(self, tenant: str, doc, unit: str | None) -> dict[str, Any]:
        spec = doc.body
        arms = tuple(spec["arms"])
        counts = count_bandit(self._ctx.event_logs, tenant, doc)
        p, r = counts.pulls, counts.rewards
        mean = bandits.means(p, r)
        ucb = bandits.ucb1_bounds(p, r)
        a, b = bandits.beta_posterior(p, r)
        best = bandits.prob_best(p, r, seed=spec["seed"])
        total = int(p.sum())
        out_arms = [
            {
                "arm": arm,
                "pulls": int(p[j]),
                "rewards": int(r[j]),
                "mean": None if np.isnan(mean[j]) else round(float(mean[j]), 6),
                "ucb1": None if np.isinf(ucb[j]) else round(float(ucb[j]), 6),
                "alpha": float(a[j]),
                "beta": float(b[j]),
                "prob_best": round(float(best[j]), 4),
                "share": round(float(p[j]) / total, 6) if total else 0.0,
            }
            for j, arm in enumerate(arms)
        ]
        state: dict[str, Any] = {
            "bandit_id": doc.id,
            "policy": spec["policy"],
            "over": spec["over"],
            "seed": spec["seed"],
            "epsilon": spec["epsilon"],
            "reward_events": spec["reward_events"],
            "route": spec.get("route", True),
            "refresh_s": spec.get("refresh_s", DEFAULT_REFRESH_S),
            "fill": spec.get("fill"),
            "revision": doc.revision,
            "arms": out_arms,
            "total_pulls": total,
            "best_arm": arms[int(np.argmax(best))] if total else None,
            "allocation": counts.daily,
            "left_out": counts.left_out,
        }
        if unit is not None:
            j = bandits.choose_for(spec["policy"], p, r, spec["seed"], unit, spec["epsilon"])
            state["chosen"] = {"unit": unit, "arm": arms[j]}
        return state


# --- candidates and pipelines: schemas --------------------------------------------------------
Object = dict[str, Any]
Limit = Annotated[int, Meta(ge=1, le=engine.MAX_LIMIT)]


class RunContext(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Request-time context: items the visitor is looking at, a segment."""

    anchors: IdList | None = None
    segment: Id | None = None


class CandidateRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    generator: Annotated[str, Meta(min_length=1, max_length=64)]
    user_id: Id | None = None
    context: RunContext | None = None
    limit: Limit = 100
    list: Annotated[str, Meta(min_length=1, max_length=300)] | None = None
    filters: Object | None = None


class CandidateItem(msgspec.Struct):
    item_id: str
    rank: int
    score: float | None
    category: str | None
    brand: str | None
    price: float | None
    tags: list[str]
    available: bool
    sources: list[str] | None = None


class CandidateResponse(msgspec.Struct):
    generator: str
    source: str
    candidates: list[CandidateItem]
    count: int
    meta: Object


class GeneratorStatus(msgspec.Struct):
    generator: str
    source: str
    available: bool
    size: int
    items_covered: int
    coverage: float
    users_covered: int | None
    user_coverage: float | None
    last_fit: str
    model: str
    snapshot_id: str
    freshness_s: float
    detail: str | None = None


class PipelineBody(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)]
    stages: Annotated[list[Object], Meta(min_length=1, max_length=50)]
    pipeline_id: DocId | None = None
    description: Annotated[str, Meta(max_length=2000)] | None = None


class PipelinePatch(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: Annotated[str, Meta(min_length=1, max_length=200)] | None = None
    stages: Annotated[list[Object], Meta(min_length=1, max_length=50)] | None = None
    description: Annotated[str, Meta(max_length=2000)] | None = None


class Pipeline(msgspec.Struct):
    id: str
    name: str
    stages: list[Object]
    revision: str
    description: str | None = None
    created_at: str | None = None
    updated_at: str | None = None


class PipelineList(msgspec.Struct):
    items: list[Pipeline]
    total: int


class RunRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    user_id: Id | None = None
    context: RunContext | None = None
    show: Annotated[int, Meta(ge=1, le=engine.MAX_LIMIT)] = 50


class StageResult(msgspec.Struct):
    index: int
    type: str
    stage: Object
    count: int
    ms: float
    items: list[CandidateItem]


class RunResult(msgspec.Struct):
    pipeline_id: str
    revision: str
    stages: list[StageResult]
    items: list[CandidateItem]
    meta: Object


_PID = {"pipeline_id": DocId}
_DOC_HEADERS = ("If-Match", "If-None-Match")
_SNAP = (503,)

CANDIDATE_ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/recs/candidates/generate",
        ("candidates", "on_post_generate"),
        "Candidates of one generator (popularity | collab | content | graph | embedding) for a "
        "user and context, with scores and item metadata",
        SCOPE_RECOMMEND,
        body=CandidateRequest,
        response=CandidateResponse,
        errors=(422, *_SNAP),
        tags=("pipelines",),
    ),
    Route(
        "GET",
        "/v1/recs/candidates/{generator_name}/status",
        ("candidates", "on_get_status"),
        "A generator's coverage, size, last fit and freshness in the live snapshot",
        SCOPE_RECOMMEND,
        params={"generator_name": Annotated[str, Meta(min_length=1, max_length=64)]},
        response=GeneratorStatus,
        errors=_SNAP,
        tags=("pipelines",),
    ),
    Route(
        "POST",
        "/v1/recs/pipelines",
        ("pipelines", "on_post"),
        "Declare a pipeline (candidate, filter, ranker, postprocess stages), checked at write",
        SCOPE_ADMIN,
        body=PipelineBody,
        status=201,
        response=Pipeline,
        errors=(409, 422),
        tags=("pipelines",),
    ),
    Route(
        "GET",
        "/v1/recs/pipelines",
        ("pipelines", "on_get"),
        "List the declared pipelines",
        SCOPE_RECOMMEND,
        response=PipelineList,
        tags=("pipelines",),
    ),
    Route(
        "GET",
        "/v1/recs/pipelines/{pipeline_id}",
        ("pipelines", "on_get_one"),
        "One pipeline (ETag = revision)",
        SCOPE_RECOMMEND,
        params=_PID,
        response=Pipeline,
        tags=("pipelines",),
    ),
    Route(
        "PATCH",
        "/v1/recs/pipelines/{pipeline_id}",
        ("pipelines", "on_patch_one"),
        "Change a pipeline's name, description or stages (If-Match), checked again",
        SCOPE_ADMIN,
        params=_PID,
        body=PipelinePatch,
        response=Pipeline,
        errors=(409, 412, 422),
        headers=_DOC_HEADERS,
        tags=("pipelines",),
    ),
    Route(
        "DELETE",
        "/v1/recs/pipelines/{pipeline_id}",
        ("pipelines", "on_delete_one"),
        "Delete a pipeline (If-Match)",
        SCOPE_ADMIN,
        params=_PID,
        status=204,
        errors=(409, 412),
        headers=_DOC_HEADERS,
        tags=("pipelines",),
    ),
    Route(
        "POST",
        "/v1/recs/pipelines/{pipeline_id}/run",
        ("pipelines", "on_post_run"),
        "Run a pipeline for a user and context: every stage's output",
        SCOPE_RECOMMEND,
        params=_PID,
        body=RunRequest,
        body_required=False,
        response=RunResult,
        errors=(422, *_SNAP),
        tags=("pipelines",),
    ),
)


# --- candidates and pipelines: resources --------------------------------------------------------
def content_model(ctx: Any, tenant: str) -> Any:
    """The tenant's content model (`ContentModels` of the embeddings area, on the registry),
    or None."""
    models = getattr(ctx.store, "content", None)
    return models.get(tenant) if models is not None else None


def _request(
    live, user_id: str | None, context: RunContext | None, content: Any = None
) -> tuple[engine.Request, Object]:
    """The engine's request (snapshot rows) and what the answer's meta says about it."""
    snap = live.snap
    uidx = snap.user_index(user_id) if user_id else None
    anchors_in = (context.anchors if context and context.anchors else []) or []
    anchors = (
        np.asarray(sorted({i for i in live.item_indices(anchors_in)}), dtype=np.int32)
        if anchors_in
        else np.zeros(0, np.int32)
    )
    segment = context.segment if context and context.segment else None
    if segment is None and uidx is not None:
        segment = live.user_segment(uidx)
    meta = {
        "snapshot_id": live.snapshot_id,
        "algo_version": live.algo_version,
        "user_known": uidx is not None,
        "anchors_known": int(anchors.shape[0]),
        "segment": segment,
    }
    return engine.Request(uidx, anchors, segment, content), meta


def _items(live, cands: engine.Candidates, n: int, sources: bool = False) -> list[Object]:
    snap = live.snap
    items = cands.items[:n].tolist()
    ids = live.item_ids(items)
    price = np.asarray(snap.price)
    out = []
    for rank, (item, item_id) in enumerate(zip(items, ids, strict=True), start=1):
        score = float(cands.scores[rank - 1])
        p = float(price[item])
        entry: Object = {
            "item_id": item_id,
            "rank": rank,
            "score": None if np.isnan(score) else round(score, 6),
            "category": snap.category_name(int(live.category_id[item])),
            "brand": snap.brand_name(int(live.brand_id[item])),
            "price": None if np.isnan(p) else round(p, 4),
            "tags": [snap.tag_name(int(t)) for t in snap.item_tags(item)],
            "available": bool(live.available[item]),
        }
        if sources:
            entry["sources"] = cands.sources[rank - 1]
        out.append(entry)
    return out


class CandidatesResource:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._status: dict[tuple[str, str], Object] = {}  # (snapshot id, generator) -> figures

    def on_post_generate(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: CandidateRequest = req.context.body
        gen = engine.ALIASES.get(body.generator, body.generator)
        stage: Object = {"type": "candidate", "generator": gen, "limit": body.limit}
        if body.list is not None:
            stage["list"] = body.list
        stages = [stage]
        if body.filters:
            stages.append({"type": "filter", "rules": body.filters})
        spec = engine.validate_spec({"stages": stages})  # (422 for a bad generator or rule)
        live = self._ctx.store.require_live(tenant)
        run_req, meta = _request(live, body.user_id, body.context, content_model(self._ctx, tenant))
        t0 = time.perf_counter()
        items, scores = engine.generate(live.snap, gen, run_req, body.limit, spec["stages"][0])
        final = engine.Candidates(items, scores, [[gen]] * items.shape[0])
        if body.filters:
            final = engine.apply_filter(live.snap, live, final, body.filters, run_req)
        meta["timings_ms"] = {"total": round((time.perf_counter() - t0) * 1e3, 3)}
        resp.media = {
            "generator": gen,
            "source": engine.GENERATORS[gen],
            "candidates": _items(live, final, body.limit),
            "count": int(final.items.shape[0]),
            "meta": meta,
        }

    def on_get_status(
        self, req: falcon.Request, resp: falcon.Response, generator_name: str
    ) -> None:
        tenant = req.context.principal.tenant
        gen = engine.ALIASES.get(generator_name, generator_name)
        if gen not in engine.GENERATORS:
            raise ProblemError(
                404,
                f"No generator '{generator_name}' ({', '.join(engine.GENERATORS)}).",
                code="RECSYS_UNKNOWN_GENERATOR",
            )
        live = self._ctx.store.require_live(tenant)
        key = (live.snapshot_id, gen)
        figures = self._status.get(key)
        if figures is None:
            figures = self._status[key] = _coverage(
                live.snap, gen, content_model(self._ctx, tenant)
            )
            if len(self._status) > 64:
                self._status.pop(next(iter(self._status)))
        snap = live.snap
        created = snap.created_at
        resp.media = {
            "generator": gen,
            "source": engine.GENERATORS[gen],
            **figures,
            "last_fit": created.isoformat(),
            "model": live.algo_version,
            "snapshot_id": live.snapshot_id,
            "freshness_s": round(time.time() - created.timestamp(), 3),
        }
        resp.cache_control = ["no-store"]


def _coverage(snap, gen: str, content: Any = None) -> Object:
    """Size (entries), items covered (and share of the catalogue), users covered."""
    n_items, n_users = max(snap.n_items, 1), max(snap.n_users, 1)
    users = None
    if gen == "popularity":
        lists = [snap.fallback(n) for n in snap.fallback_names]
        items = [np.asarray(fb[0]) for fb in lists if fb is not None]
        flat = np.concatenate(items) if items else np.zeros(0, np.int32)
        size, covered = int(flat.shape[0]), int(np.unique(flat).shape[0])
        users = n_users if snap.fallback("popular") is not None else 0
        available, detail = True, f"{len(items)} lists"
    elif gen == "collab":
        size = int(snap.candidate_items.shape[0])
        covered = int(np.unique(np.asarray(snap.candidate_items)).shape[0])
        users = int((np.diff(np.asarray(snap.candidate_offsets)) > 0).sum())
        available, detail = True, None
    elif gen == "content" and content is not None:
        known = [snap.item_index(i) for i in content.item_ids]
        with_text = np.linalg.norm(np.asarray(content.item_vectors), axis=1) > 0
        covered = sum(
            1 for r, t in zip(known, with_text.tolist(), strict=True) if r is not None and t
        )
        size, available = int(with_text.sum()), True
        detail = f"content model {getattr(content, 'version', '')}, {content.dim} dimensions"
    elif gen in ("graph", "content"):
        kind = "cooc" if gen == "graph" else "content"
        available = gen == "graph" or engine.has_content(snap)
        size = covered = 0
        detail = None
        if available:
            lengths = np.fromiter(
                (snap.similar(i, kind)[0].shape[0] for i in range(snap.n_items)),
                dtype=np.int64,
                count=snap.n_items,
            )
            size, covered = int(lengths.sum()), int((lengths > 0).sum())
        else:
            detail = "not available for this snapshot (no text-embedding model)"
    else:  # embedding
        available = bool(snap.has_factors)
        size = covered = snap.n_items if available else 0
        users = snap.n_users if available else 0
        detail = (
            f"{snap.manifest['factors']['dim']} dimensions"
            if available
            else "not available for this snapshot (no factors)"
        )
    return {
        "available": available,
        "size": size,
        "items_covered": covered,
        "coverage": round(covered / n_items, 6),
        "users_covered": users,
        "user_coverage": None if users is None else round(users / n_users, 6),
        "detail": detail,
    }


def _pipeline_json(doc) -> Object:
    body = doc.body
    out: Object = {
        "id": doc.id,
        "name": body["name"],
        "stages": body["stages"],
        "revision": doc.revision,
        "created_at": doc.created_at,
        "updated_at": doc.updated_at,
    }
    if body.get("description") is not None:
        out["description"] = body["description"]
    return out


class PipelinesResource:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._docs = ctx.documents.collection(
            "pipelines", prefix="pipeline", missing_code="RECSYS_UNKNOWN_PIPELINE"
        )

    @property
    def collection(self):
        return self._docs

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: PipelineBody = req.context.body
        spec = engine.validate_spec(
            {"name": body.name, "description": body.description, "stages": body.stages}
        )
        pid = body.pipeline_id or f"pl-{uuid.uuid4().hex[:12]}"
        doc = self._docs.create(tenant, pid, {k: v for k, v in spec.items() if v is not None})
        req.context.audit = {"target": f"pipeline/{pid}", "before": None, "after": doc.revision}
        resp.status = falcon.HTTP_201
        resp.location = f"/v1/recs/pipelines/{pid}"
        resp.media = _pipeline_json(doc)
        set_etag(resp, doc.revision)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        docs = sorted(self._docs.list(req.context.principal.tenant), key=lambda d: d.id)
        resp.media = {"items": [_pipeline_json(d) for d in docs], "total": len(docs)}
        resp.cache_control = ["no-store"]

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, pipeline_id: str) -> None:
        doc = self._docs.require(req.context.principal.tenant, pipeline_id)
        resp.media = _pipeline_json(doc)
        set_etag(resp, doc.revision)

    def on_patch_one(self, req: falcon.Request, resp: falcon.Response, pipeline_id: str) -> None:
        tenant = req.context.principal.tenant
        patch = msgspec.to_builtins(req.context.body)
        before: list[str | None] = [None]

        def change(current) -> Object:
            before[0] = current.revision
            merged = {**current.body, **patch}
            return {k: v for k, v in engine.validate_spec(merged).items() if v is not None}

        doc = self._docs.patch(tenant, pipeline_id, change, Preconditions.of(req))
        req.context.audit = {
            "target": f"pipeline/{pipeline_id}",
            "before": before[0],
            "after": doc.revision,
        }
        resp.media = _pipeline_json(doc)
        set_etag(resp, doc.revision)

    def on_delete_one(self, req: falcon.Request, resp: falcon.Response, pipeline_id: str) -> None:
        doc = self._docs.delete(req.context.principal.tenant, pipeline_id, Preconditions.of(req))
        req.context.audit = {
            "target": f"pipeline/{pipeline_id}",
            "before": doc.revision,
            "after": None,
        }
        resp.status = falcon.HTTP_204

    def on_post_run(self, req: falcon.Request, resp: falcon.Response, pipeline_id: str) -> None:
        tenant = req.context.principal.tenant
        body: RunRequest = req.context.body or RunRequest()
        doc = self._docs.require(tenant, pipeline_id)
        live = self._ctx.store.require_live(tenant)
        run_req, meta = _request(live, body.user_id, body.context, content_model(self._ctx, tenant))
        t0 = time.perf_counter()
        outputs = engine.run(live.snap, live, doc.body, run_req)
        meta["timings_ms"] = {"total": round((time.perf_counter() - t0) * 1e3, 3)}
        meta["run_id"] = uuid.uuid4().hex
        stages = [
            {
                "index": o.index,
                "type": o.stage["type"],
                "stage": o.stage,
                "count": int(o.output.items.shape[0]),
                "ms": round(o.ms, 3),
                "items": _items(live, o.output, body.show, sources=True),
            }
            for o in outputs
        ]
        resp.media = {
            "pipeline_id": pipeline_id,
            "revision": doc.revision,
            "stages": stages,
            "items": stages[-1]["items"],
            "meta": meta,
        }
        resp.cache_control = ["no-store"]


# --- simulation and model check -----------------------------------------------------------------
class SimulateRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """One of `rules` (a rules config: the rules document's list), `pipeline` (inline stages),
    `pipeline_id` or `experiment` (``{"variants": [{"id", "rules"?, "pipeline"?,
    "pipeline_id"?}]}``), replayed over the last evaluation's holdout (or `dataset`: events
    of a sample dataset under the data root, .parquet/.csv/.ndjson)."""

    rules: Annotated[list[Object], Meta(max_length=1000)] | None = None
    pipeline: Object | None = None
    pipeline_id: DocId | None = None
    experiment: Object | None = None
    dataset: Annotated[str, Meta(min_length=1, max_length=1000)] | None = None
    k: Annotated[int, Meta(ge=1, le=100)] = 10
    surface: Id = DEFAULT_SURFACE
    max_users: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None
    n_resamples: Annotated[int, Meta(ge=50, le=5000)] = 1000
    seed: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0
    #: run as a Dagster job (202) whatever its size; a large one always does
    run_async: bool = msgspec.field(default=False, name="async")


#: The job a large simulation runs as (pipelines/control_jobs.py).
SIMULATE_JOB = "simulate_job"


class SimulateResult(msgspec.Struct, tag_field="mode", tag="sync"):
    """The figures, computed during the request (200)."""

    tenant_id: str
    source: str
    users: int
    pairs: int
    k: int
    surface: str
    evaluated: Object
    live: Object
    configurations: list[Object]
    timings_s: Object
    replay_built_s: float


class SimulateJob(msgspec.Struct, tag_field="mode", tag="job"):
    """A simulation running as a Dagster job (202): its state at `job_url`, and once it has
    succeeded the figures (the same document as a 200's, with ``"mode": "job"``) at
    `results_url`, under ``manifest.result``."""

    job_id: str
    status: str
    dagster_url: str
    job_url: str
    results_url: str
    size: int
    reason: str


class SampleContext(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A sample's context: at most as many anchors as /v1/recommend takes."""

    anchors: Annotated[list[Id], Meta(max_length=MAX_ANCHORS)] | None = None
    segment: Id | None = None


class Sample(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    user_id: Id | None = None
    context: SampleContext | None = None


class CheckModelRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Check the live model (default), a model version (``name@version`` of a published
    snapshot) or a pipeline (`pipeline_id` or inline `pipeline`) on sample payloads (or
    `n_samples` users drawn with `seed`)."""

    model_version: Annotated[str, Meta(min_length=1, max_length=300)] | None = None
    pipeline_id: DocId | None = None
    pipeline: Object | None = None
    samples: Annotated[list[Sample], Meta(max_length=100)] | None = None
    n_samples: Annotated[int, Meta(ge=1, le=200)] = 20
    repeat: Annotated[int, Meta(ge=1, le=20)] = 3
    k: Annotated[int, Meta(ge=1, le=100)] = 10
    seed: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0


class CheckModelResult(msgspec.Struct):
    target: str
    model: str
    snapshot_id: str
    samples: int
    passed: int
    ok: bool
    latency_ms: Object
    results: list[Object]


SIMULATE_ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/recs/simulate",
        ("simulate", "on_post"),
        "Replay rules, a pipeline or an experiment's variants over the last evaluation's holdout "
        "(or a sample dataset): NDCG@k, recall@k, coverage, exposure per category/brand/tag, "
        "revenue proxy, each with a CI and its difference from the live configuration. A "
        "large simulation (or async: true) runs as a Dagster job: 202 with the job, whose "
        "results are read at /v1/recs/jobs/{jobId}/results",
        SCOPE_ADMIN,
        body=SimulateRequest,
        response=SimulateResult | SimulateJob,
        also=(202,),
        errors=(422, *_SNAP),
        tags=("pipelines",),
    ),
    Route(
        "POST",
        "/v1/recs/health/check-model",
        ("check_model", "on_post"),
        "Latency and correctness of the live model, a model version or a pipeline on sample "
        "payloads: answers compared with the snapshot, timings",
        SCOPE_ADMIN,
        body=CheckModelRequest,
        body_required=False,
        response=CheckModelResult,
        errors=(422, *_SNAP),
        tags=("pipelines",),
    ),
)


class SimulateResource:
    def __init__(self, ctx: Any, simulator: Simulator) -> None:
        self._ctx = ctx
        self._sim = simulator

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: SimulateRequest = req.context.body
        if body.dataset is not None:
            body = msgspec.structs.replace(body, dataset=self._dataset(body.dataset))
        plan = self._sim.plan(tenant, body)
        try:
            size = self._sim.size(tenant, plan)
        except SimulationError as ex:
            raise ProblemError(422, str(ex), code="RECSYS_CANNOT_SIMULATE") from None
        if body.run_async or size > self._sim.async_above:
            reason = (
                "async requested"
                if body.run_async
                else (f"{size:,} user lists > {self._sim.async_above:,}: runs as a job")
            )
            resp.media = self._launch(req, tenant, plan, size, reason)
            resp.status = falcon.HTTP_202
            resp.location = resp.media["job_url"]
        else:
            resp.media = self._sim.run(tenant, body)
        resp.cache_control = ["no-store"]

    def _launch(
        self, req: falcon.Request, tenant: str, plan: dict[str, Any], size: int, reason: str
    ) -> dict[str, Any]:
        """Start `simulate_job` (pipelines/control_jobs.py) with the resolved plan; its figures
        go to `exports/<tenant>/simulations/<id>/_manifest.json` (a job's results)."""
        self._ctx.store.require_live(tenant)  # (503 now rather than a failed run)
        client = client_for(self._ctx.config.dagster_url)
        dest = "file://" + os.path.join(
            os.path.realpath(self._ctx.config.data_root),
            "exports",
            tenant,
            "simulations",
            uuid.uuid4().hex,
        )
        config = {"tenant": tenant, "plan": orjson.dumps(plan).decode(), "dest_uri": dest}
        tags = {
            TENANT_TAG: tenant,
            TYPE_TAG: "simulate",
            BY_TAG: req.context.principal.subject,
            DEST_TAG: dest,
        }
        run_id = client.launch(
            SIMULATE_JOB, {"ops": {"simulate_configurations": {"config": config}}}, tags
        )
        req.context.audit = {"target": f"jobs/{run_id}", "before": None, "after": run_id}
        return {
            "mode": "job",
            "job_id": run_id,
            "status": "queued",
            "dagster_url": client.ui_link(run_id),
            "job_url": f"/v1/recs/jobs/{run_id}",
            "results_url": f"/v1/recs/jobs/{run_id}/results",
            "size": size,
            "reason": reason,
        }

    def _dataset(self, uri: str) -> str:
        """A dataset path under the data root (no other file of the host is read)."""
        path = uri.removeprefix("file://")
        if "\x00" in path:  # (no file name holds one: os.path would raise)
            raise ProblemError(
                422, "A dataset path has no NUL byte.", code="RECSYS_CANNOT_SIMULATE"
            )
        root = os.path.realpath(self._ctx.config.data_root)
        full = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
        if os.path.commonpath([full, root]) != root:
            raise ProblemError(
                422,
                "A sample dataset is a file under the server's data root.",
                code="RECSYS_CANNOT_SIMULATE",
            )
        if not os.path.isfile(full):
            raise ProblemError(422, f"No dataset '{uri}'.", code="RECSYS_CANNOT_SIMULATE")
        return full


class CheckModelResource:
    def __init__(self, ctx: Any, pipelines: PipelinesResource) -> None:
        self._ctx = ctx
        self._pipelines = pipelines

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: CheckModelRequest = req.context.body or CheckModelRequest()
        given = [n for n in ("model_version", "pipeline_id", "pipeline") if getattr(body, n)]
        if len(given) > 1:
            raise ProblemError(
                422,
                f"Check one target: {', '.join(given)} were given.",
                code="RECSYS_INVALID_CHECK",
            )
        spec = None
        if body.pipeline_id is not None:
            doc = self._pipelines.collection.get(tenant, body.pipeline_id)
            if doc is None:
                raise ProblemError(
                    422, f"No pipeline '{body.pipeline_id}'.", code="RECSYS_UNKNOWN_PIPELINE"
                )
            spec = doc.body
        elif body.pipeline is not None:
            spec = engine.validate_spec(body.pipeline)
        resp.media = check_model(self._ctx, tenant, body, spec)
        resp.cache_control = ["no-store"]


ROUTES: tuple[Route, ...] = (*CANDIDATE_ROUTES, *SIMULATE_ROUTES, *BANDIT_ROUTES)


def resources(ctx: Any) -> dict[str, Any]:
    pipelines = PipelinesResource(ctx)
    return {
        "candidates": CandidatesResource(ctx),
        "pipelines": pipelines,
        "simulate": SimulateResource(ctx, Simulator(ctx)),
        "check_model": CheckModelResource(ctx, pipelines),
        "bandits": BanditsResource(ctx),
    }

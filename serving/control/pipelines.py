"""Control plane: exploration bandits (and, next, candidate generators, declared pipelines,
simulation and model checks).

``POST /v1/recs/exploration/bandit`` configures a bandit (a versioned document of
``ctx.documents``, collection ``bandits``) and/or asks it which arm a unit gets;
``GET /v1/recs/exploration/bandit?bandit_id=`` shows its state. A bandit's arms are the
variants of an experiment (``experiment_id``) or free names competing for an exploration slot
of the list (``slot``). Its state is counted from the event log on each call
(`recsys.bandits.count_arms`: impressions tagged with the arm, clicks and purchases attributed
to them by request id and item), so every worker answers alike; the policy math is
`recsys.bandits` (numpy, no Falcon).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import falcon
import msgspec
import numpy as np
from msgspec import Meta

from recsys import bandits
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.documents import DOCUMENT_ID, Preconditions, set_etag
from serving.errors import ProblemError
from serving.events_log import scan_all_events
from serving.routing import Route

DocId = Annotated[str, Meta(pattern=DOCUMENT_ID.pattern, description="a document id")]
ArmName = Annotated[str, Meta(pattern=DOCUMENT_ID.pattern, description="an arm name")]
Unit = Annotated[str, Meta(min_length=1, max_length=256)]


# --- bandits: schemas ---------------------------------------------------------------------------
class BanditRequest(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Configure a bandit (when `policy` is given: creates it, or replaces it with If-Match)
    and/or choose an arm for `unit` (when given)."""

    bandit_id: DocId
    policy: Literal["epsilon_greedy", "ucb1", "thompson"] | None = None
    arms: Annotated[list[ArmName], Meta(min_length=2, max_length=50)] | None = None
    experiment_id: DocId | None = None
    slot: Annotated[int, Meta(ge=1, le=500)] | None = None
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

    def _spec(self, tenant: str, body: BanditRequest) -> dict[str, Any]:
        if (body.experiment_id is None) == (body.slot is None):
            raise ProblemError(
                422,
                "A bandit runs over an experiment's variants (experiment_id) or an "
                "exploration slot (slot): give exactly one.",
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
        over = (
            {"experiment_id": body.experiment_id}
            if body.experiment_id is not None
            else {"slot": body.slot}
        )
        return {
            "policy": body.policy,
            "arms": list(arms),
            "over": over,
            "epsilon": body.epsilon,
            "seed": body.seed,
            "reward_events": list(dict.fromkeys(body.reward_events)),
        }

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: BanditRequest = req.context.body
        if body.policy is not None:
            spec = self._spec(tenant, body)
            before = self._docs.get(tenant, body.bandit_id)
            doc, created = self._docs.put(tenant, body.bandit_id, spec, Preconditions.of(req))
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
        events = scan_all_events(
            self._ctx.event_logs.data_root, tenant, self._ctx.event_logs.tenant(tenant)
        )
        over = spec["over"]
        counts = bandits.count_arms(
            events,
            arms,
            bandit_id=None if "experiment_id" in over else doc.id,
            experiment_id=over.get("experiment_id"),
            reward_types=tuple(spec["reward_events"]),
        )
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
            "over": over,
            "seed": spec["seed"],
            "epsilon": spec["epsilon"],
            "reward_events": spec["reward_events"],
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


ROUTES: tuple[Route, ...] = (*BANDIT_ROUTES,)


def resources(ctx: Any) -> dict[str, Any]:
    return {"bandits": BanditsResource(ctx)}

"""`POST /v1/recs/simulate` and `POST /v1/recs/health/check-model`: what a configuration would do,
before it goes live.

Simulation (data flow): `recsys.simulate.load_replay` gives the last evaluation's holdout users
with the eval model's ranked pool per user (cached per tenant until the evaluation changes).
Each configuration turns a user's pool into the top k the server would answer:

* a *pipeline* (inline stages, or a declared one by id) runs on `ReplaySnapshot` - the eval
  model in the live snapshot's shape - through `serving.pipelines_engine`, unchanged;
* the result, or the model's own pool, then goes through the request-time engine of
  /v1/recommend (`serving.rules.Engine`: availability, blocks, boosts, buries, pins) with the
  tenant's live rules, or the *rules* the simulation is asked about;
* an *experiment* is a list of variants, each a pipeline and/or rules.

The *live configuration* is the model's pool with the tenant's current rules; every
configuration's figures come with their difference from it. ``evaluated`` scores the model's
pool as is, which is what `model_evaluation` scored: its NDCG@10 is the evaluation's.

Small simulations run in the request (`Simulator.run`). A large one (`Simulator.size` above
`ASYNC_ABOVE`), or one asked with ``async: true``, is resolved to a plan here (rules checked,
pipelines resolved, the live rules fixed) and run by the Dagster job `simulate_job`
(`simulate_offline`: the same `run_plan` on the same live snapshot and replay), whose figures
are the job's results.

Model check: sample payloads (or users drawn with a seed) are answered through the recommend
service in process, timed, and compared with what the snapshot stores for them.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import msgspec
import numpy as np
import orjson

from recsys import simulate as sim
from recsys.storage import Storage
from serving import pipelines_engine as engine
from serving.errors import ProblemError
from serving.rules import Engine, Pool, compile_rules
from serving.validation import RecommendRequest, validate_rules

_NO_ITEMS = np.zeros(0, dtype=np.int32)
_FAR = 1e18  # (no deadline for a simulated request)
#: Above this many replayed user lists (holdout users x (1 + configurations)) a simulation runs
#: as a Dagster job instead of in the request (each list is one pass of the rules engine, and
#: a worker's request should end in seconds, well within gunicorn's timeout).
ASYNC_ABOVE = 100_000


class Simulator:
    """Replays per tenant (cached while the evaluation files are unchanged) and runs
    configurations over them."""

    def __init__(
        self,
        ctx: Any,
        n_candidates: int = 100,
        wait_s: float = 15.0,
        async_above: int | None = None,
    ) -> None:
        """wait_s: how long a request waits for a replay being built before it answers 503
        with Retry-After (the build goes on in the background; gunicorn's worker timeout is
        30 s by default, and the 1M-event demo's replay takes 16 s of CPU).
        async_above: a simulation larger than this (`size`) runs as a Dagster job (default
        `ASYNC_ABOVE`)."""
        self._ctx = ctx
        self._n_candidates = n_candidates
        self.wait_s = wait_s
        self.async_above = ASYNC_ABOVE if async_above is None else async_above
        self._lock = threading.Lock()
        self._cache: dict[tuple, tuple[tuple, sim.Replay]] = {}
        self._builds: dict[tuple, tuple[tuple, Future]] = {}
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="simulate-replay")

    def _signature(self, storage: Storage, tenant: str) -> tuple:
        out = []
        for path in (
            os.path.join(storage.models_dir(tenant), "split.json"),
            os.path.join(storage.evaluation_dir(tenant), "evaluation.json"),
        ):
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def replay(self, tenant: str, dataset: str | None, max_users: int | None) -> sim.Replay:
        storage = Storage(self._ctx.config.data_root)
        key = (tenant, dataset, max_users)
        sig = self._signature(storage, tenant)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and hit[0] == sig:
                return hit[1]
            building = self._builds.get(key)
            if building is None or building[0] != sig:  # (one build at a time: one thread)
                future = self._builder.submit(
                    sim.load_replay,
                    storage,
                    tenant,
                    self._n_candidates,
                    dataset=dataset,
                    max_users=max_users,
                )
                building = self._builds[key] = (sig, future)
        try:
            replay = building[1].result(timeout=self.wait_s)
        except FutureTimeout:
            raise ProblemError(
                503,
                "The replay of the last evaluation's holdout is being built (seconds of CPU on "
                "a large tenant); ask again shortly.",
                code="RECSYS_SIMULATION_PREPARING",
                headers={"Retry-After": "10"},
            ) from None
        except sim.SimulationError as ex:
            with self._lock:
                self._builds.pop(key, None)  # (a later call tries again)
            raise ProblemError(422, str(ex), code="RECSYS_CANNOT_SIMULATE") from None
        except Exception:
            with self._lock:
                self._builds.pop(key, None)
            raise
        with self._lock:
            if self._builds.get(key) is building:
                del self._builds[key]
            if len(self._cache) >= 4 and key not in self._cache:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = (sig, replay)
        return replay

    def plan(self, tenant: str, body: Any) -> dict[str, Any]:
        """What a simulation runs, resolved at request time (JSON values): the rules and
        pipelines of each configuration checked (422 here, before anything runs), the
        tenant's live rules and their version, and the replay's parameters. The synchronous
        path and the Dagster job (`simulate_offline`) both run a plan."""
        rules_doc, rversion = self._ctx.tenant_store.current(tenant, "rules")
        live_rules = list(rules_doc.get("rules", ()))
        configurations = [
            {
                "id": name,
                "rules": rules,
                "rules_version": "sim:"
                + hashlib.blake2b(
                    orjson.dumps(rules, option=orjson.OPT_SORT_KEYS), digest_size=8
                ).hexdigest(),
                "pipeline": pipeline,
            }
            for name, rules, pipeline in self._configurations(tenant, body, live_rules)
        ]
        return {
            "tenant": tenant,
            "dataset": body.dataset,
            "max_users": body.max_users,
            "k": body.k,
            "surface": body.surface,
            "n_resamples": body.n_resamples,
            "seed": body.seed,
            "n_candidates": self._n_candidates,
            "live_rules": live_rules,
            "live_rules_version": rversion,
            "configurations": configurations,
        }

    def size(self, tenant: str, plan: dict[str, Any]) -> int:
        """The simulation's size: the users it replays (the last evaluation's holdout users,
        or the rows of a dataset, at most `max_users`) times the lists per user (the live
        configuration's plus each configuration's)."""
        storage = Storage(self._ctx.config.data_root)
        if plan["dataset"] is not None:
            users = sim.count_rows(plan["dataset"])
        else:
            path = os.path.join(storage.evaluation_dir(tenant), "evaluation.json")
            try:
                with open(path, "rb") as f:
                    users = int(orjson.loads(f.read()).get("users") or 0)
            except FileNotFoundError:
                users = 0  # (no evaluation: the replay answers 422 at once)
        if plan["max_users"] is not None:
            users = min(users, plan["max_users"])
        return users * (1 + len(plan["configurations"]))

    def run(self, tenant: str, body: Any) -> dict[str, Any]:
        """The simulation of `body`, here and now (the synchronous path)."""
        t0 = time.perf_counter()
        live = self._ctx.store.require_live(tenant)
        plan = self.plan(tenant, body)
        replay = self.replay(tenant, body.dataset, body.max_users)
        return run_plan(replay, live, _content(self._ctx, tenant), plan, t0)

    def _configurations(self, tenant: str, body: Any, live_rules: list):
        """(name, rules, pipeline spec or None) of each configuration the body asks about."""
        given = [
            n
            for n in ("rules", "pipeline", "pipeline_id", "experiment")
            if getattr(body, n) is not None
        ]
        if len(given) != 1:
            raise ProblemError(
                422,
                "Simulate one thing: rules, a pipeline, a pipeline_id or an experiment "
                f"(got {', '.join(given) or 'none'}).",
                code="RECSYS_INVALID_SIMULATION",
            )
        if body.experiment is not None:
            variants = body.experiment.get("variants")
            if not isinstance(variants, list) or not variants:
                raise ProblemError(
                    422,
                    "An experiment to simulate has a non-empty list of variants, each with an "
                    "id and rules and/or a pipeline (or pipeline_id).",
                    code="RECSYS_INVALID_SIMULATION",
                )
            out = []
            for v in variants:
                if not isinstance(v, dict) or not isinstance(v.get("id"), str):
                    raise ProblemError(
                        422, "Each variant needs an id.", code="RECSYS_INVALID_SIMULATION"
                    )
                out.append(
                    (
                        v["id"],
                        self._rules(v["rules"]) if "rules" in v else live_rules,
                        self._pipeline(tenant, v.get("pipeline"), v.get("pipeline_id")),
                    )
                )
            return out
        if body.rules is not None:
            return [("rules", self._rules(body.rules), None)]
        return [("pipeline", live_rules, self._pipeline(tenant, body.pipeline, body.pipeline_id))]

    def _rules(self, rules: Any) -> list[dict[str, Any]]:
        """The rules to simulate, checked as a rules document is; the body that holds them
        was valid, so rules that are not (400 for a rules document) are its semantic 422."""
        try:
            return list(validate_rules({"rules": rules}, self._ctx.config)["rules"])
        except ProblemError as ex:
            if ex.status_code != 400:
                raise
            raise ProblemError(
                422,
                f"The rules to simulate are not valid rules: {ex.description}",
                code="RECSYS_INVALID_SIMULATION",
            ) from None

    def _pipeline(self, tenant: str, inline: Any, pid: str | None) -> dict[str, Any] | None:
        if inline is None and pid is None:
            return None
        if pid is not None:
            doc = self._ctx.documents.collection(
                "pipelines", prefix="pipeline", missing_code="RECSYS_UNKNOWN_PIPELINE"
            ).get(tenant, pid)
            if doc is None:
                raise ProblemError(422, f"No pipeline '{pid}'.", code="RECSYS_UNKNOWN_PIPELINE")
            inline = doc.body
        if not isinstance(inline, dict):
            raise ProblemError(
                422, "A pipeline is an object with stages.", code="RECSYS_INVALID_PIPELINE"
            )
        return engine.validate_spec(inline)


# --- running a plan ------------------------------------------------------------------------------
def lists(
    replay: sim.Replay,
    rsnap: sim.ReplaySnapshot,
    live,
    k: int,
    surface: str,
    rules: list[dict[str, Any]],
    rules_version: str,
    pipeline: dict[str, Any] | None,
    content: Any = None,
) -> np.ndarray:
    """(n_users, k) eval item indices the configuration answers (-1 padded)."""
    req = RecommendRequest(surface=surface, k=k)
    compiled = compile_rules(live, rules, rules_version, surface, "default")
    out = np.full((replay.n_users, k), -1, np.int64)
    for p in range(replay.n_users):
        if pipeline is None:
            items, scores, signals, reasons = rsnap.user_candidates(p)
        else:
            req_p = engine.Request(p, _NO_ITEMS, None, content)
            stages = engine.run(rsnap, live, pipeline, req_p)
            final = stages[-1].output
            items, scores, signals = final.items, final.scores.astype(np.float32), None
            reasons = np.zeros(items.shape[0], np.uint8)
            scores = np.nan_to_num(scores, nan=-np.inf)
        pool = Pool(items, scores, signals, reasons, "simulated", sorted=True)
        ranked = Engine(live, req, compiled, _FAR, []).run(pool, _NO_ITEMS, None, [])
        got = rsnap.to_eval[np.asarray(ranked.items, np.int64)] if ranked.items else []
        out[p, : len(got)] = got
    return out


def run_plan(
    replay: sim.Replay, live: Any, content: Any, plan: dict[str, Any], t0: float | None = None
) -> dict[str, Any]:
    """The figures of a plan (`Simulator.plan`) over `replay`, on the live snapshot `live`."""
    t0 = time.perf_counter() if t0 is None else t0
    t_replay = time.perf_counter() - t0
    rsnap = sim.ReplaySnapshot(replay, live.snap)
    k, surface = plan["k"], plan["surface"]
    groups = sim.item_groups(replay, live.snap)
    price = sim.item_prices(replay, live.snap)

    def figures(top: np.ndarray) -> sim.Figures:
        return sim.score_lists(replay, top, k, price, groups, plan["n_resamples"], plan["seed"])

    evaluated = figures(replay.pool_items)
    base_lists = lists(
        replay,
        rsnap,
        live,
        k,
        surface,
        plan["live_rules"],
        f"live:{plan['live_rules_version']}",
        None,
    )
    base = figures(base_lists)
    configs = []
    for conf in plan["configurations"]:
        top = lists(
            replay,
            rsnap,
            live,
            k,
            surface,
            conf["rules"],
            conf["rules_version"],
            conf["pipeline"],
            content,
        )
        f = figures(top)
        configs.append(
            {
                "id": conf["id"],
                "metrics": f.metrics,
                "exposure": f.exposure,
                "difference": sim.differences(f, base, plan["n_resamples"], plan["seed"]),
                "exposure_difference": sim.exposure_differences(f, base),
                "lists_changed": int((top != base_lists).any(axis=1).sum()),
            }
        )
    return {
        "mode": "sync",
        "tenant_id": plan["tenant"],
        "source": replay.source,
        "users": replay.n_users,
        "pairs": replay.holdout.n_pairs,
        "k": k,
        "surface": surface,
        "evaluated": {
            "metrics": evaluated.metrics,
            "evaluation_ndcg@10": replay.evaluated.get("served_ndcg@10"),
        },
        "live": {
            "rules_version": plan["live_rules_version"],
            "metrics": base.metrics,
            "exposure": base.exposure,
        },
        "configurations": configs,
        "timings_s": {
            "replay": round(t_replay, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
        "replay_built_s": round(replay.seconds, 3),
    }


def simulate_offline(data_root: str, plan: dict[str, Any]) -> dict[str, Any]:
    """A plan run outside the server (the Dagster job `simulate_job`): the replay built here,
    the tenant's live snapshot overlaid with the item changes since (as the server serves
    it), its content model; the same figures as `Simulator.run`. Raises
    `recsys.simulate.SimulationError` when the replay cannot be built, ProblemError (503)
    when the tenant has no snapshot."""
    from serving.control.embeddings import ContentModels
    from serving.crr.overlay import ItemOverlays
    from serving.snapshot import SnapshotRegistry

    t0 = time.perf_counter()
    tenant = plan["tenant"]
    registry = SnapshotRegistry(os.path.join(data_root, "snapshots"), check_interval_s=0.0)
    registry.install_overlay(ItemOverlays(os.path.join(data_root, "serving")))
    live = registry.require_live(tenant)
    replay = sim.load_replay(
        Storage(data_root),
        tenant,
        plan["n_candidates"],
        dataset=plan["dataset"],
        max_users=plan["max_users"],
    )
    out = run_plan(replay, live, ContentModels(data_root).get(tenant), plan, t0)
    out["mode"] = "job"
    out["snapshot_id"] = live.snapshot_id
    return out


def _content(ctx: Any, tenant: str) -> Any:
    """The tenant's content model (the embeddings area's, on the registry), or None."""
    models = getattr(ctx.store, "content", None)
    return models.get(tenant) if models is not None else None


# --- model check ---------------------------------------------------------------------------------
def check_model(ctx: Any, tenant: str, body: Any, pipeline: dict[str, Any] | None) -> dict:
    """Answer each sample payload `body.repeat` times, timed; compare with the snapshot."""
    live = ctx.store.require_live(tenant)
    target = None
    if body.model_version is not None and body.model_version != live.algo_version:
        sid = ctx.experiments.snapshot_of_model(tenant, body.model_version)
        holder = ctx.store.tenant(tenant)
        variant = holder.variant(sid) if (sid and holder is not None) else None
        if variant is None:
            raise ProblemError(
                422,
                f"No published snapshot of model '{body.model_version}' (live: "
                f"{live.algo_version}).",
                code="RECSYS_UNKNOWN_MODEL",
            )
        live = variant
        if pipeline is None:  # (the service answers from the live snapshot only)
            target = "model version (its stored lists, as /v1/recommend without rules)"
            pipeline = STORED_LISTS
    snap = live.snap
    if target is None:
        target = "pipeline" if pipeline is not None else "model"
    samples = msgspec.to_builtins(body.samples or [])
    if not samples:  # users drawn with the seed
        rng = np.random.default_rng(body.seed)
        rows = rng.choice(snap.n_users, size=min(body.n_samples, snap.n_users), replace=False)
        samples = [{"user_id": snap.user_id(int(r))} for r in sorted(rows.tolist())]
    results, timings = [], []
    for sample in samples:
        user_id = sample.get("user_id")
        anchors = (sample.get("context") or {}).get("anchors") or []
        uidx = snap.user_index(user_id) if user_id else None
        times = []
        for _ in range(body.repeat):
            t0 = time.perf_counter()
            if pipeline is None:
                answer = _recommend(ctx, tenant, live, user_id, anchors, body.k)
            else:
                req = engine.Request(
                    uidx,
                    np.asarray(sorted(set(live.item_indices(list(anchors)))), np.int32),
                    live.user_segment(uidx) if uidx is not None else None,
                    _content(ctx, tenant),
                )
                out = engine.run(snap, live, pipeline, req)[-1].output
                answer = live.item_ids(out.items[: body.k].tolist())
            times.append((time.perf_counter() - t0) * 1e3)
        timings += times
        results.append(
            {
                **_compare(live, uidx, answer, body.k),
                "sample": sample,
                "ms": round(float(np.median(times)), 3),
            }
        )
    all_ms = np.asarray(timings)
    checks = [r["consistent"] for r in results]
    return {
        "target": target,
        "model": live.algo_version,
        "snapshot_id": live.snapshot_id,
        "samples": len(results),
        "passed": int(sum(checks)),
        "ok": all(checks),
        "latency_ms": {
            "p50": round(float(np.percentile(all_ms, 50)), 3),
            "p95": round(float(np.percentile(all_ms, 95)), 3),
            "max": round(float(all_ms.max()), 3),
            "calls": int(all_ms.size),
        },
        "results": results,
    }


#: What /v1/recommend answers without rules: the stored list, available and unseen items.
STORED_LISTS = engine.validate_spec(
    {
        "stages": [
            {"type": "candidate", "generator": "collab", "limit": engine.MAX_LIMIT},
            {"type": "filter", "rules": {"available": True, "exclude_seen": True}},
        ]
    }
)


def _recommend(ctx, tenant, live, user_id, anchors, k) -> list[str]:
    """The items /v1/recommend answers (the same service, in process), on `live`."""
    # (a sample without a user is an anonymous session: its anchors, or the cold start)
    user = {"user_id": user_id} if user_id else {"session_id": "check-model"}
    body: dict[str, Any] = {"k": k, "user": user}
    if anchors:
        body["anchors"] = {"item_ids": list(anchors)}
    if live.snapshot_id != ctx.store.require_live(tenant).snapshot_id:
        raise ProblemError(
            422,
            "Only the live snapshot's model is answered by the recommend service; check "
            "another model version through a pipeline on its snapshot.",
            code="RECSYS_UNKNOWN_MODEL",
        )
    answer = ctx.service.recommend(tenant, body, time.perf_counter())
    return [it["item_id"] for it in answer["items"]]


def _compare(live, uidx: int | None, answer: list[str], k: int) -> dict[str, Any]:
    """The answer against the snapshot: every item known and available, none the user has
    seen, and the overlap with the user's stored top k (its precomputed list, after removing
    unavailable items)."""
    snap = live.snap
    rows = [snap.item_index(i) for i in answer]
    unknown = [i for i, r in zip(answer, rows, strict=True) if r is None]
    known = np.asarray([r for r in rows if r is not None], np.int32)
    unavailable = [snap.item_id(int(r)) for r in known if not live.available[r]]
    seen: list[str] = []
    expected: list[str] = []
    if uidx is not None:
        seen_rows = np.asarray(snap.user_seen(uidx))
        seen = [snap.item_id(int(r)) for r in known if r in set(seen_rows.tolist())]
        stored = np.asarray(snap.user_candidates(uidx)[0])
        stored = stored[np.asarray(live.available)[stored]]
        expected = snap.item_ids(stored[:k])
    overlap = len(set(answer) & set(expected)) / k if expected else None
    consistent = not unknown and not unavailable and not seen and len(answer) <= k
    return {
        "items": answer,
        "snapshot_top_k": expected,
        "overlap_at_k": None if overlap is None else round(overlap, 4),
        "unknown_items": unknown,
        "unavailable_items": unavailable,
        "seen_items": seen,
        "consistent": consistent,
    }

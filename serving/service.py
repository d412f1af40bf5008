"""The use cases behind the public routes: validate, recommend, similar.

Resources stay thin (parse HTTP, call here, write JSON); this module knows tenants' config,
rules, snapshots and experiments, and turns an engine result into the contract's JSON.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import orjson

from recsys.snapshot.format import REASON_CODES, SIGNALS
from serving.config import ServingConfig
from serving.control.access import effective_rules
from serving.documents import Collection, Document, DocumentStore, TenantDocuments
from serving.errors import ProblemError
from serving.metrics import Metrics
from serving.rules import (
    DEFAULT_ANCHOR_HALF_LIFE,
    Caps,
    Engine,
    Ranked,
    assign_variant,
    backfill_sources,
    compile_rules,
)
from serving.snapshot import LiveSnapshot, SnapshotRegistry
from serving.validation import DEFAULT_SEGMENT, Limits, RecommendRequest, parse_recommend


class TenantView(NamedTuple):
    """What a tenant's documents say about its requests, derived once while they are unchanged
    (`RecommendService.view`)."""

    expires: float  # (time.monotonic) re-read after this
    changes: int  # `Collection.local_changes` when read
    config: dict[str, Any]  # the tenant's config document ({} when none: the defaults apply)
    cversion: str | None
    limits: Limits  # the server's limits, lowered by the config
    rules: list[dict[str, Any]]  # its rules, its policies' and the invalidated items' block
    rules_key: Any  # the compile key of `rules` (`serving.rules.compile_rules`)
    rversion: str | None  # the rules' version (meta.rules_version)
    invalidations: Document | None  # the cache-control document (`serving.control.cache`)
    experiments: bool  # does the tenant have experiments (running or not)
    slot_bandits: dict[str, Document]  # surface -> its exploration-slot bandit


class RecommendService:
    def __init__(
        self,
        config: ServingConfig,
        registry: SnapshotRegistry,
        tenants: TenantDocuments,
        metrics: Metrics,
        *,
        experiments=None,
        seeds=None,
    ) -> None:
        """experiments: the experiments store (a running experiment of the request's surface,
        created through /v1/recs/experiments); seeds: the cold-start seed lists
        (/v1/recs/seed). None: not consulted."""
        self._config = config
        self._registry = registry
        self._tenants = tenants
        self._metrics = metrics
        self.experiments = experiments
        self.seeds = seeds
        #: The cache-control state (`serving.control.cache.CacheState`: invalidated items and
        #: users, the answer counter), set by the monitoring area; None: not consulted.
        self.cache = None
        #: The bandits' router (`serving.bandit_routing.BanditRouter`: which exploration-slot
        #: bandit fills a slot of a surface's lists), set by the bandits area; None: not
        #: consulted.
        self.bandits = None
        self._views: dict[str, TenantView] = {}
        self._view_s = tenants.store.check_interval_s
        self._pipeline_docs = None  # the `pipelines` documents, opened when a surface names one

    # --- shared ------------------------------------------------------------------------------
    def view(self, tenant: str) -> TenantView:
        """What the tenant's documents say about its requests (`TenantView`), derived once and
        kept while they are unchanged: re-read when this process changed a document, and at
        least every `check_interval_s`. The documents it reads were checked no later than it
        was built, so on its re-read each is re-stat'ed: another worker's change is seen within
        the interval (within twice it when another reader re-checked a document in between)."""
        view = self._views.get(tenant)
        if (
            view is not None
            and view.changes == Collection.local_changes
            and time.monotonic() < view.expires
        ):
            return view
        return self._new_view(tenant)

    def _new_view(self, tenant: str) -> TenantView:
        changes = Collection.local_changes  # (before the reads: a write during them is seen)
        tconf, cversion = self._tenants.current(tenant, "config")
        body, rversion = self._tenants.current(tenant, "rules")
        # (+ the rules of the tenant's enabled policies: serving.control.access)
        rules, rversion = effective_rules(
            self._config.data_root, tenant, body.get("rules", ()), rversion
        )
        invalidations, rules_key = None, rversion
        if self.cache is not None:  # (+ a block rule of the items invalidated: control.cache)
            invalidations = self.cache.current(tenant)
            rules, rules_key = self.cache.rules(invalidations, rules, rversion)
        experiments = self.experiments
        view = TenantView(
            time.monotonic() + self._view_s,
            changes,
            tconf,
            cversion,
            Limits.for_tenant(self._config, tconf),
            rules,
            rules_key,
            rversion,
            invalidations,
            experiments is not None and bool(experiments.documents.cached_list(tenant)),
            self.bandits.slot_bandits(tenant) if self.bandits is not None else {},
        )
        if len(self._views) > 10_000:
            self._views.clear()
        self._views[tenant] = view
        return view

    def tenant_config(self, tenant: str) -> tuple[dict[str, Any], str | None]:
        view = self.view(tenant)
        return view.config, view.cversion

    def declared_event_types(self, tenant: str) -> dict[str, float]:
        """The event types (with their weights) the tenant's config declares, `event_types`:
        what its event intake accepts beside the built-in types."""
        return self.view(tenant).config.get("event_types") or {}

    def limits(self, tenant: str) -> Limits:
        """The tenant's effective limits (the server's, lowered by its config)."""
        return self.view(tenant).limits

    def parse(self, tenant: str, body: Any, similar: bool = False, view: TenantView | None = None):
        """(request, warnings, tenant config, its version) of a body: its schema type
        (`serving.schemas`), or plain JSON values checked against it."""
        if view is None:
            view = self.view(tenant)
        tconf = view.config
        req, warnings = parse_recommend(body, view.limits, tconf, similar=similar)
        return req, warnings, tconf, view.cversion

    def _live(
        self, tenant: str, req: RecommendRequest, view: TenantView, meta: dict[str, Any]
    ) -> LiveSnapshot:
        live = self._registry.require_live(tenant)
        if req.experiment_id is None and not view.experiments:
            return live
        unit = req.user_id or req.anonymous_id or req.session_id or ""
        if req.experiment_id is None:
            picked = self.experiments.pick(tenant, req.surface, unit)
            if picked is None:
                return live
            exp_id, chosen, assigned = picked
        else:
            exp_id, chosen, assigned = self._named_variant(tenant, req, view.config, unit)
        target = chosen.get("snapshot") or "current"
        if target not in ("current", "champion"):
            variant_live = self._registry.tenant(tenant).variant(target)
            if variant_live is None:
                raise ProblemError(
                    503,
                    f"Snapshot '{target}' of variant '{chosen['name']}' cannot be loaded.",
                    code="RECSYS_NO_SNAPSHOT",
                )
            live = variant_live
        meta["experiment"] = {
            "id": exp_id,
            "variant": chosen["name"],
            "assigned": assigned,
            "snapshot_id": live.snapshot_id,
        }
        if "bandit" in chosen:  # (the variant is the arm a bandit chose: serving.bandit_routing)
            meta["experiment"]["bandit"] = chosen["bandit"]
        return live

    def _named_variant(self, tenant: str, req: RecommendRequest, tconf: dict[str, Any], unit: str):
        """(experiment id, variant, assigned by hash?) of an experiment the request names: from
        the tenant config's `experiments`, else from the experiments store."""
        exp = (tconf.get("experiments") or {}).get(req.experiment_id)
        if exp is None:
            found = None
            if self.experiments is not None:
                found = self.experiments.resolve(tenant, req.experiment_id, unit)
            if found is None:
                raise ProblemError(
                    422,
                    f"Unknown experiment '{req.experiment_id}'.",
                    code="RECSYS_UNKNOWN_EXPERIMENT",
                )
            if req.experiment_variant is None:
                return found
            resolved = self.experiments.resolve(
                tenant, req.experiment_id, unit, req.experiment_variant
            )
            if resolved is None:
                raise ProblemError(
                    422,
                    f"Experiment '{req.experiment_id}' has no variant '{req.experiment_variant}'.",
                    code="RECSYS_UNKNOWN_VARIANT",
                )
            return resolved
        variants = exp["variants"]
        if req.experiment_variant is not None:
            chosen = next((v for v in variants if v["name"] == req.experiment_variant), None)
            if chosen is None:
                raise ProblemError(
                    422,
                    f"Experiment '{req.experiment_id}' has no variant '{req.experiment_variant}'.",
                    code="RECSYS_UNKNOWN_VARIANT",
                )
            return req.experiment_id, chosen, False
        return req.experiment_id, assign_variant(req.experiment_id, unit, variants), True

    def rules(self, tenant: str, live: LiveSnapshot, surface: str, segment: str):
        """(compiled rules, rules version) the tenant's requests on `surface` x `segment` run:
        its rules, its enabled policies' and the block of its invalidated items (`view`)."""
        view = self.view(tenant)
        return compile_rules(live, view.rules, view.rules_key, surface, segment), view.rversion

    # --- use cases ---------------------------------------------------------------------------
    def validate(self, tenant: str, body: Any) -> dict[str, Any]:
        req, warnings, _, cversion = self.parse(tenant, body)
        return {
            "normalized_request": req.normalized(),
            "warnings": warnings,
            "meta": {"tenant_id": tenant, "config_version": cversion},
        }

    def recommend(self, tenant: str, body: Any, started: float) -> dict[str, Any]:
        """The answer to a recommend request body of `tenant` (the contract's JSON object)."""
        return self._response(*self._recommend(tenant, body, started))

    def recommend_json(self, tenant: str, body: Any, started: float, request_id: str) -> bytes:
        """`recommend` with `meta.request_id`, serialized: the same bytes as orjson.dumps of
        that object, with the plain items (no reasons or explanations) written directly
        instead of as one dict each."""
        live, req, ranked, meta, warnings = self._recommend(tenant, body, started)
        meta["request_id"] = request_id
        if not req.include_reasons and req.explain == "none":
            items = items_json_fields(live.item_ids_json(ranked.items), ranked.scores)
            rest: dict[str, Any] = {"meta": meta, "warnings": warnings}
            if ranked.trace is not None:
                rest["trace"] = ranked.trace
            return b'{"items":' + items + b"," + orjson.dumps(rest)[1:]
        return orjson.dumps(self._response(live, req, ranked, meta, warnings))

    def _recommend(self, tenant: str, body: Any, started: float):
        """(live snapshot, request, ranked answer, meta, warnings) of a recommend request."""
        deadline = started + self._config.deadline_ms / 1000.0
        view = self.view(tenant)
        req, warnings, tconf, cversion = self.parse(tenant, body, view=view)
        meta: dict[str, Any] = {}
        live = self._live(tenant, req, view, meta)
        snap = live.snap

        uidx = snap.user_index(req.user_id) if req.user_id else None
        segment = req.segment
        if segment is None:
            segment = (live.user_segment(uidx) if uidx is not None else None) or DEFAULT_SEGMENT
        rules = compile_rules(live, view.rules, view.rules_key, req.surface, segment)
        rversion = view.rversion
        engine = Engine(live, req, rules, deadline, warnings)
        cache = self.cache
        if (
            uidx is not None
            and view.invalidations is not None
            and cache.user_invalidated(view.invalidations, req.user_id, req.surface, live, uidx)
        ):
            uidx = None  # (its precomputed list was invalidated: answered as an unknown user)

        anchors = _item_indices(live, req.anchors)
        if uidx is not None:
            source = "precomputed"
            pool = engine.user_pool(uidx)
            seen = pool  # (the user's seen items: UserPool.seen, read when needed)
            if anchors.size:  # anchors the user just looked at are not recommended back
                seen = np.union1d(pool.seen, anchors)
            category_of = pool  # back-fill by the category of the top candidate
        elif anchors.size:
            source = "anchors"
            half_life = (tconf.get("defaults") or {}).get("anchor_half_life")
            if half_life is None:
                half_life = DEFAULT_ANCHOR_HALF_LIFE
            pool, seen = engine.anchor_pool(anchors, half_life=half_life), anchors
            category_of = anchors
            if req.user_id:
                warnings.append(
                    {
                        "code": "UNKNOWN_USER",
                        "detail": "user not in the snapshot; recommending from anchors",
                    }
                )
        else:
            source = "fallback"
            name = (
                f"segment:{segment}" if f"segment:{segment}" in snap.fallback_names else "popular"
            )
            pool = self.seeds.cold_start_pool(tenant, live, req.surface) if self.seeds else None
            if pool is not None:
                name = pool.source
            else:
                pool = engine.fallback_pool(name)
            if pool is None:
                raise ProblemError(
                    503,
                    "The snapshot has no fallback list to answer a cold start.",
                    code="RECSYS_NO_FALLBACK",
                )
            seen = anchors
            category_of = _NO_ITEMS
            warnings.append(
                {
                    "code": "COLD_START",
                    "detail": f"{'unknown user' if req.user_id else 'anonymous user'} "
                    f"without anchors; answered from '{name}'",
                }
            )
        if req.anchors and anchors.size < len(req.anchors):
            warnings.append(
                {
                    "code": "UNKNOWN_ANCHOR",
                    "detail": f"{len(req.anchors) - anchors.size} anchor id(s) unknown",
                }
            )
        surface_pipelines = tconf.get("pipelines")  # (surface -> pipeline id; usually none)
        if surface_pipelines and req.surface in surface_pipelines:
            pool, seen = self._surface_pipeline(
                tenant,
                surface_pipelines[req.surface],
                live,
                uidx,
                anchors,
                segment,
                pool,
                seen,
                warnings,
                meta,
            )
        weights = (
            req.weights if req.weights is not None else (tconf.get("defaults") or {}).get("weights")
        )
        # (the back-fill sources are computed only when back-fill is needed)
        sources = partial(_backfill_sources, live, req, segment, category_of, pool)
        ranked = engine.run(pool, seen, weights, sources)
        slot_bandit = view.slot_bandits.get(req.surface) if view.slot_bandits else None
        if slot_bandit is not None:
            placed = self._fill_slot(
                tenant, slot_bandit, live, req, engine, ranked, seen, uidx, anchors, segment, meta
            )
            if placed is not None and placed[0] is None:
                warnings.append(
                    {
                        "code": "BANDIT_SLOT_EMPTY",
                        "detail": f"bandit '{slot_bandit.id}': arm '{placed[1]}' has no "
                        "available item to show",
                    }
                )
        if meta:  # (the experiment first)
            meta.update(self._meta(tenant, req, segment, live, cversion, rversion, ranked, started))
        else:
            meta = self._meta(tenant, req, segment, live, cversion, rversion, ranked, started)
        if weights and req.explain == "full":
            meta["weights"] = {s: float(weights.get(s, 0.0)) for s in SIGNALS}
        self._count(tenant, ranked)
        if cache is not None:
            cache.count(tenant, req.surface, source)
        return live, req, ranked, meta, warnings

    def _fill_slot(
        self, tenant, doc, live, req, engine, ranked: Ranked, seen, uidx, anchors, segment, meta
    ):
        """Put the item of the arm that the surface's exploration-slot bandit chooses for the
        unit at the bandit's slot, as a pin goes (checked against the request's filters and
        the rules' blocks; an item the list holds moves there; the list keeps at most k
        items), and say so in ``meta.bandit``. The arm's fill is an item, or the best
        candidate of a generator that the list does not hold. (item placed or None, arm), or
        None for a slot past k: an arm with nothing admissible places nothing (the caller
        warns), so no pull is shown."""
        from serving import pipelines_engine

        slot = doc.body["over"]["slot"]
        if slot > req.k:
            return
        unit = req.user_id or req.anonymous_id or req.session_id or ""
        arm = self.bandits.choose(tenant, doc, unit)
        fill = doc.body["fill"][arm]
        if fill.get("item_id") is not None:
            idx = live.item_index(fill["item_id"])
            found = np.asarray([idx] if idx is not None else [], dtype=np.int32)
        else:
            models = getattr(self._registry, "content", None)
            request = pipelines_engine.Request(
                uidx, anchors, segment, models.get(tenant) if models is not None else None
            )
            try:
                found, _ = pipelines_engine.generate(
                    live.snap, fill["generator"], request, len(ranked.items) + 50
                )
            except ProblemError:  # (nothing behind this generator on this snapshot)
                found = _NO_ITEMS
            found = found[~np.isin(found, ranked.items)] if ranked.items else found
        ok = np.flatnonzero(engine.admissible(found, seen)) if found.shape[0] else _NO_ITEMS
        item = int(found[ok[0]]) if ok.shape[0] else None
        if item is None:
            return item, arm
        rule = f"bandit:{doc.id}"
        # (the parallel columns of the answer; reasons are filled only when asked for)
        columns = [ranked.items, ranked.scores, ranked.signals, ranked.rules]
        extra = [item, None, None, [rule]]
        if len(ranked.reasons) == len(ranked.items):
            columns.append(ranked.reasons)
            extra.append([EXPLORATION_TEXT])
        moved = ranked.items.index(item) if item in ranked.items else None
        others = [row for row in range(len(ranked.items)) if row != moved]
        pos = min(slot - 1, len(others))
        scores = ranked.scores  # (the slot's score: that of the item it displaces)
        extra[1] = scores[others[min(pos, len(others) - 1)]] if others else 0.0
        for column, value in zip(columns, extra, strict=True):
            column.append(value)  # (the placed item: the last row, `new`)
        order, made_way = _slot_layout(live, req, ranked, others, pos)
        if made_way and "capped" in ranked.counts:
            ranked.counts["capped"] += len(made_way)
        if ranked.trace is not None:
            for row, cap in made_way:
                ranked.trace.append(
                    {
                        "item_id": live.item_ids([ranked.items[row]])[0],
                        "source": rule,
                        "outcome": "capped",
                        "rule": f"max_per_tag:{cap}",
                    }
                )
        for column in columns:
            column[:] = [column[row] for row in order[: req.k]]
        item_id = live.item_ids([item])[0]
        if ranked.trace is not None:
            ranked.trace.append(
                {
                    "item_id": item_id,
                    "source": rule,
                    "outcome": "pinned",
                    "rule": rule,
                    "detail": f"arm '{arm}' at slot {pos + 1}",
                }
            )
        meta["bandit"] = {"id": doc.id, "arm": arm, "slot": pos + 1, "item_id": item_id}
        return item, arm

    def _surface_pipeline(
        self, tenant, pipeline_id, live, uidx, anchors, segment, pool, seen, warnings, meta
    ):
        """(pool, seen) from the declared pipeline the request's surface names in the tenant
        config (`serving.pipelines_engine`); today's, with a warning, when it cannot run."""
        from serving import pipelines_engine

        if self._pipeline_docs is None:
            serving_dir = os.path.join(self._config.data_root, "serving")
            self._pipeline_docs = DocumentStore(
                serving_dir, self._config.snapshot_check_s
            ).collection("pipelines", prefix="pipeline")
        try:
            models = getattr(self._registry, "content", None)  # (the embeddings area's)
            new_pool, revision = pipelines_engine.surface_pool(
                self._pipeline_docs,
                tenant,
                pipeline_id,
                live,
                uidx,
                anchors,
                segment,
                models.get(tenant) if models is not None else None,
            )
        except ProblemError as ex:
            warnings.append(
                {
                    "code": "PIPELINE_UNAVAILABLE",
                    "detail": f"pipeline '{pipeline_id}': {ex.description} Answered without it.",
                }
            )
            return pool, seen
        meta["pipeline"] = {"id": pipeline_id, "revision": revision}
        if not isinstance(seen, np.ndarray):  # (a UserPool stands for its seen items)
            seen = seen.seen
        return new_pool, seen

    def similar(self, tenant: str, body: Any, started: float) -> dict[str, Any]:
        deadline = started + self._config.deadline_ms / 1000.0
        view = self.view(tenant)
        req, warnings, tconf, cversion = self.parse(tenant, body, similar=True, view=view)
        meta: dict[str, Any] = {}
        live = self._live(tenant, req, view, meta)
        segment = req.segment or DEFAULT_SEGMENT
        iidx = live.item_index(req.item_id)
        if iidx is None:
            if tconf.get("strict_similar"):
                raise ProblemError(
                    404,
                    f"Item '{req.item_id}' is not in the catalogue.",
                    code="RECSYS_UNKNOWN_ITEM",
                )
            warnings.append({"code": "UNKNOWN_ITEM", "detail": f"item '{req.item_id}' is unknown"})
        rules, rversion = self.rules(tenant, live, req.surface, segment)
        engine = Engine(live, req, rules, deadline, warnings)
        anchor = np.asarray([iidx] if iidx is not None else [], dtype=np.int32)
        if req.kind == "content":
            pool = self._content_pool(tenant, live, anchor, segment, req.k)
        else:
            kinds = ("emb", "cooc") if req.kind == "blend" else (req.kind,)
            pool = engine.anchor_pool(anchor, kinds)
            if req.kind == "blend" and not pool.n_candidates and iidx is not None:
                # a cold item (no events, so no emb or cooc neighbours): its content neighbours
                try:
                    pool = self._content_pool(tenant, live, anchor, segment, req.k)
                except ProblemError:  # (no content model, nor content lists in the snapshot)
                    pass
                else:
                    if pool.n_candidates:
                        warnings.append(
                            {
                                "code": "CONTENT_NEIGHBOURS",
                                "detail": "the item has no behavioural neighbours; answered "
                                "from its text embedding (the content model)",
                            }
                        )
        category_hint = int(live.category_id[iidx]) if iidx is not None else None
        ranked = engine.run(
            pool,
            anchor,
            None,
            backfill_sources(live, req, segment, category_hint) if iidx is not None else [],
        )
        meta.update(self._meta(tenant, req, segment, live, cversion, rversion, ranked, started))
        self._count(tenant, ranked)
        return self._response(live, req, ranked, meta, warnings)

    def _content_pool(self, tenant: str, live: LiveSnapshot, anchor, segment: str, k: int):
        """The content generator's neighbours of `anchor` (the tenant's content model:
        TF-IDF + SVD of item texts, fitted by the pipeline; `serving.pipelines_engine`) as a
        pool; 422 when neither a content model nor the snapshot's content lists exist."""
        from serving import pipelines_engine
        from serving.rules import Pool

        models = getattr(self._registry, "content", None)  # (the embeddings area's)
        request = pipelines_engine.Request(
            None, anchor, segment, models.get(tenant) if models is not None else None
        )
        # (more than k: the request-time rules may filter some)
        items, scores = pipelines_engine.generate(live.snap, "content", request, 4 * k + 20)
        reasons = np.full(items.shape[0], REASON_CODES["emb"], dtype=np.uint8)
        return Pool(items, scores.astype(np.float32), None, reasons, "content", sorted=True)

    # --- output ------------------------------------------------------------------------------
    def _meta(self, tenant, req, segment, live, cversion, rversion, ranked: Ranked, started):
        timings = ranked.timings  # (ms, rounded like this total)
        timings["total"] = round((time.perf_counter() - started) * 1e6) / 1000
        return {
            "tenant_id": tenant,
            "surface": req.surface,
            "segment": segment,
            "algo_version": live.algo_version,
            "snapshot_id": live.snapshot_id,
            "config_version": cversion,
            "rules_version": rversion,
            "timings_ms": timings,
            "counts": ranked.counts,
        }

    def _response(self, live, req: RecommendRequest, ranked: Ranked, meta, warnings):
        ids = live.item_ids(ranked.items)
        explain = req.explain != "none"
        if req.include_reasons or explain:
            items = []
            for rank, (item_id, score) in enumerate(zip(ids, ranked.scores, strict=True), start=1):
                entry: dict[str, Any] = {"item_id": item_id, "rank": rank, "score": score}
                entry["reasons"] = ranked.reasons[rank - 1]
                if explain:
                    entry["explain"] = ranked.explanation(rank - 1)
                items.append(entry)
        else:
            items = [
                {"item_id": item_id, "rank": rank, "score": score}
                for rank, item_id, score in zip(
                    range(1, len(ids) + 1), ids, ranked.scores, strict=True
                )
            ]
        body: dict[str, Any] = {"items": items, "meta": meta, "warnings": warnings}
        if ranked.trace is not None:
            body["trace"] = ranked.trace
        return body

    def _count(self, tenant: str, ranked: Ranked) -> None:
        self._metrics.filtered.inc_each(tenant, ranked.filtered_by)
        self._metrics.backfilled.inc_each(tenant, ranked.backfilled_from)


_NO_ITEMS = np.zeros(0, dtype=np.int32)
_NO_ITEMS.flags.writeable = False
EXPLORATION_TEXT = "something new to discover"  # (the reason of an exploration slot's item)


def _backfill_sources(live: LiveSnapshot, req, segment: str, category_of, pool) -> list[str]:
    """`backfill_sources` with the category of the first item of `category_of` (the pool's
    top candidate when it is the pool, else the anchors) as the hint."""
    of = category_of.items if category_of is pool else category_of
    hint = int(live.category_id[of[0]]) if of.shape[0] else None
    return backfill_sources(live, req, segment, hint)


def _slot_layout(
    live: LiveSnapshot, req: RecommendRequest, ranked: Ranked, others: list[int], slot: int
):
    """(rows in their new order, [(row, cap name)] removed) of a ranked answer whose last row
    is an item to place at position `slot` among the rows `others` (the rest of the answer).
    The placed item and the pins hold their positions (a pin at the slot's moves one down);
    the ranked items fill the rest in order. Both count toward the request's `max_per_tag`
    whatever the caps say, as pins do in `Engine.run`: the last ranked items of a group past
    its cap make way."""
    new = len(ranked.items) - 1
    target = {new: slot}
    for row in others:  # (a pin's row is the position the engine gave it)
        if any(r.startswith("pin:") for r in ranked.rules[row]):
            pos = row
            while pos in target.values():
                pos += 1
            target[row] = pos
    made_way = []
    caps = Caps.build(live, req.max_per_tag, [])  # (its warnings went out with the engine's)
    if caps is not None:
        rows = [*others, new]
        members = caps.members(live, np.asarray([ranked.items[r] for r in rows], dtype=np.int32))
        over = members.sum(axis=0) - np.asarray(caps.caps)
        for i in reversed(range(len(others))):
            hit = members[i] & (over > 0)
            if others[i] not in target and hit.any():
                made_way.append((others[i], caps.names[int(hit.argmax())]))
                over -= members[i]
    gone = {row for row, _ in made_way}
    free = [r for r in others if r not in target and r not in gone]
    at = {pos: row for row, pos in target.items()}
    n, order = len(others) + 1 - len(gone), []
    for pos in range(n):
        if pos in at:
            order.append(at[pos])
        elif free:
            order.append(free.pop(0))
    # (held rows past the shorter list's end follow the others)
    return order + [at[pos] for pos in sorted(at) if pos >= n], made_way


def _item_indices(live: LiveSnapshot, ids: list[str]) -> np.ndarray:
    if not ids:
        return _NO_ITEMS
    # (a repeated id keeps its last place: anchors are in the order they happened)
    return np.asarray(list(dict.fromkeys(live.item_indices(ids[::-1])))[::-1], dtype=np.int32)


#: The constant parts of an items array of n items, for n up to 256 (~0.5 MB if all): [b'[{
#: "item_id":"', id, b'","rank":1,"score":', score, b'},{"item_id":"', ..., b'}]'] with None
#: in the 2n slots of the ids and scores.
_ITEMS_PARTS: list[list[bytes | None]] = [[b"[]"]]


def _items_parts(n: int) -> list[bytes | None]:
    if n >= 256:
        return _item_parts(n)
    while len(_ITEMS_PARTS) <= n:
        _ITEMS_PARTS.append(_item_parts(len(_ITEMS_PARTS)))
    return _ITEMS_PARTS[n]


def _item_parts(n: int) -> list[bytes | None]:
    parts: list[bytes | None] = [b'[{"item_id":"']
    for r in range(1, n + 1):
        parts += [None, b'","rank":%d,"score":' % r, None, b'},{"item_id":"' if r < n else b"}]"]
    return parts


def items_json_fields(id_fields: list[bytes], scores: list[float]) -> bytes:
    """The `items` array of plain items ({"item_id", "rank", "score"} in rank order) exactly as
    orjson.dumps writes it, from each id as orjson writes it between its quotes
    (`LiveSnapshot.item_ids_json`) and one dumps of the scores, in one join."""
    n = len(id_fields)
    if not n:
        return b"[]"
    parts = _items_parts(n).copy()
    parts[1::4] = id_fields
    parts[3::4] = orjson.dumps(scores)[1:-1].split(b",")  # (numbers hold no comma)
    return b"".join(parts)


def items_json(ids: list[str], scores: list[float]) -> bytes | None:
    """`items_json_fields` of id strings."""
    return items_json_fields([orjson.dumps(i)[1:-1] for i in ids], scores)

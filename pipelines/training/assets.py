"""Training assets: interactions, the temporal split, the candidate generators and the ranker.

Every asset loops over tenants and reads the validated warehouse tables through the storage
resource. Two hybrid models come out per tenant (``recsys.models.hybrid.fit_eval_and_final``):
``eval/hybrid``, fitted on the train part of the split and scored by ``model_evaluation``, and
``final/hybrid``, refitted on all events with the configuration chosen and evaluated on the
train part; that one is registered and published. Each hybrid folder holds its generators.

The generators and the ranker are one step (``train_models``, a multi-asset that still shows
each model as its own asset): they share the datasets and the fitted generators in memory,
where separate steps re-read the events, rebuilt the datasets and re-loaded every model.
"""

import functools
import json
import posixpath
import tempfile
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import dagster as dg
import polars as pl

from pipelines.resources import StorageResource
from pipelines.training.config import InteractionsConfig, SplitConfig, TrainingConfig
from pipelines.training.features import catalogue_at_cutoff
from recsys import ingest
from recsys.contract import DEFAULT_EVENT_WEIGHTS
from recsys.durable import write_atomic
from recsys.features import read_log
from recsys.models.data import (
    EventSource,
    collect_in_time_order,
    events_of,
    scan_split,
    temporal_split_scan,
    write_interactions,
)
from recsys.models.hybrid import (
    HybridConfig,
    fit_eval_and_final,
    popularity_only,
)
from recsys.models.importance import permutation_importance
from recsys.storage import Storage
from recsys.tenancy import is_valid_tenant
from serving.documents import declared_event_types

GROUP = "training"
#: asset name -> the generators it stands for in the hybrid
GENERATOR_ASSETS: dict[str, tuple[str, ...]] = {
    "popularity_model": ("popularity", "category"),
    "cooccurrence_model": ("cooccurrence", "recent"),
    "lightfm_model": ("lightfm",),
    "ease_model": ("ease",),
}


# --- reading and writing -------------------------------------------------------------------------
def tenants(store: Storage, wanted: list[str]) -> list[str]:
    """`wanted`, else every tenant with a validated events folder."""
    if wanted:
        return list(wanted)
    root = store.path("warehouse")
    if not store.exists(root):
        return []
    found = [posixpath.basename(p.rstrip("/")) for p in store.fs.ls(root, detail=False)]
    return sorted(t for t in found if is_valid_tenant(t) and store.exists(store.events_dir(t)))


#: the event columns the models and the evaluation read (not the value, session or context:
#: the context JSON alone was most of the bytes of every copy of the events a fit holds)
MODEL_EVENT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "timestamp")


def read_inputs(
    store: Storage, tenant: str, parts: list[str] | None = None
) -> tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame | None]:
    """Validated events (`MODEL_EVENT_COLUMNS`) in time order, items and users (None when the
    table does not exist) of a tenant.

    The events are held once: read already in `temporal_split`'s order, every split of them
    (the train part, the fit's windows, the permutation importance's parts) is slices of this
    frame, not a sorted copy beside it (three were held beside the frame as read). Held
    small, with the same models (tested):
    * the type, user id and item id as Categoricals: 4 bytes an event each instead of a
      16-byte string view (plus the bytes of an id longer than 12); the tables joined to
      them are cast to them, and the folded pairs back to strings (`id_types`);
    * the event ids by their ranks in time order (`collect_in_time_order`'s `rank_ids`: all
      the models read of an id is that order).
    10M demo events: 852 MiB as strings; the type alone a Categorical, 713 MiB."""
    events = read_model_events(store, tenant, parts)
    tables = []
    for name in ("items", "users"):
        path = store.table_path(tenant, name)
        tables.append(pl.read_parquet(path) if store.exists(path) else None)
    return events, tables[0], tables[1]


def read_model_events(
    store: Storage, tenant: str, parts: list[str] | None = None, test_fraction: float = 0.0
) -> pl.DataFrame:
    """The events as `read_inputs` holds them: of every part file, or of `parts`
    (`ingest.event_parts` taken earlier: the same events again, read anew); with
    `test_fraction`, their train part alone (see :class:`TenantEvents`)."""
    try:
        scan = ingest.scan_events(store, tenant, parts).select(MODEL_EVENT_COLUMNS)
        typed = scan.with_columns(pl.col("event_type", "user_id", "item_id").cast(pl.Categorical))
        return collect_in_time_order(typed, rank_ids=True, test_fraction=test_fraction)
    except FileNotFoundError as e:  # a deletion compacted a day while the step ran
        raise _events_changed(tenant, e) from e


def _events_changed(tenant: str, why) -> RuntimeError:
    return RuntimeError(
        f"{tenant}: the events changed while they were being read again ({why}); run the step again"
    )


@dataclass(frozen=True)
class TenantEvents:
    """A tenant's events read anew, from the part files listed when the step first read
    them (`ingest.event_parts`: parts are never rewritten, so the same events each time), as
    a training phase needs them (an :class:`~recsys.models.data.EventReader`): called, the
    frame `read_model_events` gives (the train part alone with `test_fraction`); `scan`, a
    lazy scan of the parts for the folds that stream them (the holdouts' labels)."""

    store: Storage
    tenant: str
    parts: list[str]

    def __call__(self, test_fraction: float = 0.0) -> pl.DataFrame:
        return read_model_events(self.store, self.tenant, self.parts, test_fraction)

    def scan(self) -> pl.LazyFrame:
        gone = [p for p in self.parts if not self.store.exists(p)]
        if gone:  # (a deletion compacted a day while the step ran)
            raise _events_changed(self.tenant, f"{len(gone)} part file(s) gone: {gone[0]}")
        return ingest.scan_events(self.store, self.tenant, self.parts)


def model_path(store: Storage, tenant: str, *parts: str) -> str:
    return posixpath.join(store.models_dir(tenant), *parts)


def save_model(store: Storage, model, path: str) -> None:
    """`model.save` into folder `path` of the storage: in place on a local root, else into a
    local temporary folder uploaded file by file (a worker needs no disk shared with others:
    the data root's URI is enough)."""
    if "://" not in store.root:
        model.save(path)
        return
    with tempfile.TemporaryDirectory(prefix="recsys-model-") as tmp:
        model.save(tmp)
        store.put_dir(tmp, path)


def load_hybrid(store: Storage, path: str):
    """The hybrid model saved in folder `path` of the storage (see `save_model`)."""
    from recsys.models.hybrid import HybridRecommender

    if "://" not in store.root:
        return HybridRecommender.load(path)
    with tempfile.TemporaryDirectory(prefix="recsys-model-") as tmp:
        store.get_dir(path, tmp)
        return HybridRecommender.load(tmp)  # (read whole: the folder can go)


def write_json(store: Storage, path: str, obj) -> None:
    store.makedirs(posixpath.dirname(path))
    # whole for readers; derived from the warehouse, so not fsync'd (a run recomputes it)
    write_atomic(path, json.dumps(obj, indent=2, default=str).encode(), store.fs, sync=False)


def read_json(store: Storage, path: str):
    with store.fs.open(path) as f:
        return json.load(f)


def hybrid_config(store: Storage, tenant: str, config: TrainingConfig) -> HybridConfig:
    """The HybridConfig of a fit: what the upstream assets recorded for `tenant` (weights,
    half-life, validation window) plus the run's model hyperparameters."""
    inter = read_json(store, model_path(store, tenant, "interactions.json"))
    split = read_json(store, model_path(store, tenant, "split.json"))
    lf, rk = config.lightfm, config.ranker
    return HybridConfig(
        weights=inter["weights"],
        half_life_days=inter["half_life_days"],
        validation_fraction=split["validation_fraction"],
        tune={
            "ease": [{"l2": v} for v in config.tune.ease_l2],
            "cooccurrence": [{"shrink": v} for v in config.tune.cooccurrence_shrink],
        },
        tune_max_users=config.tune.max_users,
        candidates_per_generator=rk.candidates_per_generator,
        cooccurrence={
            "shrink": config.cooccurrence.shrink,
            "buy_weight": config.cooccurrence.buy_weight,
            "neighbors": config.cooccurrence.neighbors,
            "max_user_items": config.cooccurrence.max_user_items,
        },
        lightfm={
            "no_components": lf.no_components,
            "epochs": lf.epochs,
            "learning_rate": lf.learning_rate,
            "item_alpha": lf.item_alpha,
            "max_sampled": lf.max_sampled,
            "use_item_features": lf.use_item_features,
            "seed": lf.seed,
            "num_threads": lf.num_threads,
            "max_updates": lf.max_updates,
        },
        lightfm_early_stopping=(
            {"eval_every": lf.eval_every, "patience": lf.patience, "max_users": 1000}
            if lf.early_stopping
            else None
        ),
        ease={"l2": config.ease.l2, "max_items": config.ease.max_items},
        recent=config.recent.model_dump(),
        generators=list(config.selection.generators) or None,
        served=config.selection.served or None,
        min_selection_users=config.selection.min_selection_users,
        weigh_lightfm=config.selection.weigh_lightfm,
        ranker={
            "max_iter": rk.max_iter,
            "learning_rate": rk.learning_rate,
            "max_leaf_nodes": rk.max_leaf_nodes,
            "min_samples_leaf": rk.min_samples_leaf,
            "l2_regularization": rk.l2_regularization,
            "early_stopping": rk.early_stopping,
            "n_iter_no_change": rk.n_iter_no_change,
            "validation_fraction": 0.1,
        },
        max_ranker_users=rk.max_users,
        max_ranker_rows=rk.max_rows,
        min_ranker_positives=rk.min_ranker_positives,
        seed=rk.seed,
    )


def _md_table(rows: list[dict]) -> dg.MetadataValue:
    if not rows:
        return dg.MetadataValue.md("_no tenants_")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


# --- assets ------------------------------------------------------------------------------
@dg.asset(group_name=GROUP, deps=["events", "items", "users"], kinds={"polars", "parquet"})
def interactions(
    context: dg.AssetExecutionContext, config: InteractionsConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """One weighted, time-decayed confidence per (user, item) and tenant
    (warehouse/<tenant>/interactions.parquet)."""
    store = storage.storage()
    rows, weights_of = [], {}
    for tenant in tenants(store, config.tenants):
        # (the contract's, the tenant's declared types and weights, then the run's overrides)
        declared = declared_event_types(store, tenant)
        weights = weights_of[tenant] = {**DEFAULT_EVENT_WEIGHTS, **declared, **config.event_weights}
        # folded from a streamed scan a range of users at a time: memory holds neither all
        # the events nor all the pairs
        scan = ingest.scan_events(store, tenant).select(MODEL_EVENT_COLUMNS)
        path = store.table_path(tenant, "interactions")
        counts = write_interactions(
            scan, path, store.fs, weights, config.half_life_days, sync=False
        )  # (sync as write_json)
        write_json(
            store,
            model_path(store, tenant, "interactions.json"),
            {"weights": weights, "half_life_days": config.half_life_days},
        )
        rows.append(
            {
                "tenant": tenant,
                "events": counts.events,
                "pairs": counts.pairs,
                "users": counts.users,
                "items": counts.items,
                "path": path,
            }
        )
        context.log.info(f"{tenant}: {counts.events:,} events -> {counts.pairs:,} pairs")
    return dg.MaterializeResult(
        metadata={
            "tenants": _md_table(rows),
            "weights": dg.MetadataValue.json(weights_of),  # (per tenant)
            "half_life_days": config.half_life_days,
            "pairs": sum(r["pairs"] for r in rows),
        }
    )


@dg.asset(group_name=GROUP, deps=[interactions], kinds={"polars"})
def data_split(
    context: dg.AssetExecutionContext, config: SplitConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """The global temporal split per tenant (models/<tenant>/split.json): train / test by time,
    and the ranker's validation window at the end of train."""
    store = storage.storage()
    rows = []
    for tenant in tenants(store, config.tenants):
        # cut on a streamed scan (temporal_split's parts, without holding the events)
        scan = ingest.scan_events(store, tenant).select(MODEL_EVENT_COLUMNS)
        s = temporal_split_scan(scan, config.test_fraction)
        v = temporal_split_scan(s.train, config.validation_fraction)
        n_events = s.n_train + s.n_test
        skip = (
            None
            if n_events >= config.min_events
            else (f"{n_events} events < min_events={config.min_events}: popularity only")
        )
        record = {
            "test_fraction": config.test_fraction,
            "validation_fraction": config.validation_fraction,
            "fit_events": v.n_train,
            "validation_events": v.n_test,
            "test_events": s.n_test,
            "validation_start": v.test_start,
            "test_start": s.test_start,
            "skip": skip,
        }
        write_json(store, model_path(store, tenant, "split.json"), record)
        rows.append({"tenant": tenant, **{k: v for k, v in record.items() if "fraction" not in k}})
        if skip:
            context.log.warning(f"{tenant}: {skip}")
    return dg.MaterializeResult(
        metadata={
            "split": _md_table(rows),
            "test_fraction": config.test_fraction,
            "validation_fraction": config.validation_fraction,
        }
    )


@dg.multi_asset(
    name="train_models",
    group_name=GROUP,
    specs=[
        dg.AssetSpec(
            "popularity_model",
            deps=[data_split],
            kinds={"numpy"},
            description="Global, trending, per-category and per-segment popularity; always "
            "fitted (the fallback).",
        ),
        dg.AssetSpec(
            "cooccurrence_model",
            deps=[data_split],
            kinds={"numpy", "scipy"},
            description="Item-item co-view / co-buy similarity (shrunk cosine), and "
            "item-to-item candidates from each user's last interactions weighted by recency "
            "(sequence transitions).",
        ),
        dg.AssetSpec(
            "lightfm_model",
            deps=[data_split],
            kinds={"numpy"},
            description="LightFM WARP, hybrid with category / brand / tag item features; the "
            "epoch count is chosen on the validation window.",
        ),
        dg.AssetSpec(
            "ease_model",
            deps=[data_split],
            kinds={"numpy"},
            description="EASE closed-form item-item model over the most popular items.",
        ),
        dg.AssetSpec(
            "ranker_model",
            deps=["popularity_model", "cooccurrence_model", "lightfm_model", "ease_model"],
            kinds={"scikitlearn", "numpy"},
            description="The second stage: a boosted-tree ranker over the merged candidates, "
            "saved with its generators as one hybrid model (models/<tenant>/<eval|final>/hybrid).",
        ),
    ],
)
def train_models(
    context: dg.AssetExecutionContext, config: TrainingConfig, storage: StorageResource
):
    """Fits every generator and the ranker for each tenant, eval and final variants (see the
    module docstring), and saves the two hybrid models."""
    store = storage.storage()
    gen_rows: dict[str, list[dict]] = {a: [] for a in GENERATOR_ASSETS}
    ranker_rows: list[dict] = []
    chosen: dict[str, dict] = {}
    for tenant in tenants(store, config.tenants):
        t0 = time.perf_counter()
        parts = ingest.event_parts(store, tenant)  # (what a phase reading them again reads)
        events, items_now, users_now = read_inputs(store, tenant, parts)
        split = read_json(store, model_path(store, tenant, "split.json"))
        train = events_of(events, split["test_fraction"])
        # item/user features as of the newest event each model fits (the published one: all
        # events; the evaluated one: the train part), not as upserted since
        log = read_log(store, tenant)
        items, users, as_of = catalogue_at_cutoff(store, tenant, events, items_now, users_now, log)
        eval_items, eval_users, eval_as_of = catalogue_at_cutoff(
            store, tenant, train, items_now, users_now, log
        )
        for name, report in (("final", as_of), ("eval", eval_as_of)):
            if report["items"]["rows_changed"] or report["users"]["rows_changed"]:
                context.log.info(f"{tenant}/{name}: catalogue as of its cut-off: {report}")
        cfg = hybrid_config(store, tenant, config)
        importance: dict[str, Any] = {}  # the evaluated ranker's, beside the published fit
        saved: dict[str, _Saved] = {}  # variant -> what the tables below read of it
        save = functools.partial(_save_fitted, store, tenant, importance, saved)
        if split["skip"]:
            save("eval", popularity_only(train, eval_items, eval_users, cfg, split["skip"], False))
            save("final", popularity_only(events, items, users, cfg, split["skip"], True))
        else:
            # a tenant small enough for the refits to run beside the window's work holds its
            # events throughout; a larger one reads them again in each phase that needs them
            # (fit_eval_and_final), so they are not held beside the generators' fits
            beside = events.height <= config.refits_beside_max_events
            source = events if beside else TenantEvents(store, tenant, parts)
            del events, train
            # the evaluated model is saved (and dropped) before the refit on all events ends
            _, final = fit_eval_and_final(
                source, items, users, cfg, split["test_fraction"],
                eval_catalogue=(eval_items, eval_users),
                beside_eval=functools.partial(
                    _ranker_importance, importance, source, split["test_fraction"], cfg.seed
                ),
                refits_beside=beside,
                on_eval=functools.partial(save, "eval"),
            )  # fmt: skip
            save("final", final)
            del final
        seconds = round(time.perf_counter() - t0, 2)
        chosen[tenant] = {
            k: saved["eval"].info[k]
            for k in ("tuning", "lightfm_early_stopping", "selection")
            if k in saved["eval"].info
        }
        for variant, model in saved.items():
            info = model.info
            gen_seconds = info.get("generator_seconds", {})
            skipped = {**info.get("generators_skipped", {})}
            for asset, names in GENERATOR_ASSETS.items():
                for name in names:
                    if name not in model.generators and name not in skipped:
                        skipped[name] = split["skip"] or "too little data"
                    gen_rows[asset].append(
                        {
                            "tenant": tenant,
                            "variant": variant,
                            "model": name,
                            "users": model.n_users,
                            "items": model.n_items,
                            "seconds": round(gen_seconds.get(name, 0.0), 3),
                            "skipped": skipped.get(name, ""),
                        }
                    )
                    if name in skipped:
                        context.log.warning(f"{tenant}/{variant}/{name} skipped: {skipped[name]}")
            ranker_rows.append(
                {
                    "tenant": tenant,
                    "variant": variant,
                    "users": info.get("ranker_users", 0),
                    "rows": info.get("ranker_rows", 0),
                    "positives": info.get("ranker_positives", 0),
                    "trees": info.get("ranker_trees", 0),
                    "served": info.get("served_by", ""),
                    "candidate_recall": round(info.get("candidate_recall", 0.0), 3),
                    "skipped": info.get("ranker_skipped") or "",
                    "seconds": round(info.get("ranker_seconds", 0.0), 2),
                }
            )
            if info.get("ranker_skipped"):
                context.log.warning(
                    f"{tenant}/{variant}: ranker skipped ({info['ranker_skipped']}); "
                    f"order falls back to {info['fallback_order']}"
                )
        context.log.info(f"{tenant}: eval and final models fitted in {seconds}s")
        selection = saved["final"].info.get("selection") or {}
        context.log.info(
            f"{tenant}: serves {saved['final'].info.get('served_by')} "
            f"({selection.get('reason', 'no selection recorded')})"
        )
    params = config.model_dump()
    for asset in GENERATOR_ASSETS:
        key = asset.removesuffix("_model")
        yield dg.MaterializeResult(
            asset_key=asset,
            metadata={
                "models": _md_table(gen_rows[asset]),
                "params": dg.MetadataValue.json(params.get(key, {})),
                # a pattern, not a tenant's path (model_path checks the tenant id)
                "path": posixpath.join(store.path("models"), "<tenant>", "<eval|final>", "hybrid"),
            },
        )
    yield dg.MaterializeResult(
        asset_key="ranker_model",
        metadata={
            "ranker": _md_table(ranker_rows),
            "params": dg.MetadataValue.json(params["ranker"]),
            "chosen_on_validation": dg.MetadataValue.json(chosen),
        },
    )


class _Saved(NamedTuple):
    """What the step's tables read of a saved model."""

    info: dict[str, Any]
    generators: frozenset[str]
    n_users: int
    n_items: int


def _save_fitted(store, tenant: str, importance: dict, saved: dict, variant: str, model) -> None:
    """Save a tenant's fitted model (the published one with the evaluated ranker's
    importance) and keep in ``saved[variant]`` only what the step's tables read of it."""
    if variant == "final" and "value" in importance:
        model.info["permutation_importance"] = importance["value"]
    save_model(store, model, model_path(store, tenant, variant, "hybrid"))
    saved[variant] = _Saved(
        model.info, frozenset(model.generators_), len(model.user_ids_), len(model.item_ids_)
    )


def _ranker_importance(
    out: dict, events: EventSource, test_fraction: float, seed: int, eval_model
) -> None:
    """``out["value"]``: the permutation importance of `eval_model`'s ranker on the evaluation
    window (logged to MLflow)."""
    parts = scan_split(events, test_fraction)  # (a reader's: folded from its scan, not held)
    out["value"] = permutation_importance(eval_model, parts.train, parts.test, seed=seed)

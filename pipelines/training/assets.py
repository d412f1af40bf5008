"""Training assets: interactions, the temporal split, the candidate generators and the ranker.

Every asset loops over tenants and reads the validated warehouse tables through the storage
resource. Each model is fitted twice: on the train part of the split (``eval/``, scored by
``model_evaluation``) and on all events (``final/``, the version that is registered and
published). Model folders live under ``Storage.models_dir(tenant)``.
"""

import json
import os
import posixpath
import time

import dagster as dg
import polars as pl

from pipelines.resources import StorageResource
from pipelines.training.config import (
    CooccurrenceConfig,
    EASEConfig,
    InteractionsConfig,
    LightFMConfig,
    PopularityConfig,
    RankerConfig,
    SplitConfig,
)
from recsys import ingest
from recsys.contract import DEFAULT_EVENT_WEIGHTS
from recsys.models.base import Recommender
from recsys.models.data import build_dataset, temporal_split
from recsys.models.data import interactions as fold_interactions
from recsys.models.hybrid import HybridConfig, HybridRecommender, fit_generators
from recsys.storage import Storage

GROUP = "training"
VARIANTS = ("eval", "final")  # fitted on the train part / on all events


# --- reading and writing -------------------------------------------------------------------------
def tenants(store: Storage, wanted: list[str]) -> list[str]:
    """`wanted`, else every tenant with a validated events folder."""
    if wanted:
        return list(wanted)
    root = store.path("warehouse")
    if not store.exists(root):
        return []
    found = [posixpath.basename(p.rstrip("/")) for p in store.fs.ls(root, detail=False)]
    return sorted(t for t in found if store.exists(store.events_dir(t)))


def read_inputs(
    store: Storage, tenant: str
) -> tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame | None]:
    """Validated events, items and users (None when the table does not exist) of a tenant."""
    events = ingest.read_events(store, tenant)
    tables = []
    for name in ("items", "users"):
        path = store.table_path(tenant, name)
        tables.append(pl.read_parquet(path) if store.exists(path) else None)
    return events, tables[0], tables[1]


def model_path(store: Storage, tenant: str, *parts: str) -> str:
    return store.path("models", tenant, *parts)


def write_json(store: Storage, path: str, obj) -> None:
    store.makedirs(posixpath.dirname(path))
    with store.fs.open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def read_json(store: Storage, path: str):
    with store.fs.open(path) as f:
        return json.load(f)


def hybrid_config(store: Storage, tenant: str) -> HybridConfig:
    """The HybridConfig implied by what the upstream assets recorded for `tenant`."""
    inter = read_json(store, model_path(store, tenant, "interactions.json"))
    split = read_json(store, model_path(store, tenant, "split.json"))
    cfg = HybridConfig(
        weights=inter["weights"],
        half_life_days=inter["half_life_days"],
        validation_fraction=split["validation_fraction"],
        tune={},
    )
    for name in ("cooccurrence", "lightfm", "ease"):
        p = model_path(store, tenant, "final", name, "params.json")
        if store.exists(p):
            setattr(cfg, name, read_json(store, p)["params"])
    return cfg


def split_events(store: Storage, tenant: str, events: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """{'eval': train part, 'final': all events} per the recorded split."""
    split = read_json(store, model_path(store, tenant, "split.json"))
    return {"eval": temporal_split(events, split["test_fraction"]).train, "final": events}


def variant_dataset(store: Storage, tenant: str, variant: str, events, items, users):
    cfg = hybrid_config(store, tenant)
    return build_dataset(
        events,
        items,
        users,
        weights=cfg.weights,
        half_life_days=cfg.half_life_days,
        include_catalog_items=(variant == "final"),
    )


def _md_table(rows: list[dict]) -> dg.MetadataValue:
    if not rows:
        return dg.MetadataValue.md("_no tenants_")
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return dg.MetadataValue.md("\n".join(lines))


# --- assets ----------------------------------------------------------------------------------------
@dg.asset(group_name=GROUP, deps=["events", "items", "users"], kinds={"polars", "parquet"})
def interactions(
    context: dg.AssetExecutionContext, config: InteractionsConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """One weighted, time-decayed confidence per (user, item) and tenant
    (warehouse/<tenant>/interactions.parquet)."""
    store = storage.storage()
    weights = {**DEFAULT_EVENT_WEIGHTS, **config.event_weights}
    rows = []
    for tenant in tenants(store, config.tenants):
        events, _, _ = read_inputs(store, tenant)
        inter = fold_interactions(events, weights, config.half_life_days)
        path = store.table_path(tenant, "interactions")
        with store.fs.open(path, "wb") as f:
            inter.frame.write_parquet(f)
        write_json(
            store,
            model_path(store, tenant, "interactions.json"),
            {"weights": weights, "half_life_days": config.half_life_days},
        )
        rows.append(
            {
                "tenant": tenant,
                "events": events.height,
                "pairs": inter.frame.height,
                "users": inter.n_users,
                "items": inter.n_items,
                "path": path,
            }
        )
        context.log.info(f"{tenant}: {events.height:,} events -> {inter.frame.height:,} pairs")
    return dg.MaterializeResult(
        metadata={
            "tenants": _md_table(rows),
            "weights": dg.MetadataValue.json(weights),
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
        events, _, _ = read_inputs(store, tenant)
        s = temporal_split(events, config.test_fraction, config.validation_fraction)
        skip = (
            None
            if events.height >= config.min_events
            else (f"{events.height} events < min_events={config.min_events}: popularity only")
        )
        record = {
            "test_fraction": config.test_fraction,
            "validation_fraction": config.validation_fraction,
            "fit_events": s.fit.height,
            "validation_events": s.validation.height,
            "test_events": s.test.height,
            "validation_start": s.validation_start,
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


def _generator_asset(
    asset_name: str, names: tuple[str, ...], config_cls, to_params, description: str
):
    @dg.asset(
        name=asset_name,
        group_name=GROUP,
        deps=[data_split],
        kinds={"numpy"},
        description=description,
    )
    def _asset(
        context: dg.AssetExecutionContext, config: config_cls, storage: StorageResource
    ) -> dg.MaterializeResult:
        store = storage.storage()
        params = to_params(config)
        rows = []
        for tenant in tenants(store, config.tenants):
            events, items, users = read_inputs(store, tenant)
            split = read_json(store, model_path(store, tenant, "split.json"))
            parts = split_events(store, tenant, events)
            for variant in VARIANTS:
                data = variant_dataset(store, tenant, variant, parts[variant], items, users)
                cfg = hybrid_config(store, tenant)
                for name in names:
                    if name in params:
                        setattr(cfg, name, params[name])
                wanted = names if not split["skip"] or names[0] == "popularity" else ()
                models, skipped, seconds = fit_generators(data, cfg, wanted)
                if split["skip"] and not wanted:
                    skipped = {n: split["skip"] for n in names}
                for name in names:
                    out = model_path(store, tenant, variant, name)
                    if name in models:
                        models[name].save(out)
                    elif store.exists(out):
                        store.fs.rm(out, recursive=True)  # a stale model must not be picked up
                    rows.append(
                        {
                            "tenant": tenant,
                            "variant": variant,
                            "model": name,
                            "users": data.n_users,
                            "items": data.n_items,
                            "seconds": round(seconds.get(name, 0.0), 3),
                            "skipped": skipped.get(name, ""),
                        }
                    )
                    if name in skipped:
                        context.log.warning(f"{tenant}/{variant}/{name} skipped: {skipped[name]}")
        return dg.MaterializeResult(
            metadata={
                "models": _md_table(rows),
                "params": dg.MetadataValue.json(params),
                "path": model_path(store, "<tenant>", "<eval|final>"),
            }
        )

    return _asset


popularity_model = _generator_asset(
    "popularity_model",
    ("popularity", "category"),
    PopularityConfig,
    lambda c: {},
    "Global, trending, per-category and per-segment popularity; always fitted (the fallback).",
)
cooccurrence_model = _generator_asset(
    "cooccurrence_model",
    ("cooccurrence",),
    CooccurrenceConfig,
    lambda c: {
        "cooccurrence": {"shrink": c.shrink, "buy_weight": c.buy_weight, "neighbors": c.neighbors}
    },
    "Item-item co-view / co-buy similarity (shrunk cosine).",
)
lightfm_model = _generator_asset(
    "lightfm_model",
    ("lightfm",),
    LightFMConfig,
    lambda c: {
        "lightfm": {
            "no_components": c.no_components,
            "epochs": c.epochs,
            "learning_rate": c.learning_rate,
            "item_alpha": c.item_alpha,
            "max_sampled": c.max_sampled,
            "use_item_features": c.use_item_features,
            "seed": c.seed,
            "num_threads": c.num_threads,
        }
    },
    "LightFM WARP, hybrid with category / brand / tag item features.",
)
ease_model = _generator_asset(
    "ease_model",
    ("ease",),
    EASEConfig,
    lambda c: {"ease": {"l2": c.l2, "max_items": c.max_items}},
    "EASE closed-form item-item model.",
)


@dg.asset(
    group_name=GROUP,
    deps=[popularity_model, cooccurrence_model, lightfm_model, ease_model],
    kinds={"scikitlearn", "numpy"},
)
def ranker_model(
    context: dg.AssetExecutionContext, config: RankerConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """The second stage: a boosted-tree ranker over the merged candidates, trained on the
    newest window of each variant's events, saved with its generators as one hybrid model
    (models/<tenant>/<eval|final>/hybrid)."""
    store = storage.storage()
    params = {
        "candidates_per_generator": config.candidates_per_generator,
        "min_ranker_positives": config.min_ranker_positives,
        "seed": config.seed,
        "ranker": {
            "max_iter": config.max_iter,
            "learning_rate": config.learning_rate,
            "max_leaf_nodes": config.max_leaf_nodes,
            "min_samples_leaf": config.min_samples_leaf,
            "l2_regularization": config.l2_regularization,
        },
    }
    rows = []
    for tenant in tenants(store, config.tenants):
        events, items, users = read_inputs(store, tenant)
        parts = split_events(store, tenant, events)
        for variant in VARIANTS:
            t0 = time.perf_counter()
            cfg = hybrid_config(store, tenant)
            for k, v in params.items():
                setattr(cfg, k, v)
            cfg.include_catalog_items = variant == "final"
            data = variant_dataset(store, tenant, variant, parts[variant], items, users)
            gens: dict[str, Recommender] = {}
            for name in ("popularity", "category", "cooccurrence", "lightfm", "ease"):
                p = model_path(store, tenant, variant, name)
                if store.exists(os.path.join(p, "params.json")):
                    gens[name] = Recommender.load(p)
            model = HybridRecommender(cfg).fit(
                parts[variant], items, users, generators=gens, data=data
            )
            model.save(model_path(store, tenant, variant, "hybrid"))
            info = model.info
            rows.append(
                {
                    "tenant": tenant,
                    "variant": variant,
                    "rows": info.get("ranker_rows", 0),
                    "positives": info.get("ranker_positives", 0),
                    "candidate_recall": round(info.get("candidate_recall", 0.0), 3),
                    "skipped": info.get("ranker_skipped") or "",
                    "seconds": round(time.perf_counter() - t0, 2),
                }
            )
            if info.get("ranker_skipped"):
                context.log.warning(
                    f"{tenant}/{variant}: ranker skipped ({info['ranker_skipped']}); "
                    f"order falls back to {info['fallback_order']}"
                )
    return dg.MaterializeResult(
        metadata={"ranker": _md_table(rows), "params": dg.MetadataValue.json(params)}
    )

"""Publish assets: per-user top-N (sharded), item lists, fallbacks, and the serving snapshot.

All the work is in `recsys.snapshot.build` (Dagster-free); these assets choose the model,
the shard and the paths, and report metadata. Nothing runs unless the champion gate passed:
every asset depends on `champion_model`, whose `champion_not_regressed` check is blocking.
"""

import hashlib
import json
import os
from dataclasses import asdict
from typing import Any

import dagster as dg

from pipelines.publish.config import PublishConfig
from pipelines.publish.partitions import N_USER_SHARDS, shard_number, user_shards
from pipelines.resources import StorageResource
from pipelines.training.assets import model_path, read_inputs, read_json, tenants
from recsys.snapshot import SnapshotStore
from recsys.snapshot import build as snapbuild
from recsys.storage import Storage

GROUP = "publish"


class _Champion:
    """The model a tenant publishes: the final fit, as admitted by the champion gate."""

    def __init__(self, store: Storage, tenant: str) -> None:
        from recsys.models.hybrid import HybridRecommender

        gate_path = model_path(store, tenant, "gate.json")
        if not store.exists(gate_path):
            raise dg.Failure(
                f"{tenant}: no champion gate decision ({gate_path}); "
                "materialize champion_model first"
            )
        self.gate: dict[str, Any] = read_json(store, gate_path)
        if not self.gate.get("promoted") and self.gate.get("candidate_ndcg_at_10") is not None:
            raise dg.Failure(
                f"{tenant}: the new model was not promoted ({self.gate.get('reason')}); "
                "nothing to publish"
            )
        self.model = HybridRecommender.load(model_path(store, tenant, "final", "hybrid"))
        run_id = str(self.gate.get("run_id") or "")
        self.key = (
            f"{self.gate.get('model', 'model')}-v{self.gate.get('version', '0')}-{run_id[:12]}"
        )
        self.info = {
            "champion": {
                "name": self.gate.get("model"),
                "version": self.gate.get("version"),
                "run_id": self.gate.get("run_id"),
            }
        }
        cfg = asdict(self.model.config)  # the configuration the served model was fitted with
        self.config_version = hashlib.sha256(
            json.dumps(cfg, sort_keys=True, default=str).encode()
        ).hexdigest()[:12]


def _snapshots(store: Storage, tenant: str, keep: int = 5) -> SnapshotStore:
    return SnapshotStore(store.snapshots_dir(tenant), keep=keep)


@dg.asset(
    group_name=GROUP,
    partitions_def=user_shards,
    deps=["champion_model"],
    kinds={"numpy", "parquet"},
)
def user_recommendations(
    context: dg.AssetExecutionContext, config: PublishConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Final top-N per user with per-signal parts and reasons, by contiguous user shards
    (staged under snapshots/<tenant>/.staging/<model>/). Run without a partition (the
    end-to-end job) it computes every shard, two side by side; memory stays bounded by two
    shards."""
    store = storage.storage()
    shards = (
        [shard_number(context.partition_key)]
        if context.has_partition_key
        else list(range(N_USER_SHARDS))
    )
    rows, summary = 0, []
    for tenant in tenants(store, config.tenants):
        champ = _Champion(store, tenant)
        snaps = _snapshots(store, tenant)
        done = snapbuild.compute_shards(
            champ.model, snaps.root, champ.key, shards, N_USER_SHARDS, config.n_per_user
        )
        for shard, (path, n) in zip(shards, done, strict=True):
            start, stop = snapbuild.shard_bounds(len(champ.model.user_ids_), shard, N_USER_SHARDS)
            rows += n
            summary.append(
                {"tenant": tenant, "shard": shard, "users": stop - start, "rows": n, "path": path}
            )
        context.log.info(f"{tenant}: shards {shards} staged for model {champ.key}")
    return dg.MaterializeResult(
        metadata={
            "rows": rows,
            "shards": dg.MetadataValue.json(summary),
            "n_per_user": config.n_per_user,
        }
    )


@dg.asset(group_name=GROUP, deps=["champion_model"], kinds={"numpy", "parquet"})
def item_similarities(
    context: dg.AssetExecutionContext, config: PublishConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Per item, the nearest items by LightFM embedding ('emb') and by co-occurrence ('cooc')."""
    store = storage.storage()
    meta: dict[str, Any] = {}
    for tenant in tenants(store, config.tenants):
        champ = _Champion(store, tenant)
        lists = snapbuild.similar_lists(champ.model, config.n_similar)
        snapbuild.write_item_lists(_snapshots(store, tenant).root, champ.key, similar=lists)
        meta[f"{tenant}/pairs"] = dg.MetadataValue.json({k: f.height for k, f in lists.items()})
        if not lists:
            context.log.warning(f"{tenant}: the model has neither LightFM nor co-occurrence lists")
    return dg.MaterializeResult(metadata=meta)


@dg.asset(group_name=GROUP, deps=["champion_model"], kinds={"numpy", "parquet"})
def fallback_lists(
    context: dg.AssetExecutionContext, config: PublishConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Lists for users the model cannot serve: popular, trending, per category, tag, segment."""
    store = storage.storage()
    meta: dict[str, Any] = {}
    for tenant in tenants(store, config.tenants):
        champ = _Champion(store, tenant)
        events, items, users = read_inputs(store, tenant)
        table = snapbuild.aligned_items([str(i) for i in champ.model.item_ids_], items)
        lists = snapbuild.fallback_lists(champ.model, table, users, events, k=config.n_fallback)
        snapbuild.write_item_lists(_snapshots(store, tenant).root, champ.key, fallbacks=lists)
        meta[f"{tenant}/lists"] = len(lists)
        meta[f"{tenant}/popular_top10"] = dg.MetadataValue.json(
            [str(champ.model.item_ids_[i]) for i in lists["popular"][0][:10]]
        )
        context.log.info(f"{tenant}: {len(lists)} fallback lists")
    return dg.MaterializeResult(metadata=meta)


@dg.asset(
    group_name=GROUP,
    deps=["champion_model", user_recommendations, item_similarities, fallback_lists],
    kinds={"numpy", "duckdb"},
)
def serving_snapshot(
    context: dg.AssetExecutionContext, config: PublishConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Assembles the staged shards and lists into a versioned snapshot, verifies it (checksums,
    schema, counts, a full open) and makes it live by replacing snapshots/<tenant>/CURRENT.
    A failure anywhere leaves the live snapshot untouched."""
    store = storage.storage()
    meta: dict[str, Any] = {}
    rows = []
    for tenant in tenants(store, config.tenants):
        champ = _Champion(store, tenant)
        snaps = _snapshots(store, tenant, config.keep)
        previous = snaps.current_id()
        events, items, users = read_inputs(store, tenant)
        sid, manifest = snapbuild.assemble_snapshot(
            snaps,
            tenant=tenant,
            model=champ.model,
            model_key=champ.key,
            n_shards=N_USER_SHARDS,
            k=config.n_per_user,
            items=items,
            users=users,
            events=events,
            models_info=champ.info,
            config_version=champ.config_version,
            n_similar=config.n_similar,
            log=context.log,
        )
        row: dict[str, Any] = {
            "tenant": tenant,
            "snapshot": sid,
            "previous": previous,
            **{k: manifest["counts"][k] for k in ("users", "items", "candidates")},
        }
        if previous and config.diff_k and previous in snaps.ids():
            d = snaps.diff(previous, sid, k=config.diff_k)
            row[f"top{config.diff_k}_changed"] = f"{d.users_changed} ({d.changed_fraction:.1%})"
        rows.append(row)
        meta[f"{tenant}/path"] = dg.MetadataValue.path(os.path.join(snaps.root, sid))
        meta[f"{tenant}/bytes"] = sum(f["bytes"] for f in manifest["files"].values())
        context.log.info(f"{tenant}: published {sid} (was {previous})")
    meta["published"] = dg.MetadataValue.json(rows)
    return dg.MaterializeResult(metadata=meta)

"""Publish assets: per-user top-N (sharded), item lists, fallbacks, and the serving snapshot.

All the work is in `recsys.snapshot.build` (Dagster-free); these assets choose the model,
the shard and the paths, and report metadata. Nothing runs unless the champion gate passed:
every asset depends on `champion_model`, whose `champion_not_regressed` check is blocking.
"""

import functools
import hashlib
import json
import os
import posixpath
import tempfile
from dataclasses import asdict
from typing import Any

import dagster as dg

from pipelines.publish.config import PublishConfig
from pipelines.publish.partitions import (
    DEFAULT_USER_SHARDS,
    SHARD_STEPS_TAG,
    shard_number,
    user_shards_partitions,
)
from pipelines.resources import StorageResource
from pipelines.training.assets import load_hybrid, model_path, read_json, tenants
from recsys.durable import write_atomic
from recsys.snapshot import SnapshotStore
from recsys.snapshot import build as snapbuild
from recsys.snapshot.format import CURRENT
from recsys.storage import Storage

GROUP = "publish"


class _Champion:
    """The model a tenant publishes: the final fit, as admitted by the champion gate. The gate
    is read at once (cheap: it names the model version); the model itself on first use, through
    a per-process cache, so the shard steps a worker process runs load it once.

    With `version` (PublishConfig.model_version): that registered version of recsys-<tenant>
    instead, its artifacts downloaded from MLflow once under models/<tenant>/versions/."""

    def __init__(
        self, store: Storage, tenant: str, version: str = "", mlflow_uri: str | None = None
    ) -> None:
        if version:
            self._from_registry(store, tenant, version, mlflow_uri or store.mlflow_uri())
            return
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
        self.path = model_path(store, tenant, "final", "hybrid")
        self._store = store
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

    def _from_registry(self, store: Storage, tenant: str, version: str, uri: str) -> None:
        from mlflow.exceptions import MlflowException

        from recsys import tracking

        name = tracking.registered_model_name(tenant)
        try:
            mv = tracking._client(uri).get_model_version(name, version)
        except MlflowException as ex:
            raise dg.Failure(f"{tenant}: no version {version} of {name} in MLflow ({ex})") from None
        self.gate = {"model": name, "version": str(mv.version), "run_id": mv.run_id}
        self.path = model_path(store, tenant, "versions", f"v{mv.version}", "hybrid")
        self._store = store
        if not store.exists(os.path.join(self.path, "hybrid.json")):
            _download_version(mv.source, self.path, uri)
        self.key = f"{name}-v{mv.version}-{str(mv.run_id or '')[:12]}"
        self.info = {"champion": {"name": name, "version": str(mv.version), "run_id": mv.run_id}}

    @property
    def model(self) -> Any:
        return _load_model(self._store.root, self.path, _folder_stamp(self._store, self.path))

    @property
    def config_version(self) -> str:
        cfg = asdict(self.model.config)  # the configuration the served model was fitted with
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[
            :12
        ]


def _download_version(source: str, path: str, uri: str) -> None:
    """A registered version's model folder, downloaded to `path` (a local folder: renamed into
    place whole, so a concurrent step never reads half a model)."""
    import shutil
    import tempfile

    import mlflow

    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=parent)
    try:
        got = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=tmp, tracking_uri=uri
        )
        try:
            os.rename(got, path)
        except OSError:
            if not os.path.exists(os.path.join(path, "hybrid.json")):  # (not another step's)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _champion(store: Storage, tenant: str, config: PublishConfig):
    """The model this run publishes for `tenant` (the gate's champion or config.model_version,
    from the MLflow store at config.mlflow_uri, default the data root's)."""
    return _Champion(store, tenant, config.model_version, config.mlflow_uri or None)


def _folder_stamp(store: Storage, path: str) -> str:
    """Names, sizes and modification times of a model folder's files: a new fit at the same
    path gives another stamp, so the cache below never serves a stale model."""
    if not store.exists(path):
        raise dg.Failure(f"no final model at {path}; materialize train_models first")
    files = store.fs.find(path, detail=True)
    return json.dumps(
        sorted(
            (k, v.get("size"), str(v.get("mtime") or v.get("LastModified")))
            for k, v in files.items()
        )
    )


@functools.lru_cache(maxsize=1)
def _load_model(root: str, path: str, stamp: str) -> Any:
    return load_hybrid(Storage(root), path)


def snapshot_store(store: Storage, tenant: str, keep: int = 5) -> SnapshotStore:
    """The tenant's snapshot store: under the data root when that is a folder (plain or
    ``file://``); on an object store, a working copy on this host's disk (a snapshot is
    memory-mapped, so it is assembled and verified locally, then uploaded under the root by
    `_upload_snapshot` for serving hosts' ``recsys snapshot fetch``)."""
    if _is_folder(store):
        return SnapshotStore(store.snapshots_dir(tenant), keep=keep)
    key = hashlib.sha256(store.root.encode()).hexdigest()[:12]
    local = os.path.join(tempfile.gettempdir(), "recsys-snapshots", key, tenant)
    return SnapshotStore(local, keep=keep)


def _is_folder(store: Storage) -> bool:
    return "://" not in store.root or store.root.startswith("file://")


def _upload_snapshot(store: Storage, tenant: str, snaps: SnapshotStore, sid: str, live: bool):
    """Snapshot `sid` of the working copy `snaps` copied under the object-store root, then
    (`live`) the root's CURRENT replaced to name it: fetchers never see a partial one."""
    remote = store.snapshots_dir(tenant)
    store.put_dir(snaps.path_of(sid), posixpath.join(remote, sid))
    if live:
        write_atomic(posixpath.join(remote, CURRENT), f"{sid}\n".encode(), store.fs)


def _remote_current(store: Storage, tenant: str) -> str | None:
    try:
        raw = store.fs.cat_file(posixpath.join(store.snapshots_dir(tenant), CURRENT))
    except FileNotFoundError:
        return None
    return raw.decode().strip() or None


def _items_users(store: Storage, tenant: str) -> tuple[Any, Any]:
    """The items and users tables (None when absent): small, read whole."""
    import polars as pl

    out = []
    for name in ("items", "users"):
        path = store.table_path(tenant, name)
        out.append(pl.read_parquet(path) if store.exists(path) else None)
    return out[0], out[1]


def _segment_events(store: Storage, tenant: str) -> Any:
    """The three event columns the per-segment fallback lists use, as a lazy scan: the lists
    fold it into (segment, item) sums streamed, never holding every event (at 10M events the
    whole table held gigabytes in these steps, the three columns 0.5 GB)."""
    from recsys import ingest

    return ingest.scan_events(store, tenant).select("user_id", "item_id", "event_type")


def _plan_user_shards_op(n_shards: int) -> dg.OpDefinition:
    @dg.op(
        name="plan_user_shards",
        out=dg.DynamicOut(dict),
        ins={"champion_model": dg.In(dg.Nothing)},
    )
    def plan_user_shards(
        context: dg.OpExecutionContext, config: PublishConfig, storage: StorageResource
    ):
        """The scoring tasks: the shard of the run's partition, else all of them, for each
        tenant; a task per shard, or one per tenant when the run's job is tagged
        SHARD_STEPS_TAG=one_step. Reads only the gate decisions (the model key each shard
        must be scored with)."""
        store = storage.storage()
        shards = (
            [shard_number(context.partition_key)]
            if context.has_partition_key
            else list(range(n_shards))
        )
        one_step = context.run.tags.get(SHARD_STEPS_TAG) == "one_step"
        groups = [shards] if one_step else [[s] for s in shards]
        for tenant in tenants(store, config.tenants):
            champ = _champion(store, tenant, config)
            for group in groups:
                yield dg.DynamicOutput(
                    {
                        "tenant": tenant,
                        "shards": group,
                        "n_shards": n_shards,
                        "model_key": champ.key,
                        "k": config.n_per_user,
                        "model_version": config.model_version,
                        "mlflow_uri": config.mlflow_uri,
                    },
                    mapping_key=snapbuild.shard_step_key(tenant, group, n_shards),
                )

    return plan_user_shards


@dg.op
def score_user_shard(context: dg.OpExecutionContext, storage: StorageResource, task: dict) -> dict:
    """Scores the task's user shards of one tenant and stages them (an atomic file per shard:
    a step that dies leaves nothing half-written, and running it again gives the same files;
    several shards are scored two side by side, `snapbuild.compute_shards`)."""
    store = storage.storage()
    version, uri = task.get("model_version", ""), task.get("mlflow_uri") or None
    champ = _Champion(store, task["tenant"], version, uri)
    if champ.key != task["model_key"]:
        raise dg.Failure(
            f"{task['tenant']}: the champion changed during the run "
            f"({task['model_key']} -> {champ.key}); run the job again"
        )
    model = champ.model
    n_shards = task["n_shards"]
    staged = []
    done = snapbuild.compute_shards(
        model, store.snapshots_dir(task["tenant"]), champ.key, task["shards"],
        n_shards, task["k"], fs=store.fs,
    )  # fmt: skip
    for shard, (path, rows) in zip(task["shards"], done, strict=True):
        start, stop = snapbuild.shard_bounds(len(model.user_ids_), shard, n_shards)
        context.log.info(f"{task['tenant']}: shard {shard} staged ({rows} rows, {path})")
        staged.append({"shard": shard, "users": stop - start, "rows": rows, "path": path})
    return {**task, "staged": staged}


@dg.op
def user_shards_staged(context: dg.OpExecutionContext, done: list[dict]) -> dg.Output:
    shards = sorted(
        ({"tenant": d["tenant"], **s} for d in done for s in d["staged"]),
        key=lambda s: (s["tenant"], s["shard"]),
    )
    return dg.Output(
        shards,
        metadata={
            "rows": sum(s["rows"] for s in shards),
            "shards": dg.MetadataValue.json(shards),
            "n_per_user": done[0]["k"] if done else None,
        },
    )


def _publish_config(config: PublishConfig) -> dict:
    return {"plan_user_shards": {"config": dict(config)}}  # the launchpad shape is unchanged


def _user_recommendations(n_shards: int) -> dg.AssetsDefinition:
    plan_user_shards = _plan_user_shards_op(n_shards)

    @dg.graph_asset(
        name="user_recommendations",
        group_name=GROUP,
        partitions_def=user_shards_partitions(n_shards),
        ins={"champion_model": dg.AssetIn(dagster_type=dg.Nothing)},
        kinds={"numpy", "parquet"},
        config=dg.ConfigMapping(config_fn=_publish_config),
    )
    def user_recommendations(champion_model) -> list:
        """Final top-N per user with per-signal parts and reasons, by contiguous user shards
        (staged under snapshots/<tenant>/.staging/<model>/), by `score_user_shard` steps (a
        dynamic fan-out): run without a partition it scores every shard. Under the Celery
        executor each shard is its own step, a task on the workers; the in-process jobs
        (tagged SHARD_STEPS_TAG) score a tenant's shards in one step, two side by side.
        Memory stays bounded by two shards at a time."""
        tasks = plan_user_shards(champion_model)
        return user_shards_staged(tasks.map(score_user_shard).collect())

    return user_recommendations


@dg.asset(group_name=GROUP, deps=["champion_model"], kinds={"numpy", "parquet"})
def item_similarities(
    context: dg.AssetExecutionContext, config: PublishConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Per item, the nearest items by LightFM embedding ('emb') and by co-occurrence ('cooc')."""
    store = storage.storage()
    meta: dict[str, Any] = {}
    for tenant in tenants(store, config.tenants):
        champ = _champion(store, tenant, config)
        lists = snapbuild.similar_lists(champ.model, config.n_similar)
        snapbuild.write_item_lists(
            store.snapshots_dir(tenant), champ.key, similar=lists, fs=store.fs
        )
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
        champ = _champion(store, tenant, config)
        items, users = _items_users(store, tenant)
        table = snapbuild.aligned_items([str(i) for i in champ.model.item_ids_], items)
        lists = snapbuild.fallback_lists(
            champ.model, table, users, _segment_events(store, tenant), k=config.n_fallback
        )
        snapbuild.write_item_lists(
            store.snapshots_dir(tenant), champ.key, fallbacks=lists, fs=store.fs
        )
        meta[f"{tenant}/lists"] = len(lists)
        meta[f"{tenant}/popular_top10"] = dg.MetadataValue.json(
            [str(champ.model.item_ids_[i]) for i in lists["popular"][0][:10]]
        )
        context.log.info(f"{tenant}: {len(lists)} fallback lists")
    return dg.MaterializeResult(metadata=meta)


def _serving_snapshot(n_shards: int) -> dg.AssetsDefinition:
    @dg.asset(
        name="serving_snapshot",
        group_name=GROUP,
        deps=["champion_model", "user_recommendations", item_similarities, fallback_lists],
        kinds={"numpy", "duckdb"},
    )
    def serving_snapshot(
        context: dg.AssetExecutionContext, config: PublishConfig, storage: StorageResource
    ) -> dg.MaterializeResult:
        """Assembles the staged shards and lists into a versioned snapshot, verifies it
        (checksums, schema, counts, a full open) and makes it live by replacing
        snapshots/<tenant>/CURRENT. A failure anywhere leaves the live snapshot untouched."""
        store = storage.storage()
        meta: dict[str, Any] = {}
        rows = []
        for tenant in tenants(store, config.tenants):
            champ = _champion(store, tenant, config)
            snaps = snapshot_store(store, tenant, config.keep)
            previous = snaps.current_id() if _is_folder(store) else _remote_current(store, tenant)
            items, users = _items_users(store, tenant)
            # the events only feed the fallback lists: read when fallback_lists staged none
            staging = store.snapshots_dir(tenant)
            staged = snapbuild.read_fallback_lists(staging, champ.key, store.fs) is not None
            events = None if staged else _segment_events(store, tenant)
            sid, manifest = snapbuild.assemble_snapshot(
                snaps,
                tenant=tenant,
                model=champ.model,
                model_key=champ.key,
                n_shards=n_shards,
                k=config.n_per_user,
                items=items,
                users=users,
                events=events,
                models_info=champ.info,
                config_version=champ.config_version,
                n_similar=config.n_similar,
                log=context.log,
                make_live=config.make_live,
                staging_root=staging,
                fs=store.fs,
            )
            if not _is_folder(store):
                _upload_snapshot(store, tenant, snaps, sid, config.make_live)
            row: dict[str, Any] = {
                "tenant": tenant,
                "snapshot": sid,
                "previous": previous,
                **{k: manifest["counts"][k] for k in ("users", "items", "candidates")},
            }
            if previous and config.diff_k and previous in snaps.ids():
                d = snaps.diff(previous, sid, k=config.diff_k)
                changed = f"{d.users_changed} ({d.changed_fraction:.1%})"
                row[f"top{config.diff_k}_changed"] = changed
            rows.append(row)
            where = snaps.root if _is_folder(store) else store.snapshots_dir(tenant)
            meta[f"{tenant}/path"] = dg.MetadataValue.path(posixpath.join(where, sid))
            meta[f"{tenant}/bytes"] = sum(f["bytes"] for f in manifest["files"].values())
            live = "" if config.make_live else " (not live: CURRENT unchanged)"
            context.log.info(f"{tenant}: published {sid}{live} (was {previous})")
        meta["published"] = dg.MetadataValue.json(rows)
        return dg.MaterializeResult(metadata=meta)

    return serving_snapshot


def build_assets(n_user_shards: int = DEFAULT_USER_SHARDS) -> list[dg.AssetsDefinition]:
    """The publish assets with user work in `n_user_shards` shards (the code location's
    setting, `pipelines.publish.partitions.user_shard_count`): `user_recommendations`
    (partitioned by shard), the item lists and `serving_snapshot`."""
    return [
        _user_recommendations(n_user_shards),
        item_similarities,
        fallback_lists,
        _serving_snapshot(n_user_shards),
    ]

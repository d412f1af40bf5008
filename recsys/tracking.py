"""MLflow tracking and registry for training runs, and the champion gate.

Every training run logs its params, metrics, a fingerprint of the data, the code version, the
evaluation table (CSV, HTML, PNG) and the model folder (plain arrays + JSON, see
``HybridRecommender.save``). The model folder is registered as a version of ``recsys-<tenant>``;
:func:`load_registered_model` brings any version or alias back as a working model.

The tracking URI is passed in by the caller (default: ``Storage.mlflow_uri()``); nothing here
reads the environment.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import polars as pl

from recsys.storage import Storage

CHAMPION_ALIAS = "champion"
GATE_METRIC = "NDCG@10"


def registered_model_name(tenant: str) -> str:
    return f"recsys-{tenant}"


def experiment_name(tenant: str) -> str:
    return f"recsys-{tenant}"


def tracking_uri(storage: Storage, override: str | None = None) -> str:
    """`override` (e.g. MLFLOW_TRACKING_URI read by the entry point) or the storage default."""
    return override or storage.mlflow_uri()


def _client(uri: str):
    from mlflow import MlflowClient

    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///") :]), exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client, tenant: str, artifact_root: str | None) -> str:
    """The tenant's experiment id, created with artifacts under `artifact_root` if new."""
    name = experiment_name(tenant)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None if artifact_root is None else f"{artifact_root.rstrip('/')}/{name}"
    return client.create_experiment(name, artifact_location=location)


#: rows of the sorted events turned into CSV and hashed at a time by `data_fingerprint`
FINGERPRINT_ROWS = 1_000_000
#: at most this many events are sorted at once by `data_fingerprint` (key ranges of event ids)
FINGERPRINT_SORT_ROWS = 4_000_000
#: ... and at most this share of them, down to `FINGERPRINT_MIN_RANGE` events a range
FINGERPRINT_SORT_SHARE = 8
FINGERPRINT_MIN_RANGE = 250_000
FINGERPRINT_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "timestamp")


def data_fingerprint(events: pl.DataFrame | pl.LazyFrame) -> dict[str, Any]:
    """Row count, users, items, time range and a SHA-256 of the sorted (event_id, user, item,
    type, timestamp) rows: two runs on the same data carry the same hash.

    `events` may be a lazy scan (read by Polars' streaming engine). The hash is that of one
    CSV of all the rows sorted, computed without holding them sorted: the rows are cut into
    consecutive ranges of event ids (null ids first, as the sort puts them), each range
    collected, sorted and hashed as CSV `FINGERPRINT_ROWS` at a time, in order. A range holds
    at most about `FINGERPRINT_SORT_ROWS` events and an eighth of them (but for an id
    repeated more often than that: its rows are one range); the bounds are read from a
    sample of the ids hashed apart, so a range costs one more streamed read of the events."""
    cols = list(FINGERPRINT_COLUMNS)
    lazy = events.lazy().select(cols)
    engine = "streaming" if isinstance(events, pl.LazyFrame) else "in-memory"
    # three queries one after another: one query of all six figures held 6.9 GB at 100M
    # demo events (3.1M users), these 2.2 GB
    stats = pl.concat(
        [
            lazy.select(
                pl.len().alias("rows"),
                pl.col("timestamp").min().alias("lo"),
                pl.col("timestamp").max().alias("hi"),
                pl.col("event_id").null_count().alias("null_ids"),
            ).collect(engine=engine),
            lazy.select(pl.col("user_id").n_unique().alias("users")).collect(engine=engine),
            lazy.select(pl.col("item_id").n_unique().alias("items")).collect(engine=engine),
        ],
        how="horizontal",
    )
    rows = int(stats["rows"][0])
    h = hashlib.sha256()
    for part in _id_ranges(lazy, rows, int(stats["null_ids"][0]), engine) if rows else []:
        ordered = lazy.filter(part).sort(cols).collect(engine=engine)
        for chunk in ordered.iter_slices(FINGERPRINT_ROWS):
            h.update(chunk.write_csv(include_header=False).encode())
        del ordered
    return {
        "data_rows": rows,
        "data_users": int(stats["users"][0]) if rows else 0,
        "data_items": int(stats["items"][0]) if rows else 0,
        "data_min_ts": str(stats["lo"][0]) if rows else "",
        "data_max_ts": str(stats["hi"][0]) if rows else "",
        "data_sha256": h.hexdigest(),
    }


def _id_ranges(lazy: pl.LazyFrame, rows: int, null_ids: int, engine: str) -> list[pl.Expr]:
    """Filters cutting the rows into consecutive ranges of the sort order by event id: the
    null ids (first in the sort), then ids below the first bound, between bounds, ... Only
    the balance of the ranges depends on the sample of ids the bounds come from, not which
    rows the ranges hold together (every row is in exactly one, in sort order)."""
    eid = pl.col("event_id")
    per_range = min(
        FINGERPRINT_SORT_ROWS, max(FINGERPRINT_MIN_RANGE, -(-rows // FINGERPRINT_SORT_SHARE))
    )
    k = -(-(rows - null_ids) // per_range)
    bounds: list[str] = []
    if k > 1:
        # ~64 ids a range, chosen by a hash of the id (an id's repeats are in or out together)
        every = max(1, (rows - null_ids) // (64 * k))
        sample = (
            lazy.select(eid)
            .filter(eid.is_not_null() & (eid.hash(seed=0) % every == 0))
            .collect(engine=engine)
            .to_series()
            .sort()
        )
        picked = [sample[len(sample) * j // k] for j in range(1, k)] if len(sample) else []
        bounds = sorted(set(picked))
    ranges = [eid.is_null()] if null_ids else []
    lower = None
    for b in [*bounds, None]:
        if lower is None and b is None:
            ranges.append(eid.is_not_null())
        elif lower is None:
            ranges.append(eid < b)
        elif b is None:
            ranges.append(eid >= lower)
        else:
            ranges.append((eid >= lower) & (eid < b))
        lower = b
    return ranges


def code_version(repo_dir: str | None = None) -> str:
    """The git commit of the code (with ``-dirty`` when the tree has changes), else 'unknown'."""
    repo_dir = repo_dir or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo_dir,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = str(v)[:6000]
    return out


def _metric_key(label: str) -> str:
    return label.replace("@", "_at_")


@dataclass(frozen=True)
class TrainingRun:
    run_id: str
    model_name: str
    version: str
    gate: dict[str, Any]


def log_training_run(
    *,
    tenant: str,
    model,
    events: pl.DataFrame | pl.LazyFrame,
    uri: str,
    artifact_root: str | None,
    table: pl.DataFrame | None = None,
    plot_path: str | None = None,
    extra_params: dict[str, Any] | None = None,
    extra_metrics: dict[str, float] | None = None,
    tolerance: float = 0.0,
    register: bool = True,
) -> TrainingRun:
    """Log one training run and register its model as a new version of ``recsys-<tenant>``.

    `model` is a fitted ``HybridRecommender``, or the folder one was saved to (logged as it
    is, neither loaded nor saved again); `table` the evaluation table (row ``served`` is the
    gate's figure). With ``register``, the champion gate runs (see :func:`champion_gate`).
    """
    import mlflow

    if isinstance(model, str):
        model_dir = model
        with open(os.path.join(model_dir, "hybrid.json")) as f:
            saved = json.load(f)
        config, info = saved["config"], saved.get("info") or {}
    else:
        model_dir, config, info = None, model.config.to_dict(), model.info
    client = _client(uri)
    exp_id = ensure_experiment(client, tenant, artifact_root)
    params = {"tenant": tenant, **_flatten(config, "config.")}
    params.update(_flatten(extra_params or {}))
    fingerprint = data_fingerprint(events)  # sorts and hashes every event: once
    tags = {
        "tenant": tenant,
        "code_version": code_version(),
        **{k: str(v) for k, v in fingerprint.items()},
    }
    run = client.create_run(exp_id, tags=tags, run_name=f"train-{tenant}")
    run_id = run.info.run_id
    try:
        items = list(params.items())
        for i in range(0, len(items), 100):
            client.log_batch(
                run_id, params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]]
            )
        metrics: dict[str, float] = dict(extra_metrics or {})
        fit_seconds = [*(info.get("generator_seconds") or {}).values(), info.get("ranker_seconds")]
        if any(isinstance(v, (int, float)) for v in fit_seconds):
            metrics["training_seconds"] = float(
                sum(v for v in fit_seconds if isinstance(v, (int, float)))
            )
        for k, v in fingerprint.items():
            if isinstance(v, int):
                metrics[k] = float(v)
        served = None
        if table is not None and table.height:
            for row in table.iter_rows(named=True):
                for col, v in row.items():
                    if isinstance(v, float) and not math.isnan(v):
                        metrics[f"{row['model']}.{_metric_key(col)}"] = v
                if row["model"] == "served":
                    served = row.get(GATE_METRIC)
        client.log_batch(
            run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()]
        )
        with tempfile.TemporaryDirectory() as tmp:
            if table is not None and table.height:
                from recsys.evaluation.evaluate import format_table

                table.write_csv(os.path.join(tmp, "evaluation.csv"))
                with open(os.path.join(tmp, "evaluation.html"), "w") as f:
                    f.write(format_table(table).to_pandas().to_html(index=False))
                client.log_artifact(run_id, os.path.join(tmp, "evaluation.csv"), "evaluation")
                client.log_artifact(run_id, os.path.join(tmp, "evaluation.html"), "evaluation")
            if plot_path:
                client.log_artifact(run_id, plot_path, "evaluation")
            if model_dir is None:
                model_dir = os.path.join(tmp, "model")
                model.save(model_dir)
            client.log_artifacts(run_id, model_dir, "model")
            if info.get("ranker_gain"):  # the ranker's importances (served by the API)
                from recsys.models.importance import FILE, feature_importance

                doc = feature_importance(info["ranker_gain"], info.get("permutation_importance"))
                with open(os.path.join(tmp, FILE), "w") as f:
                    json.dump(doc, f)
                client.log_artifact(run_id, os.path.join(tmp, FILE), "model")
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    version, gate = "", {}
    if register:
        name = registered_model_name(tenant)
        if not _exists(client, name):
            client.create_registered_model(name, tags={"tenant": tenant})
        mv = client.create_model_version(
            name, source=f"{run.info.artifact_uri}/model", run_id=run_id, tags={"tenant": tenant}
        )
        version = mv.version
        gate = champion_gate(client, name, version, served, tolerance)
    return TrainingRun(run_id, registered_model_name(tenant), str(version), gate)


def _exists(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False


def champion_gate(
    client, name: str, version: str, candidate: float | None, tolerance: float = 0.0
) -> dict[str, Any]:
    """Give `version` the ``champion`` alias unless its served NDCG@10 is worse than the current
    champion's by more than `tolerance`. The decision and both figures become version tags."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        current = None
    champion_value = None
    if current is not None:
        raw = current.tags.get("gate.candidate_ndcg_at_10")
        champion_value = float(raw) if raw not in (None, "", "None") else None
    if candidate is None:
        promoted, reason = False, "no served NDCG@10 (evaluation skipped)"
        if current is None:
            promoted, reason = True, "no champion yet and no evaluation: first version serves"
    elif current is None or champion_value is None:
        promoted, reason = True, "no champion with a recorded NDCG@10 yet"
    elif candidate >= champion_value - tolerance:
        promoted, reason = (
            True,
            f"{candidate:.4f} >= champion {champion_value:.4f} - tolerance {tolerance}",
        )
    else:
        promoted, reason = (
            False,
            f"{candidate:.4f} < champion {champion_value:.4f} - tolerance {tolerance}",
        )
    decision = {
        "promoted": promoted,
        "reason": reason,
        "candidate_ndcg_at_10": candidate,
        "champion_ndcg_at_10": champion_value,
        "champion_version": None if current is None else current.version,
        "tolerance": tolerance,
    }
    for k, v in decision.items():
        client.set_model_version_tag(name, version, f"gate.{k}", str(v))
    if promoted:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    return decision


def load_registered_model(
    tenant: str, uri: str, alias_or_version: str = CHAMPION_ALIAS, dst: str | None = None
):
    """Download a registered version (alias like ``champion`` or a version number) and load it."""
    import mlflow

    from recsys.models.hybrid import HybridRecommender

    client = _client(uri)
    name = registered_model_name(tenant)
    if str(alias_or_version).isdigit():
        mv = client.get_model_version(name, str(alias_or_version))
    else:
        mv = client.get_model_version_by_alias(name, alias_or_version)
    dst = dst or tempfile.mkdtemp(prefix=f"recsys-{tenant}-v{mv.version}-")
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=mv.source, dst_path=dst, tracking_uri=uri
    )
    return HybridRecommender.load(path)

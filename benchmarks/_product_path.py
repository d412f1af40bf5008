"""The product's own path for the quality benchmarks: landing files -> one Dagster run of
``recsys_pipeline`` (ingest, train, evaluate, gate, publish) -> the published snapshot -> the
lists it serves, scored on a later test window with the protocol of shared/data/README.md.

The benchmark never fits a model itself: what it scores is what ``POST /v1/recommend`` answers
from the snapshot (the server reads the same stored lists, seen items already removed).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import polars as pl

from recsys.evaluation.metrics import bootstrap_ci, ndcg_at_k, recall_at_k
from recsys.ingest import import_file
from recsys.models.data import holdout_pairs, temporal_split
from recsys.storage import Storage


@dataclass
class ServedScore:
    """Served NDCG@10 / Recall@10 of one pipeline run on the test window, and what it chose."""

    seed: int
    ndcg: float
    ndcg_low: float
    ndcg_high: float
    recall: float
    users: int
    seconds: float
    served_by: str
    selection: dict


def _land(store: Storage, work: str, name: str, kind: str, frame: pl.DataFrame | None) -> None:
    if frame is None or not frame.height:
        return
    path = os.path.join(work, f"{name}.parquet")
    frame.write_parquet(path)
    import_file(store, kind, path, fmt="parquet")


def run_pipeline(
    root: str,
    train: pl.DataFrame,
    items: pl.DataFrame | None,
    users: pl.DataFrame | None,
    seed: int,
) -> None:
    """Land `train` (and the item / user tables) under data root `root` and run the
    ``recsys_pipeline`` job once on an ephemeral Dagster instance, with `seed` for LightFM and
    the ranker."""
    import dagster as dg

    from pipelines.definitions import defs

    store = Storage(root)
    work = tempfile.mkdtemp(prefix="recsys-land-")
    try:
        _land(store, work, "events", "events", train)
        _land(store, work, "items", "items", items)
        _land(store, work, "users", "users", users)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    run_config = {
        "resources": {"storage": {"config": {"root": root}}},
        "ops": {
            "train_models": {"config": {"lightfm": {"seed": seed}, "ranker": {"seed": seed}}},
            "model_evaluation": {"config": {"bootstrap_resamples": 200}},
        },
        "loggers": {"console": {"config": {"log_level": "WARNING"}}},
    }
    job = defs.resolve_job_def("recsys_pipeline")
    result = job.execute_in_process(
        run_config=run_config, instance=dg.DagsterInstance.ephemeral(), raise_on_error=True
    )
    if not result.success:
        raise RuntimeError("recsys_pipeline failed")


def served_lists(root: str, tenant: str = "default"):
    """The live snapshot of `tenant` under `root`, opened."""
    from recsys.snapshot import SnapshotStore
    from recsys.snapshot.reader import open_snapshot

    snaps = SnapshotStore(os.path.join(root, "snapshots", tenant))
    return open_snapshot(snaps.path_of(snaps.current_id()))


def score_snapshot(snap, train: pl.DataFrame, test: pl.DataFrame, k: int = 10):
    """Per-user NDCG@k and Recall@k of the snapshot's lists for the protocol's test users."""
    pairs = holdout_pairs(train, test)
    relevant: dict[str, set[str]] = {}
    for u, i in pairs.select("user_id", "item_id").iter_rows():
        relevant.setdefault(u, set()).add(i)
    lists, rel = [], []
    for u in sorted(relevant):
        uidx = snap.user_index(u)
        ids = [] if uidx is None else snap.item_ids(snap.user_candidates(uidx)[0][:k])
        # one shared id space for this user: position in the list, relevant ids after it
        row = np.full(k, -1, np.int64)
        row[: len(ids)] = np.arange(len(ids))
        extra = [i for i in relevant[u] if i not in ids]
        hits = [ids.index(i) for i in relevant[u] if i in ids]
        rel.append(np.array(hits + list(range(k, k + len(extra))), np.int64))
        lists.append(row)
    rec = np.vstack(lists) if lists else np.zeros((0, k), np.int64)
    return ndcg_at_k(rec, rel, k), recall_at_k(rec, rel, k)


def evaluate_product_path(
    events: pl.DataFrame,
    items: pl.DataFrame | None,
    users: pl.DataFrame | None,
    seed: int,
    test_fraction: float = 0.2,
    keep: bool = False,
) -> ServedScore:
    """Import the older 1 - `test_fraction` of `events`, run the pipeline, score the served
    lists on the newest `test_fraction` (the protocol's split)."""
    split = temporal_split(events, test_fraction)
    root = tempfile.mkdtemp(prefix=f"recsys-quality-{seed}-")
    t0 = time.perf_counter()
    try:
        run_pipeline(root, split.train, items, users, seed)
        seconds = time.perf_counter() - t0
        with served_lists(root) as snap:
            ndcg, recall = score_snapshot(snap, split.train, split.test)
        selection = _selection(root)
        est = bootstrap_ci(ndcg, 1000, seed=0)
        return ServedScore(
            seed,
            float(ndcg.mean()),
            est.low,
            est.high,
            float(recall.mean()),
            len(ndcg),
            seconds,
            selection.get("served", "?"),
            selection,
        )
    finally:
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _selection(root: str, tenant: str = "default") -> dict:
    import json

    path = os.path.join(root, "models", tenant, "final", "hybrid", "hybrid.json")
    with open(path) as f:
        info = json.load(f)["info"]
    return {
        **(info.get("selection") or {}),
        "served": info.get("served_by") or "?",
        "lightfm_epochs": (info.get("lightfm_early_stopping") or {}).get("epochs"),
        "tuning": {g: t["chosen"] for g, t in (info.get("tuning") or {}).items()},
    }


def reference_baselines(
    events: pl.DataFrame, items: pl.DataFrame | None, test_fraction: float = 0.2
) -> dict[str, float]:
    """NDCG@10 of popularity and EASE (lambda 250) fitted on the same train split, scored on
    the same test users: the protocol's references."""
    from recsys.evaluation.evaluate import build_holdout
    from recsys.models.data import build_dataset
    from recsys.models.ease import EASERecommender
    from recsys.models.popularity import PopularityRecommender

    split = temporal_split(events, test_fraction)
    data = build_dataset(split.train, items, include_catalog_items=False)
    holdout = build_holdout(data, split.train, split.test)
    out = {}
    for name, model in (("popularity", PopularityRecommender()), ("EASE", EASERecommender())):
        rec, _ = model.fit(data).recommend(holdout.user_idx, 10)
        out[name] = float(ndcg_at_k(rec, holdout.relevant, 10).mean())
    return out


def summarize(scores: list[ServedScore]) -> str:
    """Mean, standard deviation and range of NDCG@10 over the seeds, for the report."""
    v = np.array([s.ndcg for s in scores])
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return (
        f"served NDCG@10 over {len(v)} seed(s): mean {v.mean():.4f}, sd {sd:.4f}, "
        f"min {v.min():.4f}, max {v.max():.4f}"
    )

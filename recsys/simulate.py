"""Offline simulation before deploy: replay a configuration over the last evaluation's holdout.

`load_replay` rebuilds what `model_evaluation` scored (pipelines/evaluation/assets.py): the
validated events, the global temporal split of ``models/<tenant>/split.json``, the model fitted
on train (``models/<tenant>/eval/hybrid``) and the holdout positives of the test window
(`recsys.evaluation.evaluate.build_holdout`), or of a sample dataset of events given instead.
It scores every holdout user once (`recsys.models.serve.serve_top_n`, the evaluation's own
scoring pass) keeping ``n_candidates`` ranked candidates per user: the pool a configuration
(rules, a declared pipeline, an experiment's variants) then re-orders, filters or replaces.

`compare` scores top-k lists against the holdout with the evaluation's own metric functions
(`recsys.evaluation.metrics`: NDCG@k, recall@k, catalogue coverage, each with the same seeded
bootstrap CI as the evaluation table) plus exposure shares per category, brand and tag and a
revenue proxy (price x purchases in the test window hit by the list), and each one's paired
difference from a baseline (bootstrap CI of the per-user difference).

`ReplaySnapshot` presents the eval model in the shape of a live serving snapshot (its item
indices, the eval model's candidates, neighbours, factors and popularity): the pipeline engine
runs on it unchanged, so a pipeline is simulated on what the model knew at the training
cut-off, never on the published snapshot (fitted on the test window too).

No Falcon, no Dagster; the server's `/v1/recs/simulate` calls it.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from recsys.evaluation.evaluate import Holdout, build_holdout
from recsys.evaluation.metrics import bootstrap_cis, coverage_ci, ndcg_at_k, recall_at_k
from recsys.storage import Storage

REQUIRED_COLUMNS = ("user_id", "item_id", "event_type", "timestamp")


class SimulationError(ValueError):
    """The replay cannot be built (no evaluation yet, a dataset without the needed columns)."""


@dataclass
class Replay:
    """The holdout of the last evaluation (or of a dataset) with each user's ranked pool."""

    tenant: str
    source: str  # "evaluation" or the dataset URI
    model: Any  # HybridRecommender fitted on train
    holdout: Holdout
    pool_items: np.ndarray  # (n_users, n_candidates) eval item indices, -1 padded, best first
    pool_scores: np.ndarray  # (n_users, n_candidates) final (ranker) scores
    pool_signals: np.ndarray  # (n_users, n_candidates, 4): pop, cooc, emb, ranker
    purchases: list[np.ndarray]  # per holdout user: eval item indices purchased in the window
    evaluated: dict[str, Any] = field(default_factory=dict)  # evaluation.json
    seconds: float = 0.0

    @property
    def n_users(self) -> int:
        return self.holdout.n_users

    @property
    def item_ids(self) -> np.ndarray:
        return self.model.item_ids_


def _read_json(storage: Storage, path: str) -> Any:
    with storage.fs.open(path) as f:
        return json.load(f)


def _scan(uri: str) -> pl.LazyFrame:
    """A lazy scan of a sample dataset by its extension (Parquet, CSV, TSV or NDJSON)."""
    lower = uri.lower()
    if lower.endswith(".parquet"):
        return pl.scan_parquet(uri)
    if lower.endswith((".ndjson", ".jsonl")):
        return pl.scan_ndjson(uri)
    if lower.endswith((".csv", ".tsv")):
        return pl.scan_csv(uri, separator="\t" if lower.endswith(".tsv") else ",")
    raise SimulationError(f"{uri}: a dataset is .parquet, .csv, .tsv or .ndjson")


def read_dataset(uri: str) -> pl.DataFrame:
    """Events of a sample dataset (Parquet, CSV or NDJSON by extension) with the needed
    columns; SimulationError naming the missing ones."""
    try:
        df = _scan(uri).collect()
    except (OSError, pl.exceptions.PolarsError) as ex:
        raise SimulationError(f"{uri}: cannot be read ({type(ex).__name__}: {ex})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise SimulationError(
            f"{uri}: the dataset has no column {', '.join(missing)} "
            f"(needed: {', '.join(REQUIRED_COLUMNS)})"
        )
    ts = df["timestamp"]
    if ts.dtype == pl.String:
        df = df.with_columns(pl.col("timestamp").str.to_datetime(time_zone="UTC", strict=False))
    elif ts.dtype.is_integer() or ts.dtype.is_float():
        df = df.with_columns(pl.from_epoch(pl.col("timestamp").cast(pl.Int64), "s"))
    df = df.with_columns(
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        pl.col("event_type").cast(pl.String).str.to_lowercase(),
    )
    if "value" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.Float64).alias("value"))
    return df


def count_rows(uri: str) -> int:
    """The rows of a sample dataset (an upper bound on the users it replays), read from the
    file's metadata or by one scan; SimulationError when it cannot be read."""
    try:
        return int(_scan(uri).select(pl.len()).collect().item())
    except (OSError, pl.exceptions.PolarsError) as ex:
        raise SimulationError(f"{uri}: cannot be read ({type(ex).__name__}: {ex})") from None


def load_replay(
    storage: Storage,
    tenant: str,
    n_candidates: int = 100,
    dataset: str | None = None,
    max_users: int | None = None,
) -> Replay:
    """The replay of `tenant`'s last evaluation (or of `dataset`'s events as the holdout)."""
    from recsys import ingest
    from recsys.models.data import temporal_split
    from recsys.models.hybrid import HybridRecommender, rank_lists
    from recsys.models.serve import serve_top_n

    t0 = time.perf_counter()
    models = storage.models_dir(tenant)
    split_path = posixpath.join(models, "split.json")
    model_dir = posixpath.join(models, "eval", "hybrid")
    if not storage.exists(split_path) or not storage.exists(model_dir):
        raise SimulationError(
            f"tenant '{tenant}' has no evaluated model yet (run the pipeline: "
            "models/<tenant>/split.json and eval/hybrid are written by training)"
        )
    split = _read_json(storage, split_path)
    eval_path = posixpath.join(storage.evaluation_dir(tenant), "evaluation.json")
    evaluated = _read_json(storage, eval_path) if storage.exists(eval_path) else {}
    events = ingest.read_events(storage, tenant)
    s = temporal_split(events, split["test_fraction"])
    holdout_events = s.test if dataset is None else read_dataset(dataset)
    model = HybridRecommender.load(model_dir)
    holdout = build_holdout(model, s.train, holdout_events, model.config.weights)
    if max_users is not None and holdout.n_users > max_users:
        holdout = Holdout(holdout.user_idx[:max_users], holdout.relevant[:max_users])
    n = holdout.n_users
    if n == 0:
        raise SimulationError(
            "no holdout user: no positive in the window is of a user and item known at "
            "training (too little data, or a dataset of other users and items)"
        )
    served = serve_top_n(model, holdout.user_idx, n_candidates)
    items, scores = rank_lists(
        served.user_pos, served.item_idx, served.final_score, n, n_candidates
    )
    signals = np.zeros((n, n_candidates, 4), np.float32)
    rank = served.rank
    for j, name in enumerate(("pop", "cooc", "emb", "ranker")):
        signals[served.user_pos, rank, j] = getattr(served, name)
    bought = holdout_events.filter(pl.col("event_type") == "purchase").select("user_id", "item_id")
    u = model.user_index(bought["user_id"])
    i = model.item_index(bought["item_id"])
    pos_of = {int(x): p for p, x in enumerate(holdout.user_idx.tolist())}
    per_user: list[list[int]] = [[] for _ in range(n)]
    for uu, ii in zip(u.tolist(), i.tolist(), strict=True):
        p = pos_of.get(uu)
        if p is not None and ii >= 0:
            per_user[p].append(ii)
    purchases = [np.unique(np.asarray(x, np.int64)) for x in per_user]
    return Replay(
        tenant,
        "evaluation" if dataset is None else dataset,
        model,
        holdout,
        items,
        scores,
        signals,
        purchases,
        evaluated,
        time.perf_counter() - t0,
    )


# --- the replayed model in a snapshot's shape ----------------------------------------------------
class ReplaySnapshot:
    """The eval model behind the reader API the pipeline engine uses, in the live snapshot's
    item indices (item attributes - price, tags, category - are the live snapshot's). Users
    are holdout positions. Items the live snapshot does not know are left out."""

    def __init__(self, replay: Replay, live_snap) -> None:
        self._replay = replay
        self._snap = live_snap
        ids = replay.item_ids
        self.to_live = np.array(
            [(-1 if (r := live_snap.item_index(str(x))) is None else r) for x in ids], np.int64
        )
        self.to_eval = np.full(live_snap.n_items, -1, np.int64)
        known = self.to_live >= 0
        self.to_eval[self.to_live[known]] = np.flatnonzero(known)
        model = replay.model
        lf = model.generators_.get("lightfm")
        self.has_factors = lf is not None
        if lf is not None:
            d = lf.item_emb_.shape[1]
            self.item_factors = np.zeros((live_snap.n_items, d), np.float32)
            self.item_bias = np.full(live_snap.n_items, -np.inf, np.float32)
            self.item_factors[self.to_live[known]] = lf.item_emb_[known]
            self.item_bias[self.to_live[known]] = lf.item_bias_[known]
            self._user_emb = lf.user_emb_
        co = model.generators_.get("cooccurrence")
        self._cooc = co.sim_.tocsr() if co is not None else None
        pop = model.generators_["popularity"]
        self._fallbacks = {"popular": pop.pop_, "trending": pop.trending_}
        self.n_items = live_snap.n_items

    def __getattr__(self, name: str) -> Any:  # item attributes, names: the live snapshot's
        return getattr(self._snap, name)

    def _live(self, eval_items: np.ndarray) -> np.ndarray:
        mapped = self.to_live[eval_items[eval_items >= 0]]
        return mapped

    def user_candidates(self, p: int):
        row = self._replay.pool_items[p]
        ok = (row >= 0) & (self.to_live[np.maximum(row, 0)] >= 0)
        items = self.to_live[row[ok]].astype(np.int32)
        return (
            items,
            self._replay.pool_scores[p][ok].astype(np.float32),
            self._replay.pool_signals[p][ok],
            np.zeros(items.shape[0], np.uint8),
        )

    def user_seen(self, p: int) -> np.ndarray:
        seen = self._replay.model.seen_
        u = int(self._replay.holdout.user_idx[p])
        return np.sort(self._live(seen.indices[seen.indptr[u] : seen.indptr[u + 1]])).astype(
            np.int32
        )

    def user_factors(self, p: int) -> np.ndarray:
        return self._user_emb[int(self._replay.holdout.user_idx[p])]

    def fallback(self, name: str):
        scores = self._fallbacks.get(name)
        if scores is None:
            return None
        order = np.argsort(-scores, kind="stable")[:500]
        live = self.to_live[order]
        ok = live >= 0
        return live[ok].astype(np.int32), scores[order][ok].astype(np.float32)

    def similar(self, iidx: int, kind: str = "emb"):
        if kind != "cooc" or self._cooc is None:
            raise ValueError(f"the replayed model has no {kind!r} similarity list")
        e = int(self.to_eval[iidx])
        if e < 0:
            return np.zeros(0, np.int32), np.zeros(0, np.float32)
        a, b = self._cooc.indptr[e], self._cooc.indptr[e + 1]
        cols, vals = self._cooc.indices[a:b], self._cooc.data[a:b]
        order = np.lexsort((cols, -vals))[:100]
        live = self.to_live[cols[order]]
        ok = live >= 0
        return live[ok].astype(np.int32), vals[order][ok].astype(np.float32)


# --- scoring lists ---------------------------------------------------------------------------
@dataclass
class Figures:
    """Per configuration: estimates (value, low, high) and per-user columns for differences."""

    metrics: dict[str, dict[str, float]]
    exposure: dict[str, dict[str, dict[str, float]]]
    per_user: dict[str, np.ndarray]


def _est(e) -> dict[str, float]:
    return {"value": round(e.value, 6), "low": round(e.low, 6), "high": round(e.high, 6)}


def _group_of(replay: Replay, live_snap, kind: str) -> tuple[list[np.ndarray], list[str]]:
    """Per eval item, its group ids of `kind` (category, brand, tag) in the live snapshot."""
    to_live = np.array(
        [(-1 if (r := live_snap.item_index(str(x))) is None else r) for x in replay.item_ids]
    )
    groups: list[np.ndarray] = []
    if kind == "tag":
        names = list(live_snap.tags)
        for r in to_live.tolist():
            groups.append(np.asarray(live_snap.item_tags(r)) if r >= 0 else np.zeros(0, np.int32))
    else:
        arr = np.asarray(live_snap.category_id if kind == "category" else live_snap.brand_id)
        names = list(live_snap.categories if kind == "category" else live_snap.brands)
        for r in to_live.tolist():
            g = int(arr[r]) if r >= 0 else -1
            groups.append(np.asarray([g] if g >= 0 else [], np.int32))
    return groups, names


def score_lists(
    replay: Replay,
    lists: np.ndarray,
    k: int,
    price: np.ndarray,
    groups: dict[str, tuple[list[np.ndarray], list[str]]],
    n_resamples: int = 1000,
    seed: int = 0,
) -> Figures:
    """NDCG@k, Recall@k, coverage, revenue proxy and exposure shares of (n_users, >= k) lists
    of eval item indices (-1 padded). `price`: per eval item (NaN unknown)."""
    top = np.asarray(lists)[:, :k]
    rel = replay.holdout.relevant
    per_user = {
        f"NDCG@{k}": ndcg_at_k(top, rel, k),
        f"Recall@{k}": recall_at_k(top, rel, k),
    }
    bought = replay.purchases
    rev = np.zeros(top.shape[0])
    p = np.nan_to_num(price, nan=0.0)
    for u in range(top.shape[0]):
        if bought[u].size:
            row = top[u][top[u] >= 0]
            rev[u] = p[np.intersect1d(row, bought[u])].sum()
    per_user["revenue_proxy"] = rev
    names = list(per_user)
    est = bootstrap_cis(np.column_stack([per_user[m] for m in names]), n_resamples, seed=seed)
    metrics = {m: _est(e) for m, e in zip(names, est, strict=True)}
    metrics[f"Coverage@{k}"] = _est(coverage_ci(top, len(replay.item_ids), k, seed=seed))
    exposure: dict[str, dict[str, dict[str, float]]] = {}
    slots = np.maximum((top >= 0).sum(axis=1), 1)
    for kind, (of_item, labels) in groups.items():
        counts = np.zeros((top.shape[0], len(labels)))
        for u in range(top.shape[0]):
            for it in top[u][top[u] >= 0].tolist():
                for g in of_item[it].tolist():
                    counts[u, g] += 1
        share = counts / slots[:, None]
        per_user[f"exposure:{kind}"] = share
        used = np.flatnonzero(share.sum(axis=0) > 0)
        ests = bootstrap_cis(share[:, used], min(n_resamples, 200), seed=seed) if used.size else []
        exposure[kind] = {labels[g]: _est(e) for g, e in zip(used.tolist(), ests, strict=True)}
    return Figures(metrics, exposure, per_user)


def differences(
    treat: Figures, base: Figures, n_resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, float]]:
    """Paired differences treat - base of every per-user metric, with bootstrap CIs (the same
    users in both; coverage, a set property, as the difference of the two estimates)."""
    names = [m for m in treat.per_user if not m.startswith("exposure:")]
    diff = np.column_stack([treat.per_user[m] - base.per_user[m] for m in names])
    est = bootstrap_cis(diff, n_resamples, seed=seed)
    out = {m: _est(e) for m, e in zip(names, est, strict=True)}
    cov = [m for m in treat.metrics if m.startswith("Coverage@")][0]
    out[cov] = {"value": round(treat.metrics[cov]["value"] - base.metrics[cov]["value"], 6)}
    return out


def exposure_differences(treat: Figures, base: Figures) -> dict[str, dict[str, float]]:
    """Per kind and group: treat share - base share."""
    out: dict[str, dict[str, float]] = {}
    for kind in treat.exposure.keys() | base.exposure.keys():
        t, b = treat.exposure.get(kind, {}), base.exposure.get(kind, {})
        out[kind] = {
            g: round(t.get(g, {"value": 0.0})["value"] - b.get(g, {"value": 0.0})["value"], 6)
            for g in sorted(t.keys() | b.keys())
        }
    return out


def item_groups(replay: Replay, live_snap) -> dict[str, tuple[list[np.ndarray], list[str]]]:
    return {kind: _group_of(replay, live_snap, kind) for kind in ("category", "brand", "tag")}


def item_prices(replay: Replay, live_snap) -> np.ndarray:
    """Per eval item, its price in the live snapshot (NaN unknown)."""
    price = np.asarray(live_snap.price, dtype=np.float64)
    out = np.full(len(replay.item_ids), np.nan)
    for e, x in enumerate(replay.item_ids):
        r = live_snap.item_index(str(x))
        if r is not None:
            out[e] = price[r]
    return out

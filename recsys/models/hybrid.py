"""The served recommender: candidate generators merged and re-ordered by a learned ranker.

Stage 1 (generators): popularity (global and by category affinity), item-item co-occurrence,
LightFM and EASE each propose their top ``candidates_per_generator`` unseen, available items.
Stage 2 (ranker): a gradient-boosted classifier scores the merged candidates from each
generator's score and rank plus item / user features; it decides the final order.

Training (:meth:`HybridRecommender.fit`): the events are cut by time into a fit window and the
newest ``validation_fraction`` (the ranker's label window). Generators fitted on the fit window
propose candidates; candidates the user interacted with in the label window are positives. The
ranker learns on that, then every generator is REFIT on all the events given, so the published
model sees the newest data and the ranker's labels come from the latest window. Tuning grids and
LightFM's epoch count (early stopping) are chosen on that same label window.

What serves is chosen on the label window too (:func:`choose_served`): the ranked list, unless
a single generator's own list (popularity, EASE, ...) beats it there beyond its interval.

A pipeline run needs an evaluated model and a published one, fitted by the same procedure:
:func:`fit_eval_and_final` fits both with three generator sets (fit window, train, all events)
instead of four, see there.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import polars as pl

from recsys.evaluation.evaluate import Holdout, build_holdout
from recsys.evaluation.metrics import bootstrap_ci, ndcg_at_k, popularity_percentile
from recsys.models.base import Recommender, mask_rows, score_batch
from recsys.models.cooccurrence import CooccurrenceRecommender
from recsys.models.data import (
    Dataset,
    EventSource,
    build_dataset,
    events_of,
    index_lookup,
    row_blocks,
    scan_split,
    temporal_split,
)
from recsys.models.ease import EASERecommender
from recsys.models.lightfm_model import EpochChoice, LightFMRecommender
from recsys.models.popularity import PopularityRecommender
from recsys.models.recent import RecentItemsRecommender
from recsys.models.threads import (
    in_thread,
    lower_thread_priority,
    map_in_threads,
    single_threaded_blas,
)
from recsys.models.topk import best_rows_per_user, csr_values, sparse_top_k, top_k
from recsys.models.trees import TreeEnsemble

#: Candidate generators, in feature order. "category" is popularity by category affinity,
#: "recent" item-to-item from the user's last interactions (weighted by recency).
GENERATORS: tuple[str, ...] = (
    "popularity",
    "category",
    "cooccurrence",
    "lightfm",
    "ease",
    "recent",
)
#: the sub-folder of a saved model holding LightFM fitted for its embeddings alone
FACTORS_FOLDER = "lightfm_factors"
#: What the served list can be: the ranker over every generator's candidates, or one
#: generator's own list (chosen on the validation window, see :func:`choose_served`).
HYBRID = "hybrid"

#: Why an item is in a served list (reason_code -> label), from the generator ranking it best.
REASON_CODES: dict[int, str] = {
    0: "popular",
    1: "popular_in_category",
    2: "similar_to_history",
    3: "personalized",
}
_REASON_OF_GENERATOR = {
    "popularity": 0,
    "category": 1,
    "cooccurrence": 2,
    "lightfm": 3,
    "ease": 3,
    "recent": 2,
}


@dataclass
class HybridConfig:
    """Everything that decides a fit; JSON-able, echoed into MLflow params and asset metadata."""

    weights: dict[str, float] | None = None  # None = recsys.contract.DEFAULT_EVENT_WEIGHTS
    half_life_days: float | None = None
    include_catalog_items: bool = True
    #: the newest share of the events the ranker learns from (and choices are made on); the
    #: pipeline's test fraction by default, so the published model's label window (the
    #: newest test_fraction of all events) is cut like the evaluated one's
    validation_fraction: float = 0.2
    candidates_per_generator: int = 100
    cooccurrence: dict[str, Any] = field(
        default_factory=lambda: {
            "shrink": 10.0,
            "buy_weight": 1.0,
            "neighbors": 200,
            "max_user_items": 1000,
        }
    )
    lightfm: dict[str, Any] = field(
        default_factory=lambda: {
            "no_components": 32,
            "epochs": 30,
            "seed": 42,
            "num_threads": 1,
            "max_updates": 3_000_000,
        }
    )
    ease: dict[str, Any] = field(default_factory=lambda: {"l2": 250.0, "max_items": 3000})
    recent: dict[str, Any] = field(
        default_factory=lambda: {"n_recent": 10, "half_life": 3.0, "shrink": 5.0, "neighbors": 100}
    )
    #: the generators fitted (None = all of GENERATORS; popularity always is)
    generators: list[str] | None = None
    #: what serves: None = chosen on the validation window (:func:`choose_served`), else
    #: "hybrid" or a generator's name, as chosen before (the published model repeats the
    #: evaluated model's choice)
    served: str | None = None
    #: validation users below which no choice is made on them: popularity serves
    min_selection_users: int = 20
    #: LightFM, the costliest generator (three fits a run, two thirds of the training's
    #: CPU on the 1M demo), stays only if the ranked list with it beats the ranked list
    #: without it on the validation window (:func:`weigh_lightfm`); its refit on the fit's
    #: own events waits for that verdict. False: kept as configured (the published model's
    #: configuration, where it was decided before)
    weigh_lightfm: bool = True
    #: LightFM fitted on all events for its embeddings alone (the snapshot's item and user
    #: factors: similar items, embeddings, reranking any item), not as a generator: set in
    #: the published configuration when the weighing left LightFM out
    lightfm_factors: bool = False
    #: the ranker's recency features (days since the user's last event, and since their
    #: last event in the candidate's category); off: missing, for ablations
    recency_features: bool = True
    #: LightFM's epoch count is chosen on the validation window: ``lightfm["epochs"]`` is the
    #: maximum, NDCG@10 of up to ``max_users`` validation users is scored every ``eval_every``
    #: epochs, and training stops after ``patience`` scores without improvement. None = off.
    lightfm_early_stopping: dict[str, Any] | None = field(
        default_factory=lambda: {"eval_every": 5, "patience": 2, "max_users": 1000}
    )
    #: candidate values tried on the validation window (never the test window); best NDCG@10 wins
    tune: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {
            "ease": [{"l2": 100.0}, {"l2": 250.0}, {"l2": 500.0}],
            "cooccurrence": [{"shrink": 5.0}, {"shrink": 20.0}, {"shrink": 50.0}],
        }
    )
    #: the grids are scored on at most this many validation users (a seeded sample, the
    #: same for every value of a grid: a paired comparison), like LightFM's early stopping;
    #: scoring every user of a large tenant's window cost more than the fits (0 = all)
    tune_max_users: int = 2000
    ranker: dict[str, Any] = field(
        default_factory=lambda: {
            "max_iter": 150,
            "learning_rate": 0.05,
            "max_leaf_nodes": 15,
            "min_samples_leaf": 50,
            "l2_regularization": 1.0,
            # stop adding trees once a held-out 10% of the ranker's rows stops improving:
            # fewer trees train faster and make every served list cheaper to score
            "early_stopping": True,
            "n_iter_no_change": 10,
            "validation_fraction": 0.1,
        }
    )
    #: label-window users the ranker learns from (a seeded sample when there are more)
    max_ranker_users: int = 3000
    max_ranker_rows: int = 200_000
    min_ranker_positives: int = 20
    min_users: int = 2
    min_items: int = 2
    seed: int = 42

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HybridConfig:
        return cls(**d)

    def generator_params(self, name: str) -> dict[str, Any]:
        if name == "popularity":
            return {"kind": "global"}
        if name == "category":
            return {"kind": "category"}
        return dict(getattr(self, name))


_GENERATOR_CLASSES: dict[str, type[Recommender]] = {
    "popularity": PopularityRecommender,
    "category": PopularityRecommender,
    "cooccurrence": CooccurrenceRecommender,
    "lightfm": LightFMRecommender,
    "ease": EASERecommender,
    "recent": RecentItemsRecommender,
}


def _lightfm_is_chosen(config: HybridConfig) -> bool:
    """LightFM's configuration needs no choice on validation (no early stopping, no grid)."""
    return not config.lightfm_early_stopping and not config.tune.get("lightfm")


def _uses(config: HybridConfig, name: str) -> bool:
    return config.generators is None or name in config.generators or name == "popularity"


def _weighs_lightfm(config: HybridConfig) -> bool:
    """LightFM is weighed on validation (:func:`weigh_lightfm`) in a fit with `config`."""
    return config.weigh_lightfm and config.served is None and _uses(config, "lightfm")


def make_generator(name: str, params: dict[str, Any]) -> Recommender:
    """An unfitted generator by name."""
    return _GENERATOR_CLASSES[name](**params)


def too_little_data(data: Dataset, config: HybridConfig) -> str | None:
    """Why personalised models cannot be fitted on `data` (None when they can)."""
    if data.confidence.nnz == 0:
        return "no positive interactions"
    if data.n_users < config.min_users:
        return f"{data.n_users} user(s) < min_users={config.min_users}"
    active_items = int((np.diff(data.confidence.tocsc().indptr) > 0).sum())
    if active_items < config.min_items:
        return f"{active_items} interacted item(s) < min_items={config.min_items}"
    return None


def fit_generators(
    data: Dataset,
    config: HybridConfig,
    names: tuple[str, ...] = GENERATORS,
    lightfm_epochs: EpochChoice | None = None,
) -> tuple[dict[str, Recommender], dict[str, str], dict[str, float]]:
    """Fit the named generators; returns (models, skipped name -> reason, fit seconds).

    LightFM, much the longest, is fitted in a thread beside the others (its epochs release
    the GIL; the models are the same as fitted one after another); with `lightfm_epochs`,
    for the epoch count early stopping is choosing (:meth:`LightFMRecommender.fit_as_chosen`).
    """
    reason = too_little_data(data, config)
    off = [n for n in names if config.generators is not None and n not in config.generators]
    off = [n for n in off if n != "popularity"]
    fitted = [n for n in names if n not in off and (not reason or n in ("popularity", "category"))]
    skipped = {n: reason or "" for n in names if n not in fitted and n not in off}
    skipped.update({n: "switched off in the configuration" for n in off})

    def fit(name: str) -> tuple[Recommender, float]:
        t0 = time.perf_counter()
        model = make_generator(name, config.generator_params(name))
        if name == "lightfm" and lightfm_epochs is not None:
            model.fit_as_chosen(data, lightfm_epochs)
        else:
            model.fit(data)
        return model, time.perf_counter() - t0

    beside = in_thread(fit, "lightfm") if "lightfm" in fitted and len(fitted) > 1 else None
    done = {n: fit(n) for n in fitted if beside is None or n != "lightfm"}
    if beside is not None:
        done["lightfm"] = beside.result()
    models = {n: done[n][0] for n in fitted}
    return models, skipped, {n: done[n][1] for n in fitted}


_ONE_DATASET_BUILD = threading.Lock()


class _Refit:
    """Every generator refit on `events` with the chosen configuration, each part started as
    soon as what it needs is known: the dataset with the first part, LightFM when
    its early stopping starts (it runs beside it, for the count being chosen), the other
    generators once the grids are decided. On two cores the refits then fill the time the
    fit window's work leaves free; the models are the same as fitted one after another.
    A `background` refit (one needed only at the very end) runs at a lower CPU priority, so
    that the work others wait for gets the cores first and it takes the time they leave.

    Not `beside` the window's work: every part waits for :meth:`result`, then runs there,
    one after the other (the same models: tested). Then the refit's dataset and generators
    are never held beside the fit window's, nor beside the other refit's work in progress:
    a lower peak for a tenant whose generator sets are large, for a longer wall time.

    `events` (an :data:`EventSource`) are read when the dataset's build starts, and not held
    by the refit after it."""

    def __init__(
        self,
        model: HybridRecommender,
        events: EventSource,
        items,
        users,
        background: bool = False,
        beside: bool = True,
    ) -> None:
        self._background = background
        self._beside = beside
        self._inputs = (model.dataset, events, items, users)  # (until the dataset is started)
        self._data = None  # started with the first part (see _dataset)
        self._parts: list = []
        self._started: set[str] = set()
        self._factors = None  # LightFM for its embeddings alone (see _fit_factors)

    def _start(self, fn, *args):
        if not self._beside:  # run when the result is asked for (see result)
            return _Deferred(fn, *args)

        def run():
            if self._background:
                lower_thread_priority()  # this thread only: it ends with the part
            return fn(*args)

        return in_thread(run)

    def _dataset(self):
        """The refit's dataset, its build started on first use: the first part starts once a
        choice is made, after the fit window's own dataset was built (one build at a time:
        `HybridRecommender.dataset`), so the window's work is not queued behind refits."""
        if self._data is None:
            build, events, items, users = self._inputs
            self._inputs = None
            self._data = self._start(lambda: build(events_of(events), items, users))
        return self._data

    def fit(
        self,
        config: HybridConfig,
        names: tuple[str, ...] | None = None,
        lightfm_epochs: EpochChoice | None = None,
    ) -> None:
        """Start fitting `names` (default: every generator not started yet) with a copy of
        `config` as it is now (LightFM for `lightfm_epochs`, when given), and LightFM for its
        embeddings alone when `config` asks for them (:meth:`_fit_factors`)."""
        if config.lightfm_factors:
            self._fit_factors(config)
        names = tuple(g for g in (names or GENERATORS) if g not in self._started)
        if not names:
            return
        self._started.update(g for g in names if _uses(config, g))  # (others: skipped)
        cfg = HybridConfig.from_dict(config.to_dict())
        data = self._dataset()

        def part():
            fitted = fit_generators(data.result(), cfg, names, lightfm_epochs)
            if "recent" in names:  # its only reader, fitted once here: not held to the end
                data.result().drop_transitions()
            return fitted

        self._parts.append(self._start(part))

    def _fit_factors(self, config: HybridConfig) -> None:
        """Start fitting LightFM with `config`'s parameters for its embeddings alone
        (``lightfm_factors``: not one of `config`'s generators), unless its refit started
        before it was left out: that one gives them (see :meth:`result`)."""
        if "lightfm" not in self._started:
            self._started.add("lightfm")
            params = HybridConfig.from_dict(config.to_dict()).generator_params("lightfm")
            data = self._dataset()
            self._factors = self._start(
                lambda: make_generator("lightfm", params).fit(data.result())
            )

    def result(
        self, config: HybridConfig
    ) -> tuple[Dataset, dict[str, Recommender], dict[str, str], dict[str, float], Any]:
        """(dataset, generators in GENERATORS order, skipped name -> reason, fit seconds,
        LightFM fitted for its embeddings alone or None): a LightFM refit that `config` no
        longer has among its generators is that LightFM when ``config.lightfm_factors``."""
        models: dict[str, Recommender] = {}
        skipped: dict[str, str] = {}
        seconds: dict[str, float] = {}
        for part in self._parts:
            m, sk, sec = part.result()
            models.update(m)
            skipped.update(sk)
            seconds.update(sec)
        order = {g: i for i, g in enumerate(GENERATORS)}
        factors = None if self._factors is None else self._factors.result()
        if "lightfm" in models and not _uses(config, "lightfm"):  # left out after it started
            left = models.pop("lightfm")
            factors = left if config.lightfm_factors else factors
            skipped["lightfm"] = "left out on validation"
        if factors is not None:
            skipped["lightfm"] = "left out on validation (fitted for its embeddings alone)"
        return (
            self._dataset().result(),
            {g: models[g] for g in sorted(models, key=order.__getitem__)},
            {g: skipped[g] for g in sorted(skipped, key=order.__getitem__)},
            seconds,
            factors,
        )


class _Deferred:
    """``fn(*args)`` run by the first :meth:`result` call (a Future's interface, in the
    caller's thread)."""

    def __init__(self, fn, *args) -> None:
        self._call: tuple | None = (fn, args)
        self._value: Any = None

    def result(self):
        if self._call is not None:
            fn, args = self._call
            self._call = None
            self._value = fn(*args)
        return self._value


def _sample_holdout(holdout: Holdout, max_users: int, seed: int) -> Holdout:
    """At most `max_users` users of `holdout` (a seeded sample, kept in index order)."""
    return _split_holdout(holdout, max_users, seed)[0]


def _split_holdout(holdout: Holdout, max_users: int, seed: int) -> tuple[Holdout, Holdout]:
    """(:func:`_sample_holdout`'s sample, the users it left out), both in index order."""
    if max_users <= 0 or holdout.n_users <= max_users:
        return holdout, Holdout(np.zeros(0, np.int64), [])
    pick = np.sort(np.random.default_rng(seed).choice(holdout.n_users, max_users, replace=False))
    rest = np.setdiff1d(np.arange(holdout.n_users), pick)
    return (
        Holdout(holdout.user_idx[pick], [holdout.relevant[i] for i in pick]),
        Holdout(holdout.user_idx[rest], [holdout.relevant[i] for i in rest]),
    )


def fit_window_generators(
    data: Dataset,
    holdout: Holdout,
    config: HybridConfig,
    tune: bool = True,
    on_grids: Callable[[HybridConfig], None] | None = None,
    on_early_stopping: Callable[[HybridConfig, EpochChoice], None] | None = None,
) -> tuple[dict[str, Recommender], dict[str, Any]]:
    """Generators on the ranker's fit window, choosing hyperparameters on its label window.

    With `tune`, each ``config.tune`` grid is tried and the best validation NDCG@10 wins
    (first on ties), and LightFM stops early on validation NDCG@10
    (``config.lightfm_early_stopping``). The choices are written into `config`, so a refit
    with it repeats them; the chosen models themselves are kept (never fitted twice).
    LightFM's early stopping runs in a thread beside the grids and the other generators;
    `on_early_stopping` is called when it starts, with the :class:`EpochChoice` it will make
    (for refits that run beside it), and `on_grids` once the grids are decided and the other
    generators fitted (everything but LightFM's epoch count is final then).
    """
    c = config
    gens: dict[str, Recommender] = {}
    chosen: dict[str, Any] = {}
    reason = too_little_data(data, c)
    early = None
    if tune and reason is None and holdout.n_users:
        es = c.lightfm_early_stopping
        if es and not c.tune.get("lightfm") and _uses(c, "lightfm"):
            # needs nothing from the grids or the other generators: beside them, in a thread
            lf = make_generator("lightfm", c.generator_params("lightfm"))
            points = lf.early_stopping_epochs(data.confidence.nnz, int(es.get("eval_every", 2)))
            choice = EpochChoice([*points, lf.epochs])
            early = in_thread(_early_stopped_lightfm, data, holdout, c, es, choice)
            if on_early_stopping is not None:
                on_early_stopping(c, choice)
        tuning = {}
        scored = _sample_holdout(holdout, c.tune_max_users, c.seed)
        for name, grid in c.tune.items():
            if not grid or not _uses(c, name):
                continue
            results = []
            models = _GENERATOR_CLASSES[name].fit_grid(
                data, [{**c.generator_params(name), **override} for override in grid]
            )
            for override, model in zip(grid, models, strict=True):
                rec, _ = model.recommend(scored.user_idx, 10)
                results.append((float(ndcg_at_k(rec, scored.relevant, 10).mean()), override, model))
            best = max(results, key=lambda r: r[0])  # first best on ties (grid order)
            setattr(c, name, {**getattr(c, name), **best[1]})
            gens[name] = best[2]
            tuning[name] = {
                "chosen": best[1],
                "validation_ndcg@10": [r[0] for r in results],
                "validation_users": scored.n_users,
            }
        chosen["tuning"] = tuning
    rest = tuple(g for g in GENERATORS if g not in gens and (early is None or g != "lightfm"))
    more, _, _ = fit_generators(data, c, rest)
    gens.update(more)
    if on_grids is not None:
        on_grids(c)
    if early is not None:
        gens["lightfm"], chosen["lightfm_early_stopping"] = early.result()
        c.lightfm = {**c.lightfm, "epochs": gens["lightfm"].epochs}
    return {g: gens[g] for g in GENERATORS if g in gens}, chosen


def _early_stopped_lightfm(
    data: Dataset, holdout: Holdout, c: HybridConfig, es: dict[str, Any], choice: EpochChoice
) -> tuple[Recommender, dict[str, Any]]:
    """LightFM fitted until validation NDCG@10 of (a sample of) `holdout` stops improving;
    the count it keeps is told to `choice` (None if the fit fails)."""
    try:
        sample = _sample_holdout(holdout, int(es.get("max_users", 1000)), c.seed)
        model = make_generator("lightfm", c.generator_params("lightfm"))
        t0 = time.perf_counter()
        curve = model.fit_early_stopping(
            data,
            sample.user_idx,
            sample.relevant,
            eval_every=int(es.get("eval_every", 2)),
            patience=int(es.get("patience", 2)),
        )
        choice.choose(model.epochs)
        return model, {**curve, "seconds": round(time.perf_counter() - t0, 2)}
    finally:
        if not choice.known():
            choice.choose(None)


#: LightGBM's parameter for each key of ``HybridConfig.ranker`` (the names are those of the
#: configuration, the MLflow params and the Dagster config; early stopping is set apart)
_LIGHTGBM_PARAMS = {
    "learning_rate": "learning_rate",
    "max_leaf_nodes": "num_leaves",
    "min_samples_leaf": "min_data_in_leaf",
    "l2_regularization": "lambda_l2",
}
_EARLY_STOPPING = ("max_iter", "early_stopping", "n_iter_no_change", "validation_fraction")


def _fit_trees(x: np.ndarray, y: np.ndarray, c: HybridConfig) -> tuple[Any, str | None]:
    """The boosted-tree classifier on rows `x` / labels `y` (negatives subsampled to
    ``max_ranker_rows``, every positive kept): a LightGBM booster (binary log loss) and
    None, or None with the reason when too few.

    Its trees are used up to ``booster.best_iteration`` (with early stopping: the round
    with the lowest log loss on a stratified ``validation_fraction`` of the rows, after
    ``n_iter_no_change`` rounds without a lower one; else 0, every round). One thread,
    deterministic (the same trees on every machine, whatever else runs beside it). 200k
    rows x 30 features, 150 rounds: 3.6 s CPU, against 5.1 s for scikit-learn's
    HistGradientBoostingClassifier with the same settings (the 1M demo's R1 rows)."""
    import lightgbm as lgb
    from sklearn.model_selection import train_test_split

    if y.sum() < c.min_ranker_positives or y.sum() == len(y):
        return None, f"{int(y.sum())} positive candidate(s) of {len(y)}"
    unknown = set(c.ranker) - set(_LIGHTGBM_PARAMS) - set(_EARLY_STOPPING)
    if unknown:
        raise ValueError(
            f"unknown ranker setting(s) {sorted(unknown)}; known: "
            f"{sorted([*_LIGHTGBM_PARAMS, *_EARLY_STOPPING])}"
        )
    rng = np.random.default_rng(c.seed)
    if len(y) > c.max_ranker_rows:  # keep every positive, subsample negatives
        neg = np.flatnonzero(y == 0)
        keep_neg = rng.choice(neg, size=max(c.max_ranker_rows - int(y.sum()), 1), replace=False)
        keep = np.sort(np.concatenate([np.flatnonzero(y == 1), keep_neg]))
        x, y = x[keep], y[keep]
    r = {
        "early_stopping": False,
        "max_iter": 100,
        "n_iter_no_change": 10,
        "validation_fraction": 0.1,
        **c.ranker,
    }
    params = {
        "objective": "binary",
        **{_LIGHTGBM_PARAMS[k]: v for k, v in r.items() if k in _LIGHTGBM_PARAMS},
        "num_threads": 1,
        "deterministic": True,
        "force_row_wise": True,  # (else chosen by timing both layouts: not reproducible)
        "seed": c.seed,
        "verbose": -1,
    }
    early = r["early_stopping"] and y.sum() >= 20 and len(y) >= 200  # a tenth to hold out
    if early:
        fit, held = (
            np.sort(rows)
            for rows in train_test_split(
                np.arange(len(y)),
                test_size=r["validation_fraction"],
                stratify=y,
                random_state=c.seed,
            )
        )
        train = lgb.Dataset(x[fit], y[fit], free_raw_data=True)
        valid = lgb.Dataset(x[held], y[held], reference=train)
        stop = lgb.early_stopping(int(r["n_iter_no_change"]), verbose=False)
        booster = lgb.train(params, train, int(r["max_iter"]), valid_sets=[valid], callbacks=[stop])
    else:
        booster = lgb.train(params, lgb.Dataset(x, y, free_raw_data=True), int(r["max_iter"]))
    return booster, None


def train_ranker(
    gens: dict[str, Recommender],
    side: SideFeatures,
    data: Dataset,
    holdout: Holdout,
    config: HybridConfig,
    batch_size: int = 512,
    compare: bool = False,
) -> tuple[TreeEnsemble | None, dict[str, Any]]:
    """The second stage: a boosted-tree classifier over the merged candidates of (a seeded
    sample of) the holdout users, positives = their holdout items. None when too few.

    With `compare`, the validation NDCG@10 of every generator's own list and of the ranked
    list is measured on the same held-out users (``info["validation_per_user"]``, name ->
    per-user values), ranked by trees that never saw their labels, so the ranked list's
    figure is as honest as the generators': the holdout users the ranker's sample left out
    when there are enough (no extra fit), else half of the sample, ranked by trees fitted
    on the other half (one extra fit on small tenants)."""
    c = config
    sample, rest = _split_holdout(holdout, c.max_ranker_users, c.seed)
    # a generator's dense scores of a batch are held until its rows are built: at most
    # `SCORE_CELLS` each (the rows do not depend on the batches)
    batch_size = score_batch(batch_size, data.n_items)

    def labelled(users: Holdout, start: int):
        batch = users.user_idx[start : start + batch_size]
        cand = build_candidates(
            gens, side, gens["popularity"].seen_, batch, c.candidates_per_generator
        )
        rel = users.relevant[start : start + batch_size]
        rel_codes = np.concatenate(
            [np.full(len(r), p, np.int64) * data.n_items + r for p, r in enumerate(rel)]
        )
        y = np.isin(cand.user_pos * data.n_items + cand.item_idx, rel_codes)
        tops = {g: top[:, :10] for g, top in cand.tops.items()} if compare else {}
        return cand.features, y, cand.user_pos + start, cand.item_idx, tops

    def rows(users: Holdout):
        # two batches at a time (threads, in batch order: the rows do not depend on timing)
        parts = map_in_threads(partial(labelled, users), range(0, users.n_users, batch_size))
        if not parts:
            return np.zeros((0, len(FEATURE_NAMES))), np.zeros(0, np.int8), [], [], {}
        y = np.concatenate([p[1] for p in parts]).astype(np.int8)
        tops = {g: np.concatenate([p[4][g] for p in parts]) for g in parts[0][4]}
        pos = np.concatenate([p[2] for p in parts])
        items = np.concatenate([p[3] for p in parts])
        # the feature rows (np.concatenate's values), each batch's dropped once copied: the
        # rows are held once, not twice (3,000 users' candidates: ~190 MB at every scale)
        dtype = np.result_type(*(p[0].dtype for p in parts))
        x = np.empty((len(y), parts[0][0].shape[1]), dtype=dtype)
        at = 0
        for i in range(len(parts)):
            batch = parts[i][0]
            parts[i] = None
            x[at : at + len(batch)] = batch
            at += len(batch)
            del batch
        # an all-missing column (e.g. no prices at all) is constant: never split on
        x[:, np.isnan(x).all(axis=0)] = 0.0
        return x, y, pos, items, tops

    x, y, pos, items, tops = rows(sample)
    info: dict[str, Any] = {
        "ranker_users": sample.n_users,
        "ranker_rows": int(len(y)),
        "ranker_positives": int(y.sum()),
        "candidate_recall": float(y.sum() / max(sample.n_pairs, 1)),
    }
    booster, why = _fit_trees(x, y, c)
    ranker = None if booster is None else TreeEnsemble.from_lightgbm(booster)
    if booster is not None:  # (the exported trees keep no gains: taken now)
        from recsys.models.importance import gain_importance

        info["ranker_gain"] = gain_importance(booster, FEATURE_NAMES)
    if compare and sample.n_users:
        if rest.n_users >= c.min_selection_users:  # users the ranker never saw
            del x  # (not read again: not held beside the held users' rows, ~300 MiB)
            held = _sample_holdout(rest, max(c.max_ranker_users // 3, 1), c.seed + 1)
            hx, _, hpos, hitems, htops = rows(held)
            per_user = {g: ndcg_at_k(t, held.relevant, 10) for g, t in htops.items()}
            if ranker is not None and len(hx):
                lists, _ = rank_lists(hpos, hitems, ranker.predict_proba(hx), held.n_users, 10)
                per_user[HYBRID] = ndcg_at_k(lists, held.relevant, 10)
        else:  # half of the sample, ranked by trees fitted on the other half
            half = np.random.default_rng(c.seed + 1).permutation(sample.n_users) % 2 == 1
            mine = half[pos]
            keep = np.flatnonzero(half)
            relevant = [sample.relevant[i] for i in keep]
            per_user = {g: ndcg_at_k(t[keep], relevant, 10) for g, t in tops.items()}
            other, _ = _fit_trees(x[~mine], y[~mine], c)
            if other is not None and mine.any():
                score = TreeEnsemble.from_lightgbm(other).predict_proba(x[mine])
                at = np.searchsorted(keep, pos[mine])
                lists, _ = rank_lists(at, items[mine], score, len(keep), 10)
                per_user[HYBRID] = ndcg_at_k(lists, relevant, 10)
        info["validation_per_user"] = per_user
    if ranker is None:
        info["ranker_skipped"] = why
        return None, info
    info["ranker_trees"] = len(ranker.roots)
    return ranker, info


def choose_served(
    per_user: dict[str, np.ndarray] | None, config: HybridConfig, why_not: str | None = None
) -> dict[str, Any]:
    """What serves, from validation NDCG@10 per user (name -> values on the same users).

    The ranked list (``hybrid``) serves unless the best single generator beats it beyond
    the 95 % bootstrap interval of the per-user difference; without a ranked list, the best
    generator serves when it beats popularity beyond its interval, else popularity. Too few
    validation users (``min_selection_users``) or none: popularity, with the reason. The
    decision, the figures and the reason are returned for the evaluation and MLflow."""
    if config.served is not None:
        return {
            "served": config.served,
            "reason": "chosen before, on the evaluated model's validation window",
        }
    n = 0 if not per_user else len(next(iter(per_user.values())))
    if n < config.min_selection_users:
        detail = f"{n} validation user(s) < min_selection_users={config.min_selection_users}"
        return {
            "served": "popularity",
            "reason": f"{why_not or detail}: too little validation data to choose a "
            "personalised list, popularity serves",
            "validation_users": n,
        }
    means = {g: float(v.mean()) for g, v in per_user.items()}
    singles = {g: m for g, m in means.items() if g != HYBRID}
    best = max(singles, key=lambda g: (singles[g], g == "popularity"))
    ref = HYBRID if HYBRID in per_user else "popularity"
    served, reason = ref, ""
    diff = None
    if best != ref:
        est = bootstrap_ci(per_user[best] - per_user[ref], 1000, seed=config.seed)
        diff = {"of": f"{best} - {ref}", "mean": est.value, "low": est.low, "high": est.high}
        if est.low > 0:
            served = best
            reason = (
                f"{best} beats {ref} on validation by {est.value:.4f} "
                f"[{est.low:.4f}, {est.high:.4f}]"
            )
    if not reason:
        reason = f"{ref} is within the interval of the best single generator ({best})"
    if ref != HYBRID and why_not:
        reason = f"{why_not}; {reason}"
    return {
        "served": served,
        "reason": reason,
        "validation_users": n,
        "validation_ndcg@10": {g: round(m, 5) for g, m in means.items()},
        "best_single": best,
        "difference": diff,
    }


def weigh_lightfm(
    with_it: dict[str, np.ndarray] | None,
    without: dict[str, np.ndarray] | None,
    config: HybridConfig,
) -> dict[str, Any]:
    """Whether LightFM stays, from the validation NDCG@10 per user of the ranked list with
    its candidates and features (`with_it`) and without them (`without`), on the same users.

    It stays when the ranked list with it is better on average: on a tie or worse, the list
    without it serves as well and the run saves LightFM's refits (and the scoring of its
    candidates). Too few users to compare (``min_selection_users``): it stays, as
    configured. The figures and the reason are returned for the evaluation and MLflow.
    (:meth:`HybridRecommender.fit` then lets LightFM's own list compete with the ranked
    list it chose, in :func:`choose_served`: if that list serves, LightFM stays.)"""
    a = (with_it or {}).get(HYBRID)
    b = (without or {}).get(HYBRID)
    if a is None or b is None or len(a) < config.min_selection_users:
        n = 0 if a is None or b is None else len(a)
        return {
            "kept": True,
            "reason": f"{n} validation user(s) with both ranked lists "
            f"(min_selection_users={config.min_selection_users}): kept as configured",
        }
    est = bootstrap_ci(a - b, 1000, seed=config.seed)
    kept = bool(est.value > 0)
    verb = "beats" if kept else "does not beat"
    return {
        "kept": kept,
        "reason": f"the ranked list with LightFM {verb} the one without it on validation "
        f"({est.value:+.4f} [{est.low:+.4f}, {est.high:+.4f}])",
        "validation_users": len(a),
        "validation_ndcg@10": {
            "with": round(float(a.mean()), 5),
            "without": round(float(b.mean()), 5),
        },
        "difference": {"mean": est.value, "low": est.low, "high": est.high},
    }


def fit_eval_and_final(
    events: EventSource,
    items: pl.DataFrame | None,
    users: pl.DataFrame | None,
    config: HybridConfig,
    test_fraction: float,
    eval_catalogue: tuple[pl.DataFrame | None, pl.DataFrame | None] | None = None,
    beside_eval: Callable[[HybridRecommender], None] | None = None,
    refits_beside: bool = True,
    on_eval: Callable[[HybridRecommender], None] | None = None,
) -> tuple[HybridRecommender | None, HybridRecommender]:
    """The two models a pipeline run needs: the evaluated one and the published one, fitted
    by the same procedure (:meth:`HybridRecommender.fit`) one window apart.

    `beside_eval`, when given, is called with the evaluated model (work on it alone, e.g.
    its permutation importance), in a thread beside the published model's ranker when the
    refits run beside (`refits_beside`), else once that ranker is trained (their candidate
    rows are then not held at once: ~300 MiB less at the step's peak on 3M demo events);
    it has returned when this function returns.

    `on_eval`, when given, is called with the evaluated model as soon as nothing more is done
    with it (after `beside_eval`, before the refit on all events is collected), to save it;
    the function then holds it no longer and returns None in its place. (Held to the end, it
    and its dataset sat beside the refit on all events and the published model's saving.)

    `items` and `users` are the catalogue the published model reads; `eval_catalogue`, when
    given, the (items, users) the evaluated one reads instead (the catalogue as of its own,
    earlier cut-off: `pipelines.training.features.catalogue_at_cutoff`).

    * ``eval``: :meth:`HybridRecommender.fit` on the train part (all but the newest
      `test_fraction`): generators on the fit window choose the hyperparameters, ranker R1
      learns on the validation window (the newest ``validation_fraction`` of train), what
      serves is chosen there (:func:`choose_served`), then generators are refit on train
      (set S2). It is what the evaluation scores on the test window.
    * ``final`` (published): the same fit on all events with every choice made above
      (grids, LightFM's epochs, what serves): ranker R2 learns on the newest
      ``validation_fraction`` of all events from generators fitted before it, then the
      generators are refit on all events (S3). ``HybridRecommender(final.config).fit(events)``
      gives the same model (tested), except that the published refit also holds the
      catalogue's items nobody touched (so they can be served through their metadata).

    When ``validation_fraction == test_fraction`` (the default) R2's fit window is the train
    part, whose generators are S2 with the same configuration: S2 serves twice and three
    generator sets are fitted instead of four. Otherwise R2's generators are fitted on their
    own. S2 and S3 need only the chosen configuration, and each of their parts starts as soon
    as the choices it needs are made (:class:`_Refit`), in threads beside R1's work (the
    models are the same as fitted one after another). Without `refits_beside`, each refit
    runs once the work before it is done, one thing at a time (S2 after R1, S3 after R2 and
    `beside_eval`): the same models, a lower peak, a longer wall time (:class:`_Refit`).

    `events` may be a function that reads them (:data:`EventSource`): each phase that reads
    them (the fit window and the refit on train: the train part alone; the refit on all
    events; R2's own window) then reads them anew and lets go of them once its dataset is
    built, so that they are not held beside the generators' fits and the rankers'; R2's
    labels are folded from an :class:`~recsys.models.data.EventReader`'s scan (`scan_split`),
    never held (a plain function's events are read for them). Without
    `refits_beside` the phases run one after the other and hold one copy at a time; beside,
    give the frame (read functions running at once would each hold a copy).
    """
    eval_cfg = HybridConfig.from_dict(config.to_dict())
    eval_cfg.include_catalog_items = False
    eval_cfg.lightfm_factors = False  # (the evaluated model's embeddings are never served)
    train = partial(_train_part, events, test_fraction)

    def final_config(chosen: HybridConfig) -> HybridConfig:
        cfg = HybridConfig.from_dict(chosen.to_dict())
        cfg.include_catalog_items = config.include_catalog_items
        cfg.tune = {}  # the grids' choices are in the generators' parameters
        cfg.lightfm_early_stopping = None  # the chosen epoch count is lightfm["epochs"]
        cfg.weigh_lightfm = False  # decided: LightFM is in `generators` or not
        # left out, it is still fitted for the snapshot's embeddings (not as a generator)
        cfg.lightfm_factors = _uses(config, "lightfm") and not _uses(chosen, "lightfm")
        return cfg

    with single_threaded_blas():
        # the refit on all events: its dataset is built with its first part (_Refit._dataset)
        model = HybridRecommender(final_config(config))
        refit = _Refit(model, events, items, users, background=True, beside=refits_beside)
        if _lightfm_is_chosen(config):
            refit.fit(final_config(config), ("lightfm",))

        def on_config(chosen: HybridConfig) -> None:
            model.config = final_config(chosen)
            refit.fit(model.config)

        eval_items, eval_users = eval_catalogue or (items, users)
        eval_model = HybridRecommender(eval_cfg).fit(
            train,
            eval_items,
            eval_users,
            on_config=on_config,
            on_grids=lambda chosen: refit.fit(
                final_config(chosen), tuple(g for g in GENERATORS if g != "lightfm")
            ),
            # (LightFM on all events is needed whatever the weighing says: as a generator,
            # or for the snapshot's embeddings alone)
            on_early_stopping=lambda chosen, choice: refit.fit(
                final_config(chosen), ("lightfm",), choice
            ),
            refits_beside=refits_beside,
        )
        final_cfg = model.config
        final_cfg.served = eval_model.info["selection"]["served"]
        t0 = time.perf_counter()
        info: dict[str, Any] = {
            "selection": {
                **eval_model.info["selection"],
                "chosen_on": "the evaluated model's validation window",
            },
        }
        ranker = None
        # work on the evaluated model alone (its importance): beside R2 when the refits run
        # beside, else after it (their candidate rows are then not held at once)
        aside = in_thread(beside_eval, eval_model) if beside_eval and refits_beside else None
        if final_cfg.served == HYBRID:
            # R2's labels: the newest validation_fraction of all events, folded from lazy
            # parts (a reader's scan: the events are not held for them); its fit window is
            # train (S2's) when both cuts fall on the same event, else its own
            vf = final_cfg.validation_fraction
            label = scan_split(events, vf)
            n = label.n_train + label.n_test
            own = int(round(n * vf)) != int(round(n * test_fraction))
            if own:  # (its dataset from all but the labels, read for it alone)
                data = eval_model.dataset(events_of(events, vf), items, users)
            else:
                data = eval_model.data_
            holdout = (
                build_holdout(data, label.train, label.test, final_cfg.weights)
                if label.n_test
                else Holdout(np.zeros(0, np.int64), [])
            )
            del label  # (events read anew: not held beside R2's fits)
            if own:
                gens, _, _ = fit_generators(data, final_cfg)
                data.drop_transitions()  # (read by the recent items model alone)
                side = SideFeatures.from_data(data, gens["popularity"], final_cfg)
            else:
                gens, side = eval_model.generators_, eval_model.side_
            info["ranker_label_users"] = holdout.n_users
            info["ranker_label_pairs"] = holdout.n_pairs
            if holdout.n_pairs >= final_cfg.min_ranker_positives:
                ranker, rinfo = train_ranker(gens, side, data, holdout, final_cfg)
                info.update(rinfo)
            else:
                info["ranker_skipped"] = (
                    f"{holdout.n_pairs} label pair(s) in the newest window "
                    f"< min_ranker_positives={final_cfg.min_ranker_positives}"
                )
            if ranker is None:  # too few labels in the newest window: the evaluated ranker
                ranker = eval_model.ranker_
                info["ranker_from"] = "eval (the newest window had too few labels)"
            else:
                info["ranker_from"] = "the newest validation_fraction of all events"
        else:
            info["ranker_skipped"] = f"{final_cfg.served} serves alone (chosen on validation)"
        info.setdefault("ranker_skipped", None)
        model.ranker_ = ranker
        info["ranker_seconds"] = time.perf_counter() - t0
        if aside is not None:
            aside.result()
        elif beside_eval is not None:  # (after the ranker: its rows and these are not held at once)
            beside_eval(eval_model)
        if final_cfg.served == HYBRID:  # R2's window (when not S2's): not held beside S3
            del data, gens, side, holdout
        eval_info = eval_model.info
        if on_eval is not None:  # handed over (saved): not held beside S3's refit
            on_eval(eval_model)
            eval_model = None
        data, generators, skipped, seconds, factors = refit.result(final_cfg)
    info["generators_skipped"], info["generator_seconds"] = skipped, seconds
    for k in ("tuning", "lightfm_early_stopping"):
        if k in eval_info:
            info[k] = eval_info[k]
    model._assemble(generators, data, info, factors)
    return eval_model, model


def _train_part(events: EventSource, test_fraction: float, more: float = 0.0) -> pl.DataFrame:
    """The train part of `events` (an :data:`EventSource` itself, less its newest `more`):
    read from a function, only that part is read."""
    return events_of(events_of(events, test_fraction), more)


def popularity_only(
    events: pl.DataFrame,
    items: pl.DataFrame | None,
    users: pl.DataFrame | None,
    config: HybridConfig,
    reason: str,
    include_catalog_items: bool = True,
) -> HybridRecommender:
    """A hybrid of the popularity generators alone, no ranker (a tenant with too little data)."""
    cfg = HybridConfig.from_dict(config.to_dict())
    cfg.include_catalog_items = include_catalog_items
    model = HybridRecommender(cfg)
    data = model.dataset(events, items, users)
    gens, _, seconds = fit_generators(data, cfg, ("popularity", "category"))
    skipped = {g: reason for g in GENERATORS if g not in gens}
    info = {
        "ranker_skipped": reason,
        "generators_skipped": skipped,
        "generator_seconds": seconds,
        "selection": {"served": "popularity", "reason": f"{reason}: popularity serves"},
    }
    return model._assemble(gens, data, info)


# --- features ---------------------------------------------------------------------------------


@dataclass
class SideFeatures:
    """Per-item and per-user arrays the ranker reads, computed from the fit data."""

    item_log_pop: np.ndarray
    item_pop_pct: np.ndarray
    item_trending: np.ndarray
    item_age_days: np.ndarray
    item_price_band: np.ndarray
    item_category: np.ndarray
    item_available: np.ndarray
    user_log_activity: np.ndarray
    user_n_categories: np.ndarray
    user_category: np.ndarray  # users x categories share of confidence
    user_segment: np.ndarray
    segment_pop: np.ndarray  # segments x items, unit-scaled
    user_days_since_last: np.ndarray  # days from the user's last event to the data's end
    user_category_days: np.ndarray  # users x categories: days since the last event there

    @classmethod
    def from_data(
        cls, data: Dataset, pop: PopularityRecommender, config: HybridConfig | None = None
    ) -> SideFeatures:
        c = data.confidence  # (each item's positive pairs, without a boolean copy of it)
        counts = np.bincount(c.indices, weights=c.data > 0, minlength=data.n_items)
        price = data.item_price
        band = np.full(data.n_items, np.nan)
        known = ~np.isnan(price)
        if known.any():
            band[known] = popularity_percentile(price[known])  # price percentile in the catalog
        activity = np.diff(data.confidence.indptr).astype(np.float64)
        last, cat_days = _recency_arrays(data, pop.user_category_.shape[1])
        if config is not None and not config.recency_features:  # all missing: never split on
            last, cat_days = np.full_like(last, np.nan), np.full_like(cat_days, np.nan)
        return cls(
            item_log_pop=np.log1p(counts).astype(np.float32),
            item_pop_pct=popularity_percentile(counts).astype(np.float32),
            item_trending=pop.trending_.astype(np.float32),
            item_age_days=data.item_age_days.astype(np.float32),
            item_price_band=band.astype(np.float32),
            item_category=data.item_category.astype(np.int32),
            item_available=data.item_available.astype(bool),
            user_log_activity=np.log1p(activity).astype(np.float32),
            user_n_categories=(pop.user_category_ > 0).sum(axis=1).astype(np.float32),
            user_category=pop.user_category_.astype(np.float32),
            user_segment=pop.user_segment_.astype(np.int32),
            segment_pop=pop.segment_pop_.astype(np.float32),
            user_days_since_last=last,
            user_category_days=cat_days,
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {f"side_{k}": v for k, v in asdict(self).items()}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> SideFeatures:
        return cls(**{k[5:]: v for k, v in a.items() if k.startswith("side_")})


def _recency_arrays(data: Dataset, n_categories: int) -> tuple[np.ndarray, np.ndarray]:
    """(days since each user's last event, users x categories days since the user's last
    event in the category; NaN where none) from ``data.last_days``."""
    last = np.full(data.n_users, np.nan, np.float32)
    m = data.last_days
    if m is None or not m.nnz:
        return last, np.full((data.n_users, n_categories), np.nan, np.float32)
    has = np.diff(m.indptr) > 0
    last[has] = np.minimum.reduceat(m.data, m.indptr[:-1][has])
    flat = np.full(data.n_users * n_categories, np.inf, np.float32)
    for lo, hi in row_blocks(m.indptr) if n_categories else ():  # (a block of users at a time)
        at = slice(m.indptr[lo], m.indptr[hi])
        rows = np.repeat(np.arange(lo, hi), np.diff(m.indptr[lo : hi + 1]))
        cat = data.item_category[m.indices[at]]
        ok = cat >= 0
        np.minimum.at(flat, rows[ok] * n_categories + cat[ok], m.data[at][ok])
    flat[np.isinf(flat)] = np.nan
    return last, flat.reshape(data.n_users, n_categories)


FEATURE_NAMES: tuple[str, ...] = (
    *(f"{g}_{kind}" for g in GENERATORS for kind in ("score", "z", "log_rank")),
    "n_generators",
    "item_log_pop",
    "item_pop_pct",
    "item_trending",
    "item_age_days",
    "item_price_band",
    "user_log_activity",
    "user_n_categories",
    "user_category_affinity",
    "segment_pop",
    "user_days_since_last",
    "category_days_since",
)


@dataclass
class Candidates:
    """Merged candidates of a user batch: one row per (user, item); features for the rows the
    ranker scores (``feature_rows``, all rows unless build_candidates got a smaller n_ranked)."""

    user_pos: np.ndarray  # position in the batch
    item_idx: np.ndarray
    features: np.ndarray  # float64 (n, len(FEATURE_NAMES)), NaN = missing
    scores: dict[str, np.ndarray]  # generator -> raw score per candidate (NaN = none)
    ranks: dict[str, np.ndarray]  # generator -> 0-based rank, n_candidates when not proposed
    tops: dict[str, np.ndarray] = field(default_factory=dict)  # generator -> (b, n) -1 padded
    #: rows that have ``features`` (the ranked ones, in order); None = every row
    feature_rows: np.ndarray | None = None


def _group_z(values: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    ok = ~np.isnan(values)
    v = np.where(ok, values, 0.0)
    cnt = np.bincount(groups, weights=ok.astype(float), minlength=n_groups)
    s = np.bincount(groups, weights=v, minlength=n_groups)
    ss = np.bincount(groups, weights=v * v, minlength=n_groups)
    mean = np.divide(s, cnt, out=np.zeros(n_groups), where=cnt > 0)
    var = np.divide(ss, cnt, out=np.zeros(n_groups), where=cnt > 0) - mean**2
    std = np.sqrt(np.maximum(var, 0)) + 1e-9
    return np.where(ok, (values - mean[groups]) / std[groups], np.nan)


def _masked_columns(
    model: Recommender,
    user_idx: np.ndarray,
    cols: np.ndarray,
    seen_user: np.ndarray,
    seen_rows,
    unavailable_idx: np.ndarray,
) -> np.ndarray:
    """(``model.score(user_idx)[:, cols]`` with the batch's seen and the unavailable items
    at -inf, each item's position in `cols` or -1)."""
    sub = model.score_columns(user_idx, cols)
    col_of = np.full(seen_rows.shape[1], -1, np.int64)
    col_of[cols] = np.arange(len(cols))
    c = col_of[seen_rows.indices]
    sub[seen_user[c >= 0], c[c >= 0]] = -np.inf
    c = col_of[unavailable_idx]
    sub[:, c[c >= 0]] = -np.inf
    return sub, col_of


def _column_lookup(model, user_idx, col_of, sub, pos, items) -> np.ndarray:
    """The model's score of each (batch position, item) candidate: read from the column block
    `sub` where the item has a column (`col_of` >= 0; a candidate is never a masked entry),
    else scored."""
    c = col_of[items]
    inside = c >= 0
    out = np.empty(len(items), np.float32)
    out[inside] = sub[pos[inside], c[inside]]
    if not inside.all():
        out[~inside] = model.score_pairs(user_idx[pos[~inside]], items[~inside])
    return out


def build_candidates(
    generators: dict[str, Recommender],
    side: SideFeatures,
    seen,
    user_idx: np.ndarray,
    n_candidates: int,
    n_ranked: int | None = None,
) -> Candidates:
    """Merge each generator's top `n_candidates` unseen, available items and compute features.

    Features are those of the candidate set the ranker learned on: the union of each
    generator's top `n_ranked` (default `n_candidates`). With a larger `n_candidates` (long
    served lists) the extra rows are proposals only: ranks at or past `n_ranked` count as "not
    proposed" and the per-user z-scores use the ranked rows alone, so a ranked row has the
    same features whatever the list length.
    """
    n_ranked = n_candidates if n_ranked is None else min(n_ranked, n_candidates)
    user_idx = np.asarray(user_idx, dtype=np.int64)
    b = len(user_idx)
    n_items = len(side.item_available)
    unavailable = ~side.item_available
    unavailable_idx = np.flatnonzero(unavailable)
    seen_rows = seen[user_idx]
    seen_user = np.repeat(np.arange(b), np.diff(seen_rows.indptr))
    lookups: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {}
    tops: dict[str, np.ndarray] = {}
    codes = []
    for name, model in generators.items():
        found = model.candidate_columns(n_candidates, seen_rows, unavailable)
        sparse = None if found is not None else model.sparse_scores(user_idx)
        if sparse is not None:  # mostly zero: select without the dense block (same answer)
            idx, val = sparse_top_k(sparse, n_candidates, seen_rows, unavailable)
            lookups[name] = partial(csr_values, sparse)
        elif found is None:
            s = model.score(user_idx)
            s[seen_user, seen_rows.indices] = -np.inf
            s[:, unavailable_idx] = -np.inf
            idx, val = top_k(s, n_candidates)
            lookups[name] = lambda pos, items, s=s: s[pos, items]
        else:  # the top lies in a few known columns: score and select there (same order, ties)
            cols, frontier = found
            sub, col_of = _masked_columns(
                model, user_idx, cols, seen_user, seen_rows, unavailable_idx
            )
            at, val = top_k(sub, n_candidates)
            idx = cols[at]
            if idx.shape[1] < n_candidates:  # fewer columns than candidates: pad
                pad = n_candidates - idx.shape[1]
                idx = np.pad(idx, ((0, 0), (0, pad)))
                val = np.pad(val, ((0, 0), (0, pad)), constant_values=-np.inf)
            if len(frontier):  # users whose top may reach outside the columns: all of them
                edge, _ = _masked_columns(
                    model, user_idx, frontier, seen_user, seen_rows, unavailable_idx
                )
                redo = np.flatnonzero(edge.max(axis=1) >= val[:, -1])
                if len(redo):
                    s = model.score(user_idx[redo])
                    mask_rows(s, seen_rows, redo)
                    s[:, unavailable_idx] = -np.inf
                    idx[redo], val[redo] = top_k(s, n_candidates)
            lookups[name] = partial(_column_lookup, model, user_idx, col_of, sub)
        ok = np.isfinite(val)
        tops[name] = np.where(ok, idx, -1)
        codes.append((np.repeat(np.arange(b), idx.shape[1]) * n_items + idx.ravel())[ok.ravel()])
    # sort + drop repeats: the same sorted codes as np.unique, without its hash pass
    merged = np.sort(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
    if len(merged) > 1:
        merged = merged[np.concatenate(([True], merged[1:] != merged[:-1]))]
    pos, items = merged // n_items, merged % n_items
    n = len(merged)
    cols: dict[str, np.ndarray] = {}
    scores, ranks = {}, {}
    for g in GENERATORS:
        if g in lookups:
            sc = lookups[g](pos, items).astype(np.float64)
            sc[~np.isfinite(sc)] = np.nan
            # each proposed (user, item) is in `merged` (sorted): look its rank up there
            top = tops[g]
            r, c = np.nonzero(top >= 0)
            rk = np.full(n, n_candidates, dtype=np.int32)
            rk[np.searchsorted(merged, r * n_items + top[r, c])] = c
        else:
            sc = np.full(n, np.nan)
            rk = np.full(n, n_candidates, dtype=np.int32)
        scores[g], ranks[g] = sc, rk
    ranked = np.zeros(n, dtype=bool)
    for g in GENERATORS:
        ranked |= ranks[g] < n_ranked
    # features only for the ranked rows (the rest are proposals the ranker never scores);
    # per-row values and the per-user z-scores are the same as over all rows
    rows = None if ranked.all() else np.flatnonzero(ranked)
    sub = (lambda a: a) if rows is None else (lambda a: a[rows])  # noqa: E731
    pos_f, items_f = sub(pos), sub(items)
    n_f = len(pos_f)
    n_gen = np.zeros(n_f)
    for g in GENERATORS:
        rk_f = np.minimum(sub(ranks[g]), n_ranked)
        n_gen += rk_f < n_ranked
        sc = sub(scores[g])
        cols[f"{g}_score"] = sc
        cols[f"{g}_z"] = _group_z(sc, pos_f, b)
        cols[f"{g}_log_rank"] = np.log1p(rk_f.astype(np.float64))
    cols["n_generators"] = n_gen
    for name in (
        "item_log_pop",
        "item_pop_pct",
        "item_trending",
        "item_age_days",
        "item_price_band",
    ):
        cols[name] = getattr(side, name)[items_f].astype(np.float64)
    u = user_idx[pos_f]
    cols["user_log_activity"] = side.user_log_activity[u].astype(np.float64)
    cols["user_n_categories"] = side.user_n_categories[u].astype(np.float64)
    cat = side.item_category[items_f]
    aff = np.zeros(n_f)
    has = cat >= 0
    if side.user_category.size:
        aff[has] = side.user_category[u[has], cat[has]]
    cols["user_category_affinity"] = aff
    seg = side.user_segment[u]
    segp = np.full(n_f, np.nan)
    hs = seg >= 0
    if side.segment_pop.size and hs.any():
        segp[hs] = side.segment_pop[seg[hs], items_f[hs]]
    cols["segment_pop"] = segp
    cols["user_days_since_last"] = side.user_days_since_last[u].astype(np.float64)
    cdays = np.full(n_f, np.nan)
    if side.user_category_days.size:
        cdays[has] = side.user_category_days[u[has], cat[has]]
    cols["category_days_since"] = cdays
    features = (
        np.column_stack([cols[f] for f in FEATURE_NAMES])
        if n_f
        else np.zeros((0, len(FEATURE_NAMES)))
    )
    return Candidates(pos, items, features, scores, ranks, tops, rows)


def rank_lists(
    user_pos: np.ndarray, items: np.ndarray, score: np.ndarray, n_users: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n_users, k) item indices (-1 padded) and scores ordered by `score` within each user
    (ties: the lower item first)."""
    codes = user_pos.astype(np.int64) * (int(items.max(initial=0)) + 1) + items
    if len(codes) < 2 or bool(np.all(codes[1:] > codes[:-1])):
        # rows sorted by user then item (candidates as built): each user's rows sorted
        # alone, stable, give the lexsort's order (about a third of its time)
        rows, rank = best_rows_per_user(user_pos, score, n_users, k)
    else:
        order = np.lexsort((items, -score, user_pos))
        up = user_pos[order]
        starts = np.searchsorted(up, np.arange(n_users))
        rank = np.arange(len(up)) - starts[up]
        rows, rank = order[rank < k], rank[rank < k]
    out_i = np.full((n_users, k), -1, np.int64)
    out_s = np.full((n_users, k), -np.inf, np.float64)
    out_i[user_pos[rows], rank] = items[rows]
    out_s[user_pos[rows], rank] = score[rows]
    return out_i, out_s


# --- the model ------------------------------------------------------------------------------


class HybridRecommender:
    """Generators + learned ranker; see the module docstring for how it is trained."""

    name = "hybrid"

    def __init__(self, config: HybridConfig | None = None) -> None:
        self.config = config or HybridConfig()
        self.ranker_: TreeEnsemble | None = None
        self.factors_: Recommender | None = None
        self.info: dict[str, Any] = {}

    # -- training --
    def dataset(self, events, items, users, include_catalog: bool | None = None) -> Dataset:
        """The model's Dataset of these events (its weights, half-life and catalogue choice).

        One build at a time in a process: a fit builds up to three (the ranker's fit window,
        the refits on train and on all events), in threads; each holds per-event work
        arrays while it runs, so side by side they multiplied the peak with the events, where
        one after the other only the finished datasets (per pair) add up."""
        c = self.config
        with _ONE_DATASET_BUILD:
            return build_dataset(
                events,
                items,
                users,
                weights=c.weights,
                half_life_days=c.half_life_days,
                include_catalog_items=c.include_catalog_items
                if include_catalog is None
                else include_catalog,
            )

    def fit(
        self,
        events: EventSource,
        items: pl.DataFrame | None = None,
        users: pl.DataFrame | None = None,
        on_config: Callable[[HybridConfig], None] | None = None,
        on_grids: Callable[[HybridConfig], None] | None = None,
        on_early_stopping: Callable[[HybridConfig, EpochChoice], None] | None = None,
        refits_beside: bool = True,
    ) -> HybridRecommender:
        """Train the ranker on the newest window, then refit generators on all `events`.

        Generators fitted on the older part propose candidates for the newest
        ``validation_fraction`` (the label window); tuning grids and LightFM's epoch count are
        chosen there too. The refit on all events needs nothing more from the window than
        those choices, so it runs in threads beside the fit window's work (see
        :class:`_Refit`: its dataset with the first choice, LightFM beside its early stopping,
        the other generators once the grids are decided) and the ranker's training (LightFM, the
        sparse products and the tree fit release the GIL: two cores are used; the models are
        the same as one after the other). `on_early_stopping`, `on_grids` and `on_config`
        are called at those points (see :func:`fit_window_generators`; `on_config` once all
        is final), for more work that needs only the choices made by then. Without
        `refits_beside` the refit waits until the window's work is done and its generators are
        dropped (the same model; a lower peak, a longer fit: see :class:`_Refit`).

        With ``weigh_lightfm``, the ranker is also trained without LightFM's candidates (in a
        thread beside the first, with `refits_beside`), LightFM is kept or left out on those
        two ranked lists (:func:`weigh_lightfm`), and its refit, and `on_config`, wait for
        that verdict (`on_early_stopping` does not): left out, LightFM is not refit here and
        `config.generators` says so.
        """
        c = self.config
        t0 = time.perf_counter()
        with single_threaded_blas():
            refit = _Refit(self, events, items, users, beside=refits_beside)
            if _lightfm_is_chosen(c) and _uses(c, "lightfm") and not _weighs_lightfm(c):
                refit.fit(c, ("lightfm",))  # nothing to choose for LightFM: it starts now
            split = temporal_split(events_of(events), 0.0, c.validation_fraction)
            info: dict[str, Any] = {
                "ranker_events_fit": split.fit.height,
                "ranker_events_label": split.validation.height,
            }
            fit_data = self.dataset(split.fit, items, users)
            holdout = (
                build_holdout(fit_data, split.fit, split.validation, c.weights)
                if split.validation.height
                else Holdout(np.zeros(0, np.int64), [])
            )
            del split  # (events read anew: not held beside the window's fits)
            info["ranker_label_users"] = holdout.n_users
            info["ranker_label_pairs"] = holdout.n_pairs
            skip = (
                too_little_data(fit_data, c)
                if fit_data.n_users
                else "no events before the label window"
            )
            if skip is None and holdout.n_pairs < c.min_ranker_positives:
                skip = (
                    f"{holdout.n_pairs} label pair(s) in the validation window "
                    f"< min_ranker_positives={c.min_ranker_positives}"
                )
            gens = None
            if skip is None:

                def early_stopping(cfg: HybridConfig, choice: EpochChoice) -> None:
                    if not _weighs_lightfm(cfg):  # (else its refit waits for the verdict)
                        refit.fit(cfg, ("lightfm",), choice)
                    if on_early_stopping is not None:
                        on_early_stopping(cfg, choice)

                def grids_decided(cfg: HybridConfig) -> None:
                    refit.fit(cfg, tuple(g for g in GENERATORS if g != "lightfm"))
                    if on_grids is not None:
                        on_grids(cfg)

                gens, chosen = fit_window_generators(
                    fit_data,
                    holdout,
                    c,
                    on_grids=grids_decided,
                    on_early_stopping=early_stopping,
                )
                info.update(chosen)
            weighing = gens is not None and "lightfm" in gens and _weighs_lightfm(c)
            verdict = None
            if not weighing:  # the configuration is final from here on
                refit.fit(c)
                if on_config is not None:
                    on_config(c)
            per_user = None
            if gens is not None:
                side = SideFeatures.from_data(fit_data, gens["popularity"], c)
                if weighing:  # the same users ranked without LightFM's candidates, beside
                    rest = {g: m for g, m in gens.items() if g != "lightfm"}
                    job = partial(train_ranker, rest, side, fit_data, holdout, c, compare=True)
                    alt = in_thread(job) if refits_beside else _Deferred(job)
                ranker, rinfo = train_ranker(
                    gens, side, fit_data, holdout, c, compare=c.served is None
                )
                per_user = rinfo.pop("validation_per_user", None)
                if weighing:
                    alt_ranker, alt_info = alt.result()
                    alt_per_user = alt_info.pop("validation_per_user", None)
                    verdict = weigh_lightfm(per_user, alt_per_user, c)
                    own = (per_user or {}).get("lightfm")
                    if not verdict["kept"]:  # (LightFM's own list still competes below)
                        ranker, rinfo = alt_ranker, alt_info
                        per_user = {**alt_per_user, **({} if own is None else {"lightfm": own})}
                    del job, rest, alt, alt_ranker, alt_info, alt_per_user
                del side
                info.update(rinfo)
                self.ranker_ = ranker
                if ranker is None:
                    skip = rinfo.get("ranker_skipped")
            why_not = skip
            if why_not is None and per_user is not None and HYBRID not in per_user:
                why_not = "the ranked list has no validation figure (too few positives to "
                why_not += "fit trees without the users it is compared on)"
            info["selection"] = choose_served(per_user, c, why_not)
            if verdict is not None:
                if not verdict["kept"] and info["selection"]["served"] == "lightfm":
                    verdict["kept"] = True  # its own list serves: not without it
                    verdict["reason"] += "; kept: LightFM's own list serves"
                if not verdict["kept"]:
                    c.generators = [g for g in GENERATORS if g != "lightfm" and _uses(c, g)]
                info["selection"]["lightfm"] = verdict
            if info["selection"]["served"] != HYBRID:
                self.ranker_ = None  # a single generator's list serves: no ranker
            info["ranker_skipped"] = skip
            info["ranker_seconds"] = time.perf_counter() - t0
            if weighing:  # the configuration is final from here on
                refit.fit(c)
                if on_config is not None:
                    on_config(c)
            del fit_data, holdout, gens, per_user  # the window's: not held beside the refit
            data, generators, skipped, seconds, factors = refit.result(c)
            if verdict is not None and not verdict["kept"]:
                skipped["lightfm"] = f"left out on validation: {verdict['reason']}"
        info["generators_skipped"], info["generator_seconds"] = skipped, seconds
        return self._assemble(generators, data, info, factors)

    def _assemble(
        self,
        generators: dict[str, Recommender],
        data: Dataset,
        info: dict[str, Any],
        factors: Recommender | None = None,
    ) -> HybridRecommender:
        self.data_ = data
        self.generators_ = generators
        #: LightFM fitted for its embeddings alone (``config.lightfm_factors``), else None
        self.factors_ = factors
        self.seen_ = generators["popularity"].seen_
        self.side_ = SideFeatures.from_data(data, generators["popularity"], self.config)
        self.user_ids_, self.item_ids_ = data.user_ids, data.item_ids
        served = (info.get("selection") or {}).get("served", "popularity")
        info["fallback_order"] = (
            None if self.ranker_ is not None else served if served in generators else "popularity"
        )
        info["served_by"] = HYBRID if self.ranker_ is not None else info["fallback_order"]
        self.info = info
        return self

    # -- inference --
    def user_index(self, user_ids) -> np.ndarray:
        """Index of each user id in ``user_ids_``, -1 for unknown users."""
        return index_lookup(self.user_ids_, user_ids)

    def item_index(self, item_ids) -> np.ndarray:
        """Index of each item id in ``item_ids_``, -1 for unknown items."""
        return index_lookup(self.item_ids_, item_ids)

    def rank(self, user_idx: np.ndarray, k: int = 10, batch_size: int = 256):
        """Final top-`k` lists for a batch of users (:func:`recsys.models.serve.serve_top_n`)."""
        from recsys.models.serve import serve_top_n

        return serve_top_n(self, user_idx, k, batch_size)

    def recommend(self, user_idx: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(n_users, k) item indices (-1 padded) and final scores, like Recommender.recommend."""
        s = self.rank(user_idx, k)
        return rank_lists(s.user_pos, s.item_idx, s.final_score, len(user_idx), k)

    # -- persistence --
    def save(self, path: str) -> None:
        """A folder: one sub-folder per generator, ``hybrid.npz`` (ranker, side data, ids) and
        ``hybrid.json``."""
        os.makedirs(path, exist_ok=True)
        for name, model in self.generators_.items():
            model.save(os.path.join(path, name))
        if self.factors_ is not None:
            self.factors_.save(os.path.join(path, FACTORS_FOLDER))
        for name in (*GENERATORS, FACTORS_FOLDER):  # a model saved here before had it
            if name not in self.generators_ and not (name == FACTORS_FOLDER and self.factors_):
                shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        arrays = self.side_.arrays()
        arrays["user_ids"] = np.asarray(self.user_ids_, dtype=str)
        arrays["item_ids"] = np.asarray(self.item_ids_, dtype=str)
        if self.ranker_ is not None:
            arrays.update(self.ranker_.to_arrays())
        np.savez(os.path.join(path, "hybrid.npz"), **arrays)
        with open(os.path.join(path, "hybrid.json"), "w") as f:
            json.dump(
                {
                    "config": self.config.to_dict(),
                    "generators": sorted(self.generators_),
                    "factors": self.factors_ is not None,
                    "info": self.info,
                    "feature_names": list(FEATURE_NAMES),
                },
                f,
                indent=2,
                default=str,
            )

    @classmethod
    def load(cls, path: str) -> HybridRecommender:
        with open(os.path.join(path, "hybrid.json")) as f:
            meta = json.load(f)
        model = cls(HybridConfig.from_dict(meta["config"]))
        model.info = meta["info"]
        model.generators_ = {}
        for g in meta["generators"]:  # one seen matrix for all, each copy dropped as it loads
            gen = Recommender.load(os.path.join(path, g))
            if model.generators_:
                gen.share_seen(next(iter(model.generators_.values())))
            model.generators_[g] = gen
        if meta.get("factors"):  # (the same seen matrix too)
            model.factors_ = Recommender.load(os.path.join(path, FACTORS_FOLDER))
            model.factors_.share_seen(model.generators_["popularity"])
        with np.load(os.path.join(path, "hybrid.npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        model.side_ = SideFeatures.from_arrays(arrays)
        model.user_ids_ = arrays["user_ids"].astype(object)
        model.item_ids_ = arrays["item_ids"].astype(object)
        model.ranker_ = TreeEnsemble.from_arrays(arrays) if "tree_roots" in arrays else None
        model.seen_ = model.generators_["popularity"].seen_
        return model

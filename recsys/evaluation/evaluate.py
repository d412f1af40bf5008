"""The offline evaluation: held-out positives, one table of metrics with CIs, and its plot.

Protocol (see shared/data/README.md): a global temporal split; test pairs whose user or item
is not in train, or that the user already had in train, are dropped; every remaining
interaction is a positive; lists rank the full catalog with seen items excluded.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl

from recsys.evaluation.metrics import (
    PER_USER_METRICS,
    bootstrap_cis,
    coverage_ci,
    mean_percentile,
    popularity_percentile,
)
from recsys.models.data import Dataset, holdout_pairs


class HasIndex(Protocol):
    def user_index(self, user_ids) -> np.ndarray: ...
    def item_index(self, item_ids) -> np.ndarray: ...


#: Column order of the evaluation table (each metric also has _low / _high CI columns).
METRIC_LABELS: tuple[str, ...] = (*PER_USER_METRICS, "Coverage@10", "PopPercentile@10")


@dataclass(frozen=True)
class Holdout:
    """Users to evaluate (indices into the train Dataset) and their relevant item indices."""

    user_idx: np.ndarray
    relevant: list[np.ndarray]

    @property
    def n_users(self) -> int:
        return len(self.user_idx)

    @property
    def n_pairs(self) -> int:
        return int(sum(len(r) for r in self.relevant))


def build_holdout(
    data: Dataset | HasIndex,
    train_events: pl.DataFrame | pl.LazyFrame,
    holdout_events: pl.DataFrame | pl.LazyFrame,
    weights: dict[str, float] | None = None,
) -> Holdout:
    """Positives of `holdout_events` per the protocol, mapped onto `data`'s index (anything
    with ``user_index`` / ``item_index``: a Dataset or a fitted HybridRecommender)."""
    pairs = holdout_pairs(train_events, holdout_events, weights)
    u = data.user_index(pairs["user_id"])
    i = data.item_index(pairs["item_id"])
    ok = (u >= 0) & (i >= 0)
    u, i = u[ok], i[ok]
    order = np.lexsort((i, u))
    u, i = u[order], i[order]
    users, starts = np.unique(u, return_index=True)
    return Holdout(
        user_idx=users.astype(np.int64), relevant=np.split(i, starts[1:]) if len(u) else []
    )


#: The k of the coverage and popularity metrics (the per-user metrics read up to Recall@20).
TOP_K = 10


class MetricsFold:
    """The evaluation table's inputs, folded one batch of users at a time.

    Each batch's lists (one (users, k) array per model in `names`, best first, -1 padded) are
    reduced at once to what the table needs of them: every per-user metric value (the columns
    the bootstrap resamples, float64) and each model's top :data:`TOP_K` (catalog coverage
    belongs to the whole set of lists). So memory holds 8 bytes per user and per-user metric
    and 4 per user and top item, not every user's lists; :meth:`table` is
    :func:`evaluation_table` of the whole lists, bit for bit, whatever the batches (every
    per-user value depends on that user's row alone, and the columns are laid out as one
    whole computation lays them out). Batches of distinct users may be added from several
    threads at once.
    """

    def __init__(
        self, names: Sequence[str], n_users: int, n_items: int, item_popularity: np.ndarray
    ):
        self.names = list(names)
        self.n_users = n_users
        self.n_items = n_items
        self.per_user = np.empty((n_users, len(self.names) * (len(PER_USER_METRICS) + 1)))
        item_dtype = np.int32 if n_items <= np.iinfo(np.int32).max else np.int64
        self.tops = {name: np.empty((n_users, TOP_K), item_dtype) for name in self.names}
        self._percentile = popularity_percentile(item_popularity)
        self._folded = 0
        self._lock = threading.Lock()

    def add(
        self, start: int, lists: Mapping[str, np.ndarray], relevant: Sequence[np.ndarray]
    ) -> None:
        """Fold the lists of the users ``start .. start + len(relevant)`` (their relevant
        items in `relevant`), one (users, k) array for each of the fold's models."""
        if list(lists) != self.names:
            raise ValueError(f"lists of {list(lists)}, the fold holds {self.names}")
        stop = start + len(relevant)
        if not 0 <= start <= stop <= self.n_users:
            raise ValueError(f"users {start}..{stop} outside 0..{self.n_users}")
        col = 0
        for name, rec in lists.items():
            rec = np.asarray(rec)
            if len(rec) != len(relevant):
                raise ValueError(f"{name}: {len(rec)} lists for {len(relevant)} users")
            for fn in PER_USER_METRICS.values():
                self.per_user[start:stop, col] = fn(rec, relevant)
                col += 1
            self.per_user[start:stop, col] = mean_percentile(rec, self._percentile, TOP_K)
            col += 1
            top = rec[:, :TOP_K]
            self.tops[name][start:stop, : top.shape[1]] = top
            self.tops[name][start:stop, top.shape[1] :] = -1
        with self._lock:
            self._folded += stop - start

    def table(self, n_resamples: int = 1000, seed: int = 0) -> pl.DataFrame:
        """One row per model: every metric and its bootstrap CI (``<metric>_low`` /
        ``_high``). Raises when the batches folded more or fewer users than the fold holds."""
        if self._folded != self.n_users:
            raise ValueError(f"{self._folded} users folded of {self.n_users}")
        labels = (*PER_USER_METRICS, "PopPercentile@10")
        estimates = bootstrap_cis(self.per_user, n_resamples, seed=seed)
        rows = []
        for m, name in enumerate(self.names):
            row: dict = {"model": name, "users": self.n_users}
            mine = estimates[m * len(labels) : (m + 1) * len(labels)]
            found = dict(zip(labels, mine, strict=True))
            found["Coverage@10"] = coverage_ci(self.tops[name], self.n_items, TOP_K, seed=seed)
            for label in METRIC_LABELS:
                est = found[label]
                row[label], row[f"{label}_low"], row[f"{label}_high"] = (
                    est.value,
                    est.low,
                    est.high,
                )
            rows.append(row)
        return pl.DataFrame(rows)


def evaluation_table(
    lists: Mapping[str, np.ndarray],
    holdout: Holdout,
    n_items: int,
    item_popularity: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
) -> pl.DataFrame:
    """One row per model: every metric and its bootstrap CI (``<metric>_low`` / ``_high``).

    Every per-user metric of every model is resampled with the same seeded draws, in one
    pass (:func:`~recsys.evaluation.metrics.bootstrap_cis`); coverage, a property of the whole
    set of lists, has its own (:func:`~recsys.evaluation.metrics.coverage_ci`). The lists of
    every user at once: :class:`MetricsFold` takes them a batch of users at a time.
    """
    fold = MetricsFold(list(lists), holdout.n_users, n_items, item_popularity)
    fold.add(0, lists, holdout.relevant)
    return fold.table(n_resamples, seed)


def format_table(table: pl.DataFrame, metrics: tuple[str, ...] = METRIC_LABELS) -> pl.DataFrame:
    """The table with one text column per metric, ``0.182 [0.151, 0.214]``, for people."""
    cols = [pl.col("model"), pl.col("users")]
    for m in (m for m in metrics if m in table.columns):
        cols.append(
            pl.format(
                "{} [{}, {}]", *(pl.col(c).round(3) for c in (m, f"{m}_low", f"{m}_high"))
            ).alias(m)
        )
    return table.select(cols)


def plot_table(
    table: pl.DataFrame,
    path: str,
    metrics: tuple[str, ...] = ("NDCG@10", "Recall@10", "HitRate@10", "MAP@10"),
) -> str:
    """Grouped bar chart of `metrics` per model with CI whiskers, saved as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = table["model"].to_list()
    x = np.arange(len(metrics))
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    for j, name in enumerate(models):
        r = table.row(j, named=True)
        vals = np.array([r[m] for m in metrics])
        err = np.array(
            [[r[m] - r[f"{m}_low"] for m in metrics], [r[f"{m}_high"] - r[m] for m in metrics]]
        )
        ax.bar(
            x + (j - (len(models) - 1) / 2) * width, vals, width, yerr=err, capsize=2, label=name
        )
    ax.set_xticks(x, metrics)
    ax.set_ylabel("value (95% bootstrap CI)")
    users = table["users"][0] if table.height else 0
    ax.set_title(f"Offline evaluation, temporal split ({users} test users)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

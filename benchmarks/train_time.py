"""Training time per model on generated events (default 1M), printed as a table.

    .venv/bin/python benchmarks/train_time.py [--events 1000000] [--root /tmp/recsys-bench-train]

Generates the demo data (deterministic, seed 1) and ingests it like the pipeline does (once per
root; pass --root to reuse), then times what a pipeline run fits, piece by piece, on the same
split the pipeline uses (test 20%, validation 15% of train):

* the datasets of the three windows (fit window, train, all events);
* each generator on the train part (the ``eval`` set) with the default configuration (LightFM:
  30 epochs at most, capped by ``max_updates``);
* ``fit_eval_and_final`` as a whole (what the ``train_models`` step runs: tuning on the
  validation window, two rankers, three generator sets), and the ranker training inside it;
* scoring: the served top-100 of 2,000 users (what the publish step does for every user).

The machine's load average is printed with the figures: on a shared 2-core machine they move
by tens of percent with the neighbours' work.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def load_avg() -> str:
    return "load " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def prepare(root: str, n_events: int):
    from recsys.demo import DemoSpec, generate
    from recsys.ingest import build_table, ingest_events, read_events
    from recsys.storage import Storage

    store = Storage(root)
    if not store.exists(store.events_dir("default")):
        generate(DemoSpec(events=n_events, seed=1, end_date="2026-11-01"), store)
        ingest_events(store, "default", full_refresh=True)
        build_table(store, "default", "items")
        build_table(store, "default", "users")
    import polars as pl

    events = read_events(store, "default")
    items = pl.read_parquet(store.table_path("default", "items"))
    users = pl.read_parquet(store.table_path("default", "users"))
    return events, items, users


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--root", default=None, help="data root to reuse (default: a temp folder)")
    ap.add_argument("--users", type=int, default=2000, help="users scored for the serve row")
    args = ap.parse_args()
    root = args.root or os.path.join(tempfile.gettempdir(), f"recsys-bench-train-{args.events}")

    from recsys.models.data import build_dataset, temporal_split
    from recsys.models.hybrid import (
        GENERATORS,
        HybridConfig,
        fit_eval_and_final,
        make_generator,
    )
    from recsys.models.serve import serve_top_n

    t = time.perf_counter()
    events, items, users = prepare(root, args.events)
    print(f"data: {events.height:,} validated events in {root} ({time.perf_counter() - t:.1f}s)")
    cfg = HybridConfig(tune={})
    rows: list[tuple[str, str, float]] = []

    def timed(label: str, detail: str, fn):
        started = time.perf_counter()
        out = fn()
        rows.append((label, detail, time.perf_counter() - started))
        return out

    split = temporal_split(events, 0.2, cfg.validation_fraction)
    train = split.train
    for name, part in (("fit window", split.fit), ("train", train), ("all events", events)):
        data = timed(
            f"dataset ({name})",
            f"{part.height:,} events",
            lambda part=part, name=name: build_dataset(
                part, items, users, include_catalog_items=name == "all events"
            ),
        )
    data = build_dataset(train, items, users, include_catalog_items=False)
    shape = f"{data.n_users:,} users x {data.n_items:,} items, {data.confidence.nnz:,} pairs"
    for name in GENERATORS:
        timed(
            f"{name} (train)",
            shape,
            lambda name=name: make_generator(name, cfg.generator_params(name)).fit(data),
        )
    eval_model, final = timed(
        "fit_eval_and_final",
        "the train_models step",
        lambda: fit_eval_and_final(events, items, users, HybridConfig(tune={}), 0.2),
    )
    es = eval_model.info.get("lightfm_early_stopping", {})
    rows.append(
        (
            "  of which LightFM early stop",
            f"{es.get('epochs')} epochs chosen, curve {es.get('curve')}",
            es.get("seconds", float("nan")),
        )
    )
    for label, model in (("eval", eval_model), ("final", final)):
        info = model.info
        rows.append(
            (
                f"  of which ranker ({label})"
                + (" incl. window generators" if label == "eval" else ""),
                f"{info.get('ranker_users', 0):,} users, {info.get('ranker_rows', 0):,} rows, "
                f"{info.get('ranker_trees', 0)} trees",
                info.get("ranker_seconds", float("nan")),
            )
        )
    n = min(args.users, len(final.user_ids_))
    timed(
        f"serve top-100 ({n:,} users)",
        f"{len(final.user_ids_):,} users in all",
        lambda: serve_top_n(final, np.arange(n), k=100),
    )

    width = max(len(r[0]) for r in rows)
    print(f"\n{'step':<{width}}  {'seconds':>8}  detail")
    for label, detail, seconds in rows:
        print(f"{label:<{width}}  {seconds:8.2f}  {detail}")
    print(f"\n{load_avg()} (2 cores shared with other work: figures are noisy)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Anonymous sessions: what weighting a session's anchors by recency is worth.

    .venv/bin/python benchmarks/quality_anonymous.py [--data ml-100k|taobao] [--anchors 5]
        [--half-lives none,1,2,4] [--seed 1]

The protocol's split (``../shared/data/README.md``: the older 80 % trains, the newest 20 % is
the test window) goes through the product's path (`benchmarks/_product_path.py`: landing
files, one ``recsys_pipeline`` run, the published snapshot). Each test user then shops as an
anonymous visitor: ``POST /v1/recommend`` with no user id and, as anchors, the user's
``--anchors`` newest train items in the order they happened (the newest last), the way the
storefront sends a session's cart. Their test-window items are the relevant ones, NDCG@10 and
Recall@10 per user, with a bootstrap interval, once per tenant config
``defaults.anchor_half_life`` (``none``: all anchors alike).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

import numpy as np
import polars as pl
from falcon import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from _product_path import run_pipeline  # noqa: E402

from recsys.adapters import movielens_100k, taobao_userbehavior  # noqa: E402
from recsys.evaluation.metrics import bootstrap_ci, ndcg_at_k, recall_at_k  # noqa: E402
from recsys.models.data import holdout_pairs, temporal_split  # noqa: E402
from serving.app import create_app  # noqa: E402
from serving.auth import mint_token  # noqa: E402
from serving.config import ServingConfig  # noqa: E402

DATA = os.environ.get("RECSYS_SHARED_DATA", os.path.join(ROOT, "..", "shared", "data"))
SECRET = "quality-anonymous-benchmark-secret-0123456789"


def load(name: str):
    if name == "ml-100k":
        events, items, users = movielens_100k(os.path.join(DATA, "ml-100k"))
        return events, items, users
    path = os.path.join(DATA, "taobao-sample")
    csv = next(os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".csv"))
    events, items = taobao_userbehavior(csv)
    return events, items, None


def sessions(train: pl.DataFrame, test: pl.DataFrame, n: int) -> dict[str, tuple[list, set]]:
    """Per test user: (their `n` newest distinct train items, oldest first; test items)."""
    relevant: dict[str, set[str]] = {}
    for u, i in holdout_pairs(train, test).select("user_id", "item_id").iter_rows():
        relevant.setdefault(u, set()).add(i)
    recent = (
        train.filter(pl.col("user_id").is_in(list(relevant)))
        .sort("timestamp")
        .unique(["user_id", "item_id"], keep="last", maintain_order=True)
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id").tail(n))
    )
    return {u: (items, relevant[u]) for u, items in recent.iter_rows() if items}


def score(client, headers, users: dict, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    lists, rel = [], []
    for u in sorted(users):
        anchors, relevant = users[u]
        resp = client.simulate_post(
            "/v1/recommend",
            json={"user": {"session_id": f"s-{u}"}, "k": k, "anchors": {"item_ids": anchors}},
            headers=headers,
        )
        assert resp.status_code == 200, resp.text
        ids = [it["item_id"] for it in resp.json["items"]][:k]
        row = np.full(k, -1, np.int64)
        row[: len(ids)] = np.arange(len(ids))
        extra = [i for i in relevant if i not in ids]
        hits = [ids.index(i) for i in relevant if i in ids]
        rel.append(np.array(hits + list(range(k, k + len(extra))), np.int64))
        lists.append(row)
    rec = np.vstack(lists)
    return ndcg_at_k(rec, rel, k), recall_at_k(rec, rel, k)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="ml-100k", choices=("ml-100k", "taobao"))
    ap.add_argument("--anchors", type=int, default=5)
    ap.add_argument("--half-lives", default="none,1,2,4")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--root", help="a data root to keep (and to reuse: its pipeline run is skipped)"
    )
    args = ap.parse_args()
    events, items, users = load(args.data)
    split = temporal_split(events, 0.2)
    root = args.root or tempfile.mkdtemp(prefix="recsys-anon-")
    try:
        if not os.path.isdir(os.path.join(root, "snapshots")):
            run_pipeline(root, split.train, items, users, args.seed)
        shoppers = sessions(split.train, split.test, args.anchors)
        config = ServingConfig(data_root=root, jwt_secret=SECRET, access_log=False)
        client = testing.TestClient(create_app(config))
        admin = {"Authorization": "Bearer " + mint_token(SECRET, "default", ["admin"], 3600)}
        shop = {"Authorization": "Bearer " + mint_token(SECRET, "default", ["recommend"], 3600)}
        print(
            f"{args.data}: {len(shoppers)} test users as anonymous sessions of up to "
            f"{args.anchors} anchors (seed {args.seed})"
        )
        print(f"{'anchor_half_life':>16}  {'NDCG@10':>8}  {'95% interval':>17}  {'Recall@10':>9}")
        base = None
        for text in args.half_lives.split(","):
            half_life = None if text == "none" else float(text)
            current = client.simulate_get("/v1/admin/tenants/default/config", headers=admin)
            put = client.simulate_put(
                "/v1/admin/tenants/default/config",
                json={"defaults": {"anchor_half_life": half_life}},
                headers={**admin, "If-Match": current.headers["ETag"]},
            )
            assert put.status_code == 200, put.text
            ndcg, recall = score(client, shop, shoppers)
            est = bootstrap_ci(ndcg, 1000, seed=0)
            diff = ""
            if base is None:
                base = ndcg
            else:
                d = bootstrap_ci(ndcg - base, 1000, seed=0)
                diff = f"  vs none: {d.value:+.4f} [{d.low:+.4f}, {d.high:+.4f}]"
            print(
                f"{text:>16}  {ndcg.mean():8.4f}  [{est.low:.4f}, {est.high:.4f}]  "
                f"{recall.mean():9.4f}{diff}"
            )
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

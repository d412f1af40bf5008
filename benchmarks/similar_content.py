"""What /v1/similar's content signal costs and finds, on a demo catalogue (`recsys.demo`, default
25,000 items as in the 1M-event demo): CPU per request in process (Falcon test client, one
thread) for an item with behavioural neighbours (today's `blend`), a cold item (`blend` falling
back to the content model) and `kind: "content"`; and, over every cold item asked, the share
whose top-3 neighbours all share a title word (the running number `#n` left out).

The content model is fitted as the pipeline's `content_embeddings` asset fits it
(`recsys.content.fit`, dim 64) and saved where the server reads it.

    .venv/bin/python benchmarks/similar_content.py [--items 25000] [--requests 500]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import polars as pl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from falcon import testing  # noqa: E402

from recsys import content  # noqa: E402
from recsys.demo import DemoSpec, generate  # noqa: E402
from recsys.snapshot import SnapshotStore  # noqa: E402
from recsys.snapshot.writer import write_snapshot  # noqa: E402
from recsys.storage import Storage  # noqa: E402
from serving.app import create_app  # noqa: E402
from serving.auth import mint_token  # noqa: E402
from serving.config import RateLimitSpec, ServingConfig  # noqa: E402

SECRET = "bench-secret-of-sufficient-length-0123456789"
TENANT = "demo"
WARM = 1000  # items 0..999 get emb neighbours in the snapshot; the rest are cold


def words(title: str) -> set[str]:
    return {w for w in re.split(r"[\s']+", title.lower()) if w and not w.startswith("#")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--items", type=int, default=25_000)
    ap.add_argument("--requests", type=int, default=500)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="recsys-similar-bench-")
    try:
        store = Storage(root)
        generate(DemoSpec(events=2_000, items=args.items, seed=7, tenant=TENANT), store)
        landed = [f for f in store.landing_files(TENANT, "items") if f.endswith("-items.parquet")]
        items = pl.read_parquet(landed[0])
        n = items.height
        rng = np.random.default_rng(0)
        src = np.repeat(np.arange(WARM), 10)
        sim = rng.integers(0, n, src.shape[0])
        snaps = SnapshotStore(os.path.join(root, "snapshots", TENANT))
        tmp = snaps.new_tmp_dir()
        write_snapshot(
            tmp,
            tenant=TENANT,
            user_ids=["u1"],
            items=items,
            candidates={
                "user_idx": [0],
                "item_idx": [0],
                "score": [1.0],
                "pop": [1.0],
                "cooc": [0.0],
                "emb": [0.0],
                "ranker": [1.0],
                "reason": [0],
            },
            similar={
                "emb": {
                    "item_idx": src,
                    "similar_idx": sim,
                    "score": np.tile(np.linspace(0.9, 0.1, 10), WARM),
                }
            },
            fallbacks={"popular": (np.arange(min(n, 500)), np.linspace(1.0, 0.1, min(n, 500)))},
            models={"champion": {"name": "bench", "version": "1"}},
            write_parquet=False,
        )
        snaps.publish(tmp, checksums=False, prune=False)
        t = time.process_time()
        model = content.fit(items, dim=64, seed=0)
        fit_s = time.process_time() - t
        model.save(os.path.join(root, "warehouse", TENANT, "content"))

        unlimited = RateLimitSpec(10**9, 60)
        config = ServingConfig(
            data_root=root,
            jwt_secret=SECRET,
            access_log=False,
            rate_limit=unlimited,
            tenant_rate_limit=unlimited,
        )
        client = testing.TestClient(create_app(config))
        headers = {"Authorization": "Bearer " + mint_token(SECRET, TENANT, ["recommend"], 3600)}
        title = dict(zip(items["item_id"], items["title"], strict=True))
        warm_ids = [f"i{i:06d}" for i in range(WARM)]
        cold_ids = [f"i{i:06d}" for i in range(WARM, n)]
        pick = np.random.default_rng(1)

        def run(ids, kind):
            bodies = [
                {"item_id": ids[int(j)], "k": 10, "surface": "pdp", "kind": kind}
                for j in pick.integers(0, len(ids), args.requests)
            ]
            client.simulate_post("/v1/similar", json=bodies[0], headers=headers)  # (load)
            t = time.process_time()
            answers = []
            for body in bodies:
                resp = client.simulate_post("/v1/similar", json=body, headers=headers)
                assert resp.status_code == 200, resp.text
                answers.append((body["item_id"], resp.json))
            return (time.process_time() - t) / len(bodies) * 1e6, answers

        load = os.getloadavg()
        print(
            f"demo catalogue {n} items ({WARM} with emb neighbours), content fit {fit_s:.1f} s "
            f"CPU; {args.requests} requests per case; load average {load[0]:.1f}"
        )
        for label, ids, kind in (
            ("item with events, blend (today's answer)", warm_ids, "blend"),
            ("cold item, blend -> content neighbours", cold_ids, "blend"),
            ("any item, kind=content", warm_ids + cold_ids, "content"),
        ):
            us, answers = run(ids, kind)
            line = f"  {label:<42} {us:8.0f} us CPU per request"
            if ids is cold_ids:
                shared = [
                    all(words(title[i]) & words(title[it["item_id"]]) for it in a["items"][:3])
                    for i, a in answers
                ]
                codes = [{w["code"] for w in a["warnings"]} for _, a in answers]
                fallback = statistics.mean("CONTENT_NEIGHBOURS" in c for c in codes)
                line += (
                    f"; top-3 all share a title word: {statistics.mean(shared):.1%}, "
                    f"answered from content: {fallback:.1%}"
                )
            print(line)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

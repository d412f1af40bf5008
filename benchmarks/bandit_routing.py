"""What bandit routing costs /v1/recommend: CPU per request through the app in process (Falcon
test client, one thread) on a synthetic snapshot, for a surface

* without experiment or bandit (the default path: the slot bandits are part of the tenant's
  view, `RecommendService.view`, re-read when a document changes),
* with a running experiment assigned by hash,
* with that experiment routed by a Thompson bandit (counts cached, `refresh_s` 60),
* with an exploration-slot bandit filling position 3 with one of two items,

and the CPU of the router's lookup itself when the view is re-read (`BanditRouter.slot_bandits`).
Figures are CPU time (`time.process_time`), the median of `--repeat` blocks of `--requests`.

    .venv/bin/python benchmarks/bandit_routing.py [--requests 2000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _snapshots import TENANT, ensure_snapshot  # noqa: E402
from falcon import testing  # noqa: E402

from serving.app import create_app  # noqa: E402
from serving.auth import mint_token  # noqa: E402
from serving.bandit_routing import BanditRouter  # noqa: E402
from serving.config import RateLimitSpec, ServingConfig  # noqa: E402
from serving.documents import DocumentStore  # noqa: E402
from serving.events_log import EventLogs  # noqa: E402

SECRET = "bench-secret-of-sufficient-length-0123456789"


def per_request_us(client, headers, surface: str, n: int, repeat: int) -> float:
    blocks = []
    for r in range(repeat):
        bodies = [
            {"user": {"user_id": f"u{(r * n + k) * 7 % 20_000:05d}"}, "k": 10, "surface": surface}
            for k in range(n)
        ]
        t = time.process_time()
        for body in bodies:
            resp = client.simulate_post("/v1/recommend", json=body, headers=headers)
            assert resp.status_code == 200, resp.text
        blocks.append((time.process_time() - t) / n * 1e6)
    return statistics.median(blocks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="recsys-bandit-bench-")
    try:
        ensure_snapshot(root, n_users=20_000, n_items=5_000, n=100)
        unlimited = RateLimitSpec(10**9, 60)
        config = ServingConfig(
            data_root=root,
            jwt_secret=SECRET,
            access_log=False,
            rate_limit=unlimited,
            tenant_rate_limit=unlimited,
        )
        client = testing.TestClient(create_app(config))
        admin = {"Authorization": "Bearer " + mint_token(SECRET, TENANT, ["admin"], 3600)}
        shop = {"Authorization": "Bearer " + mint_token(SECRET, TENANT, ["recommend"], 3600)}

        def post(path, body):
            resp = client.simulate_post(path, json=body, headers=admin)
            assert resp.status_code in (200, 201), resp.text

        post(
            "/v1/recs/experiments",
            {
                "id": "exp",
                "surface": "exp",
                "status": "running",
                "variants": [{"id": "A"}, {"id": "B"}],
            },
        )
        post(
            "/v1/recs/experiments",
            {
                "id": "exp-bandit",
                "surface": "routed",
                "status": "running",
                "variants": [{"id": "A"}, {"id": "B"}],
            },
        )
        post(
            "/v1/recs/exploration/bandit",
            {
                "bandit_id": "b",
                "policy": "thompson",
                "experiment_id": "exp-bandit",
                "refresh_s": 60,
            },
        )
        post(
            "/v1/recs/exploration/bandit",
            {
                "bandit_id": "slot",
                "policy": "thompson",
                "arms": ["x", "y"],
                "slot": 3,
                "surface": "slot",
                "fill": {"x": {"item_id": "i00001"}, "y": {"item_id": "i00002"}},
                "refresh_s": 60,
            },
        )
        load = os.getloadavg()
        print(
            f"snapshot 20k users x 5k items, N=100; {args.repeat} x {args.requests} requests "
            f"per case; load average {load[0]:.1f} {load[1]:.1f}"
        )
        for label, surface in (
            ("no experiment, no bandit (default path)", "plain"),
            ("experiment, hashed assignment", "exp"),
            ("experiment routed by a bandit", "routed"),
            ("exploration-slot bandit", "slot"),
        ):
            us = per_request_us(client, shop, surface, args.requests, args.repeat)
            print(f"  {label:<42} {us:8.1f} us CPU per request")

        # the default path's one check, alone: no slot bandit of this tenant and surface
        logs = EventLogs(root)
        docs = DocumentStore(os.path.join(root, "serving"), 1.0).collection(
            "bandits", prefix="bandit"
        )
        router = BanditRouter(docs, logs, root)
        n = 200_000
        t = time.process_time()
        for _ in range(n):
            router.slot_bandits(TENANT).get("plain")
        print(f"  slot_bandits (none): {(time.process_time() - t) / n * 1e9:.0f} ns CPU")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Helpers of the serving tests: two tenants with tiny hand-made snapshots whose right answers
are known, token minting and request shortcuts.

Tenant `acme` (item ids a0..a19) and tenant `globex` (item ids g0..g19) hold the same shape of
data, so a leak between tenants would show up as a foreign id prefix.

Items 0..7 are user u1's candidates, best first (scores 0.9 .. 0.2); their emb signal rises
(0.1 .. 0.8) so `weights={"emb": 1}` reverses the order. Item 2 is unavailable, item 8 is u1's
seen item, items 8..19 are the `popular` fallback (best first). u1 is in segment s1.
"""

from __future__ import annotations

import os

import numpy as np
import polars as pl
from falcon import testing

from recsys.snapshot import SnapshotStore
from recsys.snapshot.writer import write_snapshot
from serving.app import create_app
from serving.auth import mint_token
from serving.config import ApiKey, RateLimitSpec, ServingConfig
from serving.ratelimit import InProcessLimiter
from serving.snapshot import SnapshotRegistry

SECRET = "test-secret-of-sufficient-length-0123456789"
N_ITEMS = 20
TAGS = {
    0: ["shoes", "nike"],
    1: ["shoes", "adult"],
    2: ["shoes"],
    3: ["winter", "nike"],
    4: ["winter"],
    5: ["nike"],
    7: ["winter"],
    9: ["promo"],
}


def items_frame(prefix: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": [f"{prefix}{i}" for i in range(N_ITEMS)],
            "title": [f"Item {i}" for i in range(N_ITEMS)],
            "category": ["c1" if i < 8 else "c2" for i in range(N_ITEMS)],
            "brand": ["nike" if i in (0, 3, 5) else "other" for i in range(N_ITEMS)],
            "price": [10.0 + i for i in range(N_ITEMS)],
            "tags": [TAGS.get(i, []) for i in range(N_ITEMS)],
            "available": [i != 2 for i in range(N_ITEMS)],
            "created_at": [None] * N_ITEMS,
            "attributes": [None] * N_ITEMS,
        },
        schema_overrides={
            "created_at": pl.Datetime("us", "UTC"),
            "attributes": pl.String,
            "tags": pl.List(pl.String),
        },
    )


def write_tiny_snapshot(out_dir: str, tenant: str, prefix: str, variant: int = 0) -> dict:
    """u1: candidates 0..7; u2: candidate 9 only; u3 has no candidates. `variant` shifts u1's
    scores so a second snapshot answers differently (item 7 first)."""
    cand_items = list(range(8)) + [9]
    users = [0] * 8 + [1]
    scores = [0.9 - 0.1 * i for i in range(8)] + [0.5]
    if variant:
        scores = [0.1 + 0.1 * i for i in range(8)] + [0.5]
    emb = [0.1 * (i + 1) for i in range(8)] + [0.3]
    cands = {
        "user_idx": users,
        "item_idx": cand_items,
        "score": scores,
        "pop": [0.5] * 9,
        "cooc": [0.0] * 9,
        "emb": emb,
        "ranker": scores,
        "reason": [0] * 9,
    }
    similar = {
        "emb": {
            "item_idx": [0, 0, 0, 13, 13],
            "similar_idx": [3, 4, 5, 14, 15],
            "score": [0.9, 0.8, 0.7, 0.9, 0.6],
        },
        "cooc": {"item_idx": [0, 0, 5], "similar_idx": [5, 6, 0], "score": [0.9, 0.5, 0.4]},
    }
    popular = (np.arange(8, 20), np.linspace(1.0, 0.1, 12))
    fallbacks = {
        "popular": popular,
        "category:c1": (np.array([6, 5, 4, 3, 1, 0]), np.linspace(1.0, 0.5, 6)),
        "segment:s1": (np.array([19, 18, 17]), np.array([0.9, 0.8, 0.7])),
        "tag:winter": (np.array([3, 4, 7]), np.array([0.9, 0.8, 0.7])),
    }
    return write_snapshot(
        out_dir,
        tenant=tenant,
        user_ids=["u1", "u2", "u3"],
        items=items_frame(prefix),
        candidates=cands,
        seen={"user_idx": [0], "item_idx": [8]},
        similar=similar,
        fallbacks=fallbacks,
        segments=["s1", None, None],
        models={"champion": {"name": "tiny", "version": str(variant + 1)}},
        write_parquet=False,
    )


def publish_tiny(root: str, tenant: str, prefix: str, variant: int = 0) -> str:
    store = SnapshotStore(os.path.join(root, "snapshots", tenant))
    tmp = store.new_tmp_dir()
    write_tiny_snapshot(tmp, tenant, prefix, variant)
    return store.publish(tmp, checksums=False, prune=False)


def make_config(root: str, **overrides) -> ServingConfig:
    base = dict(
        data_root=root,
        jwt_secret=SECRET,
        access_log=False,
        snapshot_check_s=0.0,
        api_keys=(
            ApiKey("acme-key-0123456789", "acme", frozenset({"recommend"})),
            ApiKey("globex-key-0123456789", "globex", frozenset({"recommend", "admin"})),
        ),
        rate_limit=RateLimitSpec(100_000, 60),
        tenant_rate_limit=RateLimitSpec(100_000, 60),
        cors_origins=("https://shop.example",),
        # (not the server's 250 ms: on a loaded test machine a first request that loads a
        # model took longer; the deadline tests set their own)
        deadline_ms=10_000.0,
    )
    base.update(overrides)
    return ServingConfig(**base)


def build_client(config: ServingConfig) -> testing.TestClient:
    registry = SnapshotRegistry(
        os.path.join(config.data_root, "snapshots"), check_interval_s=config.snapshot_check_s
    )
    return testing.TestClient(create_app(config, registry, limiter=InProcessLimiter()))


def token(tenant: str = "acme", scopes=("recommend",), ttl: int = 86400) -> str:
    # (a day: modules mint their headers at collection, and a full run on a loaded machine
    # outlasted the 10 minutes this used to be)
    return mint_token(SECRET, tenant, scopes, ttl)


def auth(tenant: str = "acme", scopes=("recommend",), **extra) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(tenant, scopes)}", **extra}


def recommend(client, body: dict, tenant: str = "acme", headers: dict | None = None):
    return client.simulate_post(
        "/v1/recommend", json=body, headers={**auth(tenant), **(headers or {})}
    )


def ids(resp) -> list[str]:
    return [it["item_id"] for it in resp.json["items"]]

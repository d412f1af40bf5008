"""/v1/similar's content signal: a cold item (no events, so no emb or cooc neighbours) gets
the pipeline's content-embedding neighbours, which share words with its title; an item with
events keeps today's answer unless the request asks for `kind: "content"`.

Data: tenant `acme` holds the demo catalogue (`recsys.demo`, 500 items) in a snapshot where
only items 0..4 have behavioural neighbours; tenant `globex` holds an online-retail catalogue
(titles only, a kind of data the demo never produced) with none. The pipeline's
`content_embeddings` asset is materialised for both (real Dagster).
"""

from __future__ import annotations

import os
import re

import numpy as np
import polars as pl
import pytest
from serving_helpers import auth, build_client, make_config
from synthetic_events import RETAIL

from recsys.snapshot import SnapshotStore
from recsys.snapshot.writer import write_snapshot

WARM = 5  # items 0..4 of the demo catalogue have emb neighbours in the snapshot
ACME = auth("acme")
GLOBEX = auth("globex")


def _publish(root: str, tenant: str, items: pl.DataFrame, similar: dict) -> None:
    store = SnapshotStore(os.path.join(root, "snapshots", tenant))
    tmp = store.new_tmp_dir()
    write_snapshot(
        tmp,
        tenant=tenant,
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
        seen={"user_idx": [0], "item_idx": [1]},
        similar=similar,
        fallbacks={"popular": (np.arange(items.height), np.linspace(1.0, 0.1, items.height))},
        models={"champion": {"name": "tiny", "version": "1"}},
        write_parquet=False,
    )
    store.publish(tmp, checksums=False, prune=False)


def _retail_items() -> pl.DataFrame:
    n = len(RETAIL)
    return pl.DataFrame(
        {
            "item_id": [f"r{i}" for i in range(n)],
            "title": RETAIL,
            "category": [None] * n,
            "brand": [None] * n,
            "price": [1.0] * n,
            "tags": [[] for _ in range(n)],
            "available": [True] * n,
            "created_at": [None] * n,
            "attributes": [None] * n,
        },
        schema_overrides={
            "category": pl.String,
            "brand": pl.String,
            "created_at": pl.Datetime("us", "UTC"),
            "attributes": pl.String,
            "tags": pl.List(pl.String),
        },
    )


@pytest.fixture(scope="module")
def content_root(tmp_path_factory) -> str:
    import dagster as dg

    from pipelines.resources import StorageResource
    from pipelines.training.content import content_embeddings
    from recsys.demo import DemoSpec, generate
    from recsys.storage import Storage

    root = str(tmp_path_factory.mktemp("content"))
    store = Storage(root)
    generate(DemoSpec(events=2_000, seed=5, end_date="2026-11-01", tenant="acme"), store)
    landed = [f for f in store.landing_files("acme", "items") if f.endswith("-items.parquet")]
    catalogue = pl.read_parquet(landed[0])
    warm = {
        "item_idx": [i for i in range(WARM) for _ in range(2)],
        "similar_idx": [j for i in range(WARM) for j in (100 + i, 200 + i)],
        "score": [0.9, 0.5] * WARM,
    }
    _publish(root, "acme", catalogue, {"emb": warm})
    _publish(root, "globex", _retail_items(), {})
    for tenant, items in (("acme", catalogue), ("globex", _retail_items())):
        path = store.table_path(tenant, "items")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        items.write_parquet(path)
    result = dg.materialize(
        [content_embeddings],
        resources={"storage": StorageResource(root=root)},
        run_config={
            "ops": {"content_embeddings": {"config": {"tenants": ["acme", "globex"], "dim": 32}}}
        },
    )
    assert result.success
    return root


@pytest.fixture(scope="module")
def client(content_root):
    return build_client(make_config(content_root))


def _words(title: str) -> set[str]:
    """The words of a title, without the demo's running number (`#12`)."""
    return {w for w in re.split(r"[\s']+", title.lower()) if w and not w.startswith("#")}


def _similar(client, item_id: str, headers, **extra):
    resp = client.simulate_post(
        "/v1/similar",
        json={"item_id": item_id, "k": 3, "surface": "pdp", **extra},
        headers=headers,
    )
    assert resp.status_code == 200, resp.text
    return resp.json


def test_a_cold_demo_item_gets_content_neighbours_sharing_title_words(content_root, client):
    from recsys.storage import Storage

    items = pl.read_parquet(Storage(content_root).table_path("acme", "items"))
    title = dict(zip(items["item_id"], items["title"], strict=True))
    checked = 0
    for i in range(WARM, 500, 17):  # 30 cold items across the catalogue
        item_id = f"i{i:06d}"
        got = _similar(client, item_id, ACME)
        assert [w["code"] for w in got["warnings"]] == ["CONTENT_NEIGHBOURS"], got["warnings"]
        top = [it["item_id"] for it in got["items"]]
        assert len(top) == 3 and item_id not in top
        for other in top:
            assert _words(title[item_id]) & _words(title[other]), (title[item_id], title[other])
        checked += 1
    assert checked == 30


def test_an_item_with_events_keeps_todays_answer_unless_content_is_asked(client):
    for i in range(WARM):
        item_id = f"i{i:06d}"
        got = _similar(client, item_id, ACME, k=2)
        # the snapshot's emb neighbours, in order; no content warning
        assert [it["item_id"] for it in got["items"]] == [f"i{100 + i:06d}", f"i{200 + i:06d}"]
        assert all(w["code"] != "CONTENT_NEIGHBOURS" for w in got["warnings"])
        # asked for content: the content model's neighbours, as related?strategy=content
        # (the same model and vectors) finds them
        asked = _similar(client, item_id, ACME, kind="content")
        related = client.simulate_get(
            f"/v1/recs/item/{item_id}/related",
            params={"strategy": "content", "limit": 3},
            headers=ACME,
        ).json
        assert [it["item_id"] for it in asked["items"]] == [
            it["item_id"] for it in related["items"]
        ]
        assert len(asked["items"]) == 3
        assert all(w["code"] != "CONTENT_NEIGHBOURS" for w in asked["warnings"])


def test_unseen_retail_titles_get_neighbours_sharing_words(client):
    shared = 0
    for i, title in enumerate(RETAIL):
        got = _similar(client, f"r{i}", GLOBEX)
        top = [RETAIL[int(it["item_id"][1:])] for it in got["items"]]
        has_kin = any(_words(title) & _words(t) for j, t in enumerate(RETAIL) if j != i)
        if has_kin:
            assert top and _words(title) & _words(top[0]), (title, top)
            shared += 1
    assert shared >= 25  # (the few titles sharing no word with any other have none to share)


def test_without_a_content_model_a_cold_item_answers_as_before(tmp_path):
    from serving_helpers import publish_tiny

    root = str(tmp_path)
    publish_tiny(root, "acme", "a")
    client = build_client(make_config(root))
    # a19 has no neighbours: back-filled as before (the category's popular list), no content
    got = _similar(client, "a19", ACME)
    assert all(w["code"] != "CONTENT_NEIGHBOURS" for w in got["warnings"])
    assert got["items"], got
    # kind=content needs a content model (or the snapshot's content lists): 422
    resp = client.simulate_post(
        "/v1/similar", json={"item_id": "a0", "kind": "content"}, headers=ACME
    )
    assert resp.status_code == 422 and resp.headers["content-type"] == "application/problem+json"

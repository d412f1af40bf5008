"""Writable vector indexes (issue 15, section 8): client vectors with metadata in named indexes,
durable and shared by workers; search with index, metadata and tag filters; the snapshot's
factors as the read-only `items` / `users` indexes; bad input as Problem Details; and the
approximate path (faiss IVF) against exact search."""

from __future__ import annotations

import os
import sys

import numpy as np
import orjson
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))
from serving_helpers import auth, build_client, items_frame, make_config  # noqa: E402
from synthetic_events import RETAIL  # noqa: E402

from recsys.snapshot import SnapshotStore  # noqa: E402
from recsys.snapshot.writer import write_snapshot  # noqa: E402
from recsys.vectors import VectorIndex  # noqa: E402

ADMIN = auth("acme", ("admin",))
READ = auth("acme")
SEARCH = "/v1/recs/embeddings/search"


def _publish(root: str, tenant: str, prefix: str) -> None:
    """A tiny snapshot with 2-d item factors: item i points at angle i * 9 degrees."""
    store = SnapshotStore(os.path.join(root, "snapshots", tenant))
    tmp = store.new_tmp_dir()
    angles = np.deg2rad(np.arange(20) * 9.0)
    item_f = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    write_snapshot(
        tmp,
        tenant=tenant,
        user_ids=["u1", "u2"],
        items=items_frame(prefix),
        candidates={
            "user_idx": [0, 1],
            "item_idx": [0, 1],
            "score": [0.9, 0.8],
            "pop": [0.5, 0.5],
            "cooc": [0.0, 0.0],
            "emb": [0.1, 0.2],
            "ranker": [0.9, 0.8],
            "reason": [0, 0],
        },
        factors=(np.eye(2, dtype=np.float32), item_f, np.zeros(20, dtype=np.float32)),
        write_parquet=False,
    )
    store.publish(tmp, checksums=False, prune=False)


@pytest.fixture(scope="module")
def snapshot_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("vectors"))
    _publish(root, "acme", "a")
    _publish(root, "globex", "g")
    return root


def _put(client, vid, vector, metadata=None, index="products", headers=ADMIN):
    body = {"id": vid, "vector": vector, "index": index}
    if metadata is not None:
        body["metadata"] = metadata
    return client.simulate_post("/v1/recs/embeddings/index", json=body, headers=headers)


def _ids(resp) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [it["id"] for it in resp.json["items"]]


def test_client_vectors_are_indexed_searched_filtered_and_deleted(client, data_root):
    made = _put(client, "item:1", [1, 0, 0], {"category": "phones", "tags": ["5g", "sale"]})
    assert made.status_code == 201 and made.json["dim"] == 3 and made.json["size"] == 1
    _put(client, "item:2", [0.9, 0.1, 0], {"category": "phones", "tags": ["5g"]})
    _put(client, "item:3", [0, 1, 0], {"category": "tv", "tags": ["sale"]})
    _put(client, "item:4", [0, 0, 1], {"category": "tv"})
    q = {"vector": [1, 0.05, 0], "k": 3, "index": "products"}
    got = client.simulate_post(SEARCH, json=q, headers=READ)
    assert _ids(got) == ["item:1", "item:2", "item:3"]
    assert got.json["items"][0]["metadata"] == {"category": "phones", "tags": ["5g", "sale"]}
    assert got.json["items"][0]["item_id"] == "1"
    tv = client.simulate_post(SEARCH, json={**q, "filters": {"category": "tv"}}, headers=READ)
    assert _ids(tv) == ["item:3", "item:4"]
    sale = client.simulate_post(SEARCH, json={**q, "filters": {"tags": ["sale"]}}, headers=READ)
    assert _ids(sale) == ["item:1", "item:3"]
    both = {"tags": ["sale"], "metadata": {"category": "tv"}}
    assert _ids(client.simulate_post(SEARCH, json={**q, "filters": both}, headers=READ)) == [
        "item:3"
    ]
    by_id = client.simulate_post(SEARCH, json={"item_id": "1", "k": 1, "index": "products"},
                                 headers=READ)  # fmt: skip
    assert _ids(by_id) == ["item:2"]  # (the item itself is left out)
    # replace: item:1 now points elsewhere
    again = _put(client, "item:1", [0, 0, 1], {"category": "tv"})
    assert again.status_code == 200 and again.json["replaced"] and again.json["size"] == 4
    assert _ids(client.simulate_post(SEARCH, json=q, headers=READ))[0] == "item:2"
    # another worker, and a restart: the log on disk is the index
    other = build_client(make_config(data_root))
    assert _ids(other.simulate_post(SEARCH, json=q, headers=READ))[0] == "item:2"
    gone = client.simulate_delete("/v1/recs/embeddings/item:2?index=products", headers=ADMIN)
    assert gone.status_code == 200 and gone.json["status"] == "deleted"
    assert "item:2" not in _ids(other.simulate_post(SEARCH, json=q, headers=READ))
    missing = client.simulate_delete("/v1/recs/embeddings/item:2?index=products", headers=ADMIN)
    assert missing.status_code == 404


def test_bad_vectors_are_problem_details(client):
    _put(client, "a", [1, 2, 3])
    cases = [
        (_put(client, "b", [1, 2]), 422, "wrong_dimension"),
        (_put(client, "c", [0, 0, 0]), 422, "bad_vector"),
        (_put(client, "d", [1, 2, 3], index="items"), 422, None),
        (_put(client, "e", [1e13, 0, 0]), 400, None),
        (_put(client, "f", []), 400, None),
    ]
    for resp, status, reason in cases:
        assert resp.status_code == status, resp.text
        assert resp.headers["content-type"] == "application/problem+json"
        if reason:
            assert resp.json["reason"] == reason
    nan = client.simulate_post(
        "/v1/recs/embeddings/index",
        body=b'{"id": "n", "vector": [NaN, 1, 2], "index": "products"}',
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert nan.status_code == 400
    for body, status in (
        ({"vector": [1, 2], "index": "products"}, 422),
        ({"vector": [1, 2, 3], "index": "nope"}, 404),
        ({"vector": [0, 0, 0], "index": "products"}, 422),
        ({"item_id": "zz", "index": "products"}, 404),
    ):
        resp = client.simulate_post(SEARCH, json=body, headers=READ)
        assert resp.status_code == status, (body, resp.text)


def test_bulk_keeps_good_lines(client):
    lines = [
        orjson.dumps({"id": "x1", "vector": [1, 0], "index": "bulk"}),
        b"not json",
        orjson.dumps({"id": "x2", "vector": [1, 0, 0], "index": "bulk"}),
        orjson.dumps({"id": "x3", "vector": "no", "index": "bulk"}),
        orjson.dumps({"id": "x4", "vector": [0, 1], "index": "bulk", "metadata": {"k": 1}}),
        orjson.dumps({"id": "x5", "vector": [0, 1], "index": "users"}),
    ]
    resp = client.simulate_post(
        "/v1/recs/embeddings/bulk",
        body=b"\n".join(lines),
        headers={**ADMIN, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 200, resp.text
    got = [(r["status"], r.get("reason")) for r in resp.json["results"]]
    assert got == [
        ("indexed", None),
        ("rejected", "unparsable"),
        ("rejected", "wrong_dimension"),
        ("rejected", "invalid"),
        ("indexed", None),
        ("rejected", "read_only_index"),
    ]
    q = {"vector": [0.1, 1], "k": 5, "index": "bulk", "filters": {"metadata": {"k": 1}}}
    assert _ids(client.simulate_post(SEARCH, json=q, headers=READ)) == ["x4"]


def test_snapshot_factors_are_the_items_index_with_tag_filters(client):
    # item i points at angle 9i degrees: the query at 40 degrees is nearest a4, a5, a3, ...
    vec = [float(np.cos(np.deg2rad(40))), float(np.sin(np.deg2rad(40)))]
    plain = client.simulate_post(SEARCH, json={"vector": vec, "k": 3}, headers=READ)
    assert _ids(plain) == ["item:a4", "item:a5", "item:a3"]
    winter = client.simulate_post(
        SEARCH, json={"vector": vec, "k": 3, "filters": {"tags": ["winter"]}}, headers=READ
    )
    assert _ids(winter) == ["item:a4", "item:a3", "item:a7"]
    nike = client.simulate_post(
        SEARCH, json={"vector": vec, "k": 3, "filters": {"brand": "nike"}}, headers=READ
    )
    assert _ids(nike) == ["item:a5", "item:a3", "item:a0"]
    # an upsert re-tagging a5 counts at once (the overlaid snapshot)
    client.simulate_post(
        "/v1/recs/features/entities/item/a5",
        json={"features": {"tags": ["winter"]}},
        headers=ADMIN,
    )
    winter = client.simulate_post(
        SEARCH, json={"vector": vec, "k": 3, "filters": {"tags": ["winter"]}}, headers=READ
    )
    assert _ids(winter) == ["item:a4", "item:a5", "item:a3"]
    users = client.simulate_post(
        SEARCH, json={"vector": [0, 1], "k": 1, "index": "users"}, headers=READ
    )
    assert _ids(users) == ["user:u2"]


def test_approximate_search_matches_exact_and_honours_filters_and_deletes():
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((200, 16)).astype(np.float32)
    data = centres[rng.integers(0, 200, 60_000)] + 0.3 * rng.standard_normal((60_000, 16))
    index = VectorIndex(16, "cosine", exact_below=10_000, nprobe=16)
    index.upsert([f"v{i}" for i in range(len(data))], data)
    queries = data[:50] + 0.05
    hits = 0
    for q in queries:
        want = set(index.search(q, 10, exact=True)[0].tolist())
        hits += len(want & set(index.search(q, 10)[0].tolist()))
    assert index._ivf is not None and hits / 500 >= 0.95
    allow = np.zeros(index.rows, dtype=bool)
    allow[::3] = True
    allow[:15_000] = True  # (more than exact_below admitted: the IVF with a selector)
    rows, _ = index.search(queries[0], 10, allow=allow)
    assert len(rows) == 10 and allow[rows].all()
    best = index.search(queries[0], 1)[0][0]
    assert index.delete(index.ids[best])
    assert best not in index.search(queries[0], 10)[0]
    index.upsert(["new"], queries[0][None, :])
    assert index.ids[index.search(queries[0], 1)[0][0]] == "new"


def test_no_tenant_reaches_another_tenants_vectors(client):
    _put(client, "secret", [1, 0, 0], {"owner": "acme-marker"})
    spy = client.simulate_post(
        SEARCH, json={"vector": [1, 0, 0], "index": "products"}, headers=auth("globex")
    )
    assert spy.status_code == 404 and "acme-marker" not in spy.text
    assert (
        client.simulate_delete(
            "/v1/recs/embeddings/secret?index=products", headers=auth("globex", ("admin",))
        ).status_code
        == 404
    )
    org = auth("acme", ("admin",), **{"X-Org-Id": "globex"})
    for method, path, body in (
        ("POST", "/v1/recs/embeddings/index", {"id": "x", "vector": [1], "index": "products"}),
        ("POST", "/v1/recs/embeddings/bulk", [{"id": "x", "vector": [1]}]),
        ("DELETE", "/v1/recs/embeddings/secret?index=products", None),
        ("POST", SEARCH, {"vector": [1, 0, 0], "index": "products"}),
    ):
        assert client.simulate_request(method, path, json=body, headers={}).status_code == 401
        assert client.simulate_request(method, path, json=body, headers=org).status_code == 403
    mine = client.simulate_post(
        SEARCH, json={"vector": [1, 0, 0], "index": "products"}, headers=READ
    )
    assert _ids(mine) == ["secret"]


# --- content embeddings (TF-IDF + SVD fitted by the pipeline) ---------------------------------


@pytest.fixture()
def retail_root(data_root) -> str:
    """acme's warehouse items: an online-retail catalogue, titles only, ids r0..r29 (none in
    the snapshot: items with zero events); the pipeline's content asset materialised on it."""
    import dagster as dg
    import polars as pl

    from pipelines.resources import StorageResource
    from pipelines.training.content import content_embeddings
    from recsys.storage import Storage

    store = Storage(data_root)
    items = pl.DataFrame({"item_id": [f"r{i}" for i in range(len(RETAIL))], "title": RETAIL})
    os.makedirs(os.path.dirname(store.table_path("acme", "items")), exist_ok=True)
    items.write_parquet(store.table_path("acme", "items"))
    result = dg.materialize(
        [content_embeddings],
        resources={"storage": StorageResource(root=data_root)},
        run_config={"ops": {"content_embeddings": {"config": {"tenants": ["acme"], "dim": 24}}}},
    )
    assert result.success
    return data_root


def _words(text: str) -> set[str]:
    return set(text.replace("'", " ").split())


def test_cold_items_get_content_neighbours_sharing_words(retail_root):
    client = build_client(make_config(retail_root))
    shared = 0
    for i, title in enumerate(RETAIL):
        resp = client.simulate_get(
            f"/v1/recs/item/r{i}/related?strategy=content&limit=3", headers=READ
        )
        assert resp.status_code == 200, resp.text
        assert resp.json["meta"]["algo_version"].startswith("content@")
        top = resp.json["items"]
        others = [RETAIL[int(it["item_id"][1:])] for it in top]
        has_kin = any(_words(title) & _words(t) for j, t in enumerate(RETAIL) if j != i)
        if has_kin and top:
            assert _words(title) & _words(others[0]), (title, others)
            shared += 1
    assert shared >= 25  # (the few titles sharing no word with any other have none to share)
    unknown = client.simulate_get("/v1/recs/item/zz/related?strategy=content", headers=READ)
    assert unknown.status_code == 404


def test_generate_embeds_texts_and_items_with_the_content_model(retail_root):
    client = build_client(make_config(retail_root))
    gen = "/v1/recs/embeddings/generate"
    got = client.simulate_post(gen, json={"input": "hand warmer"}, headers=READ)
    assert got.status_code == 200, got.text
    assert got.json["dim"] == 24 and got.json["model"].startswith("content@")
    vec = np.asarray(got.json["vector"])
    assert abs(np.linalg.norm(vec) - 1) < 1e-4
    # the vector finds the hand warmers among the catalogue's content vectors
    client.simulate_post(
        "/v1/recs/embeddings/bulk",
        json=[
            {"id": f"item:r{i}", "vector": client.simulate_post(
                gen, json={"item_id": f"r{i}"}, headers=READ).json["vector"], "index": "texts"}
            for i in range(len(RETAIL))
        ],
        headers=ADMIN,
    )  # fmt: skip
    near = client.simulate_post(
        SEARCH, json={"vector": vec.tolist(), "k": 2, "index": "texts"}, headers=READ
    )
    assert sorted(_ids(near)) == ["item:r4", "item:r5"]
    # the content model's vectors are the read-only index `content`: generate + search is a
    # text search over the catalogue
    text = client.simulate_post(
        SEARCH, json={"vector": vec.tolist(), "k": 2, "index": "content"}, headers=READ
    )
    assert sorted(_ids(text)) == ["item:r4", "item:r5"]
    clocks = client.simulate_post(SEARCH, json={"item_id": "r23", "k": 2, "index": "content"},
                                  headers=READ)  # fmt: skip
    assert sorted(_ids(clocks)) == ["item:r24", "item:r25"]
    item = client.simulate_post(
        gen, json={"item": {"title": "PINK ALARM CLOCK", "tags": ["clock"]}}, headers=READ
    )
    assert item.status_code == 200 and "ALARM" in item.json["text"]
    for body, reason in (
        ({"input": ""}, "empty"),
        ({"input": "   "}, "empty"),
        ({"input": "qqqqq"}, "no_known_terms"),
    ):
        bad = client.simulate_post(gen, json=body, headers=READ)
        assert bad.status_code == 422 and bad.json["reason"] == reason, bad.text
    assert client.simulate_post(gen, json={}, headers=READ).status_code == 422
    assert client.simulate_post(gen, json={"item_id": "zz"}, headers=READ).status_code == 404
    none_yet = client.simulate_post(gen, json={"input": "hand"}, headers=auth("globex"))
    assert none_yet.status_code == 503 and none_yet.json["code"] == "RECSYS_NO_CONTENT_MODEL"


def test_a_log_of_mostly_replaced_vectors_is_compacted(client, data_root, monkeypatch):
    from serving.control import embeddings

    monkeypatch.setattr(embeddings, "COMPACT_BYTES", 1)
    other = build_client(make_config(data_root))  # (another worker, reading before and after)
    _put(client, "keep", [0, 1], {"tag": "k"}, index="churn")
    for n in range(30):
        _put(client, "x", [1, n / 100], index="churn")
    q = {"vector": [1, 0.3], "k": 2, "index": "churn"}
    assert _ids(other.simulate_post(SEARCH, json=q, headers=READ)) == ["x", "keep"]
    log = os.path.join(data_root, "serving", "vectors", "acme", "churn.log")
    with open(log, "rb") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 6  # (init, keep, x, and at most as many dead rows as live ones)
    assert client.simulate_delete("/v1/recs/embeddings/x?index=churn", headers=ADMIN).json
    assert _ids(other.simulate_post(SEARCH, json=q, headers=READ)) == ["keep"]
    got = other.simulate_post(SEARCH, json={**q, "filters": {"metadata": {"tag": "k"}}},
                              headers=READ)  # fmt: skip
    assert _ids(got) == ["keep"] and got.json["items"][0]["metadata"] == {"tag": "k"}

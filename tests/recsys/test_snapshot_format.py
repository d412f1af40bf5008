"""Snapshot writer/reader round trip, verification, and the analyst copies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.contract import ITEM_SCHEMA
from recsys.snapshot import (
    SIGNALS,
    SnapshotError,
    SnapshotWriter,
    connect_duckdb,
    open_snapshot,
    write_snapshot,
)
from recsys.snapshot.format import build_hash_table, encode_ids, id_hash
from recsys.snapshot.synthetic import build_synthetic_snapshot


def _items() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "title": ["A", "B", None, "D"],
            "category": ["shoes", None, "shoes", "hats"],
            "brand": ["acme", "acme", None, "zen"],
            "price": [10.0, None, 3.5, 7.25],
            "tags": [["red", "sale"], [], None, ["red"]],
            "available": [True, False, True, True],
            "created_at": [None] * 4,
            "attributes": [None] * 4,
        },
        schema=ITEM_SCHEMA,
    )


def _candidates() -> dict[str, list]:
    # user 0 -> c (0.9), a (0.5); user 1 -> none; user 2 -> d (0.7), b (0.2), a (0.1); unsorted
    return {
        "user_idx": [2, 0, 2, 0, 2],
        "item_idx": [1, 0, 3, 2, 0],
        "score": [0.2, 0.5, 0.7, 0.9, 0.1],
        "pop": [1, 2, 3, 4, 5],
        "cooc": [0.0] * 5,
        "emb": [0.5] * 5,
        "ranker": [0.2, 0.5, 0.7, 0.9, 0.1],
        "reason": [0, 1, 2, 3, 0],
    }


@pytest.fixture
def small(tmp_path: Path) -> str:
    out = str(tmp_path / "snap")
    write_snapshot(
        out,
        tenant="t1",
        user_ids=["u0", "u1", "u2"],
        items=_items(),
        candidates=_candidates(),
        seen={"user_idx": [0, 0, 2], "item_idx": [3, 1, 2]},
        similar={
            "emb": {"item_idx": [0, 0, 3], "similar_idx": [3, 2, 0], "score": [0.1, 0.8, 0.4]}
        },
        fallbacks={"popular": ([1, 0, 3], [5.0, 9.0, 1.0]), "category:shoes": ([2, 0], [1.0, 2.0])},
        segments=["vip", None, "vip"],
        factors=(np.ones((3, 2), np.float32), np.arange(8, dtype=np.float32).reshape(4, 2), None),
        models={"champion": {"name": "als", "version": "3", "run_id": "r1"}},
        config_version="cfg-7",
    )
    return out


def test_round_trip(small: str) -> None:
    snap = open_snapshot(small, checksums=True)
    assert (snap.tenant, snap.n_users, snap.n_items) == ("t1", 3, 4)
    assert snap.manifest["models"]["champion"]["run_id"] == "r1"
    assert snap.manifest["config_version"] == "cfg-7"
    assert snap.manifest["counts"]["candidates"] == 5
    assert [snap.user_index(u) for u in ("u0", "u1", "u2", "nobody")] == [0, 1, 2, None]
    assert snap.item_index("d") == 3 and snap.item_id(3) == "d" and snap.item_index("zz") is None

    items, score, signals, reason = snap.user_candidates(0)
    assert snap.item_ids(items) == ["c", "a"]
    np.testing.assert_allclose(score, [0.9, 0.5])
    assert signals.shape == (2, len(SIGNALS))
    np.testing.assert_allclose(signals[:, SIGNALS.index("pop")], [4, 2])
    assert reason.tolist() == [3, 1]
    assert snap.user_candidates(1)[0].size == 0
    assert snap.item_ids(snap.user_candidates(2)[0]) == ["d", "b", "a"]

    assert snap.user_seen(0).tolist() == [1, 3] and snap.user_seen(1).size == 0
    assert [snap.user_segment(u) for u in range(3)] == ["vip", None, "vip"]
    assert snap.similar(0, "emb")[0].tolist() == [2, 3] and snap.similar(1, "cooc")[0].size == 0
    with pytest.raises(ValueError):
        snap.similar(0, "nope")

    assert snap.available.tolist() == [True, False, True, True]
    assert [snap.category_name(c) for c in snap.category_id] == ["shoes", None, "shoes", "hats"]
    assert [snap.brand_name(b) for b in snap.brand_id] == ["acme", "acme", None, "zen"]
    assert np.isnan(snap.price[1]) and snap.price[3] == pytest.approx(7.25)
    assert [snap.tag_name(t) for t in snap.item_tags(0)] == ["red", "sale"]
    assert snap.item_tags(2).size == 0 and snap.tag_id("nope") is None

    fb_items, fb_score = snap.fallback("popular")
    assert fb_items.tolist() == [0, 1, 3] and fb_score.tolist() == [9.0, 5.0, 1.0]
    assert snap.fallback("category:shoes")[0].tolist() == [0, 2]
    assert snap.fallback("trending") is None
    assert snap.has_factors and snap.user_factors(1).tolist() == [1.0, 1.0]
    assert snap.item_factors.shape == (4, 2) and snap.item_bias.tolist() == [0.0] * 4
    assert not snap.user_candidates(0)[0].flags.writeable


def test_duckdb_views(small: str, tmp_path: Path) -> None:
    moved = str(tmp_path / "elsewhere")
    os.rename(small, moved)  # views use relative paths: publication renames the folder
    con = connect_duckdb(moved)
    rows = con.execute(
        "SELECT user_id, rank, item_id, reason FROM recommendations ORDER BY user_id, rank"
    ).fetchall()
    assert [(u, r, i) for u, r, i, _ in rows] == [
        ("u0", 0, "c"),
        ("u0", 1, "a"),
        ("u2", 0, "d"),
        ("u2", 1, "b"),
        ("u2", 2, "a"),
    ]
    assert rows[0][3] == "similar to items you interacted with"
    assert con.execute("SELECT count(*) FROM seen").fetchone() == (3,)
    con.close()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: _flip_byte(p / "cand.score.npy"), "sha256"),
        (lambda p: (p / "seen.item.npy").unlink(), "missing"),
        (lambda p: _append(p / "cand.item.npy"), "bytes"),
        (lambda p: _edit_manifest(p, schema_version=99), "schema version"),
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    ],
)
def test_verify_refuses_damaged_snapshots(small: str, mutate, message: str) -> None:
    mutate(Path(small))
    with pytest.raises(SnapshotError, match=message):
        open_snapshot(small, checksums=True)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"\0\0\0\0")


def _edit_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


def test_structural_check_catches_inconsistent_counts(small: str) -> None:
    m = json.loads((Path(small) / "manifest.json").read_text())
    m["counts"]["candidates"] = 4
    (Path(small) / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(SnapshotError, match="inconsistent"):
        open_snapshot(small)


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    def writer(name: str) -> SnapshotWriter:
        return SnapshotWriter(
            str(tmp_path / name), tenant="t", user_ids=["u0", "u1"], items=_items()
        )

    dup = _candidates() | {"user_idx": [0, 0, 1, 0, 1], "item_idx": [0, 0, 1, 2, 3]}
    with pytest.raises(ValueError, match="duplicate"):
        writer("a").add_shard(0, 2, dup)
    cand = {k: v[:2] for k, v in _candidates().items()} | {"user_idx": [0, 1]}
    with pytest.raises(ValueError, match="already seen"):
        writer("b").add_shard(0, 2, cand, seen={"user_idx": [1], "item_idx": [0]})
    with pytest.raises(ValueError, match="out of range"):
        writer("c").add_shard(0, 2, cand | {"item_idx": [0, 9]})
    with pytest.raises(ValueError, match="out of order"):
        writer("d").add_shard(1, 2, cand)
    with pytest.raises(ValueError, match="duplicates"):
        SnapshotWriter(str(tmp_path / "e"), tenant="t", user_ids=["u0", "u0"], items=_items())
    w = writer("f")
    w.add_shard(0, 1, {k: [] for k in _candidates()})
    with pytest.raises(ValueError, match="cover"):
        w.finish()


def test_sharded_write_equals_single_shard(tmp_path: Path) -> None:
    a = build_synthetic_snapshot(str(tmp_path / "a"), 230, 120, n=15, seed=3, shard_size=1000)
    b = build_synthetic_snapshot(str(tmp_path / "b"), 230, 120, n=15, seed=3, shard_size=1000)
    assert a["counts"] == b["counts"]
    sa = open_snapshot(str(tmp_path / "a"))
    sb = open_snapshot(str(tmp_path / "b"))
    for u in (0, 117, 229):
        np.testing.assert_array_equal(sa.user_candidates(u)[0], sb.user_candidates(u)[0])
    # Shards of 50 users: the same arrays as one pass built from the same per-user rows.
    from recsys.snapshot.synthetic import synthetic_items, synthetic_shard, user_id_list

    def build(out: str, shard: int) -> None:
        w = SnapshotWriter(out, tenant="t", user_ids=user_id_list(230), items=synthetic_items(120))
        for s in range(0, 230, shard):
            parts = [
                synthetic_shard(x, min(230, x + 10), 120, 15, 5, 0)
                for x in range(s, min(230, s + shard), 10)
            ]
            cand = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
            seen = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
            w.add_shard(s, min(230, s + shard), cand, seen)
        w.finish()

    build(str(tmp_path / "one"), 230)
    build(str(tmp_path / "many"), 50)
    for name in (
        "cand.offsets",
        "cand.item",
        "cand.score",
        "cand.signals",
        "seen.offsets",
        "seen.item",
    ):
        np.testing.assert_array_equal(
            np.load(tmp_path / "one" / f"{name}.npy"), np.load(tmp_path / "many" / f"{name}.npy")
        )
    assert pl.read_parquet(tmp_path / "many" / "parquet" / "candidates").height == 230 * 15


def test_id_hash_table_finds_every_id_and_rejects_others(rng: np.random.Generator) -> None:
    ids = [f"id-{x}" for x in rng.choice(10**9, 5000, replace=False)]
    data, offsets, table = encode_ids(ids)
    from recsys.snapshot.reader import _IdTable

    t = _IdTable(data, offsets, table)
    assert all(t.index(s) == i for i, s in enumerate(ids))
    assert t.index("id-missing") is None and t.index("") is None
    assert t.id(17) == ids[17]
    # colliding hashes still resolve (forced: every key in one slot chain)
    same = build_hash_table(np.zeros(50, dtype=np.uint64))
    assert sorted(same[same >= 0].tolist()) == list(range(50))
    assert id_hash(b"x") == id_hash(b"x") != id_hash(b"y")

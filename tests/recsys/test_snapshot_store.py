"""Atomic publication, rollback, diff and pruning of snapshots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from recsys.snapshot import SnapshotError, SnapshotStore, open_snapshot
from recsys.snapshot.synthetic import build_synthetic_snapshot, synthetic_shard


def _publish(store: SnapshotStore, seed: int, n_users: int = 40) -> str:
    tmp = store.new_tmp_dir()
    build_synthetic_snapshot(tmp, n_users, 60, n=12, seed=seed, write_parquet=False)
    return store.publish(tmp)


def test_publish_switches_current_and_prunes(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "snapshots" / "t"), keep=2)
    assert store.current() is None and store.list() == []
    ids = [_publish(store, seed) for seed in range(3)]
    assert store.current_id() == ids[-1]
    assert open_snapshot(store.current()).snapshot_id == ids[-1]
    listed = store.list()
    assert [s.snapshot_id for s in listed] == [ids[2], ids[1]]  # keep=2: oldest pruned
    assert listed[0].is_current and not listed[1].is_current and listed[0].counts["users"] == 40
    assert not [n for n in os.listdir(store.root) if n.startswith(".tmp-")]


def test_failed_publication_leaves_current_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SnapshotStore(str(tmp_path / "s"), keep=3)
    live = _publish(store, 0)
    before = Path(store.root, "CURRENT").read_bytes()

    # 1. a corrupted file: verification refuses it, the temp folder is removed
    tmp = store.new_tmp_dir()
    build_synthetic_snapshot(tmp, 40, 60, n=12, seed=1, write_parquet=False)
    with open(os.path.join(tmp, "cand.item.npy"), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x7f")
    with pytest.raises(SnapshotError, match="sha256"):
        store.publish(tmp)
    assert not os.path.exists(tmp)

    # 2. the writer dies half-way: nothing to publish, CURRENT unchanged
    tmp = store.new_tmp_dir()
    import recsys.snapshot.synthetic as synthetic

    calls = {"n": 0}

    def dying_shard(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("worker killed")
        return synthetic_shard(*args, **kwargs)

    monkeypatch.setattr(synthetic, "synthetic_shard", dying_shard)
    with pytest.raises(RuntimeError):
        build_synthetic_snapshot(tmp, 40, 60, n=12, seed=2, shard_size=10, write_parquet=False)
    with pytest.raises(SnapshotError, match="manifest"):
        store.publish(tmp)
    monkeypatch.undo()

    # 3. the switch itself fails (disk full at the CURRENT write): old CURRENT intact
    tmp = store.new_tmp_dir()
    build_synthetic_snapshot(tmp, 40, 60, n=12, seed=3, write_parquet=False)

    def no_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError):
        store.publish(tmp)
    monkeypatch.undo()

    assert Path(store.root, "CURRENT").read_bytes() == before
    assert store.current_id() == live
    assert open_snapshot(store.current(), checksums=True).snapshot_id == live


def test_rollback(tmp_path: Path) -> None:
    store = SnapshotStore(str(tmp_path / "s"), keep=5)
    a, b, c = (_publish(store, seed) for seed in range(3))
    assert store.rollback() == b and store.current_id() == b
    assert store.rollback() == a
    with pytest.raises(SnapshotError, match="older"):
        store.rollback()
    assert store.rollback(c) == c
    with pytest.raises(SnapshotError, match="unknown"):
        store.rollback("20000101T000000.000000Z-000000")
    # prune never removes the current snapshot, even when it is the oldest
    store.rollback(a)
    removed = store.prune(keep=1)
    assert set(removed) == {b} and set(store.ids()) == {a, c} and store.current_id() == a


@pytest.mark.parametrize("block", [65536, 7, 1])
def test_diff_on_a_known_case(tmp_path: Path, monkeypatch, block: int) -> None:
    """The same report whether the users are compared all at once or in blocks."""
    import recsys.snapshot.store as store_module

    monkeypatch.setattr(store_module, "DIFF_BLOCK", block)
    store = SnapshotStore(str(tmp_path / "s"), keep=5)
    a = _publish(store, 0)
    same = _publish(store, 0)  # same seed: identical recommendations
    other = _publish(store, 1)
    d = store.diff(a, same, k=10)
    assert (d.users_compared, d.users_changed, d.mean_overlap) == (40, 0, 1.0)

    # b: the same as a except 3 users whose top-10 is changed on purpose
    tmp = store.new_tmp_dir()
    build_synthetic_snapshot(tmp, 40, 60, n=12, seed=0, write_parquet=False)
    path = Path(tmp)
    items = np.load(path / "cand.item.npy")
    off = np.load(path / "cand.offsets.npy")
    seen_off, seen = np.load(path / "seen.offsets.npy"), np.load(path / "seen.item.npy")
    for u in (3, 10, 39):  # swap rank 0 with rank 11 (outside the top 10)
        s = off[u]
        items[s], items[s + 11] = items[s + 11], items[s]
    np.save(path / "cand.item.npy", items)
    _rehash(path)
    b = store.publish(tmp)
    d = store.diff(a, b, k=10)
    assert d.users_changed == 3 and d.users_compared == 40
    assert d.mean_overlap == pytest.approx(1 - 3 / 40 / 10)
    assert store.diff(a, b, k=12).users_changed == 0  # same sets at k=12
    assert store.diff(a, other).users_changed > 30
    del seen_off, seen


def _rehash(path: Path) -> None:
    import hashlib
    import json

    m = json.loads((path / "manifest.json").read_text())
    for rel, info in m["files"].items():
        data = (path / rel).read_bytes()
        info["bytes"], info["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (path / "manifest.json").write_text(json.dumps(m))


def test_store_refuses_remote_roots_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="local"):
        SnapshotStore("s3://bucket/snapshots/t")
    store = SnapshotStore(str(tmp_path / "s"))
    with pytest.raises(SnapshotError, match="inside"):
        store.publish(str(tmp_path))


def test_cli_list_rollback_diff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from recsys.snapshot.cli import main
    from recsys.storage import Storage

    root = str(tmp_path / "data")
    store = SnapshotStore(Storage(root).snapshots_dir("shop"))
    assert main(["snapshot", "list", "--data-root", root, "--tenant", "shop"]) == 0
    assert "no snapshots" in capsys.readouterr().out
    a, b = _publish(store, 0), _publish(store, 1)

    assert main(["snapshot", "list", "--data-root", root, "--tenant", "shop"]) == 0
    out = capsys.readouterr().out
    assert f"* {b}" in out and f"  {a}" in out

    assert (
        main(["snapshot", "diff", "--data-root", root, "--tenant", "shop", "-k", "5", "--json"])
        == 0
    )
    import json

    report = json.loads(capsys.readouterr().out)
    assert (report["a"], report["b"], report["k"], report["users_compared"]) == (a, b, 5, 40)

    assert main(["snapshot", "rollback", "--data-root", root, "--tenant", "shop"]) == 0
    assert store.current_id() == a and f"{b} -> {a}" in capsys.readouterr().out

    # bad input: one line on stderr, exit code 1, no traceback
    assert main(["snapshot", "rollback", "nope", "--data-root", root, "--tenant", "shop"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and err.count("\n") == 1
    assert main(["snapshot", "diff", a, "missing", "--data-root", root, "--tenant", "shop"]) == 1
    assert "unknown snapshot" in capsys.readouterr().err


def test_diff_matches_users_and_items_by_id(tmp_path: Path) -> None:
    """b indexes users and items differently and lacks one user; a and b agree except user x."""
    from recsys.snapshot import diff_snapshots, write_snapshot
    from recsys.snapshot.synthetic import synthetic_items

    items = synthetic_items(6)
    ids = items["item_id"].to_list()

    def cand(rows):
        return {
            "user_idx": [u for u, _ in rows],
            "item_idx": [i for _, i in rows],
            "score": [1.0 - 0.1 * n for n in range(len(rows))],
            **{s: [0.0] * len(rows) for s in ("pop", "cooc", "emb", "ranker")},
            "reason": [0] * len(rows),
        }

    write_snapshot(
        str(tmp_path / "a"),
        tenant="t",
        user_ids=["x", "y", "z"],
        items=items,
        candidates=cand([(0, 0), (0, 1), (1, 2), (1, 3), (2, 4)]),
    )
    rev = items.reverse()  # item j of b is item 5 - j of a
    write_snapshot(
        str(tmp_path / "b"),
        tenant="t",
        user_ids=["y", "x"],
        items=rev,
        candidates=cand([(0, 5 - 3), (0, 5 - 2), (1, 5 - 0), (1, 5 - 5)]),
    )
    d = diff_snapshots(str(tmp_path / "a"), str(tmp_path / "b"), k=10)
    assert (d.users_compared, d.users_changed, d.users_only_in_a, d.users_only_in_b) == (2, 1, 1, 0)
    assert d.mean_overlap == pytest.approx((0.5 + 1.0) / 2)
    assert ids[0] == rev["item_id"][5]

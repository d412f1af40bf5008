"""The item change log (`serving.crr.overlay`) is compacted: superseded lines and changes every
published snapshot already holds go, reads stay identical, and writers racing a compaction lose
nothing. Known answers on the tiny acme snapshot of tests/serving (a0..a19: a0 category c1,
every item but a2 available; a3 tagged winter, nike)."""

from __future__ import annotations

import multiprocessing
import os
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))
from serving_helpers import auth, build_client, make_config, publish_tiny  # noqa: E402

from serving.crr import overlay  # noqa: E402
from serving.crr.overlay import (  # noqa: E402
    ItemOverlays,
    append_changes,
    changes_path,
    compact_changes,
    fold,
)

ADMIN = auth("acme", ("admin",))
READ = auth("acme")
ENTITY = "/v1/recs/features/entities"


@pytest.fixture()
def root(tmp_path) -> str:
    """A data root of its own (a test here publishes into it)."""
    out = str(tmp_path / "root")
    publish_tiny(out, "acme", "a")
    return out


def _lines(root: str) -> int:
    with open(changes_path(os.path.join(root, "serving"), "acme"), "rb") as f:
        return f.read().count(b"\n")


def _served(live) -> dict[str, object]:
    """What rules read of every item of an overlaid snapshot, by names."""
    snap = live.snap
    out = {}
    for iid in [f"a{i}" for i in range(20)]:
        r = live.item_index(iid)
        a, b = int(live.tag_offsets[r]), int(live.tag_offsets[r + 1])
        out[iid] = (
            bool(live.available[r]),
            snap.category_name(int(live.category_id[r])),
            snap.brand_name(int(live.brand_id[r])),
            sorted(snap.tag_name(int(t)) for t in np.asarray(live.tag_ids)[a:b]),
        )
    return out


def _recommend(client) -> list[list[str]]:
    out = []
    for body in (
        {"user": {"user_id": "u1"}, "k": 10},
        {"user": {"user_id": "u1"}, "k": 10, "constraints": {"required_tags": ["clearance"]}},
        {"user": {"user_id": "u3"}, "k": 10, "constraints": {"forbidden_tags": ["winter"]}},
    ):
        resp = client.simulate_post("/v1/recommend", json=body, headers=READ)
        assert resp.status_code == 200, resp.text
        out.append([it["item_id"] for it in resp.json["items"]])
    return out


def _upserts(client) -> None:
    """31 upserts: a3 toggled (ends unavailable), a4 re-tagged (ends clearance), and two that
    change nothing the snapshot serves (a0's category c1, a5 available)."""
    for i in range(11):
        r = client.simulate_post(
            f"{ENTITY}/item/a3", json={"features": {"available": i % 2 == 1}}, headers=ADMIN
        )
        assert r.status_code == 200, r.text
    for i in range(10):
        tags = ["clearance"] if i == 9 else [f"t{i}"]
        client.simulate_post(f"{ENTITY}/item/a4", json={"features": {"tags": tags}}, headers=ADMIN)
    for _ in range(5):
        client.simulate_post(
            f"{ENTITY}/item/a0", json={"features": {"category": "c1"}}, headers=ADMIN
        )
        client.simulate_post(
            f"{ENTITY}/item/a5", json={"features": {"available": True}}, headers=ADMIN
        )


def test_compaction_keeps_one_line_per_changed_item_and_reads_identical(root):
    serving = os.path.join(root, "serving")
    client = build_client(make_config(root))
    _upserts(client)
    assert _lines(root) == 31
    reader = ItemOverlays(serving)  # (a worker that has read the log before the compaction)
    reader.poll("acme")
    before_items = {k: dict(v) for k, v in reader.changes("acme").items.items()}
    live_before = _served(_live(root))
    answers = _recommend(client)

    assert compact_changes(serving, "acme") == (31, 2)
    assert _lines(root) == 2
    with open(changes_path(serving, "acme"), "rb") as f:
        kept = fold(f.read())
    assert list(kept) == ["a3", "a4"]
    assert kept["a3"]["available"] is False and kept["a4"]["tags"] == ["clearance"]
    # the reader that read the old file re-reads the new one whole: the same changes that
    # matter, and a0 / a5 (no-ops on the snapshot) gone
    assert reader.poll("acme")
    after_items = dict(reader.changes("acme").items)
    assert after_items == {k: v for k, v in before_items.items() if k in ("a3", "a4")}
    time.sleep(overlay.OVERLAY_CHECK_S + 0.05)
    assert _served(_live(root)) == live_before  # a worker reading the compacted log
    assert _recommend(client) == answers
    assert _recommend(build_client(make_config(root))) == answers
    assert "a3" not in answers[0] and answers[1] == ["a4"]
    # nothing to shorten: the file is left as it is
    inode = os.stat(changes_path(serving, "acme")).st_ino
    assert compact_changes(serving, "acme") == (2, 2)
    assert os.stat(changes_path(serving, "acme")).st_ino == inode


def _live(root):
    """The acme snapshot as a new worker serves it (overlaid with the log)."""
    from serving.snapshot import SnapshotRegistry

    registry = SnapshotRegistry(os.path.join(root, "snapshots"), check_interval_s=0.0)
    registry.install_overlay(ItemOverlays(os.path.join(root, "serving")))
    return registry.live("acme")


def test_a_publication_compacts_the_log(root):
    """Each worker compacts once it serves a newer snapshot: changes both retained snapshots
    hold go, the others stay."""
    client = build_client(make_config(root))
    _upserts(client)
    assert _lines(root) == 31
    answers = _recommend(client)
    publish_tiny(root, "acme", "a")  # (the same catalogue: a3 available, a4 winter-less)
    time.sleep(overlay.OVERLAY_CHECK_S + 0.05)
    assert _recommend(client) == answers  # the request that swapped the snapshot in compacted
    assert _lines(root) == 2


def test_writers_racing_compactions_lose_nothing(root, monkeypatch):
    """Three processes append 400 changes each (their own 40 items, each item's tags the
    number of its last write) while this one compacts over and over, and the writers
    themselves compact past a 2 kB threshold: the log folds to every item's last write."""
    serving = os.path.join(root, "serving")
    monkeypatch.setattr(overlay, "COMPACT_BYTES", 2000)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(serving, w)) for w in range(3)]
    for p in procs:
        p.start()
    compactions = 0
    while any(p.is_alive() for p in procs):
        compact_changes(serving, "acme")
        compactions += 1
    for p in procs:
        p.join()
        assert p.exitcode == 0
    with open(changes_path(serving, "acme"), "rb") as f:
        got = fold(f.read())
    want = {f"w{w}-{i}": [f"n{360 + i}"] for w in range(3) for i in range(40)}
    assert {k: v["tags"] for k, v in got.items()} == want
    assert compactions > 1
    compact_changes(serving, "acme")
    assert _lines(root) == 120


def _writer(serving: str, w: int) -> None:
    for n in range(400):
        append_changes(serving, "acme", [{"id": f"w{w}-{n % 40}", "ts": "x", "tags": [f"n{n}"]}])

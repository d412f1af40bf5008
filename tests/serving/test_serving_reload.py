"""Hot reload: a newly published snapshot is served without restart; a broken one is refused."""

from __future__ import annotations

import os
import shutil

import numpy as np
from serving_helpers import build_client, ids, make_config, publish_tiny, recommend

from recsys.snapshot import SnapshotStore


def test_new_snapshot_is_picked_up_and_broken_one_refused(tmp_path):
    root = str(tmp_path)
    first = publish_tiny(root, "acme", "a")
    client = build_client(make_config(root))
    resp = recommend(client, {"k": 2, "user": {"user_id": "u1"}})
    assert resp.json["meta"]["snapshot_id"] == first and ids(resp) == ["a0", "a1"]

    second = publish_tiny(root, "acme", "a", variant=1)
    resp = recommend(client, {"k": 2, "user": {"user_id": "u1"}})
    assert resp.status_code == 200
    assert resp.json["meta"]["snapshot_id"] == second and ids(resp) == ["a7", "a6"]

    # A snapshot that fails verification: copy the good one, corrupt a file, point CURRENT at it
    # (bypassing publish, as a bad deploy or disk fault would).
    store = SnapshotStore(os.path.join(root, "snapshots", "acme"))
    broken = "29990101T000000.000000Z-broken"
    shutil.copytree(store.path_of(second), store.path_of(broken))
    with open(os.path.join(store.path_of(broken), "cand.item.npy"), "r+b") as f:
        f.truncate(10)
    store._switch(broken)
    resp = recommend(client, {"k": 2, "user": {"user_id": "u1"}})
    assert resp.status_code == 200 and resp.json["meta"]["snapshot_id"] == second
    ready = client.simulate_get("/readyz").json
    assert ready["tenants"]["acme"]["snapshot_id"] == second
    assert broken in ready["tenants"]["acme"]["error"]
    assert (
        'recsys_snapshot_loads_total{tenant="acme",outcome="refused"} 1'
        in client.simulate_get("/metrics").text
    )

    # and rolling forward to a good one works again
    store._switch(first)
    resp = recommend(client, {"k": 2, "user": {"user_id": "u1"}})
    assert resp.json["meta"]["snapshot_id"] == first


def test_check_interval_limits_stats(tmp_path):
    root = str(tmp_path)
    first = publish_tiny(root, "acme", "a")
    client = build_client(make_config(root, snapshot_check_s=3600.0))
    assert (
        recommend(client, {"k": 1, "user": {"user_id": "u1"}}).json["meta"]["snapshot_id"] == first
    )
    publish_tiny(root, "acme", "a", variant=1)
    # not re-checked within the interval ...
    assert (
        recommend(client, {"k": 1, "user": {"user_id": "u1"}}).json["meta"]["snapshot_id"] == first
    )
    # ... unless an admin invalidates the snapshot cache
    from serving_helpers import auth

    client.simulate_post(
        "/v1/admin/tenants/acme/cache/invalidate",
        json={"targets": ["snapshot"]},
        headers=auth("acme", ("admin",)),
    )
    assert (
        recommend(client, {"k": 1, "user": {"user_id": "u1"}}).json["meta"]["snapshot_id"] != first
    )


def test_out_of_range_index_in_a_live_snapshot_fails_one_request_and_leaves_no_marks(tmp_path):
    # A live snapshot damaged after publication (its tag table names a tag id past the end) must
    # fail the requests that read the bad entry with a Problem, not read stray memory, and must
    # not leave the failed request's filter marks behind for the next request.
    root = str(tmp_path)
    sid = publish_tiny(root, "acme", "a")
    store = SnapshotStore(os.path.join(root, "snapshots", "acme"))
    tag_ids = np.load(os.path.join(store.path_of(sid), "item_tags.id.npy"), mmap_mode="r+")
    tag_ids[0] = 1_000_000  # item a0's first tag (a0 is u1's best candidate)
    tag_ids.flush()
    del tag_ids
    client = build_client(make_config(root))

    body = {
        "k": 3,
        "user": {"user_id": "u1"},
        "candidates": {"exclude_ids": ["a9"]},
        "constraints": {"forbidden_tags": ["winter"]},
    }
    resp = recommend(client, body)
    assert resp.status_code == 500
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    assert resp.json["code"] == "RECSYS_INTERNAL" and resp.json["request_id"]

    # a9 was marked excluded by the failed call: a cold start (popular a8..a19) must still get it
    resp = recommend(client, {"k": 3, "user": {"user_id": "newcomer"}})
    assert resp.status_code == 200 and ids(resp) == ["a8", "a9", "a10"]
    # and requests that do not read the damaged entry are answered as before
    resp = recommend(client, {"k": 2, "user": {"user_id": "u1"}})
    assert resp.status_code == 200 and ids(resp) == ["a0", "a1"]


def test_a_background_registry_serves_the_old_snapshot_while_the_new_one_opens(tmp_path):
    """The server's registry (background=True): after a publish, requests keep getting the live
    snapshot without waiting while the new one is opened in a thread, which is then swapped in;
    one that fails to open leaves the old one serving. The first snapshot is opened at once."""
    import threading
    import time

    from recsys.snapshot import open_snapshot
    from serving.snapshot import TenantSnapshots

    root = str(tmp_path)
    first = publish_tiny(root, "acme", "a")
    gate = threading.Event()
    opened: list[str] = []

    def slow_open(path: str):
        if opened:  # (the first snapshot opens at once; later ones wait for the gate)
            assert gate.wait(10)
        opened.append(os.path.basename(path))
        return open_snapshot(path)

    store = SnapshotStore(os.path.join(root, "snapshots", "acme"))
    holder = TenantSnapshots("acme", store, 0.0, opener=slow_open, background=True)
    assert holder.live().snapshot_id == first
    second = publish_tiny(root, "acme", "a", variant=1)
    t = time.perf_counter()
    for _ in range(20):  # the opener is blocked: every call answers at once, from the old one
        assert holder.live().snapshot_id == first
    assert time.perf_counter() - t < 2.0
    assert [th.name for th in threading.enumerate()].count("snapshot-load-acme") == 1
    gate.set()
    deadline = time.time() + 10
    while holder.live().snapshot_id != second and time.time() < deadline:
        time.sleep(0.01)
    assert holder.live().snapshot_id == second
    assert opened == [first, second]

    # a broken snapshot: refused in the background, the live one keeps serving
    broken = "29990101T000000.000000Z-broken"
    shutil.copytree(store.path_of(second), store.path_of(broken))
    with open(os.path.join(store.path_of(broken), "cand.item.npy"), "r+b") as f:
        f.truncate(10)
    store._switch(broken)
    deadline = time.time() + 10
    while holder.last_error is None and time.time() < deadline:
        assert holder.live().snapshot_id == second
        time.sleep(0.01)
    assert broken in holder.last_error
    assert holder.live().snapshot_id == second

"""`recsys snapshot fetch`: a published snapshot copied from the pipeline's data root (an
fsspec URI; here fsspec's in-memory filesystem stands for an object store, and a second local
root for a shared volume) to a serving host's disk, verified by its checksums."""

from __future__ import annotations

import os
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from recsys.snapshot import SnapshotStore, open_snapshot
from recsys.snapshot.fetch import fetch_snapshot
from recsys.snapshot.reader import SnapshotError
from recsys.snapshot.synthetic import build_synthetic_snapshot
from recsys.storage import Storage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _publish_local(root: str, seed: int) -> str:
    store = SnapshotStore(Storage(root).snapshots_dir("default"))
    tmp = store.new_tmp_dir()
    build_synthetic_snapshot(tmp, n_users=300, n_items=80, n=20, seed=seed, dim=8)
    return store.publish(tmp)


def _upload(local_root: str, uri: str) -> None:
    fs = fsspec.filesystem("memory")
    fs.put(os.path.join(local_root, "snapshots"), uri.removeprefix("memory://") + "/snapshots",
           recursive=True)  # fmt: skip


@pytest.fixture
def remote(tmp_path):
    uri = f"memory://recsys-{tmp_path.name}"
    sid = _publish_local(str(tmp_path / "pipeline"), seed=1)
    _upload(str(tmp_path / "pipeline"), uri)
    yield uri, sid, tmp_path / "pipeline"
    fsspec.filesystem("memory").rm(uri.removeprefix("memory://"), recursive=True)


def test_fetch_copies_verifies_and_switches(remote, tmp_path):
    uri, sid, pipeline = remote
    dest = SnapshotStore(str(tmp_path / "serving" / "snapshots" / "default"))
    res = fetch_snapshot(Storage(uri), "default", dest)
    assert (res.snapshot_id, res.previous) == (sid, None) and res.copied_bytes > 0
    assert dest.current_id() == sid
    src = SnapshotStore(str(pipeline / "snapshots" / "default")).current()
    with open_snapshot(dest.current(), checksums=True) as a, open_snapshot(src) as b:
        assert a.n_users == b.n_users == 300
        np.testing.assert_array_equal(a.user_candidates(7)[0], b.user_candidates(7)[0])
    again = fetch_snapshot(Storage(uri), "default", dest)  # already live: nothing copied
    assert (again.snapshot_id, again.copied_bytes) == (sid, 0)


def test_a_corrupted_copy_never_goes_live(remote, tmp_path):
    uri, sid, _ = remote
    dest = SnapshotStore(str(tmp_path / "serving" / "snapshots" / "default"))
    fs = fsspec.filesystem("memory")
    path = uri.removeprefix("memory://") + f"/snapshots/default/{sid}/cand.item.npy"
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(SnapshotError, match="cand.item.npy: sha256 mismatch"):
        fetch_snapshot(Storage(uri), "default", dest)
    assert dest.current_id() is None and os.listdir(dest.root) == []  # no half copy left


def test_cli_fetches_from_another_root(tmp_path):
    sid = _publish_local(str(tmp_path / "pipeline"), seed=2)
    serving = str(tmp_path / "serving")
    recsys = os.path.join(os.path.dirname(sys.executable), "recsys")
    done = subprocess.run(
        [recsys, "snapshot", "fetch", "--from", str(tmp_path / "pipeline"), "--data-root", serving],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"{sid}: fetched") and "verified, live" in done.stdout
    assert SnapshotStore(os.path.join(serving, "snapshots", "default")).current_id() == sid
    missing = subprocess.run(
        [recsys, "snapshot", "fetch", "--from", str(tmp_path / "nowhere"), "--data-root", serving],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and "no published snapshot" in missing.stderr

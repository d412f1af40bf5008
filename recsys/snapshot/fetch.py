"""Copy a published snapshot from the data root's URI to a serving host's local disk.

The pipeline may keep its data on an object store or a shared volume (any fsspec URI); the
API memory-maps snapshots, so each serving host needs them on its own filesystem. `fetch`
reads ``<source>/snapshots/<tenant>/CURRENT`` (or takes an id), copies the files the
snapshot's manifest lists into a temporary folder of the local `SnapshotStore`, and publishes
it there: sha256 of every file against the manifest, a full open, then CURRENT switches
atomically. A damaged or partial copy never goes live (the temporary folder is removed and the
error names the file). Fetching the snapshot already live is a no-op; one already present but
not live is verified and switched to.

    recsys snapshot fetch --from s3://bucket/recsys --data-root /srv/recsys --tenant default
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
from dataclasses import dataclass

from recsys.snapshot.format import CURRENT, MANIFEST
from recsys.snapshot.reader import SnapshotError
from recsys.snapshot.store import SnapshotStore
from recsys.storage import Storage


@dataclass(frozen=True)
class FetchResult:
    snapshot_id: str
    copied_bytes: int  # 0 when the snapshot was already on this host
    previous: str | None


def fetch_snapshot(
    source: Storage, tenant: str, dest: SnapshotStore, snapshot_id: str | None = None
) -> FetchResult:
    """Make `snapshot_id` (default: the source's CURRENT) of `tenant` live in `dest`."""
    fs, src_dir = source.fs, source.snapshots_dir(tenant)
    if snapshot_id is None:
        try:
            snapshot_id = fs.cat_file(posixpath.join(src_dir, CURRENT)).decode().strip()
        except FileNotFoundError:
            raise SnapshotError(f"{src_dir}: no published snapshot (no {CURRENT})") from None
    dest.path_of(snapshot_id)  # validates the id (no path tricks from a remote CURRENT)
    previous = dest.current_id()
    if snapshot_id == previous:
        return FetchResult(snapshot_id, 0, previous)
    if snapshot_id in dest.ids():
        dest.rollback(snapshot_id)  # verifies checksums before switching
        return FetchResult(snapshot_id, 0, previous)

    src = posixpath.join(src_dir, snapshot_id)
    try:
        manifest = json.loads(fs.cat_file(posixpath.join(src, MANIFEST)))
    except FileNotFoundError:
        raise SnapshotError(f"{src}: no {MANIFEST} (not a published snapshot)") from None
    if manifest.get("snapshot_id") != snapshot_id:
        raise SnapshotError(f"{src}: manifest names {manifest.get('snapshot_id')!r}")
    tmp = dest.new_tmp_dir()
    copied = 0
    try:
        for rel in [MANIFEST, *manifest["files"]]:
            if rel.startswith("/") or ".." in rel.split("/"):
                raise SnapshotError(f"{src}: manifest lists an unsafe path {rel!r}")
            local = os.path.join(tmp, *rel.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            fs.get_file(posixpath.join(src, rel), local)
            copied += os.path.getsize(local)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    sid = dest.publish(tmp, checksums=True)  # sha256 of every file, a full open, then CURRENT
    return FetchResult(sid, copied, previous)

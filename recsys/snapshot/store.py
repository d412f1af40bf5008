"""Publish, list, roll back, diff and prune the snapshots of one tenant.

The folder layout and guarantees are in docs/snapshot-format.md. Snapshots must live on a local
filesystem: the server memory-maps them and publication relies on atomic `os.replace`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.snapshot.format import CURRENT, MANIFEST, TMP_PREFIX
from recsys.snapshot.reader import SnapshotError, _read_manifest, open_snapshot

#: Unfinished `.tmp-*` folders older than this are removed by `prune` (a crashed writer's).
STALE_TMP_SECONDS = 6 * 3600


@dataclass(frozen=True)
class SnapshotInfo:
    snapshot_id: str
    created_at: dt.datetime
    counts: dict[str, int]
    bytes: int
    is_current: bool
    path: str


@dataclass(frozen=True)
class DiffReport:
    a: str
    b: str
    k: int
    users_compared: int
    users_changed: int
    users_only_in_a: int
    users_only_in_b: int
    mean_overlap: float  # mean |top-k(a) & top-k(b)| / k over the compared users

    @property
    def changed_fraction(self) -> float:
        return self.users_changed / self.users_compared if self.users_compared else 0.0


class SnapshotStore:
    """The snapshots folder of one tenant (``Storage.snapshots_dir(tenant)``)."""

    def __init__(self, root: str, keep: int = 5) -> None:
        if "://" in root and not root.startswith("file://"):
            raise ValueError(f"snapshots must be on a local filesystem, got {root!r}")
        self.root = os.path.abspath(root.removeprefix("file://"))
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.keep = keep

    # --- reading -------------------------------------------------------------------------
    def current_id(self) -> str | None:
        """Id named by CURRENT, or None before the first publication. Cheap; poll it."""
        try:
            with open(os.path.join(self.root, CURRENT), encoding="utf-8") as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def current(self) -> str | None:
        """Absolute path of the live snapshot, or None before the first publication."""
        sid = self.current_id()
        return None if sid is None else self.path_of(sid)

    def path_of(self, snapshot_id: str) -> str:
        if not snapshot_id or "/" in snapshot_id or snapshot_id.startswith("."):
            raise SnapshotError(f"invalid snapshot id {snapshot_id!r}")
        return os.path.join(self.root, snapshot_id)

    def ids(self) -> list[str]:
        """Published snapshot ids, oldest first (ids sort by creation time)."""
        if not os.path.isdir(self.root):
            return []
        return sorted(
            name
            for name in os.listdir(self.root)
            if not name.startswith(".") and os.path.isfile(os.path.join(self.root, name, MANIFEST))
        )

    def list(self) -> list[SnapshotInfo]:
        """Published snapshots, newest first."""
        current = self.current_id()
        out = []
        for sid in reversed(self.ids()):
            path = self.path_of(sid)
            try:
                manifest = _read_manifest(path)
            except SnapshotError:
                continue  # a foreign or other-version folder: not ours to list
            out.append(
                SnapshotInfo(
                    snapshot_id=sid,
                    created_at=dt.datetime.fromisoformat(manifest["created_at"]),
                    counts=manifest["counts"],
                    bytes=sum(f["bytes"] for f in manifest["files"].values()),
                    is_current=sid == current,
                    path=path,
                )
            )
        return out

    # --- writing -------------------------------------------------------------------------
    def new_tmp_dir(self) -> str:
        """A fresh, empty folder inside the tenant's snapshots folder to write a snapshot into."""
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}")
        os.makedirs(path)
        return path

    def publish(self, tmp_dir: str, *, checksums: bool = True, prune: bool = True) -> str:
        """Verify the snapshot in `tmp_dir`, move it to its id, switch CURRENT to it, prune.

        Raises SnapshotError (and leaves CURRENT untouched) when verification fails; the
        temporary folder is then removed. Returns the published snapshot id.
        """
        tmp_dir = os.path.abspath(tmp_dir)
        if os.path.dirname(tmp_dir) != self.root:
            raise SnapshotError(f"{tmp_dir} is not inside {self.root}; use new_tmp_dir()")
        try:
            snap = open_snapshot(tmp_dir, verify=True, checksums=checksums)
            sid = snap.snapshot_id
            # The reader must be able to answer; touch one row of every kind.
            if snap.n_users:
                snap.user_candidates(0)
                snap.user_seen(0)
            snap.close()
            final = self.path_of(sid)
            if os.path.exists(final):
                raise SnapshotError(f"snapshot {sid} already exists")
            os.rename(tmp_dir, final)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        self._fsync_dir(self.root)
        self._switch(sid)
        if prune:
            self.prune()
        return sid

    def rollback(self, snapshot_id: str | None = None) -> str:
        """Point CURRENT at `snapshot_id`, or at the snapshot published just before the current.

        The target is verified (structure and checksums) first. Returns the new current id.
        """
        ids = self.ids()
        if not ids:
            raise SnapshotError(f"no snapshots in {self.root}")
        if snapshot_id is None:
            current = self.current_id()
            older = [s for s in ids if current is None or s < current]
            if not older:
                raise SnapshotError(f"no snapshot older than the current one ({current})")
            snapshot_id = older[-1]
        elif snapshot_id not in ids:
            raise SnapshotError(f"unknown snapshot {snapshot_id!r}; known: {', '.join(ids)}")
        open_snapshot(self.path_of(snapshot_id), verify=True, checksums=True).close()
        self._switch(snapshot_id)
        return snapshot_id

    def prune(self, keep: int | None = None) -> list[str]:
        """Remove all but the newest `keep` snapshots (never the current one) and stale temp dirs.

        Returns the removed ids.
        """
        keep = self.keep if keep is None else keep
        if keep < 1:
            raise ValueError("keep must be >= 1")
        current = self.current_id()
        ids = self.ids()
        doomed = [s for s in ids[: max(0, len(ids) - keep)] if s != current]
        for sid in doomed:
            # Rename first so a half-deleted folder is never listed as a snapshot.
            trash = os.path.join(self.root, f"{TMP_PREFIX}del-{sid}")
            os.rename(self.path_of(sid), trash)
            shutil.rmtree(trash, ignore_errors=True)
        now = dt.datetime.now().timestamp()
        for name in os.listdir(self.root) if os.path.isdir(self.root) else []:
            full = os.path.join(self.root, name)
            if name.startswith(TMP_PREFIX) and os.path.isdir(full):
                if name.startswith(f"{TMP_PREFIX}del-") or now - os.path.getmtime(full) > STALE_TMP_SECONDS:
                    shutil.rmtree(full, ignore_errors=True)
        return doomed

    # --- comparing -----------------------------------------------------------------------
    def diff(self, a: str, b: str, k: int = 10) -> DiffReport:
        """Compare the top-k of every user between snapshots `a` and `b` (ids).

        A user "changed" when the *set* of their top-k item ids differs. Users are matched by
        id, items by id, so the two snapshots may index them differently.
        """
        return diff_snapshots(self.path_of(a), self.path_of(b), k=k)

    # --- internals -----------------------------------------------------------------------
    def _switch(self, snapshot_id: str) -> None:
        tmp = os.path.join(self.root, f"{TMP_PREFIX}{CURRENT}-{uuid.uuid4().hex[:8]}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(snapshot_id + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.root, CURRENT))
        self._fsync_dir(self.root)

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _topk_table(snap: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(user_ids object[n], top-k item ids as a sorted object[n, <=k] matrix padded with '')."""
    import pyarrow as pa  # local: only the diff needs it

    off = np.asarray(snap._cand_off)
    counts = np.minimum(np.diff(off), k)
    starts = off[:-1]
    rows = np.repeat(np.arange(snap.n_users), counts)
    pos = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    item_idx = np.asarray(snap._cand_item[starts[rows] + pos])
    item_ids = _ids_array(snap._items)
    mat = np.full((snap.n_users, k), "", dtype=object)
    mat[rows, pos] = item_ids[item_idx]
    mat.sort(axis=1)
    del pa
    return _ids_array(snap._users), mat


def _ids_array(table: Any) -> np.ndarray:
    data = np.asarray(table._data).tobytes()
    off = np.asarray(table._offsets)
    return np.array([data[off[i] : off[i + 1]].decode("utf-8") for i in range(table.n)], dtype=object)


def diff_snapshots(path_a: str, path_b: str, k: int = 10) -> DiffReport:
    """`SnapshotStore.diff` on two snapshot folders."""
    if k < 1:
        raise ValueError("k must be >= 1")
    with open_snapshot(path_a) as sa, open_snapshot(path_b) as sb:
        ua, ta = _topk_table(sa, k)
        ub, tb = _topk_table(sb, k)
        pos_b = {u: i for i, u in enumerate(ub)}
        ia = np.array([pos_b.get(u, -1) for u in ua], dtype=np.int64)
        both = ia >= 0
        ra, rb = ta[both], tb[ia[both]]
        changed = int((ra != rb).any(axis=1).sum()) if ra.size else 0
        overlaps = [len(set(x) & set(y) - {""}) for x, y in zip(ra, rb, strict=True)]
        n_both = int(both.sum())
        return DiffReport(
            a=sa.snapshot_id,
            b=sb.snapshot_id,
            k=k,
            users_compared=n_both,
            users_changed=changed,
            users_only_in_a=int(len(ua) - n_both),
            users_only_in_b=int(len(ub) - n_both),
            mean_overlap=float(np.mean(overlaps) / k) if overlaps else 1.0,
        )

"""Publish, list, roll back, diff and prune the snapshots of one tenant.

The folder layout and guarantees are in docs/snapshot-format.md. Snapshots must live on a local
filesystem: the server memory-maps them and publication relies on atomic `os.replace`.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.durable import fsync_dir, write_atomic
from recsys.snapshot.format import CURRENT, MANIFEST, TMP_PREFIX
from recsys.snapshot.reader import SnapshotError, open_snapshot, read_manifest

#: Unfinished `.tmp-*` folders older than this are removed by `prune` (a crashed writer's).
STALE_TMP_SECONDS = 6 * 3600
#: Snapshot ids `prune` must keep beyond the newest `keep` (one per line): the ones deployments
#: refer to (a canary's, the one a rollback returns to), written by the control plane.
PINNED = "PINNED"


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
    mean_overlap: float  # mean |top-k(a) & top-k(b)| / max(|top-k(a)|, |top-k(b)|)

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
                manifest = read_manifest(path)
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

    def pinned(self) -> set[str]:
        """Ids `prune` keeps whatever their age (the PINNED file)."""
        try:
            with open(os.path.join(self.root, PINNED), encoding="utf-8") as f:
                return {line.strip() for line in f if line.strip()}
        except FileNotFoundError:
            return set()

    # --- writing -------------------------------------------------------------------------
    def pin(self, snapshot_ids: set[str]) -> None:
        """Replace the pinned ids (atomically)."""
        os.makedirs(self.root, exist_ok=True)
        body = "".join(f"{sid}\n" for sid in sorted(snapshot_ids))
        write_atomic(os.path.join(self.root, PINNED), body.encode())

    def new_tmp_dir(self) -> str:
        """A fresh, empty folder inside the tenant's snapshots folder to write a snapshot into."""
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}")
        os.makedirs(path)
        return path

    def publish(
        self, tmp_dir: str, *, checksums: bool = True, prune: bool = True, switch: bool = True
    ) -> str:
        """Verify the snapshot in `tmp_dir`, move it to its id, switch CURRENT to it (unless
        not `switch`: kept beside the live one, e.g. for a deployment to make live), prune.

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
        fsync_dir(self.root)
        if switch:
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
        """Remove all but the newest `keep` snapshots (never the current one nor a pinned one)
        and stale temp dirs.

        Returns the removed ids.
        """
        keep = self.keep if keep is None else keep
        if keep < 1:
            raise ValueError("keep must be >= 1")
        current = self.current_id()
        ids = self.ids()
        spared = self.pinned() | {current}
        doomed = [s for s in ids[: max(0, len(ids) - keep)] if s not in spared]
        for sid in doomed:
            # Rename first so a half-deleted folder is never listed as a snapshot.
            trash = os.path.join(self.root, f"{TMP_PREFIX}del-{sid}")
            os.rename(self.path_of(sid), trash)
            shutil.rmtree(trash, ignore_errors=True)
        now = dt.datetime.now().timestamp()
        for name in os.listdir(self.root) if os.path.isdir(self.root) else []:
            full = os.path.join(self.root, name)
            deleting = name.startswith(f"{TMP_PREFIX}del-")
            if (
                name.startswith(TMP_PREFIX)
                and os.path.isdir(full)
                and (deleting or now - os.path.getmtime(full) > STALE_TMP_SECONDS)
            ):
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
        write_atomic(os.path.join(self.root, CURRENT), (snapshot_id + "\n").encode())


def _topk_matrix(snap: Any, users: np.ndarray, k: int, item_map: np.ndarray | None = None):
    """int64[len(users), k]: the top-k item indices of each of `users` (mapped through
    `item_map`), sorted ascending, padded with -1."""
    off = np.asarray(snap.candidate_offsets)
    starts = off[users]
    counts = np.minimum(off[users + 1] - starts, k)
    rows = np.repeat(np.arange(len(users)), counts)
    pos = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    items = np.asarray(snap.candidate_items[starts[rows] + pos], dtype=np.int64)
    if item_map is not None:
        items = item_map[items]
    mat = np.full((len(users), k), -1, dtype=np.int64)
    mat[rows, pos] = items
    # pads (-1) first, then the items: equal rows <=> equal sets (items are unique per user)
    mat.sort(axis=1)
    return mat


#: users compared at a time by `diff_snapshots` (memory: a block's top-k, not every user's)
DIFF_BLOCK = 65536


def diff_snapshots(path_a: str, path_b: str, k: int = 10) -> DiffReport:
    """`SnapshotStore.diff` on two snapshot folders.

    Users and items are matched by id. A user changed when the set of their top-k differs;
    overlap is |top-k(a) & top-k(b)| / max(|top-k(a)|, |top-k(b)|) (1 when both are empty).
    Vectorized, a block of `DIFF_BLOCK` users at a time: a 1M-user comparison takes seconds.
    """
    import polars as pl

    if k < 1:
        raise ValueError("k must be >= 1")
    with open_snapshot(path_a) as sa, open_snapshot(path_b) as sb:
        items_a = pl.DataFrame({"id": sa.item_ids_arrow()}).with_row_index("a")
        items_b = pl.DataFrame({"id": sb.item_ids_arrow()}).with_row_index("b")
        joined = items_b.join(items_a, on="id", how="left").sort("b")
        # items only in b get distinct values below -1, so they never match a's items or pads
        b_to_a = joined["a"].cast(pl.Int64).fill_null(-1).to_numpy().copy()
        only_b = b_to_a < 0
        b_to_a[only_b] = -2 - np.flatnonzero(only_b)
        users_a = pl.DataFrame({"id": sa.user_ids_arrow()}).with_row_index("a")
        users_b = pl.DataFrame({"id": sb.user_ids_arrow()}).with_row_index("b")
        pairs = users_a.join(users_b, on="id", how="inner")
        ia = pairs["a"].to_numpy().astype(np.int64)
        ib = pairs["b"].to_numpy().astype(np.int64)
        changed, overlap_sum = 0, 0.0
        for s in range(0, len(ia), DIFF_BLOCK):  # a block of users: (block x k x k) at most
            xa = _topk_matrix(sa, ia[s : s + DIFF_BLOCK], k)
            xb = _topk_matrix(sb, ib[s : s + DIFF_BLOCK], k, b_to_a)
            changed += int((xa != xb).any(axis=1).sum())
            common = ((xa[:, :, None] == xb[:, None, :]) & (xa[:, :, None] >= 0)).sum(axis=(1, 2))
            size = np.maximum((xa >= 0).sum(axis=1), (xb >= 0).sum(axis=1))
            overlap_sum += float(np.where(size > 0, common / np.maximum(size, 1), 1.0).sum())
        n_both = int(ia.shape[0])
        return DiffReport(
            a=sa.snapshot_id,
            b=sb.snapshot_id,
            k=k,
            users_compared=n_both,
            users_changed=changed,
            users_only_in_a=sa.n_users - n_both,
            users_only_in_b=sb.n_users - n_both,
            mean_overlap=overlap_sum / n_both if n_both else 1.0,
        )

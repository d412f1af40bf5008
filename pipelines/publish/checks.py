"""Checks of the published snapshot: it is live and verifiable, and it covers the users."""

import contextlib
import shutil
import tempfile
from collections.abc import Iterator

import dagster as dg

from pipelines.resources import StorageResource
from pipelines.training.assets import tenants
from recsys.snapshot import SnapshotError, SnapshotStore, open_snapshot
from recsys.storage import Storage


@contextlib.contextmanager
def _live_snapshot(store: Storage, tenant: str) -> Iterator[str | None]:
    """The path of the tenant's live snapshot: under the root when it is a folder; on an
    object store, a copy fetched as a serving host does (`recsys.snapshot.fetch`), removed
    after the check."""
    if "://" not in store.root or store.root.startswith("file://"):
        yield SnapshotStore(store.snapshots_dir(tenant)).current()
        return
    from recsys.snapshot.fetch import fetch_snapshot

    tmp = tempfile.mkdtemp(prefix="recsys-check-")
    try:
        local = SnapshotStore(tmp)
        try:
            fetch_snapshot(store, tenant, local)
        except SnapshotError as exc:
            if "no published snapshot" not in str(exc):
                raise
        yield local.current()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dg.asset_check(
    asset="serving_snapshot",
    description="CURRENT names a snapshot whose checksums, schema and counts verify.",
)
def snapshot_live_and_verified(storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.storage()
    status, bad = {}, []
    for tenant in tenants(store, []):
        try:
            with _live_snapshot(store, tenant) as current:
                if current is None:
                    status[tenant] = "no snapshot"
                    bad.append(tenant)
                    continue
                with open_snapshot(current, checksums=True) as snap:
                    status[tenant] = snap.snapshot_id
        except SnapshotError as exc:
            status[tenant] = str(exc)
            bad.append(tenant)
    return dg.AssetCheckResult(
        passed=not bad,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"current": dg.MetadataValue.json(status)},
    )


@dg.asset_check(
    asset="serving_snapshot",
    description="At least 95% of the users have a full list of candidates.",
)
def snapshot_user_coverage(storage: StorageResource) -> dg.AssetCheckResult:
    import numpy as np

    store = storage.storage()
    cover, low = {}, []
    for tenant in tenants(store, []):
        with _live_snapshot(store, tenant) as current:
            if current is None:
                continue
            with open_snapshot(current) as snap:
                n = int(snap.manifest.get("n_per_user") or 0)
                counts = np.diff(snap.candidate_offsets)
                share = float((counts >= min(n, snap.n_items)).mean()) if snap.n_users else 1.0
        cover[tenant] = round(share, 4)
        if share < 0.95:
            low.append(tenant)
    return dg.AssetCheckResult(
        passed=not low,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"full_list_share": dg.MetadataValue.json(cover)},
    )

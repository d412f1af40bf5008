"""Checks of the published snapshot: it is live and verifiable, and it covers the users."""

import dagster as dg

from pipelines.resources import StorageResource
from pipelines.training.assets import tenants
from recsys.snapshot import SnapshotError, SnapshotStore, open_snapshot


@dg.asset_check(
    asset="serving_snapshot",
    description="CURRENT names a snapshot whose checksums, schema and counts verify.",
)
def snapshot_live_and_verified(storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.storage()
    status, bad = {}, []
    for tenant in tenants(store, []):
        snaps = SnapshotStore(store.snapshots_dir(tenant))
        current = snaps.current()
        if current is None:
            status[tenant] = "no snapshot"
            bad.append(tenant)
            continue
        try:
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
        current = SnapshotStore(store.snapshots_dir(tenant)).current()
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

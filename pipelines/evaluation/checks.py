"""The gate that stops publication of a regressed model."""

import dagster as dg

from pipelines.resources import StorageResource
from pipelines.training.assets import model_path, read_json, tenants


@dg.asset_check(
    asset="champion_model",
    blocking=True,
    description="The new model's served NDCG@10 did not regress beyond the tolerance.",
)
def champion_not_regressed(storage: StorageResource) -> dg.AssetCheckResult:
    """Fails when a tenant's new version was refused the champion alias for a regression.
    A tenant with too little data to evaluate passes (popularity serves); its reason is shown."""
    store = storage.storage()
    decisions, regressed = {}, []
    for tenant in tenants(store, []):
        path = model_path(store, tenant, "gate.json")
        if not store.exists(path):
            continue
        gate = read_json(store, path)
        decisions[tenant] = gate
        if not gate["promoted"] and gate.get("candidate_ndcg_at_10") is not None:
            regressed.append(tenant)
    return dg.AssetCheckResult(
        passed=not regressed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "regressed": dg.MetadataValue.json(regressed),
            "decisions": dg.MetadataValue.json(decisions),
        },
    )

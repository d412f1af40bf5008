"""Checks of the training assets."""

import dagster as dg

from pipelines.resources import StorageResource
from pipelines.training.assets import model_path, read_json, tenants


@dg.asset_check(
    asset="data_split",
    blocking=True,
    description="Train, validation and test windows do not overlap in time.",
)
def split_is_temporal(storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.storage()
    problems = {}
    for tenant in tenants(store, []):
        s = read_json(store, model_path(store, tenant, "split.json"))
        v, t = s.get("validation_start"), s.get("test_start")
        if v and t and v > t:
            problems[tenant] = f"validation starts {v} after test {t}"
    return dg.AssetCheckResult(
        passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)}
    )


@dg.asset_check(asset="ranker_model", description="Every tenant has a servable hybrid model.")
def hybrid_model_saved(storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.storage()
    missing = [
        t
        for t in tenants(store, [])
        if not store.exists(model_path(store, t, "final", "hybrid", "hybrid.json"))
    ]
    return dg.AssetCheckResult(
        passed=not missing, metadata={"missing": dg.MetadataValue.json(missing)}
    )

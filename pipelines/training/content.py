"""The content model: TF-IDF + SVD fitted on each tenant's item texts (`recsys.content`).

`content_embeddings` reads the validated items table and writes
``warehouse/<tenant>/content/`` (the model's arrays and one unit vector per item). The server
embeds texts with it (``POST /v1/recs/embeddings/generate``) and answers content neighbours
from the item vectors (``/v1/recs/item/{id}/related?strategy=content``), so an item with no
events, which collaborative models cannot place, still gets neighbours sharing its words.
"""

import posixpath

import dagster as dg

from pipelines.resources import StorageResource
from recsys import content
from recsys.tenancy import is_valid_tenant


class ContentConfig(dg.Config):
    """Which tenants (default: every tenant with an items table) and the vector size."""

    tenants: list[str] = []
    dim: int = 64
    seed: int = 0


def content_dir(store, tenant: str) -> str:
    return store.path("warehouse", tenant, "content")


@dg.asset(
    group_name="training",
    deps=["items"],
    kinds={"scikitlearn", "numpy"},
    description="TF-IDF (words, bigrams, character n-grams) + SVD item embeddings per tenant: "
    "text search, content neighbours and cold items (warehouse/<tenant>/content/).",
)
def content_embeddings(
    context: dg.AssetExecutionContext, config: ContentConfig, storage: StorageResource
) -> dg.MaterializeResult:
    store = storage.storage()
    root = store.path("warehouse")
    wanted = list(config.tenants)
    if not wanted and store.exists(root):
        wanted = sorted(
            t
            for t in (posixpath.basename(p.rstrip("/")) for p in store.fs.ls(root, detail=False))
            if is_valid_tenant(t) and store.exists(store.table_path(t, "items"))
        )
    meta: dict[str, object] = {}
    import polars as pl

    for tenant in wanted:
        path = store.table_path(tenant, "items")
        if not store.exists(path):
            context.log.info(f"{tenant}: no items table, no content model")
            continue
        with store.fs.open(path, "rb") as f:
            items = pl.read_parquet(f)
        if items.height < 2:
            context.log.info(f"{tenant}: fewer than 2 items, no content model")
            continue
        model = content.fit(items, dim=config.dim, seed=config.seed)
        model.save(content_dir(store, tenant), None if store.is_local else store.fs)
        meta[f"{tenant}/items"] = items.height
        meta[f"{tenant}/dim"] = model.dim
        meta[f"{tenant}/features"] = int(model.components.shape[1])
        context.log.info(f"{tenant}: {items.height} items embedded in {model.dim} dimensions")
    return dg.MaterializeResult(metadata=meta)

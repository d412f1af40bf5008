"""Settings of the publish assets, shown in the launchpad and echoed into asset metadata."""

import dagster as dg


class PublishConfig(dg.Config):
    tenants: list[str] = []  # empty = every tenant with validated events
    n_per_user: int = 200  # candidates kept per user: enough for filters to leave a full page
    n_similar: int = 20  # neighbours per item, per kind
    n_fallback: int = 200  # items per fallback list
    keep: int = 5  # published snapshots kept per tenant (plus the current one)
    diff_k: int = 10  # top-k compared with the previous snapshot (0 = skip the diff)
    # a registered version of recsys-<tenant> to publish ("" = the champion the gate admitted);
    # its artifacts are downloaded from MLflow (the API's deploy rebuilds a version this way)
    model_version: str = ""
    mlflow_uri: str = ""  # where that version is registered ("" = the data root's store)
    make_live: bool = True  # False: publish without replacing CURRENT (deploy makes it live)

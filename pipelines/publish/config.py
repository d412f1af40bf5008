"""Settings of the publish assets, shown in the launchpad and echoed into asset metadata."""

import dagster as dg


class PublishConfig(dg.Config):
    tenants: list[str] = []  # empty = every tenant with validated events
    n_per_user: int = 200  # candidates kept per user: enough for filters to leave a full page
    n_similar: int = 20  # neighbours per item, per kind
    n_fallback: int = 200  # items per fallback list
    keep: int = 5  # published snapshots kept per tenant (plus the current one)
    diff_k: int = 10  # top-k compared with the previous snapshot (0 = skip the diff)

"""Run configuration of the training assets: one dg.Config per model, echoed into metadata."""

import dagster as dg


class TenantsConfig(dg.Config):
    """Which tenants to train (default: every tenant with validated events)."""

    tenants: list[str] = []


class InteractionsConfig(TenantsConfig):
    """How events become one confidence per (user, item); weights override the contract's."""

    event_weights: dict[str, float] = {}
    half_life_days: float | None = None


class SplitConfig(TenantsConfig):
    """The global temporal split: the newest test_fraction of events is the test period; the
    newest validation_fraction of the rest is the ranker's label window."""

    test_fraction: float = 0.2
    validation_fraction: float = 0.15
    min_events: int = 50  # fewer: personalised models are skipped, popularity still serves


class PopularityConfig(TenantsConfig):
    """Popularity has no hyperparameters beyond the interaction weights."""


class CooccurrenceConfig(TenantsConfig):
    shrink: float = 10.0
    buy_weight: float = 1.0
    neighbors: int = 200


class LightFMConfig(TenantsConfig):
    no_components: int = 32
    epochs: int = 30
    learning_rate: float = 0.05
    item_alpha: float = 0.0
    max_sampled: int = 10
    use_item_features: bool = True
    seed: int = 42
    num_threads: int = 1  # >1 is faster but not reproducible (Hogwild)


class EASEConfig(TenantsConfig):
    l2: float = 250.0
    max_items: int = 3000


class RankerConfig(TenantsConfig):
    candidates_per_generator: int = 100
    max_iter: int = 150
    learning_rate: float = 0.05
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 50
    l2_regularization: float = 1.0
    min_ranker_positives: int = 20
    seed: int = 42

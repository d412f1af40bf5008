"""Run configuration of the training assets: one dg.Config per model, echoed into metadata.

The generators and the ranker are fitted by one step (see ``pipelines/training/assets.py``),
so their configs are nested in :class:`TrainingConfig`; in the launchpad::

    ops:
      train_models:
        config:
          lightfm: {no_components: 32, epochs: 30}
          ranker: {max_iter: 150}
"""

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
    #: equal to test_fraction by default: the published model's label window (the newest
    #: test_fraction of all events) is then cut like the evaluated one's, and its ranker
    #: learns from the generators already fitted on train (no fourth generator set)
    validation_fraction: float = 0.2
    min_events: int = 50  # fewer: personalised models are skipped, popularity still serves


class CooccurrenceConfig(dg.Config):
    shrink: float = 10.0
    buy_weight: float = 1.0
    neighbors: int = 200
    max_user_items: int = 1000  # longer histories keep their strongest items (crawlers)


class LightFMConfig(dg.Config):
    no_components: int = 32
    epochs: int = 30  # the maximum; the count is chosen on the validation window
    learning_rate: float = 0.05
    item_alpha: float = 0.0
    max_sampled: int = 10
    use_item_features: bool = True
    seed: int = 42
    num_threads: int = 1  # >1 is faster but not reproducible (Hogwild)
    max_updates: int = 3_000_000  # epochs x interactions cap per fit (0 = none)
    early_stopping: bool = True
    eval_every: int = 5
    patience: int = 2


class EASEConfig(dg.Config):
    l2: float = 250.0
    max_items: int = 3000  # the most popular items are modelled (time ~ max_items^3)


class RecentConfig(dg.Config):
    """Item-to-item candidates from the user's last interactions (recsys.models.recent)."""

    n_recent: int = 10  # the user's newest items that count
    half_life: float = 3.0  # a weight halves every half_life items back
    shrink: float = 5.0
    neighbors: int = 100


class TuneConfig(dg.Config):
    """Values tried on the validation window (never the test window); best NDCG@10 wins."""

    ease_l2: list[float] = [100.0, 250.0, 500.0]
    cooccurrence_shrink: list[float] = [5.0, 20.0, 50.0]
    #: validation users the grids are scored on (a seeded sample when there are more; 0 = all)
    max_users: int = 2000


class SelectionConfig(dg.Config):
    """What serves: the ranked list, or one generator's list when it beats the ranked list
    beyond its interval on the validation window (recsys.models.hybrid.choose_served)."""

    #: "" = choose on validation; "hybrid" or a generator name forces it
    served: str = ""
    #: all generators when empty; popularity is always fitted
    generators: list[str] = []
    min_selection_users: int = 20
    #: LightFM stays only if the ranked list with it beats the one without it on validation
    #: (recsys.models.hybrid.weigh_lightfm); False: fitted whenever it is in `generators`
    weigh_lightfm: bool = True


class RankerConfig(dg.Config):
    candidates_per_generator: int = 100
    max_iter: int = 150
    learning_rate: float = 0.05
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 50
    l2_regularization: float = 1.0
    early_stopping: bool = True
    n_iter_no_change: int = 10
    max_users: int = 3000  # label-window users sampled (seeded) for training
    max_rows: int = 200_000
    min_ranker_positives: int = 20
    seed: int = 42


class TrainingConfig(TenantsConfig):
    """Hyperparameters of every generator and of the ranker (one step fits them all)."""

    cooccurrence: CooccurrenceConfig = CooccurrenceConfig()
    lightfm: LightFMConfig = LightFMConfig()
    ease: EASEConfig = EASEConfig()
    recent: RecentConfig = RecentConfig()
    ranker: RankerConfig = RankerConfig()
    tune: TuneConfig = TuneConfig()
    selection: SelectionConfig = SelectionConfig()
    #: a tenant with at most this many events has its refits fitted beside the fit window's
    #: work (both cores busy, the generator sets of three windows held at once); above it,
    #: one after the other: the same models, a lower peak, a longer step (0: always so)
    refits_beside_max_events: int = 20_000_000

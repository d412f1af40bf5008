"""Run configuration of the evaluation and champion-gate assets."""

import dagster as dg


class EvaluationConfig(dg.Config):
    tenants: list[str] = []
    bootstrap_resamples: int = 1000
    seed: int = 0


class ChampionConfig(dg.Config):
    tenants: list[str] = []
    #: a new version becomes champion unless its served NDCG@10 is lower than the current
    #: champion's by more than this
    tolerance: float = 0.005

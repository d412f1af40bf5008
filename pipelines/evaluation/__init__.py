"""Evaluation: the offline table of every model and the champion gate (MLflow registry)."""

from pipelines.evaluation import assets as _assets
from pipelines.evaluation import checks as _checks

assets = [_assets.model_evaluation, _assets.champion_model]
asset_checks = [_checks.champion_not_regressed]

"""Training: interactions -> temporal split -> candidate generators -> ranker."""

from pipelines.training import assets as _assets
from pipelines.training import checks as _checks

assets = [
    _assets.interactions,
    _assets.data_split,
    _assets.popularity_model,
    _assets.cooccurrence_model,
    _assets.lightfm_model,
    _assets.ease_model,
    _assets.ranker_model,
]
asset_checks = [_checks.split_is_temporal, _checks.hybrid_model_saved]

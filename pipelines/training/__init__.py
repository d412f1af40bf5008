"""Training: interactions -> temporal split -> candidate generators + ranker (one step)."""

from pipelines.training import assets as _assets
from pipelines.training import checks as _checks
from pipelines.training import content as _content
from pipelines.training import features as _features

assets = [
    _assets.interactions,
    _assets.data_split,
    _assets.train_models,
    _content.content_embeddings,
    _features.feature_aggregates,
    _features.connector_features,
]
asset_checks = [_checks.split_is_temporal, _checks.hybrid_model_saved]

"""Publish: per-user top-N (sharded), item similarities, fallbacks -> the serving snapshot."""

from pipelines.publish import assets as _assets
from pipelines.publish import checks as _checks
from pipelines.publish.partitions import user_shards

assets = [
    _assets.user_recommendations,
    _assets.item_similarities,
    _assets.fallback_lists,
    _assets.serving_snapshot,
]
asset_checks = [_checks.snapshot_live_and_verified, _checks.snapshot_user_coverage]

__all__ = ["asset_checks", "assets", "user_shards"]

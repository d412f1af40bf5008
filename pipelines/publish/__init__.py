"""Publish: per-user top-N (sharded), item similarities, fallbacks -> the serving snapshot."""

from pipelines.publish import checks as _checks
from pipelines.publish.assets import build_assets
from pipelines.publish.partitions import DEFAULT_USER_SHARDS, user_shard_count

#: the publish assets with the default shard count (`pipelines.definitions` builds them with
#: the code location's setting, RECSYS_USER_SHARDS)
assets = build_assets(DEFAULT_USER_SHARDS)
asset_checks = [_checks.snapshot_live_and_verified, _checks.snapshot_user_coverage]

__all__ = ["asset_checks", "assets", "build_assets", "user_shard_count"]

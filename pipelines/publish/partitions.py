"""Static user shards for the per-user precompute: each shard is a contiguous range of a
tenant's users (`recsys.snapshot.build.shard_bounds`), so any shard can be re-run alone and a
backfill can run them in parallel."""

import dagster as dg

N_USER_SHARDS = 16

user_shards = dg.StaticPartitionsDefinition([f"shard-{i:02d}" for i in range(N_USER_SHARDS)])


def shard_number(partition_key: str) -> int:
    """'shard-03' -> 3."""
    return int(partition_key.rsplit("-", 1)[1])

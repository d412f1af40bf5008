"""Static user shards for the per-user precompute: each shard is a contiguous range of a
tenant's users (`recsys.snapshot.build.shard_bounds`), so any shard can be re-run alone and a
backfill can run them in parallel.

How many shards is a setting of the code location (``RECSYS_USER_SHARDS``, read by
`pipelines.definitions` like the data root; default 16): a few for a small tenant, thousands
when 100M users are spread over many workers. The snapshot does not depend on it (tested on 4
and 16): shards are contiguous user ranges assembled in order.
"""

import dagster as dg

from recsys.snapshot.build import shard_key

DEFAULT_USER_SHARDS = 16
#: a job tag: "one_step" scores all of a tenant's shards in one step (the in-process jobs,
#: whose steps run one after another anyway: a step per shard only added Dagster's per-step
#: work, ~0.5 s each). Without it (Celery, multiprocess backfills) each shard is its own step.
SHARD_STEPS_TAG = "recsys/user_shard_steps"
#: a partition key per shard: Dagster's UI and the run queue stay usable up to this many
MAX_USER_SHARDS = 10_000


def user_shard_count(value: str | None) -> int:
    """The shard count from a setting's text (None or empty: the default); ValueError naming
    the setting when it is not an integer in [1, MAX_USER_SHARDS]."""
    if value is None or not value.strip():
        return DEFAULT_USER_SHARDS
    try:
        n = int(value)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_USER_SHARDS:
        raise ValueError(
            f"RECSYS_USER_SHARDS={value!r}: expected an integer from 1 to {MAX_USER_SHARDS}"
        )
    return n


def user_shards_partitions(n_shards: int = DEFAULT_USER_SHARDS) -> dg.StaticPartitionsDefinition:
    return dg.StaticPartitionsDefinition([shard_key(i, n_shards) for i in range(n_shards)])


def shard_number(partition_key: str) -> int:
    """'shard-03' -> 3."""
    return int(partition_key.rsplit("-", 1)[1])

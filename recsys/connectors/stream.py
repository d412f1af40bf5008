"""The stream connector: a NATS JetStream stream read by a durable pull consumer.

Exactly once into landing, across crashes: each batch of messages (in stream order) lands as
``landing/<tenant>/<kind>/nats-<stream>-<first seq>.parquet`` (plus ``.rejected.parquet`` for
messages that are not JSON objects; items and users as one file a field set,
`recsys.connectors.land_messages`), written whole and fsync'd; then the connector's state
(``landed_seq``, the last stream sequence landed) is written atomically; only then are the
messages acked. A consumer killed at any point restarts from its state: messages at or below
``landed_seq`` that come again are acked and skipped; a batch that had landed without its state
is landed again under the same name (its first sequence), replacing the earlier attempt. On
start the durable consumer is reused when its ack floor is the state's sequence and nothing is
pending; otherwise (a crash left deliveries pending) it is recreated to start right after
``landed_seq``, so delivery stays in stream order.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

from recsys.connectors import ConnectorError, Log, RunSummary, land_messages, load_state, save_state


def consumer_name(tenant: str, connector_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"recsys-{tenant}-{connector_id}")


def run_nats(
    data_root: str,
    tenant: str,
    connector_id: str,
    target: str,
    cfg: dict[str, Any],
    log: Log,
    idle_s: float = 2.0,
    max_messages: int | None = None,
    connect_timeout_s: float = 3.0,
) -> RunSummary:
    """Consume until the stream has nothing new for `idle_s` (or `max_messages` landed)."""
    return asyncio.run(
        _consume(
            data_root, tenant, connector_id, target, cfg, log, idle_s, max_messages,
            connect_timeout_s,
        )
    )  # fmt: skip


async def _consume(
    data_root: str,
    tenant: str,
    connector_id: str,
    target: str,
    cfg: dict[str, Any],
    log: Log,
    idle_s: float,
    max_messages: int | None,
    connect_timeout_s: float,
) -> RunSummary:
    import nats
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    servers = [s.strip() for s in cfg["servers"].split(",")]
    stream, subject, batch = cfg["stream"], cfg["subject"], int(cfg.get("batch", 1000))
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:  # (nats-py prints a traceback by default)
        errors.append(f"{type(exc).__name__}: {exc}")

    try:
        # (allow_reconnect=False makes nats-py retry a refused first connect forever)
        nc = await asyncio.wait_for(
            nats.connect(
                servers,
                connect_timeout=connect_timeout_s,
                max_reconnect_attempts=1,
                reconnect_time_wait=0.2,
                error_cb=on_error,
            ),
            timeout=3 * connect_timeout_s + 1,
        )
    except Exception as exc:
        why = errors[-1] if errors else f"{type(exc).__name__}: {exc}"
        raise ConnectorError(f"NATS at {cfg['servers']} is unreachable: {why}") from exc
    summary = RunSummary()
    started = time.perf_counter()
    try:
        js = nc.jetstream()
        try:
            await js.stream_info(stream)
        except NotFoundError:
            raise ConnectorError(f"NATS has no JetStream stream {stream!r}") from None
        durable = consumer_name(tenant, connector_id)
        state = load_state(data_root, tenant, connector_id)
        landed = int(state.get("landed_seq", 0))
        try:
            info = await js.consumer_info(stream, durable)
        except NotFoundError:
            info = None
        if info is not None and (
            info.ack_floor.stream_seq != landed or info.num_ack_pending or info.num_redelivered
        ):
            log(
                f"consumer {durable}: ack floor {info.ack_floor.stream_seq}, "
                f"{info.num_ack_pending} pending; recreated to start after {landed}"
            )
            await js.delete_consumer(stream, durable)
            info = None
        if info is None:
            await js.add_consumer(
                stream,
                ConsumerConfig(
                    durable_name=durable,
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                    opt_start_seq=landed + 1,
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=120.0,
                    max_ack_pending=max(4 * batch, 10_000),
                    filter_subject=subject,
                ),
            )
        psub = await js.pull_subscribe_bind(durable=durable, stream=stream)
        log(f"consuming {stream} ({subject}) after sequence {landed}, batches of {batch}")
        while max_messages is None or summary.rows + summary.rejects < max_messages:
            try:
                msgs = await psub.fetch(batch, timeout=idle_s)
            except TimeoutError:  # nats.errors.TimeoutError, or (nats-py 2.16) asyncio's own
                break
            fresh = [m for m in msgs if m.metadata.sequence.stream > landed]
            summary.skipped += len(msgs) - len(fresh)
            if fresh:
                seqs = [m.metadata.sequence.stream for m in fresh]
                written, rows, rejects = land_messages(
                    data_root, tenant, target, f"nats-{stream}-{seqs[0]:012d}",
                    [m.data for m in fresh], seqs, f"nats:{stream}", cfg.get("map"),
                )  # fmt: skip
                summary.landed_files += written
                landed = max(landed, seqs[-1])
                save_state(data_root, tenant, connector_id, {**state, "landed_seq": landed})
                summary.rows += rows
                summary.rejects += rejects
            for m in msgs:  # only now: what they carried is on disk
                await m.ack()
            await nc.flush()
        took = time.perf_counter() - started
        summary.detail = {
            "landed_seq": landed,
            "seconds": round(took, 3),
            "messages_per_s": round((summary.rows + summary.rejects) / max(took, 1e-9)),
        }
        return summary
    finally:
        await nc.close()


# --- Redis Streams -------------------------------------------------------------------------------
def _redis_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _redis_message(fields: dict[bytes, bytes], field: str) -> bytes:
    """An entry's message: the JSON in its `field`, else its fields as one JSON object."""
    raw = fields.get(field.encode())
    if raw is not None:
        return raw
    import orjson

    return orjson.dumps({k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                         for k, v in fields.items()})  # fmt: skip


def run_redis(
    data_root: str,
    tenant: str,
    connector_id: str,
    target: str,
    cfg: dict[str, Any],
    log: Log,
    idle_s: float = 2.0,
    max_messages: int | None = None,
    connect_timeout_s: float = 3.0,
) -> RunSummary:
    """A Redis stream read by the consumer group `group` as consumer ``recsys-<tenant>-<id>``,
    with the same order as NATS: land (fsync), state (``landed_id``), then XACK. On start the
    consumer's own pending entries (delivered before a crash, never acked) are read first, in
    id order: those at or below ``landed_id`` are acked and skipped, the rest land."""
    import redis

    stream, group = cfg["stream"], cfg.get("group", "recsys")
    batch, field = int(cfg.get("batch", 1000)), cfg.get("field", "data")
    client = redis.Redis.from_url(
        cfg["url"], socket_connect_timeout=connect_timeout_s, socket_timeout=idle_s + 10
    )
    try:
        client.ping()
    except redis.RedisError as exc:
        raise ConnectorError(
            f"Redis at {cfg['url']} is unreachable: {type(exc).__name__}: {exc}"
        ) from exc
    if not client.exists(stream):
        raise ConnectorError(f"Redis has no stream {stream!r}")
    try:
        client.xgroup_create(stream, group, id="0")
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise ConnectorError(f"cannot create consumer group {group!r}: {exc}") from exc
    consumer = consumer_name(tenant, connector_id)
    state = load_state(data_root, tenant, connector_id)
    landed = str(state.get("landed_id", "0-0"))
    summary = RunSummary()
    started = time.perf_counter()
    log(f"consuming Redis stream {stream} (group {group}) after {landed}, batches of {batch}")
    backlog = True  # first this consumer's own pending entries, then new ones
    while max_messages is None or summary.rows + summary.rejects < max_messages:
        answer = client.xreadgroup(
            group,
            consumer,
            {stream: "0" if backlog else ">"},
            count=batch,
            block=None if backlog else int(idle_s * 1000),
        )
        entries = answer[0][1] if answer else []
        if not entries:
            if backlog:
                backlog = False
                continue
            break
        ids = [entry_id for entry_id, _ in entries]
        fresh = [(i, f) for i, f in entries if _redis_id(i) > _redis_id(landed)]
        summary.skipped += len(entries) - len(fresh)
        if fresh:
            numbers = list(range(summary.rows + summary.rejects + 1,
                                 summary.rows + summary.rejects + 1 + len(fresh)))  # fmt: skip
            first = fresh[0][0].decode() if isinstance(fresh[0][0], bytes) else fresh[0][0]
            written, rows, rejects = land_messages(
                data_root, tenant, target, f"redis-{stream}-{first}",
                [_redis_message(f, field) for _, f in fresh], numbers, f"redis:{stream}",
                cfg.get("map"),
            )  # fmt: skip
            summary.landed_files += written
            last = fresh[-1][0]
            landed = last.decode() if isinstance(last, bytes) else last
            save_state(data_root, tenant, connector_id, {**state, "landed_id": landed})
            summary.rows += rows
            summary.rejects += rejects
        client.xack(stream, group, *ids)  # only now: what they carried is on disk
    took = time.perf_counter() - started
    summary.detail = {
        "landed_id": landed,
        "seconds": round(took, 3),
        "messages_per_s": round((summary.rows + summary.rejects) / max(took, 1e-9)),
    }
    client.close()
    return summary

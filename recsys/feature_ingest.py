"""Feature ingestion from a connector (``POST /v1/recs/features/ingest`` with source
``connector``): a declared feature's values read from a configured connector's source, checked
row by row, and landed in the feature store's landing zone like an import.

A declaration names the feature (`name`), its entity (`user` | `item`), its type and a
connector document (`recsys.connectors`, type ``files`` or ``http``). Its source rows carry,
after the connector's ``map``:

* the entity id: ``entity_id``, or ``user_id`` / ``item_id``;
* the value: a column named like the feature, else ``value`` (text is read as JSON for the
  non-string types: ``4.5``, ``true``, ``["a","b"]``);
* optionally ``event_timestamp`` (ISO-8601 with an offset): when the value holds; the run's
  time when absent.

Each batch (a new or changed file, a changed HTTP answer) is read with the project's readers
(`recsys.readers`: rows plus the lines that could not be parsed), each row is checked
(`recsys.features.check_value`), and the batch lands as
``landing/<tenant>/features/connector-<name>-<hash of the rows>.parquet`` in the feature log's
schema (`recsys.features.LOG_SCHEMA`: a batch landed twice lands once) with its rejects beside
it (``.rejected.parquet``, `recsys.contract.REJECTED_SCHEMA`: ``missing_id``,
``missing_value``, ``wrong_type``, ``bad_timestamp`` or the reader's reason); a bad row never
stops the good ones. Then the serving table of the feature,
``warehouse/<tenant>/features/<name>.parquet`` (entity_id, value, event_timestamp), is rebuilt
from the whole log (`as_of` now: the newest value of each entity, upserts included), which the
entity view reads. What was read is remembered per declaration
(``serving/connector-state/<tenant>/<connector>/features-<name>.json``), apart from the
connector's own runs.

Stream connectors (NATS, Redis) are drained by their own runs into their target's landing folder
(an acknowledged message is gone), so they cannot feed a second reader: a declaration naming
one is refused by the API.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import posixpath
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import polars as pl

from recsys.contract import REJECTED_SCHEMA, REJECTED_SUFFIX
from recsys.durable import write_atomic, write_parquet_atomic
from recsys.features import (
    LOG_SCHEMA,
    as_of,
    check_value,
    features_landing,
    iso,
    parse_time,
    read_log,
)
from recsys.storage import Storage

#: Connector types a feature ingestion reads (see the module docstring).
READABLE_TYPES = ("files", "http")
#: The serving table's value column per feature type.
VALUE_DTYPES = {
    "number": pl.Float64,
    "integer": pl.Int64,
    "boolean": pl.Boolean,
    "string": pl.String,
    "timestamp": pl.String,
    "string_list": pl.List(pl.String),
}


def _state_path(data_root: str, tenant: str, connector: str, name: str) -> str:
    from recsys.connectors import state_dir

    return os.path.join(state_dir(data_root, tenant, connector), f"features-{name}.json")


def _batches(spec: dict[str, Any], state: dict[str, Any], log: Callable[[str], None]):
    """(batch key, signature, rows, reader rejects) of what is new at the source; the
    signatures of batches already read are in `state`."""
    from recsys.adapters import apply_mapping, read_source
    from recsys.errors import RecsysError
    from recsys.readers import read_messages

    cfg = spec["config"]
    mapping = cfg.get("map") or None
    if spec["type"] == "files":
        from recsys.connectors.files import list_files

        for url, sig in list_files(cfg["url"], cfg.get("pattern", "*")).items():
            if state.get(url) == sig:
                continue
            try:
                rows, rejects = read_source(
                    url, "items", adapter="generic", fmt=cfg.get("format"), mapping=mapping
                )
            except RecsysError as exc:  # (an empty or unreadable file: logged, the others go on)
                log(f"{url}: not read: {exc}")
                state[url] = sig
                continue
            yield url, sig, rows, rejects
    elif spec["type"] == "http":
        from recsys.connectors.http import fetch_records

        body, records = fetch_records(cfg)
        digest = hashlib.sha256(body).hexdigest()[:16]
        if state.get(cfg["url"]) != digest:
            rows, rejects = read_messages([orjson.dumps(r) for r in records], source=cfg["url"])
            if mapping:
                rows = apply_mapping(rows, {k: v for k, v in mapping.items() if k in rows.columns})
            yield cfg["url"], digest, rows, rejects
    else:
        raise ValueError(f"a feature ingestion reads {' or '.join(READABLE_TYPES)} connectors")


def parse_value(kind: str, value: Any) -> tuple[Any, str | None]:
    """(the value as stored, None) of a source cell, else (None, why): text is read as JSON
    for every type but string and timestamp."""
    if isinstance(value, str) and kind not in ("string", "timestamp"):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return None, f"expected a {kind}, got the text {value[:40]!r}"
    return check_value(kind, value)


def check_rows(
    rows: pl.DataFrame,
    source: str,
    entity: str,
    name: str,
    kind: str,
    now: dt.datetime,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(feature-log rows, rejects) of a batch of source rows (see the module docstring)."""
    id_col = next((c for c in ("entity_id", f"{entity}_id") if c in rows.columns), None)
    value_col = next((c for c in (name, "value") if c in rows.columns), None)
    has_time = "event_timestamp" in rows.columns
    good: dict[str, list] = {c: [] for c in LOG_SCHEMA}
    bad: list[dict[str, Any]] = []
    for row in rows.iter_rows(named=True):
        n = row.get("_row")

        def reject(reason: str, detail: str, row=row, n=n) -> None:
            raw = {k: v for k, v in row.items() if k != "_row"}
            bad.append(
                {
                    "source_file": source,
                    "row_number": n,
                    "reason": reason,
                    "detail": detail,
                    "raw": orjson.dumps(raw, default=str).decode(),
                }
            )

        entity_id = row.get(id_col) if id_col else None
        if entity_id is None or str(entity_id).strip() == "":
            reject("missing_id", f"no {entity}_id (or entity_id)")
            continue
        value = row.get(value_col) if value_col else None
        if value is None or value == "":
            reject("missing_value", f"no value: a column '{name}' or 'value'")
            continue
        stored, why = parse_value(kind, value)
        if why is not None:
            reject("wrong_type", f"{name}: {why}")
            continue
        when = now
        if has_time and row["event_timestamp"] not in (None, ""):
            stamp = row["event_timestamp"]
            when = stamp if isinstance(stamp, dt.datetime) else parse_time(stamp)
            if when is None or when.tzinfo is None:
                reject("bad_timestamp", "event_timestamp is ISO-8601 with an offset")
                continue
        good["entity_type"].append(entity)
        good["entity_id"].append(str(entity_id))
        good["feature"].append(name)
        good["value"].append(orjson.dumps(stored).decode())
        good["event_timestamp"].append(when)
        good["created_timestamp"].append(now)
    return pl.DataFrame(good, schema=LOG_SCHEMA), pl.DataFrame(bad, schema=REJECTED_SCHEMA)


def serving_table(log: pl.DataFrame, entity: str, name: str, kind: str) -> pl.DataFrame:
    """(entity_id, value, event_timestamp): each entity's newest value of the feature."""
    mine = log.filter((pl.col("entity_type") == entity) & (pl.col("feature") == name))
    now = dt.datetime.now(dt.UTC) + dt.timedelta(days=365 * 100)  # (every value logged)
    latest = as_of(mine, now)
    values = [orjson.loads(v) for v in latest["value"].to_list()]
    return pl.DataFrame(
        {
            "entity_id": latest["entity_id"],
            "value": pl.Series("value", values, dtype=VALUE_DTYPES[kind]),
            "event_timestamp": latest["event_timestamp"],
        }
    ).filter(pl.col("value").is_not_null())


def ingest_from_connector(
    data_root: str,
    tenant: str,
    declaration: dict[str, Any],
    log: Callable[[str], None] = print,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """One run of a connector feature ingestion (see the module docstring); its summary.
    Raises `recsys.connectors.ConnectorError` when the connector or its source is unusable."""
    from recsys.connectors import ConnectorError, read_connector

    name, entity = declaration["name"], declaration["entity"]
    kind = declaration.get("value_type") or "number"
    if kind not in VALUE_DTYPES:
        raise ConnectorError(f"feature {name}: type {kind!r} cannot be ingested")
    spec = read_connector(data_root, tenant, declaration["connector"])
    if spec["type"] not in READABLE_TYPES:
        raise ConnectorError(
            f"connector {declaration['connector']} is a {spec['type']} stream: its own runs "
            f"drain it; a feature ingestion reads {' or '.join(READABLE_TYPES)} connectors"
        )
    now = now or dt.datetime.now(dt.UTC)
    storage = Storage(data_root)
    state_path = _state_path(data_root, tenant, declaration["connector"], name)
    try:
        with open(state_path, "rb") as f:
            state = orjson.loads(f.read())
    except FileNotFoundError:
        state = {}
    folder = features_landing(storage, tenant)
    storage.makedirs(folder)
    summary: dict[str, Any] = {"batches": 0, "rows": 0, "landed": 0, "rejects": 0}
    reasons: Counter[str] = Counter()
    for key, sig, rows, reader_rejects in _batches(spec, state, log):
        values, rejects = check_rows(rows, key, entity, name, kind, now)
        rejects = pl.concat([reader_rejects.cast(REJECTED_SCHEMA), rejects])
        digest = hashlib.sha256()
        digest.update(values.drop("created_timestamp").hash_rows(seed=0).to_numpy().tobytes())
        digest.update(rejects.hash_rows(seed=0).to_numpy().tobytes())
        base = posixpath.join(folder, f"connector-{name}-{digest.hexdigest()[:16]}")
        if not storage.exists(base + ".parquet") and not storage.exists(base + REJECTED_SUFFIX):
            if rejects.height:  # (rejects first: the values file marks the batch landed)
                write_parquet_atomic(rejects, base + REJECTED_SUFFIX, storage.fs)
            if values.height:
                write_parquet_atomic(values, base + ".parquet", storage.fs)
        state[key] = sig
        summary["batches"] += 1
        summary["rows"] += rows.height + reader_rejects.height
        summary["landed"] += values.height
        summary["rejects"] += rejects.height
        reasons.update(rejects["reason"].to_list())
        log(f"{key}: {values.height} values landed, {rejects.height} rejected {dict(reasons)}")
    os.makedirs(os.path.dirname(state_path), exist_ok=True)
    write_atomic(state_path, orjson.dumps(state))
    table = serving_table(read_log(storage, tenant), entity, name, kind)
    target = posixpath.join(storage.path("warehouse", tenant, "features"), f"{name}.parquet")
    storage.makedirs(posixpath.dirname(target))
    write_parquet_atomic(table, target, storage.fs)
    summary["entities"] = table.height
    summary["rejected_by_reason"] = dict(reasons)
    summary["as_of"] = iso(now)
    return summary

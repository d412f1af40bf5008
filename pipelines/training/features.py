"""Features computed by the pipeline (`POST /v1/recs/features/ingest`): from events (source
`events`: for each user or item, an aggregate of its events of some types over a window), or
read from a connector (source `connector`: `connector_features`, `recsys.feature_ingest`);
and the catalogue as of a training run's cut-off (`catalogue_at_cutoff`).

`feature_aggregates` reads the validated events of one tenant (after `events`: the job ingests
what landed first), computes ``count`` / ``sum`` / ``mean`` of ``value`` / ``distinct`` items
(users) over the last `window_days` before `as_of` (default: now), and writes:

* ``warehouse/<tenant>/features/<name>.parquet`` (entity_id, value, event_timestamp): the
  materialised values the serving side's entity view reads (source `pipeline`);
* the same rows to ``landing/<tenant>/features/`` in the feature log's schema, so a training
  run joins them as of its cut-off (`recsys.features.as_of`).

The serving process launches `INGEST_SELECTION` of `recsys_pipeline` through Dagster's GraphQL
API with one declaration as run config; the nightly `recsys_pipeline` (no config) refreshes
every declared feature.
"""

import datetime as dt
import posixpath
import uuid

import dagster as dg
import orjson
import polars as pl

from pipelines.resources import StorageResource
from recsys import ingest
from recsys.durable import write_parquet_atomic
from recsys.features import LOG_SCHEMA, catalogue_as_of, parse_time, read_log


class FeatureAggregateConfig(dg.Config):
    """One declared feature (what to aggregate, over which events and window); with no
    `name`, every declaration the API stored (``serving/feature_ingestions/<tenant>/``)."""

    tenant: str = ""
    name: str = ""
    entity: str = "user"  # user | item
    aggregation: str = "count"  # count | sum | mean | distinct
    event_types: list[str] = []  # empty: every type
    window_days: int = 30
    as_of: str | None = None  # ISO-8601; default: the run's start


def aggregate(events: pl.DataFrame, config: FeatureAggregateConfig, as_of: dt.datetime):
    """(entity_id, value) of every entity with an event in the window."""
    key = "user_id" if config.entity == "user" else "item_id"
    other = "item_id" if key == "user_id" else "user_id"
    start = as_of - dt.timedelta(days=config.window_days)
    lf = events.lazy().filter((pl.col("timestamp") > start) & (pl.col("timestamp") <= as_of))
    if config.event_types:
        lf = lf.filter(pl.col("event_type").is_in(config.event_types))
    value = {
        "count": pl.len().cast(pl.Float64),
        "sum": pl.col("value").fill_null(1.0).sum(),
        "mean": pl.col("value").mean(),
        "distinct": pl.col(other).n_unique().cast(pl.Float64),
    }[config.aggregation]
    return (
        lf.group_by(key)
        .agg(value.alias("value"))
        .rename({key: "entity_id"})
        .sort("entity_id")
        .collect()
    )


@dg.asset(
    group_name="training",
    deps=["events"],
    kinds={"polars"},
    description="A feature the tenant declared from events (count/sum/mean/distinct over a "
    "window), materialised for serving (warehouse/<tenant>/features/<name>.parquet) and "
    "logged with its event time for point-in-time training joins.",
)
def feature_aggregates(
    context: dg.AssetExecutionContext, config: FeatureAggregateConfig, storage: StorageResource
) -> dg.MaterializeResult:
    store = storage.storage()
    as_of = parse_time(config.as_of) if config.as_of else dt.datetime.now(dt.UTC)
    if as_of is None:
        raise dg.Failure(f"as_of is not an ISO-8601 time with an offset: {config.as_of!r}")
    wanted = [config] if config.name else declared(store)
    meta: dict[str, object] = {"as_of": as_of.isoformat()}
    for one in wanted:
        if one.aggregation not in ("count", "sum", "mean", "distinct"):
            raise dg.Failure(f"unknown aggregation {one.aggregation!r}")
        n = materialise(store, one, as_of)
        meta[f"{one.tenant}/{one.name}"] = n
        context.log.info(f"{one.tenant}/{one.name}: {n} {one.entity}s")
    return dg.MaterializeResult(metadata=meta)


def declared(store) -> list[FeatureAggregateConfig]:
    """Every feature ingestion from events the API stored (its versioned documents)."""
    root = store.path("serving", "feature_ingestions")
    out = []
    if not store.exists(root):
        return out
    for path in sorted(store.fs.glob(posixpath.join(root, "*", "*.json"))):
        with store.fs.open(path, "rb") as f:
            doc = orjson.loads(f.read())
        body = doc.get("body") or {}
        if body.get("source") != "events":
            continue
        tenant = posixpath.basename(posixpath.dirname(path))
        fields = {k: body[k] for k in ("entity", "aggregation", "event_types", "window_days")}
        out.append(FeatureAggregateConfig(tenant=tenant, name=body["name"], **fields))
    return out


def materialise(store, config: FeatureAggregateConfig, as_of: dt.datetime) -> int:
    """Compute one feature and write its serving table and feature-log rows; entities."""
    events = ingest.read_events(store, config.tenant)
    table = aggregate(events, config, as_of).with_columns(
        pl.lit(as_of, dtype=pl.Datetime("us", "UTC")).alias("event_timestamp")
    )
    folder = store.path("warehouse", config.tenant, "features")
    store.makedirs(folder)
    write_parquet_atomic(table, posixpath.join(folder, f"{config.name}.parquet"), store.fs)
    now = dt.datetime.now(dt.UTC)
    log = pl.DataFrame(
        {
            "entity_type": [config.entity] * table.height,
            "entity_id": table["entity_id"].to_list(),
            "feature": [config.name] * table.height,
            "value": [orjson.dumps(v).decode() for v in table["value"].to_list()],
            "event_timestamp": [as_of] * table.height,
            "created_timestamp": [now] * table.height,
        },
        schema=LOG_SCHEMA,
    )
    landing = store.path("landing", config.tenant, "features")
    store.makedirs(landing)
    stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
    name = f"pipeline-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
    write_parquet_atomic(log, posixpath.join(landing, name), store.fs)
    return table.height


class ConnectorFeatureConfig(dg.Config):
    """One feature declared from a connector (`recsys.feature_ingest`); with no `name`, every
    connector declaration the API stored."""

    tenant: str = ""
    name: str = ""
    entity: str = "item"  # user | item
    connector: str = ""
    value_type: str = "number"


@dg.asset(
    group_name="training",
    kinds={"polars"},
    description="Features declared from a connector (files, http): the source's new rows "
    "checked and landed in landing/<tenant>/features/ with per-row rejects, and each "
    "feature's serving table (warehouse/<tenant>/features/<name>.parquet) rebuilt.",
)
def connector_features(
    context: dg.AssetExecutionContext, config: ConnectorFeatureConfig, storage: StorageResource
) -> dg.MaterializeResult:
    from recsys.connectors import ConnectorError
    from recsys.feature_ingest import ingest_from_connector

    store = storage.storage()
    if config.name:
        fields = ("name", "entity", "connector", "value_type")
        wanted = [(config.tenant, {f: getattr(config, f) for f in fields})]
    else:
        wanted = declared_from_connectors(store)
    meta: dict[str, object] = {}
    for tenant, declaration in wanted:
        try:
            summary = ingest_from_connector(storage.root, tenant, declaration, context.log.info)
        except ConnectorError as exc:
            raise dg.Failure(f"{tenant}/{declaration['name']}: {exc}") from exc
        meta[f"{tenant}/{declaration['name']}"] = dg.MetadataValue.json(summary)
    return dg.MaterializeResult(metadata=meta or {"declarations": 0})


def declared_from_connectors(store) -> list[tuple[str, dict]]:
    """(tenant, declaration) of every feature ingestion from a connector the API stored."""
    root = store.path("serving", "feature_ingestions")
    out: list[tuple[str, dict]] = []
    if not store.exists(root):
        return out
    for path in sorted(store.fs.glob(posixpath.join(root, "*", "*.json"))):
        with store.fs.open(path, "rb") as f:
            body = orjson.loads(f.read()).get("body") or {}
        if body.get("source") == "connector":
            out.append((posixpath.basename(posixpath.dirname(path)), body))
    return out


#: The assets a feature ingestion runs (launched as a selection of `recsys_pipeline`): ingest
#: what landed, then the feature.
INGEST_SELECTION = ("events", "rejected_events", "feature_aggregates")
#: ... and a feature ingestion from a connector.
CONNECTOR_SELECTION = ("connector_features",)


def catalogue_at_cutoff(store, tenant: str, events: pl.DataFrame, items, users, log=None):
    """(items, users, {kind: `recsys.features.AsOfReport` as a dict}) as they were at the
    training cut-off, the newest event the fit reads: an upsert with a later event time does
    not reach the model (Feast's point-in-time correctness; `recsys.features.catalogue_as_of`).
    """
    cutoff = events["timestamp"].max() if events.height else None
    log = read_log(store, tenant) if log is None else log
    items, item_report = catalogue_as_of(store, tenant, "items", items, cutoff, log)
    users, user_report = catalogue_as_of(store, tenant, "users", users, cutoff, log)
    return items, users, {"items": item_report.as_dict(), "users": user_report.as_dict()}

"""Feature definitions and value checks of the feature store (no Falcon, no Dagster).

A feature is a named, typed value of a `user` or an `item`. The built-in ones are the
catalogue's columns (`recsys.contract`: title, category, brand, price, tags, available,
created_at, attributes; segment, country, attributes): their source is the catalogue (the
snapshot's items/users, overlaid with upserts). A tenant declares more (source `api`: written by
upserts; `pipeline`: computed from events by an ingestion; `connector`: read from a connector
by an ingestion, `recsys.feature_ingest`) with a type, a TTL and a description; with
``allow_free_attributes`` it may also upsert undeclared names (source `free`, type as sent).

Data flow: an upsert's values are checked here (`check_features`: unknown name or wrong type ->
a reason per feature) and stored by the serving side (`serving.crr.entities`); every upsert is
also landed as rows ``(entity_type, entity_id, feature, value (JSON text), event_timestamp)``
for the pipeline, and `as_of` gives each entity's features as they were at a cut-off (the
point-in-time join a training run needs: no value written after the cut-off leaks in).

`catalogue_as_of` is that join for the catalogue itself (the items and users tables a training
run reads): a catalogue column an upsert changed with an event time after the cut-off takes the
value it had at the cut-off instead - the newest logged value not after it, else the value the
catalogue's files (`recsys.ingest.catalogue_files`: those in landing and those ingest moved out)
held just before the first such upsert was written. Catalogue rows without an
event time (imports, CRR record writes) are taken as they are: only upserts carry one.
"""

from __future__ import annotations

import datetime as dt
import math
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

import orjson
import polars as pl

from recsys.contract import PATTERN_END, REJECTED_SUFFIX

ENTITY_TYPES = ("user", "item")
FEATURE_TYPES = ("string", "number", "integer", "boolean", "string_list", "timestamp", "object")
SOURCES = ("catalogue", "api", "pipeline", "connector", "free")
FEATURE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}" + PATTERN_END)
MAX_STRING = 4096
MAX_LIST = 256


@dataclass(frozen=True, slots=True)
class Feature:
    """One feature definition (what GET /v1/recs/features/schema lists)."""

    name: str
    entity: str  # user | item
    type: str  # FEATURE_TYPES
    source: str  # SOURCES
    ttl_s: int | None = None  # a value older than this is stale (None: never)
    description: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "entity": self.entity,
            "type": self.type,
            "source": self.source,
            "ttl_s": self.ttl_s,
            "description": self.description,
        }


#: The catalogue's columns (the contract's items and users tables) as features.
BUILTIN: tuple[Feature, ...] = (
    Feature("title", "item", "string", "catalogue", None, "the item's title"),
    Feature("category", "item", "string", "catalogue", None, "its category"),
    Feature("brand", "item", "string", "catalogue", None, "its brand"),
    Feature("price", "item", "number", "catalogue", None, "its price (>= 0)"),
    Feature("tags", "item", "string_list", "catalogue", None, "tags (brand:x, category:y, ...)"),
    Feature("available", "item", "boolean", "catalogue", None, "whether it can be sold"),
    Feature("created_at", "item", "timestamp", "catalogue", None, "when it joined"),
    Feature("attributes", "item", "object", "catalogue", None, "free JSON attributes"),
    Feature("segment", "user", "string", "catalogue", None, "the user's segment"),
    Feature("country", "user", "string", "catalogue", None, "the user's country"),
    Feature("attributes", "user", "object", "catalogue", None, "free JSON attributes"),
)
#: Built-in names per entity type (they are the contract's columns: stored as record fields).
CATALOGUE_FIELDS = {e: frozenset(f.name for f in BUILTIN if f.entity == e) for e in ENTITY_TYPES}


@dataclass(frozen=True, slots=True)
class FeatureSchema:
    """The built-in features plus a tenant's declared ones."""

    features: tuple[Feature, ...]
    allow_free_attributes: bool = False

    @classmethod
    def of(cls, body: dict[str, Any] | None) -> FeatureSchema:
        """The schema of a tenant's schema document body (`{"allow_free_attributes",
        "features": [{name, entity, type, ttl_s, description, source}]}`)."""
        body = body or {}
        declared = tuple(
            Feature(
                f["name"],
                f["entity"],
                f["type"],
                f.get("source", "api"),
                f.get("ttl_s"),
                f.get("description", ""),
            )
            for f in body.get("features", ())
        )
        return cls(BUILTIN + declared, bool(body.get("allow_free_attributes", False)))

    def get(self, entity: str, name: str) -> Feature | None:
        for f in self.features:
            if f.entity == entity and f.name == name:
                return f
        return None


def declared_errors(body: dict[str, Any]) -> list[str]:
    """What is wrong with a tenant's declared features (empty when none): a built-in name, a
    name declared twice for one entity."""
    errors, seen = [], set()
    for f in body.get("features", ()):
        key = (f["entity"], f["name"])
        if f["name"] in CATALOGUE_FIELDS[f["entity"]]:
            errors.append(f"{f['entity']} feature '{f['name']}' is built in")
        if key in seen:
            errors.append(f"{f['entity']} feature '{f['name']}' is declared twice")
        seen.add(key)
    return errors


def type_of(value: Any) -> str:
    """The feature type a JSON value has (for free attributes)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, list):
        return "string_list"
    if isinstance(value, dict):
        return "object"
    return "string"


def check_value(kind: str, value: Any) -> tuple[Any, str | None]:
    """(the value as stored, None) when `value` is of feature type `kind`, else (None, why).
    None (JSON null) is every type's "no value"."""
    if value is None:
        return None, None
    if kind == "string":
        if not isinstance(value, str):
            return None, f"expected a string, got {type(value).__name__}"
        if len(value) > MAX_STRING:
            return None, f"a string of at most {MAX_STRING} characters"
        return value, None
    if kind in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None, f"expected a {kind}, got {type(value).__name__}"
        if isinstance(value, float) and not math.isfinite(value):
            return None, "expected a finite number"
        if kind == "integer":
            if isinstance(value, float) and not value.is_integer():
                return None, "expected an integer"
            return int(value), None
        return float(value), None
    if kind == "boolean":
        if not isinstance(value, bool):
            return None, f"expected a boolean, got {type(value).__name__}"
        return value, None
    if kind == "string_list":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return None, "expected a list of strings"
        if len(value) > MAX_LIST:
            return None, f"a list of at most {MAX_LIST} strings"
        return value, None
    if kind == "timestamp":
        when = parse_time(value)
        if when is None:
            return None, "expected an ISO-8601 time with an offset"
        return iso(when), None
    if kind == "object":
        if not isinstance(value, dict):
            return None, f"expected an object, got {type(value).__name__}"
        return value, None
    return None, f"unknown feature type {kind!r}"


def check_features(
    schema: FeatureSchema, entity: str, values: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """({name: value as stored}, {name: (reason, detail)}) of an upsert's values: reasons
    ``unknown_feature`` (not declared, free attributes not allowed), ``bad_name``,
    ``wrong_type``."""
    ok: dict[str, Any] = {}
    bad: dict[str, tuple[str, str]] = {}
    for name, value in values.items():
        defn = schema.get(entity, name)
        if defn is None:
            if not FEATURE_NAME.match(name):
                bad[name] = ("bad_name", f"feature names match {FEATURE_NAME.pattern}")
                continue
            if not schema.allow_free_attributes:
                bad[name] = ("unknown_feature", f"no {entity} feature '{name}' is declared")
                continue
            defn = Feature(name, entity, type_of(value), "free")
        stored, why = check_value(defn.type, value)
        if why is not None:
            bad[name] = ("wrong_type", f"{name}: {why}")
        else:
            ok[name] = stored
    return ok, bad


def parse_time(value: Any) -> dt.datetime | None:
    """An aware UTC datetime of ISO-8601 text with an offset (or Z), else None."""
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.astimezone(dt.UTC)


def iso(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


#: The columns of the landed feature rows (the offline store's log).
LOG_SCHEMA = {
    "entity_type": pl.String,
    "entity_id": pl.String,
    "feature": pl.String,
    "value": pl.String,  # JSON text
    "event_timestamp": pl.Datetime("us", "UTC"),
    "created_timestamp": pl.Datetime("us", "UTC"),
}


def as_of(log: pl.DataFrame | pl.LazyFrame, cutoff: dt.datetime) -> pl.DataFrame:
    """Each (entity_type, entity_id, feature)'s value as of `cutoff`: the row with the latest
    event_timestamp not after it (ties: the latest written), as Feast's point-in-time join.
    Values written with a later event time are not seen, however early they were stored."""
    lf = log.lazy() if isinstance(log, pl.DataFrame) else log
    return (
        lf.filter(pl.col("event_timestamp") <= cutoff)
        .sort(["event_timestamp", "created_timestamp"])
        .group_by(["entity_type", "entity_id", "feature"], maintain_order=True)
        .last()
        .sort(["entity_type", "entity_id", "feature"])
        .collect()
    )


def features_landing(storage: Any, tenant: str) -> str:
    """``landing/<tenant>/features/``: every upsert's values with their event times (and the
    rows of feature ingestions)."""
    return storage.path("landing", tenant, "features")


def read_log(storage: Any, tenant: str) -> pl.DataFrame:
    """Every landed feature value of the tenant (`LOG_SCHEMA`); the rejects files beside them
    (``*.rejected.parquet``) are not values."""
    folder = features_landing(storage, tenant)
    if not storage.exists(folder):
        return pl.DataFrame(schema=LOG_SCHEMA)
    files = sorted(
        f
        for f in storage.fs.ls(folder, detail=False)
        if f.endswith(".parquet")
        and not f.endswith(REJECTED_SUFFIX)
        and not posixpath.basename(f).startswith(".")
    )
    if not files:
        return pl.DataFrame(schema=LOG_SCHEMA)
    return pl.concat([pl.read_parquet(storage.fs.open(f, "rb")) for f in files]).cast(LOG_SCHEMA)


def landing_text(value: Any) -> str | None:
    """A field value as the text a landing file holds (what validation parses): scalars as
    text, lists and objects as compact JSON (tags and context stay structured)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    if isinstance(value, dt.datetime):
        return iso(value) if value.tzinfo else value.isoformat()
    return str(value)


@dataclass
class AsOfReport:
    """What `catalogue_as_of` changed in one table."""

    kind: str
    cutoff: str | None
    late_values: int = 0  # (entity, column) pairs upserted for after the cut-off
    from_log: int = 0  # of those, set from a value logged for before the cut-off
    from_landing: int = 0  # set from the landing rows written before the first late upsert
    rows_changed: int = 0
    rows_refused: int = 0  # as-of rows the contract refused (the table's row is kept)
    ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "ids"}
        out["ids"] = self.ids[:20]
        return out


def catalogue_as_of(
    storage: Any,
    tenant: str,
    kind: str,
    table: pl.DataFrame | None,
    cutoff: dt.datetime | None,
    log: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame | None, AsOfReport]:
    """The items or users `table` (validated, as the warehouse holds it now) as it was at
    `cutoff` (see the module docstring), and what changed."""
    import numpy as np

    from recsys.ingest import catalogue_files, files_holding, landing_runs
    from recsys.validation import validate_items, validate_users

    entity = kind[:-1]
    key = f"{entity}_id"
    report = AsOfReport(kind, iso(cutoff) if cutoff is not None else None)
    if table is None or cutoff is None or not table.height:
        return table, report
    log = read_log(storage, tenant) if log is None else log
    columns = sorted(CATALOGUE_FIELDS[entity] & set(table.columns))
    mine = log.filter((pl.col("entity_type") == entity) & pl.col("feature").is_in(columns))
    late = (
        mine.filter(pl.col("event_timestamp") > cutoff)
        .group_by("entity_id", "feature")
        .agg(pl.col("created_timestamp").min().alias("first_late"))
        .filter(pl.col("entity_id").is_in(table[key]))
    )
    if not late.height:
        return table, report
    report.late_values = late.height
    earlier = {
        (r["entity_id"], r["feature"]): r["value"]
        for r in as_of(
            mine.join(late.select("entity_id", "feature"), on=["entity_id", "feature"]), cutoff
        ).iter_rows(named=True)
    }
    ids = set(late["entity_id"].to_list())
    first_late = dict(late.group_by("entity_id").agg(pl.col("first_late").min()).iter_rows())
    # the landing rows of those entities, in the order build_table folds them
    stamped = files_holding(storage, tenant, kind, catalogue_files(storage, tenant, kind), ids)
    current: dict[str, dict[str, Any]] = {}
    before: dict[str, dict[str, Any]] = {}
    time_of = {f: t for t, f in stamped}
    # (a file that cannot be read is left out, as build_table leaves it out: one of its rejects)
    runs = landing_runs(storage, [f for _, f in stamped], lambda path, exc: None)
    for paths, sizes, frame in runs:
        if key not in frame.columns:
            continue
        run_times = [time_of[p] for p in paths]
        mtime = pl.Series("_mtime", np.repeat(run_times, sizes), dtype=pl.Float64)
        frame = frame.with_columns(mtime).filter(pl.col(key).cast(pl.String).is_in(list(ids)))
        for row in frame.iter_rows(named=True):
            rid, mtime = str(row[key]), row.pop("_mtime")
            text = {c: landing_text(v) for c, v in row.items() if c != "_row"}
            current[rid] = {**current.get(rid, {}), **text}
            if mtime < first_late[rid].timestamp():
                before[rid] = {**before.get(rid, {}), **text}
    rows = []
    for rid in sorted(ids):
        if rid not in current:
            continue
        row = dict(current[rid])
        for name in late.filter(pl.col("entity_id") == rid)["feature"].to_list():
            if (rid, name) in earlier:
                row[name] = landing_text(orjson.loads(earlier[(rid, name)]))
                report.from_log += 1
            else:
                row[name] = before.get(rid, {}).get(name)
                report.from_landing += 1
        rows.append(row)
    if not rows:
        return table, report
    names = sorted({c for r in rows for c in r})
    raw = pl.DataFrame(
        {c: [r.get(c) for r in rows] for c in names}, schema={c: pl.String for c in names}
    )
    validate = validate_items if kind == "items" else validate_users
    good, refused = validate(raw, source=f"as_of {report.cutoff}")
    report.rows_refused = refused.height
    good = good.select(table.columns).cast(table.schema)
    report.rows_changed = good.height
    report.ids = good[key].to_list()
    return table.update(good, on=key, how="left", include_nulls=True), report

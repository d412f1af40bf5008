"""Control plane: the feature store - entities' features, their schema, health and ingestion.

Routes (all tenant-scoped; writes need `admin`):

* ``GET /v1/recs/features/entities/{entityType}/{entityId}`` (user | item): the entity's one
  view (`serving.crr.entities.EntityView`: the live snapshot's catalogue row or profile,
  overlaid with its record and every upsert since), with a revision id and, per feature, the
  event time its value holds for and whether it is stale against its TTL;
* ``POST`` to the same path upserts features of one entity; ``POST /v1/recs/features/bulk``
  many (a JSON array or NDJSON, one upsert a line; each line is answered on its own, a bad line
  never refuses the good ones). An upsert is on disk (record, landing row for the pipeline's
  items/users tables, the feature log, the change log) before the answer; items' availability,
  tags, category and brand reach /v1/recommend on every worker within a quarter second
  (`serving.crr.overlay`);
* ``GET /v1/recs/features/schema`` lists the built-in and declared features (name, entity,
  type, source, TTL, description); ``PUT`` replaces the tenant's declarations (a versioned
  document: If-Match). Upserts of an unknown feature or of a wrong type are 422 unless the
  tenant allows free attributes;
* ``GET /v1/recs/features/health``: per declared feature with a TTL, how many values are stale;
  the last upsert, the live snapshot and its age, counts;
* ``POST /v1/recs/features/ingest`` declares a feature computed from events
  (`pipelines/training/features.py`, `feature_aggregates`) or read from a files/http connector
  (`recsys.feature_ingest`, `connector_features`) and launches it as a Dagster run.

Data flow: request -> schema check (`recsys.features`) -> `EntityView.upsert` (record document
under its lock -> landing files -> change log) -> answer; readers rebuild the view from disk.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import falcon
import msgspec
import orjson
from msgspec import Meta

from recsys.contract import PATTERN_END
from recsys.feature_ingest import READABLE_TYPES
from recsys.features import (
    ENTITY_TYPES,
    FEATURE_NAME,
    FEATURE_TYPES,
    FeatureSchema,
    declared_errors,
    iso,
    parse_time,
)
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.control import connectors, dagster, embeddings
from serving.crr.entities import KIND, EntityView
from serving.crr.overlay import ItemOverlays
from serving.crr.records import RecordStore
from serving.crr.schemas import RecordId
from serving.documents import Collection, Preconditions, set_etag
from serving.errors import ProblemError
from serving.routing import JSON, MALFORMED, NDJSON, Route, read_body
from serving.schemas import Body, Reply

EntityType = Literal[ENTITY_TYPES]  # type: ignore[valid-type]
FeatureType = Literal[FEATURE_TYPES]  # type: ignore[valid-type]
FeatureName = Annotated[str, Meta(pattern=FEATURE_NAME.pattern, description="a feature name")]
#: Upserts in one bulk request.
MAX_BULK = 10_000
MAX_FEATURES = 256
EventTime = Annotated[
    str,
    Meta(
        max_length=64,
        description="when the values hold (ISO-8601 with an offset); the receipt time if absent",
    ),
]


# --- bodies and replies ----------------------------------------------------------------------
class FeatureUpsert(Body):
    """Features of one entity: catalogue columns (category, tags, available, ...) or declared
    features; null removes a value."""

    features: Annotated[dict[str, Any], Meta(max_length=MAX_FEATURES)]
    event_timestamp: EventTime | None = None


class FeatureBulkLine(Body):
    entity_type: EntityType  # type: ignore[valid-type]
    entity_id: RecordId
    features: Annotated[dict[str, Any], Meta(max_length=MAX_FEATURES)]
    event_timestamp: EventTime | None = None


#: A bulk body as the schema states it: any lines (each is checked on its own and answered in
#: the results with its reason, never refusing the request), at least one.
BulkLines = Annotated[
    list[
        Annotated[
            Any,
            Meta(
                description="a FeatureBulkLine ({entity_type, entity_id, features, "
                "event_timestamp?}); a line that is not one is rejected in the answer"
            ),
        ]
    ],
    Meta(min_length=1),
]


class FeatureValue(Reply, forbid_unknown_fields=True):
    value: Any
    event_timestamp: str | None
    stale: bool


class FeatureEntity(Reply, forbid_unknown_fields=True):
    """One entity's view: catalogue fields and features, with where it came from."""

    entity_type: str
    entity_id: str
    revision: str
    fields: dict[str, Any]
    features: dict[str, FeatureValue]
    sources: list[str]
    snapshot_id: str | None
    updated_at: str | None


class FeatureLineResult(Reply, forbid_unknown_fields=True):
    line: int
    status: Literal["upserted", "rejected"]
    entity_type: str | None = None
    entity_id: str | None = None
    revision: str | None = None
    reason: str | None = None
    detail: str | None = None


class FeatureBulkReceipt(Reply, forbid_unknown_fields=True):
    upserted: int
    rejected: int
    results: list[FeatureLineResult]


class FeatureDeclaration(Body):
    name: FeatureName
    entity: EntityType  # type: ignore[valid-type]
    type: FeatureType  # type: ignore[valid-type]
    source: Literal["api", "pipeline", "connector"] = "api"
    ttl_s: Annotated[int, Meta(ge=1, le=10 * 365 * 86400)] | None = None
    description: Annotated[str, Meta(max_length=1000)] = ""


class FeatureSchemaBody(Body):
    allow_free_attributes: bool = False
    features: Annotated[list[FeatureDeclaration], Meta(max_length=1000)] = []


class FeatureDefinition(Reply, forbid_unknown_fields=True):
    name: str
    entity: str
    type: str
    source: str
    ttl_s: int | None
    description: str


class FeatureSchemaReply(Reply, forbid_unknown_fields=True):
    revision: str
    allow_free_attributes: bool
    features: list[FeatureDefinition]


class FeatureStaleness(Reply, forbid_unknown_fields=True):
    name: str
    entity: str
    ttl_s: int | None
    values: int
    stale: int
    oldest_event_timestamp: str | None
    newest_event_timestamp: str | None


class FeatureHealth(Reply, forbid_unknown_fields=True):
    status: Literal["ok", "stale", "no_snapshot"]
    snapshot_id: str | None
    snapshot_created_at: str | None
    snapshot_age_s: float | None
    last_upsert: str | None
    counts: dict[str, int]
    features: list[FeatureStaleness]


IngestName = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}" + PATTERN_END,
        description="the computed feature's name",
    ),
]


IngestType = Literal["number", "integer", "boolean", "string", "timestamp", "string_list"]


class FeatureIngest(Body):
    """A feature ingestion: from events (the pipeline aggregates each user's or item's events
    of `event_types` over the last `window_days`: count, sum of values, mean value, distinct
    counterparts), or from a `connector` (files or http): its rows give each entity's value
    of `name` (an id column, a column named like the feature or `value`, optionally
    `event_timestamp`), of type `value_type`, landed with per-row rejects."""

    name: IngestName
    source: Literal["events", "connector"] = "events"
    entity: EntityType = "user"  # type: ignore[valid-type]
    aggregation: Literal["count", "sum", "mean", "distinct"] = "count"
    event_types: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(max_length=32)] = []
    window_days: Annotated[int, Meta(ge=1, le=3650)] = 30
    ttl_s: Annotated[int, Meta(ge=1, le=10 * 365 * 86400)] | None = None
    connector: Annotated[str, Meta(max_length=64)] | None = None
    value_type: IngestType | None = None  # (connector: default number; events: number)
    description: Annotated[str, Meta(max_length=1000)] = ""


class FeatureIngestion(Reply, forbid_unknown_fields=True):
    name: str
    revision: str
    declaration: dict[str, Any]
    run_id: str
    run_url: str
    status: str


ENTITY_PARAMS = {"entityType": EntityType, "entityId": RecordId}
#: The assets an ingestion runs, as a selection of `recsys_pipeline` (pipelines/training/
#: features.py: ingest what landed, then the feature).
INGEST_JOB = "recsys_pipeline"
INGEST_SELECTION = ("events", "rejected_events", "feature_aggregates")
CONNECTOR_SELECTION = ("connector_features",)
_TAGS = ("features",)

ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/recs/features/entities/{entityType}/{entityId}",
        ("features", "on_get_entity"),
        "An entity's features: the live snapshot's catalogue row or profile overlaid with its "
        "record and every upsert since, with a revision id and staleness per feature",
        SCOPE_RECOMMEND,
        params=ENTITY_PARAMS,
        response=FeatureEntity,
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/features/entities/{entityType}/{entityId}",
        ("features", "on_post_entity"),
        "Upsert features of one entity: durable before the answer, visible to the next read "
        "and, for items, to /v1/recommend's filters within a quarter second; landed for the "
        "pipeline (422: unknown feature or wrong type)",
        SCOPE_ADMIN,
        params=ENTITY_PARAMS,
        body=FeatureUpsert,
        response=FeatureEntity,
        errors=(422,),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/features/bulk",
        ("features", "on_post_bulk"),
        "Upsert features of many entities: a JSON array or NDJSON (one upsert a line); each "
        "line is answered on its own, a bad line never refuses the good ones",
        SCOPE_ADMIN,
        body=BulkLines,
        media=(JSON, NDJSON),
        body_by_handler=True,
        response=FeatureBulkReceipt,
        errors=(413,),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/features/schema",
        ("features", "on_get_schema"),
        "Feature definitions: name, entity, type, source, TTL, description (built-in catalogue "
        "columns plus the tenant's declarations); ETag is the declarations' revision",
        SCOPE_RECOMMEND,
        response=FeatureSchemaReply,
        tags=_TAGS,
    ),
    Route(
        "PUT",
        "/v1/recs/features/schema",
        ("features", "on_put_schema"),
        "Replace the tenant's feature declarations (a versioned document: If-Match of the "
        "current revision); 422 for a built-in or repeated name",
        SCOPE_ADMIN,
        body=FeatureSchemaBody,
        response=FeatureSchemaReply,
        errors=(409, 412, 422),
        headers=("If-Match", "If-None-Match"),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/features/ingest",
        ("features", "on_post_ingest"),
        "Declare a feature computed from events (count / sum / mean / distinct over a window) "
        "or read from a files/http connector (rows landed with per-row rejects), and trigger "
        "it as a Dagster run (202 with the run id; 503 naming Dagster when it is down); the "
        "nightly pipeline refreshes every declared feature",
        SCOPE_ADMIN,
        body=FeatureIngest,
        status=202,
        response=FeatureIngestion,
        errors=(409, 422, 503),
        tags=_TAGS,
    ),
    Route(
        "GET",
        "/v1/recs/features/health",
        ("features", "on_get_health"),
        "Feature store health: stale values per feature against its TTL, the last upsert, the "
        "live snapshot and its age, counts",
        SCOPE_RECOMMEND,
        response=FeatureHealth,
        tags=_TAGS,
    ),
)

_DEFAULT_SCHEMA: dict[str, Any] = {"allow_free_attributes": False, "features": []}


class FeatureResources:
    """The handlers of the feature routes."""

    def __init__(
        self,
        view: EntityView,
        schemas: Collection,
        ingestions: Collection,
        dagster_url: str | None,
        connectors: Collection,
    ) -> None:
        self.view = view
        self.schemas = schemas
        self.ingestions = ingestions
        self.dagster_url = dagster_url
        self.connectors = connectors

    # --- ingestion ---------------------------------------------------------------------------
    def on_post_ingest(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: FeatureIngest = req.context.body
        computed = "pipeline" if body.source == "events" else "connector"
        if body.source == "events" and body.value_type not in (None, "number"):
            raise ProblemError(
                422,
                "A feature computed from events is a number (value_type).",
                code="RECSYS_INVALID_SCHEMA",
            )
        kind = body.value_type or "number"
        if body.source == "connector":
            self._check_connector(tenant, body)
        schema, _ = self.schema(tenant)
        existing = schema.get(body.entity, body.name)
        if existing is not None and existing.source != computed:
            raise ProblemError(
                422,
                f"{body.entity} feature '{body.name}' exists with source {existing.source}; "
                f"a feature ingested from {body.source} needs a name of its own.",
                code="RECSYS_INVALID_SCHEMA",
            )
        if existing is not None and existing.type != kind:
            raise ProblemError(
                422,
                f"{body.entity} feature '{body.name}' is declared of type {existing.type}, "
                f"not {kind}.",
                code="RECSYS_INVALID_SCHEMA",
            )
        client = dagster.client_for(self.dagster_url)  # (503 naming Dagster before any write)
        declaration = {
            f: getattr(body, f)
            for f in (
                "name", "source", "entity", "aggregation", "event_types", "window_days",
                "ttl_s", "connector", "description",
            )
        }  # fmt: skip
        declaration["event_types"] = list(body.event_types)
        declaration["value_type"] = kind
        doc, _ = self.ingestions.put(tenant, body.name, declaration)
        if existing is None:  # declared in the tenant's schema (source pipeline / connector)
            current = self.schemas.get(tenant, "schema", default=_DEFAULT_SCHEMA)
            new = dict(current.body)
            new["features"] = [
                *new.get("features", []),
                {
                    "name": body.name,
                    "entity": body.entity,
                    "type": kind,
                    "source": computed,
                    "ttl_s": body.ttl_s,
                    "description": body.description
                    or (
                        f"{body.aggregation} of {', '.join(body.event_types) or 'all'} events "
                        f"over {body.window_days} days"
                        if body.source == "events"
                        else f"read from connector {body.connector}"
                    ),
                },
            ]
            self.schemas.put(
                tenant,
                "schema",
                new,
                Preconditions((current.revision,)),
                default=_DEFAULT_SCHEMA,
            )
        if body.source == "connector":
            config = {
                "tenant": tenant,
                "name": body.name,
                "entity": body.entity,
                "connector": body.connector,
                "value_type": kind,
            }
            run_id = client.launch(
                INGEST_JOB,
                {"ops": {"connector_features": {"config": config}}},
                {"recsys/tenant": tenant, "recsys/feature": body.name},
                asset_selection=CONNECTOR_SELECTION,
            )
            self._launched(req, resp, client, body, doc, declaration, run_id)
            return
        run_config = {
            "ops": {
                "events_and_rejects": {"config": {"tenants": [tenant]}},
                "feature_aggregates": {
                    "config": {
                        "tenant": tenant,
                        "name": body.name,
                        "entity": body.entity,
                        "aggregation": body.aggregation,
                        "event_types": list(body.event_types),
                        "window_days": body.window_days,
                    }
                },
            }
        }
        run_id = client.launch(
            INGEST_JOB,
            run_config,
            {"recsys/tenant": tenant, "recsys/feature": body.name},
            asset_selection=INGEST_SELECTION,
        )
        self._launched(req, resp, client, body, doc, declaration, run_id)

    def _launched(self, req, resp, client, body, doc, declaration, run_id: str) -> None:
        req.context.audit = {
            "target": f"features/ingest/{body.name}",
            "before": None,
            "after": doc.revision,
        }
        resp.status = falcon.HTTP_202
        resp.media = {
            "name": body.name,
            "revision": doc.revision,
            "declaration": declaration,
            "run_id": run_id,
            "run_url": client.ui_link(run_id),
            "status": "QUEUED",
        }

    def _check_connector(self, tenant: str, body: FeatureIngest) -> None:
        """422 unless `body.connector` is one of the tenant's connectors of a readable type."""
        doc = self.connectors.get(tenant, body.connector) if body.connector else None
        if doc is None:
            raise ProblemError(
                422,
                f"No connector '{body.connector}' (a feature ingestion from a connector names "
                "one of yours: GET /v1/recs/connectors).",
                code="RECSYS_UNKNOWN_CONNECTOR",
            )
        if doc.body["type"] not in READABLE_TYPES:
            raise ProblemError(
                422,
                f"Connector '{body.connector}' is a {doc.body['type']} stream: its own runs "
                f"drain it into {doc.body['target']}; a feature ingestion reads "
                f"{' or '.join(READABLE_TYPES)} connectors.",
                code="RECSYS_UNSUPPORTED_OPTION",
            )

    # --- schema ------------------------------------------------------------------------------
    def schema(self, tenant: str) -> tuple[FeatureSchema, str]:
        doc = self.schemas.get(tenant, "schema", default=_DEFAULT_SCHEMA)
        return FeatureSchema.of(doc.body), doc.revision

    def _schema_json(self, tenant: str) -> dict[str, Any]:
        schema, revision = self.schema(tenant)
        return {
            "revision": revision,
            "allow_free_attributes": schema.allow_free_attributes,
            "features": [f.as_json() for f in schema.features],
        }

    def on_get_schema(self, req: falcon.Request, resp: falcon.Response) -> None:
        out = self._schema_json(req.context.principal.tenant)
        resp.media = out
        set_etag(resp, out["revision"])

    def on_put_schema(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body = msgspec.to_builtins(req.context.body)
        body.setdefault("features", [])
        body.setdefault("allow_free_attributes", False)
        errors = declared_errors(body)
        if errors:
            raise ProblemError(422, "; ".join(errors), code="RECSYS_INVALID_SCHEMA")
        before = self.schemas.get(tenant, "schema")
        doc, _ = self.schemas.put(
            tenant, "schema", body, Preconditions.of(req), default=_DEFAULT_SCHEMA
        )
        req.context.audit = {
            "target": "features/schema",
            "before": before.revision if before is not None else None,
            "after": doc.revision,
        }
        out = self._schema_json(tenant)
        resp.media = out
        set_etag(resp, out["revision"])

    # --- entities ----------------------------------------------------------------------------
    def _entity_json(
        self, tenant: str, entity_type: str, entity_id: str, schema: FeatureSchema | None = None
    ) -> dict[str, Any]:
        view = self.view.view(tenant, KIND[entity_type], entity_id)
        if view is None:
            raise ProblemError(
                404,
                f"No {entity_type} '{entity_id}': not in the live snapshot and no record.",
                code=f"RECSYS_UNKNOWN_{entity_type.upper()}",
            )
        schema = schema or self.schema(tenant)[0]
        now = time.time()
        features = {}
        for name, value in view["features"].items():
            stamp = view["feature_times"].get(name)
            features[name] = {
                "value": value,
                "event_timestamp": stamp,
                "stale": _stale(schema, entity_type, name, stamp, now),
            }
        return {
            "entity_type": entity_type,
            "entity_id": entity_id,
            "revision": view["rid"],
            "fields": view["fields"],
            "features": features,
            "sources": view["sources"],
            "snapshot_id": view["snapshot_id"],
            "updated_at": view["updated_at"],
        }

    def on_get_entity(
        self, req: falcon.Request, resp: falcon.Response, entityType: str, entityId: str
    ) -> None:
        out = self._entity_json(req.context.principal.tenant, entityType, entityId)
        resp.media = out
        set_etag(resp, out["revision"])
        resp.cache_control = ["no-store"]

    def _upsert(
        self,
        tenant: str,
        schema: FeatureSchema,
        entity_type: str,
        entity_id: str,
        values: dict[str, Any],
        stamp: str | None,
        full: bool = True,
    ) -> dict[str, Any]:
        when = None
        if stamp is not None:
            when = parse_time(stamp)
            if when is None:
                raise ProblemError(
                    422,
                    "event_timestamp is not an ISO-8601 time with an offset.",
                    code="RECSYS_INVALID_FEATURE",
                    extra={"reason": "bad_timestamp"},
                )
        checked = self.view.check(schema, entity_type, values)
        return self.view.upsert(tenant, entity_type, entity_id, checked, when, full)

    def on_post_entity(
        self, req: falcon.Request, resp: falcon.Response, entityType: str, entityId: str
    ) -> None:
        tenant = req.context.principal.tenant
        body: FeatureUpsert = req.context.body
        schema, _ = self.schema(tenant)
        before = self.view.view(tenant, KIND[entityType], entityId)
        view = self._upsert(
            tenant, schema, entityType, entityId, body.features, body.event_timestamp
        )
        req.context.audit = {
            "target": f"features/{entityType}/{entityId}",
            "before": before["rid"] if before is not None else None,
            "after": view["rid"],
        }
        out = self._entity_json(tenant, entityType, entityId, schema)
        resp.media = out
        set_etag(resp, out["revision"])

    def on_post_bulk(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        chunks = _bulk_lines(read_body(req), is_ndjson(req))
        schema, _ = self.schema(tenant)
        results: list[dict[str, Any]] = []
        batch = []
        for n, chunk in enumerate(chunks, start=1):
            line, refused = self._bulk_line(schema, n, chunk)
            results.append(refused or line)
            if refused is None:
                batch.append(line["_upsert"])
        done = self.view.upsert_many(tenant, batch) if batch else {}
        for r in results:
            upsert = r.pop("_upsert", None)
            if upsert is None:
                continue
            outcome = done[r["line"]]
            if "rid" in outcome:
                r.update(status="upserted", revision=outcome["rid"])
            else:
                r.update(status="rejected", reason=outcome["reason"], detail=outcome["detail"])
        upserted = sum(1 for r in results if r["status"] == "upserted")
        req.context.audit = {"target": f"features/bulk ({upserted} upserted)", "before": None}
        resp.media = {
            "upserted": upserted,
            "rejected": len(results) - upserted,
            "results": results,
        }

    def _bulk_line(
        self, schema: FeatureSchema, n: int, chunk: Any
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(the line's result so far, with its checked upsert under ``_upsert``; or None and
        its rejection)."""
        if isinstance(chunk, _Unparsable):
            return {}, {"line": n, "status": "rejected", "reason": "unparsable", "detail": chunk}
        try:
            line = msgspec.convert(chunk, FeatureBulkLine)
        except msgspec.ValidationError as e:
            return {}, {"line": n, "status": "rejected", "reason": "invalid", "detail": str(e)}
        out: dict[str, Any] = {
            "line": n,
            "entity_type": line.entity_type,
            "entity_id": line.entity_id,
        }
        when = None
        if line.event_timestamp is not None:
            when = parse_time(line.event_timestamp)
            if when is None:
                return {}, {**out, "status": "rejected", "reason": "bad_timestamp",
                            "detail": "event_timestamp is not ISO-8601 with an offset"}  # fmt: skip
        try:
            checked = self.view.check(schema, line.entity_type, line.features)
        except ProblemError as e:
            return {}, {**out, "status": "rejected", "reason": e.extra.get("reason", "invalid"),
                        "detail": e.description}  # fmt: skip
        out["_upsert"] = (n, line.entity_type, line.entity_id, checked, when)
        return out, None

    # --- health ------------------------------------------------------------------------------
    def on_get_health(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        schema, _ = self.schema(tenant)
        now = time.time()
        live = self.view.store.live(tenant)
        per: dict[tuple[str, str], dict[str, Any]] = {
            (f.entity, f.name): {
                "name": f.name,
                "entity": f.entity,
                "ttl_s": f.ttl_s,
                "values": 0,
                "stale": 0,
                "oldest_event_timestamp": None,
                "newest_event_timestamp": None,
            }
            for f in schema.features
            if f.source != "catalogue"
        }
        last = None
        counts = {"item_records": 0, "user_records": 0, "feature_values": 0}
        for entity_type, kind in KIND.items():
            documents = self.view.records.documents(tenant, kind)
            counts[f"{entity_type}_records"] = len(documents)
            for doc in documents:
                times = doc.body.get("feature_times") or {}
                for name, stamp in times.items():
                    last = stamp if last is None or stamp > last else last
                    if name not in (doc.body.get("features") or {}):
                        continue
                    counts["feature_values"] += 1
                    row = per.get((entity_type, name))
                    if row is None:
                        continue
                    row["values"] += 1
                    row["stale"] += _stale(schema, entity_type, name, stamp, now)
                    old, new = row["oldest_event_timestamp"], row["newest_event_timestamp"]
                    row["oldest_event_timestamp"] = stamp if old is None or stamp < old else old
                    row["newest_event_timestamp"] = stamp if new is None or stamp > new else new
        if live is not None:
            counts["snapshot_items"] = live.snap.n_items
            counts["snapshot_users"] = live.snap.n_users
        stale = any(r["stale"] for r in per.values())
        resp.media = {
            "status": "no_snapshot" if live is None else ("stale" if stale else "ok"),
            "snapshot_id": live.snapshot_id if live else None,
            "snapshot_created_at": iso(live.snap.created_at) if live else None,
            "snapshot_age_s": round(now - live.created_ts, 1) if live else None,
            "last_upsert": last,
            "counts": counts,
            "features": sorted(per.values(), key=lambda r: (r["entity"], r["name"])),
        }
        resp.cache_control = ["no-store"]


def _stale(schema: FeatureSchema, entity: str, name: str, stamp: str | None, now: float) -> bool:
    defn = schema.get(entity, name)
    if defn is None or defn.ttl_s is None or stamp is None:
        return False
    when = parse_time(stamp)
    return when is not None and now - when.timestamp() > defn.ttl_s


def _bulk_lines(raw: bytes, ndjson: bool) -> list[Any]:
    """The upserts of a bulk body: a JSON array (Content-Type application/json; anything else
    is 400), or NDJSON (application/x-ndjson; blank lines ignored, a line that is not JSON
    stays in as its text and is answered as rejected, a body no line of which is JSON is
    400)."""
    body = raw.strip()
    if not body:
        raise ProblemError(400, "The bulk body holds no upserts.")
    if ndjson:
        chunks = _ndjson(body)
        if chunks and all(isinstance(c, _Unparsable) for c in chunks):
            raise ProblemError(400, "No line of the NDJSON body is JSON.", code=MALFORMED)
    else:
        try:
            chunks = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ProblemError(400, "The body is not valid JSON.", code=MALFORMED) from None
        if not isinstance(chunks, list):
            raise ProblemError(
                400, "A bulk body is a JSON array of upserts (or NDJSON: application/x-ndjson)."
            )
    if not chunks:
        raise ProblemError(400, "The bulk body holds no upserts.")
    if len(chunks) > MAX_BULK:
        raise ProblemError(413, f"{len(chunks)} upserts in one request; the limit is {MAX_BULK}.")
    return chunks


class _Unparsable(str):
    pass


def is_ndjson(req: falcon.Request) -> bool:
    """Whether the request says its body is NDJSON."""
    return (req.content_type or "").split(";")[0].strip().lower() == NDJSON


def _ndjson(body: bytes) -> list[Any]:
    out: list[Any] = []
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            out.append(_Unparsable(line[:200].decode("utf-8", "replace")))
    return out


#: The embeddings area's routes are mounted through this one (serving.control.embeddings).
ROUTES = ROUTES + embeddings.ROUTES


def resources(ctx: Any) -> dict[str, Any]:
    records = RecordStore(ctx.config.data_root)
    ctx.store.install_overlay(ItemOverlays(ctx.serving_dir))
    schemas = ctx.documents.collection(
        "feature_schema", folder="features/{tenant}", ids=("schema",), prefix="fs"
    )
    ingestions = ctx.documents.collection(
        "feature_ingestions", folder="feature_ingestions/{tenant}", prefix="fi"
    )
    return {
        "features": FeatureResources(
            EntityView(records, ctx.store),
            schemas,
            ingestions,
            ctx.config.dagster_url,
            connectors.collection(ctx),
        ),
        **embeddings.resources(ctx),
    }

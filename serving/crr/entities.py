"""The one view of a user or an item that the whole API reads, and feature upserts into it.

A view is built in three layers, later ones winning:

1. the live snapshot: an item's catalogue row (its analyst copy ``parquet/items.parquet`` when
   the snapshot has one, else its arrays: category, brand, price, tags, availability), a user's
   segment, plus country and attributes from the warehouse's ``users.parquet``;
2. the entity's record (`serving.crr.records.RecordStore`: written by the CRR routes and by
   feature upserts), whose contract fields replace the snapshot's;
3. the record's ``features`` (tenant-declared or free features, each with the event time it
   holds for).

Its revision id is the record's rid, or ``snap-<snapshot id>`` while only the snapshot holds it.
`EntityView.upsert` checks values against the tenant's feature schema (`recsys.features`),
merges them into the record under the record's lock (creating it from the snapshot's row), lands
the merged contract row for the pipeline (as the CRR routes do), appends the item's rule fields
to the change log (`serving.crr.overlay`: /v1/recommend sees them within a quarter second on
every worker) and lands the values with their event time for point-in-time joins
(``landing/<tenant>/features/``). All of it is on disk before the caller answers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import posixpath
import uuid
from typing import Any

import orjson
import polars as pl

from recsys.durable import write_parquet_atomic
from recsys.features import (
    CATALOGUE_FIELDS,
    LOG_SCHEMA,
    FeatureSchema,
    check_features,
    features_landing,
    iso,
)
from recsys.storage import Storage
from recsys.validation import validate_items, validate_users
from serving.crr.overlay import append_changes, rule_fields
from serving.crr.records import FIELDS, RecordStore, landing_row
from serving.errors import ProblemError

KIND = {"user": "users", "item": "items"}
#: Catalogue tables of at most this many rows are kept in memory for lookups.
CACHED_ROWS = 200_000
SNAPSHOT_REVISION = "snap-"


class EntityProblem(ProblemError):
    """A refused upsert (422), with the reason per feature (`reasons`)."""

    def __init__(self, detail: str, reasons: dict[str, tuple[str, str]]) -> None:
        first = next(iter(reasons.values()))[0] if reasons else "invalid"
        super().__init__(
            422,
            detail,
            code="RECSYS_INVALID_FEATURE",
            extra={
                "reason": first,
                "features": {k: {"reason": r, "detail": d} for k, (r, d) in reasons.items()},
            },
        )


class EntityView:
    """Views and upserts of users and items (see the module docstring)."""

    def __init__(self, records: RecordStore, store: Any) -> None:
        self.records = records
        self.store = store  # serving.snapshot.SnapshotRegistry
        self.data_root = records.data_root
        self.serving_dir = os.path.join(records.data_root, "serving")
        self._storage = Storage(records.data_root)
        self._tables: dict[str, tuple[tuple, pl.DataFrame | None]] = {}

    # --- reading ---------------------------------------------------------------------------
    def snapshot_row(self, tenant: str, kind: str, entity_id: str) -> tuple[dict, str] | None:
        """(the snapshot's fields of the entity, snapshot id), or None when it holds none."""
        holder = self.store.tenant(tenant)
        live = holder.base() if holder is not None else None
        if live is None:
            return None
        snap = live.snap
        if kind == "items":
            idx = live.item_index(entity_id)
            if idx is None:
                return None
            row = self._parquet_row(snap.path, "items", "item_id", entity_id)
            if row is None:
                price = float(snap.price[idx])
                row = {
                    "category": snap.category_name(int(snap.category_id[idx])),
                    "brand": snap.brand_name(int(snap.brand_id[idx])),
                    "price": None if price != price else price,
                    "tags": [snap.tag_name(int(t)) for t in snap.item_tags(idx)],
                    "available": bool(snap.available[idx]),
                }
            overlay = getattr(holder, "overlay", None)
            if overlay is not None:  # (changes since: an item whose record was deleted, ...)
                holder.live()  # (reads what was appended since the last look)
                changed = overlay.changes(tenant).items.get(entity_id)
                if changed:
                    row = {**row, **changed}
            return row, live.snapshot_id
        idx = snap.user_index(entity_id)
        if idx is None:
            return None
        row = {"segment": live.user_segment(idx)}
        table = self._storage.table_path(tenant, "users")
        found = self._parquet_row(None, "users", "user_id", entity_id, file=table)
        if found is not None:
            row = {**{k: v for k, v in found.items() if v is not None}, **row}
        return row, live.snapshot_id

    def _table(self, file: str) -> pl.DataFrame | None:
        """A catalogue table read whole and kept while its file is unchanged (tables of up to
        CACHED_ROWS rows; None for larger ones, which are scanned per lookup)."""
        try:
            st = os.stat(file)
        except FileNotFoundError:
            return None
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        found = self._tables.get(file)
        if found is not None and found[0] == sig:
            return found[1]
        try:
            rows = pl.scan_parquet(file).select(pl.len()).collect().item()
            df = pl.read_parquet(file) if rows <= CACHED_ROWS else None
        except (OSError, pl.exceptions.PolarsError):
            return None
        if len(self._tables) > 8:
            self._tables.clear()
        self._tables[file] = (sig, df)
        return df

    def _parquet_row(
        self, snap_path: str | None, table: str, key: str, entity_id: str, file: str | None = None
    ) -> dict[str, Any] | None:
        file = file or os.path.join(snap_path, "parquet", f"{table}.parquet")
        if not os.path.exists(file):
            return None
        df = self._table(file)
        try:
            if df is not None:
                df = df.filter(pl.col(key) == entity_id).head(1)
            else:
                df = pl.scan_parquet(file).filter(pl.col(key) == entity_id).head(1).collect()
        except (OSError, pl.exceptions.PolarsError):
            return None
        if not df.height:
            return None
        row = df.row(0, named=True)
        if key == "entity_id":
            return row
        out = {k: v for k, v in row.items() if k in FIELDS[table]}
        if isinstance(out.get("created_at"), dt.datetime):
            out["created_at"] = iso(out["created_at"])
        if isinstance(out.get("attributes"), str):
            with contextlib.suppress(orjson.JSONDecodeError):
                out["attributes"] = orjson.loads(out["attributes"])
        return out

    def view(self, tenant: str, kind: str, entity_id: str) -> dict[str, Any] | None:
        """The entity as the API shows it, or None when nothing holds it:
        ``{"id", "rid", "fields", "features", "feature_times", "sources", "snapshot_id",
        "created_at", "updated_at"}``."""
        base = self.snapshot_row(tenant, kind, entity_id)
        doc = self.records.get(tenant, kind, entity_id)
        features, times = self._pipeline_features(tenant, kind, entity_id)
        if base is None and doc is None and not features:
            return None
        fields: dict[str, Any] = {}
        sources = []
        snapshot_id = None
        if base is not None:
            fields.update(base[0])
            snapshot_id = base[1]
            sources.append("snapshot")
        if features:
            sources.append("pipeline")
        if doc is not None:
            record = doc["record"]
            fields.update({k: v for k, v in record.items() if k in FIELDS[kind]})
            upserted = record.get("features") or {}
            upserted_at = record.get("feature_times") or {}
            for name, value in upserted.items():  # (the newer value of a name wins)
                stamp = upserted_at.get(name)
                if name not in times or (stamp is not None and stamp >= times[name]):
                    features[name], times[name] = value, stamp
            sources.append("record")
            if upserted:
                sources.append("features")
            rid, created, updated = doc["rid"], doc["created_at"], doc["updated_at"]
        elif base is not None:
            live = self.store.live(tenant)
            rid = SNAPSHOT_REVISION + snapshot_id
            created = updated = iso(live.snap.created_at) if live is not None else None
        else:  # (only the pipeline's features know it)
            stamp = max(times.values())
            rid, created, updated = f"pipeline-{stamp}", stamp, stamp
        return {
            "id": entity_id,
            "rid": rid,
            "fields": fields,
            "features": features,
            "feature_times": times,
            "sources": sources,
            "snapshot_id": snapshot_id,
            "created_at": created,
            "updated_at": updated,
        }

    def _pipeline_features(
        self, tenant: str, kind: str, entity_id: str
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """Features the pipeline computed for the entity (``warehouse/<tenant>/features/
        <name>.parquet``: entity_id, value, event_timestamp), with their event times."""
        folder = pipeline_features_dir(self.data_root, tenant)
        values: dict[str, Any] = {}
        times: dict[str, str] = {}
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))
        except FileNotFoundError:
            return values, times
        entity = kind[:-1]
        for file in names:
            name = file[: -len(".parquet")]
            declared = self._declared_entity(tenant, name)
            if declared is not None and declared != entity:
                continue
            row = self._parquet_row(None, kind, "entity_id", entity_id, os.path.join(folder, file))
            if row is not None:
                values[name] = row["value"]
                stamp = row["event_timestamp"]
                times[name] = iso(stamp) if isinstance(stamp, dt.datetime) else stamp
        return values, times

    def _declared_entity(self, tenant: str, name: str) -> str | None:
        path = os.path.join(self.serving_dir, "feature_ingestions", tenant, f"{name}.json")
        try:
            with open(path, "rb") as f:
                return (orjson.loads(f.read()).get("body") or {}).get("entity")
        except (OSError, orjson.JSONDecodeError):
            return None

    # --- writing ---------------------------------------------------------------------------
    def check(
        self, schema: FeatureSchema, entity_type: str, values: dict[str, Any]
    ) -> dict[str, Any]:
        """The values as stored, or a 422 naming each refused feature and why."""
        ok, bad = check_features(schema, entity_type, values)
        if bad:
            raise EntityProblem(
                "Refused features: "
                + "; ".join(f"{n} ({r}: {d})" for n, (r, d) in sorted(bad.items())),
                bad,
            )
        return ok

    def upsert(
        self,
        tenant: str,
        entity_type: str,
        entity_id: str,
        values: dict[str, Any],
        when: dt.datetime | None = None,
        full: bool = True,
    ) -> dict[str, Any]:
        """Merge checked `values` into the entity (see the module docstring); its new view
        (`full`), else only its new revision (``{"rid"}``). 404 when neither the snapshot nor
        a record holds the entity."""
        kind = KIND[entity_type]
        now = dt.datetime.now(dt.UTC)
        when = when or now
        catalogue = {k: v for k, v in values.items() if k in CATALOGUE_FIELDS[entity_type]}
        base = self.snapshot_row(tenant, kind, entity_id)

        merge = _merger(entity_type, entity_id, values, when, base[0] if base else None)

        def landed(record: dict[str, Any]) -> None:
            if kind == "items" and catalogue.keys() & {"available", "tags", "category", "brand"}:
                append_changes(
                    self.serving_dir,
                    tenant,
                    [{"id": entity_id, "ts": iso(now), **rule_fields(record)}],
                )
            self._land_features(tenant, entity_type, entity_id, values, when, now)

        doc = self.records.merge(tenant, kind, entity_id, merge, land_contract=True, after=landed)
        if not full:
            return {"rid": doc["rid"]}
        out = self.view(tenant, kind, entity_id)
        assert out is not None
        return out

    def upsert_many(
        self, tenant: str, lines: list[tuple[int, str, str, dict[str, Any], dt.datetime | None]]
    ) -> dict[int, dict[str, Any]]:
        """Bulk upserts: ``(line, entity_type, entity_id, checked values, event time)`` each ->
        ``{line: {"rid"}}`` or ``{line: {"reason", "detail"}}``. The merged catalogue rows are
        checked by the contract in one pass per kind; each record is then written under its
        lock, and the landing rows, feature values and item changes of the whole batch are
        written as one file each (one fsync each) before this returns."""
        now = dt.datetime.now(dt.UTC)
        out: dict[int, dict[str, Any]] = {}
        planned: dict[str, list[tuple]] = {
            "items": [],
            "users": [],
        }
        for line, entity_type, entity_id, values, when in lines:
            kind = KIND[entity_type]
            doc = self.records.get(tenant, kind, entity_id)
            base = self.snapshot_row(tenant, kind, entity_id) if doc is None else None
            if doc is None and base is None:
                out[line] = {
                    "reason": "unknown_entity",
                    "detail": f"No {entity_type} '{entity_id}': not in the snapshot, no record.",
                }
                continue
            current = doc["record"] if doc is not None else base[0]
            catalogue = {k: v for k, v in values.items() if k in CATALOGUE_FIELDS[entity_type]}
            merged = {k: v for k, v in {**current, **catalogue}.items() if k in FIELDS[kind]}
            start = None if doc is not None else base[0]
            planned[kind].append((line, entity_id, values, merged, when or now, start))
        for kind, rows in planned.items():
            if not rows:
                continue
            raw = pl.concat([landing_row(kind, r[1], r[3]) for r in rows])
            validate = validate_items if kind == "items" else validate_users
            _, rejects = validate(raw, source="api")
            refused = {
                r["row_number"] - 1: (r["reason"], r["detail"])
                for r in rejects.iter_rows(named=True)
            }
            kept, changes, logged = [], [], []
            for j, (line, entity_id, values, _, when, start) in enumerate(rows):
                if j in refused:
                    out[line] = {"reason": refused[j][0], "detail": refused[j][1]}
                    continue
                entity_type = kind[:-1]
                change = _merger(entity_type, entity_id, values, when, start)
                doc = self.records.merge(tenant, kind, entity_id, change, land_contract=False)
                record = doc["record"]
                kept.append(landing_row(kind, entity_id, {k: record.get(k) for k in FIELDS[kind]}))
                if kind == "items" and values.keys() & {"available", "tags", "category", "brand"}:
                    changes.append({"id": entity_id, "ts": iso(now), **rule_fields(record)})
                logged.append((entity_type, entity_id, values, when))
                out[line] = {"rid": doc["rid"]}
            if kept:
                self.records.land(tenant, kind, pl.concat(kept))
            append_changes(self.serving_dir, tenant, changes)
            self._write_log(tenant, _log_frame(logged, now))
        return out

    def _land_features(
        self,
        tenant: str,
        entity_type: str,
        entity_id: str,
        values: dict[str, Any],
        when: dt.datetime,
        now: dt.datetime,
    ) -> None:
        if values:
            self._write_log(tenant, _log_frame([(entity_type, entity_id, values, when)], now))

    def _write_log(self, tenant: str, frame: pl.DataFrame) -> None:
        if not frame.height:
            return
        folder = features_landing(self._storage, tenant)
        self._storage.makedirs(folder)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = posixpath.join(folder, f"api-features-{stamp}-{uuid.uuid4().hex[:12]}.parquet")
        write_parquet_atomic(frame, target, self._storage.fs)


def _merger(
    entity_type: str,
    entity_id: str,
    values: dict[str, Any],
    when: dt.datetime,
    base: dict[str, Any] | None,
):
    """The change of a record an upsert makes: catalogue values replace its fields, other
    values go to its ``features`` with their event time (a new record starts from `base`)."""
    catalogue = {k: v for k, v in values.items() if k in CATALOGUE_FIELDS[entity_type]}
    extra = {k: v for k, v in values.items() if k not in CATALOGUE_FIELDS[entity_type]}

    def merge(current: dict[str, Any] | None) -> dict[str, Any]:
        if current is None and base is None:
            raise ProblemError(
                404,
                f"No {entity_type} '{entity_id}': not in the snapshot and no record.",
                code=f"RECSYS_UNKNOWN_{entity_type.upper()}",
            )
        record = dict(current) if current is not None else dict(base)
        record.update(catalogue)
        stamp = iso(when)
        record["features"] = {**(record.get("features") or {}), **extra}
        record["feature_times"] = {
            **(record.get("feature_times") or {}),
            **dict.fromkeys(values, stamp),
        }
        return record

    return merge


def _log_frame(
    rows: list[tuple[str, str, dict[str, Any], dt.datetime]], now: dt.datetime
) -> pl.DataFrame:
    """Feature-log rows (`recsys.features.LOG_SCHEMA`) of upserts."""
    cols: dict[str, list] = {c: [] for c in LOG_SCHEMA}
    for entity_type, entity_id, values, when in rows:
        for name, value in values.items():
            cols["entity_type"].append(entity_type)
            cols["entity_id"].append(entity_id)
            cols["feature"].append(name)
            cols["value"].append(orjson.dumps(value).decode())
            cols["event_timestamp"].append(when)
            cols["created_timestamp"].append(now)
    return pl.DataFrame(cols, schema=LOG_SCHEMA)


def pipeline_features_dir(data_root: str, tenant: str) -> str:
    """``warehouse/<tenant>/features/``: the features the pipeline computed (one table each)."""
    return os.path.join(data_root, "warehouse", tenant, "features")

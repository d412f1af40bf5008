"""User and item records of the Common Recommender REST API, with revision ids.

Durable store: one document of the document store (`serving.documents`) per record,
``<data root>/serving/crr/<tenant>/<users|items>/<sha256(id)[:40]>.json``, its body the record.
Every create or update gets a new revision id (`rid`); an update must name the current one
(else 409; 428 without one), as the API asks.

Every accepted create/update is also landed for the pipeline like an imported file: one
Parquet row in the contract's columns (as text, exactly what `recsys import` lands) under
``landing/<tenant>/<items|users>/api-crr-<UTC time>-<random>.parquet``, written under a
hidden temporary name and renamed (`recsys.durable.write_parquet_atomic`), under the record's
lock once its revision check passed. The row is validated first with the contract's
validators, so a record ingest would reject is refused with 422 instead.
Deleting an item lands it with ``available=false`` (the catalogue is an upsert table, so this is
how the pipeline learns to stop recommending it); deleting a user removes the record only.
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import uuid
from collections.abc import Callable
from typing import Any

import polars as pl
from msgspec import UNSET

from recsys.contract import ITEM_SCHEMA, USER_SCHEMA
from recsys.durable import write_parquet_atomic
from recsys.features import landing_text as _text
from recsys.storage import Storage
from recsys.validation import validate_items, validate_users
from serving.crr.overlay import append_changes, rule_fields
from serving.crr.schemas import CrrItemRecord, CrrUserRecord, given
from serving.documents import NONE, Collection, Conflict, Document, Legacy, Preconditions
from serving.errors import ProblemError
from serving.routing import encodable

KINDS = ("users", "items")
ID_FIELD = {"users": "uid", "items": "iid"}
CONTRACT_ID = {"users": "user_id", "items": "item_id"}
#: Writable record fields (contract columns without the id).
FIELDS = {
    "users": tuple(c for c in USER_SCHEMA if c != "user_id"),
    "items": tuple(c for c in ITEM_SCHEMA if c != "item_id"),
}


def landing_row(kind: str, record_id: str, record: dict[str, Any]) -> pl.DataFrame:
    """One raw landing row (all text) of a record, in contract column names."""
    cols = [CONTRACT_ID[kind], *FIELDS[kind]]
    values = {CONTRACT_ID[kind]: record_id, **{f: _text(record.get(f)) for f in FIELDS[kind]}}
    return pl.DataFrame({c: [values[c]] for c in cols}, schema={c: pl.String for c in cols})


def check_record(kind: str, record_id: str, record: dict[str, Any]) -> pl.DataFrame:
    """The landing row of a record, or 422 with the contract's reject reason."""
    raw = landing_row(kind, record_id, record)
    validate = validate_items if kind == "items" else validate_users
    _, rejects = validate(raw, source="api")
    if rejects.height:
        r = rejects.row(0, named=True)
        raise ProblemError(
            422,
            f"The {kind[:-1]} is invalid ({r['reason']}): {r['detail']}",
            code="RECSYS_INVALID_RECORD",
            extra={"reason": r["reason"]},
        )
    return raw


def parse_record(
    kind: str, body: CrrUserRecord | CrrItemRecord
) -> tuple[str | None, str | None, dict[str, Any]]:
    """(id, rid, record fields sent) of a decoded body (`serving.crr.schemas`); 422 when its
    attributes hold what JSON text of the contract cannot (an integer beyond 64 bits, nesting
    deeper than 254 levels)."""
    record = given(body, FIELDS[kind])
    if not encodable(record.get("attributes")):
        raise ProblemError(
            422,
            f"The {kind[:-1]}'s attributes hold an integer beyond 64 bits or nest too deep.",
            code="RECSYS_INVALID_RECORD",
            extra={"reason": "bad_value"},
        )
    rec_id = getattr(body, ID_FIELD[kind])
    return (None if rec_id is UNSET else rec_id), body.rid, record


def _legacy_record(raw: dict[str, Any]) -> tuple[str, dict[str, Any], str, str]:
    """``{"id", "rid", "record", "created_at", "updated_at"}`` (before the document store)."""
    return raw["rid"], raw["record"], raw["created_at"], raw["updated_at"]


def _features_of(current: Document | None) -> dict[str, Any]:
    """The feature-store part of a record's body (kept when the CRR routes replace it)."""
    if current is None:
        return {}
    return {k: current.body[k] for k in ("features", "feature_times") if k in current.body}


def _flat(doc: Document) -> dict[str, Any]:
    return {
        "id": doc.id,
        "rid": doc.revision,
        "record": doc.body,
        "created_at": doc.created_at,
        "updated_at": doc.updated_at,
    }


class RecordStore:
    """Users and items of every tenant (see the module docstring): one collection of the
    document store per kind, documents named by the SHA-256 of their id."""

    def __init__(self, data_root: str) -> None:
        self.data_root = data_root
        self.root = os.path.join(data_root, "serving", "crr")
        self.serving_dir = os.path.join(data_root, "serving")
        self._storage = Storage(data_root)
        self._kinds = {
            kind: Collection(
                self.root,
                kind[:-1],
                folder=f"{{tenant}}/{kind}",
                revisions=lambda previous: uuid.uuid4().hex,
                hashed_ids=True,
                replace_needs_match=True,
                exists_code="RECSYS_RECORD_EXISTS",
                missing_code="RECSYS_UNKNOWN_RECORD",
                legacy=Legacy(_legacy_record),
            )
            for kind in KINDS
        }

    def get(self, tenant: str, kind: str, rec_id: str) -> dict[str, Any] | None:
        doc = self._kinds[kind].get(tenant, rec_id)
        return _flat(doc) if doc is not None else None

    def count(self, tenant: str, kind: str) -> int:
        return self._kinds[kind].count(tenant)

    def documents(self, tenant: str, kind: str) -> list[Document]:
        """Every stored record of the kind, as documents (read from disk now), by id."""
        return self._kinds[kind].list(tenant)

    def put(
        self,
        tenant: str,
        kind: str,
        rec_id: str,
        record: dict[str, Any],
        pre: Preconditions = NONE,
        create_only: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Create (409 if it exists, with `create_only`) or replace it (`pre` naming its
        current rid, else 409 / 428) and land it; (stored document, created?)."""
        raw = check_record(kind, rec_id, record)

        def land(current: Document | None) -> dict[str, Any]:
            self._land(tenant, kind, raw, uuid.uuid4().hex)
            self._changed(tenant, kind, rec_id, record)
            return {**record, **_features_of(current)}

        documents = self._kinds[kind]
        if create_only:
            return _flat(documents.create(tenant, rec_id, land)), True
        doc, created = documents.put(tenant, rec_id, land, pre)
        return _flat(doc), created

    def delete(
        self, tenant: str, kind: str, rec_id: str, pre: Preconditions = NONE
    ) -> dict[str, Any]:
        """Remove a record (an item is landed as unavailable first); returns it."""

        def land(current: Document) -> None:
            if kind == "items":
                gone = {**current.body, "available": False}
                self._land(tenant, kind, landing_row(kind, rec_id, gone), uuid.uuid4().hex)
                self._changed(tenant, kind, rec_id, {"available": False})

        return _flat(self._kinds[kind].delete(tenant, rec_id, pre, before=land))

    def merge(
        self,
        tenant: str,
        kind: str,
        rec_id: str,
        change: Callable[[dict[str, Any] | None], dict[str, Any]],
        *,
        land_contract: bool = True,
        after: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Create or change a record without a revision precondition (feature upserts):
        ``change(current body or None)`` gives the new body, checked by the contract and landed
        (`land_contract`; else the caller checked and lands it), then `after(new body)` runs,
        all under the record's lock."""
        documents = self._kinds[kind]

        def body(current: Document | None) -> dict[str, Any]:
            new = change(current.body if current is not None else None)
            if land_contract:
                contract = {k: v for k, v in new.items() if k in FIELDS[kind]}
                raw = check_record(kind, rec_id, contract)
                self._land(tenant, kind, raw, uuid.uuid4().hex)
            if after is not None:
                after(new)
            return new

        for _ in range(3):  # (a create racing another one: change what it created)
            if documents.get(tenant, rec_id) is not None:
                try:
                    return _flat(documents.patch(tenant, rec_id, body))
                except ProblemError as e:
                    if e.status_code != 404:  # (deleted meanwhile: create it)
                        raise
            try:
                return _flat(documents.create(tenant, rec_id, body))
            except Conflict as e:
                if e.status_code != 409:
                    raise
        raise ProblemError(409, f"The {kind[:-1]} '{rec_id}' changed too often; retry.")

    def _changed(self, tenant: str, kind: str, rec_id: str, record: dict[str, Any]) -> None:
        """Items: append the fields rules read to the change log (`serving.crr.overlay`)."""
        fields = rule_fields(record)
        if kind == "items" and fields:
            stamp = dt.datetime.now(dt.UTC).isoformat()
            append_changes(self.serving_dir, tenant, [{"id": rec_id, "ts": stamp, **fields}])

    def land(self, tenant: str, kind: str, raw: pl.DataFrame) -> str:
        """Land raw contract rows (`landing_row`s) for the pipeline, as one file."""
        return self._land(tenant, kind, raw, uuid.uuid4().hex)

    def _land(self, tenant: str, kind: str, raw: pl.DataFrame, token: str) -> str:
        landing = self._storage.landing_dir(tenant, kind)
        self._storage.makedirs(landing)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = posixpath.join(landing, f"api-crr-{stamp}-{token[:12]}.parquet")
        write_parquet_atomic(raw, target, self._storage.fs)
        return target

"""User and item records of the Common Recommender REST API, with revision ids.

Durable store: one JSON file per record,
``<data root>/serving/crr/<tenant>/<users|items>/<sha256(id)[:40]>.json`` holding
``{"id", "rid", "record", "created_at", "updated_at"}`` (temporary file, fsync, `os.replace`),
changed under an `flock` of the folder so the revision check and the write are atomic across
workers. Every create or update gets a new revision id (`rid`); an update must name the current
one (else 409), as the API asks.

Every accepted create/update is also landed for the pipeline like an imported file: one
Parquet row in the contract's columns (as text, exactly what `recsys import` lands) under
``landing/<tenant>/<items|users>/api-crr-<UTC time>-<rid>.parquet``, written under a hidden
temporary name and renamed (`recsys.durable.write_parquet_atomic`). The row is validated first with
the contract's validators, so a record ingest would reject is refused with 422 instead.
Deleting an item lands it with ``available=false`` (the catalogue is an upsert table, so this is
how the pipeline learns to stop recommending it); deleting a user removes the record only.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
import posixpath
import threading
import uuid
from typing import Any

import orjson
import polars as pl

from recsys.contract import ITEM_SCHEMA, USER_SCHEMA
from recsys.durable import fsync_dir, write_atomic, write_parquet_atomic
from recsys.storage import Storage
from recsys.validation import validate_items, validate_users
from serving.errors import ProblemError, bad_request

KINDS = ("users", "items")
ID_FIELD = {"users": "uid", "items": "iid"}
CONTRACT_ID = {"users": "user_id", "items": "item_id"}
#: Writable record fields (contract columns without the id).
FIELDS = {
    "users": tuple(c for c in USER_SCHEMA if c != "user_id"),
    "items": tuple(c for c in ITEM_SCHEMA if c != "item_id"),
}


class RevisionConflict(Exception):
    def __init__(self, current: str | None) -> None:
        super().__init__(current)
        self.current = current


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text(value: Any) -> str | None:
    """A field value as the text a landing file holds (what validation parses)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


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


def parse_record(kind: str, body: Any) -> tuple[str | None, str | None, dict[str, Any], list]:
    """(id, rid, record fields, events) of a request body; 400 on unknown fields."""
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.")
    id_field, contract_id = ID_FIELD[kind], CONTRACT_ID[kind]
    allowed = {id_field, contract_id, "rid", *FIELDS[kind]}
    if kind == "users":
        allowed.add("events")
    unknown = set(body) - allowed
    if unknown:
        raise bad_request(
            f"Unknown field(s): {', '.join(sorted(unknown))}; a {kind[:-1]} has "
            f"{', '.join(sorted(allowed))}."
        )
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise bad_request("Field 'rid' must be a string.")
    rec_id = body.get(id_field, body.get(contract_id))
    if rec_id is not None and (not isinstance(rec_id, str) or not rec_id):
        raise bad_request(f"Field '{id_field}' must be a non-empty string.")
    events = body.get("events") or []
    if not isinstance(events, list):
        raise bad_request("Field 'events' must be an array of events.")
    record = {f: body[f] for f in FIELDS[kind] if f in body}
    for f in ("attributes",):
        if f in record and record[f] is not None and not isinstance(record[f], dict):
            raise bad_request(f"Field '{f}' must be an object.")
    if (
        "tags" in record
        and record["tags"] is not None
        and not (
            isinstance(record["tags"], list) and all(isinstance(t, str) for t in record["tags"])
        )
    ):
        raise bad_request("Field 'tags' must be an array of strings.")
    return rec_id, rid, record, events


class RecordStore:
    """Users and items of every tenant (see the module docstring)."""

    def __init__(self, data_root: str) -> None:
        self.data_root = data_root
        self.root = os.path.join(data_root, "serving", "crr")
        self._storage = Storage(data_root)
        self._mutex = threading.Lock()

    def _dir(self, tenant: str, kind: str) -> str:
        return os.path.join(self.root, tenant, kind)

    def _path(self, tenant: str, kind: str, rec_id: str) -> str:
        digest = hashlib.sha256(rec_id.encode()).hexdigest()[:40]
        return os.path.join(self._dir(tenant, kind), f"{digest}.json")

    def get(self, tenant: str, kind: str, rec_id: str) -> dict[str, Any] | None:
        try:
            with open(self._path(tenant, kind, rec_id), "rb") as f:
                doc = orjson.loads(f.read())
        except FileNotFoundError:
            return None
        return doc if doc["id"] == rec_id else None

    def count(self, tenant: str, kind: str) -> int:
        try:
            return sum(1 for n in os.listdir(self._dir(tenant, kind)) if n.endswith(".json"))
        except FileNotFoundError:
            return 0

    def put(
        self,
        tenant: str,
        kind: str,
        rec_id: str,
        record: dict[str, Any],
        rid: str | None,
        create_only: bool = False,
    ) -> tuple[dict[str, Any], bool]:
        """Create or update (with the current `rid`); (stored document, created?)."""
        raw = check_record(kind, rec_id, record)
        d = self._dir(tenant, kind)
        os.makedirs(d, exist_ok=True)
        with self._mutex, open(os.path.join(d, ".lock"), "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            current = self.get(tenant, kind, rec_id)
            if current is not None:
                if create_only:
                    raise ProblemError(
                        409,
                        f"{kind[:-1].capitalize()} '{rec_id}' exists; update it with PUT and "
                        "its rid.",
                        code="RECSYS_RECORD_EXISTS",
                        extra={"current_version": current["rid"]},
                    )
                if rid is None:
                    raise ProblemError(
                        428,
                        f"{kind[:-1].capitalize()} '{rec_id}' exists: send its current rid "
                        "(field 'rid' or If-Match) to update it.",
                        extra={"current_version": current["rid"]},
                    )
                if rid != current["rid"]:
                    raise RevisionConflict(current["rid"])
            now = _now()
            doc = {
                "id": rec_id,
                "rid": uuid.uuid4().hex,
                "record": record,
                "created_at": current["created_at"] if current else now,
                "updated_at": now,
            }
            self._land(tenant, kind, raw, doc["rid"])
            self._write(self._path(tenant, kind, rec_id), doc)
        return doc, current is None

    def delete(self, tenant: str, kind: str, rec_id: str, rid: str | None) -> dict[str, Any]:
        d = self._dir(tenant, kind)
        os.makedirs(d, exist_ok=True)
        with self._mutex, open(os.path.join(d, ".lock"), "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            current = self.get(tenant, kind, rec_id)
            if current is None:
                raise ProblemError(404, f"No {kind[:-1]} '{rec_id}'.", code="RECSYS_UNKNOWN_RECORD")
            if rid is not None and rid != current["rid"]:
                raise RevisionConflict(current["rid"])
            if kind == "items":
                gone = {**current["record"], "available": False}
                self._land(tenant, kind, landing_row(kind, rec_id, gone), uuid.uuid4().hex)
            os.unlink(self._path(tenant, kind, rec_id))
            fsync_dir(d)
        return current

    def _land(self, tenant: str, kind: str, raw: pl.DataFrame, rid: str) -> str:
        landing = self._storage.landing_dir(tenant, kind)
        self._storage.makedirs(landing)
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        target = posixpath.join(landing, f"api-crr-{stamp}-{rid[:12]}.parquet")
        write_parquet_atomic(raw, target, self._storage.fs)
        return target

    @staticmethod
    def _write(path: str, doc: dict[str, Any]) -> None:
        write_atomic(path, orjson.dumps(doc))

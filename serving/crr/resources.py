"""The Common Recommender REST API (RecSysWiki; MyMediaLite / LensKit) under /v1/crr.

Users (uid), items (iid) and events (eid); user and item records carry a revision id (rid).
Record writes need the `admin` scope, everything else `recommend`; the tenant is the caller's.

Bodies, queries and replies are the types of `serving.crr.schemas`: the route table
(`serving.routes`) decodes and checks them before a handler runs (400 naming the field), so a
handler reads `req.context.body` / `req.context.query` and checks only what a schema cannot
state (422: the contract's checks of a record or an event, an id differing from the URL's).

Events are read from everything the server knows (`serving.events_log.scan_all_events`: the
validated warehouse, the API's landed files and the durable event log) and written to the
durable event log. Event list filters: ``item`` / ``user`` (repeatable), ``history`` (``all``,
``current`` = the latest event per user and item, or a window ``<n><unit>`` with unit s, min,
h, d, w, m = 30 days, y = 365 days, counted back from now), ``null`` (``false`` drops events
without a value), plus ``limit`` / ``cursor`` paging. Event types in paths may be plural
(``purchases``, ``ratings``).

Predictions are the snapshot's scores (factors: user . item + bias; otherwise the stored
candidate score), not ratings on the tenant's scale; ``useStoredRatings=true`` answers with the
user's latest rating where there is one.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from typing import Any

import falcon
import numpy as np
import orjson
import polars as pl

from recsys.contract import BUILTIN_EVENT_TYPES
from serving.crr.entities import SNAPSHOT_REVISION, EntityView
from serving.crr.records import FIELDS, ID_FIELD, RecordStore, parse_record
from serving.crr.schemas import CrrNewEvent, CrrUserEvent, CrrUserRecord, EventsQuery
from serving.documents import Preconditions, set_etag
from serving.errors import ProblemError
from serving.events_log import EventLogs, scan_all_events
from serving.routing import encodable
from serving.service import RecommendService
from serving.snapshot import LiveSnapshot, SnapshotRegistry

_HISTORY = re.compile(r"^(\d{1,6})(s|min|h|d|w|m|y)$")
_EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC)
_UNIT_S = {
    "s": 1,
    "min": 60,
    "h": 3600,
    "d": 86400,
    "w": 7 * 86400,
    "m": 30 * 86400,
    "y": 365 * 86400,
}


def event_type_of(name: str) -> str:
    """The event type a path or body names (`EventTypeName`): `purchases` -> purchase."""
    return name if name in BUILTIN_EVENT_TYPES else name[:-1]


def _context(text: str | None) -> dict[str, Any] | str | None:
    """An event's context: the object it holds, or an imported event's text when that is
    not a JSON object (the import keeps context as text)."""
    if not text:
        return None
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text
    return value if isinstance(value, dict) else text


def event_json(row: dict[str, Any]) -> dict[str, Any]:
    """An event row (EVENT_SCHEMA) as the API shows it (`serving.crr.schemas.CrrEvent`)."""
    ts: dt.datetime = row["timestamp"]
    secs = ts.timestamp()
    return {
        "eid": row["event_id"],
        "type": row["event_type"],
        "uid": row["user_id"],
        "iid": row["item_id"],
        "timestamp": int(secs) if secs == int(secs) else secs,
        "time": ts.isoformat().replace("+00:00", "Z"),
        "value": row["value"],
        "session_id": row["session_id"],
        "context": _context(row["context"]),
    }


def _as_list(value: list[str] | str | None) -> list[str]:
    """A repeatable query parameter's values (one value decodes as a string)."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else value


class CrrResources:
    """The handlers of the /v1/crr routes (their paths, scopes and types: `serving.routes`)."""

    def __init__(
        self,
        records: RecordStore,
        logs: EventLogs,
        service: RecommendService,
        store: SnapshotRegistry,
    ) -> None:
        self._records = records
        self._logs = logs
        self._service = service
        self._store = store
        self._view = EntityView(records, store)

    # --- events helpers ------------------------------------------------------------------
    def _events(self, tenant: str) -> pl.LazyFrame:
        return scan_all_events(self._logs.data_root, tenant, self._logs.tenant(tenant))

    def _filtered(
        self, req: falcon.Request, tenant: str, by: str, key: str, event_type: str | None
    ) -> pl.DataFrame:
        lf = self._events(tenant).filter(pl.col(by) == key)
        if event_type is not None:
            lf = lf.filter(pl.col("event_type") == event_type)
        query: EventsQuery = req.context.query
        other = "item" if by == "user_id" else "user"
        wanted = _as_list(getattr(query, other))
        if wanted:
            lf = lf.filter(pl.col("item_id" if other == "item" else "user_id").is_in(wanted))
        if not query.null:
            lf = lf.filter(pl.col("value").is_not_null())
        if query.history == "current":
            lf = lf.sort("timestamp").group_by(["user_id", "item_id", "event_type"]).last()
        elif query.history != "all":
            m = _HISTORY.match(query.history)  # (the schema's pattern: it matches)
            now = dt.datetime.now(dt.UTC)
            window = dt.timedelta(seconds=int(m.group(1)) * _UNIT_S[m.group(2)])
            if window < now - _EARLIEST:  # (a longer window holds every event)
                lf = lf.filter(pl.col("timestamp") >= now - window)
        df = lf.sort(["timestamp", "event_id"]).collect()
        if not df.height:
            self._require(tenant, "users" if by == "user_id" else "items", key)
        return df

    def _require(self, tenant: str, kind: str, key: str) -> None:
        """404 for a user or item id with no record, no place in the live snapshot and no
        events: an empty answer would hide a mistyped id or one that is gone."""
        if self._records.get(tenant, kind, key) is not None:
            return
        live = self._store.live(tenant)
        if live is not None:
            idx = live.snap.user_index(key) if kind == "users" else live.item_index(key)
            if idx is not None:
                return
        column = "user_id" if kind == "users" else "item_id"
        if self._events(tenant).filter(pl.col(column) == key).head(1).collect().height:
            return
        raise ProblemError(
            404,
            f"No {kind[:-1]} '{key}': no record, events or snapshot entry.",
            code="RECSYS_UNKNOWN_USER" if kind == "users" else "RECSYS_UNKNOWN_ITEM",
        )

    def _page(self, req: falcon.Request, resp: falcon.Response, df: pl.DataFrame) -> None:
        query: EventsQuery = req.context.query
        limit, offset = query.limit, query.cursor
        page = df.slice(offset, limit)
        nxt = offset + limit if offset + limit < df.height else None
        resp.media = {
            "events": [event_json(r) for r in page.iter_rows(named=True)],
            "total": df.height,
            "next_cursor": str(nxt) if nxt is not None else None,
        }
        resp.cache_control = ["no-store"]

    # --- records -----------------------------------------------------------------------------
    def _record_json(self, kind: str, doc: dict[str, Any]) -> dict[str, Any]:
        record = doc["record"]
        out = {
            ID_FIELD[kind]: doc["id"],
            "rid": doc["rid"],
            **{k: v for k, v in record.items() if k in FIELDS[kind]},
            "created_at": doc["created_at"],
            "updated_at": doc["updated_at"],
        }
        if record.get("features"):
            out["features"] = record["features"]
        return out

    def _send_record(self, resp, kind, doc, created: bool) -> None:
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.media = self._record_json(kind, doc)
        set_etag(resp, doc["rid"])

    def _create(self, req, resp, kind: str) -> None:
        tenant = req.context.principal.tenant
        body = req.context.body
        rec_id, _, record = parse_record(kind, body)
        events = body.events if isinstance(body, CrrUserRecord) else []
        generated = rec_id is None
        rec_id = rec_id or f"{kind[0]}-{time.time_ns():x}"
        doc, _ = self._records.put(tenant, kind, rec_id, record, create_only=True)
        self._send_record(resp, kind, doc, True)
        resp.location = f"/v1/crr/{kind}/{rec_id}"
        if generated:
            resp.media["generated_id"] = True
        if events:
            resp.media["events"] = self._add_events(tenant, rec_id, None, events)

    def _put(self, req, resp, kind: str, rec_id: str) -> None:
        body = req.context.body
        body_id, rid, record = parse_record(kind, body)
        events = body.events if isinstance(body, CrrUserRecord) else []
        if body_id is not None and body_id != rec_id:
            raise ProblemError(422, f"{ID_FIELD[kind]} in the body differs from the URL.")
        pre = Preconditions.of(req).matching(rid)  # (the body's rid, else If-Match)
        tenant = req.context.principal.tenant
        if (
            pre.if_match
            and all(t.startswith(SNAPSHOT_REVISION) for t in pre.if_match)
            and self._records.get(tenant, kind, rec_id) is None
        ):  # (the rid of a view only the snapshot holds: the first record replaces it)
            pre = Preconditions(None, pre.if_none_match)
        doc, created = self._records.put(tenant, kind, rec_id, record, pre)
        self._send_record(resp, kind, doc, created)
        if events:
            resp.media["events"] = self._add_events(
                req.context.principal.tenant, rec_id, None, events
            )

    def _get(self, req, resp, kind: str, rec_id: str) -> None:
        """The entity's one view (`serving.crr.entities`): the snapshot's catalogue row or
        profile overlaid with its record and features."""
        view = self._view.view(req.context.principal.tenant, kind, rec_id)
        if view is None:
            raise ProblemError(404, f"No {kind[:-1]} '{rec_id}'.", code="RECSYS_UNKNOWN_RECORD")
        fields = {k: v for k, v in view["fields"].items() if k != "created_at"}
        resp.media = {
            ID_FIELD[kind]: rec_id,
            "rid": view["rid"],
            **fields,
            "created_at": view["created_at"],
            "updated_at": view["updated_at"],
            "sources": view["sources"],
        }
        if view["features"]:
            resp.media["features"] = view["features"]
        set_etag(resp, view["rid"])

    def _delete(self, req, resp, kind: str, rec_id: str) -> None:
        doc = self._records.delete(
            req.context.principal.tenant, kind, rec_id, Preconditions.of(req)
        )
        resp.media = {ID_FIELD[kind]: rec_id, "rid": doc["rid"], "status": "deleted"}

    def _add_events(
        self,
        tenant: str,
        user_id: str,
        event_type: str | None,
        events: list[CrrNewEvent] | list[CrrUserEvent],
    ) -> list[dict[str, Any]]:
        """Submit a user's events (of `event_type`, else each its own) to the event log; one
        outcome per event, in order (`serving.crr.schemas.CrrEventOutcome`)."""
        bodies, refused = [], {}
        for n, e in enumerate(events):
            if not encodable(e.context):
                refused[n] = {
                    "eid": None,
                    "status": "rejected",
                    "reason": "unparsable",
                    "detail": "context holds an integer beyond 64 bits or nests too deep",
                }
                continue
            body = {
                "user_id": user_id,
                "item_id": e.iid,
                "event_type": event_type_of(event_type or e.type),  # type: ignore[union-attr]
                "timestamp": e.timestamp,
                "value": e.value,
                "session_id": e.session_id,
                "context": e.context,
                "event_id": e.eid,
            }
            bodies.append({k: v for k, v in body.items() if v is not None})
        results = iter(self._logs.tenant(tenant).submit(bodies) if bodies else ())
        out = []
        for n in range(len(events)):
            if n in refused:
                out.append(refused[n])
            else:
                r = next(results)
                out.append(
                    {"eid": r.event_id, "status": r.status, "reason": r.reason, "detail": r.detail}
                )
        return out

    # users
    def on_post_users(self, req, resp) -> None:
        self._create(req, resp, "users")

    def on_put_user(self, req, resp, uid: str) -> None:
        self._put(req, resp, "users", uid)

    def on_get_user(self, req, resp, uid: str) -> None:
        self._get(req, resp, "users", uid)

    def on_delete_user(self, req, resp, uid: str) -> None:
        self._delete(req, resp, "users", uid)

    # items
    def on_post_items(self, req, resp) -> None:
        self._create(req, resp, "items")

    def on_put_item(self, req, resp, iid: str) -> None:
        self._put(req, resp, "items", iid)

    def on_get_item(self, req, resp, iid: str) -> None:
        self._get(req, resp, "items", iid)

    def on_delete_item(self, req, resp, iid: str) -> None:
        self._delete(req, resp, "items", iid)

    # --- events --------------------------------------------------------------------------------
    def on_get_user_events(self, req, resp, uid: str) -> None:
        self._page(
            req, resp, self._filtered(req, req.context.principal.tenant, "user_id", uid, None)
        )

    def on_get_user_events_of(self, req, resp, uid: str, event_type: str) -> None:
        etype = event_type_of(event_type)
        self._page(
            req, resp, self._filtered(req, req.context.principal.tenant, "user_id", uid, etype)
        )

    def on_post_user_events_of(self, req, resp, uid: str, event_type: str) -> None:
        """Add one event (or an array) of this type to the user's history."""
        body = req.context.body
        events = body if isinstance(body, list) else [body]
        results = self._add_events(
            req.context.principal.tenant, uid, event_type_of(event_type), events
        )
        rejected = [r for r in results if r["status"] == "rejected"]
        if not isinstance(body, list):
            r = results[0]
            if rejected:
                raise ProblemError(
                    422,
                    f"The event is invalid ({r['reason']}): {r['detail']}",
                    code="RECSYS_INVALID_EVENT",
                    extra={"reason": r["reason"]},
                )
            resp.status = falcon.HTTP_201 if r["status"] == "accepted" else falcon.HTTP_200
            resp.media = {"eid": r["eid"], "status": r["status"]}
        else:
            resp.media = {"events": results}

    def on_get_current_ratings(self, req, resp, uid: str) -> None:
        tenant = req.context.principal.tenant
        df = (
            self._events(tenant)
            .filter((pl.col("user_id") == uid) & (pl.col("event_type") == "rating"))
            .filter(pl.col("value").is_not_null())
            .sort(["timestamp", "event_id"])
            .group_by("item_id")
            .last()
            .sort("item_id")
            .collect()
        )
        if not df.height:
            self._require(tenant, "users", uid)
        resp.media = {
            "uid": uid,
            "ratings": {i: v for i, v in zip(df["item_id"], df["value"], strict=True)},
        }

    def on_get_item_events(self, req, resp, iid: str) -> None:
        self._page(
            req, resp, self._filtered(req, req.context.principal.tenant, "item_id", iid, None)
        )

    def on_get_item_events_of(self, req, resp, iid: str, event_type: str) -> None:
        etype = event_type_of(event_type)
        self._page(
            req, resp, self._filtered(req, req.context.principal.tenant, "item_id", iid, etype)
        )

    def on_get_event(self, req, resp, eid: str) -> None:
        tenant = req.context.principal.tenant
        tlog = self._logs.tenant(tenant)
        if tlog.is_deleted(eid):
            raise ProblemError(
                410, f"Event '{eid}' was deleted.", title="Gone", code="RECSYS_EVENT_DELETED"
            )
        df = self._events(tenant).filter(pl.col("event_id") == eid).head(1).collect()
        if not df.height:
            raise ProblemError(404, f"No event '{eid}'.", code="RECSYS_UNKNOWN_EVENT")
        resp.media = event_json(df.row(0, named=True))

    def on_delete_event(self, req, resp, eid: str) -> None:
        tlog = self._logs.tenant(req.context.principal.tenant)
        created = tlog.delete(eid)
        resp.media = {"eid": eid, "status": "deleted" if created else "already_deleted"}

    # --- predictions and recommendations ------------------------------------------------------
    def on_get_predictions(self, req, resp, uid: str) -> None:
        tenant = req.context.principal.tenant
        live = self._store.require_live(tenant)
        snap = live.snap
        uidx = snap.user_index(uid)
        query = req.context.query
        wanted, limit = _as_list(query.item), query.limit
        stored = {}
        if query.useStoredRatings or query.usedStoredRatings:
            df = (
                self._events(tenant)
                .filter((pl.col("user_id") == uid) & (pl.col("event_type") == "rating"))
                .filter(pl.col("value").is_not_null())
                .sort(["timestamp", "event_id"])
                .group_by("item_id")
                .last()
                .collect()
            )
            stored = dict(zip(df["item_id"], df["value"], strict=True))
        if uidx is None and not stored:
            raise ProblemError(
                404, f"User '{uid}' is not in the snapshot.", code="RECSYS_UNKNOWN_USER"
            )
        source = "factors" if snap.has_factors and uidx is not None else "candidates"
        truncated = False
        if wanted:
            idx = [live.item_index(i) for i in wanted]
            known = np.asarray([i for i in idx if i is not None], dtype=np.int64)
            values = dict(zip(known.tolist(), self._scores(live, uidx, known), strict=True))
            preds = []
            for iid, i in zip(wanted, idx, strict=True):
                if iid in stored:
                    preds.append({"iid": iid, "value": stored[iid], "source": "rating"})
                else:
                    v = values.get(i) if i is not None else None
                    preds.append(
                        {
                            "iid": iid,
                            "value": v,
                            "source": source if v is not None else None,
                            "known": i is not None,
                        }
                    )
        else:
            if uidx is None:
                order = np.zeros(0, dtype=np.int64)
                scores: list = []
            elif snap.has_factors:
                allv = np.asarray(self._scores(live, uidx, np.arange(snap.n_items)))
                order = np.argsort(-allv, kind="stable")
                scores = allv[order].tolist()
            else:
                c_items, c_score, _, _ = snap.user_candidates(uidx)
                order, scores = np.asarray(c_items), np.asarray(c_score).tolist()
            ids = live.item_ids(order.tolist())
            preds = [
                {
                    "iid": s,
                    "value": stored.get(s, round(float(v), 6)),
                    "source": "rating" if s in stored else source,
                }
                for s, v in zip(ids, scores, strict=True)
            ]
            have = set(ids)
            preds += [
                {"iid": i, "value": v, "source": "rating"}
                for i, v in stored.items()
                if i not in have
            ]
            preds.sort(key=lambda p: -p["value"])
            truncated = len(preds) > limit
            preds = preds[:limit]
        resp.media = {
            "uid": uid,
            "predictions": preds,
            "model": live.algo_version,
            "snapshot_id": live.snapshot_id,
            "truncated": truncated,
        }

    @staticmethod
    def _scores(live: LiveSnapshot, uidx: int | None, items: np.ndarray) -> list[float | None]:
        snap = live.snap
        if uidx is None or not items.size:
            return [None] * int(items.size)
        if snap.has_factors:
            uf = np.asarray(snap.user_factors(uidx), dtype=np.float32)
            v = np.asarray(snap.item_factors)[items] @ uf + np.asarray(snap.item_bias)[items]
            return [round(float(x), 6) for x in v]
        c_items, c_score, _, _ = snap.user_candidates(uidx)
        pos = dict(zip(np.asarray(c_items).tolist(), np.asarray(c_score).tolist(), strict=True))
        return [round(float(pos[i]), 6) if i in pos else None for i in items.tolist()]

    def on_get_recommendations(self, req, resp, uid: str) -> None:
        tenant = req.context.principal.tenant
        query = req.context.query
        body: dict[str, Any] = {"user": {"user_id": uid}}
        if query.count is not None:  # "as many as possible" up to the tenant's limit
            body["k"] = min(query.count, self._service.limits(tenant).max_k)
        if query.surface is not None:
            body["surface"] = query.surface
        result = self._service.recommend(tenant, body, req.context.started)
        result["meta"]["request_id"] = req.context.request_id
        resp.media = {
            "uid": uid,
            "recommendations": [
                {"iid": it["item_id"], "rank": it["rank"], "score": it["score"]}
                for it in result["items"]
            ],
            "meta": result["meta"],
            "warnings": result["warnings"],
        }
        resp.cache_control = ["no-store"]

    # --- statistics -----------------------------------------------------------------------
    @staticmethod
    def _event_stats(df: pl.DataFrame, other: str) -> dict[str, Any]:
        ratings = df.filter((pl.col("event_type") == "rating") & pl.col("value").is_not_null())
        by_type = dict(df.group_by("event_type").len().sort("event_type").iter_rows())
        return {
            "events": df.height,
            "events_by_type": by_type,
            f"distinct_{other}s": df[f"{other}_id"].n_unique(),
            "ratings": ratings.height,
            "mean_rating": round(float(ratings["value"].mean()), 6) if ratings.height else None,
            "first_event": df["timestamp"].min().isoformat().replace("+00:00", "Z")
            if df.height
            else None,
            "last_event": df["timestamp"].max().isoformat().replace("+00:00", "Z")
            if df.height
            else None,
        }

    def on_get_user_statistics(self, req, resp, uid: str) -> None:
        tenant = req.context.principal.tenant
        df = self._events(tenant).filter(pl.col("user_id") == uid).collect()
        live = self._store.require_live(tenant)
        uidx = live.snap.user_index(uid)
        if not df.height:
            self._require(tenant, "users", uid)
        resp.media = {
            "uid": uid,
            "has_record": self._records.get(tenant, "users", uid) is not None,
            "in_snapshot": uidx is not None,
            "candidates": int(np.asarray(live.snap.user_candidates(uidx)[0]).shape[0])
            if uidx is not None
            else 0,
            "seen_in_training": int(np.asarray(live.snap.user_seen(uidx)).shape[0])
            if uidx is not None
            else 0,
            "segment": live.snap.user_segment(uidx) if uidx is not None else None,
            **self._event_stats(df, "item"),
        }

    def on_get_item_statistics(self, req, resp, iid: str) -> None:
        tenant = req.context.principal.tenant
        df = self._events(tenant).filter(pl.col("item_id") == iid).collect()
        live = self._store.require_live(tenant)
        iidx = live.item_index(iid)
        if not df.height:
            self._require(tenant, "items", iid)
        resp.media = {
            "iid": iid,
            "has_record": self._records.get(tenant, "items", iid) is not None,
            "in_catalogue": iidx is not None,
            "available": bool(live.available[iidx]) if iidx is not None else None,
            **self._event_stats(df, "user"),
        }

    def on_get_statistics(self, req, resp) -> None:
        tenant = req.context.principal.tenant
        df = self._events(tenant).collect()
        live = self._store.require_live(tenant)
        stats = self._event_stats(df, "user")
        stats["distinct_items"] = df["item_id"].n_unique()
        resp.media = {
            "tenant_id": tenant,
            "records": {k: self._records.count(tenant, k) for k in ("users", "items")},
            "snapshot": {
                "snapshot_id": live.snapshot_id,
                "model": live.algo_version,
                "users": live.snap.n_users,
                "items": live.snap.n_items,
            },
            **stats,
        }


class CrrEventResources(CrrResources):
    """The event routes' handlers (adding events needs only `recommend`, as /v1/recs/events;
    deleting one needs `admin`: their route table entries say so)."""

"""POST /v1/recs/events, /v1/recs/events/bulk, GET/DELETE /v1/recs/events/{event_id},
POST/GET /v1/recs/feedback and GET /v1/recs/feedback/{feedback_id}.

The tenant is always the caller's (`req.context.principal.tenant`); a body naming another
tenant is rejected by the contract validation (`wrong_tenant`).

An event (the single body, and each line of a bulk body) is decoded as `schemas.Event` by
`parse_bulk`: one that does not conform is rejected with the data contract's reason, like
the faults only the contract's validation can see (422 for a single event, by line in bulk).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import uuid
from typing import Any

import falcon
import msgspec
import orjson

from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.errors import ProblemError
from serving.event_records import ItemResult
from serving.events_log import EventLogs
from serving.feedback_log import FeedbackLog
from serving.recs.schemas import Event, FeedbackRequest, event_reason
from serving.routing import MALFORMED, read_body

#: Lines (events) accepted in one bulk request; the body size limit applies as well.
MAX_BULK_EVENTS = 10_000
_decode_event = msgspec.json.Decoder(Event).decode


def decode_event(raw: bytes) -> dict[str, Any]:
    """A single event body as an API event object; 400 when it is not a JSON object, 422
    with the contract's reason when it is not an `Event`."""
    if not raw:
        raise ProblemError(400, "The request needs a JSON body.")
    try:
        return msgspec.to_builtins(_decode_event(raw))
    except msgspec.ValidationError as e:
        if str(e).startswith("Expected `object`"):
            raise ProblemError(
                400, "An event is a JSON object; use /v1/recs/events/bulk for many."
            ) from None
        reason, detail = event_reason(e)
        raise _invalid_event(reason, detail) from None
    except msgspec.DecodeError:
        raise ProblemError(400, "The body is not valid JSON.", code=MALFORMED) from None


def _invalid_event(reason: str | None, detail: str | None) -> ProblemError:
    return ProblemError(
        422,
        f"The event is invalid ({reason}): {detail}",
        code="RECSYS_INVALID_EVENT",
        extra={"reason": reason},
    )


_decode_array = msgspec.json.Decoder(list[msgspec.Raw]).decode


def _event_of(raw: Any) -> dict[str, Any] | ItemResult:
    """One bulk line's event object (the fields it gives), or its rejection: not JSON, or
    not an `Event` (with the contract's reason)."""
    try:
        return msgspec.to_builtins(_decode_event(raw))
    except msgspec.ValidationError as e:
        reason, detail = event_reason(e)
        return ItemResult("rejected", reason=reason, detail=detail)
    except msgspec.DecodeError as e:
        return ItemResult("rejected", reason="unparsable", detail=f"not JSON: {e}")


def _is_one_json(body: bytes) -> bool:
    try:
        orjson.loads(body)  # (an NDJSON body fails at the end of its first line)
    except orjson.JSONDecodeError:
        return False
    return True


def parse_bulk(data: bytes) -> list[dict[str, Any] | ItemResult]:
    """Per event of a bulk body (a JSON array of events, one event, or NDJSON: one event per
    line, blank lines ignored), its event object or its rejection (`_event_of`). 400 for an
    empty body, a JSON value that is neither an array nor an object, or a body none of whose
    lines is JSON; 413 beyond MAX_BULK_EVENTS."""
    body = data.strip()
    if not body:
        raise ProblemError(400, "The bulk body holds no events.")
    chunks: list[Any] | None = None
    if body[:1] == b"[":
        with contextlib.suppress(msgspec.DecodeError):  # (not one array: read as NDJSON)
            chunks = _decode_array(body)
    elif body[:1] == b"{" and (b"\n" not in body or _is_one_json(body)):
        chunks = [body]  # one event, on one line or several
    if chunks is None:
        chunks = [line for line in body.split(b"\n") if line.strip()]
        if len(chunks) == 1 and _is_one_json(body):
            raise ProblemError(400, "A bulk body is a JSON array of events, an event, or NDJSON.")
    if not chunks:
        raise ProblemError(400, "The bulk body holds no events.")
    if len(chunks) > MAX_BULK_EVENTS:
        raise ProblemError(
            413, f"{len(chunks)} events in one request; the limit is {MAX_BULK_EVENTS}."
        )
    events = list(map(_event_of, chunks))
    if all(type(e) is ItemResult and e.detail.startswith("not JSON") for e in events):
        raise ProblemError(
            400, "The body is neither JSON nor NDJSON: no line of it is JSON.", code=MALFORMED
        )
    return events


def _result_json(r: ItemResult) -> dict[str, Any]:
    out: dict[str, Any] = {"status": r.status}
    if r.event_id is not None:
        out["event_id"] = r.event_id
    if r.reason is not None:
        out["reason"], out["detail"] = r.reason, r.detail
    return out


class EventsResource:
    """One event (on_post) or many (on_post_bulk), durable before the response."""

    required_scope = SCOPE_RECOMMEND
    accepted_media = ("application/json", "application/x-ndjson")

    def __init__(self, logs: EventLogs) -> None:
        self._logs = logs

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        event = decode_event(read_body(req))
        result = self._logs.tenant(req.context.principal.tenant).submit([event])[0]
        if result.status == "rejected":
            raise _invalid_event(result.reason, result.detail)
        resp.status = falcon.HTTP_201 if result.status == "accepted" else falcon.HTTP_200
        resp.data = orjson.dumps(_result_json(result))  # JSON, without the media handler
        resp.cache_control = ["no-store"]

    def on_post_bulk(self, req: falcon.Request, resp: falcon.Response) -> None:
        items = parse_bulk(read_body(req))
        todo = [i for i, item in enumerate(items) if type(item) is not ItemResult]
        results: list[Any] = list(items)
        if todo:
            done = self._logs.tenant(req.context.principal.tenant).submit([items[i] for i in todo])
            for i, r in zip(todo, done, strict=True):
                results[i] = r
        counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
        errors = []
        for line, r in enumerate(results, start=1):
            counts[r.status] += 1
            if r.status == "rejected":
                errors.append({"line": line, "reason": r.reason, "detail": r.detail})
        resp.media = {
            "received": len(items),
            "accepted": counts["accepted"],
            "duplicates": counts["duplicate"],
            "rejected": counts["rejected"],
            "errors": errors,
            "event_ids": [r.event_id for r in results],
        }
        resp.cache_control = ["no-store"]


class EventResource:
    """Read one event back; delete it (admin) by appending a tombstone."""

    required_scope = {"GET": SCOPE_RECOMMEND, "DELETE": SCOPE_ADMIN}

    def __init__(self, logs: EventLogs) -> None:
        self._logs = logs

    def on_get(self, req: falcon.Request, resp: falcon.Response, event_id: str) -> None:
        event, deleted_at = self._logs.tenant(req.context.principal.tenant).get(event_id)
        if deleted_at is not None:
            raise ProblemError(
                410, f"Event '{event_id}' was deleted.", title="Gone", code="RECSYS_EVENT_DELETED"
            )
        if event is None:
            raise ProblemError(
                404,
                f"No event '{event_id}' in the event log, landing or the warehouse.",
                code="RECSYS_UNKNOWN_EVENT",
            )
        resp.media = event
        resp.cache_control = ["no-store"]

    def on_delete(self, req: falcon.Request, resp: falcon.Response, event_id: str) -> None:
        tlog = self._logs.tenant(req.context.principal.tenant)
        event, _ = tlog.get(event_id)
        created = tlog.delete(event_id)
        resp.media = {
            "event_id": event_id,
            "status": "deleted" if created else "already_deleted",
            "known": event is not None,
        }


class FeedbackResource:
    """Human labels: submit one (on_post), list them (on_get), read one (on_get_one)."""

    required_scope = SCOPE_RECOMMEND

    def __init__(self, data_root: str) -> None:
        self._root = data_root
        self._logs: dict[str, FeedbackLog] = {}
        self._lock = threading.Lock()

    def _log(self, tenant: str) -> FeedbackLog:
        with self._lock:
            flog = self._logs.get(tenant)
            if flog is None:
                flog = self._logs[tenant] = FeedbackLog(self._root, tenant)
            return flog

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body: FeedbackRequest = req.context.body
        label: dict[str, Any] = {"user_id": body.user_id, "item_id": body.item_id}
        for name in ("source", "note"):
            if (value := getattr(body, name)) is not None:
                label[name] = value
        label["label"] = body.label
        if body.confidence is not None:
            label["confidence"] = body.confidence
        label["id"] = body.feedback_id or uuid.uuid4().hex
        label["created_at"] = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        rec, created = self._log(req.context.principal.tenant).add(label)
        resp.status = falcon.HTTP_201 if created else falcon.HTTP_200
        resp.media = _label_json(rec)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        query = req.context.query
        labels = self._log(req.context.principal.tenant).all()
        for name in ("user_id", "item_id", "label", "source"):
            value = getattr(query, name)
            if value is not None:
                labels = [r for r in labels if r.get(name) == value]
        limit, offset = query.limit, query.cursor
        page = labels[offset : offset + limit]
        nxt = offset + limit if offset + limit < len(labels) else None
        resp.media = {
            "items": [_label_json(r) for r in page],
            "total": len(labels),
            "next_cursor": str(nxt) if nxt is not None else None,
        }

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, feedback_id: str) -> None:
        rec = self._log(req.context.principal.tenant).get(feedback_id)
        if rec is None:
            raise ProblemError(404, f"No feedback '{feedback_id}'.", code="RECSYS_UNKNOWN_FEEDBACK")
        resp.media = _label_json(rec)


def _label_json(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in rec.items() if k not in ("k", "id")}
    return {"feedback_id": rec["id"], **out}

"""``GET /v1/recs/events/stream``: the tenant's processed events as Server-Sent Events.

What is streamed: every event the API accepted into the tenant's event log
(``serving/events/<tenant>/wal``, `serving.events_log`) - validated by the data contract,
deduplicated, fsync'd before its request was answered - as ``event: event`` with the contract
event as JSON, and deletions as ``event: deleted`` (``{"event_id"}``).

Each message's ``id`` is its place in the log, ``<segment>.<offset after it>``: a client that
reconnects with ``Last-Event-ID`` (or ``?last_event_id=``) gets every message after it, none
twice. Without one it gets the events from now on (``?from=start``: from the oldest still in
the log). Segments leave the log once landed as Parquet (every `events_flush_s`); a resume point
older than the log sends ``event: reset`` (the events in between are in the warehouse) and
continues from the oldest segment.

How: the response body is an iterator that reads the log's segment files from its position
every `POLL_S` (20 ms) - the records any worker appended, framed and CRC-checked
(`serving.segment_log.frames`; a frame still being written is read on the next look) - and
writes a comment line (``: heartbeat``) after `heartbeat` seconds without a message, so
proxies and clients see a live connection. A connection ends after ``max_s`` seconds (the
client reconnects with its Last-Event-ID; EventSource does so by itself after ``retry``).

Connections: each open stream holds one request thread of its worker for its whole life, so the
server must run threaded workers - gunicorn ``--worker-class gthread --threads N`` or granian
(``recsys serve --threads N``) - and a worker takes at most `MAX_STREAMS_PER_WORKER` streams
(503 with Retry-After beyond), leaving its other threads to the API. A worker with one thread
(gunicorn's sync workers: ``recsys serve`` without ``--threads``; ``wsgi.multithread`` false)
answers 503: a stream would hold its only thread.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import falcon
import msgspec
import orjson
from msgspec import Meta

from recsys.contract import PATTERN_END
from serving.auth import SCOPE_ADMIN
from serving.errors import ProblemError
from serving.routing import Route
from serving.segment_log import frames, list_segments, segment_name

#: Seconds between looks at the log.
POLL_S = 0.02
#: Open streams a worker serves at once.
MAX_STREAMS_PER_WORKER = 8
_EVENT_ID = re.compile(r"^(\d{1,12})\.(\d{1,15})" + PATTERN_END)


class StreamQuery(msgspec.Struct, omit_defaults=True):
    from_: Literal["now", "start"] = msgspec.field(default="now", name="from")
    last_event_id: (
        Annotated[str, Meta(max_length=32, pattern=r"^\d{1,12}\.\d{1,15}" + PATTERN_END)] | None
    ) = None
    heartbeat: Annotated[float, Meta(ge=0.05, le=60, description="seconds")] = 15.0
    max_s: Annotated[float, Meta(ge=0.1, le=3600, description="seconds")] = 300.0


ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/recs/events/stream",
        ("event_stream", "on_get"),
        "Server-Sent Events of the tenant's processed events (resume with Last-Event-ID)",
        SCOPE_ADMIN,
        query=StreamQuery,
        response=str,
        response_media="text/event-stream",
        headers=("Last-Event-ID",),
        errors=(422, 503),
        tags=("events",),
    ),
)


class EventStreamResource:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self._open = 0
        self._lock = threading.Lock()

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        query: StreamQuery = req.context.query
        last = req.get_header("Last-Event-ID") or query.last_event_id
        position = None
        if last:
            match = _EVENT_ID.match(last.strip())
            if match is None:
                raise ProblemError(
                    422,
                    f"Last-Event-ID '{last[:40]}' is not an id this stream sent.",
                    code="RECSYS_BAD_EVENT_ID",
                )
            position = (int(match.group(1)), int(match.group(2)))
        if not req.env.get("wsgi.multithread"):
            raise ProblemError(
                503,
                "The event stream needs a threaded worker (gunicorn gthread or granian); this "
                "worker has one thread, which a stream would hold for its whole life.",
                code="RECSYS_STREAMS_NEED_THREADS",
            )
        with self._lock:
            if self._open >= MAX_STREAMS_PER_WORKER:
                raise ProblemError(
                    503,
                    f"This worker serves {MAX_STREAMS_PER_WORKER} streams already.",
                    code="RECSYS_STREAMS_FULL",
                    headers={"Retry-After": "5"},
                )
            self._open += 1
        try:
            wal = self._ctx.event_logs.tenant(tenant).log.wal_dir
            stream = EventStream(
                wal, tenant, position, query.from_, query.heartbeat, query.max_s, self._release
            )
        except BaseException:
            self._release()
            raise
        resp.content_type = "text/event-stream"
        resp.cache_control = ["no-store"]
        resp.set_header("X-Accel-Buffering", "no")
        resp.stream = stream

    def _release(self) -> None:
        with self._lock:
            self._open -= 1


class Tail:
    """A reader of a segment log from a position (segment, offset); segment None: the first
    segment that exists."""

    def __init__(self, wal_dir: str, position: tuple[int, int] | None, start: str) -> None:
        self.wal = wal_dir
        segments = list_segments(wal_dir)
        self.seg: int | None
        if position is not None:
            self.seg, self.off = position
        elif start == "start" or not segments:
            self.seg, self.off = (segments[0] if segments else None), 0
        else:  # now: after what the active segment holds
            self.seg = segments[-1]
            self.off = self._valid_end(self.seg)

    def _valid_end(self, seg: int) -> int:
        try:
            with open(os.path.join(self.wal, segment_name(seg)), "rb") as f:
                return frames(f.read())[1]
        except FileNotFoundError:
            return 0

    def read(self) -> list[tuple[str, dict[str, Any] | None]]:
        """The records after the position, as (id, record); a None record says the position
        had left the log (landed) and the reader went on from the oldest segment."""
        out: list[tuple[str, dict[str, Any] | None]] = []
        while True:
            if self.seg is None:
                segments = list_segments(self.wal)
                if not segments:
                    return out
                self.seg, self.off = segments[0], 0
            try:
                with open(os.path.join(self.wal, segment_name(self.seg)), "rb") as f:
                    f.seek(self.off)
                    data = f.read()
            except FileNotFoundError:
                segments = list_segments(self.wal)
                if segments and self.seg < segments[0]:
                    out.append((f"{segments[0]}.0", None))
                    self.seg, self.off = segments[0], 0
                    continue
                newer = [n for n in segments if n > self.seg]
                if newer and self.off == 0:  # (a gap: go on with the next one)
                    self.seg = newer[0]
                    continue
                return out  # (not created yet)
            payloads, end = frames(data)
            ended = False
            for pos, payload in payloads:
                rec = orjson.loads(payload)
                if rec.get("k") == "end":
                    ended = True
                    break
                out.append((f"{self.seg}.{self.off + pos + 8 + len(payload)}", rec))
            if not ended:
                self.off += end
                return out
            self.seg, self.off = self.seg + 1, 0


class EventStream:
    """The response body: SSE messages as bytes, ended by `max_s` or the client."""

    def __init__(
        self,
        wal_dir: str,
        tenant: str,
        position: tuple[int, int] | None,
        start: str,
        heartbeat_s: float,
        max_s: float,
        release,
    ) -> None:
        from serving.event_records import record_to_event  # (Polars: only the readers)

        self._to_event = record_to_event
        self._tail = Tail(wal_dir, position, start)
        self._tenant = tenant
        self._heartbeat = heartbeat_s
        self._deadline = time.monotonic() + max_s
        self._release = release
        self._closed = False
        self._first = True

    def __iter__(self) -> Iterator[bytes]:
        return self._messages()

    def _messages(self) -> Iterator[bytes]:
        try:
            yield b"retry: 1000\n: stream of processed events\n\n"
            quiet_since = time.monotonic()
            while not self._closed:
                now = time.monotonic()
                if now >= self._deadline:
                    return
                batch = self._tail.read()
                if batch:
                    yield b"".join(self._message(eid, rec) for eid, rec in batch)
                    quiet_since = now
                elif now - quiet_since >= self._heartbeat:
                    yield b": heartbeat\n\n"
                    quiet_since = now
                else:
                    time.sleep(POLL_S)
        finally:
            self.close()

    def _message(self, eid: str, rec: dict[str, Any] | None) -> bytes:
        if rec is None:
            data = {"reason": "the resume point has left the log (landed); continuing at its start"}
            return b"id: " + eid.encode() + b"\nevent: reset\ndata: " + orjson.dumps(data) + b"\n\n"
        kind = rec.get("k")
        if kind == "e":
            name, data = b"event", self._to_event(rec, self._tenant)
        elif kind == "t":
            name, data = b"deleted", {"event_id": rec["id"]}
        else:  # (another kind of record: its position still advances the id)
            return b"id: " + eid.encode() + b"\n\n"
        return (
            b"id: "
            + eid.encode()
            + b"\nevent: "
            + name
            + b"\ndata: "
            + orjson.dumps(data)
            + b"\n\n"
        )

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._release()

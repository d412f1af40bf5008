"""GET /v1/recs/events/stream: Server-Sent Events of the tenant's processed events, through a
real gunicorn with threaded workers (gthread), as a downstream consumer reads them.

Events are POSTed to /v1/recs/events (answered after the fsync: the acknowledgement); the
stream must deliver each once, in order, resume after a Last-Event-ID with nothing lost or
repeated, send heartbeats, and cap its connections per worker. The delay from acknowledgement
to delivery is printed (p50 / p99).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serving"))

from servers import gunicorn, serving  # noqa: E402
from serving_helpers import SECRET, auth, build_client, make_config, publish_tiny, token  # noqa: E402

from serving.control import eventstream  # noqa: E402

ADMIN = ("recommend", "admin")


class SSE:
    """A stream's messages, read by a thread: (receipt time, id, event name, data)."""

    def __init__(self, url: str, headers: dict) -> None:
        self.messages: list[tuple[float, str | None, str | None, object]] = []
        self.comments = 0
        self.status: int | None = None
        self.done = threading.Event()
        self._resp = None
        req = urllib.request.Request(url, headers=headers)
        self._thread = threading.Thread(target=self._read, args=(req,), daemon=True)
        self._thread.start()

    def _read(self, req) -> None:
        try:
            self._resp = urllib.request.urlopen(req, timeout=60)
            self.status = self._resp.status
            fields: dict[str, str] = {}
            for raw in self._resp:
                line = raw.decode().rstrip("\n")
                if not line:
                    if "data" in fields or "event" in fields:
                        data = orjson.loads(fields["data"]) if "data" in fields else None
                        self.messages.append(
                            (time.monotonic(), fields.get("id"), fields.get("event"), data)
                        )
                    fields = {}
                elif line.startswith(":"):
                    self.comments += 1
                else:
                    name, _, value = line.partition(":")
                    fields[name] = value[1:] if value.startswith(" ") else value
        except urllib.error.HTTPError as e:
            self.status = e.code
        except Exception:  # noqa: BLE001 (the connection closed)
            pass
        finally:
            self.done.set()

    def events(self) -> list:
        return [m for m in self.messages if m[2] == "event"]

    def wait_for(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events()) < n and time.monotonic() < deadline and not self.done.is_set():
            time.sleep(0.01)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stream"))
    publish_tiny(root, "acme", "a")
    publish_tiny(root, "globex", "g")
    env = {
        **os.environ,
        "RECSYS_DATA_ROOT": root,
        "RECSYS_JWT_SECRET": SECRET,
        "RECSYS_ACCESS_LOG": "0",
        "RECSYS_EVENTS_FLUSH_S": "3600",
        "RECSYS_RATE_LIMIT": "1000000/60",
        "RECSYS_TENANT_RATE_LIMIT": "1000000/60",
    }
    proc, url = gunicorn(env, workers=2, threads=12)  # (gthread: a stream holds a thread)
    with serving(proc, url, "/healthz", timeout=180) as base:
        yield base


def post_event(base: str, tenant: str, n: int) -> float:
    """POST one event; the time its acknowledgement arrived."""
    body = {"user_id": f"u{n}", "item_id": f"x{n}", "type": "click", "event_id": f"{tenant}-{n}"}
    req = urllib.request.Request(
        base + "/v1/recs/events",
        data=orjson.dumps(body),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token(tenant)}"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status in (200, 201), r.read()
        r.read()
    return time.monotonic()


def stream_url(base: str, **params) -> str:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"{base}/v1/recs/events/stream" + (f"?{query}" if query else "")


@pytest.mark.slow
def test_events_are_delivered_once_in_order_with_the_delay_measured(server):
    headers = {"Authorization": f"Bearer {token('acme', ADMIN)}"}
    stream = SSE(stream_url(server, max_s=60), headers)
    other = SSE(stream_url(server, max_s=60), {"Authorization": f"Bearer {token('globex', ADMIN)}"})
    time.sleep(1.0)  # (both connected)
    acks = [post_event(server, "acme", n) for n in range(200)]
    post_event(server, "globex", 0)
    stream.wait_for(200)
    got = stream.events()
    assert [m[3]["event_id"] for m in got] == [f"acme-{n}" for n in range(200)]
    assert all(m[3]["tenant"] == "acme" and m[3]["event_type"] == "click" for m in got)
    ids = [m[1] for m in got]
    assert len(set(ids)) == 200
    delays = sorted((m[0] - ack) * 1000 for m, ack in zip(got, acks, strict=True))
    p50, p99 = delays[len(delays) // 2], delays[int(len(delays) * 0.99) - 1]
    poll_ms = eventstream.POLL_S * 1000
    print(f"\nSSE delay from acknowledgement to delivery: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
          f"(min {delays[0]:.1f}, max {delays[-1]:.1f}; poll every {poll_ms:g} ms)")  # fmt: skip
    assert p99 < 1000
    other.wait_for(1)
    assert [m[3]["event_id"] for m in other.events()] == ["globex-0"]  # its own only

    # resume: events posted while disconnected arrive after the Last-Event-ID, none twice
    last = ids[149]
    acks = [post_event(server, "acme", n) for n in range(200, 230)]
    again = SSE(stream_url(server, max_s=60), {**headers, "Last-Event-ID": last})
    again.wait_for(80)
    assert [m[3]["event_id"] for m in again.events()] == [
        f"acme-{n}" for n in [*range(150, 200), *range(200, 230)]
    ]
    # a deletion is streamed too
    req = urllib.request.Request(
        server + "/v1/recs/events/acme-3", headers=headers, method="DELETE"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(m[2] == "deleted" for m in stream.messages):
        time.sleep(0.02)
    assert [m[3] for m in stream.messages if m[2] == "deleted"] == [{"event_id": "acme-3"}]


@pytest.mark.slow
def test_heartbeats_replay_from_start_and_the_end_of_a_stream(server):
    headers = {"Authorization": f"Bearer {token('globex', ADMIN)}"}
    post_event(server, "globex", 1)
    stream = SSE(stream_url(server, heartbeat=0.2, max_s=1.5, **{"from": "start"}), headers)
    assert stream.done.wait(30), "the stream did not end at max_s"
    assert stream.status == 200
    assert [m[3]["event_id"] for m in stream.events()][:2] == ["globex-0", "globex-1"]
    assert stream.comments >= 4  # (the opening comment and heartbeats every 0.2 s)


@pytest.mark.slow
def test_connections_are_capped_per_worker(server):
    headers = {"Authorization": f"Bearer {token('acme', ADMIN)}"}
    cap = eventstream.MAX_STREAMS_PER_WORKER
    streams = [SSE(stream_url(server, max_s=8), headers) for _ in range(2 * cap + 4)]
    time.sleep(3)
    statuses = [s.status for s in streams]
    # at most 2 workers x cap streams are served (as the connections fell to the workers);
    # the rest are refused with 503 (and Retry-After)
    assert cap <= statuses.count(200) <= 2 * cap, statuses
    assert statuses.count(503) == len(streams) - statuses.count(200) >= 4, statuses
    # the API keeps answering while the streams are open
    with urllib.request.urlopen(server + "/healthz", timeout=10) as r:
        assert r.status == 200


def test_stream_refuses_a_malformed_last_event_id_and_other_tenants(tmp_path):
    root = str(tmp_path / "root")
    publish_tiny(root, "acme", "a")
    client = build_client(make_config(root))
    bad = client.simulate_get(
        "/v1/recs/events/stream", headers=auth("acme", ADMIN, **{"Last-Event-ID": "x-1"})
    )
    assert bad.status_code == 422
    assert client.simulate_get("/v1/recs/events/stream").status_code == 401
    org = auth("acme", ADMIN, **{"X-Org-Id": "globex"})
    assert client.simulate_get("/v1/recs/events/stream", headers=org).status_code == 403
    assert client.simulate_get("/v1/recs/events/stream", headers=auth("acme")).status_code == 403
    # (the test client's environ says one thread, as gunicorn's sync worker does)
    single = client.simulate_get("/v1/recs/events/stream", headers=auth("acme", ADMIN))
    assert single.status_code == 503 and single.json["code"] == "RECSYS_STREAMS_NEED_THREADS"

"""Connectors: the stream (NATS JetStream, the local server), files (fsspec folder) and polled
HTTP JSON types, from a stored connector document to landing files.

The stream tests publish 100k events to a fresh stream and check that the landing files hold
each exactly once (and the malformed messages as rejects with reasons), in one run and across
a kill -9 of ``recsys connectors run`` mid-way; they print the throughput. They need the NATS
server on 127.0.0.1:4222 with JetStream (`services` marker; skipped with a message without it).
"""

from __future__ import annotations

import asyncio
import glob
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.connectors import (
    ConnectorError,
    check_spec,
    field_layers,
    land_messages,
    load_state,
    run_connector,
)
from serving.documents import DocumentStore

REPO = Path(__file__).resolve().parents[2]
NATS_URL = "nats://127.0.0.1:4222"
N_EVENTS = 100_000
BAD = [b"not json", b"\xff\xfe\x00", b"[1, 2]", b'{"user_id": ']


def store_connector(root: str, tenant: str, cid: str, kind: str, target: str, config: dict):
    docs = DocumentStore(os.path.join(root, "serving")).collection("connectors", prefix="conn")
    body = {"type": kind, "target": target, "config": check_spec(kind, target, config)}
    return docs.create(tenant, cid, {"name": cid, **body})


def landed(root: str, tenant: str, kind: str = "events") -> tuple[pl.DataFrame, pl.DataFrame]:
    folder = os.path.join(root, "landing", tenant, kind)
    files = sorted(glob.glob(os.path.join(folder, "*.parquet")))
    rows = [f for f in files if not f.endswith(".rejected.parquet")]
    rejects = [f for f in files if f.endswith(".rejected.parquet")]
    return (  # (items and users land one file a field set: columns differ between files)
        pl.concat([pl.read_parquet(f) for f in rows], how="diagonal") if rows else pl.DataFrame(),
        pl.read_parquet(rejects) if rejects else pl.DataFrame(),
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- NATS JetStream ------------------------------------------------------------------------------
def _nats_up() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 4222), timeout=1):
            return True
    except OSError:
        return False


needs_nats = pytest.mark.skipif(
    not _nats_up(), reason="needs a NATS server with JetStream on 127.0.0.1:4222"
)


async def _publish(stream: str, subject: str, messages: list[bytes]) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[subject])
    for start in range(0, len(messages), 1000):  # (a loaded machine: generous ack timeouts)
        chunk = messages[start : start + 1000]
        await asyncio.gather(*(js.publish(subject, m, timeout=60) for m in chunk))
    info = await js.stream_info(stream)
    assert info.state.messages == len(messages)
    await nc.close()


async def _drop(stream: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    await nc.jetstream().delete_stream(stream)
    await nc.close()


@pytest.fixture
def stream():
    """A fresh stream holding N_EVENTS events with the malformed messages of BAD among them:
    (stream, subject, event ids); deleted afterwards."""
    name = f"RECSYS_TEST_{uuid.uuid4().hex[:8]}"
    subject = f"recsys.test.{name.lower()}"
    messages = [
        json.dumps(
            {
                "event_id": f"e{i:06d}",
                "user_id": f"u{i % 997}",
                "item_id": f"i{i % 401}",
                "event_type": "view",
                "timestamp": "2026-11-30T10:00:00Z",
            }
        ).encode()
        for i in range(N_EVENTS)
    ]
    for k, bad in enumerate(BAD):  # spread through the stream
        messages.insert((k + 1) * N_EVENTS // (len(BAD) + 1), bad)
    asyncio.run(_publish(name, subject, messages))
    yield name, subject
    asyncio.run(_drop(name))


def check_exactly_once(root: str, tenant: str) -> None:
    rows, rejects = landed(root, tenant)
    assert rows.height == N_EVENTS, rows.height
    assert rows["event_id"].n_unique() == N_EVENTS
    assert rejects.height == len(BAD)
    assert set(rejects["reason"]) == {"unparsable", "bad_encoding"}


@pytest.mark.services
@pytest.mark.slow
@needs_nats
def test_stream_lands_100k_events_exactly_once(tmp_path, stream):
    root, (name, subject) = str(tmp_path), stream
    store_connector(
        root, "acme", "clicks", "nats", "events",
        {"servers": NATS_URL, "stream": name, "subject": subject, "batch": 5000},
    )  # fmt: skip
    lines: list[str] = []
    started = time.perf_counter()
    summary = run_connector(root, "acme", "clicks", lines.append, idle_s=1.0)
    took = time.perf_counter() - started - 1.0  # (the idle wait that ends the run)
    check_exactly_once(root, "acme")
    assert summary.rows == N_EVENTS and summary.rejects == len(BAD)
    assert load_state(root, "acme", "clicks")["landed_seq"] == N_EVENTS + len(BAD)
    print(
        f"\nstream connector: {N_EVENTS:,} events in {took:.1f} s = {N_EVENTS / took:,.0f}/s "
        f"(batches of 5000, fsync per batch; load {os.getloadavg()[0]:.1f})"
    )
    # a second run finds nothing new and lands nothing
    again = run_connector(root, "acme", "clicks", lines.append, idle_s=0.5)
    assert again.rows == 0 and again.landed_files == []
    check_exactly_once(root, "acme")


@pytest.mark.services
@pytest.mark.slow
@needs_nats
def test_stream_exactly_once_across_kill9(tmp_path, stream):
    root, (name, subject) = str(tmp_path), stream
    store_connector(
        root, "acme", "clicks", "nats", "events",
        {"servers": NATS_URL, "stream": name, "subject": subject, "batch": 2000},
    )  # fmt: skip
    cmd = [sys.executable, "-m", "recsys.cli", "connectors", "run", "clicks"]
    cmd += ["--tenant", "acme", "--data-root", root, "--idle", "1"]
    folder = os.path.join(root, "landing", "acme", "events")
    kills = 0
    started = time.perf_counter()
    for at_files in (5, 20):  # kill twice: after a few batches, and later
        proc = subprocess.Popen(
            cmd, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(folder) and len(os.listdir(folder)) >= at_files:
                break
            time.sleep(0.005)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert kills == 2
    check_exactly_once(root, "acme")
    assert "recreated to start after" in done.stderr or "consuming" in done.stderr
    print(
        f"\nstream connector: {N_EVENTS:,} events exactly once across {kills} kill -9, "
        f"{took:.1f} s in all (load {os.getloadavg()[0]:.1f})"
    )


def test_unreachable_stream_fails_the_run_with_a_clear_message(tmp_path):
    root = str(tmp_path)
    url = f"nats://127.0.0.1:{closed_port()}"
    store_connector(root, "acme", "gone", "nats", "events", {"servers": url, "stream": "S",
                                                             "subject": "s"})  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(ConnectorError, match="unreachable"):
        run_connector(root, "acme", "gone", lambda line: None, connect_timeout_s=1.0)
    assert time.perf_counter() - started < 10
    assert not os.path.exists(os.path.join(root, "landing"))


# --- files ---------------------------------------------------------------------------------------
def test_files_connector_imports_new_and_changed_files_once(tmp_path):
    root, src = str(tmp_path / "data"), tmp_path / "drop"
    src.mkdir()
    header = "user_id,item_id,event_type,timestamp\n"
    (src / "a.csv").write_text(header + "u1,i1,view,2026-11-30T10:00:00Z\n")
    (src / "b.csv").write_text(header + 'u2,"i2,view,2026-11-30T10:00:00Z\nu3,i3,view,2026\n')
    (src / "empty.csv").write_text("")
    (src / "notes.txt").write_text("not matched")
    store_connector(root, "acme", "drop", "files", "events", {"url": str(src), "pattern": "*.csv"})
    lines: list[str] = []
    first = run_connector(root, "acme", "drop", lines.append)
    assert first.rows == 2 and len(first.landed_files) == 2
    assert any("empty.csv: not imported" in line for line in lines)
    rows, rejects = landed(root, "acme")
    assert sorted(rows["user_id"]) == ["u1", "u3"] and rejects.height == 1
    second = run_connector(root, "acme", "drop", lines.append)
    assert second.rows == 0 and second.skipped == 3
    (src / "a.csv").write_text(header + "u1,i1,view,2026-11-30T10:00:00Z\nu4,i4,click,2026\n")
    third = run_connector(root, "acme", "drop", lines.append)
    assert third.rows == 2 and third.skipped == 2


def test_files_connector_on_a_missing_folder_fails_clearly(tmp_path):
    root = str(tmp_path)
    for n, url in enumerate(("memory://nowhere/at/all", str(tmp_path / "missing"))):
        store_connector(root, "acme", f"x{n}", "files", "items", {"url": url})
        with pytest.raises(ConnectorError, match="cannot list .*no such folder"):
            run_connector(root, "acme", f"x{n}", lambda line: None)


# --- HTTP ----------------------------------------------------------------------------------------
class JsonService:
    def __init__(self, doc) -> None:
        self.doc = doc
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps(service.doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/products"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_http_connector_polls_records_and_lands_changes_once(tmp_path):
    root = str(tmp_path)
    items = [{"sku": "p1", "title": "Shoe", "price": 10}, "garbage", {"sku": "p2", "price": 3}]
    service = JsonService({"data": {"items": items}})
    try:
        store_connector(
            root, "acme", "catalog", "http", "items",
            {"url": service.url, "records_path": "data.items", "map": {"sku": "item_id"}},
        )  # fmt: skip
        first = run_connector(root, "acme", "catalog", lambda line: None)
        assert first.rows == 2 and first.rejects == 1
        rows, rejects = landed(root, "acme", "items")
        assert sorted(rows["item_id"]) == ["p1", "p2"] and rejects["reason"][0] == "unparsable"
        assert run_connector(root, "acme", "catalog", lambda line: None).landed_files == []
        service.doc = {"data": {"items": [{"sku": "p3"}]}}
        assert run_connector(root, "acme", "catalog", lambda line: None).rows == 1
    finally:
        service.close()
    # the service is gone: the run fails with its reason
    with pytest.raises(ConnectorError, match="unreachable"):
        run_connector(root, "acme", "catalog", lambda line: None)


def test_field_layers_keep_each_ids_messages_in_order():
    """Known answers: one file a field set, the fewest that keep every id's messages in order."""
    msgs = [
        b'{"id": "a", "price": 1}',  # 0
        b'{"id": "b", "stock": 0}',  # 1
        b'{"id": "c", "price": 2}',  # 2: joins 0 (c has no earlier message)
        b"not json",  # 3: a reject joins the first file
        b'{"id": "b", "price": 3}',  # 4: b's previous is in file 1 -> a new file 2
        b'{"id": "a", "stock": 5}',  # 5: a's previous is in file 0 -> file 1
        b'{"id": "a", "price": 6}',  # 6: a's previous is in file 1 -> file 2
        b'{"id": 7, "price": 1}',  # 7: the number 7 ...
        b'{"id": "7", "stock": 1}',  # 8: ... and the text "7" are one id -> file 1
        b'{"id": "7", "price": 1}',  # 9: -> file 2
    ]
    assert field_layers(msgs, "id") == [[0, 2, 3, 7], [1, 5, 8], [4, 6, 9]]
    assert field_layers([b"[1]", b'{"id": "a"}'], "id") == [[0, 1]]
    # fields outside the contract's columns (dropped by validation) split nothing
    extra = [b'{"id": "a", "p": 1, "debug": 1}', b'{"id": "b", "p": 2}']
    assert field_layers(extra, "id", frozenset({"id", "p"})) == [[0, 1]]
    assert field_layers(extra, "id") == [[0], [1]]
    assert field_layers([], "id") == []


_FIELDS = ("title", "brand", "price")
_MESSAGE = st.fixed_dictionaries(
    {"item_id": st.sampled_from(["a", "b", "c"])},
    optional={
        "title": st.none() | st.sampled_from(["t1", "t2"]),
        "brand": st.none() | st.sampled_from(["b1", "b2"]),
        "price": st.none() | st.integers(1, 9),
    },
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(batch=st.lists(_MESSAGE, min_size=1, max_size=12))
def test_a_folded_batch_of_partial_records_equals_applying_them_one_by_one(batch):
    """Any batch of partial item records, landed in field layers and folded by build_table,
    gives each item what applying its records one by one gives (a field present sets it, an
    explicit null clears it, an absent one is left; a record's fields only)."""
    import tempfile

    from recsys.ingest import build_table
    from recsys.storage import Storage

    expected: dict[str, dict] = {}
    for record in batch:
        row = expected.setdefault(record["item_id"], dict.fromkeys(_FIELDS))
        row.update({f: record[f] for f in _FIELDS if f in record})
    with tempfile.TemporaryDirectory() as root:
        messages = [json.dumps(r).encode() for r in batch]
        land_messages(root, "acme", "items", "nats-S-000000000001", messages,
                      list(range(1, len(batch) + 1)), "nats:S")  # fmt: skip
        table, report = build_table(Storage(root), "acme", "items")
    assert report.rejected == 0
    got = {r["item_id"]: {f: r[f] for f in _FIELDS} for r in table.iter_rows(named=True)}
    for row in expected.values():
        row["price"] = None if row["price"] is None else float(row["price"])
    assert got == expected


def test_partial_records_change_only_their_own_fields(tmp_path):
    """A feed of partial updates (price changes, stock changes, one batch) changes for each
    item only the fields its records carry. Landed as one file, the batch's fields together
    cleared b's price and set a's availability back to the default."""
    from recsys.ingest import build_table
    from recsys.storage import Storage

    root = str(tmp_path)
    catalogue = [
        {"sku": "a", "title": "A", "price": 10, "available": True},
        {"sku": "b", "title": "B", "price": 20, "available": True},
    ]
    updates = [
        {"sku": "a", "available": False},
        {"sku": "b", "price": 21},
        {"sku": "a", "price": 12},
        {"sku": "b", "price": 22},
        {"sku": "c", "title": "C"},
    ]
    service = JsonService(catalogue)
    try:
        store_connector(root, "acme", "feed", "http", "items",
                        {"url": service.url, "map": {"sku": "item_id"}})  # fmt: skip
        run_connector(root, "acme", "feed", lambda line: None)
        time.sleep(0.01)  # (files fold in landing order: their modification times)
        service.doc = updates
        summary = run_connector(root, "acme", "feed", lambda line: None)
    finally:
        service.close()
    assert (summary.rows, summary.rejects, len(summary.landed_files)) == (5, 0, 3)
    table, _ = build_table(Storage(root), "acme", "items")
    got = {
        r["item_id"]: (r["title"], r["price"], r["available"]) for r in table.iter_rows(named=True)
    }
    assert got == {"a": ("A", 12.0, False), "b": ("B", 22.0, True), "c": ("C", None, True)}


def test_a_batch_landed_again_replaces_its_layer_files(tmp_path):
    """A batch landed again (after a crash before its state was saved) under the same name, with
    fewer field sets this time: the earlier attempt's extra layer files go."""
    root = str(tmp_path)
    first = [b'{"item_id": "a", "price": 1}', b'{"item_id": "a", "title": "A"}', b"[1]"]
    paths, rows, rejects = land_messages(root, "acme", "items", "nats-S-000000000001",
                                         first, [1, 2, 3], "nats:S")  # fmt: skip
    names = sorted(os.path.basename(p) for p in paths)
    assert (rows, rejects) == (2, 1)
    assert names == [
        "nats-S-000000000001-00001.parquet",
        "nats-S-000000000001.parquet",
        "nats-S-000000000001.rejected.parquet",
    ]
    land_messages(root, "acme", "items", "nats-S-000000000001", first[:1], [1], "nats:S")
    left = sorted(os.listdir(os.path.join(root, "landing", "acme", "items")))
    assert left == ["nats-S-000000000001.parquet"]


def test_bad_specs_are_refused():
    for kind, target, cfg in [
        ("kafka", "events", {}),
        ("nats", "orders", {"servers": NATS_URL, "stream": "S", "subject": "s"}),
        ("nats", "events", {"servers": "http://x", "stream": "S", "subject": "s"}),
        ("nats", "events", {"servers": NATS_URL, "stream": "S S", "subject": "s"}),
        ("http", "items", {"url": "ftp://x/y"}),
        ("http", "items", {"url": "http://x/y", "interval_s": 1}),
        ("files", "events", {"url": "relative/folder"}),
        ("files", "events", {"url": "/x", "map": {"a": 1}}),
    ]:
        with pytest.raises(ValueError):
            check_spec(kind, target, cfg)


# --- Dagster: the job and the sensor -------------------------------------------------------------
def test_connector_run_job_and_sensor(tmp_path):
    import dagster as dg

    from pipelines.connector_sensors import connector_run, connector_sensor
    from pipelines.resources import StorageResource

    root, src = str(tmp_path / "data"), tmp_path / "drop"
    src.mkdir()
    (src / "a.csv").write_text("user_id,item_id,event_type,timestamp\nu1,i1,view,2026\n")
    store_connector(root, "acme", "drop", "files", "events", {"url": str(src)})
    store_connector(root, "acme", "gone", "files", "events", {"url": str(tmp_path / "nothing")})
    resources = {"storage": StorageResource(root=root)}
    with dg.DagsterInstance.ephemeral() as instance:
        # the sensor asks for one run: the folder that exists (the missing one is skipped)
        ctx = dg.build_sensor_context(instance=instance, resources=resources)
        requests = connector_sensor(ctx)
        assert [r.tags["recsys/connector"] for r in requests] == ["drop"]
        ok = connector_run.execute_in_process(
            run_config=requests[0].run_config, instance=instance, resources=resources
        )
        assert ok.success
        messages = [e.message for e in instance.all_logs(ok.run_id) if e.message]
        assert any("a.csv: 1 rows" in m for m in messages)
        assert os.listdir(os.path.join(root, "landing", "acme", "events"))
        # the same listing asks for the same run key again (Dagster runs a key once)
        again = connector_sensor(dg.build_sensor_context(instance=instance, resources=resources))
        assert again[0].run_key == requests[0].run_key
        # an unreachable source: the run fails, its log says why
        bad = connector_run.execute_in_process(
            run_config={
                "ops": {"sync_connector": {"config": {"tenant": "acme", "connector_id": "gone"}}}
            },
            instance=instance,
            resources=resources,
            raise_on_error=False,
        )
        assert not bad.success
        messages = [e.message for e in instance.all_logs(bad.run_id) if e.message]
        assert any("no such folder" in m for m in messages)


# --- the API -------------------------------------------------------------------------------------
sys.path.insert(0, str(REPO / "tests" / "serving"))
from serving_helpers import auth, build_client, make_config  # noqa: E402

ADMIN = ("recommend", "admin")


def post_connector(client, body: dict, tenant: str = "acme"):
    return client.simulate_post("/v1/recs/connectors", json=body, headers=auth(tenant, ADMIN))


def test_api_creates_lists_and_refuses_bad_connectors(tmp_path):
    client = build_client(
        make_config(str(tmp_path), dagster_url=f"http://127.0.0.1:{closed_port()}")
    )
    made = post_connector(
        client,
        {
            "type": "http",
            "target": "items",
            "name": "catalog",
            "config": {"url": "https://pim.example/items", "headers": {"Authorization": "k"}},
        },
    )
    assert made.status_code == 201, made.text
    cid = made.json["id"]
    assert made.json["config"]["interval_s"] == 300 and made.json["config"]["headers"] == {
        "Authorization": "***"
    }
    # an unreachable source is accepted (nothing is contacted)
    down = post_connector(
        client,
        {"type": "nats", "target": "events",
         "config": {"servers": f"nats://127.0.0.1:{closed_port()}", "stream": "S", "subject": "s"}},
    )  # fmt: skip
    assert down.status_code == 201
    listed = client.simulate_get("/v1/recs/connectors", headers=auth("acme"))
    assert listed.json["total"] == 2 and "k" not in listed.text.replace('"k', "")
    bad = post_connector(client, {"type": "http", "target": "items", "config": {"url": "ftp://x"}})
    assert bad.status_code == 422 and bad.json["code"] == "RECSYS_INVALID_CONNECTOR"
    assert (
        post_connector(client, {"type": "kafka", "target": "events", "config": {}}).status_code
        == 400
    )
    # Dagster down: a run is 503 naming it, the list still answers
    run = client.simulate_post(f"/v1/recs/connectors/{cid}/run", headers=auth("acme", ADMIN))
    assert run.status_code == 503 and "Dagster" in run.json["detail"]
    logs = client.simulate_get(f"/v1/recs/connectors/{cid}/logs", headers=auth("acme"))
    assert logs.status_code == 503
    assert client.simulate_get("/v1/recs/connectors", headers=auth("acme")).status_code == 200


def test_no_tenant_reaches_another_tenants_connectors(tmp_path):
    client = build_client(make_config(str(tmp_path)))
    cid = post_connector(
        client, {"type": "files", "target": "events", "config": {"url": str(tmp_path)}}
    ).json["id"]
    other = client.simulate_get("/v1/recs/connectors", headers=auth("globex"))
    assert other.status_code == 200 and other.json["total"] == 0 and cid not in other.text
    for method, path in (("POST", f"/v1/recs/connectors/{cid}/run"),
                         ("GET", f"/v1/recs/connectors/{cid}/logs")):  # fmt: skip
        resp = client.simulate_request(method, path, headers=auth("globex", ADMIN))
        assert resp.status_code == 404, (method, path, resp.text)
        assert client.simulate_request(method, path).status_code == 401
        resp = client.simulate_request(
            method, path, headers={**auth("globex", ADMIN), "X-Org-Id": "acme"}
        )
        assert resp.status_code == 403
    assert client.simulate_get("/v1/recs/connectors").status_code == 401


@pytest.mark.slow
def test_api_run_and_logs_through_dagster(dagster_server, control_client, tmp_path):
    """POST .../run launches connector_run on the real dagster dev; GET .../logs shows its
    status and log lines; an unreachable source: a failed run whose log says why, and the
    good connector's run is not held up by it."""
    src = tmp_path / "drop"
    src.mkdir()
    (src / "a.csv").write_text("user_id,item_id,event_type,timestamp\nu1,i1,view,2026\n")
    good = post_connector(
        control_client, {"type": "files", "target": "events", "config": {"url": str(src)}}
    ).json["id"]
    gone = post_connector(
        control_client,
        {"type": "files", "target": "events", "config": {"url": str(tmp_path / "nothing")}},
    ).json["id"]
    started = {}
    for cid in (gone, good):
        resp = control_client.simulate_post(
            f"/v1/recs/connectors/{cid}/run", headers=auth("acme", ADMIN)
        )
        # (the connector sensor may have started the good one's run first: then 409)
        assert resp.status_code == 202 or (cid == good and resp.status_code == 409), resp.text
        if resp.status_code == 202:
            started[cid] = resp.json["job_id"]
    assert gone in started
    # The connector sensor may also run the good connector, before or after the API's run:
    # a.csv is imported by whichever run sees it first, and the other skips it as seen.
    final, good_runs = {}, []
    deadline = time.time() + 240
    while time.time() < deadline:
        for cid in (gone, good):
            logs = control_client.simulate_get(
                f"/v1/recs/connectors/{cid}/logs", headers=auth("acme")
            ).json
            for run in logs["runs"]:
                assert run["job_id"] != started.get(gone if cid == good else good)
            done = [r for r in logs["runs"] if r["status"] in ("SUCCESS", "FAILURE", "CANCELED")]
            if cid == good:
                good_runs = done
            for r in done:
                if r["job_id"] == started.get(cid, r["job_id"]):
                    final[cid] = r
        imported = [
            r for r in good_runs if any("a.csv: 1 rows" in ln["message"] for ln in r["logs"])
        ]
        if gone in final and (good in final or not started.get(good)) and imported:
            break
        time.sleep(2)
    assert final[gone]["status"] == "FAILURE"
    assert any("no such folder" in line["message"] for line in final[gone]["logs"])
    assert imported, good_runs
    assert all(r["status"] == "SUCCESS" for r in good_runs), good_runs
    if good in started:
        assert final[good]["status"] == "SUCCESS"
        assert final[good]["trigger"] == "api"
    else:
        assert imported[0]["trigger"] == "sensor"


# --- Redis Streams -------------------------------------------------------------------------------
REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_up() -> bool:
    try:
        import redis

        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping())
    except Exception:
        return False


needs_redis = pytest.mark.skipif(not _redis_up(), reason="needs Redis on 127.0.0.1:6379")


@pytest.fixture
def redis_stream():
    """A fresh Redis stream of N_EVENTS events (field `data`) with BAD among them; deleted
    afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    key = f"recsys-test-{uuid.uuid4().hex[:8]}"
    bad_at = {(k + 1) * N_EVENTS // (len(BAD) + 1): bad for k, bad in enumerate(BAD)}
    pipe = client.pipeline(transaction=False)
    for i in range(N_EVENTS):
        if i in bad_at:
            pipe.xadd(key, {"data": bad_at[i]})
        pipe.xadd(
            key,
            {"data": json.dumps({"event_id": f"e{i:06d}", "user_id": f"u{i % 997}",
                                 "item_id": f"i{i % 401}", "event_type": "view",
                                 "timestamp": "2026-11-30T10:00:00Z"})},
        )  # fmt: skip
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    assert client.xlen(key) == N_EVENTS + len(BAD)
    yield key
    client.delete(key)
    client.close()


@pytest.mark.services
@pytest.mark.slow
@needs_redis
def test_redis_stream_exactly_once_with_throughput_and_across_kill9(tmp_path, redis_stream):
    root = str(tmp_path)
    store_connector(
        root, "acme", "rclicks", "redis", "events",
        {"url": REDIS_URL, "stream": redis_stream, "batch": 2000},
    )  # fmt: skip
    cmd = [sys.executable, "-m", "recsys.cli", "connectors", "run", "rclicks"]
    cmd += ["--tenant", "acme", "--data-root", root, "--idle", "1"]
    folder = os.path.join(root, "landing", "acme", "events")
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(folder) and len(os.listdir(folder)) >= 8:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    check_exactly_once(root, "acme")
    summary = json.loads(done.stdout)
    print(
        f"\nredis stream connector: {N_EVENTS:,} events exactly once across a kill -9; the "
        f"restarted run landed {summary['rows']:,} at {summary['messages_per_s']:,}/s, "
        f"skipped {summary['skipped']} already landed ({took:.1f} s wall, load "
        f"{os.getloadavg()[0]:.1f})"
    )


def test_unreachable_redis_fails_clearly(tmp_path):
    root = str(tmp_path)
    url = f"redis://127.0.0.1:{closed_port()}/0"
    store_connector(root, "acme", "r", "redis", "events", {"url": url, "stream": "s"})
    with pytest.raises(ConnectorError, match="Redis at .* is unreachable"):
        run_connector(root, "acme", "r", lambda line: None, connect_timeout_s=1.0)

"""Durable events and feedback: /v1/recs/events, /events/bulk, /events/{id}, /feedback.

Known answers: ids derived exactly like the contract's `derive_event_ids`, rejects by line with
the contract's reasons, events landed as contract Parquet that `ingest_events` accepts, and a
torn tail of the log detected and cut without losing an acknowledged record.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson
import polars as pl
import pytest
from serving_helpers import auth

from recsys.contract import DEFAULT_EVENT_WEIGHTS, EVENT_SCHEMA
from recsys.ingest import ingest_events, read_events
from recsys.storage import Storage
from recsys.validation import validate_events
from serving.errors import ProblemError
from serving.event_landing import read_tombstones
from serving.event_records import ItemResult, event_id_of, payloads_frame, records_frame
from serving.events_log import TenantEventLog, flush_events
from serving.recs.events import parse_bulk
from serving.segment_log import frame, list_segments, read_frames, segment_name

EV = {
    "type": "click",
    "user_id": "u1",
    "item_id": "a1",
    "timestamp": "2025-01-01T10:00:00Z",
    "session_id": "s1",
    "metadata": {"page": "home"},
}


def post(client, body, tenant="acme", scopes=("recommend",)):
    return client.simulate_post("/v1/recs/events", json=body, headers=auth(tenant, scopes))


def bulk(client, data: bytes, tenant="acme"):
    return client.simulate_post(
        "/v1/recs/events/bulk",
        body=data,
        headers=auth(tenant, **{"Content-Type": "application/json"}),
    )


def test_single_event_is_stored_with_the_contract_id_and_read_back(client):
    resp = post(client, EV)
    assert resp.status_code == 201 and resp.json["status"] == "accepted"
    raw = pl.DataFrame(
        [
            {
                "user_id": "u1",
                "item_id": "a1",
                "event_type": "click",
                "timestamp": "2025-01-01T10:00:00Z",
                "session_id": "s1",
            }
        ]
    )
    expected_id = validate_events(raw, tenant="acme", source="t")[0]["event_id"][0]
    assert resp.json["event_id"] == expected_id
    got = client.simulate_get(f"/v1/recs/events/{expected_id}", headers=auth())
    assert got.status_code == 200
    assert got.json == {
        "event_id": expected_id,
        "tenant": "acme",
        "user_id": "u1",
        "item_id": "a1",
        "event_type": "click",
        "timestamp": "2025-01-01T10:00:00Z",
        "value": None,
        "session_id": "s1",
        "context": {"page": "home"},
    }
    again = post(client, EV)  # idempotent: same content, same id
    assert again.status_code == 200 and again.json == {
        "status": "duplicate",
        "event_id": expected_id,
    }


def test_invalid_single_event_is_a_422_problem_with_the_contract_reason(client):
    for body, reason in [
        ({**EV, "type": "teleport"}, "unknown_event_type"),
        ({**EV, "user_id": ""}, "missing_id"),
        ({**EV, "timestamp": "1970-01-02T00:00:00Z"}, "bad_timestamp"),
        ({**EV, "value": "abc"}, "bad_value"),
        ({**EV, "tenant": "globex"}, "wrong_tenant"),
        ({**EV, "colour": "red"}, "unparsable"),
    ]:
        resp = post(client, body)
        assert resp.status_code == 422, body
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert resp.json["code"] == "RECSYS_INVALID_EVENT" and resp.json["reason"] == reason
    assert post(client, [EV]).status_code == 400


def test_bulk_ndjson_and_array_keep_valid_lines_and_report_bad_ones(client):
    lines = [
        orjson.dumps({**EV, "event_id": "b1"}),
        b"{not json",
        orjson.dumps({**EV, "event_id": "b2", "type": "nope"}),
        b"",
        orjson.dumps({**EV, "event_id": "b3", "type": "purchase", "value": 2}),
    ]
    resp = bulk(client, b"\n".join(lines))
    assert resp.status_code == 200
    assert resp.json["accepted"] == 2 and resp.json["rejected"] == 2
    assert [(e["line"], e["reason"]) for e in resp.json["errors"]] == [
        (2, "unparsable"),
        (3, "unknown_event_type"),
    ]
    assert resp.json["event_ids"] == ["b1", None, None, "b3"]
    arr = bulk(client, orjson.dumps([{**EV, "event_id": "b1"}, {**EV, "event_id": "b4"}]))
    assert (arr.json["accepted"], arr.json["duplicates"]) == (1, 1)
    got = client.simulate_get("/v1/recs/events/b3", headers=auth()).json
    assert got["event_type"] == "purchase" and got["value"] == 2.0


def test_bulk_bodies_are_read_line_by_line_as_events():
    events = [{**EV, "event_id": f"n{i}"} for i in range(5)]
    lines = [orjson.dumps(e) for e in events]
    for body in (
        b"\n".join(lines),
        b"\n".join(lines) + b"\n",
        b"\r\n".join(lines) + b"\r\n  \n",
        b"\n".join([lines[0], b"", lines[1]]),
        b"\n".join([lines[0], b"7", b"{nope", lines[1]]),
        orjson.dumps(events, option=orjson.OPT_INDENT_2),  # one array over many lines
    ):
        expected = []
        if body.startswith(b"["):
            expected = events
        for line in body.split(b"\n") if not expected else ():
            if line.strip():
                try:
                    expected.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    expected.append(None)
        got = parse_bulk(body)
        assert [None if isinstance(g, ItemResult) else g for g in got] == [
            e if isinstance(e, dict) else None for e in expected
        ]
        assert [g.reason for g in got if isinstance(g, ItemResult)] == [
            "unparsable" for e in expected if not isinstance(e, dict)
        ]
    pretty = orjson.dumps(events[0], option=orjson.OPT_INDENT_2)  # one event over many lines
    assert parse_bulk(pretty) == [events[0]]
    for hopeless in (b"", b"  \n", b"[]", b"7", b'"x"', b"\x00", b"{nope\n{oops"):
        with pytest.raises(ProblemError) as e:
            parse_bulk(hopeless)
        assert e.value.status_code == 400, hopeless


RECORDS = [
    {"k": "e", "id": "a", "u": "u1", "i": "i1", "t": "click", "ts": 1735689600000000,
     "v": None, "s": None, "c": None},
    {"k": "e", "id": 'é"x\\y', "u": "ü\n", "i": "i\u2028", "t": "purchase", "ts": -5, "v": 1.0,
     "s": "s", "c": '{"a":[1,2],"b":"\\u00e9"}'},
    {"k": "e", "id": "b", "u": "u", "i": "i", "t": "view", "ts": 253402300799999999,
     "v": 0.1 + 0.2, "s": "", "c": "{}"},
    {"k": "e", "id": "c\x01", "u": "u", "i": "i", "t": "view", "ts": 0, "v": 5, "s": "x",
     "c": None},
]  # fmt: skip


def test_event_records_read_in_one_polars_pass_equal_the_parsed_ones():
    payloads = [orjson.dumps(r) for r in RECORDS]
    got, want = payloads_frame(payloads, "acme"), records_frame(RECORDS, "acme")
    assert got.schema == want.schema and got.equals(want)
    assert payloads_frame([], "acme").equals(records_frame([], "acme"))
    # ids taken from the bytes where that is safe, else None (the record is parsed)
    assert [event_id_of(p) for p in payloads] == ["a", None, "b", None]
    assert event_id_of(orjson.dumps({"k": "t", "id": "a", "at": 1})) is None


def test_a_worker_catching_up_indexes_the_others_events_and_tombstones(tmp_path):
    root = str(tmp_path)
    w1, w2 = TenantEventLog(root, "acme"), TenantEventLog(root, "acme")
    odd = 'q"\\é'
    w1.submit([{**EV, "event_id": e} for e in ("p1", "p2", odd)])
    w1.delete("p2")
    w2.log.refresh()
    assert set(w2._index) == {"p1", "p2", odd} and set(w2._deleted) == {"p2"}
    assert w2.get(odd)[0]["event_id"] == odd
    assert [r.status for r in w2.submit([{**EV, "event_id": e} for e in ("p1", odd)])] == [
        "duplicate",
        "duplicate",
    ]


def test_tenants_never_see_each_others_events(client):
    post(client, {**EV, "event_id": "secret-1"})
    assert client.simulate_get("/v1/recs/events/secret-1", headers=auth("acme")).status_code == 200
    other = client.simulate_get("/v1/recs/events/secret-1", headers=auth("globex"))
    assert other.status_code == 404
    # globex deleting "secret-1" tombstones only its own id space
    client.simulate_delete("/v1/recs/events/secret-1", headers=auth("globex", ("admin",)))
    assert client.simulate_get("/v1/recs/events/secret-1", headers=auth("acme")).status_code == 200
    assert client.simulate_post("/v1/recs/events", json=EV).status_code == 401


def test_delete_is_admin_only_and_tombstones_survive_the_flush(client, data_root):
    post(client, {**EV, "event_id": "keep"})
    post(client, {**EV, "event_id": "drop"})
    assert client.simulate_delete("/v1/recs/events/drop", headers=auth()).status_code == 403
    resp = client.simulate_delete("/v1/recs/events/drop", headers=auth("acme", ("admin",)))
    assert resp.json == {"event_id": "drop", "status": "deleted", "known": True}
    assert client.simulate_get("/v1/recs/events/drop", headers=auth()).status_code == 410
    flush_events(data_root, ["acme"])
    landed = pl.read_parquet(Storage(data_root).landing_files("acme", "events"))
    assert landed["event_id"].to_list() == ["keep"]
    assert dict(landed.schema) == EVENT_SCHEMA
    assert set(read_tombstones(data_root, "acme")) == {"drop"}
    # after the flush the event is still readable (from landing) and the tombstone still holds
    kept = client.simulate_get("/v1/recs/events/keep", headers=auth())
    assert kept.status_code == 200
    assert client.simulate_get("/v1/recs/events/drop", headers=auth()).status_code == 410
    # and once ingested (its file moved out of landing), from the warehouse
    assert ingest_events(Storage(data_root), "acme").rows_new == 1
    assert Storage(data_root).landing_files("acme", "events") == []
    again = client.simulate_get("/v1/recs/events/keep", headers=auth())
    assert (again.status_code, again.json) == (200, kept.json)
    assert client.simulate_get("/v1/recs/events/drop", headers=auth()).status_code == 410
    assert client.simulate_get("/v1/recs/events/never", headers=auth()).status_code == 404


def test_flushed_events_are_ingested_by_the_pipeline(client, data_root):
    body = b"\n".join(
        orjson.dumps({**EV, "event_id": f"p{i}", "user_id": f"u{i}"}) for i in range(50)
    )
    assert bulk(client, body).json["accepted"] == 50
    flush_events(data_root, ["acme"])
    storage = Storage(data_root)
    report = ingest_events(storage, "acme")
    assert (report.rows_read, report.rows_new, report.rejected) == (50, 50, 0)
    assert sorted(read_events(storage, "acme")["event_id"].to_list()) == sorted(
        f"p{i}" for i in range(50)
    )


def test_an_event_type_the_tenant_declares_is_accepted_by_the_api_and_its_ingest(client, data_root):
    """The tenant config's `event_types` declares the tenant's own types: once PUT, the event
    intake accepts them (any case), and the ingest of the landed file, with the declaration
    the pipelines read from the same document, keeps them. Before it, and for another tenant,
    the type is unknown. A GET of a config never stored shows the built-in types' weights."""
    from serving.documents import declared_event_types

    wish = {**EV, "type": "wishlist", "event_id": "w1"}
    assert post(client, wish).json["reason"] == "unknown_event_type"
    admin = auth("acme", ("admin",))
    got = client.simulate_get("/v1/admin/tenants/acme/config", headers=admin)
    assert got.json["event_types"] == DEFAULT_EVENT_WEIGHTS
    put = client.simulate_put(
        "/v1/admin/tenants/acme/config",
        json={"event_types": {"wishlist": 2.5}},
        headers={**admin, "If-Match": got.headers["ETag"]},
    )
    assert put.status_code == 200, put.json
    assert post(client, wish).json["status"] == "accepted"
    assert post(client, {**wish, "type": "WishList", "event_id": "w2"}).json["status"] == "accepted"
    other = post(client, {**wish, "event_id": "w3"}, tenant="globex")
    assert other.json["reason"] == "unknown_event_type"
    for bad in ({"wish list": 1.0}, {"Wishlist": 1.0}, {"wishlist": 101}):
        resp = client.simulate_put(
            "/v1/admin/tenants/acme/config",
            json={"event_types": bad},
            headers={**admin, "If-Match": put.headers["ETag"]},
        )
        assert resp.status_code == 400, bad
    flush_events(data_root, ["acme"])
    storage = Storage(data_root)
    assert declared_event_types(storage, "acme") == {"wishlist": 2.5}
    assert declared_event_types(storage, "globex") == {}
    report = ingest_events(storage, "acme", extra_event_types=declared_event_types(storage, "acme"))
    assert (report.rows_new, report.rejected) == (2, 0)
    assert read_events(storage, "acme")["event_type"].to_list() == ["wishlist", "wishlist"]


def test_two_workers_share_one_log_without_duplicates(tmp_path):
    root = str(tmp_path)
    w1, w2 = TenantEventLog(root, "acme"), TenantEventLog(root, "acme")
    assert w1.submit([{**EV, "event_id": "x"}])[0].status == "accepted"
    assert w2.submit([{**EV, "event_id": "x"}])[0].status == "duplicate"
    assert w2.submit([{**EV, "event_id": "y"}])[0].status == "accepted"
    assert w1.get("y")[0]["event_id"] == "y"


def test_concurrent_events_share_commits_and_are_fsynced_before_the_answer(tmp_path, monkeypatch):
    import threading

    import serving.segment_log as segment_log

    root = str(tmp_path)
    w = TenantEventLog(root, "acme", linger_s=0.05)
    wal = os.path.join(root, "serving", "events", "acme", "wal")
    synced = {"bytes": 0}
    real_fsync = os.fsync

    def fsync(fd):  # records how much of the active segment a finished fsync covers
        real_fsync(fd)
        synced["bytes"] = max(synced["bytes"], os.fstat(fd).st_size)

    monkeypatch.setattr(segment_log.os, "fsync", fsync)
    answers: dict[str, tuple[str, bool]] = {}

    def send(i: int) -> None:
        status = w.submit([{**EV, "event_id": f"c{i}"}])[0].status
        covered = synced["bytes"]  # fsync'd bytes when the answer came
        seg = os.path.join(wal, segment_name(list_segments(wal)[-1]))
        offset = next(
            off for off, r in read_frames(Path(seg).read_bytes())[0] if r["id"] == f"c{i}"
        )
        answers[f"c{i}"] = (status, covered > offset)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(answers) == sorted(f"c{i}" for i in range(16))
    assert set(answers.values()) == {("accepted", True)}  # each fsync'd before its answer
    assert w.batches < 16  # concurrent requests shared validation passes and fsyncs
    results = w.submit([{**EV, "event_id": f"c{i}"} for i in range(16)])
    assert {r.status for r in results} == {"duplicate"}
    landed = flush_events(root, ["acme"])["acme"]
    assert sorted(pl.read_parquet(landed)["event_id"].to_list()) == sorted(
        f"c{i}" for i in range(16)
    )


def test_a_torn_tail_is_cut_and_nothing_acknowledged_is_lost(tmp_path):
    root = str(tmp_path)
    w = TenantEventLog(root, "acme")
    w.submit([{**EV, "event_id": f"t{i}"} for i in range(3)])
    wal = os.path.join(root, "serving", "events", "acme", "wal")
    seg = os.path.join(wal, segment_name(list_segments(wal)[-1]))
    good_size = os.path.getsize(seg)
    torn = frame({"k": "e", "id": "never-acked"})
    with open(seg, "ab") as f:  # a crash in the middle of a write
        f.write(torn[: len(torn) // 2])
    records, end = read_frames(Path(seg).read_bytes())
    assert end == good_size and [r["id"] for _, r in records] == ["t0", "t1", "t2"]
    restarted = TenantEventLog(root, "acme")  # a new worker after the crash
    assert restarted.submit([{**EV, "event_id": "t3"}])[0].status == "accepted"
    records, end = read_frames(Path(seg).read_bytes())
    assert [r["id"] for _, r in records] == ["t0", "t1", "t2", "t3"]
    assert end == os.path.getsize(seg)
    corrupt = bytearray(frame({"k": "e", "id": "z"}))
    corrupt[-2] ^= 0xFF  # a flipped bit fails the CRC
    assert read_frames(bytes(corrupt)) == ([], 0)
    landed = flush_events(root, ["acme"])["acme"]
    assert sorted(pl.read_parquet(landed)["event_id"].to_list()) == ["t0", "t1", "t2", "t3"]


def test_segments_roll_and_land_each_once(tmp_path):
    root = str(tmp_path)
    w = TenantEventLog(root, "acme", segment_bytes=2_000)
    for i in range(20):
        w.submit([{**EV, "event_id": f"r{i}-{j}"} for j in range(5)])
    flush_events(root, ["acme"])
    files = Storage(root).landing_files("acme", "events")
    assert len(files) > 3
    ids = pl.read_parquet(files)["event_id"].to_list()
    assert sorted(ids) == sorted(f"r{i}-{j}" for i in range(20) for j in range(5))
    assert flush_events(root, ["acme"]) == {"acme": []}  # nothing new, nothing landed again


def test_feedback_is_stored_listed_and_isolated(client):
    resp = client.simulate_post(
        "/v1/recs/feedback",
        headers=auth(),
        json={
            "feedback_id": "f1",
            "user_id": "u1",
            "item_id": "a1",
            "label": "relevant",
            "source": "panel",
            "confidence": 0.9,
        },
    )
    assert resp.status_code == 201 and resp.json["label"] == "relevant"
    client.simulate_post(
        "/v1/recs/feedback",
        headers=auth(),
        json={"user_id": "u2", "item_id": "a1", "label": "not_relevant"},
    )
    again = client.simulate_post(
        "/v1/recs/feedback",
        headers=auth(),
        json={"feedback_id": "f1", "user_id": "u1", "item_id": "a1", "label": "relevant"},
    )
    assert again.status_code == 200
    listed = client.simulate_get("/v1/recs/feedback", params={"item_id": "a1"}, headers=auth())
    assert listed.json["total"] == 2
    only = client.simulate_get("/v1/recs/feedback", params={"label": "relevant"}, headers=auth())
    assert [f["feedback_id"] for f in only.json["items"]] == ["f1"]
    assert client.simulate_get("/v1/recs/feedback/f1", headers=auth()).json["confidence"] == 0.9
    assert client.simulate_get("/v1/recs/feedback/f1", headers=auth("globex")).status_code == 404
    bad = client.simulate_post(
        "/v1/recs/feedback", headers=auth(), json={"user_id": "u1", "item_id": "a1", "label": "meh"}
    )
    assert bad.status_code == 400 and "`body.label`" in bad.json["detail"]  # the schema's enum


@pytest.mark.slow
def test_kill_9_of_real_gunicorn_loses_no_acknowledged_event(tmp_path):
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "events_ingest.py")
    spec = importlib.util.spec_from_file_location("events_ingest", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root, port = str(tmp_path), bench.free_port()
    env = {"RECSYS_EVENTS_SEGMENT_BYTES": "200000", "RECSYS_EVENTS_FLUSH_S": "1"}
    proc = bench.start_server(root, port, 2, 8, env)
    acked, requests, _, _ = bench.load(
        port, "single", 4.0, 2, 8, prefix="k", during=(2.5, lambda: bench.kill9(proc))
    )
    assert len(acked) > 50 and requests >= len(acked)
    # a restarted server reads the log (repairing any torn tail) and keeps serving
    proc = bench.start_server(root, port, 2, 4, env)
    try:
        acked2, _, errors, _ = bench.load(port, "bulk", 1.0, 1, 1, bulk_size=100, prefix="after")
        assert acked2 and errors == 0
    finally:
        bench.kill9(proc)
    stored, _ = bench.stored_ids(root)
    report = bench.check_exactly_once(acked + acked2, stored)
    assert report["missing"] == 0 and report["duplicated"] == 0, report


def test_events_flush_command_lands_acknowledged_events(client, data_root, capsys):
    from recsys.cli import main

    body = b"\n".join(orjson.dumps({**EV, "event_id": f"c{i}"}) for i in range(3))
    assert bulk(client, body).json["accepted"] == 3
    assert main(["--data-root", data_root, "events", "flush", "--tenant", "acme"]) == 0
    assert "acme: 1 event file(s) landed" in capsys.readouterr().out
    report = ingest_events(Storage(data_root), "acme")
    assert report.rows_new == 3


def test_bulk_accepts_the_ndjson_media_type_and_other_routes_do_not(client):
    body = b"\n".join(orjson.dumps({**EV, "event_id": f"n{i}"}) for i in range(2))
    resp = client.simulate_post(
        "/v1/recs/events/bulk",
        body=body,
        headers=auth("acme", **{"Content-Type": "application/x-ndjson"}),
    )
    assert resp.status_code == 200 and resp.json["accepted"] == 2
    resp = client.simulate_post(
        "/v1/recommend",
        body=b'{"k": 1}',
        headers=auth("acme", **{"Content-Type": "application/x-ndjson"}),
    )
    assert resp.status_code == 415
    assert resp.headers["content-type"].startswith("application/problem+json")

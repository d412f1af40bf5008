"""Webhooks: the API (create / list / delete, secret shown once, http(s) only, tenant-scoped)
and delivery from the outbox to a real HTTP receiver that checks Standard Webhooks signatures.

The receiver (`Receiver`, http.server in a thread) verifies every request with the
`standardwebhooks` package and the endpoint's secret, records (webhook-id, body, time), and can
be told to answer 500 to the first attempt of each message, to sleep, or to refuse everything.
The kill -9 test runs `recsys webhooks deliver` as the operator would, kills it mid-way and
starts it again: every message arrives, and duplicates carry the same id and body.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from recsys.outbox import Deliverer, DeliveryPolicy, Outbox, emit

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "serving"))

from serving_helpers import auth, build_client, make_config  # noqa: E402

ADMIN = ("recommend", "admin")
FAST = DeliveryPolicy(backoff_s=0.05, max_backoff_s=0.2, timeout_s=2.0, poll_s=0.01)


class Receiver:
    """A webhook receiver on a free port that verifies signatures with `secret`."""

    def __init__(self, fail_first: bool = False, delay_s: float = 0.0, status: int = 200):
        self.secret: str | None = None
        self.fail_first = fail_first
        self.delay_s = delay_s
        self.status = status
        self.received: list[tuple[str, bytes, float]] = []  # verified (id, body, at)
        self.refused: list[str] = []  # signature failures
        self.incomplete: list[str] = []  # requests whose body ended before its Content-Length
        self.attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                at = time.time()
                msg_id = self.headers.get("webhook-id", "")
                if len(body) < length:  # (a sender killed mid-request: not a bad signature)
                    receiver.incomplete.append(msg_id)
                    return
                try:
                    Webhook(receiver.secret).verify(body, dict(self.headers.items()))
                except Exception as ex:
                    receiver.refused.append(f"{msg_id}: {ex}")
                    self._answer(400)
                    return
                with receiver._lock:
                    n = receiver.attempts[msg_id] = receiver.attempts.get(msg_id, 0) + 1
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                if receiver.fail_first and n == 1:
                    self._answer(500)
                    return
                if receiver.status >= 300:
                    self._answer(receiver.status)
                    return
                with receiver._lock:
                    receiver.received.append((msg_id, body, at))
                self._answer(204)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def ids(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self.received}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver(fail_first=True)
    yield r
    r.close()


@pytest.fixture
def client(tmp_path):
    return build_client(make_config(str(tmp_path)))


def subscribe(client, url: str, tenant: str = "acme", events=("job.completed",), **extra):
    resp = client.simulate_post(
        "/v1/recs/webhooks",
        json={"url": url, "events": list(events), **extra},
        headers=auth(tenant, ADMIN),
    )
    assert resp.status_code == 201, resp.text
    return resp.json


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone"


# --- the API -----------------------------------------------------------------------------------
def test_secret_is_shown_once_and_never_again(client):
    created = subscribe(client, "https://hooks.example/x", events=["job.completed", "job.failed"])
    assert created["secret"].startswith("whsec_")
    assert created["id"].startswith("wh_") and created["events"] == ["job.completed", "job.failed"]
    listed = client.simulate_get("/v1/recs/webhooks", headers=auth("acme"))
    assert listed.status_code == 200
    assert listed.json["total"] == 1
    hook = listed.json["items"][0]
    assert hook["id"] == created["id"] and hook["status"] == "enabled"
    assert hook["delivery"]["attempts"] == 0 and hook["delivery"]["pending"] == 0
    assert "secret" not in hook and created["secret"] not in listed.text


def test_own_secret_is_kept_and_bad_one_refused(client):
    mine = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    assert subscribe(client, "http://h.example/", secret=mine)["secret"] == mine
    bad = client.simulate_post(
        "/v1/recs/webhooks",
        json={"url": "http://h.example/", "events": ["job.failed"], "secret": "not-a-secret"},
        headers=auth("acme", ADMIN),
    )
    assert bad.status_code == 422 and bad.json["code"] == "RECSYS_INVALID_WEBHOOK_SECRET"


@pytest.mark.parametrize(
    "url", ["ftp://h.example/x", "file:///etc/passwd", "javascript:alert(1)", "http://", "h/x"]
)
def test_url_must_be_http_or_https(client, url):
    resp = client.simulate_post(
        "/v1/recs/webhooks",
        json={"url": url, "events": ["job.completed"]},
        headers=auth("acme", ADMIN),
    )
    assert resp.status_code == 422, resp.text
    assert resp.json["code"] == "RECSYS_INVALID_WEBHOOK_URL"


def test_unknown_event_and_writes_without_admin_are_refused(client):
    resp = client.simulate_post(
        "/v1/recs/webhooks",
        json={"url": "http://h.example/", "events": ["model.exploded"]},
        headers=auth("acme", ADMIN),
    )
    assert resp.status_code == 400
    resp = client.simulate_post(
        "/v1/recs/webhooks",
        json={"url": "http://h.example/", "events": ["job.failed"]},
        headers=auth("acme"),
    )
    assert resp.status_code == 403


def test_delete_removes_and_cancels_pending(client, tmp_path):
    created = subscribe(client, closed_port_url())
    emit(str(tmp_path), "acme", "job.completed", {"run_id": "r1"})
    deliverer = Deliverer(str(tmp_path), FAST)
    deliverer._fan_out()  # the delivery is pending, not yet tried
    hook = client.simulate_get("/v1/recs/webhooks", headers=auth("acme")).json["items"][0]
    assert hook["delivery"]["pending"] == 1
    gone = client.simulate_delete(f"/v1/recs/webhooks/{created['id']}", headers=auth("acme", ADMIN))
    assert gone.status_code == 204
    assert client.simulate_get("/v1/recs/webhooks", headers=auth("acme")).json["total"] == 0
    log = Outbox.of(str(tmp_path)).endpoint_log("acme", created["id"])
    assert log["pending"] == 0 and log["recent"][0]["state"] == "cancelled"
    again = client.simulate_delete(
        f"/v1/recs/webhooks/{created['id']}", headers=auth("acme", ADMIN)
    )
    assert again.status_code == 404
    deliverer.close()


def test_no_tenant_reaches_another_tenants_webhooks(client):
    created = subscribe(client, "https://a.example/hook", tenant="acme")
    # globex sees none of acme's endpoints and cannot delete them
    other = client.simulate_get("/v1/recs/webhooks", headers=auth("globex"))
    assert other.status_code == 200 and other.json["total"] == 0
    assert created["id"] not in other.text
    resp = client.simulate_delete(
        f"/v1/recs/webhooks/{created['id']}", headers=auth("globex", ADMIN)
    )
    assert resp.status_code == 404
    # no credentials: 401; another tenant's X-Org-Id: 403
    assert client.simulate_get("/v1/recs/webhooks").status_code == 401
    resp = client.simulate_get("/v1/recs/webhooks", headers={**auth("globex"), "X-Org-Id": "acme"})
    assert resp.status_code == 403
    # acme's endpoint is still there
    assert client.simulate_get("/v1/recs/webhooks", headers=auth("acme")).json["total"] == 1


# --- delivery ------------------------------------------------------------------------------------
def test_signed_delivery_retried_after_500_with_the_same_id(client, tmp_path, receiver):
    created = subscribe(client, receiver.url, events=["job.completed", "model.deployed"])
    receiver.secret = created["secret"]
    root = str(tmp_path)
    ids = [emit(root, "acme", "job.completed", {"run_id": f"r{i}"}) for i in range(3)]
    ids.append(emit(root, "acme", "model.deployed", {"version": "7"}))
    emit(root, "acme", "job.failed", {"run_id": "not subscribed"})
    emit(root, "globex", "job.completed", {"run_id": "another tenant's"})
    deliverer = Deliverer(root, FAST, seed=1)
    deliverer.drain(timeout_s=20)
    deliverer.close()
    assert receiver.refused == []
    assert [r[0] for r in receiver.received if r[0] in ids] and receiver.ids() == set(ids)
    # each message was answered 500 once, then delivered: two attempts, one id
    assert all(receiver.attempts[i] == 2 for i in ids)
    bodies = {r[0]: orjson.loads(r[1]) for r in receiver.received}
    assert bodies[ids[3]]["type"] == "model.deployed" and bodies[ids[3]]["data"] == {"version": "7"}
    hook = client.simulate_get("/v1/recs/webhooks", headers=auth("acme")).json["items"][0]
    log = hook["delivery"]
    assert log["attempts"] == 8 and log["delivered"] == 4 and log["pending"] == 0
    assert log["last_status"] == 204 and log["failures_in_a_row"] == 0
    assert {d["state"] for d in log["recent"]} == {"delivered"}
    assert all(d["attempts"] == 2 for d in log["recent"])


def test_failing_endpoint_is_disabled_and_blocks_no_other(client, tmp_path, receiver):
    receiver.fail_first = False
    good = subscribe(client, receiver.url)
    receiver.secret = good["secret"]
    slow = Receiver(delay_s=3.0)  # answers after the deliverer's timeout
    dead = subscribe(client, closed_port_url())
    late = subscribe(client, slow.url)
    slow.secret = late["secret"]
    root = str(tmp_path)
    policy = DeliveryPolicy(
        backoff_s=0.05, max_backoff_s=0.1, timeout_s=0.5, disable_after=3, poll_s=0.01
    )
    deliverer = Deliverer(root, policy, seed=2)
    stop = threading.Event()
    thread = threading.Thread(target=deliverer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        started = time.time()
        ids = [emit(root, "acme", "job.completed", {"n": i}) for i in range(5)]
        deadline = time.time() + 15
        while receiver.ids() != set(ids) and time.time() < deadline:
            time.sleep(0.02)
        took = time.time() - started
        assert receiver.ids() == set(ids)
        # the good endpoint did not wait for the dead one or the slow one
        assert took < 3.0, took
        deadline = time.time() + 20
        hooks = {}
        while time.time() < deadline:
            listed = client.simulate_get("/v1/recs/webhooks", headers=auth("acme")).json
            hooks = {h["id"]: h for h in listed["items"]}
            if all(hooks[h["id"]]["status"] == "disabled" for h in (dead, late)):
                break
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=10)
        slow.close()
    assert hooks[good["id"]]["status"] == "enabled"
    for bad, error in ((dead, "ConnectionError"), (late, "Timeout")):
        log = hooks[bad["id"]]["delivery"]
        assert hooks[bad["id"]]["status"] == "disabled" and log["disabled"]
        assert log["attempts"] >= 3 and log["delivered"] == 0 and log["pending"] == 0
        assert "3 failed attempts in a row" in log["disabled_reason"]
        assert error in log["last_error"], log["last_error"]
        assert {d["state"] for d in log["recent"]} == {"skipped"}
    # a disabled endpoint gets no new deliveries
    emit(root, "acme", "job.completed", {"n": "after"})
    d2 = Deliverer(root, policy)
    d2.drain(timeout_s=5)
    d2.close()
    assert (
        Outbox.of(root).endpoint_log("acme", dead["id"])["attempts"]
        == hooks[dead["id"]]["delivery"]["attempts"]
    )


@pytest.mark.slow
def test_kill9_of_the_deliverer_loses_nothing(tmp_path):
    """`recsys webhooks deliver` killed with SIGKILL mid-way and started again: every message
    arrives; a message sent twice carries the same webhook-id and body. Also measures the
    latency from emit to receipt with the deliverer running (p50 / p99, printed)."""
    root = str(tmp_path)
    client = build_client(make_config(root))
    receiver = Receiver(delay_s=0.02)  # ~50 deliveries/s per connection: killable mid-way
    receiver.secret = subscribe(client, receiver.url)["secret"]
    env = {**os.environ, "RECSYS_DATA_ROOT": root}
    cmd = [sys.executable, "-m", "recsys.cli", "webhooks", "deliver", "--backoff", "0.1"]

    def start() -> subprocess.Popen:
        return subprocess.Popen(
            cmd, env=env, start_new_session=True, stderr=subprocess.DEVNULL, cwd=REPO
        )

    n = 300
    proc = start()
    try:
        emitted = {emit(root, "acme", "job.completed", {"n": i}): time.time() for i in range(n)}
        deadline = time.time() + 60
        while len(receiver.ids()) < n // 3 and time.time() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        got_before = len(receiver.ids())
        assert 0 < got_before < n, got_before
        proc = start()
        deadline = time.time() + 120
        while receiver.ids() != set(emitted) and time.time() < deadline:
            time.sleep(0.05)
        assert receiver.ids() == set(emitted)
        assert receiver.refused == []
        # duplicates (a POST the killed process made but did not record) are the same message
        bodies: dict[str, bytes] = {}
        for msg_id, body, _ in receiver.received:
            assert bodies.setdefault(msg_id, body) == body
        duplicates = len(receiver.received) - len(emitted)

        # latency with the deliverer running and idle: emit one at a time, time to receipt
        receiver.delay_s = 0.0
        latencies = []
        for i in range(100):
            sent = time.time()
            msg_id = emit(root, "acme", "job.completed", {"latency": i})
            while msg_id not in receiver.ids() and time.time() < sent + 10:
                time.sleep(0.001)
            at = next(r[2] for r in receiver.received if r[0] == msg_id)
            latencies.append(at - sent)
        latencies.sort()
        p50, p99 = latencies[49], latencies[98]
        print(
            f"\nwebhooks: {n} messages, kill -9 after {got_before} received, {duplicates} "
            f"duplicates (same id and body), 0 lost; emit->receipt p50 {p50 * 1000:.1f} ms "
            f"p99 {p99 * 1000:.1f} ms (100 single messages, load {os.getloadavg()[0]:.1f})"
        )
        assert p50 < 1.0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        receiver.close()


# --- the Dagster run-status sensors --------------------------------------------------------------
def _finished_run(instance, succeed: bool, tags: dict[str, str]):
    import dagster as dg

    @dg.op
    def work() -> None:
        if not succeed:
            raise RuntimeError("the model did not converge")

    @dg.job(name="tiny_job")
    def tiny_job() -> None:
        work()

    result = tiny_job.execute_in_process(instance=instance, tags=tags, raise_on_error=False)
    run = instance.get_run_by_id(result.run_id)
    kind = "PIPELINE_SUCCESS" if succeed else "PIPELINE_FAILURE"
    event = next(
        r.dagster_event
        for r in instance.all_logs(result.run_id)
        if r.dagster_event and r.dagster_event.event_type_value == kind
    )
    return run, event


def test_run_status_sensors_emit_job_events(client, tmp_path):
    import dagster as dg

    from pipelines.definitions import defs
    from pipelines.resources import StorageResource
    from pipelines.webhook_sensors import job_completed_sensor, job_failed_sensor

    root = str(tmp_path)
    names = {s.name for s in defs.get_repository_def().sensor_defs}
    assert {"webhook_job_completed", "webhook_job_failed", "webhook_job_canceled"} <= names
    subscribe(client, "http://a.example/", tenant="acme", events=["job.completed", "job.failed"])
    subscribe(client, "http://g.example/", tenant="globex", events=["job.completed"])
    outbox = Outbox.of(root)
    with dg.DagsterInstance.ephemeral() as instance:
        resources = {"storage": StorageResource(root=root)}
        # a tagged run tells its tenant only; evaluating the tick twice emits once
        run, event = _finished_run(instance, False, {"recsys/tenant": "acme"})
        for _ in range(2):
            ctx = dg.build_run_status_sensor_context(
                "webhook_job_failed", event, instance, run, resources=resources
            )
            job_failed_sensor(ctx)
        # an untagged run (the nightly schedule) tells every tenant with an endpoint
        run2, event2 = _finished_run(instance, True, {})
        ctx = dg.build_run_status_sensor_context(
            "webhook_job_completed", event2, instance, run2, resources=resources
        )
        job_completed_sensor(ctx)
    rows = outbox._db().execute("SELECT tenant, type, body FROM messages ORDER BY seq").fetchall()
    assert [(t, k) for t, k, _ in rows] == [
        ("acme", "job.failed"),
        ("acme", "job.completed"),
        ("globex", "job.completed"),
    ]
    failed = orjson.loads(rows[0][2])["data"]
    assert failed["job_id"] == run.run_id and failed["status"] == "FAILURE"
    assert failed["job_name"] == "tiny_job" and "failed" in failed["error"]
    assert failed["failed_steps"] == [
        {"step": "work", "error": "RuntimeError: the model did not converge"}
    ]
    assert orjson.loads(rows[1][2])["data"]["job_id"] == run2.run_id


def test_webhooks_quota_is_enforced(client, tmp_path):
    from serving.documents import DocumentStore

    quotas = DocumentStore(str(tmp_path / "serving")).collection(
        "quotas", ids=("quotas",), prefix="quota"
    )
    quotas.create("acme", "quotas", {"webhooks": 1})
    subscribe(client, "https://a.example/1")
    resp = client.simulate_post(
        "/v1/recs/webhooks",
        json={"url": "https://a.example/2", "events": ["job.failed"]},
        headers=auth("acme", ADMIN),
    )
    assert resp.status_code == 403 and resp.json["code"] == "RECSYS_QUOTA_EXCEEDED"
    assert client.simulate_get("/v1/recs/webhooks", headers=auth("acme")).json["total"] == 1
    subscribe(client, "https://g.example/1", tenant="globex")  # another tenant's own quota


def test_stopping_an_experiment_emits_experiment_completed(client, tmp_path, receiver):
    created = subscribe(client, receiver.url, events=["experiment.completed"])
    receiver.secret = created["secret"]
    admin = auth("acme", ADMIN)
    exp = {
        "id": "home-ab",
        "surface": "home",
        "variants": [{"id": "A", "traffic": 50}, {"id": "B", "traffic": 50}],
    }
    assert client.simulate_post("/v1/recs/experiments", json=exp, headers=admin).status_code == 201
    for status in ("running", "stopped", "stopped"):  # stopping twice completes it once
        resp = client.simulate_patch(
            "/v1/recs/experiments/home-ab", json={"status": status}, headers=admin
        )
        assert resp.status_code == 200, resp.text
    deliverer = Deliverer(str(tmp_path), FAST)
    deliverer.drain(timeout_s=20)
    deliverer.close()
    assert len(receiver.ids()) == 1
    body = orjson.loads(receiver.received[-1][1])
    assert body["type"] == "experiment.completed"
    assert body["data"]["experiment_id"] == "home-ab" and body["data"]["variants"] == ["A", "B"]
    assert body["data"]["results"] == "/v1/recs/experiments/home-ab/results"


@pytest.mark.slow
def test_run_end_to_delivery_latency_through_dagster(dagster_server, control_client):
    """Real dagster dev + daemon: runs of connector_run (a one-op job) tagged with the tenant,
    the run-status sensor emits job.completed / job.failed, a deliverer delivers them to the
    receiver. Prints the latency from each run's end (Dagster's endTime) to receipt."""
    from serving.control.dagster import DagsterClient

    receiver = Receiver()
    receiver.secret = subscribe(
        control_client, receiver.url, events=["job.completed", "job.failed"]
    )["secret"]
    deliverer = Deliverer(dagster_server.data_root, FAST)
    stop = threading.Event()
    thread = threading.Thread(target=deliverer.run, args=(stop,), daemon=True)
    thread.start()
    dagster = DagsterClient(dagster_server.url)
    latencies = []
    try:
        for i in range(5):
            config = {"tenant": "acme", "connector_id": f"missing-{i}"}  # fails fast: job.failed
            run_id = dagster.launch(
                "connector_run",
                {"ops": {"sync_connector": {"config": config}}},
                {"recsys/tenant": "acme"},
            )
            deadline = time.time() + 180
            body = None
            while time.time() < deadline and body is None:
                for _, raw, at in list(receiver.received):
                    doc = orjson.loads(raw)
                    if doc["data"].get("job_id") == run_id:
                        body, received_at = doc, at
                time.sleep(0.05)
            assert body is not None, f"no webhook for run {run_id}"
            assert body["type"] == "job.failed" and body["data"]["status"] == "FAILURE"
            assert "no connector 'missing-" in body["data"]["failed_steps"][0]["error"]
            run = dagster.run(run_id)
            latencies.append(received_at - run.ended)
    finally:
        stop.set()
        thread.join(timeout=10)
        receiver.close()
    latencies.sort()
    print(
        f"\nwebhooks: run end -> delivery over {len(latencies)} runs: p50 "
        f"{latencies[len(latencies) // 2]:.2f} s, max (p99) {latencies[-1]:.2f} s "
        f"(sensor interval 5 s; load {os.getloadavg()[0]:.1f})"
    )
    assert receiver.refused == []


def test_410_disables_at_once_and_a_broken_document_is_skipped(client, tmp_path, receiver):
    receiver.fail_first = False
    good = subscribe(client, receiver.url)
    receiver.secret = good["secret"]
    gone = Receiver(status=410)
    hook = subscribe(client, gone.url)
    gone.secret = hook["secret"]
    broken = tmp_path / "serving" / "webhooks" / "acme" / "wh_0000000000000000.json"
    broken.write_text('{"id": "wh_0000000000000000", "body": {"url": 1}}')
    root = str(tmp_path)
    msg = emit(root, "acme", "job.completed", {"n": 1})
    deliverer = Deliverer(root, FAST)
    deliverer.drain(timeout_s=10)
    deliverer.close()
    gone.close()
    assert receiver.ids() == {msg}
    log = Outbox.of(root).endpoint_log("acme", hook["id"])
    assert log["disabled"] and log["attempts"] == 1
    assert log["disabled_reason"] == "the endpoint answered 410 Gone"


def test_prune_forgets_finished_old_messages_only(client, tmp_path, receiver):
    receiver.fail_first = False
    receiver.secret = subscribe(client, receiver.url)["secret"]
    root = str(tmp_path)
    outbox = Outbox.of(root)
    old, kept = emit(root, "acme", "job.completed", {"n": 1}), None
    deliverer = Deliverer(root, FAST)
    deliverer.drain(timeout_s=10)
    kept = emit(root, "acme", "job.completed", {"n": 2})  # not delivered yet
    outbox._db().execute("UPDATE messages SET created_at = created_at - 30 * 86400")
    assert outbox.prune(keep_days=7) == 1
    assert outbox.message(old) is None and outbox.message(kept) is not None
    deliverer.drain(timeout_s=10)
    deliverer.close()
    assert receiver.ids() == {old, kept}

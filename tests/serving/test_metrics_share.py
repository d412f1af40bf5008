"""The worker's shared counters (`Metrics.share`) and its minute rows (`MinuteRecorder`) are
written when they changed, and not again while the worker is idle; what they hold is the same."""

from __future__ import annotations

import os

import orjson

from serving.control import timeseries
from serving.metrics import Metrics

KEY = ("/v1/recommend", "POST", "200", "acme")


def _requests(path: str) -> float:
    with open(path, "rb") as f:
        [row] = orjson.loads(f.read())["requests"]
    assert row[:4] == list(KEY)
    return sum(row[4:-1])


def test_an_idle_worker_does_not_rewrite_its_counters(tmp_path):
    metrics = Metrics()
    seen: list[dict] = []
    metrics.share(str(tmp_path), interval_s=3600, on_tick=seen.append)  # (ticks driven here)
    share = metrics.shared
    path = os.path.join(share.dir, f"{os.getpid()}.json")
    metrics.observe_request(KEY, 0.001)
    share.tick()
    assert _requests(path) == 1
    os.remove(path)  # (a write would bring it back)
    share.tick()
    share.tick()
    assert not os.path.exists(path)  # nothing changed: not written again
    metrics.observe_request(KEY, 0.001)
    share.tick()
    assert _requests(path) == 2
    assert len(seen) == 4  # the callbacks have every tick, written or not
    assert [sum(s["requests"][0][4:-1]) for s in seen] == [1, 1, 1, 2]
    # a scrape writes this worker's own state and sums the folder
    assert "recsys_http_requests_total" in metrics.render()


def test_a_failing_write_is_logged_when_it_starts_and_when_it_ends(tmp_path, caplog):
    metrics = Metrics()
    metrics.share(str(tmp_path), interval_s=3600)  # (ticks driven here)
    share = metrics.shared
    folder = share.dir
    os.rename(folder, folder + ".away")  # (a test's temporary folder removed under a worker)
    for _ in range(5):
        metrics.observe_request(KEY, 0.001)
        share.tick()
    failed = [r for r in caplog.records if "shared metrics failed" in r.getMessage()]
    assert len(failed) == 1 and failed[0].exc_info is not None
    os.rename(folder + ".away", folder)
    share.tick()
    assert [r.getMessage() for r in caplog.records][-1] == "writing the shared metrics works again"
    assert _requests(os.path.join(folder, f"{os.getpid()}.json")) == 5


def test_the_minute_rows_are_not_rewritten_while_nothing_changed(tmp_path):
    path = str(tmp_path / "ts.sqlite")
    now = [1_800_000_000.0]  # a minute boundary
    metrics = Metrics()
    rec = timeseries.MinuteRecorder(path, "s/1", lambda t: "snap-1", clock=lambda: now[0])

    def wal() -> int:
        return os.path.getsize(path + "-wal")

    for _ in range(3):
        metrics.observe_request(KEY, 0.0004)
    rec.tick(metrics.state())  # the first tick writes (5 s since "never")
    after_first = wal()
    now[0] += 6
    rec.tick(metrics.state())  # 6 s later, the same counts: no write
    assert wal() == after_first
    metrics.observe_request(KEY, 0.0004)
    now[0] += 6
    rec.tick(metrics.state())  # 6 s later, one more request: written
    assert wal() > after_first
    out = timeseries.query(path, "acme", now[0] - 60, now[0] + 60)
    assert out["routes"][0]["requests"] == 4

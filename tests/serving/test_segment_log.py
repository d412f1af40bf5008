"""serving.segment_log on its own: a generic log of framed JSON records shared by two views, and
the group commit's answers (results in order, errors handed to every waiting request)."""

from __future__ import annotations

import os
import threading

import pytest

from serving.segment_log import GroupCommit, SegmentLog, list_segments


def test_two_views_share_one_log_and_a_payload_hook_skips_parsing(tmp_path):
    seen_a: list[tuple[int, dict]] = []
    seen_b: list[object] = []

    def peek(seg: int, offset: int, payload: bytes) -> bool:  # takes the "n" records raw
        if payload.startswith(b'{"k":"n"'):
            seen_b.append(payload)
            return True
        return False

    a = SegmentLog(str(tmp_path), lambda seg, off, rec: seen_a.append((seg, rec)))
    b = SegmentLog(str(tmp_path), lambda seg, off, rec: seen_b.append(rec), on_payload=peek)
    a.append(lambda: [{"k": "n", "v": 1}, {"k": "x", "v": 2}])
    closed = a.append(lambda: [{"k": "n", "v": 3}], roll=True)
    b.refresh()
    assert [rec for _, rec in seen_a] == [
        {"k": "n", "v": 1},
        {"k": "x", "v": 2},
        {"k": "n", "v": 3},
    ]
    assert seen_b == [b'{"k":"n","v":1}', {"k": "x", "v": 2}, b'{"k":"n","v":3}']
    assert closed == [1] and list_segments(os.path.join(str(tmp_path), "wal")) == [1, 2]
    a.close()
    b.close()


def test_group_commit_answers_each_request_with_its_results_in_order(tmp_path):
    log = SegmentLog(str(tmp_path), lambda seg, off, rec: None)

    def commit(batch):
        rows = []
        for p in batch:
            p.results = [r * 10 for r in p.rows]
            rows += [{"k": "r", "v": r} for r in p.rows]
        _, fd = log.append_unsynced(lambda: rows)
        return fd

    gc = GroupCommit("test", commit, linger_s=0.01)
    answers: dict[int, list[int]] = {}

    def send(i: int) -> None:
        answers[i] = gc.submit([i, i + 1])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(0, 20, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {i: [i * 10, (i + 1) * 10] for i in range(0, 20, 2)}
    log.close()


def test_a_failed_commit_is_raised_in_every_waiting_request_and_the_next_one_works():
    calls = {"n": 0}

    def commit(batch):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk gone")
        for p in batch:
            p.results = list(p.rows)
        return None  # nothing written: answered without an fsync

    gc = GroupCommit("test", commit)
    with pytest.raises(OSError, match="disk gone"):
        gc.submit(["a"])
    assert gc.submit(["b", "c"]) == ["b", "c"]

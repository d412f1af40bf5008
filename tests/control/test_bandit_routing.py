"""Bandits route /v1/recommend traffic: a simulated click stream through the real app (the
Falcon test client over the tiny published snapshots) in which one arm is known to be better;
the bandit sends most later traffic to it, its counts come from the impressions the served
answers let the client tag, and the experiment results show the allocation over time exactly
as posted.

Counts are cached per bandit (`refresh_s`): the tests use 0.1 s and wait that long between
rounds, so each round's choices read the previous rounds' events.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import orjson
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))
from serving_helpers import auth, build_client, make_config, publish_tiny  # noqa: E402

from serving.bandit_routing import ArmCountsCache  # noqa: E402
from serving.documents import DocumentStore  # noqa: E402
from serving.events_log import EventLogs  # noqa: E402
from serving.rules import assign_variant  # noqa: E402

ADMIN = auth("acme", ("recommend", "admin"))
BANDIT = "/v1/recs/exploration/bandit"
REFRESH_S = 0.1


@pytest.fixture()
def client(tmp_path):
    root = str(tmp_path / "root")
    publish_tiny(root, "acme", "a")
    publish_tiny(root, "globex", "g")
    return build_client(make_config(root))


def _post(client, path, body, headers=ADMIN):
    resp = client.simulate_post(path, json=body, headers=headers)
    assert resp.status_code in (200, 201), (path, resp.json)
    return resp.json


def _experiment(client, exp_id="exp-ab", surface="home"):
    return _post(
        client,
        "/v1/recs/experiments",
        {
            "id": exp_id,
            "surface": surface,
            "status": "running",
            "variants": [{"id": "A", "snapshot": "current"}, {"id": "B", "snapshot": "current"}],
        },
    )


def _send_events(client, events):
    sent = client.simulate_post(
        "/v1/recs/events/bulk",
        body=orjson.dumps(events),
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert sent.status_code == 200 and sent.json["rejected"] == 0, sent.json


def _stream(client, rounds, per_round, rates, arm_of, tag, seed, hour_of=None, click_at=0):
    """Serve `rounds` x `per_round` /v1/recommend requests (a new anonymous unit each), let
    the client show the first two items (impressions tagged with `tag(meta)` and the request
    id) and click the item at `click_at` with the known rate of the served arm
    (`arm_of(meta)`). Returns the arm of every request in order, the events posted and the
    clicks per arm."""
    rng = np.random.default_rng(seed)
    served: list[str] = []
    posted: list[dict] = []
    clicks = dict.fromkeys(rates, 0)
    for r in range(rounds):
        events = []
        hour = hour_of(r) if hour_of else 10
        for i in range(per_round):
            unit = f"v{seed}-{r}-{i}"
            resp = client.simulate_post(
                "/v1/recommend",
                json={"user": {"anonymous_id": unit}, "k": 5, "surface": "home"},
                headers=ADMIN,
            )
            assert resp.status_code == 200, resp.json
            meta = resp.json["meta"]
            arm = arm_of(meta)
            served.append(arm)
            ctx = {"request_id": meta["request_id"], **tag(meta)}
            stamp = f"2026-11-30T{hour:02d}:{i % 60:02d}:00Z"
            base = {"user_id": unit, "timestamp": stamp}
            for it in resp.json["items"][:2]:
                events.append(
                    {**base, "type": "impression", "item_id": it["item_id"], "context": ctx}
                )
            if rng.random() < rates[arm]:
                clicked = resp.json["items"][click_at]["item_id"]
                events.append(
                    {
                        **base,
                        "type": "click",
                        "item_id": clicked,
                        "context": {"request_id": meta["request_id"]},
                    }
                )
                clicks[arm] += 1
        _send_events(client, events)
        posted += events
        time.sleep(REFRESH_S * 1.5)  # (the next round reads counts that include this one)
    return served, posted, clicks


def test_a_bandit_over_an_experiment_sends_later_traffic_to_the_better_variant(client):
    _experiment(client)
    made = _post(
        client,
        BANDIT,
        {
            "bandit_id": "ab",
            "policy": "thompson",
            "experiment_id": "exp-ab",
            "seed": 7,
            "refresh_s": REFRESH_S,
        },
    )
    assert made["route"] is True and made["refresh_s"] == REFRESH_S
    rates = {"A": 0.05, "B": 0.5}

    def arm_of(meta):
        exp = meta["experiment"]
        assert exp["id"] == "exp-ab" and exp["bandit"] == "ab" and exp["assigned"] is True
        return exp["variant"]

    def tag(meta):
        return {"experiment": {"id": "exp-ab", "variant": meta["experiment"]["variant"]}}

    served, _, clicks = _stream(
        client, 8, 40, rates, arm_of, tag, seed=3, hour_of=lambda r: 8 + r // 2
    )
    later = served[-120:]  # the last three rounds
    assert later.count("B") / len(later) > 0.85, later.count("B")
    # (the first round, before any reward, is near even: the bandit learned it)
    assert served[:40].count("B") < 35

    # the bandit's counts are exactly the tagged requests and their clicks
    state = client.simulate_get(BANDIT, params={"bandit_id": "ab"}, headers=ADMIN).json
    arms = {a["arm"]: a for a in state["arms"]}
    assert arms["A"]["pulls"] == served.count("A") and arms["B"]["pulls"] == served.count("B")
    assert arms["A"]["rewards"] == clicks["A"] and arms["B"]["rewards"] == clicks["B"]
    assert state["best_arm"] == "B"

    # the experiment results show the allocation per hour: exactly what was posted
    res = client.simulate_get(
        "/v1/recs/experiments/exp-ab/results", params={"bucket": "hour"}, headers=ADMIN
    )
    assert res.status_code == 200, res.json
    alloc = res.json["allocation"]
    assert alloc["bucket"] == "hour"
    want: dict[str, dict[str, dict[str, int]]] = {}
    for r in range(8):
        start = f"2026-11-30T{8 + r // 2:02d}:00:00Z"
        for i in range(40):
            arm = served[r * 40 + i]
            cell = want.setdefault(start, {}).setdefault(
                arm, {"impressions": 0, "requests": 0, "units": 0}
            )
            cell["impressions"] += 2
            cell["requests"] += 1
            cell["units"] += 1
    assert {b["start"]: b["variants"] for b in alloc["series"]} == want
    assert [b["start"] for b in alloc["series"]] == sorted(want)
    daily = client.simulate_get("/v1/recs/experiments/exp-ab/results", headers=ADMIN).json[
        "allocation"
    ]
    assert daily["bucket"] == "day" and len(daily["series"]) == 1
    day = daily["series"][0]["variants"]
    assert day["B"]["requests"] == served.count("B") and day["A"]["units"] == served.count("A")


def test_an_exploration_slot_bandit_fills_its_slot_and_learns_the_better_arm(client):
    made = _post(
        client,
        BANDIT,
        {
            "bandit_id": "slot2",
            "policy": "thompson",
            "arms": ["promo", "deep"],
            "slot": 2,
            "surface": "home",
            "fill": {"promo": {"item_id": "a19"}, "deep": {"item_id": "a12"}},
            "seed": 1,
            "refresh_s": REFRESH_S,
        },
    )
    assert made["over"] == {"slot": 2, "surface": "home"}
    item_of = {"promo": "a19", "deep": "a12"}

    # a known user's list: the arm's item is placed at position 2, the list keeps k items
    one = client.simulate_post(
        "/v1/recommend", json={"user": {"user_id": "u1"}, "k": 4, "surface": "home"}, headers=ADMIN
    ).json
    bandit = one["meta"]["bandit"]
    assert bandit["id"] == "slot2" and bandit["slot"] == 2
    assert one["items"][1]["item_id"] == item_of[bandit["arm"]] == bandit["item_id"]
    assert [it["rank"] for it in one["items"]] == [1, 2, 3, 4]
    # (u1's own list without the bandit, on another surface: a0 a1 a3 a4 - a2 is unavailable)
    other = client.simulate_post(
        "/v1/recommend",
        json={"user": {"user_id": "u1"}, "k": 4, "surface": "pdp"},
        headers=ADMIN,
    ).json
    assert "bandit" not in other["meta"]
    assert [it["item_id"] for it in other["items"]] == ["a0", "a1", "a3", "a4"]
    assert [it["item_id"] for it in one["items"]] == ["a0", bandit["item_id"], "a1", "a3"]

    def arm_of(meta):
        return meta["bandit"]["arm"]

    def tag(meta):
        return {"bandit": {"id": "slot2", "arm": meta["bandit"]["arm"]}}

    rates = {"promo": 0.6, "deep": 0.05}
    served, _, clicks = _stream(client, 6, 40, rates, arm_of, tag, seed=5, click_at=1)
    later = served[-80:]
    assert later.count("promo") / len(later) > 0.85, later.count("promo")
    state = client.simulate_get(BANDIT, params={"bandit_id": "slot2"}, headers=ADMIN).json
    got = {a["arm"]: (a["pulls"], a["rewards"]) for a in state["arms"]}
    assert got == {arm: (served.count(arm), clicks[arm]) for arm in rates}


def test_choices_are_deterministic_given_seed_unit_and_counts(client):
    _experiment(client)
    _post(
        client,
        BANDIT,
        {
            "bandit_id": "ab",
            "policy": "epsilon_greedy",
            "epsilon": 0.5,
            "experiment_id": "exp-ab",
            "seed": 3,
            "refresh_s": 3600,
        },
    )

    def variant(unit):
        resp = client.simulate_post(
            "/v1/recommend",
            json={"user": {"anonymous_id": unit}, "surface": "home"},
            headers=ADMIN,
        )
        return resp.json["meta"]["experiment"]["variant"]

    first = [variant(f"w{i}") for i in range(40)]
    assert first == [variant(f"w{i}") for i in range(40)]
    assert set(first) == {"A", "B"}  # (epsilon 0.5 explores)
    # the assignment route tells the same arm
    for i in range(5):
        got = client.simulate_get(
            "/v1/recs/experiments/exp-ab/assignment", params={"user_id": f"w{i}"}, headers=ADMIN
        ).json
        assert got["variant"] == first[i]
    # a forced assignment still wins over the bandit
    forced = _post(client, "/v1/recs/experiments/exp-ab/assign", {"user_id": "w0", "variant": "B"})
    assert forced["forced"] is True
    assert variant("w0") == "B"


def test_without_a_routing_bandit_assignment_stays_hashed(client):
    _experiment(client)
    exp = client.simulate_get("/v1/recs/experiments/exp-ab", headers=ADMIN).json
    weighted = [{**v, "weight": v["traffic"]} for v in exp["variants"]]

    def served(unit):
        return client.simulate_post(
            "/v1/recommend",
            json={"user": {"anonymous_id": unit}, "surface": "home"},
            headers=ADMIN,
        ).json["meta"]["experiment"]

    for unit in ("x1", "x2", "x3"):
        got = served(unit)
        assert "bandit" not in got
        assert got["variant"] == assign_variant("exp-ab", unit, weighted)["id"]
    # a bandit that does not route (route: false) leaves the assignment alone
    _post(
        client,
        BANDIT,
        {"bandit_id": "quiet", "policy": "ucb1", "experiment_id": "exp-ab", "route": False},
    )
    for unit in ("x1", "x2", "x3"):
        got = served(unit)
        assert "bandit" not in got
        assert got["variant"] == assign_variant("exp-ab", unit, weighted)["id"]


def test_routing_bad_configurations_are_problem_details(client):
    _experiment(client)
    _post(client, BANDIT, {"bandit_id": "ab", "policy": "ucb1", "experiment_id": "exp-ab"})
    slot = {"bandit_id": "s1", "policy": "ucb1", "arms": ["x", "y"], "slot": 1}
    for body, status in (
        # a second routing bandit over the same experiment
        ({"bandit_id": "ab2", "policy": "thompson", "experiment_id": "exp-ab"}, 409),
        # surface / fill belong to slot bandits
        ({"bandit_id": "ab3", "policy": "ucb1", "experiment_id": "exp-ab", "surface": "x"}, 422),
        ({**slot, "fill": {"x": {"item_id": "a1"}}}, 422),  # an arm without a fill
        ({**slot, "fill": {"x": {"item_id": "a1"}, "y": {}}}, 422),
        (
            {
                **slot,
                "fill": {"x": {"item_id": "a1"}, "y": {"item_id": "a2", "generator": "collab"}},
            },
            422,
        ),
        ({**slot, "fill": {"x": {"item_id": "a1"}, "y": {"generator": "magic"}}}, 400),
        ({**slot, "refresh_s": 0}, 400),
    ):
        resp = client.simulate_post(BANDIT, json=body, headers=ADMIN)
        assert resp.status_code == status, (body, resp.json)
        assert resp.headers["content-type"] == "application/problem+json"
    # one routing slot bandit per surface
    fill = {"x": {"item_id": "a1"}, "y": {"generator": "popularity"}}
    _post(client, BANDIT, {**slot, "fill": fill})
    dup = client.simulate_post(
        BANDIT, json={**slot, "bandit_id": "s2", "fill": fill}, headers=ADMIN
    )
    assert dup.status_code == 409 and dup.json["code"] == "RECSYS_BANDIT_CONFLICT"


def test_the_counts_are_shared_between_workers_and_refreshed_on_the_interval(tmp_path):
    """Two caches over one data root stand for two workers: the second reads the counts the
    first wrote instead of scanning the event log; after `refresh_s` a stale entry is served
    while one background refresh counts the new events."""
    root = str(tmp_path)
    logs = EventLogs(root, 0.05)
    docs = DocumentStore(os.path.join(root, "serving")).collection("bandits", prefix="bandit")
    spec = {
        "policy": "ucb1",
        "arms": ["x", "y"],
        "over": {"slot": 1, "surface": "home"},
        "fill": None,
        "route": True,
        "refresh_s": 0.5,
        "epsilon": 0.1,
        "seed": 0,
        "reward_events": ["click", "purchase"],
    }
    doc, _ = docs.put("acme", "b", spec)
    counts_root = os.path.join(root, "serving", "bandit_counts")

    def impressions(arm, n, start):
        rows = [
            {
                "user_id": f"u{start + k}",
                "item_id": "i1",
                "type": "impression",
                "timestamp": "2026-11-30T10:00:00Z",
                "context": {"request_id": f"r{start + k}", "bandit": {"id": "b", "arm": arm}},
            }
            for k in range(n)
        ]
        results = logs.tenant("acme").submit(rows)
        assert [r.status for r in results] == ["accepted"] * n

    impressions("x", 3, 0)
    first = ArmCountsCache(logs, counts_root)
    a = first.get("acme", doc)
    assert list(a.pulls) == [3, 0]
    second = ArmCountsCache(logs, counts_root)
    b = second.get("acme", doc)
    assert b.computed_at == a.computed_at and list(b.pulls) == [3, 0]  # (read, not counted)
    impressions("y", 2, 3)
    assert list(first.get("acme", doc).pulls) == [3, 0]  # (fresh for 0.5 s)
    time.sleep(0.6)
    stale = first.get("acme", doc)  # (served at once; a refresh starts behind it)
    assert list(stale.pulls) == [3, 0]
    deadline = time.monotonic() + 10
    while list(first.get("acme", doc).pulls) != [3, 2]:
        assert time.monotonic() < deadline, "the background refresh did not land"
        time.sleep(0.05)
    assert time.time() - first.get("acme", doc).computed_at < 10
    # a changed bandit (new revision) is counted again at once
    changed, _ = docs.put("acme", "b", {**spec, "policy": "thompson"})
    assert list(second.get("acme", changed).pulls) == [3, 2]


def test_a_slot_item_is_checked_like_a_pin_and_a_generator_fills_with_a_new_candidate(client):
    _post(
        client,
        BANDIT,
        {
            "bandit_id": "slot1",
            "policy": "ucb1",  # (no pulls: the first arm, for every unit)
            "arms": ["blocked", "fresh"],
            "slot": 1,
            "surface": "home",
            "fill": {"blocked": {"item_id": "a5"}, "fresh": {"generator": "popularity"}},
        },
    )
    body = {"user": {"user_id": "u1"}, "k": 3, "surface": "home"}
    one = client.simulate_post("/v1/recommend", json=body, headers=ADMIN).json
    assert one["meta"]["bandit"]["arm"] == "blocked" and one["items"][0]["item_id"] == "a5"
    # a block rule on the arm's item: nothing is placed (and no pull shown), a warning says so
    rules = {"rules": [{"id": "no-a5", "type": "block", "item_ids": ["a5"]}]}
    put = client.simulate_put("/v1/admin/tenants/acme/rules", json=rules, headers=ADMIN)
    assert put.status_code == 200, put.json
    blocked = client.simulate_post("/v1/recommend", json=body, headers=ADMIN).json
    assert "bandit" not in blocked["meta"]
    assert "BANDIT_SLOT_EMPTY" in [w["code"] for w in blocked["warnings"]]
    assert [it["item_id"] for it in blocked["items"]] == ["a0", "a1", "a3"]
    # the generator arm: popular's best item that the list lacks and u1 has not seen (a8 is
    # u1's seen item), at position 1
    _post(
        client,
        BANDIT,
        {
            "bandit_id": "slot1",
            "policy": "ucb1",
            "arms": ["fresh", "blocked"],
            "slot": 1,
            "surface": "home",
            "fill": {"blocked": {"item_id": "a5"}, "fresh": {"generator": "popularity"}},
        },
        headers={
            **ADMIN,
            "If-Match": client.simulate_get(
                BANDIT, params={"bandit_id": "slot1"}, headers=ADMIN
            ).headers["ETag"],
        },
    )
    fresh = client.simulate_post("/v1/recommend", json=body, headers=ADMIN).json
    assert fresh["meta"]["bandit"] == {"id": "slot1", "arm": "fresh", "slot": 1, "item_id": "a9"}
    assert [it["item_id"] for it in fresh["items"]] == ["a9", "a0", "a1"]


def test_a_slot_item_counts_toward_the_caps_and_a_ranked_item_makes_way(client):
    # brand nike: a0, a3, a5. u1's list with at most 2 nike items: a0 a1 a3 a4. The arm's a5
    # (nike) at slot 2 takes nike to 3: the last ranked nike item (a3) makes way, a6 does not
    # come back (the list was cut at k); a pinned nike item stays where it is pinned.
    _post(
        client,
        BANDIT,
        {
            "bandit_id": "slot2",
            "policy": "ucb1",
            "arms": ["nike", "other"],
            "slot": 2,
            "surface": "home",
            "fill": {"nike": {"item_id": "a5"}, "other": {"item_id": "a9"}},
        },
    )
    body = {
        "user": {"user_id": "u1"},
        "k": 4,
        "surface": "home",
        "constraints": {"max_per_tag": {"brand:nike": 2}},
        "options": {"include_trace": True},
    }
    capped = client.simulate_post("/v1/recommend", json=body, headers=ADMIN).json
    assert capped["meta"]["bandit"]["item_id"] == "a5"
    assert [it["item_id"] for it in capped["items"]] == ["a0", "a5", "a1", "a4"]
    assert capped["meta"]["counts"]["capped"] == 1
    made_way = [t for t in capped["trace"] if t["outcome"] == "capped"]
    assert {"item_id": "a3", "source": "bandit:slot2", "rule": "max_per_tag:brand:nike"} in [
        {k: t[k] for k in ("item_id", "source", "rule")} for t in made_way
    ]
    # without the cap the list is u1's own with a5 at slot 2
    plain = {k: v for k, v in body.items() if k != "constraints"}
    free = client.simulate_post("/v1/recommend", json=plain, headers=ADMIN).json
    assert [it["item_id"] for it in free["items"]] == ["a0", "a5", "a1", "a3"]
    # a pinned nike item stays: a0 (ranked) makes way instead
    rules = {"rules": [{"id": "pin-a3", "type": "pin", "item_id": "a3", "position": 4}]}
    put = client.simulate_put("/v1/admin/tenants/acme/rules", json=rules, headers=ADMIN)
    assert put.status_code == 200, put.json
    pinned = client.simulate_post("/v1/recommend", json=body, headers=ADMIN).json
    assert [it["item_id"] for it in pinned["items"]] == ["a1", "a5", "a4", "a3"]
    # and holds its position 4 without caps too (the slot's item no longer pushes it past k)
    held = client.simulate_post("/v1/recommend", json=plain, headers=ADMIN).json
    assert [it["item_id"] for it in held["items"]] == ["a0", "a5", "a1", "a3"]


def test_a_slot_item_moved_from_above_a_pin_leaves_the_pin_where_it_is(client):
    # u1 with a3 pinned at position 3: a0 a1 a3 a4. The arm's a0 (in the list) moves to
    # slot 4: a1 and a4 move up around the pin, which keeps position 3.
    rules = {"rules": [{"id": "pin-a3", "type": "pin", "item_id": "a3", "position": 3}]}
    put = client.simulate_put("/v1/admin/tenants/acme/rules", json=rules, headers=ADMIN)
    assert put.status_code == 200, put.json
    body = {"user": {"user_id": "u1"}, "k": 4, "surface": "home"}
    before = client.simulate_post("/v1/recommend", json=body, headers=ADMIN).json
    assert [it["item_id"] for it in before["items"]] == ["a0", "a1", "a3", "a4"]
    _post(
        client,
        BANDIT,
        {
            "bandit_id": "slot4",
            "policy": "ucb1",
            "arms": ["top", "other"],
            "slot": 4,
            "surface": "home",
            "fill": {"top": {"item_id": "a0"}, "other": {"item_id": "a9"}},
        },
    )
    moved = client.simulate_post("/v1/recommend", json=body, headers=ADMIN).json
    assert moved["meta"]["bandit"] == {"id": "slot4", "arm": "top", "slot": 4, "item_id": "a0"}
    assert [it["item_id"] for it in moved["items"]] == ["a1", "a4", "a3", "a0"]

"""Bandits: the policies converge to the best arm of a simulated click stream whose answer is
known, choices are deterministic given the seed, and /v1/recs/exploration/bandit counts pulls
and rewards from the event log (clicks attributed to impressions by request id and item)."""

from __future__ import annotations

import os
import sys

import numpy as np
import orjson
import polars as pl
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))
from serving_helpers import auth, build_client, make_config, publish_tiny  # noqa: E402

from recsys import bandits  # noqa: E402

# arm 2 is the best, by a known margin (at rates 0.02 / 0.05 / 0.10 UCB1's bonus still
# dominates after 6,000 steps: 68% of the last 2,000 pulls on the best arm, seed 11)
RATES = [0.05, 0.10, 0.30]
ADMIN = auth("acme", ("recommend", "admin"))
PATH = "/v1/recs/exploration/bandit"


# --- the math -----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [11, 12, 13])
@pytest.mark.parametrize("policy", bandits.POLICIES)
def test_each_policy_converges_to_the_known_best_arm(policy, seed):
    sim = bandits.simulate(policy, RATES, 6000, seed=seed, epsilon=0.1)
    assert np.argmax(sim.pulls) == 2
    # over the last 2,000 steps the best arm takes most pulls (epsilon-greedy explores 10%)
    assert sim.share(2000)[2] > 0.8, sim.share(2000)
    assert sim.pulls.sum() == 6000 and (sim.rewards <= sim.pulls).all()


def test_choices_are_deterministic_given_seed_and_unit():
    pulls, rewards = np.array([10, 10, 10]), np.array([1, 5, 2])
    for policy in bandits.POLICIES:
        a = [bandits.choose_for(policy, pulls, rewards, 7, f"u{i}", 0.5) for i in range(50)]
        b = [bandits.choose_for(policy, pulls, rewards, 7, f"u{i}", 0.5) for i in range(50)]
        assert a == b
    # epsilon 0.5 explores: another seed gives another sequence
    c = [bandits.choose_for("epsilon_greedy", pulls, rewards, 8, f"u{i}", 0.5) for i in range(50)]
    assert c != a


def test_bounds_and_posteriors_by_hand():
    # UCB1: t = 20, arm 0: 2/10 + sqrt(2 ln 20 / 10), arm 1: never pulled -> inf
    ucb = bandits.ucb1_bounds([20, 0], [4, 0])
    assert ucb[0] == pytest.approx(0.2 + np.sqrt(2 * np.log(20) / 20))
    assert np.isinf(ucb[1])
    a, b = bandits.beta_posterior([10, 4], [3, 4])
    assert list(a) == [4, 5] and list(b) == [8, 1]
    assert bandits.choose("ucb1", [5, 0, 5], [5, 0, 5], np.random.default_rng(0)) == 1
    assert bandits.prob_best([1000, 1000], [100, 300], seed=1)[1] == 1.0
    with pytest.raises(ValueError):
        bandits.means([1], [2])


def test_count_arms_attributes_rewards_by_request_and_item():
    rows = []

    def ev(eid, kind, item, req, arm=None, day=1):
        ctx: dict = {"request_id": req}
        if arm:
            ctx["bandit"] = {"id": "b", "arm": arm}
        rows.append((eid, "u", item, kind, f"2025-01-0{day}T10:00:00", orjson.dumps(ctx).decode()))

    ev("1", "impression", "i1", "r1", "x")
    ev("2", "impression", "i2", "r1", "x")  # same request: one pull
    ev("3", "click", "i2", "r1")  # rewarded
    ev("4", "impression", "i1", "r2", "y", day=2)
    ev("5", "click", "i9", "r2")  # an item r2 did not show: unattributed
    ev("6", "impression", "i1", "r3", "zzz")  # unknown arm
    frame = pl.DataFrame(
        rows,
        schema=["event_id", "user_id", "item_id", "event_type", "timestamp", "context"],
        orient="row",
    ).with_columns(pl.col("timestamp").str.to_datetime(time_zone="UTC"))
    got = bandits.count_arms(frame, ("x", "y"), bandit_id="b")
    assert list(got.pulls) == [1, 1] and list(got.rewards) == [1, 0]
    assert got.left_out == {"unknown_arm": 1, "unattributed": 1}
    assert got.daily == [
        {"date": "2025-01-01", "pulls": {"x": 1}},
        {"date": "2025-01-02", "pulls": {"y": 1}},
    ]


# --- the API ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bandits"))
    publish_tiny(root, "acme", "a")
    publish_tiny(root, "globex", "g")
    return build_client(make_config(root))


def _stream(n_requests: int, rates: dict[str, float], seed: int) -> list[dict]:
    """Impressions of `n_requests` requests spread over the arms in turn, clicks with each
    arm's known rate, all tagged with a request id."""
    rng = np.random.default_rng(seed)
    arms = list(rates)
    out = []
    for r in range(n_requests):
        arm = arms[r % len(arms)]
        req = f"req-{seed}-{r}"
        ctx = {"request_id": req, "bandit": {"id": "home-slot", "arm": arm}}
        base = {"user_id": f"u{r}", "timestamp": "2025-01-01T10:00:00Z"}
        out.append({**base, "type": "impression", "item_id": "a3", "context": ctx})
        if rng.random() < rates[arm]:
            out.append({**base, "type": "click", "item_id": "a3", "context": {"request_id": req}})
    return out


def test_bandit_api_counts_the_event_log_and_picks_the_best_arm(client):
    made = client.simulate_post(
        PATH,
        json={"bandit_id": "home-slot", "policy": "ucb1", "arms": ["pop", "trend"], "slot": 3},
        headers=ADMIN,
    )
    assert made.status_code == 201, made.json
    assert made.json["total_pulls"] == 0 and made.json["best_arm"] is None
    events = _stream(300, {"pop": 0.05, "trend": 0.6}, seed=3)
    sent = client.simulate_post(
        "/v1/recs/events/bulk",
        body=orjson.dumps(events),
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert sent.json["rejected"] == 0, sent.json
    clicks = {
        arm: sum(
            1
            for e in events
            if e["type"] == "click" and int(e["context"]["request_id"].rsplit("-", 1)[1]) % 2 == j
        )
        for j, arm in enumerate(("pop", "trend"))
    }
    state = client.simulate_get(PATH, params={"bandit_id": "home-slot"}, headers=auth()).json
    arms = {a["arm"]: a for a in state["arms"]}
    assert arms["pop"]["pulls"] == 150 and arms["trend"]["pulls"] == 150
    assert arms["pop"]["rewards"] == clicks["pop"] and arms["trend"]["rewards"] == clicks["trend"]
    assert arms["trend"]["alpha"] == 1 + clicks["trend"]
    assert state["best_arm"] == "trend" and state["allocation"][0]["pulls"] == {
        "pop": 150,
        "trend": 150,
    }
    # UCB1 on this state: the bound of trend is higher, every unit gets it
    chosen = client.simulate_post(
        PATH, json={"bandit_id": "home-slot", "unit": "visitor-1"}, headers=ADMIN
    )
    assert chosen.status_code == 200 and chosen.json["chosen"] == {
        "unit": "visitor-1",
        "arm": "trend",
    }
    # Thompson with a seed: the same unit gets the same arm every time
    again = client.simulate_post(
        PATH,
        json={
            "bandit_id": "home-slot",
            "policy": "thompson",
            "arms": ["pop", "trend"],
            "slot": 3,
            "seed": 5,
            "unit": "v",
        },
        headers={**ADMIN, "If-Match": made.headers["ETag"]},
    )
    assert again.status_code == 200, again.json
    picks = {
        client.simulate_post(
            PATH, json={"bandit_id": "home-slot", "unit": "v"}, headers=ADMIN
        ).json["chosen"]["arm"]
        for _ in range(3)
    }
    assert picks == {again.json["chosen"]["arm"]}


def test_bandit_bad_input_is_problem_details(client):
    for body, status in (
        ({"bandit_id": "b1", "policy": "ucb1", "arms": ["a", "b"]}, 422),  # neither slot nor exp
        (
            {
                "bandit_id": "b1",
                "policy": "ucb1",
                "arms": ["a", "b"],
                "slot": 1,
                "experiment_id": "e",
            },
            422,
        ),
        ({"bandit_id": "b1", "policy": "ucb1", "arms": ["a", "a"], "slot": 1}, 422),
        ({"bandit_id": "b1", "policy": "greedy", "arms": ["a", "b"], "slot": 1}, 400),
        ({"bandit_id": "b1", "policy": "ucb1", "experiment_id": "nope"}, 422),
        ({"bandit_id": "b1"}, 422),
        ({"bandit_id": "missing", "unit": "u"}, 404),
    ):
        resp = client.simulate_post(PATH, json=body, headers=ADMIN)
        assert resp.status_code == status, (body, resp.json)
        assert resp.headers["content-type"] == "application/problem+json"
    assert (
        client.simulate_get(PATH, params={"bandit_id": "nope"}, headers=auth()).status_code == 404
    )


def test_no_tenant_reaches_another_tenants_bandit(client):
    body = {"bandit_id": "secret-b", "policy": "ucb1", "arms": ["m1", "m2"], "slot": 2}
    assert client.simulate_post(PATH, json=body, headers=ADMIN).status_code == 201
    other = auth("globex", ("recommend", "admin"))
    spy = client.simulate_get(PATH, params={"bandit_id": "secret-b"}, headers=other)
    assert spy.status_code == 404 and "m1" not in spy.text
    ask = client.simulate_post(PATH, json={"bandit_id": "secret-b", "unit": "u"}, headers=other)
    assert ask.status_code == 404 and "m1" not in ask.text
    assert client.simulate_get(PATH, params={"bandit_id": "secret-b"}).status_code == 401
    org = auth("acme", ("recommend", "admin"), **{"X-Org-Id": "globex"})
    assert (
        client.simulate_get(PATH, params={"bandit_id": "secret-b"}, headers=org).status_code == 403
    )
    assert client.simulate_post(PATH, json=body, headers=org).status_code == 403

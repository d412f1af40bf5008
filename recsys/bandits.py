"""Multi-armed bandit policies over Bernoulli rewards: epsilon-greedy, UCB1, Thompson sampling.

Pure numpy, no Falcon: the server (`serving.control.pipelines`) counts each arm's pulls and
rewards from the event log and asks here which arm a unit gets and what each arm's estimate is.

An arm's state is two numbers: `pulls` (times it was shown) and `rewards` (how many of those
pulls earned a reward, 0 <= rewards <= pulls). A choice is deterministic given the state, the
policy's `seed` and the unit (a request id, user or session): the random stream of a choice is
seeded by ``(seed, blake2b(unit))``, so the same question asked of the same state gets the same
arm on every worker.

* epsilon-greedy: with probability `epsilon` a uniformly random arm, else the best mean (arms
  never pulled count as best, so each is tried);
* UCB1 (Auer et al. 2002): an arm never pulled first, else the arm maximising
  ``mean + sqrt(2 ln t / pulls)``, t = all pulls;
* Thompson sampling: one draw per arm from its Beta(1 + rewards, 1 + pulls - rewards)
  posterior; the largest draw wins.

`simulate` runs a policy against arms of known click rates (the known-answer test of
convergence).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

POLICIES: tuple[str, ...] = ("epsilon_greedy", "ucb1", "thompson")


def unit_rng(seed: int, unit: str) -> np.random.Generator:
    """The random stream of one choice: seeded by the policy's seed and the unit."""
    digest = hashlib.blake2b(unit.encode(), digest_size=8).digest()
    return np.random.default_rng([seed & 0xFFFFFFFF, int.from_bytes(digest, "big")])


def _state(pulls, rewards) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pulls, dtype=np.float64)
    r = np.asarray(rewards, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 1 or not p.size:
        raise ValueError("pulls and rewards must be two equal, non-empty 1-d arrays")
    if (p < 0).any() or (r < 0).any() or (r > p).any():
        raise ValueError("need 0 <= rewards <= pulls for every arm")
    return p, r


def means(pulls, rewards) -> np.ndarray:
    """Each arm's observed reward rate (NaN for an arm never pulled)."""
    p, r = _state(pulls, rewards)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(p > 0, r / np.where(p > 0, p, 1), np.nan)


def ucb1_bounds(pulls, rewards) -> np.ndarray:
    """UCB1 upper bounds ``mean + sqrt(2 ln t / pulls)`` (inf for an arm never pulled)."""
    p, r = _state(pulls, rewards)
    t = max(p.sum(), 1.0)
    safe = np.where(p > 0, p, 1)
    bound = r / safe + np.sqrt(2.0 * np.log(t) / safe)
    return np.where(p > 0, bound, np.inf)


def beta_posterior(pulls, rewards) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) of each arm's Beta posterior under a uniform Beta(1, 1) prior."""
    p, r = _state(pulls, rewards)
    return 1.0 + r, 1.0 + p - r


def choose(
    policy: str,
    pulls,
    rewards,
    rng: np.random.Generator | None,
    epsilon: float = 0.1,
) -> int:
    """The arm `policy` picks given the state, drawing from `rng` (None for UCB1, which draws
    nothing). Ties go to the lowest index."""
    p, r = _state(pulls, rewards)
    if policy == "epsilon_greedy":
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError("epsilon must be in [0, 1]")
        explore = rng.random() < epsilon
        arm = int(rng.integers(p.size))  # (always drawn: the stream's use does not branch)
        if explore:
            return arm
        unpulled = np.flatnonzero(p == 0)
        if unpulled.size:
            return int(unpulled[0])
        return int(np.argmax(r / p))
    if policy == "ucb1":
        return int(np.argmax(ucb1_bounds(p, r)))
    if policy == "thompson":
        a, b = beta_posterior(p, r)
        return int(np.argmax(rng.beta(a, b)))
    raise ValueError(f"unknown policy {policy!r}; expected one of {', '.join(POLICIES)}")


def choose_for(policy: str, pulls, rewards, seed: int, unit: str, epsilon: float = 0.1) -> int:
    """`choose` with the unit's own seeded stream: deterministic given (state, seed, unit).
    (UCB1 draws nothing: no stream is built for it.)"""
    rng = None if policy == "ucb1" else unit_rng(seed, unit)
    return choose(policy, pulls, rewards, rng, epsilon)


def prob_best(pulls, rewards, seed: int = 0, draws: int = 20_000) -> np.ndarray:
    """Each arm's posterior probability of being the best (Monte Carlo over Beta draws,
    seeded): what Thompson sampling's allocation converges to."""
    a, b = beta_posterior(pulls, rewards)
    rng = np.random.default_rng(seed)
    samples = rng.beta(a, b, size=(draws, a.size))
    wins = np.bincount(np.argmax(samples, axis=1), minlength=a.size)
    return wins / draws


@dataclass(frozen=True)
class Simulation:
    """What `simulate` returns: final state and the arm chosen at each step."""

    pulls: np.ndarray
    rewards: np.ndarray
    chosen: np.ndarray  # int[n_steps]

    def share(self, last: int | None = None) -> np.ndarray:
        """Fraction of pulls per arm (over the last `last` steps, or all)."""
        tail = self.chosen if last is None else self.chosen[-last:]
        return np.bincount(tail, minlength=self.pulls.size) / max(tail.size, 1)


def simulate(policy: str, rates, n_steps: int, seed: int = 0, epsilon: float = 0.1) -> Simulation:
    """Run `policy` for `n_steps` against Bernoulli arms of known `rates` (seeded clicks)."""
    rates = np.asarray(rates, dtype=np.float64)
    pulls = np.zeros(rates.size)
    rewards = np.zeros(rates.size)
    chosen = np.empty(n_steps, dtype=np.int64)
    rng = np.random.default_rng(seed)
    clicks = np.random.default_rng(seed + 1).random(n_steps)
    for step in range(n_steps):
        arm = choose(policy, pulls, rewards, rng, epsilon)
        chosen[step] = arm
        pulls[arm] += 1
        rewards[arm] += clicks[step] < rates[arm]
    return Simulation(pulls, rewards, chosen)


# --- pulls and rewards from an event log ------------------------------------------------------
@dataclass(frozen=True)
class ArmCounts:
    """Pulls and rewards per arm counted from events, the daily allocation, what was left out."""

    arms: tuple[str, ...]
    pulls: np.ndarray
    rewards: np.ndarray
    daily: list[dict]  # [{"date": "YYYY-MM-DD", "pulls": {arm: n}}], oldest first
    left_out: dict[str, int]


def count_arms(
    events,
    arms: tuple[str, ...],
    *,
    bandit_id: str | None = None,
    experiment_id: str | None = None,
    reward_types: tuple[str, ...] = ("click", "purchase"),
) -> ArmCounts:
    """Each arm's pulls and rewards from `events` (a polars LazyFrame or DataFrame in the
    events contract).

    A *pull* is one request that showed an arm: impressions whose JSON context names the arm -
    ``{"bandit": {"id", "arm"}}`` (or, for a bandit over an experiment's variants,
    ``{"experiment": {"id", "variant"}}``) - grouped by ``context.request_id`` (an impression
    without one is a pull of its own). A pull is *rewarded* when an event of `reward_types`
    carries the same ``context.request_id`` and names one of the items that request showed
    (clicks and purchases are attributed to impressions by request id and item). Arms not in
    `arms` are counted in ``left_out["unknown_arm"]``; reward events matching no pull in
    ``left_out["unattributed"]``.
    """
    import polars as pl

    lf = events.lazy() if isinstance(events, pl.DataFrame) else events
    ctx = pl.col("context")
    if bandit_id is not None:
        owner, arm = "$.bandit.id", "$.bandit.arm"
        wanted = bandit_id
    elif experiment_id is not None:
        owner, arm = "$.experiment.id", "$.experiment.variant"
        wanted = experiment_id
    else:
        raise ValueError("count_arms needs a bandit_id or an experiment_id")
    df = (
        lf.filter(pl.col("event_type").is_in(["impression", *reward_types]))
        .select(
            "event_id",
            "event_type",
            "item_id",
            "timestamp",
            ctx.str.json_path_match("$.request_id").alias("_req"),
            ctx.str.json_path_match(owner).alias("_owner"),
            ctx.str.json_path_match(arm).alias("_arm"),
        )
        .collect()
    )
    shown = df.filter((pl.col("event_type") == "impression") & (pl.col("_owner") == wanted))
    shown = shown.with_columns(pl.coalesce("_req", pl.lit("event:") + pl.col("event_id")))
    unknown = shown.filter(~pl.col("_arm").is_in(list(arms)))
    shown = shown.filter(pl.col("_arm").is_in(list(arms)))
    # a request is one pull of the arm it showed (its first impression's, if it showed several)
    pulls = (
        shown.sort("timestamp")
        .group_by("_req", maintain_order=True)
        .agg(pl.col("_arm").first(), pl.col("timestamp").min().alias("_t"))
    )
    rewarded_pairs = (
        df.filter(pl.col("event_type").is_in(list(reward_types)) & pl.col("_req").is_not_null())
        .select("_req", "item_id")
        .unique()
    )
    shown_pairs = shown.select("_req", "item_id").unique()
    hit = rewarded_pairs.join(shown_pairs, on=["_req", "item_id"], how="inner")
    unattributed = rewarded_pairs.height - hit.height
    rewarded = pulls.join(hit.select("_req").unique(), on="_req", how="inner")
    index = {a: j for j, a in enumerate(arms)}
    n_pulls = np.zeros(len(arms))
    n_rewards = np.zeros(len(arms))
    for a, n in pulls.group_by("_arm").len().iter_rows():
        n_pulls[index[a]] = n
    for a, n in rewarded.group_by("_arm").len().iter_rows():
        n_rewards[index[a]] = n
    daily: list[dict] = []
    if pulls.height:
        per_day = (
            pulls.with_columns(pl.col("_t").dt.date().cast(pl.String).alias("_d"))
            .group_by("_d", "_arm")
            .len()
            .sort("_d", "_arm")
        )
        by_day: dict[str, dict[str, int]] = {}
        for d, a, n in per_day.iter_rows():
            by_day.setdefault(d, {}).update({a: n})
        daily = [{"date": d, "pulls": by_day[d]} for d in sorted(by_day)]
    return ArmCounts(
        tuple(arms),
        n_pulls,
        n_rewards,
        daily,
        {"unknown_arm": unknown.height, "unattributed": unattributed},
    )

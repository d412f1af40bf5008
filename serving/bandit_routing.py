"""Bandits that route /v1/recommend traffic: which bandit owns a request, which arm its unit
gets, and the arm counts the choice reads (cached, shared by every worker).

Configuration (the bandit names what it routes; see docs/serving.md, "Bandits"):

* a bandit over an experiment (``over.experiment_id``) takes over that experiment's assignment
  while the experiment is live: the unit (user, anonymous or session id) gets the arm the
  policy chooses, unless it was force-assigned. At most one bandit per experiment.
* a bandit over an exploration slot (``over.slot`` + ``over.surface``) with a ``fill`` for
  every arm puts the chosen arm's item (``{"item_id"}``) or the best new candidate of a
  generator (``{"generator"}``) at that position of the surface's lists. At most one per
  surface.
* ``route: false`` keeps a bandit out of the traffic (query it through the API only).

The choice is `recsys.bandits.choose_for(policy, pulls, rewards, seed, unit)`: deterministic
given the seed, the unit and the counts of that moment. Counts are never scanned per request:
`ArmCountsCache` keeps them per process, refreshes them at most every ``refresh_s`` seconds
(the bandit's setting, default 10), and shares each refresh with every worker through a file
``<data root>/serving/bandit_counts/<tenant>/<bandit id>.json`` written under a file lock, so
one process scans the event log per interval and the others read its result. A stale entry is
served while one background thread refreshes it (only the very first choice after a bandit is
configured or changed waits for a count).

Staleness bound: the counts a choice reads are at most ``refresh_s`` + the time of one count
+ ``refresh_s / 4`` (how often a process looks at the shared file while stale) old, and miss
the events other workers have not flushed yet (``RECSYS_EVENTS_FLUSH_S``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import orjson

from recsys import bandits
from recsys.durable import write_atomic
from recsys.tenancy import check_tenant
from serving.documents import Collection, Document
from serving.events_log import EventLogs, scan_all_events

DEFAULT_REFRESH_S = 10.0
log = logging.getLogger("recsys.serving")


def count_bandit(event_logs: EventLogs, tenant: str, doc: Document) -> bandits.ArmCounts:
    """Pulls and rewards of a bandit's arms counted from the tenant's event log now
    (`recsys.bandits.count_arms`: impressions tagged with the arm - the bandit's, or the
    experiment variant's for a bandit over an experiment - and clicks/purchases attributed to
    them by request id and item)."""
    spec = doc.body
    over = spec["over"]
    events = scan_all_events(event_logs.data_root, tenant, event_logs.tenant(tenant))
    return bandits.count_arms(
        events,
        tuple(spec["arms"]),
        bandit_id=None if "experiment_id" in over else doc.id,
        experiment_id=over.get("experiment_id"),
        reward_types=tuple(spec["reward_events"]),
    )


@dataclass
class Counts:
    """One bandit's arm counts as of `computed_at` (wall clock, shared between processes)."""

    revision: str
    pulls: np.ndarray
    rewards: np.ndarray
    computed_at: float
    checked_at: float = 0.0  # (monotonic: this process's last look at the shared file)


class ArmCountsCache:
    """Per-bandit counts, refreshed on the bandit's interval and shared through files (see the
    module docstring)."""

    def __init__(self, event_logs: EventLogs, root: str) -> None:
        self._logs = event_logs
        self._root = root  # <data root>/serving/bandit_counts
        self._entries: dict[tuple[str, str], Counts] = {}
        self._busy: set[tuple[str, str]] = set()
        self._mutex = threading.Lock()

    def _path(self, tenant: str, bandit_id: str, ext: str) -> str:
        return os.path.join(self._root, check_tenant(tenant), f"{bandit_id}.{ext}")

    def get(self, tenant: str, doc: Document) -> Counts:
        """The counts a choice reads now (see the staleness bound)."""
        key = (tenant, doc.id)
        refresh = float(doc.body.get("refresh_s", DEFAULT_REFRESH_S))
        entry = self._entries.get(key)
        now = time.time()
        if entry is not None and entry.revision == doc.revision:
            if now - entry.computed_at < refresh:
                return entry
            mono = time.monotonic()
            if mono - entry.checked_at < min(refresh / 4, 1.0):
                return entry  # (stale; a refresh is under way or was just looked for)
            entry.checked_at = mono
            shared = self._read(tenant, doc)
            if shared is not None and shared.computed_at > entry.computed_at:
                shared.checked_at = mono
                self._entries[key] = entry = shared
            if now - entry.computed_at >= refresh:
                self._refresh_soon(tenant, doc)
            return entry
        shared = self._read(tenant, doc)
        if shared is not None:
            shared.checked_at = time.monotonic()
            self._entries[key] = shared
            if now - shared.computed_at >= refresh:
                self._refresh_soon(tenant, doc)
            return shared
        return self.refresh(tenant, doc, wait=True)  # (nothing counted yet for this revision)

    def refresh(self, tenant: str, doc: Document, wait: bool) -> Counts | None:
        """Count now, unless another process is counting (then: wait for its file, or return
        None without `wait`) or has just counted."""
        key = (tenant, doc.id)
        refresh = float(doc.body.get("refresh_s", DEFAULT_REFRESH_S))
        lock_path = self._path(tenant, doc.id, "lock")
        os.makedirs(os.path.dirname(lock_path), exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            shared = self._read(tenant, doc)
            if shared is not None and time.time() - shared.computed_at < refresh:
                entry = shared
            else:
                started = time.time()
                got = count_bandit(self._logs, tenant, doc)
                entry = Counts(doc.revision, got.pulls, got.rewards, started)
                write_atomic(
                    self._path(tenant, doc.id, "json"),
                    orjson.dumps(
                        {
                            "revision": doc.revision,
                            "arms": list(doc.body["arms"]),
                            "pulls": got.pulls.tolist(),
                            "rewards": got.rewards.tolist(),
                            "computed_at": started,
                        }
                    ),
                    sync=False,
                )
        finally:
            os.close(fd)
        entry.checked_at = time.monotonic()
        current = self._entries.get(key)
        if current is None or current.computed_at <= entry.computed_at:
            self._entries[key] = entry
        return entry

    def _refresh_soon(self, tenant: str, doc: Document) -> None:
        """One background refresh per bandit and process at a time."""
        key = (tenant, doc.id)
        with self._mutex:
            if key in self._busy:
                return
            self._busy.add(key)

        def run() -> None:
            try:
                self.refresh(tenant, doc, wait=False)
            except Exception:  # (logged; the stale counts keep serving, the next look retries)
                log.exception("bandit %s/%s: counting arms failed", tenant, doc.id)
            finally:
                with self._mutex:
                    self._busy.discard(key)

        threading.Thread(target=run, name=f"bandit-count-{doc.id}", daemon=True).start()

    def _read(self, tenant: str, doc: Document) -> Counts | None:
        """The shared file's counts when they are of this revision of the bandit."""
        try:
            with open(self._path(tenant, doc.id, "json"), "rb") as f:
                raw = orjson.loads(f.read())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        if raw.get("revision") != doc.revision or raw.get("arms") != doc.body["arms"]:
            return None
        return Counts(
            doc.revision,
            np.asarray(raw["pulls"], dtype=np.float64),
            np.asarray(raw["rewards"], dtype=np.float64),
            float(raw["computed_at"]),
        )


class BanditRouter:
    """Which bandit routes a request, and the arm it gives a unit (installed on the
    experiments store and the recommend service by the bandits area)."""

    def __init__(self, docs: Collection, event_logs: EventLogs, data_root: str) -> None:
        self._docs = docs
        self.counts = ArmCountsCache(
            event_logs, os.path.join(data_root, "serving", "bandit_counts")
        )
        # tenant -> (the collection's cached {id: doc}, {experiment id: doc}, {surface: doc})
        self._index: dict[str, tuple[dict, dict[str, Document], dict[str, Document]]] = {}

    def _routes(self, tenant: str) -> tuple[dict, dict[str, Document], dict[str, Document]]:
        docs = self._docs.cached_list(tenant)
        memo = self._index.get(tenant)
        if memo is None or memo[0] is not docs:
            by_exp: dict[str, Document] = {}
            by_surface: dict[str, Document] = {}
            for doc in sorted(docs.values(), key=lambda d: d.id):  # (a race: the first id wins)
                body = doc.body
                if not body.get("route", True):
                    continue
                over = body["over"]
                if "experiment_id" in over:
                    by_exp.setdefault(over["experiment_id"], doc)
                elif body.get("fill") and over.get("surface"):
                    by_surface.setdefault(over["surface"], doc)
            memo = self._index[tenant] = (docs, by_exp, by_surface)
        return memo

    def for_experiment(self, tenant: str, exp_id: str) -> Document | None:
        """The bandit that routes experiment `exp_id`, if any (one dict lookup while the
        tenant's bandits are unchanged)."""
        return self._routes(tenant)[1].get(exp_id)

    def slot_bandits(self, tenant: str) -> dict[str, Document]:
        """{surface: its exploration-slot bandit} (the same dict while the tenant's bandits are
        unchanged; do not modify it)."""
        return self._routes(tenant)[2]

    def choose(self, tenant: str, doc: Document, unit: str, allowed: set[str] | None = None):
        """The arm `unit` gets (None when no arm is `allowed`): the policy over the cached
        counts, deterministic given (counts, seed, unit)."""
        spec = doc.body
        arms = spec["arms"]
        keep = [j for j, a in enumerate(arms) if allowed is None or a in allowed]
        if not keep:
            return None
        counts = self.counts.get(tenant, doc)
        j = bandits.choose_for(
            spec["policy"],
            counts.pulls[keep],
            counts.rewards[keep],
            spec["seed"],
            unit,
            spec["epsilon"],
        )
        return arms[keep[j]]

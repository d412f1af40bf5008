"""Cold-start seed lists per tenant and surface (POST/GET /v1/recs/seed, GET/DELETE
/v1/recs/seed/{surface}).

A seed is ``{"surface", "item_ids": [...], "strategy": <snapshot fallback name> | null}``:
the curated items first (in the given order), then the named fallback list of the live
snapshot (``popular``, ``trending``, ``category:<c>``, ``tag:<t>``, ``segment:<s>``). Surface
``*`` applies to every surface without its own seed. `/v1/recommend` answers unknown users
without anchors from the seed of their surface (`SeedStore.cold_start_pool`), then back-fills
from the snapshot's fallbacks as before.

Stored as one JSON document per tenant, ``<data root>/serving/seeds/<tenant>.json`` (atomic
replace, versioned: ETag / If-Match, 409 on a stale version).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import threading
import time
from typing import Any

import falcon
import numpy as np
import orjson

from recsys.durable import write_atomic
from recsys.snapshot.format import REASON_CODES
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.errors import ProblemError, bad_request, unprocessable
from serving.recs.events import _json
from serving.rules import Pool
from serving.snapshot import LiveSnapshot
from serving.validation import if_match

MAX_SEED_ITEMS = 1000
ANY_SURFACE = "*"
_FALLBACK_PREFIXES = ("category:", "tag:", "segment:")


class SeedConflict(Exception):
    def __init__(self, current: str | None) -> None:
        super().__init__(current)
        self.current = current


def validate_seed(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict) or set(body) - {"surface", "item_ids", "strategy"}:
        raise bad_request('A seed is {"surface", "item_ids": [...], "strategy": "<fallback>"}.')
    surface = body.get("surface", ANY_SURFACE)
    if not isinstance(surface, str) or not 0 < len(surface) <= 256:
        raise bad_request("Field 'surface' must be a non-empty string ('*': every surface).")
    items = body.get("item_ids", [])
    if not isinstance(items, list) or len(items) > MAX_SEED_ITEMS:
        raise bad_request(f"Field 'item_ids' must be an array of at most {MAX_SEED_ITEMS} ids.")
    if not all(isinstance(i, str) and 0 < len(i.encode()) <= 256 for i in items):
        raise bad_request("Every item id must be a string of 1..256 bytes.")
    strategy = body.get("strategy")
    if strategy is not None and (
        not isinstance(strategy, str)
        or not (strategy in ("popular", "trending") or strategy.startswith(_FALLBACK_PREFIXES))
    ):
        raise unprocessable(
            "Field 'strategy' must be popular, trending, category:<c>, tag:<t> or segment:<s>."
        )
    if not items and strategy is None:
        raise unprocessable("A seed needs item_ids, a strategy, or both.")
    return {"surface": surface, "item_ids": list(dict.fromkeys(items)), "strategy": strategy}


class SeedStore:
    """The seed documents of every tenant (cached; re-read when the file changes)."""

    def __init__(self, root: str, check_interval_s: float = 1.0) -> None:
        self.root = root
        self._interval = check_interval_s
        self._cache: dict[str, tuple[float, tuple, dict[str, Any]]] = {}
        self._mutex = threading.Lock()

    def _path(self, tenant: str) -> str:
        return os.path.join(self.root, f"{tenant}.json")

    def read(self, tenant: str) -> dict[str, Any]:
        """``{"version": str | None, "surfaces": {surface: seed}}``."""
        now = time.monotonic()
        entry = self._cache.get(tenant)
        if entry is not None and now - entry[0] < self._interval:
            return entry[2]
        try:
            st = os.stat(self._path(tenant))
            sig: tuple = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            sig = ()
        if entry is not None and entry[1] == sig:
            self._cache[tenant] = (now, sig, entry[2])
            return entry[2]
        doc: dict[str, Any] = {"version": None, "surfaces": {}}
        if sig:
            with open(self._path(tenant), "rb") as f:
                doc = orjson.loads(f.read())
        self._cache[tenant] = (now, sig, doc)
        return doc

    def change(self, tenant: str, surface: str, seed: dict | None, expected: str | None) -> dict:
        """Set (or with None remove) the seed of `surface`; returns the new document."""
        os.makedirs(self.root, exist_ok=True)
        with self._mutex, open(self._path(tenant) + ".lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            self._cache.pop(tenant, None)
            doc = self.read(tenant)
            if expected not in (None, "*") and expected != doc["version"]:
                raise SeedConflict(doc["version"])
            surfaces = dict(doc["surfaces"])
            if seed is None:
                if surface not in surfaces:
                    raise ProblemError(
                        404, f"No seed for surface '{surface}'.", code="RECSYS_UNKNOWN_SEED"
                    )
                surfaces.pop(surface)
            else:
                stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
                surfaces[surface] = {**seed, "updated_at": stamp.replace("+00:00", "Z")}
            new = {"version": f"seed_{time.time_ns():x}", "surfaces": surfaces}
            data = orjson.dumps(new, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
            write_atomic(self._path(tenant), data)
            self._cache.pop(tenant, None)
        return new

    def seed_for(self, tenant: str, surface: str) -> tuple[str, dict[str, Any]] | None:
        surfaces = self.read(tenant)["surfaces"]
        for key in (surface, ANY_SURFACE):
            if key in surfaces:
                return key, surfaces[key]
        return None

    def cold_start_pool(self, tenant: str, live: LiveSnapshot, surface: str) -> Pool | None:
        """The candidates of an unknown user on `surface`: curated items (scores 1 .. 0.5,
        best first), then the strategy's fallback list (scores halved, so they rank after).
        None when the tenant has no seed for the surface or none of its items is known."""
        found = self.seed_for(tenant, surface)
        if found is None:
            return None
        key, seed = found
        idx = [i for i in map(live.item_index, seed["item_ids"]) if i is not None]
        n = len(idx)
        items = list(idx)
        scores = [1.0 - 0.5 * j / max(1, n) for j in range(n)]
        if seed.get("strategy"):
            fb = live.snap.fallback(seed["strategy"])
            if fb is not None:
                have = set(items)
                top = float(fb[1][0]) if fb[1].shape[0] and fb[1][0] > 0 else 1.0
                for it, sc in zip(fb[0].tolist(), fb[1].tolist(), strict=True):
                    if it not in have:
                        have.add(it)
                        items.append(int(it))
                        scores.append(0.5 * float(sc) / top * 0.999)
        if not items:
            return None
        return Pool(
            np.asarray(items, dtype=np.int32),
            np.asarray(scores, dtype=np.float32),
            None,
            np.full(len(items), REASON_CODES["popular"], dtype=np.uint8),
            f"seed:{key}",
        )


class SeedResource:
    required_scope = {"GET": SCOPE_RECOMMEND, "POST": SCOPE_ADMIN, "DELETE": SCOPE_ADMIN}

    def __init__(self, seeds: SeedStore) -> None:
        self._seeds = seeds

    def _send(self, resp: falcon.Response, tenant: str, doc: dict[str, Any]) -> None:
        resp.media = {"tenant_id": tenant, "version": doc["version"], "surfaces": doc["surfaces"]}
        if doc["version"]:
            resp.etag = f'"{doc["version"]}"'
        resp.cache_control = ["no-store"]

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        self._send(resp, tenant, self._seeds.read(tenant))

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        seed = validate_seed(_json(req))
        tenant = req.context.principal.tenant
        try:
            doc = self._seeds.change(tenant, seed["surface"], seed, if_match(req))
        except SeedConflict as e:
            raise ProblemError(
                409,
                f"The seeds changed: stored version is {e.current!r}.",
                extra={"current_version": e.current},
            ) from None
        self._send(resp, tenant, doc)

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, surface: str) -> None:
        doc = self._seeds.read(req.context.principal.tenant)
        seed = doc["surfaces"].get(surface)
        if seed is None:
            raise ProblemError(404, f"No seed for surface '{surface}'.", code="RECSYS_UNKNOWN_SEED")
        resp.media = {"surface": surface, **seed, "version": doc["version"]}
        resp.cache_control = ["no-store"]

    def on_delete_one(self, req: falcon.Request, resp: falcon.Response, surface: str) -> None:
        tenant = req.context.principal.tenant
        try:
            doc = self._seeds.change(tenant, surface, None, if_match(req))
        except SeedConflict as e:
            raise ProblemError(
                409,
                f"The seeds changed: stored version is {e.current!r}.",
                extra={"current_version": e.current},
            ) from None
        self._send(resp, tenant, doc)

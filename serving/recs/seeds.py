"""Cold-start seed lists per tenant and surface (POST/GET /v1/recs/seed, GET/DELETE
/v1/recs/seed/{surface}).

A seed is ``{"surface", "item_ids": [...], "strategy": <snapshot fallback name> | null}``:
the curated items first (in the given order), then the named fallback list of the live
snapshot (``popular``, ``trending``, ``category:<c>``, ``tag:<t>``, ``segment:<s>``). Surface
``*`` applies to every surface without its own seed. `/v1/recommend` answers unknown users
without anchors from the seed of their surface (`SeedStore.cold_start_pool`), then back-fills
from the snapshot's fallbacks as before.

Stored as one document per tenant in the document store (`serving.documents`):
``<data root>/serving/seeds/<tenant>/surfaces.json`` (versioned: ETag / If-Match, 409 on a
stale version; a tenant's ``seeds/<tenant>.json`` of an earlier release is read, and moved by
its next change).
"""

from __future__ import annotations

from typing import Any

import falcon
import numpy as np

from recsys.snapshot.format import REASON_CODES
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.documents import NONE, Collection, Document, Legacy, Preconditions, now_iso, set_etag
from serving.errors import ProblemError, unprocessable
from serving.recs.schemas import SeedRequest
from serving.rules import Pool
from serving.snapshot import LiveSnapshot

ANY_SURFACE = "*"


def validate_seed(body: SeedRequest) -> dict[str, Any]:
    """A seed as stored (item ids deduplicated); 422 when it names neither items nor a
    strategy (the schema checks the rest)."""
    if not body.item_ids and body.strategy is None:
        raise unprocessable("A seed needs item_ids, a strategy, or both.")
    return {
        "surface": body.surface,
        "item_ids": list(dict.fromkeys(body.item_ids)),
        "strategy": body.strategy,
    }


def _legacy_seeds(raw: dict[str, Any]) -> tuple[str, dict[str, Any], None, None]:
    """``<root>/<tenant>.json`` = ``{"version", "surfaces"}`` (before the document store)."""
    return raw["version"], {"surfaces": raw["surfaces"]}, None, None


class SeedStore:
    """The seed lists of every tenant: one document per tenant (`serving.documents`),
    ``<root>/<tenant>/surfaces.json`` = ``{"surfaces": {surface: seed}}``, cached for the hot
    path (re-read when the file changes)."""

    DOCUMENT = "surfaces"

    def __init__(self, root: str, check_interval_s: float = 1.0) -> None:
        self.root = root
        self.documents = Collection(
            root,
            "seeds",
            folder="{tenant}",
            ids=(self.DOCUMENT,),
            prefix="seed",
            legacy=Legacy(_legacy_seeds, path=lambda tenant, _: f"{tenant}.json"),
            check_interval_s=check_interval_s,
        )

    def read(self, tenant: str) -> Document | None:
        """The tenant's seeds (None: it has none), cached."""
        return self.documents.cached(tenant, self.DOCUMENT)

    def change(
        self, tenant: str, surface: str, seed: dict | None, pre: Preconditions = NONE
    ) -> Document:
        """Set (or with None remove) the seed of `surface`; returns the new document."""

        def new(current: Document | None) -> dict[str, Any]:
            surfaces = dict(current.body["surfaces"]) if current is not None else {}
            if seed is None:
                if surface not in surfaces:
                    raise ProblemError(
                        404, f"No seed for surface '{surface}'.", code="RECSYS_UNKNOWN_SEED"
                    )
                surfaces.pop(surface)
            else:
                surfaces[surface] = {**seed, "updated_at": now_iso()}
            return {"surfaces": surfaces}

        return self.documents.put(tenant, self.DOCUMENT, new, pre)[0]

    def seed_for(self, tenant: str, surface: str) -> tuple[str, dict[str, Any]] | None:
        doc = self.read(tenant)
        surfaces = doc.body["surfaces"] if doc is not None else {}
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

    def _send(self, resp: falcon.Response, tenant: str, doc: Document | None) -> None:
        version = doc.revision if doc is not None else None
        surfaces = doc.body["surfaces"] if doc is not None else {}
        resp.media = {"tenant_id": tenant, "version": version, "surfaces": surfaces}
        set_etag(resp, version)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        self._send(resp, tenant, self._seeds.read(tenant))

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        seed = validate_seed(req.context.body)
        tenant = req.context.principal.tenant
        doc = self._seeds.change(tenant, seed["surface"], seed, Preconditions.of(req))
        self._send(resp, tenant, doc)

    def on_get_one(self, req: falcon.Request, resp: falcon.Response, surface: str) -> None:
        doc = self._seeds.read(req.context.principal.tenant)
        seed = doc.body["surfaces"].get(surface) if doc is not None else None
        if seed is None:
            raise ProblemError(404, f"No seed for surface '{surface}'.", code="RECSYS_UNKNOWN_SEED")
        resp.media = {"surface": surface, **seed, "version": doc.revision}
        set_etag(resp, doc.revision)

    def on_delete_one(self, req: falcon.Request, resp: falcon.Response, surface: str) -> None:
        tenant = req.context.principal.tenant
        self._send(resp, tenant, self._seeds.change(tenant, surface, None, Preconditions.of(req)))

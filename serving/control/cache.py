"""Cache control: the precomputed snapshot is the cache.

* ``GET /v1/recs/cache/status``: per surface, how many answers came from a user's precomputed
  list (a hit) against anchors (similar items of what the request names) and fallback lists
  (unknown or anonymous users, invalidated users), summed over every worker (the
  `recsys_cache_answers_total` counter of `serving.metrics`, shared like /metrics); the live
  snapshot's age against its TTL and its size; the invalidations in force.
* ``POST /v1/recs/cache/invalidate`` ``{keys, patterns, item_ids, pipeline}``:
  - ``item_ids`` and ``item:<id>`` keys and ``item:<glob>`` patterns (resolved against the live
    snapshot's catalogue): the items leave every served list - recommendations, similar items,
    back-fill - on every worker within the document check interval (`snapshot_check_s`, 1 s),
    with no rebuild: they are one more "block" rule, compiled once per revision into the rules
    engine's blocked items (`CacheState.rules`). An item stays out until a snapshot that no
    longer holds it is live (its entry is then dropped);
  - ``user:<id>`` / ``user:<id>:<surface>`` keys, ``segment:<name>`` keys and ``user:<glob>`` /
    ``segment:<glob>`` patterns: those users' precomputed lists are not served (the answer
    comes from anchors or the fallback lists, like an unknown user) until a new snapshot is
    live, which recomputed them;
  - ``pipeline``: the tenant's cached config, rules and snapshot state are dropped and CURRENT
    re-read on this worker now, on the others within the check interval (the admin route's
    `CacheInvalidateResource.invalidate`).
  The invalidations are one versioned document per tenant (``cache/<tenant>/current.json`` in
  the `DocumentStore`), which every worker reads through `Collection.cached`.
* ``POST /v1/recs/cache/prewarm`` ``{user_ids, segments}``: reads the users' precomputed rows
  (candidates, scores, signals, reasons, seen items) so their pages of the memory map are in
  the page cache, which every worker shares (a worker then takes at most a minor fault).
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import time
from typing import Annotated, Any

import falcon
import numpy as np
from msgspec import Meta

from serving.auth import SCOPE_ADMIN
from serving.documents import Document, Preconditions
from serving.errors import ProblemError
from serving.metrics import merge_states
from serving.resources.admin import CacheInvalidateResource
from serving.routing import Route
from serving.schemas import Body, Id, Reply

#: A snapshot older than this is reported stale (the pipeline publishes daily).
SNAPSHOT_TTL_S = 86400
MAX_KEYS = 10_000
MAX_PATTERNS = 64
MAX_PREWARM_USERS = 200_000
SOURCES = ("precomputed", "anchors", "fallback")

Key = Annotated[str, Meta(min_length=3, max_length=600, pattern=r"^(user|item|segment):.+")]
Pattern = Annotated[str, Meta(min_length=3, max_length=300, pattern=r"^(user|item|segment):.+")]


class InvalidateBody(Body):
    keys: Annotated[list[Key], Meta(max_length=MAX_KEYS)] = []
    patterns: Annotated[list[Pattern], Meta(max_length=MAX_PATTERNS)] = []
    item_ids: Annotated[list[Id], Meta(max_length=MAX_KEYS)] = []
    pipeline: Id | None = None


class InvalidateResult(Reply):
    tenant_id: str
    revision: str | None
    items: int
    users: int
    segments: int
    user_patterns: int
    unknown_items: list[str]
    pipeline: str | None
    detail: str


class PrewarmBody(Body):
    user_ids: Annotated[list[Id], Meta(max_length=MAX_KEYS)] = []
    segments: Annotated[list[Id], Meta(max_length=MAX_PATTERNS)] = []


class PrewarmResult(Reply):
    tenant_id: str
    snapshot_id: str
    users: int
    unknown_users: list[str]
    bytes_read: int
    elapsed_ms: float


class SurfaceAnswers(Reply):
    surface: str
    precomputed: int
    anchors: int
    fallback: int
    hit_rate: float | None


class SnapshotState(Reply):
    snapshot_id: str | None
    created_at: str | None
    age_s: float | None
    ttl_s: int
    stale: bool
    users: int
    items: int
    bytes: int


class Invalidations(Reply):
    revision: str | None
    items: list[str]
    users: int
    segments: list[str]
    patterns: list[str]


class CacheStatus(Reply):
    tenant_id: str
    snapshot: SnapshotState
    surfaces: list[SurfaceAnswers]
    total: SurfaceAnswers
    invalidations: Invalidations


_TAGS = ("cache",)
ROUTES: tuple[Route, ...] = (
    Route(
        "GET",
        "/v1/recs/cache/status",
        ("cache", "on_get_status"),
        "Hit rate of precomputed lists per surface, snapshot age against its TTL, invalidations",
        SCOPE_ADMIN,
        response=CacheStatus,
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/cache/invalidate",
        ("cache", "on_post_invalidate"),
        "Invalidate items, users, segments or a pipeline's cached state",
        SCOPE_ADMIN,
        body=InvalidateBody,
        status=202,
        response=InvalidateResult,
        errors=(409, 422, 503),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/cache/prewarm",
        ("cache", "on_post_prewarm"),
        "Page in the precomputed rows of users or segments",
        SCOPE_ADMIN,
        body=PrewarmBody,
        response=PrewarmResult,
        errors=(422, 503),
        tags=_TAGS,
    ),
)


class CacheState:
    """What the recommend service reads of the invalidations (`RecommendService.cache`), and
    the answer counter it feeds."""

    def __init__(self, documents: Any, metrics: Any) -> None:
        self.docs = documents.collection("cache", ids=("current",), prefix="inv")
        self._answers = metrics.answers

    def current(self, tenant: str) -> Document | None:
        """The tenant's invalidations document (cached: re-read when its file changed), or
        None when nothing was invalidated."""
        return self.docs.cached(tenant, "current")

    def rules(self, doc: Document | None, rules: Any, version: str | None) -> tuple[Any, Any]:
        """(rules, compile key): the tenant's rules plus a block rule of the items its
        invalidations document `doc` names, keyed by both revisions (compiled once per pair and
        snapshot)."""
        if doc is None or not doc.body.get("items"):
            return rules, version
        block = doc.body.get("_rule")
        if block is None:  # (built once per document object: `cached` returns the same one)
            block = {
                "id": "cache-invalidation",
                "type": "block",
                "item_ids": list(doc.body["items"]),
            }
            doc.body["_rule"] = block
        return [*rules, block], (version, doc.revision)

    def user_invalidated(self, doc: Document, user_id: str, surface: str, live: Any, uidx: int):
        """Does the invalidations document `doc` name the user's precomputed list (for this
        surface, this snapshot)?"""
        body = doc.body
        sid = live.snapshot_id
        entry = body.get("users", {}).get(user_id)
        if (
            entry is not None
            and entry["snapshot_id"] == sid
            and (not entry["surfaces"] or surface in entry["surfaces"])
        ):
            return True
        for pattern, psid in body.get("user_patterns", {}).items():
            if psid == sid and fnmatch.fnmatchcase(user_id, pattern):
                return True
        segments = body.get("segments")
        if segments:
            segment = live.user_segment(uidx)
            for pattern, psid in segments.items():
                if psid == sid and segment is not None and fnmatch.fnmatchcase(segment, pattern):
                    return True
        return False

    def count(self, tenant: str, surface: str, source: str) -> None:
        self._answers.inc((tenant, surface, source))


class CacheResource:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx
        self.state = CacheState(ctx.documents, ctx.metrics)
        ctx.service.cache = self.state
        self._admin = CacheInvalidateResource(ctx.tenant_store, ctx.store)

    # status ---------------------------------------------------------------------------------
    def on_get_status(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        share = self._ctx.metrics.shared
        states = share.all_states() if share is not None else [self._ctx.metrics.state()]
        answers = merge_states(states)["answers"]
        per: dict[str, dict[str, int]] = {}
        for (t, surface, source), n in answers.items():
            if t == tenant:
                per.setdefault(surface, dict.fromkeys(SOURCES, 0))[source] = int(n)
        total = dict.fromkeys(SOURCES, 0)
        for counts in per.values():
            for s in SOURCES:
                total[s] += counts[s]
        live = self._ctx.store.live(tenant)
        doc = self._prune(tenant, live)
        body = doc.body if doc is not None else {}
        resp.cache_control = ["no-store"]
        resp.media = {
            "tenant_id": tenant,
            "snapshot": _snapshot_state(live),
            "surfaces": [_answers(s, c) for s, c in sorted(per.items())],
            "total": _answers("*", total),
            "invalidations": {
                "revision": doc.revision if doc is not None else None,
                "items": sorted(body.get("items", {})),
                "users": len(body.get("users", {})),
                "segments": sorted(body.get("segments", {})),
                "patterns": sorted(f"user:{p}" for p in body.get("user_patterns", {})),
            },
        }

    # invalidate -----------------------------------------------------------------------------
    def on_post_invalidate(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: InvalidateBody = req.context.body
        live = self._ctx.store.live(tenant)
        items, users, segments, user_patterns, item_patterns = _parse(body)
        if (items or users or segments or user_patterns or item_patterns) and live is None:
            raise ProblemError(
                503,
                f"No snapshot is loaded for tenant '{tenant}': nothing to invalidate in.",
                code="RECSYS_NO_SNAPSHOT",
            )
        unknown: list[str] = []
        if live is not None:
            for item_id in list(items):
                if live.item_index(item_id) is None:
                    unknown.append(item_id)
                    items.remove(item_id)
            if item_patterns:
                items |= _matching_items(live, item_patterns)
        now = _now()
        sid = live.snapshot_id if live is not None else None
        coll = self.state.docs
        before = coll.get(tenant, "current")
        doc = before
        if items or users or segments or user_patterns:

            def merged(current: Any) -> dict[str, Any]:  # (under the folder's lock)
                stored = dict(current.body) if current is not None else {}
                stored.pop("_rule", None)
                stored = _pruned(stored, live)
                stored["items"] = {
                    **stored.get("items", {}),
                    **{i: {"at": now, "snapshot_id": sid} for i in sorted(items)},
                }
                merged_users = dict(stored.get("users", {}))
                for user_id, surfaces in users.items():
                    merged_users[user_id] = {"surfaces": sorted(surfaces), "snapshot_id": sid}
                stored["users"] = merged_users
                for name, new in (("segments", segments), ("user_patterns", user_patterns)):
                    stored[name] = {**stored.get(name, {}), **dict.fromkeys(sorted(new), sid)}
                return stored

            doc, _ = coll.put(tenant, "current", merged)
        if body.pipeline is not None:
            self._admin.invalidate(tenant, list(CacheInvalidateResource.TARGETS))
        req.context.audit = {
            "target": f"cache/{tenant}",
            "before": before.revision if before is not None else None,
            "after": doc.revision if doc is not None else None,
        }
        resp.status = falcon.HTTP_202
        resp.media = {
            "tenant_id": tenant,
            "revision": doc.revision if doc is not None else None,
            "items": len(items),
            "users": len(users),
            "segments": len(segments),
            "user_patterns": len(user_patterns),
            "unknown_items": unknown,
            "pipeline": body.pipeline,
            "detail": "in force on this worker now, on every worker within "
            f"{self._ctx.config.snapshot_check_s:g} s",
        }

    def _prune(self, tenant: str, live: Any):
        """The invalidation document, with the entries no live snapshot needs dropped."""
        coll = self.state.docs
        doc = coll.get(tenant, "current")
        if doc is None or live is None:
            return doc
        body = {k: v for k, v in doc.body.items() if k != "_rule"}
        pruned = _pruned(body, live)
        if pruned == body:
            return doc
        try:
            new, _ = coll.put(tenant, "current", pruned, Preconditions().matching(doc.revision))
        except ProblemError:  # (changed meanwhile: the next look prunes)
            return coll.get(tenant, "current")
        return new

    # prewarm --------------------------------------------------------------------------------
    def on_post_prewarm(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: PrewarmBody = req.context.body
        live = self._ctx.store.require_live(tenant)
        snap = live.snap
        t = time.perf_counter()
        rows: list[int] = []
        unknown: list[str] = []
        for user_id in dict.fromkeys(body.user_ids):
            uidx = snap.user_index(user_id)
            if uidx is None:
                unknown.append(user_id)
            else:
                rows.append(uidx)
        if body.segments:
            codes = [i for i, s in enumerate(snap.segments) if s in set(body.segments)]
            missing = set(body.segments) - set(snap.segments)
            if missing:
                raise ProblemError(
                    422,
                    f"Unknown segment(s): {', '.join(sorted(missing))}.",
                    code="RECSYS_UNKNOWN_SEGMENT",
                )
            rows.extend(snap.users_in_segments(codes).tolist())
        if len(rows) > MAX_PREWARM_USERS:
            raise ProblemError(
                422,
                f"{len(rows)} users; prewarm at most {MAX_PREWARM_USERS} in one request.",
                code="RECSYS_TOO_MANY_USERS",
            )
        read = 0
        for uidx in rows:  # (reading every byte faults each page of the rows in)
            for part in (*snap.user_candidates(uidx), snap.user_seen(uidx)):
                np.asarray(part).view(np.uint8).max(initial=0)
                read += part.nbytes
        resp.media = {
            "tenant_id": tenant,
            "snapshot_id": live.snapshot_id,
            "users": len(rows),
            "unknown_users": unknown,
            "bytes_read": read,
            "elapsed_ms": round((time.perf_counter() - t) * 1000, 3),
        }


def _parse(body: InvalidateBody):
    """(item ids, {user: surfaces}, segment patterns, user patterns, item patterns); 422 for
    a key or pattern that is not one."""
    items = set(body.item_ids)
    users: dict[str, set[str]] = {}
    segments: set[str] = set()
    user_patterns: set[str] = set()
    item_patterns: set[str] = set()
    for key in body.keys:
        kind, _, rest = key.partition(":")
        if kind == "item":
            items.add(rest)
        elif kind == "segment":
            segments.add(rest)
        else:
            user_id, _, surface = rest.partition(":")
            if not user_id:
                raise ProblemError(422, f"Key '{key}' names no user.", code="RECSYS_BAD_KEY")
            surfaces = users.setdefault(user_id, set())
            if surface:
                surfaces.add(surface)
    for pattern in body.patterns:
        kind, _, rest = pattern.partition(":")
        {"item": item_patterns, "segment": segments, "user": user_patterns}[kind].add(rest)
    return items, users, segments, user_patterns, item_patterns


def _matching_items(live: Any, patterns: set[str]) -> set[str]:
    ids = live.item_ids(list(range(live.snap.n_items)))
    out: set[str] = set()
    for pattern in patterns:
        out.update(fnmatch.filter(ids, pattern))
    return out


def _pruned(body: dict[str, Any], live: Any) -> dict[str, Any]:
    """`body` without what the live snapshot no longer needs: items it does not hold that were
    invalidated under another snapshot, and user / segment entries of older snapshots."""
    if live is None:
        return body
    sid = live.snapshot_id
    out = dict(body)
    out["items"] = {
        i: e
        for i, e in body.get("items", {}).items()
        if e["snapshot_id"] == sid or live.item_index(i) is not None
    }
    out["users"] = {u: e for u, e in body.get("users", {}).items() if e["snapshot_id"] == sid}
    for name in ("segments", "user_patterns"):
        out[name] = {p: s for p, s in body.get(name, {}).items() if s == sid}
    return out


def _answers(surface: str, counts: dict[str, int]) -> dict[str, Any]:
    n = sum(counts.values())
    return {
        "surface": surface,
        **counts,
        "hit_rate": round(counts["precomputed"] / n, 6) if n else None,
    }


def _snapshot_state(live: Any) -> dict[str, Any]:
    from serving.control.monitoring import disk_usage

    if live is None:
        return {
            "snapshot_id": None,
            "created_at": None,
            "age_s": None,
            "ttl_s": SNAPSHOT_TTL_S,
            "stale": True,
            "users": 0,
            "items": 0,
            "bytes": 0,
        }
    age = time.time() - live.created_ts
    return {
        "snapshot_id": live.snapshot_id,
        "created_at": dt.datetime.fromtimestamp(live.created_ts, dt.UTC).isoformat(),
        "age_s": round(age, 1),
        "ttl_s": SNAPSHOT_TTL_S,
        "stale": age > SNAPSHOT_TTL_S,
        "users": int(live.snap.n_users),
        "items": int(live.snap.n_items),
        "bytes": disk_usage(live.snap.path),
    }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

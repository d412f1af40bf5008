"""The live snapshot of every tenant, hot-reloaded without a restart or a failed request.

`SnapshotRegistry.live(tenant)` is called on every request. At most once per
`check_interval_s` it stats ``snapshots/<tenant>/CURRENT``; when the file changed and names
another snapshot, the new one is opened (memory-mapped, structurally verified, its ids decoded)
and the reference is swapped. Requests in flight keep the object they already hold. A snapshot
that fails to open is refused: the last good one keeps serving and the failure is logged and
counted.

With ``background=True`` (the server's registry) a tenant that already serves a snapshot opens
the next one in a thread while the old one keeps answering, so no request waits for the load
(under load that wait exceeded the request deadline: a 504 at each deploy); the first snapshot
of a tenant, and every load of a registry without it (tests, tools), is opened in the request
that found it.

Arrays are memory-mapped read-only, so gunicorn workers share them through the page cache; the
only per-process state is a handful of small Python objects per snapshot.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import pairwise
from typing import Any

import numpy as np
import orjson

from recsys.snapshot import Snapshot, SnapshotError, SnapshotStore, open_snapshot
from recsys.snapshot.format import CURRENT
from recsys.tenancy import check_tenant, is_valid_tenant
from serving import kernels
from serving.crr import overlay as item_overlay
from serving.crr.overlay import OVERLAY_CHECK_S
from serving.metrics import Metrics

log = logging.getLogger("recsys.serving")

#: Item id strings kept per worker and snapshot (~70 bytes each): decoding ids from the mapped
#: byte array costs about a microsecond each, a dict hit a tenth of that.
ID_CACHE_SIZE = 200_000

#: Resolved request constraints kept per worker and snapshot (`LiveSnapshot.remember`).
RESOLVED_SIZE = 4096


class LiveSnapshot:
    """An open snapshot plus plain-ndarray views of the arrays the rules engine reads.

    (np.memmap slices carry subclass overhead on every operation; `np.asarray` views of the
    same pages avoid it without copying.)
    """

    def __init__(self, snap: Snapshot) -> None:
        self.snap = snap
        self.snapshot_id = snap.snapshot_id
        self.created_ts = snap.created_at.timestamp()
        self.available = np.asarray(snap.available)
        self.category_id = np.asarray(snap.category_id)
        self.brand_id = np.asarray(snap.brand_id)
        # Tag CSR (offsets int64[n_items+1], ids int32[]): the reader exposes tags per item only;
        # the engine's kernels read the whole table.
        self.tag_offsets = np.asarray(snap.item_tags_offsets)
        self.tag_ids = np.asarray(snap.item_tags_ids)
        models = snap.manifest.get("models") or {}
        champion = models.get("champion") or next(iter(models.values()), {})
        name, version = champion.get("name"), champion.get("version")
        self.algo_version = f"{name}@{version}" if name else f"snapshot@{snap.snapshot_id}"
        self.compiled: OrderedDict[Any, Any] = OrderedDict()  # rules-engine cache (bounded)
        # Request constraints resolved against this snapshot (tag ids, caps), by their values.
        self.resolved: dict[Any, Any] = {}
        self.n_tags = len(snap.tags)
        # Item id strings by index (a list: cheaper than a dict to look up; 8 bytes per item
        # plus the strings decoded so far, at most ID_CACHE_SIZE of them). A catalogue of at
        # most ID_CACHE_SIZE items is decoded whole now (~10 ms per 100k ids, before the swap):
        # a worker that just loaded a snapshot answers without decoding ids one by one.
        decoded = encoded = None
        if snap.n_items <= ID_CACHE_SIZE:
            data, offsets = snap.item_id_bytes()
            decoded = _decoded_ids(data, offsets)
            # The same ids as orjson writes them inside their quotes (bytes; memoized alike).
            encoded = _json_fields(data, offsets, decoded)
        self._id_cache: list[str | None] = decoded or [None] * snap.n_items
        self._id_cached = snap.n_items if decoded else 0
        self._idj_cache: list[bytes | None] = encoded or [None] * snap.n_items
        self._idj_cached = snap.n_items if encoded else 0
        self._index_cache: dict[str, int] = {}  # (-1: not in the snapshot)
        self.fallback_names = frozenset(snap.fallback_names)
        # bool[n_items] of unavailable items (private, n_items bytes), or empty when every item
        # is available (the engine then skips the check).
        unavailable = ~self.available
        self.unavailable_or_empty = unavailable if unavailable.any() else np.zeros(0, dtype=bool)
        # Scratch of the compiled kernels (serving.kernels): set and cleared within one call.
        self.marks = np.zeros(max(1, snap.n_items), dtype=np.uint8)
        self.roles = np.zeros(max(1, self.n_tags), dtype=np.uint8)
        # Per-user candidate counts and segments (Python ints, no NumPy scalars).
        self._cand_off_mv = memoryview(np.ascontiguousarray(snap.candidate_offsets))
        self._segment_mv = memoryview(np.ascontiguousarray(snap.user_segment_codes))
        # One int64 word per item (kernels.item_bits_into: its tags below 61 and whether it is
        # unavailable, as bits; 8 bytes per item): the common request's kernel reads it
        # instead of the tag table.
        self.item_bits = np.zeros(snap.n_items, dtype=np.int64)
        kernels.item_bits_into(
            self.tag_offsets, self.tag_ids, self.unavailable_or_empty, self.n_tags, self.item_bits
        )
        self.bind_kernels(snap)

    def bind_kernels(self, snap: Snapshot) -> None:
        """Capture the arrays `kernels.outcomes_select_user` reads: `snap`'s candidate and seen
        rows and this object's item arrays (again after a copy replaced them: the item
        overlays of `serving.crr.overlay`)."""
        #: The arrays the kernel reads, as (address, length) pairs, or None when a snapshot's
        #: arrays are not laid out as that kernel reads them.
        self.kernel_ctx, self._ctx_arrays = _kernel_ctx(snap, self)

    def user_segment(self, uidx: int) -> str | None:
        """`snap.user_segment(uidx)`: the user's segment name, or None."""
        s = self._segment_mv[uidx]
        return None if s < 0 else self.snap.segments[s]

    def candidate_count(self, uidx: int) -> int:
        """How many candidates the snapshot stores for user row `uidx`."""
        off = self._cand_off_mv
        return off[uidx + 1] - off[uidx]

    def remember(self, key: Any, value: Any) -> None:
        """Memoize a resolved constraint (`resolved`), keeping at most RESOLVED_SIZE of them."""
        if len(self.resolved) >= RESOLVED_SIZE:
            self.resolved.clear()
        self.resolved[key] = value

    def tag_hits(self, items: np.ndarray, tag: int) -> np.ndarray:
        """bool per entry of `items` (int32 item indices): does the item carry tag id `tag`?"""
        return kernels.tag_hits(items, self.tag_offsets, self.tag_ids, tag)

    def item_member(self, items: np.ndarray, of: np.ndarray) -> np.ndarray:
        """bool per entry of `items`: is it one of the item indices `of` (both int32)?"""
        return self.call_kernel(kernels.is_member, items, of, self.marks)

    def call_kernel(self, kernel, *args):
        """Run a kernel that marks this snapshot's scratch (`marks`, `roles`); when it fails (an
        index out of range in a damaged snapshot), clear the scratch it left marked before the
        error goes on, so that no later request is filtered by those marks."""
        try:
            return kernel(*args)
        except BaseException:
            self.marks.fill(0)
            self.roles.fill(0)
            raise

    def item_index(self, item_id: str) -> int | None:
        """Row of an item id (memoized per worker, like `item_ids`)."""
        cache = self._index_cache
        row = cache.get(item_id)
        if row is None:
            if len(cache) > ID_CACHE_SIZE:
                cache.clear()
            found = self.snap.item_index(item_id)
            row = cache[item_id] = -1 if found is None else found
        return None if row < 0 else row

    def item_indices(self, ids: list[str]) -> list[int]:
        """Rows of the known ids among `ids`, in their order (memoized like `item_index`; one
        C-level pass when every id is cached)."""
        rows = list(map(self._index_cache.get, ids))
        if None in rows:  # (not cached yet)
            rows = [self.item_index(i) for i in ids]
            return [r for r in rows if r is not None]
        return [r for r in rows if r >= 0] if -1 in rows else rows

    def item_ids(self, items: list[int]) -> list[str]:
        """Item id strings, memoized per worker (at most ID_CACHE_SIZE strings)."""
        cache = self._id_cache
        out = list(map(cache.__getitem__, items))
        if None in out:
            if self._id_cached > ID_CACHE_SIZE:
                cache[:] = [None] * len(cache)
                self._id_cached = 0
            for j, i in enumerate(items):
                if out[j] is None:
                    out[j] = cache[i] = self.snap.item_id(i)
                    self._id_cached += 1
        return out

    def item_ids_json(self, items: list[int]) -> list[bytes]:
        """Item ids as orjson writes them between their quotes (UTF-8, escaped), memoized per
        worker like `item_ids`."""
        cache = self._idj_cache
        out = list(map(cache.__getitem__, items))
        if None in out:
            if self._idj_cached > ID_CACHE_SIZE:
                cache[:] = [None] * len(cache)
                self._idj_cached = 0
            ids = self.item_ids(items)
            for j, i in enumerate(items):
                if out[j] is None:
                    out[j] = cache[i] = orjson.dumps(ids[j])[1:-1]
                    self._idj_cached += 1
        return out

    def __repr__(self) -> str:
        return f"LiveSnapshot({self.snapshot_id!r})"


def _decoded_ids(data: bytes, offsets: list[int]) -> list[str] | None:
    """Every item id of a snapshot (as `snap.item_id` gives each) from its id bytes and
    offsets (`Snapshot.item_id_bytes`), decoded in one pass; None when they do not decode."""
    try:
        if data.isascii():  # (byte offsets are character offsets)
            text = data.decode("ascii")
            return [text[a:b] for a, b in pairwise(offsets)]
        return [data[a:b].decode("utf-8") for a, b in pairwise(offsets)]
    except UnicodeDecodeError:
        return None


#: Bytes orjson escapes in a string (and DEL and non-ASCII: left to orjson itself).
_NOT_PLAIN = re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')


def _json_fields(data: bytes, offsets: list[int], ids: list[str] | None) -> list[bytes] | None:
    """Every item id as orjson writes it between quotes, when every id was decoded (`ids`):
    the id bytes themselves when none holds a byte JSON escapes, else one dumps per id."""
    if ids is None:
        return None
    if _NOT_PLAIN.search(data) is None:
        return [data[a:b] for a, b in pairwise(offsets)]
    return [orjson.dumps(i)[1:-1] for i in ids]


def _kernel_ctx(snap: Snapshot, live: LiveSnapshot) -> tuple[np.ndarray | None, tuple]:
    """(`kernels.outcomes_select_user`'s `ctx`: the address and length of each array it reads,
    the arrays themselves, kept alive with the LiveSnapshot), or (None, ()) when one of them is
    missing, of another dtype or not contiguous (that kernel then is not used)."""
    arrays = tuple(
        getattr(owner, name, None)
        for owner, name in (
            (snap, "candidate_offsets"),
            (snap, "candidate_items"),
            (snap, "candidate_scores"),
            (snap, "candidate_reasons"),
            (snap, "seen_offsets"),
            (snap, "seen_items"),
            (live, "tag_offsets"),
            (live, "tag_ids"),
            (live, "item_bits"),
            (live, "marks"),
            (live, "roles"),
            (live, "brand_id"),
            (live, "category_id"),
        )
    )
    ctx = np.zeros(kernels.CTX_SIZE, dtype=np.int64)
    for j, (array, dtype) in enumerate(zip(arrays, kernels.CTX_DTYPES, strict=True)):
        if (
            not isinstance(array, np.ndarray)
            or array.dtype != dtype
            or array.ndim != 1
            or not array.flags.c_contiguous
        ):
            return None, ()
        ctx[2 * j] = array.ctypes.data
        ctx[2 * j + 1] = array.shape[0]
    return ctx, arrays


class TenantSnapshots:
    """The live snapshot of one tenant (plus experiment variants opened by id)."""

    def __init__(
        self,
        tenant: str,
        store: SnapshotStore,
        check_interval_s: float,
        metrics: Metrics | None = None,
        opener: Callable[[str], Snapshot] = open_snapshot,
        background: bool = False,
    ) -> None:
        self.tenant = tenant
        self.store = store
        self._interval = check_interval_s
        self._metrics = metrics
        self._open = opener
        self._background = background
        self._wanted: str | None = None  # the snapshot a background load is opening
        self._live: LiveSnapshot | None = None
        self._checked_at = -1e18
        self._signature: tuple = ()
        self._lock = threading.Lock()
        self._variants: OrderedDict[str, LiveSnapshot] = OrderedDict()
        self.last_error: str | None = None
        # Changes since the snapshot (`serving.crr.overlay.ItemOverlays`), when installed:
        # `_live` is then `_base` overlaid with them.
        self.overlay: Any = None
        self._base: LiveSnapshot | None = None
        self._overlay_checked = -1e18
        self._writes_seen = 0
        self._variants_overlaid: dict[str, tuple[int, LiveSnapshot, LiveSnapshot]] = {}

    def live(self) -> LiveSnapshot | None:
        """The current snapshot (overlaid with the item changes since, when an overlay is
        installed); re-checks CURRENT at most once per interval, the changes at most once per
        `serving.crr.overlay.OVERLAY_CHECK_S`."""
        now = time.monotonic()
        if now - self._checked_at >= self._interval:
            self.refresh()
        if self.overlay is not None and (
            now - self._overlay_checked >= OVERLAY_CHECK_S
            or self._writes_seen != item_overlay.WRITES
        ):
            self.refresh_overlay()
        return self._live

    def base(self) -> LiveSnapshot | None:
        """The live snapshot as published (without the overlay; its changes are not read)."""
        if time.monotonic() - self._checked_at >= self._interval:
            self.refresh()
        return self._base if self._base is not None else self._live

    def refresh_overlay(self, force: bool = False) -> None:
        """Read the changes appended since the last look; re-overlay when there were any."""
        with self._lock:
            self._overlay_checked = time.monotonic()
            self._writes_seen = item_overlay.WRITES
            if self.overlay.poll(self.tenant) or force:
                self._overlay_base()

    def _overlay_base(self) -> None:
        # (under the lock) `_live` = the base snapshot with the changes applied
        if self._base is None:
            self._base = self._live
        if self._base is not None:
            self._live = self.overlay.apply(self.tenant, self._base)

    def refresh(self, force: bool = False) -> None:
        """Stat CURRENT; open and swap in the snapshot it names if it changed."""
        with self._lock:
            self._checked_at = time.monotonic()
            try:
                st = os.stat(os.path.join(self.store.root, CURRENT))
                signature = (st.st_ino, st.st_mtime_ns, st.st_size)
            except FileNotFoundError:
                signature = ()
            if signature == self._signature and not force:
                return
            self._signature = signature
            sid = self.store.current_id()
            if sid is None or (self._live is not None and sid == self._live.snapshot_id):
                self._wanted = None  # (a background load of another one is not swapped in)
                return
            if self._background and self._live is not None and not force:
                if self._wanted != sid:
                    self._wanted = sid
                    threading.Thread(
                        target=self._load_in_background,
                        args=(sid,),
                        name=f"snapshot-load-{self.tenant}",
                        daemon=True,
                    ).start()
                return
            self._wanted = None
            self._swap(self._load(sid))

    def _load_in_background(self, sid: str) -> None:
        """Open `sid` while the live snapshot keeps serving; swap it in unless CURRENT has
        named another since (a newer load then does it)."""
        loaded = self._load(sid)
        with self._lock:
            if self._wanted == sid:
                self._wanted = None
                self._swap(loaded)

    def _swap(self, loaded: LiveSnapshot | None) -> None:
        # (under the lock) a snapshot that failed to open (None) leaves the live one serving
        if loaded is not None:
            if self.overlay is not None:
                self._base = loaded
                self.overlay.poll(self.tenant)
                self._overlay_checked = time.monotonic()
                loaded = self.overlay.apply(self.tenant, loaded)
            self._live = loaded  # the swap: one reference assignment

    def variant(self, snapshot_id: str) -> LiveSnapshot | None:
        """A snapshot by id (experiment variants); cached, a few at most."""
        live = self.live()
        if live is not None and live.snapshot_id == snapshot_id:
            return live
        cached = self._variants.get(snapshot_id)
        if cached is None:
            with self._lock:
                cached = self._load(snapshot_id)
                if cached is None:
                    return None
                self._variants[snapshot_id] = cached
                while len(self._variants) > 4:
                    self._variants.popitem(last=False)
        if self.overlay is None:
            return cached
        # (a variant is overlaid with the same changes as the live snapshot, rebuilt when they
        # change: an item made unavailable is filtered in every arm of an experiment)
        version = self.overlay.changes(self.tenant).version
        found = self._variants_overlaid.get(snapshot_id)
        if found is None or found[0] != version or found[1] is not cached:
            found = (version, cached, self.overlay.apply(self.tenant, cached))
            self._variants_overlaid[snapshot_id] = found
            for old in [k for k in self._variants_overlaid if k not in self._variants]:
                del self._variants_overlaid[old]
        return found[2]

    def _load(self, sid: str) -> LiveSnapshot | None:
        try:
            snap = self._open(self.store.path_of(sid))
            if snap.tenant != self.tenant:
                raise SnapshotError(f"snapshot {sid} belongs to tenant {snap.tenant!r}")
            if snap.n_users:  # touch a row of each kind, as publication does
                snap.user_candidates(0)
                snap.user_seen(0)
            loaded = LiveSnapshot(snap)
        except (SnapshotError, OSError, ValueError, KeyError, IndexError) as e:
            self.last_error = f"{sid}: {e}"
            log.error("refusing snapshot %s of tenant %s: %s", sid, self.tenant, e)
            if self._metrics:
                self._metrics.snapshot_loads.inc((self.tenant, "refused"))
            return None
        self.last_error = None
        log.info("tenant %s now serves snapshot %s", self.tenant, sid)
        if self._metrics:
            self._metrics.snapshot_loads.inc((self.tenant, "loaded"))
        return loaded


class SnapshotRegistry:
    """Snapshots of all tenants under ``<snapshots_root>/<tenant>/`` (the app's `store`)."""

    def __init__(
        self,
        snapshots_root: str,
        tenants: Iterable[str] = (),
        check_interval_s: float = 1.0,
        metrics: Metrics | None = None,
        background: bool = False,
    ) -> None:
        self.root = os.path.abspath(snapshots_root)
        self._interval = check_interval_s
        self._background = background
        self._metrics = metrics
        self._fixed = tuple(tenants)
        self._tenants: dict[str, TenantSnapshots] = {}
        self._lock = threading.Lock()
        self._overlay: Any = None
        for t in self._fixed:
            self._holder(t)

    def install_overlay(self, overlay: Any) -> None:
        """Serve every tenant's snapshot overlaid with `overlay`'s changes (an
        `serving.crr.overlay.ItemOverlays`: poll(tenant) -> changed?, apply(tenant, live))."""
        self._overlay = overlay
        for holder in list(self._tenants.values()):
            holder.overlay = overlay
            holder._overlay_checked = -1e18

    def bind_metrics(self, metrics: Metrics) -> None:
        self._metrics = metrics
        for holder in self._tenants.values():
            holder._metrics = metrics

    def tenant(self, tenant: str) -> TenantSnapshots | None:
        """The holder of `tenant`, or None when the tenant is not served here."""
        holder = self._tenants.get(tenant)
        if holder is not None:
            return holder
        if self._fixed or not is_valid_tenant(tenant):
            return None
        if not os.path.isdir(os.path.join(self.root, tenant)):
            return None
        return self._holder(tenant)

    def live(self, tenant: str) -> LiveSnapshot | None:
        holder = self.tenant(tenant)
        return holder.live() if holder else None

    def require_live(self, tenant: str) -> LiveSnapshot:
        """The live snapshot of `tenant`, or a 503 Problem when none is loaded."""
        live = self.live(tenant)
        if live is None:
            from serving.errors import ProblemError

            raise ProblemError(
                503,
                f"No snapshot is loaded for tenant '{tenant}'.",
                code="RECSYS_NO_SNAPSHOT",
                headers={"Retry-After": "5"},
            )
        return live

    def warm(self) -> None:
        """Open every known tenant's live snapshot now (not in the first request)."""
        for tenant in self.known_tenants():
            self.live(tenant)

    def known_tenants(self) -> list[str]:
        if self._fixed:
            return list(self._fixed)
        if not os.path.isdir(self.root):
            return []
        return sorted(
            t
            for t in os.listdir(self.root)
            if is_valid_tenant(t) and os.path.isdir(os.path.join(self.root, t))
        )

    def status(self) -> dict[str, dict[str, Any]]:
        """Per tenant: live snapshot id, its age and the last refused load (for /readyz)."""
        out = {}
        now = time.time()
        for t in self.known_tenants():
            holder = self.tenant(t)
            live = holder.live() if holder else None
            out[t] = {
                "snapshot_id": live.snapshot_id if live else None,
                "age_s": round(now - live.created_ts, 1) if live else None,
                "error": holder.last_error if holder else None,
            }
        return out

    def gauges(self) -> Iterable[str]:
        """Prometheus lines: snapshot id (info style) and age per tenant."""
        yield "# HELP recsys_snapshot_info The live snapshot of each tenant (value 1)."
        yield "# TYPE recsys_snapshot_info gauge"
        status = self.status()
        for t, s in status.items():
            if s["snapshot_id"]:
                yield f'recsys_snapshot_info{{tenant="{t}",snapshot_id="{s["snapshot_id"]}"}} 1'
        yield "# HELP recsys_snapshot_age_seconds Age of the live snapshot of each tenant."
        yield "# TYPE recsys_snapshot_age_seconds gauge"
        for t, s in status.items():
            if s["age_s"] is not None:
                yield f'recsys_snapshot_age_seconds{{tenant="{t}"}} {s["age_s"]}'

    def _holder(self, tenant: str) -> TenantSnapshots:
        with self._lock:
            holder = self._tenants.get(tenant)
            if holder is None:
                store = SnapshotStore(os.path.join(self.root, check_tenant(tenant)))
                holder = TenantSnapshots(
                    tenant, store, self._interval, self._metrics, background=self._background
                )
                holder.overlay = self._overlay
                self._tenants[tenant] = holder
            return holder

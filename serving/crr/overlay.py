"""Item changes since the snapshot, applied to what request-time rules read.

Writers (feature upserts, CRR item records) append one line per changed item to the tenant's
change log, ``<data root>/serving/entities/<tenant>/items.changes`` (NDJSON, appended under
an ``flock`` and fsync'd before the writer answers): ``{"id", "ts", and the item's current
"available", "tags", "category", "brand" where known}``.

Readers are the serving workers. `ItemOverlays` is installed on the snapshot registry
(`serving.snapshot.SnapshotRegistry.install_overlay`): every worker stats the log at most every
`OVERLAY_CHECK_S`, reads only the bytes appended since its last read, and when anything changed
builds an overlaid `LiveSnapshot` (`overlaid`): the snapshot's availability, category, brand and
tag arrays copied with the changed items' values (tags or categories the snapshot never saw are
added to a per-overlay vocabulary). Requests then read that object exactly as they read a
snapshot, so the compiled kernels and the rules engine are unchanged and a tenant without
changes serves the snapshot itself (no cost on the hot path beyond one clock comparison).

Compaction (`compact_changes`): the log would grow by one line per upsert forever. It is
rewritten, under the same ``flock`` the writers take, keeping one line per item (its fields
merged in order, as a reader folds them: superseded values go) and dropping the items every
retained published snapshot of the tenant already holds (the change is folded into the
snapshots: overlaying it changes nothing any snapshot serves, live or an experiment's arm).
The new file replaces the old by rename, so readers see a new inode and re-read it whole,
getting the same items; writers check, once they hold the lock, that their descriptor is still
the file at the path (else they reopen), so an append racing a compaction is never lost.
Triggers: a writer whose append takes the log past `COMPACT_BYTES` (and past twice its size
after the last compaction this process made), and each worker once it overlays a snapshot
newer than the one it started with (a publication).
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import orjson

from recsys.durable import fsync_dir
from recsys.tenancy import check_tenant
from serving import kernels

#: How often a worker looks for new changes (seconds): an upsert reaches /v1/recommend on every
#: worker within this (plus one rebuild).
OVERLAY_CHECK_S = 0.25
RULE_FIELDS = ("available", "tags", "category", "brand")
log = logging.getLogger(__name__)
#: Changes this process appended (the registry re-reads the log at once when it moved: the
#: writing worker's next request sees its own write).
WRITES = 0


def changes_path(serving_dir: str, tenant: str) -> str:
    return os.path.join(serving_dir, "entities", check_tenant(tenant), "items.changes")


def _locked(path: str) -> int:
    """A descriptor of the log at `path` (created when missing) holding its exclusive lock; it
    is the file the path names once locked (a compaction may have replaced it meanwhile)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:  # (renamed over between the open and the stat)
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def append_changes(serving_dir: str, tenant: str, entries: list[dict[str, Any]]) -> None:
    """Append item changes (each ``{"id", "ts", <RULE_FIELDS present>}``), durable on return;
    compacts the log when it has grown past `COMPACT_BYTES` (see the module docstring)."""
    if not entries:
        return
    path = changes_path(serving_dir, tenant)
    folder = os.path.dirname(path)
    new = not os.path.exists(path)
    os.makedirs(folder, exist_ok=True)
    data = b"".join(orjson.dumps(e) + b"\n" for e in entries)
    fd = _locked(path)
    try:
        os.write(fd, data)
        os.fsync(fd)
        size = os.fstat(fd).st_size
        if size > max(COMPACT_BYTES, 2 * _compacted_size.get(path, 0)):
            try:  # (the append is durable already: a failed compaction must not refuse it)
                _compact_locked(fd, path, _snapshots_of(serving_dir, tenant))
            except OSError:
                log.exception("compacting %s failed; the log is left as it was", path)
    finally:
        os.close(fd)
    if new:
        fsync_dir(folder)
    global WRITES
    WRITES += 1


#: A log past this size is compacted by the writer that took it there.
COMPACT_BYTES = 1 << 20
#: {log path: its size after the last compaction this process made} (a log that stays large
#: after compaction - many distinct items changed - is compacted again only once it doubled)
_compacted_size: dict[str, int] = {}


def _snapshots_of(serving_dir: str, tenant: str) -> list[Any]:
    """Every retained published snapshot of the tenant (the ones an experiment may serve),
    current one last; [] when it has none."""
    from recsys.snapshot import SnapshotError, SnapshotStore, open_snapshot

    store = SnapshotStore(os.path.join(os.path.dirname(serving_dir), "snapshots", tenant))
    current = store.current_id()
    out = []
    for sid in [s for s in store.ids() if s != current] + ([current] if current else []):
        try:
            out.append(open_snapshot(store.path_of(sid), verify=False))
        except (SnapshotError, OSError, ValueError, KeyError):  # (refused by the server too)
            continue
    return out


def fold(data: bytes) -> OrderedDict[str, dict[str, Any]]:
    """{item id: its merged fields, with the newest "ts"} of whole log lines, in the order the
    items first appear (what a reader builds, plus the time of each item's last change)."""
    items: OrderedDict[str, dict[str, Any]] = OrderedDict()
    for line in data.splitlines():
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        item = entry.pop("id", None) if isinstance(entry, dict) else None
        if isinstance(item, str):
            items[item] = {**items.get(item, {}), **entry}
    return items


def holds(snap: Any, item: str, fields: dict[str, Any]) -> bool:
    """Whether overlaying `fields` on `item` changes nothing `snap` serves (the item is not
    in it, or it holds the same values - as `overlaid` would set them)."""
    row = snap.item_index(item)
    if row is None:
        return True
    if "available" in fields and bool(snap.available[row]) != (fields["available"] is not False):
        return False
    if "category" in fields and fields["category"] != snap.category_name(
        int(snap.category_id[row])
    ):
        return False
    if "brand" in fields and fields["brand"] != snap.brand_name(int(snap.brand_id[row])):
        return False
    if "tags" in fields:
        have = {snap.tag_name(int(t)) for t in snap.item_tags(row)}
        if have != set(fields["tags"] or []):
            return False
    return True


def compact_changes(serving_dir: str, tenant: str) -> tuple[int, int]:
    """Compact the tenant's change log now (see the module docstring); (lines before, after).
    Nothing is written when that would not shorten it."""
    path = changes_path(serving_dir, tenant)
    if not os.path.exists(path):
        return 0, 0
    snapshots = _snapshots_of(serving_dir, tenant)
    fd = _locked(path)
    try:
        return _compact_locked(fd, path, snapshots)
    finally:
        os.close(fd)


def _compact_locked(fd: int, path: str, snapshots: list[Any]) -> tuple[int, int]:
    """(under the log's lock, `fd` its descriptor) rewrite it; (lines before, after)."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    data = data[: data.rfind(b"\n") + 1]
    before = data.count(b"\n")
    items = fold(data)
    live = snapshots[-1] if snapshots else None
    keep = [
        (item, fields)
        for item, fields in items.items()
        if live is None
        or live.item_index(item) is None
        or not all(holds(s, item, fields) for s in snapshots)
    ]
    if len(keep) >= before:
        _compacted_size[path] = size
        return before, before
    out = b"".join(orjson.dumps({"id": item, **fields}) + b"\n" for item, fields in keep)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    with open(tmp, "wb") as f:
        f.write(out)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))
    _compacted_size[path] = len(out)
    return before, len(keep)


def rule_fields(record: dict[str, Any]) -> dict[str, Any]:
    """The fields of an item record the rules read (those it holds)."""
    return {k: record[k] for k in RULE_FIELDS if k in record}


class _TenantChanges:
    """One tenant's changes as read so far by this process: {item id: latest fields}."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.inode = None
        self.items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.version = 0  # bumped when `items` changes

    def poll(self) -> bool:
        """Read what was appended since the last call; True when anything changed."""
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            if self.items:
                self.items.clear()
                self.offset, self.inode = 0, None
                self.version += 1
                return True
            return False
        with f:
            st = os.fstat(f.fileno())  # (the file read, even if a compaction replaced it)
            replaced = st.st_ino != self.inode or st.st_size < self.offset
            if replaced:  # (read it all)
                self.offset, self.inode = 0, st.st_ino
            if st.st_size == self.offset:
                return False
            f.seek(self.offset)
            data = f.read(st.st_size - self.offset)
        end = data.rfind(b"\n") + 1  # (a line being appended is read next time)
        if replaced:
            fresh = OrderedDict(
                (item, {k: v for k, v in fields.items() if k != "ts"})
                for item, fields in fold(data[:end]).items()
            )
            changed = fresh != self.items
            self.items = fresh
            self.offset = end
            if changed:
                self.version += 1
            return changed
        for item, fields in fold(data[:end]).items():
            fields.pop("ts", None)
            self.items[item] = {**self.items.get(item, {}), **fields}
        self.offset += end
        if end:
            self.version += 1
        return end > 0


class ItemOverlays:
    """Every tenant's item changes, for one process (see the module docstring)."""

    def __init__(self, serving_dir: str) -> None:
        self.serving_dir = serving_dir
        self._tenants: dict[str, _TenantChanges] = {}
        self._lock = threading.Lock()
        self._newest: dict[str, str] = {}  # the newest snapshot id overlaid, per tenant

    def changes(self, tenant: str) -> _TenantChanges:
        found = self._tenants.get(tenant)
        if found is None:
            with self._lock:
                found = self._tenants.setdefault(
                    tenant, _TenantChanges(changes_path(self.serving_dir, tenant))
                )
        return found

    def poll(self, tenant: str) -> bool:
        return self.changes(tenant).poll()

    def apply(self, tenant: str, live: Any) -> Any:
        """`live` overlaid with the tenant's changes (`live` itself when there are none). When
        it is a snapshot newer than any this process overlaid before (a publication), the log
        is compacted against the snapshots first (the overlay read here is the same either
        way)."""
        changes = self.changes(tenant)
        sid = getattr(live, "snapshot_id", None)
        newest = self._newest.get(tenant)
        if sid is not None and (newest is None or sid > newest):  # (ids sort by creation)
            self._newest[tenant] = sid
            if newest is not None and changes.items:  # a publication since this process began
                try:
                    compact_changes(self.serving_dir, tenant)
                except OSError:  # (serving goes on from the log as it is)
                    log.exception("compacting the change log of %s failed", tenant)
        return overlaid(live, changes.items) if changes.items else live


class _Vocabulary:
    """A snapshot's names (tags, categories or brands) plus names only the overlay knows."""

    def __init__(self, names: list[str], index: Any) -> None:
        self.names = list(names)
        self._index = index
        self.added: dict[str, int] = {}

    def id(self, name: str) -> int | None:
        found = self._index(name)
        return found if found is not None else self.added.get(name)

    def id_or_add(self, name: str) -> int:
        found = self.id(name)
        if found is None:
            found = self.added[name] = len(self.names)
            self.names.append(name)
        return found


class OverlaidSnapshot:
    """A `recsys.snapshot.Snapshot` seen through the overlay: item availability, category,
    brand and tags are the overlaid ones; everything else is the snapshot's."""

    def __init__(self, snap: Any, tags: _Vocabulary, cats: _Vocabulary, brands: _Vocabulary):
        self._snap = snap
        self._tagv, self._catv, self._brandv = tags, cats, brands
        self.tags, self.categories, self.brands = tags.names, cats.names, brands.names

    def __getattr__(self, name: str) -> Any:
        return getattr(self._snap, name)

    def tag_id(self, tag: str) -> int | None:
        return self._tagv.id(tag)

    def tag_name(self, tag_id: int) -> str:
        return self.tags[tag_id]

    def category_index(self, category: str) -> int | None:
        return self._catv.id(category)

    def category_name(self, category_id: int) -> str | None:
        return None if category_id < 0 else self.categories[category_id]

    def brand_index(self, brand: str) -> int | None:
        return self._brandv.id(brand)

    def brand_name(self, brand_id: int) -> str | None:
        return None if brand_id < 0 else self.brands[brand_id]

    def item_tags(self, iidx: int) -> np.ndarray:
        a, b = int(self.item_tags_offsets[iidx]), int(self.item_tags_offsets[iidx + 1])
        return self.item_tags_ids[a:b]


def overlaid(live: Any, items: dict[str, dict[str, Any]]) -> Any:
    """A copy of `live` (a `serving.snapshot.LiveSnapshot`) whose items carry `items`' fields;
    ids the snapshot does not hold are skipped (they have no row to filter)."""
    base = live.snap
    rows = [(live.item_index(i), fields) for i, fields in items.items()]
    rows = [(r, f) for r, f in rows if r is not None]
    if not rows:
        return live
    tags = _Vocabulary(base.tags, base.tag_id)
    cats = _Vocabulary(base.categories, base.category_index)
    brands = _Vocabulary(base.brands, base.brand_index)
    available = np.array(live.available, dtype=bool)
    category = np.array(live.category_id, dtype=np.int32)
    brand = np.array(live.brand_id, dtype=np.int32)
    new_tags: dict[int, list[int]] = {}
    for row, f in rows:
        if "available" in f:
            available[row] = f["available"] is not False  # (null: the contract's default)
        if "category" in f:
            category[row] = -1 if f["category"] is None else cats.id_or_add(f["category"])
        if "brand" in f:
            brand[row] = -1 if f["brand"] is None else brands.id_or_add(f["brand"])
        if "tags" in f:
            names = f["tags"] or []
            new_tags[row] = sorted({tags.id_or_add(t) for t in names})
    offsets, ids = np.asarray(live.tag_offsets), np.asarray(live.tag_ids)
    if new_tags:
        offsets, ids = _retagged(offsets, ids, new_tags)
    snap = OverlaidSnapshot(base, tags, cats, brands)
    snap.available, snap.category_id, snap.brand_id = available, category, brand
    snap.item_tags_offsets, snap.item_tags_ids = offsets, ids
    out = copy.copy(live)
    out.snap = snap
    out.available, out.category_id, out.brand_id = available, category, brand
    out.tag_offsets, out.tag_ids = offsets, ids
    out.n_tags = len(tags.names)
    out.compiled = OrderedDict()
    out.resolved = {}
    unavailable = ~available
    out.unavailable_or_empty = unavailable if unavailable.any() else np.zeros(0, dtype=bool)
    out.marks = np.zeros(max(1, base.n_items), dtype=np.uint8)
    out.roles = np.zeros(max(1, out.n_tags), dtype=np.uint8)
    out.item_bits = np.zeros(base.n_items, dtype=np.int64)
    kernels.item_bits_into(offsets, ids, out.unavailable_or_empty, out.n_tags, out.item_bits)
    out.bind_kernels(base)
    return out


def _retagged(
    offsets: np.ndarray, ids: np.ndarray, new: dict[int, list[int]]
) -> tuple[np.ndarray, np.ndarray]:
    """The tag CSR with the rows of `new` replaced (vectorized over the unchanged rows)."""
    lengths = np.diff(offsets).astype(np.int64)
    keep = np.ones(lengths.shape[0], dtype=bool)
    changed = np.fromiter(new.keys(), dtype=np.int64, count=len(new))
    keep[changed] = False
    old_kept = np.repeat(keep, lengths)
    lengths[changed] = [len(new[r]) for r in changed.tolist()]
    out_off = np.zeros(lengths.shape[0] + 1, dtype=offsets.dtype)
    np.cumsum(lengths, out=out_off[1:])
    out_ids = np.empty(int(out_off[-1]), dtype=ids.dtype)
    out_ids[np.repeat(keep, lengths)] = ids[old_kept]
    for r, tag_list in new.items():
        out_ids[out_off[r] : out_off[r + 1]] = tag_list
    return out_off, out_ids

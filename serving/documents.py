"""Versioned JSON documents of tenants: the one store behind everything the API edits.

Tenant config and rules, experiments, seed lists and the CRR user and item records (and next the
control-plane documents: keys, webhooks, pipelines, policies, connectors) are *collections* of
JSON documents per tenant. A `Document` has an id, a body, a revision id (sent as its ETag) and
its creation and update times. A `Collection` gets, lists, creates, puts, patches and deletes
them with revision preconditions; `DocumentStore.collection` declares one.

Files: ``<root>/<folder>/<file>.json``, where `folder` is the collection's template with the
tenant filled in (``experiments/{tenant}`` -> ``experiments/acme``) and `file` is the document
id (or, for collections of free-form ids, the first 40 hex digits of its SHA-256). Each file
holds ``{"id", "revision", "created_at", "updated_at", "body"}``. Files an earlier release
wrote in another shape (or place) are read through the collection's `Legacy` decoder and
rewritten in the current shape by their next change.

Writes are compare-and-swap across processes: under the folder's ``.lock`` (`flock`, so every
gunicorn worker and every host sharing the folder) and a mutex of this process, the document is
read again, the caller's preconditions are checked against it, and the file is replaced
atomically (`recsys.durable.write_atomic`: temporary file, fsync, rename, fsync of the folder).
Hot-path readers use `Collection.cached` / `cached_list`, which re-stat the file (or folder) at
most once per `check_interval_s`: another worker's write is visible within that interval.
`Collection.local_changes` counts this process's writes and invalidations (of any collection):
a reader that keeps what it derived from several documents (the recommend service's tenant
view) re-reads them when the count moved, so a write is seen at once by the worker that made
it.

Preconditions (`Preconditions`, read from a request's If-Match / If-None-Match, or a body's
revision field) fail with one exception type, `Conflict`, a Problem Details error:

* 409 ``RECSYS_VERSION_CONFLICT``: If-Match names a revision that is not the current one (the
  seed contract's "version mismatch"; the body's ``current_version`` is the current one);
* 409 with the collection's `exists_code`: `create` of an id that exists;
* 412 ``RECSYS_PRECONDITION_FAILED``: ``If-Match: *`` on a missing document, or
  ``If-None-Match: *`` (or a matching revision) on an existing one;
* 428 ``RECSYS_PRECONDITION_REQUIRED``: `put` over an existing document without If-Match, in a
  collection declared `replace_needs_match` (the CRR records).

A document that is not stored may stand for defaults (`get`/`put` with ``default=``): it then
has the revision `default_revision` of its body, so a client can GET the defaults and PUT its
first version with ``If-Match`` of that ETag (or ``If-None-Match: *``).

A new kind of document is one collection and a few lines in its resource::

    hooks = DocumentStore(f"{data_root}/serving").collection("webhooks", prefix="hook")
    doc = hooks.create(tenant, hook_id, body)                    # 409 if the id exists
    doc, created = hooks.put(tenant, hook_id, body, Preconditions.of(req))
    set_etag(resp, doc.revision)
    hooks.delete(tenant, hook_id, Preconditions.of(req))         # 404 / 409 / 412
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import falcon
import orjson

from recsys.contract import PATTERN_END
from recsys.durable import fsync_dir, write_atomic
from recsys.storage import Storage
from recsys.tenancy import check_tenant
from serving.errors import ProblemError

#: Ids a collection without `hashed_ids` accepts (they are file names).
DOCUMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}" + PATTERN_END)
ANY = "*"
#: The statuses a conditional write can answer besides the operation's own (for the spec).
CONFLICT_STATUSES = (409, 412, 428)
_DUMP = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS


@dataclass(frozen=True, slots=True)
class Document:
    """One document. `stored` is False for the defaults a missing document stands for."""

    id: str
    revision: str
    body: dict[str, Any]
    created_at: str | None = None
    updated_at: str | None = None
    stored: bool = True


@dataclass(frozen=True, slots=True)
class Legacy:
    """How an earlier release stored a collection's documents.

    decode: the raw JSON object of an old file -> (revision, body, created_at, updated_at).
    path:   (tenant, document id) -> the old file's path under the store root, when it is not
            where the document lives now (the next change writes the new file and removes it).
    """

    decode: Callable[[dict[str, Any]], tuple[str, dict[str, Any], str | None, str | None]]
    path: Callable[[str, str], str] | None = None


@dataclass(frozen=True, slots=True)
class Preconditions:
    """The conditions a write must meet: entity tags of If-Match / If-None-Match (``("*",)``
    for any); None when the header was not sent."""

    if_match: tuple[str, ...] | None = None
    if_none_match: tuple[str, ...] | None = None

    @classmethod
    def of(cls, req: falcon.Request) -> Preconditions:
        """A request's If-Match and If-None-Match. Weak tags compare by their opaque value (a
        proxy that compresses may weaken the ETags we send)."""
        match, none_match = req.if_match, req.if_none_match
        return cls(
            tuple(str(t) for t in match) if match else None,
            tuple(str(t) for t in none_match) if none_match else None,
        )

    def matching(self, revision: str | None) -> Preconditions:
        """These preconditions with `revision` (e.g. a body's ``rid``) as If-Match; unchanged
        when it is None."""
        if revision is None:
            return self
        return Preconditions((revision,), self.if_none_match)


NONE = Preconditions()


class Conflict(ProblemError):
    """A write whose revision precondition failed (409 / 412 / 428; see the module docstring).
    `current` is the document's current revision (None: there is no document)."""

    def __init__(
        self, status: int, detail: str, current: str | None, code: str | None = None
    ) -> None:
        super().__init__(status, detail, code=code, extra={"current_version": current})
        self.current = current


def set_etag(resp: falcon.Response, revision: str | None) -> None:
    """The headers of an answer carrying a document: its revision as the ETag (when it has
    one), and no caching."""
    if revision is not None:
        resp.etag = f'"{revision}"'
    resp.cache_control = ["no-store"]


def default_revision(prefix: str, body: dict[str, Any]) -> str:
    """The revision of defaults that are not stored: changes when (and only when) they do."""
    digest = hashlib.blake2b(orjson.dumps(body, option=orjson.OPT_SORT_KEYS), digest_size=6)
    return f"{prefix}_defaults_{digest.hexdigest()}"


def counted_revision(prefix: str) -> Callable[[str | None], str]:
    """Revisions ``<prefix>_<UTC date>_<NNN>``, NNN one more than the previous revision's
    (for documents that are never deleted, so a number never comes back)."""

    def revision(previous: str | None) -> str:
        counter = 0
        if previous:
            try:
                counter = int(previous.rsplit("_", 1)[1])
            except (IndexError, ValueError):
                counter = 0
        return f"{prefix}_{dt.datetime.now(dt.UTC):%Y-%m-%d}_{counter + 1:03d}"

    return revision


def unique_revision(prefix: str) -> Callable[[str | None], str]:
    """Revisions that never repeat, even across a delete and a re-create of an id."""

    def revision(previous: str | None) -> str:
        return f"{prefix}_{time.time_ns():x}_{uuid.uuid4().hex[:8]}"

    return revision


def now_iso() -> str:
    """The current UTC time as the documents write it (milliseconds, ``Z``)."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DocumentStore:
    """The collections under one root folder (``<data root>/serving``)."""

    def __init__(self, root: str, check_interval_s: float = 1.0) -> None:
        self.root = os.path.abspath(root)
        self.check_interval_s = check_interval_s

    def collection(self, name: str, **options: Any) -> Collection:
        """A collection of documents per tenant (see `Collection` for the options)."""
        return Collection(self.root, name, check_interval_s=self.check_interval_s, **options)


class Collection:
    """Documents of one kind, per tenant.

    name:        the kind, also the default folder (``<name>/{tenant}``) and the word of messages.
    folder:      the folder template under the root, with ``{tenant}``.
    prefix:      the revisions' prefix; `revisions` makes them (default `unique_revision`).
    ids:         the only ids the collection holds (documents that exist once per tenant).
    hashed_ids:  ids are free-form (files named by their SHA-256); else they match DOCUMENT_ID.
    replace_needs_match: `put` over an existing document needs If-Match (428 otherwise).
    exists_code / missing_code: Problem codes of `create` on an existing id (409) and of
                 `require` / `patch` / `delete` on a missing one (404).
    legacy:      how an earlier release stored these documents (`Legacy`).
    """

    #: Writes and invalidations of any collection in this process so far (see the module
    #: docstring): what derived state compares to tell that a document may have changed.
    local_changes = 0

    def __init__(
        self,
        root: str,
        name: str,
        *,
        folder: str | None = None,
        prefix: str | None = None,
        revisions: Callable[[str | None], str] | None = None,
        ids: tuple[str, ...] | None = None,
        hashed_ids: bool = False,
        replace_needs_match: bool = False,
        exists_code: str = "RECSYS_DOCUMENT_EXISTS",
        missing_code: str = "RECSYS_NOT_FOUND",
        legacy: Legacy | None = None,
        check_interval_s: float = 1.0,
    ) -> None:
        self.root = root
        self.name = name
        self._folder = folder or f"{name}/{{tenant}}"
        self.prefix = prefix or name
        self._revision = revisions or unique_revision(self.prefix)
        self._ids = ids
        self._hashed = hashed_ids
        self._needs_match = replace_needs_match
        self._exists_code = exists_code
        self._missing_code = missing_code
        self._legacy = legacy
        self._interval = check_interval_s
        self._mutex = threading.Lock()
        # (tenant, id) -> (checked at, file signature, document or None)
        self._docs: dict[tuple[str, str], tuple[float, tuple, Document | None]] = {}
        # tenant -> (checked at, folder signature, {id: document})
        self._lists: dict[str, tuple[float, tuple, dict[str, Document]]] = {}

    # --- where documents live ----------------------------------------------------------------
    def folder(self, tenant: str) -> str:
        """The tenant's folder of this collection (ValueError for an invalid tenant id)."""
        return os.path.join(self.root, self._folder.format(tenant=check_tenant(tenant)))

    def path(self, tenant: str, doc_id: str) -> str:
        """The file of a document (ValueError for an id this collection cannot hold)."""
        return os.path.join(self.folder(tenant), self._file(doc_id))

    def _file(self, doc_id: str) -> str:
        if self._ids is not None and doc_id not in self._ids:
            raise ValueError(f"{self.name} holds only {', '.join(self._ids)}, not {doc_id!r}")
        if self._hashed:
            if not isinstance(doc_id, str) or not doc_id:
                raise ValueError(f"bad {self.name} id {doc_id!r}")
            return hashlib.sha256(doc_id.encode()).hexdigest()[:40] + ".json"
        if not isinstance(doc_id, str) or not DOCUMENT_ID.match(doc_id):
            raise ValueError(f"bad {self.name} id {doc_id!r}: ids match {DOCUMENT_ID.pattern}")
        return doc_id + ".json"

    def _legacy_path(self, tenant: str, doc_id: str) -> str | None:
        if self._legacy is None or self._legacy.path is None:
            return None
        return os.path.join(self.root, self._legacy.path(check_tenant(tenant), doc_id))

    def valid_id(self, doc_id: str) -> bool:
        try:
            self._file(doc_id)
        except ValueError:
            return False
        return True

    # --- reads ---------------------------------------------------------------------------------
    def get(
        self, tenant: str, doc_id: str, default: dict[str, Any] | None = None
    ) -> Document | None:
        """The stored document, read from disk now; when there is none, the `default` body as
        an unstored document (revision `default_revision`), or None without a default. An id
        this collection cannot hold is missing."""
        if not self.valid_id(doc_id):
            return None
        doc = self._read(tenant, doc_id)
        if doc is None and default is not None:
            return self._default(doc_id, default)
        return doc

    def require(self, tenant: str, doc_id: str) -> Document:
        """The stored document, or a 404 Problem."""
        doc = self.get(tenant, doc_id)
        if doc is None:
            raise self._missing(doc_id)
        return doc

    def cached(self, tenant: str, doc_id: str) -> Document | None:
        """`get` (without defaults) re-read only when the file changed, checked at most once
        per interval: the same object while it is unchanged."""
        key = (tenant, doc_id)
        now = time.monotonic()
        entry = self._docs.get(key)
        if entry is not None and now - entry[0] < self._interval:
            return entry[2]
        path = self.path(tenant, doc_id)
        sig = _signature(path) or _signature(self._legacy_path(tenant, doc_id))
        if entry is not None and entry[1] == sig:
            self._docs[key] = (now, sig, entry[2])
            return entry[2]
        doc = self._read(tenant, doc_id) if sig else None
        if len(self._docs) > 65536:
            self._docs.clear()
        self._docs[key] = (now, sig, doc)
        return doc

    def list(self, tenant: str) -> list[Document]:
        """Every stored document of the tenant, read from disk now, by id."""
        return sorted(self._scan(tenant).values(), key=lambda d: d.id)

    def cached_list(self, tenant: str) -> dict[str, Document]:
        """{id: document} of the tenant, re-read only when its folder changed (checked at most
        once per interval): the same dict while it is unchanged. Do not modify it."""
        now = time.monotonic()
        entry = self._lists.get(tenant)
        if entry is not None and now - entry[0] < self._interval:
            return entry[2]
        sig = _signature(self.folder(tenant))
        if entry is not None and entry[1] == sig:
            self._lists[tenant] = (now, sig, entry[2])
            return entry[2]
        docs = self._scan(tenant) if sig else {}
        self._lists[tenant] = (now, sig, docs)
        return docs

    def count(self, tenant: str) -> int:
        """How many documents the tenant has (files counted, none read)."""
        try:
            names = os.listdir(self.folder(tenant))
        except FileNotFoundError:
            return 0
        return sum(1 for n in names if self._listed(n))

    def invalidate(self, tenant: str) -> None:
        """Forget this process's cached documents of `tenant`: the next read goes to disk."""
        Collection.local_changes += 1
        for key in [k for k in self._docs if k[0] == tenant]:
            self._docs.pop(key, None)
        self._lists.pop(tenant, None)

    # --- writes --------------------------------------------------------------------------------
    def create(
        self,
        tenant: str,
        doc_id: str,
        body: dict[str, Any] | Callable[[None], dict[str, Any]],
    ) -> Document:
        """Store a new document; 409 (`exists_code`) when the id exists. `body` may be a
        function, called under the lock once the id is known to be free."""
        with self.locked(tenant):
            current = self._read(tenant, doc_id)
            if current is not None:
                raise Conflict(
                    409,
                    f"{self._what(doc_id)} exists; change it instead, or choose another id.",
                    current.revision,
                    code=self._exists_code,
                )
            new = body(None) if callable(body) else body
            return self._store(tenant, doc_id, new, None)

    def put(
        self,
        tenant: str,
        doc_id: str,
        body: dict[str, Any] | Callable[[Document | None], dict[str, Any]],
        pre: Preconditions = NONE,
        *,
        default: dict[str, Any] | None = None,
    ) -> tuple[Document, bool]:
        """Create or replace a document if `pre` holds; (the new document, created?).

        `body` may be a function of the current document (None when there is none), called
        under the lock after the preconditions passed. `default`: the body a missing document
        stands for (If-Match may then name its `default_revision`)."""
        with self.locked(tenant):
            current = self._read(tenant, doc_id)
            shown = current
            if current is None and default is not None:
                shown = self._default(doc_id, default)
            self._check(doc_id, shown, pre)
            if current is not None and self._needs_match and pre.if_match is None:
                raise Conflict(
                    428,
                    f"{self._what(doc_id)} exists: send its current revision (If-Match) to "
                    "replace it.",
                    current.revision,
                    code="RECSYS_PRECONDITION_REQUIRED",
                )
            new = body(current) if callable(body) else body
            return self._store(tenant, doc_id, new, current), current is None

    def put_replacing(
        self,
        tenant: str,
        doc_id: str,
        body: dict[str, Any] | Callable[[Document | None], dict[str, Any]],
        pre: Preconditions = NONE,
        *,
        default: dict[str, Any] | None = None,
    ) -> tuple[Document, bool, str | None]:
        """`put`, and the revision it replaced, read under the lock (for the audit log): the
        defaults' revision when nothing was stored but `default` stood for it, else None."""
        replaced: list[str | None] = [None]

        def make(current: Document | None) -> dict[str, Any]:
            if current is not None:
                replaced[0] = current.revision
            elif default is not None:
                replaced[0] = default_revision(self.prefix, default)
            return body(current) if callable(body) else body

        doc, created = self.put(tenant, doc_id, make, pre, default=default)
        return doc, created, replaced[0]

    def patch(
        self,
        tenant: str,
        doc_id: str,
        change: Callable[[Document], dict[str, Any]],
        pre: Preconditions = NONE,
    ) -> Document:
        """Replace an existing document's body by ``change(current)`` if `pre` holds (404 when
        it does not exist). `change` runs under the lock and may raise to refuse."""
        with self.locked(tenant):
            current = self._read(tenant, doc_id)
            if current is None:
                raise self._missing(doc_id)
            self._check(doc_id, current, pre)
            return self._store(tenant, doc_id, change(current), current)

    def delete(
        self,
        tenant: str,
        doc_id: str,
        pre: Preconditions = NONE,
        *,
        before: Callable[[Document], None] | None = None,
    ) -> Document:
        """Remove a document if `pre` holds (404 when it does not exist); returns it.
        `before(current)` runs under the lock first and may raise to refuse."""
        with self.locked(tenant):
            current = self._read(tenant, doc_id)
            if current is None:
                raise self._missing(doc_id)
            self._check(doc_id, current, pre)
            if before is not None:
                before(current)
            for path in (self.path(tenant, doc_id), self._legacy_path(tenant, doc_id)):
                if path is not None and os.path.exists(path):
                    os.unlink(path)
                    fsync_dir(os.path.dirname(path))
            self.invalidate(tenant)
            return current

    @contextmanager
    def locked(self, tenant: str) -> Iterator[None]:
        """Hold the tenant folder's lock (this process and every other): reads inside see
        the latest writes and no other write happens in between."""
        folder = self.folder(tenant)
        os.makedirs(folder, exist_ok=True)
        with self._mutex:
            fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # (releases the flock)

    # --- internals -----------------------------------------------------------------------------
    def _what(self, doc_id: str) -> str:
        """The document as a sentence names it ("The config", "Experiment 'x'")."""
        what = f"the {self.name}" if self._ids is not None else f"{self.name} '{doc_id}'"
        return what[0].upper() + what[1:]

    def _missing(self, doc_id: str) -> ProblemError:
        return ProblemError(404, f"No {self.name} '{doc_id}'.", code=self._missing_code)

    def _default(self, doc_id: str, body: dict[str, Any]) -> Document:
        return Document(doc_id, default_revision(self.prefix, body), body, stored=False)

    def _check(self, doc_id: str, current: Document | None, pre: Preconditions) -> None:
        revision = current.revision if current is not None else None
        if pre.if_match is not None:
            if ANY in pre.if_match:
                if current is None:
                    raise Conflict(
                        412,
                        f"If-Match: * but there is no such document ({self._what(doc_id)}).",
                        None,
                        code="RECSYS_PRECONDITION_FAILED",
                    )
            elif revision not in pre.if_match:
                raise Conflict(
                    409,
                    f"{self._what(doc_id)} changed: its current revision is {revision!r}; GET "
                    "it, re-apply your change and send its ETag in If-Match.",
                    revision,
                    code="RECSYS_VERSION_CONFLICT",
                )
        none_match = pre.if_none_match
        stored = current is not None and current.stored
        if none_match is not None and stored and (ANY in none_match or revision in none_match):
            raise Conflict(
                412,
                f"If-None-Match: {self._what(doc_id)} exists (revision {revision!r}).",
                revision,
                code="RECSYS_PRECONDITION_FAILED",
            )

    def _store(
        self, tenant: str, doc_id: str, body: dict[str, Any], current: Document | None
    ) -> Document:
        now = now_iso()
        doc = Document(
            doc_id,
            self._revision(current.revision if current is not None else None),
            body,
            current.created_at if current is not None and current.created_at else now,
            now,
        )
        raw = {
            "id": doc.id,
            "revision": doc.revision,
            "created_at": doc.created_at,
            "updated_at": doc.updated_at,
            "body": doc.body,
        }
        write_atomic(self.path(tenant, doc_id), orjson.dumps(raw, option=_DUMP))
        old = self._legacy_path(tenant, doc_id)
        if old is not None and os.path.exists(old):
            os.unlink(old)
            fsync_dir(os.path.dirname(old))
        self.invalidate(tenant)
        return doc

    def _read(self, tenant: str, doc_id: str) -> Document | None:
        path = self.path(tenant, doc_id)
        raw = _load(path)
        if raw is None:
            old = self._legacy_path(tenant, doc_id)
            raw = _load(old) if old is not None else None
            if raw is None:
                return None
        doc = self._decode(raw, doc_id)
        # (a hashed id's file holds its id: another id with the same hash prefix is missing)
        return doc if doc.id == doc_id else None

    def _decode(self, raw: dict[str, Any], doc_id: str) -> Document:
        if "revision" in raw and "body" in raw:
            return Document(
                raw.get("id", doc_id),
                raw["revision"],
                raw["body"],
                raw.get("created_at"),
                raw.get("updated_at"),
            )
        if self._legacy is None:
            raise ValueError(f"{self.name} '{doc_id}': unknown document shape {sorted(raw)}")
        revision, body, created, updated = self._legacy.decode(raw)
        return Document(raw.get("id", doc_id), revision, body, created, updated)

    def _listed(self, name: str) -> bool:
        if not name.endswith(".json") or name.startswith("."):
            return False
        return self._ids is None or name[:-5] in self._ids

    def _scan(self, tenant: str) -> dict[str, Document]:
        folder = self.folder(tenant)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return {}
        docs = {}
        for name in sorted(names):
            if not self._listed(name):
                continue
            raw = _load(os.path.join(folder, name))
            if raw is not None:
                doc = self._decode(raw, name[:-5])
                docs[doc.id] = doc
        return docs


def _load(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())
    except FileNotFoundError:
        return None


def _signature(path: str | None) -> tuple:
    if path is None:
        return ()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ()
    return (st.st_ino, st.st_mtime_ns, st.st_size)


# --- the admin API's documents: a tenant's config and rules --------------------------------------
def _legacy_tenant_document(raw: dict[str, Any]) -> tuple[str, dict[str, Any], None, str | None]:
    """``{"version", "updated_at", "body"}`` (before the document store)."""
    return raw["version"], raw["body"], None, raw.get("updated_at")


class TenantDocuments:
    """Each tenant's config and rules (``tenants/<tenant>/{config,rules}.json``; revisions
    ``cfg_<date>_<NNN>`` / ``rules_<date>_<NNN>``), read on every request through `current`."""

    KINDS = ("config", "rules")
    _PREFIX = {"config": "cfg", "rules": "rules"}
    _NOTHING: dict[str, Any] = {}  # the body of a document never stored (read-only)

    def __init__(
        self,
        root: str,
        check_interval_s: float = 1.0,
        defaults: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`defaults`: the body each kind stands for while a tenant has stored none (the
        effective config a GET shows, with its `default_revision`)."""
        self.store = DocumentStore(root, check_interval_s)
        self.defaults = {kind: (defaults or {}).get(kind, {}) for kind in self.KINDS}
        self._default_revisions = {
            kind: default_revision(self._PREFIX[kind], body) if body else None
            for kind, body in self.defaults.items()
        }
        self._kinds = {
            kind: self.store.collection(
                kind,
                folder="tenants/{tenant}",
                ids=(kind,),
                prefix=self._PREFIX[kind],
                revisions=counted_revision(self._PREFIX[kind]),
                legacy=Legacy(_legacy_tenant_document),
            )
            for kind in self.KINDS
        }

    def collection(self, kind: str) -> Collection:
        return self._kinds[kind]

    def exists(self, tenant: str) -> bool:
        """True when the tenant has a folder of admin documents (it was configured once)."""
        return os.path.isdir(os.path.join(self.store.root, "tenants", check_tenant(tenant)))

    def current(self, tenant: str, kind: str) -> tuple[dict[str, Any], str | None]:
        """(body, revision) of the tenant's stored `kind` document; ({}, the defaults'
        revision) when none (the server's defaults apply): the hot path's read (cached; the
        same body object while the file is unchanged)."""
        doc = self._kinds[kind].cached(tenant, kind)
        if doc is None:
            return self._NOTHING, self._default_revisions[kind]
        return doc.body, doc.revision

    def invalidate(self, tenant: str, kinds: tuple[str, ...] = KINDS) -> None:
        """Forget this process's cached `kinds` documents of `tenant`."""
        for kind in kinds:
            self._kinds[kind].invalidate(tenant)


def declared_event_types(storage: Storage, tenant: str) -> dict[str, float]:
    """The event types (with their weights) a tenant declared in its config document
    (``PUT /v1/admin/tenants/{tenant}/config``, `event_types`), read from ``<root>/serving``
    of a data root: what the ingest (and `recsys import`'s dry run) accept beside the built-in
    types, as the API's event intake does, and what training weighs events by. {} where the
    tenant declared none, and on a root that is not a local folder (the API keeps its
    documents on one)."""
    if not storage.is_local:
        return {}
    documents = TenantDocuments(storage.serving_dir().removeprefix("file://"))
    return dict(documents.current(tenant, "config")[0].get("event_types") or {})

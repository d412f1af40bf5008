"""Control plane: named vector indexes clients write, searched beside the snapshot's factors.

Routes (tenant-scoped; writes need `admin`):

* ``POST /v1/recs/embeddings/index``: add or replace one vector (``id``, ``vector``,
  ``metadata``) in a named index (``index``, default ``default``; created by its first vector,
  whose length fixes its dimension); ``POST /v1/recs/embeddings/bulk``: many (a JSON array or
  NDJSON, one answer per line; a bad line never refuses the good ones);
* ``DELETE /v1/recs/embeddings/{id}?index=``: remove one;
* search is ``POST /v1/recs/embeddings/search`` (`serving.recs.runtime`): ``index`` names a
  client index, or ``items`` / ``users`` (the default ``items``) for the live snapshot's
  factors, which are one read-only index; filters on metadata values and tags;
* ``POST /v1/recs/embeddings/generate``: a text, an item payload or a catalogue item id ->
  the vector of the tenant's content model (`recsys.content`: TF-IDF + SVD the pipeline fitted
  on its item texts, `ContentModels`; nothing is downloaded); its item vectors are the
  read-only index ``content``, so generate + search is a text search over the catalogue.

Storage: ``<data root>/serving/vectors/<tenant>/<index>.log``, an append-only NDJSON log (its
first line ``{"op": "init", "dim", "metric"}``, then ``put`` / ``del`` lines), appended under
an ``flock`` and fsync'd before the answer: durable across restarts and shared by every worker.
Each worker keeps the index in memory (`recsys.vectors.VectorIndex`: exact search up to 50k
rows, faiss IVF beyond) and reads only the lines appended since its last look (at most every
0.25 s, at once after its own write). Metadata filters use per-index postings
((key, value) -> rows), so a filter costs what it admits, not the index size.

Bad input is Problem Details: a vector of another dimension than its index, a zero vector
(cosine), non-finite values (JSON cannot carry NaN; 400), writes to ``items`` / ``users`` (422).
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
import time
from typing import Annotated, Any, Literal

import falcon
import msgspec
import numpy as np
import orjson
import polars as pl
from msgspec import Meta

from recsys import content
from recsys.contract import PATTERN_END
from recsys.durable import fsync_dir, write_atomic
from recsys.tenancy import check_tenant
from recsys.vectors import VectorIndex
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND
from serving.errors import ProblemError
from serving.recs.schemas import Query
from serving.routing import JSON, MALFORMED, NDJSON, Route, read_body
from serving.schemas import MAX_ID_LENGTH, Body, Reply

#: Read-only indexes: the live snapshot's factors and the content model's item vectors.
SNAPSHOT_INDEXES = ("items", "users", "content")
INDEX_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}" + PATTERN_END)
IndexName = Annotated[str, Meta(pattern=INDEX_NAME.pattern, description="an index name")]
VectorKey = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LENGTH + 5)]
Component = Annotated[float, Meta(ge=-1e12, le=1e12)]
Vector = Annotated[list[Component], Meta(min_length=1, max_length=4096)]
MetaValue = str | int | float | bool | None | list[str]
Metadata = Annotated[dict[str, MetaValue], Meta(max_length=64)]
CHECK_S = 0.25
MAX_BULK = 10_000
#: A log of at least this size is compacted when most of its rows are dead (replaced or
#: deleted vectors).
COMPACT_BYTES = 64 << 20


class VectorUpsert(Body):
    """One vector: its id (e.g. ``item:123``), components and metadata (scalars, or a list of
    tags under ``tags``)."""

    id: VectorKey
    vector: Vector
    metadata: Metadata | None = None
    index: IndexName = "default"
    metric: Literal["cosine", "dot"] | None = None


#: A bulk body as the schema states it: any lines (each is checked on its own and answered in
#: the results), at least one.
BulkVectors = Annotated[
    list[
        Annotated[
            Any,
            Meta(
                description="a VectorUpsert ({id, vector, metadata?, index?, metric?}); a line "
                "that is not one is rejected in the answer"
            ),
        ]
    ],
    Meta(min_length=1),
]


class VectorStored(Reply, forbid_unknown_fields=True):
    id: str
    index: str
    dim: int
    metric: str
    replaced: bool
    size: int


class VectorLineResult(Reply, forbid_unknown_fields=True):
    line: int
    status: Literal["indexed", "rejected"]
    id: str | None = None
    reason: str | None = None
    detail: str | None = None


class VectorBulkReceipt(Reply, forbid_unknown_fields=True):
    indexed: int
    rejected: int
    results: list[VectorLineResult]


class ItemText(Body):
    """An item payload to embed (its text is built as the pipeline builds it)."""

    title: Annotated[str, Meta(max_length=10_000)] | None = None
    category: Annotated[str, Meta(max_length=256)] | None = None
    brand: Annotated[str, Meta(max_length=256)] | None = None
    tags: Annotated[list[Annotated[str, Meta(max_length=256)]], Meta(max_length=256)] = []


class GenerateRequest(Body):
    """Give `input` (a text), `item` (an item payload) or `item_id` (a catalogue item)."""

    input: Annotated[str, Meta(max_length=10_000)] | None = None
    item: ItemText | None = None
    item_id: VectorKey | None = None
    model: Literal["content"] = "content"


class GeneratedVector(Reply, forbid_unknown_fields=True):
    model: str
    dim: int
    vector: list[float]
    text: str


class VectorDeleteQuery(Query):
    index: IndexName = "default"


class VectorDeleted(Reply, forbid_unknown_fields=True):
    id: str
    index: str
    status: Literal["deleted"]


class _Loaded:
    """One index as this worker holds it, with how far into its log it has read."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        self.index: VectorIndex | None = None
        self.postings: dict[tuple[str, str], list[int]] = {}
        self.checked = -1e18
        self.writes_seen = -1
        self.lock = threading.Lock()

    def poll(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.index, self.offset, self.inode, self.postings = None, 0, None, {}
            return
        if st.st_ino != self.inode:
            self.index, self.offset, self.inode, self.postings = None, 0, st.st_ino, {}
        if st.st_size == self.offset:
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(st.st_size - self.offset)
        end = data.rfind(b"\n") + 1
        ids: list[str] = []
        vectors: list[list[float]] = []
        metas: list[dict | None] = []

        def flush() -> None:
            if ids and self.index is not None:
                start = self.index.rows
                self.index.upsert(ids, np.asarray(vectors, dtype=np.float32), metas)
                for j, meta in enumerate(metas):
                    self._post(start + j, meta)
                ids.clear(), vectors.clear(), metas.clear()

        for line in data[:end].splitlines():
            op = orjson.loads(line)
            kind = op["op"]
            if kind == "init":
                self.index = VectorIndex(op["dim"], op["metric"])
            elif kind == "put":
                if op["id"] in ids:  # (a replacement within one batch: apply in order)
                    flush()
                ids.append(op["id"])
                vectors.append(op["v"])
                metas.append(op.get("m"))
            elif kind == "del":
                flush()
                if self.index is not None:
                    self.index.delete(op["id"])
        flush()
        self.offset += end

    def _post(self, row: int, meta: dict | None) -> None:
        for key, value in (meta or {}).items():
            values = value if isinstance(value, list) else [value]
            for v in values:
                self.postings.setdefault((key, _value_key(v)), []).append(row)

    def allow(self, wanted: dict[str, Any]) -> np.ndarray | None:
        """bool per row: metadata holds every (key, value) of `wanted` (a list value: all of
        its items); None when nothing is asked."""
        if not wanted or self.index is None:
            return None
        mask = np.ones(self.index.rows, dtype=bool)
        for key, value in wanted.items():
            for v in value if isinstance(value, list) else [value]:
                rows = self.postings.get((key, _value_key(v)), [])
                hit = np.zeros(self.index.rows, dtype=bool)
                hit[rows] = True
                mask &= hit
        return mask


def _value_key(v: Any) -> str:
    return orjson.dumps(v).decode()


#: Appends by this process (a worker re-reads an index at once after its own write).
_WRITES = [0]


class VectorStore:
    """Every tenant's client indexes (see the module docstring)."""

    def __init__(self, serving_dir: str) -> None:
        self.root = os.path.join(serving_dir, "vectors")
        self._loaded: dict[tuple[str, str], _Loaded] = {}
        self._lock = threading.Lock()

    def path(self, tenant: str, name: str) -> str:
        if not INDEX_NAME.match(name):
            raise ValueError(f"bad index name {name!r}")
        return os.path.join(self.root, check_tenant(tenant), f"{name}.log")

    def loaded(self, tenant: str, name: str) -> _Loaded:
        key = (tenant, name)
        with self._lock:
            found = self._loaded.get(key)
            if found is None:
                found = self._loaded[key] = _Loaded(self.path(tenant, name))
        now = time.monotonic()
        if now - found.checked >= CHECK_S or found.writes_seen != _WRITES[0]:
            with found.lock:
                found.checked, found.writes_seen = now, _WRITES[0]
                found.poll()
        return found

    def index(self, tenant: str, name: str) -> VectorIndex | None:
        return self.loaded(tenant, name).index

    def names(self, tenant: str) -> list[str]:
        folder = os.path.join(self.root, check_tenant(tenant))
        if not os.path.isdir(folder):
            return []
        return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".log"))

    def write(
        self, tenant: str, name: str, puts: list[VectorUpsert], dels: list[str] = ()
    ) -> list[tuple[str, str] | None]:
        """Append puts (each checked: None, or (reason, detail) when refused) and deletes;
        durable on return. The index is created by its first put."""
        if name in SNAPSHOT_INDEXES:
            raise ProblemError(
                422,
                f"Index '{name}' is read-only (items / users: the live snapshot's factors; "
                "content: the content model's item vectors). Write to another index name.",
                code="RECSYS_READ_ONLY_INDEX",
            )
        path = self.path(tenant, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # (the lock is a file of its own: compaction replaces the log's inode)
        lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return self._append(tenant, name, path, puts, dels)
        finally:
            os.close(lock)

    def _append(
        self, tenant: str, name: str, path: str, puts: list[VectorUpsert], dels: list[str]
    ) -> list[tuple[str, str] | None]:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            head = os.pread(fd, 4096, 0).split(b"\n", 1)[0]
            lines: list[bytes] = []
            if head:
                init = orjson.loads(head)
                dim, metric = init["dim"], init["metric"]
            elif puts:
                dim, metric = len(puts[0].vector), puts[0].metric or "cosine"
                lines.append(orjson.dumps({"op": "init", "dim": dim, "metric": metric}))
            else:
                dim, metric = None, None
            checker = VectorIndex(dim, metric) if dim is not None else None
            outcomes: list[tuple[str, str] | None] = []
            for p in puts:
                why = _refused(p, checker, metric)
                outcomes.append(why)
                if why is None:
                    op = {"op": "put", "id": p.id, "v": p.vector}
                    if p.metadata:
                        op["m"] = p.metadata
                    lines.append(orjson.dumps(op))
            lines += [orjson.dumps({"op": "del", "id": d}) for d in dels]
            if lines:
                os.write(fd, b"\n".join(lines) + b"\n")
                os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(path))
        _WRITES[0] += 1
        if size >= COMPACT_BYTES:
            self._compact(tenant, name, path)
        return outcomes

    def _compact(self, tenant: str, name: str, path: str) -> None:
        """(under the index's lock) When most of the log's rows are replaced or deleted ones,
        rewrite it as the live vectors only (a new file renamed over it: readers see another
        inode and read it afresh)."""
        found = self.loaded(tenant, name)
        with found.lock:
            found.poll()
            index = found.index
            if index is None or index.rows <= 2 * len(index):
                return
            out = [orjson.dumps({"op": "init", "dim": index.dim, "metric": index.metric})]
            for key, row in sorted(index.row_of.items(), key=lambda kv: kv[1]):
                op: dict[str, Any] = {"op": "put", "id": key, "v": index.vectors[row].tolist()}
                if index.metadata[row]:
                    op["m"] = index.metadata[row]
                out.append(orjson.dumps(op))
        write_atomic(path, b"\n".join(out) + b"\n")


def _refused(p: VectorUpsert, checker: VectorIndex | None, metric: str) -> tuple[str, str] | None:
    if checker is None:
        return None
    if p.metric is not None and p.metric != metric:
        return "wrong_metric", f"the index's metric is {metric}"
    if len(p.vector) != checker.dim:
        return (
            "wrong_dimension",
            f"the index holds vectors of {checker.dim} numbers, not {len(p.vector)}",
        )
    try:
        checker.prepare(np.asarray(p.vector, dtype=np.float32))
    except ValueError as e:
        return "bad_vector", str(e)
    return None


_TAGS = ("embeddings",)
ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/recs/embeddings/index",
        ("embeddings", "on_post_index"),
        "Add or replace one vector with metadata in a named index (created by its first "
        "vector); durable before the answer, searchable on every worker",
        SCOPE_ADMIN,
        body=VectorUpsert,
        status=201,
        also=(200,),
        response=VectorStored,
        errors=(422,),
        tags=_TAGS,
    ),
    Route(
        "POST",
        "/v1/recs/embeddings/bulk",
        ("embeddings", "on_post_bulk"),
        "Add or replace many vectors: a JSON array or NDJSON (one vector a line); each line is "
        "answered on its own",
        SCOPE_ADMIN,
        body=BulkVectors,
        media=(JSON, NDJSON),
        body_by_handler=True,
        response=VectorBulkReceipt,
        errors=(413, 422),
        tags=_TAGS,
    ),
    Route(
        "DELETE",
        "/v1/recs/embeddings/{embedding_id}",
        ("embeddings", "on_delete"),
        "Remove a vector from a client index (?index=, default 'default')",
        SCOPE_ADMIN,
        params={"embedding_id": VectorKey},
        query=VectorDeleteQuery,
        response=VectorDeleted,
        errors=(422,),
        tags=_TAGS,
    ),
)


class EmbeddingResources:
    def __init__(self, vectors: VectorStore, models: ContentModels) -> None:
        self.vectors = vectors
        self.models = models

    def on_post_generate(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = generate(self.models, req.context.principal.tenant, req.context.body)

    def on_post_index(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        body: VectorUpsert = req.context.body
        before = self.vectors.index(tenant, body.index)
        replaced = before is not None and body.id in before.row_of
        (why,) = self.vectors.write(tenant, body.index, [body])
        if why is not None:
            raise ProblemError(422, why[1], code="RECSYS_INVALID_VECTOR", extra={"reason": why[0]})
        index = self.vectors.index(tenant, body.index)
        req.context.audit = {"target": f"embeddings/{body.index}/{body.id}", "before": None}
        resp.status = falcon.HTTP_200 if replaced else falcon.HTTP_201
        resp.media = {
            "id": body.id,
            "index": body.index,
            "dim": index.dim,
            "metric": index.metric,
            "replaced": replaced,
            "size": len(index),
        }

    def on_post_bulk(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = req.context.principal.tenant
        ndjson = (req.content_type or "").split(";")[0].strip().lower() == NDJSON
        chunks = _lines(read_body(req), ndjson)
        results: list[dict[str, Any] | None] = [None] * len(chunks)
        by_index: dict[str, list[tuple[int, VectorUpsert]]] = {}
        for n, chunk in enumerate(chunks):
            if isinstance(chunk, bytes):
                results[n] = {"line": n + 1, "status": "rejected", "reason": "unparsable",
                              "detail": "not JSON"}  # fmt: skip
                continue
            try:
                line = msgspec.convert(chunk, VectorUpsert)
            except msgspec.ValidationError as e:
                results[n] = {"line": n + 1, "status": "rejected", "reason": "invalid",
                              "detail": str(e)}  # fmt: skip
                continue
            by_index.setdefault(line.index, []).append((n, line))
        for name, lines in by_index.items():
            try:
                outcomes = self.vectors.write(tenant, name, [p for _, p in lines])
            except ProblemError as e:
                outcomes = [("read_only_index", e.description)] * len(lines)
            for (n, p), why in zip(lines, outcomes, strict=True):
                results[n] = (
                    {"line": n + 1, "status": "indexed", "id": p.id}
                    if why is None
                    else {
                        "line": n + 1,
                        "status": "rejected",
                        "id": p.id,
                        "reason": why[0],
                        "detail": why[1],
                    }  # fmt: skip
                )
        done = [r for r in results if r is not None]
        indexed = sum(1 for r in done if r["status"] == "indexed")
        req.context.audit = {"target": f"embeddings/bulk ({indexed} indexed)", "before": None}
        resp.media = {"indexed": indexed, "rejected": len(done) - indexed, "results": done}

    def on_delete(self, req: falcon.Request, resp: falcon.Response, embedding_id: str) -> None:
        tenant = req.context.principal.tenant
        name = req.context.query.index
        if name in SNAPSHOT_INDEXES:
            raise ProblemError(
                422, f"Index '{name}' is read-only (the snapshot's factors or the content model).",
                code="RECSYS_READ_ONLY_INDEX",
            )  # fmt: skip
        index = self.vectors.index(tenant, name)
        if index is None or embedding_id not in index.row_of:
            raise ProblemError(
                404, f"No vector '{embedding_id}' in index '{name}'.", code="RECSYS_NOT_FOUND"
            )
        self.vectors.write(tenant, name, [], [embedding_id])
        req.context.audit = {"target": f"embeddings/{name}/{embedding_id}", "before": None}
        resp.media = {"id": embedding_id, "index": name, "status": "deleted"}


def _lines(raw: bytes, ndjson: bool) -> list[Any]:
    """A bulk body's entries: a JSON array (application/json), or NDJSON lines
    (application/x-ndjson: a line that is not JSON stays as its bytes, answered as rejected;
    a body no line of which is JSON is 400)."""
    body = raw.strip()
    if not body:
        raise ProblemError(400, "The bulk body holds no vectors.")
    if ndjson:
        out: list[Any] = []
        for line in body.split(b"\n"):
            if line.strip():
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    out.append(bytes(line[:100]))
        if out and all(isinstance(x, bytes) for x in out):
            raise ProblemError(400, "No line of the NDJSON body is JSON.", code=MALFORMED)
    else:
        try:
            out = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ProblemError(400, "The body is not valid JSON.", code=MALFORMED) from None
        if not isinstance(out, list):
            raise ProblemError(
                400, "A bulk body is a JSON array of vectors (or NDJSON: application/x-ndjson)."
            )
    if not out:
        raise ProblemError(400, "The bulk body holds no vectors.")
    if len(out) > MAX_BULK:
        raise ProblemError(413, f"{len(out)} vectors in one request; the limit is {MAX_BULK}.")
    return out


class _ContentIndex:
    """A content model's item vectors as a search index (what `VectorStore.loaded` gives for
    client indexes): items without any known term (zero vectors) are left out."""

    def __init__(self, model: Any) -> None:
        keep = np.flatnonzero(np.abs(model.item_vectors).sum(axis=1) > 0)
        self.index = VectorIndex(model.dim, "cosine")
        self.index.upsert(
            [f"item:{model.item_ids[r]}" for r in keep.tolist()],
            model.item_vectors[keep],
            prepared=True,
        )

    def allow(self, wanted: dict[str, Any]) -> np.ndarray | None:
        if wanted:
            raise ProblemError(
                422,
                "The content index has no metadata to filter on; filter item factors "
                "(index 'items') or a client index.",
            )
        return None


class ContentModels:
    """Each tenant's content model (`recsys.content`, written by the pipeline's
    `content_embeddings` asset to ``warehouse/<tenant>/content/``), re-read when its file
    changes (checked at most every few seconds)."""

    CHECK_S = 5.0

    def __init__(self, data_root: str) -> None:
        self.data_root = data_root
        self._models: dict[str, tuple[float, tuple, Any]] = {}
        self._lock = threading.Lock()

    def folder(self, tenant: str) -> str:
        return os.path.join(self.data_root, "warehouse", check_tenant(tenant), "content")

    def get(self, tenant: str) -> Any:
        """The tenant's `ContentModel` (with `.row_of` and `.version`), or None."""
        now = time.monotonic()
        entry = self._models.get(tenant)
        if entry is not None and now - entry[0] < self.CHECK_S:
            return entry[2]
        folder = self.folder(tenant)
        try:
            st = os.stat(os.path.join(folder, content.MODEL_FILE))
            st2 = os.stat(os.path.join(folder, content.ITEMS_FILE))
            sig = (st.st_ino, st.st_mtime_ns, st2.st_ino, st2.st_mtime_ns)
        except FileNotFoundError:
            sig = ()
        if entry is not None and entry[1] == sig:
            self._models[tenant] = (now, sig, entry[2])
            return entry[2]
        model = None
        if sig:
            with self._lock:
                model = content.ContentModel.load(folder)
                model.row_of = {i: r for r, i in enumerate(model.item_ids)}
                model.version = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(st.st_mtime))
        self._models[tenant] = (now, sig, model)
        return model

    def loaded(self, tenant: str) -> _ContentIndex:
        """The content model's item vectors as the read-only index ``content`` (ids
        ``item:<id>``; 503 before the pipeline fitted a model)."""
        model = self.require(tenant)
        found = getattr(model, "search_index", None)
        if found is None:
            found = model.search_index = _ContentIndex(model)
        return found

    def require(self, tenant: str) -> Any:
        model = self.get(tenant)
        if model is None:
            raise ProblemError(
                503,
                "No content model for this tenant yet: the pipeline's content_embeddings asset "
                "has not run (recommendations keep serving).",
                code="RECSYS_NO_CONTENT_MODEL",
                headers={"Retry-After": "60"},
            )
        return model


ROUTES = (
    *ROUTES,
    Route(
        "POST",
        "/v1/recs/embeddings/generate",
        ("embeddings", "on_post_generate"),
        "Embed a text, an item payload or a catalogue item with the tenant's content model "
        "(TF-IDF + SVD fitted by the pipeline on its item texts; nothing is downloaded); 422 "
        "for an empty text or one with no word the model knows, 503 before the model exists",
        SCOPE_RECOMMEND,
        body=GenerateRequest,
        response=GeneratedVector,
        errors=(404, 422, 503),
        tags=_TAGS,
    ),
)


def generate(models: ContentModels, tenant: str, body: GenerateRequest) -> dict[str, Any]:
    """The answer of POST /v1/recs/embeddings/generate (see its route)."""
    given = [x for x in (body.input, body.item, body.item_id) if x is not None]
    if len(given) != 1:
        raise ProblemError(422, "Give exactly one of 'input', 'item' and 'item_id'.")
    model = models.require(tenant)
    if body.item_id is not None:
        row = model.row_of.get(body.item_id)
        if row is None:
            raise ProblemError(
                404, f"No item '{body.item_id}' in the content model.", code="RECSYS_UNKNOWN_ITEM"
            )
        vector, text = model.item_vectors[row], body.item_id
    else:
        if body.item is not None:
            frame = {k: [v] for k, v in msgspec.to_builtins(body.item).items()}
            text = content.item_texts(pl.DataFrame(frame))[0]
        else:
            text = body.input or ""
        if not text.strip():
            raise ProblemError(
                422, "The text is empty.", code="RECSYS_EMPTY_TEXT", extra={"reason": "empty"}
            )
        vector = model.embed([text])[0]
        if not vector.any():
            raise ProblemError(
                422,
                "No word or character sequence of the text is known to the content model.",
                code="RECSYS_EMPTY_TEXT",
                extra={"reason": "no_known_terms"},
            )
    return {
        "model": f"content@{model.version}",
        "dim": int(vector.shape[0]),
        "vector": [round(float(x), 7) for x in vector],
        "text": text,
    }


def resources(ctx: Any) -> dict[str, Any]:
    vectors = VectorStore(ctx.serving_dir)
    models = ContentModels(ctx.config.data_root)
    # (the search and related routes' handler, serving.recs.runtime, finds them here)
    ctx.store.vectors = vectors
    ctx.store.content = models
    return {"embeddings": EmbeddingResources(vectors, models)}

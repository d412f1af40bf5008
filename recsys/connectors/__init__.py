"""Connectors: pull data from a source into the landing zone, where ingest picks it up.

A connector is a document of the serving layer's store (``POST /v1/recs/connectors``;
``<data root>/serving/connectors/<tenant>/<id>.json``, body ``{"type", "target", "config",
"name"}``). Types:

* ``files``  -- a folder or bucket through fsspec (``file://``, ``s3://``, ``gs://``, ...);
  every new or changed file matching ``pattern`` is imported like ``recsys import`` does
  (`recsys.connectors.files`); a Dagster sensor watches the folder.
* ``nats``   -- a NATS JetStream stream, read by a durable pull consumer; a batch is acked only
  after it is fsync'd in landing (`recsys.connectors.stream`).
* ``redis``  -- a Redis stream read through a consumer group, the same way (XACK after fsync).
* ``http``   -- an HTTP JSON service polled (``GET url``; the records at ``records_path``)
  (`recsys.connectors.http`).

Targets: ``events``, ``items``, ``users`` (landing kinds) and ``features`` (item feature
rows: they land as ``items``, the catalogue's attribute rows). A run is `run_connector`: it
reads what is new, lands it (rows plus rejects with reasons, the readers of
`recsys.readers`), writes the connector's state (``<data root>/serving/connector-state/
<tenant>/<id>/``) and returns a summary; its progress goes to the `log` callback (the Dagster
op's log, which ``GET /v1/recs/connectors/{id}/logs`` returns). An unreachable source fails the
run with one clear line (`ConnectorError`) and touches nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import orjson

from recsys.durable import write_atomic
from recsys.errors import RecsysError
from recsys.tenancy import check_tenant

TYPES = ("files", "nats", "redis", "http")
TARGETS = ("events", "items", "users", "features")
COLLECTION = "connectors"  # the document store's folder (<data root>/serving/connectors/...)
Log = Callable[[str], None]


class ConnectorError(RecsysError):
    """A run that cannot proceed (unreachable source, refused credentials, a bad answer)."""


@dataclass
class RunSummary:
    """What one run did."""

    landed_files: list[str] = field(default_factory=list)
    rows: int = 0
    rejects: int = 0
    skipped: int = 0  # already landed (files seen before, stream messages redelivered)
    detail: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "landed_files": len(self.landed_files),
            "rows": self.rows,
            "rejects": self.rejects,
            "skipped": self.skipped,
            **self.detail,
        }


def landing_kind(target: str) -> str:
    """The landing folder a target's rows go to."""
    return "items" if target == "features" else target


def check_spec(kind: str, target: str, config: dict[str, Any]) -> dict[str, Any]:
    """The connector's config with defaults filled in; ValueError naming what is wrong (the
    API answers 422). Reachability is NOT checked: a connector to a source that is down is
    accepted, and its runs fail with a clear log until it is up."""
    if kind not in TYPES:
        raise ValueError(f"type must be one of {', '.join(TYPES)}, not {kind!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
    cfg = dict(config)
    mapping = cfg.setdefault("map", {})
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise ValueError("config.map is an object of source field -> contract column")
    if kind == "files":
        url = _need_str(cfg, "url")
        if "://" not in url and not url.startswith("/"):
            raise ValueError("config.url is an absolute path or an fsspec URL (s3://...)")
        cfg.setdefault("pattern", "*")
        _need_str(cfg, "pattern")
        fmt = cfg.setdefault("format", None)
        if fmt not in (None, "csv", "tsv", "ndjson", "parquet"):
            raise ValueError("config.format is csv, tsv, ndjson or parquet (or absent)")
        if not isinstance(cfg.setdefault("storage_options", {}), dict):
            raise ValueError("config.storage_options is an object")
    elif kind == "nats":
        servers = _need_str(cfg, "servers")
        for server in servers.split(","):
            if urlparse(server.strip()).scheme not in ("nats", "tls"):
                raise ValueError("config.servers are nats:// or tls:// URLs, comma-separated")
        _need_name(cfg, "stream")
        _need_str(cfg, "subject")
        cfg.setdefault("batch", 1000)
        if not isinstance(cfg["batch"], int) or not 1 <= cfg["batch"] <= 10_000:
            raise ValueError("config.batch is an integer from 1 to 10000")
    elif kind == "redis":
        if urlparse(_need_str(cfg, "url")).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("config.url is a redis://, rediss:// or unix:// URL")
        _need_str(cfg, "stream")
        cfg.setdefault("group", "recsys")
        _need_name(cfg, "group")
        cfg.setdefault("field", "data")  # the entry field holding the JSON message
        _need_str(cfg, "field")
        cfg.setdefault("batch", 1000)
        if not isinstance(cfg["batch"], int) or not 1 <= cfg["batch"] <= 10_000:
            raise ValueError("config.batch is an integer from 1 to 10000")
    elif kind == "http":
        url = _need_str(cfg, "url")
        if urlparse(url).scheme not in ("http", "https") or not urlparse(url).netloc:
            raise ValueError("config.url is an http:// or https:// URL")
        cfg.setdefault("records_path", None)
        if cfg["records_path"] is not None and not isinstance(cfg["records_path"], str):
            raise ValueError("config.records_path is a dotted path to the records (or null)")
        cfg.setdefault("interval_s", 300)
        if not isinstance(cfg["interval_s"], int) or cfg["interval_s"] < 10:
            raise ValueError("config.interval_s is an integer of at least 10")
        if not isinstance(cfg.setdefault("headers", {}), dict):
            raise ValueError("config.headers is an object")
    return cfg


def _need_str(cfg: dict[str, Any], key: str) -> str:
    value = cfg.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"config.{key} is required (a non-empty string)")
    return value


def _need_name(cfg: dict[str, Any], key: str) -> str:
    value = _need_str(cfg, key)
    if not value.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"config.{key} is letters, digits, '-' and '_'")
    return value


def read_connector(data_root: str, tenant: str, connector_id: str) -> dict[str, Any]:
    """The stored connector document's body (ConnectorError when there is none)."""
    path = os.path.join(
        data_root, "serving", COLLECTION, check_tenant(tenant), connector_id + ".json"
    )
    try:
        with open(path, "rb") as f:
            return orjson.loads(f.read())["body"]
    except FileNotFoundError:
        raise ConnectorError(f"tenant {tenant!r} has no connector {connector_id!r}") from None


def state_dir(data_root: str, tenant: str, connector_id: str) -> str:
    """Where a connector keeps its progress (what it has landed)."""
    return os.path.join(data_root, "serving", "connector-state", check_tenant(tenant), connector_id)


def load_state(data_root: str, tenant: str, connector_id: str) -> dict[str, Any]:
    try:
        with open(
            os.path.join(state_dir(data_root, tenant, connector_id), "state.json"), "rb"
        ) as f:
            return orjson.loads(f.read())
    except FileNotFoundError:
        return {}


def save_state(data_root: str, tenant: str, connector_id: str, state: dict[str, Any]) -> None:
    folder = state_dir(data_root, tenant, connector_id)
    os.makedirs(folder, exist_ok=True)
    write_atomic(os.path.join(folder, "state.json"), orjson.dumps(state))


def run_connector(
    data_root: str, tenant: str, connector_id: str, log: Log = print, **options: Any
) -> RunSummary:
    """One run of a stored connector (see the module docstring). `options` go to the type's
    runner (the stream's `idle_s`, `max_messages`)."""
    spec = read_connector(data_root, tenant, connector_id)
    kind, target, cfg = spec["type"], spec["target"], spec["config"]
    log(f"connector {connector_id} ({kind} -> {target}) of tenant {tenant}: run starts")
    if kind == "files":
        from recsys.connectors.files import run_files

        summary = run_files(data_root, tenant, connector_id, target, cfg, log)
    elif kind == "nats":
        from recsys.connectors.stream import run_nats

        summary = run_nats(data_root, tenant, connector_id, target, cfg, log, **options)
    elif kind == "redis":
        from recsys.connectors.stream import run_redis

        summary = run_redis(data_root, tenant, connector_id, target, cfg, log, **options)
    elif kind == "http":
        from recsys.connectors.http import run_http

        summary = run_http(data_root, tenant, connector_id, target, cfg, log)
    else:
        raise ConnectorError(f"unknown connector type {kind!r}")
    log(f"connector {connector_id}: run done: {orjson.dumps(summary.as_dict()).decode()}")
    return summary


def land(
    data_root: str,
    tenant: str,
    target: str,
    name: str,
    rows: Any,
    rejects: Any,
    mapping: dict[str, str] | None = None,
) -> list[str]:
    """Write a batch to landing: ``<name>.parquet`` (the rows, without ``_row``, source columns
    renamed by `mapping`) and ``<name>.rejected.parquet`` (rejects with reasons), each written
    whole and fsync'd (`write_parquet_atomic`) -- the same files ``recsys import`` lands. A
    name already used is replaced (a batch landed again after a crash overwrites its earlier
    attempt instead of adding to it). Returns the paths written."""
    import posixpath

    from recsys.adapters import apply_mapping
    from recsys.contract import REJECTED_SUFFIX
    from recsys.durable import write_parquet_atomic
    from recsys.storage import Storage

    storage = Storage(data_root)
    folder = storage.landing_dir(tenant, landing_kind(target))
    storage.makedirs(folder)
    written = []
    if mapping:
        rows = apply_mapping(rows, {k: v for k, v in mapping.items() if k in rows.columns})
    rows_path = posixpath.join(folder, name + ".parquet")
    rejects_path = posixpath.join(folder, name + REJECTED_SUFFIX)
    if rejects.height:
        write_parquet_atomic(rejects, rejects_path, storage.fs)
        written.append(rejects_path)
    elif storage.exists(rejects_path):  # from an earlier attempt of this batch
        storage.fs.rm(rejects_path)
    if rows.height and len(rows.columns) > 1:
        write_parquet_atomic(rows.drop("_row"), rows_path, storage.fs)
        written.append(rows_path)
    elif storage.exists(rows_path):
        storage.fs.rm(rows_path)
    return written


#: The id column of the landing kinds whose files fold by the columns they carry.
FOLDED_KEYS = {"items": "item_id", "users": "user_id"}


def field_layers(
    messages: list[bytes], id_field: str, columns: frozenset[str] | None = None
) -> list[list[int]]:
    """A batch of JSON messages (`id_field`: the source field of the id) split into files of
    one field set each that keep every id's messages in order, in one pass: a message joins the
    earliest file of its fields not before the file of its id's previous message, or starts a
    new one (usually one or two files a batch). `columns`: the source fields that count (the
    contract's columns; others are dropped by validation, so they split nothing); None: all.
    Returns each file's message indices, files in the order they must land.

    An items or users file changes, for the ids it names, the columns it carries
    (`recsys.ingest.build_table`), so a batch landed as one file gave every record the batch's
    fields and cleared, for a record without one, that field. A message that is not a JSON
    object (a reject of the reader) joins the first file."""
    layers: list[tuple[frozenset[str] | None, list[int]]] = []
    layer_of_id: dict[str, int] = {}
    for i, raw in enumerate(messages):
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if not layers:
                layers.append((None, []))
            layers[0][1].append(i)
            continue
        fields = frozenset(record if columns is None else (f for f in record if f in columns))
        value = record.get(id_field)
        ident = value if isinstance(value, str) else orjson.dumps(value).decode()
        after = layer_of_id.get(ident, 0)
        for j in range(after, len(layers)):
            if layers[j][0] in (fields, None):  # (None: a layer of rejects only, so far)
                if layers[j][0] is None:
                    layers[j] = (fields, layers[j][1])
                break
        else:
            j = len(layers)
            layers.append((fields, []))
        layers[j][1].append(i)
        layer_of_id[ident] = j
    return [indices for _, indices in layers]


def land_messages(
    data_root: str,
    tenant: str,
    target: str,
    name: str,
    messages: list[bytes],
    numbers: list[int],
    source: str,
    mapping: dict[str, str] | None = None,
) -> tuple[list[str], int, int]:
    """Read a batch of stream messages (`recsys.readers.read_messages`; `numbers`: their
    numbers in the source) and land it under `name` (`land`). Events land as one file. Items
    and users (which fold by the columns a file carries) land in `field_layers`: ``name``, then
    ``name-00001``, ... in the order they fold, so that a message changes only the fields it
    has; layer files of `name` from an earlier attempt of this batch that this one does not
    write are removed. Returns (paths written, rows, rejects)."""
    from recsys.contract import SCHEMAS
    from recsys.readers import read_messages

    kind = landing_kind(target)
    if kind in FOLDED_KEYS:
        key, renames = FOLDED_KEYS[kind], mapping or {}
        id_field = next((s for s, c in renames.items() if c == key), key)
        contract = SCHEMAS[kind]
        columns = frozenset(contract) | {s for s, c in renames.items() if c in contract}
        layers = field_layers(messages, id_field, columns)
    else:
        layers = [list(range(len(messages)))]
    written, n_rows, n_rejects = [], 0, 0
    for j, indices in enumerate(layers):
        rows, rejects = read_messages(
            [messages[i] for i in indices], source=source, numbers=[numbers[i] for i in indices]
        )
        written += land(
            data_root, tenant, target, f"{name}-{j:05d}" if j else name, rows, rejects, mapping
        )
        n_rows, n_rejects = n_rows + rows.height, n_rejects + rejects.height
    if kind in FOLDED_KEYS:
        _remove_layers(data_root, tenant, kind, name, keep=len(layers))
    return written, n_rows, n_rejects


def _remove_layers(data_root: str, tenant: str, kind: str, name: str, keep: int) -> None:
    """Remove the layer files ``name-NNNNN`` (and their rejects) numbered `keep` or more."""
    import posixpath
    import re

    from recsys.storage import Storage

    storage = Storage(data_root)
    layer = re.compile(re.escape(name) + r"-(\d{5})(\.rejected)?\.parquet")
    for path in storage.landing_files(tenant, kind):
        found = layer.fullmatch(posixpath.basename(path))
        if found and int(found.group(1)) >= keep:
            storage.fs.rm(path)


# --- the command line: `recsys connectors run` ---------------------------------------------------
def register(sub: Any) -> None:
    """Add ``recsys connectors run ID --tenant T`` (one run, as the Dagster op does)."""
    import argparse

    from recsys.contract import DEFAULT_TENANT
    from recsys.tenancy import tenant_arg

    p = sub.add_parser("connectors", help="run a stored connector once")
    verbs = p.add_subparsers(dest="connectors_command", required=True)
    r = verbs.add_parser("run", help="pull what is new from a connector's source into landing")
    r.add_argument("connector_id")
    r.add_argument("--tenant", default=DEFAULT_TENANT, type=tenant_arg)
    r.add_argument("--data-root", default=None)
    r.add_argument("--idle", type=float, default=2.0, help="stream: stop after S idle seconds")

    def cmd(args: argparse.Namespace) -> int:
        import sys

        from recsys.storage import default_root

        root = args.data_root or default_root()
        kind = read_connector(root, args.tenant, args.connector_id)["type"]
        options = {"idle_s": args.idle} if kind in ("nats", "redis") else {}

        def log(line: str) -> None:
            print(line, file=sys.stderr, flush=True)

        summary = run_connector(root, args.tenant, args.connector_id, log, **options)
        print(orjson.dumps(summary.as_dict()).decode())
        return 0

    r.set_defaults(func=cmd)

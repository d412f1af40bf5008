"""Durable, versioned tenant config and rules (the admin API's state).

Each document lives in ``<data_root>/serving/tenants/<tenant>/{config,rules}.json`` as
``{"version": "...", "updated_at": "...", "body": {...}}``. Writes are compare-and-swap under an
exclusive `flock` (so gunicorn workers and hosts sharing the folder never lose an update), then
written to a temporary file, fsynced and renamed over the old one (atomic on POSIX).

Readers on the hot path use `cached()`, which re-stats the file at most once per
`check_interval_s`; a write by another worker is therefore visible within that interval.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson

from recsys.durable import write_atomic

KINDS = ("config", "rules")
_TENANT_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


class VersionConflict(Exception):
    """The caller's If-Match version is not the stored one."""

    def __init__(self, current: str | None) -> None:
        super().__init__(f"stored version is {current!r}")
        self.current = current


@dataclass(frozen=True, slots=True)
class Document:
    version: str | None  # None: nothing stored yet (defaults apply)
    updated_at: str | None
    body: dict[str, Any]


def valid_tenant(tenant: str) -> bool:
    return bool(_TENANT_OK.match(tenant))


class TenantStore:
    """Config and rules documents of every tenant under one folder."""

    def __init__(self, root: str, check_interval_s: float = 1.0) -> None:
        self.root = os.path.abspath(root)
        self._interval = check_interval_s
        # (tenant, kind) -> (checked_at, stat signature, Document)
        self._cache: dict[tuple[str, str], tuple[float, tuple, Document]] = {}
        self._lock = threading.Lock()

    def path(self, tenant: str, kind: str) -> str:
        if kind not in KINDS or not valid_tenant(tenant):
            raise ValueError(f"bad tenant {tenant!r} or kind {kind!r}")
        return os.path.join(self.root, "tenants", tenant, f"{kind}.json")

    def exists(self, tenant: str) -> bool:
        return os.path.isdir(os.path.join(self.root, "tenants", tenant))

    def read(self, tenant: str, kind: str) -> Document:
        """The stored document, read from disk now (admin reads use this)."""
        try:
            with open(self.path(tenant, kind), "rb") as f:
                raw = orjson.loads(f.read())
        except FileNotFoundError:
            return Document(None, None, {})
        return Document(raw["version"], raw.get("updated_at"), raw["body"])

    def cached(self, tenant: str, kind: str) -> Document:
        """The document, re-read only when its file changed (checked once per interval)."""
        key = (tenant, kind)
        now = time.monotonic()
        entry = self._cache.get(key)
        if entry is not None and now - entry[0] < self._interval:
            return entry[2]
        sig = self._signature(tenant, kind)
        if entry is not None and entry[1] == sig:
            self._cache[key] = (now, sig, entry[2])
            return entry[2]
        doc = self.read(tenant, kind)
        self._cache[key] = (now, sig, doc)
        return doc

    def invalidate(self, tenant: str, kinds: tuple[str, ...] = KINDS) -> None:
        """Forget cached documents of `tenant` so the next read goes to disk."""
        for kind in kinds:
            self._cache.pop((tenant, kind), None)

    def write(self, tenant: str, kind: str, body: dict[str, Any], if_match: str | None) -> Document:
        """Replace the document if `if_match` is None, '*' or the stored version; else conflict.

        Returns the new document with its new version.
        """
        path = self.path(tenant, kind)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with self._lock, open(path + ".lock", "a+") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            current = self.read(tenant, kind)
            if if_match is not None and if_match != "*" and if_match != current.version:
                raise VersionConflict(current.version)
            if if_match == "*" and current.version is None:
                raise VersionConflict(None)
            now = dt.datetime.now(dt.UTC)
            version = _next_version(kind, current.version, now)
            doc = Document(version, now.isoformat(timespec="seconds"), body)
            payload = orjson.dumps(
                {"version": doc.version, "updated_at": doc.updated_at, "body": body},
                option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS,
            )
            write_atomic(path, payload)
        self.invalidate(tenant, (kind,))
        return doc

    def _signature(self, tenant: str, kind: str) -> tuple:
        try:
            st = os.stat(self.path(tenant, kind))
        except FileNotFoundError:
            return ()
        return (st.st_ino, st.st_mtime_ns, st.st_size)


def _next_version(kind: str, previous: str | None, now: dt.datetime) -> str:
    """`cfg_2026-01-29_001` / `rules_2026-01-29_003`: date plus a counter that never repeats."""
    prefix = "cfg" if kind == "config" else "rules"
    counter = 0
    if previous:
        try:
            counter = int(previous.rsplit("_", 1)[1])
        except (IndexError, ValueError):
            counter = 0
    return f"{prefix}_{now:%Y-%m-%d}_{counter + 1:03d}"

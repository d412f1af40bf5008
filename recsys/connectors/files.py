"""The files connector: a folder or bucket (any fsspec URL) whose new or changed files are
imported like ``recsys import`` (`recsys.ingest.import_file`: read with rejects, land as
Parquet named by content hash, so a file imported twice lands once).

The state remembers each file's signature (size and modification time or ETag) and what its
import said; a file whose signature is unchanged is skipped. A file that cannot be imported
(empty, no header, an unknown format) is logged with its reason, remembered, and does not stop
the others. A folder that cannot be listed fails the run (`ConnectorError`).
"""

from __future__ import annotations

import fnmatch
from typing import Any

from fsspec.core import url_to_fs

from recsys.connectors import ConnectorError, Log, RunSummary, landing_kind, load_state, save_state
from recsys.errors import RecsysError


def signature(info: dict[str, Any]) -> str:
    return f"{info.get('size')}:{info.get('mtime') or info.get('LastModified') or info.get('ETag')}"


def list_files(url: str, pattern: str) -> dict[str, str]:
    """{url of each file matching `pattern` in the folder: its signature} (ConnectorError when
    the folder cannot be listed)."""
    try:
        fs, root = url_to_fs(url)
        if not fs.isdir(root):
            raise ConnectorError(f"cannot list {url}: there is no such folder or bucket")
        entries = fs.find(root, detail=True)
    except ConnectorError:
        raise
    except Exception as exc:  # missing bucket, refused credentials, unreachable endpoint
        raise ConnectorError(f"cannot list {url}: {type(exc).__name__}: {exc}") from exc
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    out = {}
    for path, info in sorted(entries.items()):
        name = path.rsplit("/", 1)[-1]
        if info.get("type") == "directory" or name.startswith("."):
            continue
        if not fnmatch.fnmatch(name, pattern):
            continue
        full = path if protocol in ("file", "local") else f"{protocol}://{path}"
        out[full] = signature(info)
    return out


def run_files(
    data_root: str, tenant: str, connector_id: str, target: str, cfg: dict[str, Any], log: Log
) -> RunSummary:
    from recsys.ingest import import_file
    from recsys.storage import Storage

    files = list_files(cfg["url"], cfg.get("pattern", "*"))
    state = load_state(data_root, tenant, connector_id)
    seen: dict[str, Any] = state.get("files", {})
    summary = RunSummary()
    storage = Storage(data_root)
    for url, sig in files.items():
        if seen.get(url, {}).get("signature") == sig:
            summary.skipped += 1
            continue
        try:
            result = import_file(
                storage,
                landing_kind(target),
                url,
                tenant=tenant,
                fmt=cfg.get("format"),
                mapping=cfg.get("map") or None,
            )
        except RecsysError as exc:
            log(f"{url}: not imported: {exc}")
            seen[url] = {"signature": sig, "error": str(exc)}
            continue
        summary.rows += result.rows
        summary.rejects += result.unparsable + sum(result.would_reject.values())
        if not result.already_landed:
            summary.landed_files.append(result.landed)
        log(
            f"{url}: {result.rows} rows, {result.unparsable} unparsable, "
            f"would reject {dict(result.would_reject)}"
            + (" (already landed)" if result.pending and result.already_landed else "")
            + ("" if result.pending else " (imported and ingested before)")
        )
        seen[url] = {"signature": sig, "landed": result.landed}
    save_state(data_root, tenant, connector_id, {**state, "files": seen})
    summary.detail = {"files_listed": len(files)}
    return summary

"""The HTTP connector: a JSON product or user service, polled.

``GET url`` (with the configured headers, 10 s timeout); the records are the answer itself
(a JSON array) or the array at ``records_path`` (dotted, e.g. ``data.items``). Each record goes
through the stream reader (`recsys.readers.read_messages`: a record that is not an object is a
reject with its reason) and the batch lands as ``http-<connector>-<hash of the answer>``: an
unchanged answer lands nothing new. An unreachable service, a non-2xx answer or a body that is
not JSON fails the run (`ConnectorError`) with the status and the start of the body.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import urllib3

from recsys.connectors import ConnectorError, Log, RunSummary, land, load_state, save_state
from recsys.readers import read_messages


def fetch_records(cfg: dict[str, Any]) -> tuple[bytes, list[Any]]:
    url = cfg["url"]
    http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5.0, read=10.0))
    try:
        resp = http.request("GET", url, headers=cfg.get("headers") or {}, redirect=True)
    except Exception as exc:
        raise ConnectorError(f"{url} is unreachable: {type(exc).__name__}: {exc}") from exc
    if not 200 <= resp.status < 300:
        raise ConnectorError(f"{url} answered {resp.status}: {resp.data[:200]!r}")
    try:
        doc = orjson.loads(resp.data)
    except orjson.JSONDecodeError as exc:
        raise ConnectorError(f"{url} did not answer JSON: {exc}; {resp.data[:200]!r}") from exc
    for key in (cfg.get("records_path") or "").split(".") if cfg.get("records_path") else ():
        if not isinstance(doc, dict) or key not in doc:
            raise ConnectorError(f"{url}: the answer has no {cfg['records_path']!r}")
        doc = doc[key]
    if not isinstance(doc, list):
        raise ConnectorError(f"{url}: the records are not a JSON array")
    return resp.data, doc


def run_http(
    data_root: str, tenant: str, connector_id: str, target: str, cfg: dict[str, Any], log: Log
) -> RunSummary:
    body, records = fetch_records(cfg)
    digest = hashlib.sha256(body).hexdigest()[:16]
    state = load_state(data_root, tenant, connector_id)
    summary = RunSummary(detail={"records": len(records)})
    if state.get("last_digest") == digest:
        log(f"{cfg['url']}: {len(records)} records, unchanged since the last run")
        summary.skipped = len(records)
        return summary
    rows, rejects = read_messages([orjson.dumps(r) for r in records], source=cfg["url"])
    summary.landed_files = land(
        data_root, tenant, target, f"http-{connector_id}-{digest}", rows, rejects, cfg.get("map")
    )
    summary.rows, summary.rejects = rows.height, rejects.height
    save_state(data_root, tenant, connector_id, {**state, "last_digest": digest})
    log(f"{cfg['url']}: {rows.height} records landed, {rejects.height} rejected")
    return summary

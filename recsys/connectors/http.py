"""The HTTP connector: a JSON product or user service, polled.

``GET url`` (with the configured headers, 10 s timeout); the records are the answer itself
(a JSON array) or the array at ``records_path`` (dotted, e.g. ``data.items``). Each record goes
through the stream reader (`recsys.readers.read_messages`: a record that is not an object is a
reject with its reason) and the batch lands as ``http-<connector>-<hash of the answer>`` (items
and users one file a field set, `recsys.connectors.land_messages`): an unchanged answer lands
nothing new. An unreachable service, a non-2xx answer or a body that is
not JSON fails the run (`ConnectorError`) with the status and the start of the body.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import urllib3

from recsys.connectors import ConnectorError, Log, RunSummary, land_messages, load_state, save_state


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
    summary.landed_files, summary.rows, summary.rejects = land_messages(
        data_root, tenant, target, f"http-{connector_id}-{digest}",
        [orjson.dumps(r) for r in records], list(range(1, len(records) + 1)), cfg["url"],
        cfg.get("map"),
    )  # fmt: skip
    save_state(data_root, tenant, connector_id, {**state, "last_digest": digest})
    log(f"{cfg['url']}: {summary.rows} records landed, {summary.rejects} rejected")
    return summary

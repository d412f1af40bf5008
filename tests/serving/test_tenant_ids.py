"""Tenant ids are checked where they enter (JWT claims, API keys, X-Org-Id, path parameters, the
CLI) and refused again by every storage layer: hostile ids sent to every operation of the
app's own /openapi.json get no 5xx and write no file."""

from __future__ import annotations

import os
import re
import time
from urllib.parse import quote

import jwt
import pytest
from serving_helpers import SECRET, auth, build_client, make_config

from recsys.storage import Storage
from recsys.tenancy import TENANT_ID_PATTERN, check_tenant, is_valid_tenant
from serving.config import ApiKey, ServingConfig, parse_api_keys

#: Ids an attacker (or a careless identity provider) may put where a tenant id goes.
HOSTILE = [
    "../default",
    "x/../default",
    "",
    "a" * 300,
    "a" * 65,
    "de\x00fault",
    "default/",
    "~root",
    "a b",
    "d\u0435fault",  # a Cyrillic "е"
    "default\n",
    ".",
    "..",
    "a..b",
    "/etc",
    "acme\\..\\globex",
]
VALID = ["default", "acme", "t1", "a.b", "a_b-c", ".x", "x.", "-", "A" * 64]
BODY_METHODS = {"post", "put", "patch"}


def test_the_rule_and_its_pattern_agree_on_known_ids():
    pattern = re.compile(TENANT_ID_PATTERN)
    for tenant in VALID:
        assert is_valid_tenant(tenant) and check_tenant(tenant) == tenant
        assert pattern.search(tenant)
    for tenant in HOSTILE:
        assert not is_valid_tenant(tenant), tenant
        assert not pattern.search(tenant), tenant
        with pytest.raises(ValueError, match="invalid tenant id"):
            check_tenant(tenant)
    for other in (None, 7, ["acme"], b"acme"):
        assert not is_valid_tenant(other)


def test_every_storage_layer_refuses_a_bad_id(tmp_path):
    from recsys.snapshot.store import SnapshotStore  # noqa: F401 (the registry's store)
    from serving.event_landing import flush_tenant, read_tombstones
    from serving.events_log import TenantEventLog, flush_events
    from serving.feedback_log import FeedbackLog
    from serving.snapshot import SnapshotRegistry

    root = str(tmp_path)
    storage = Storage(root)
    for tenant in ("../default", "", "a b", "x/../y"):
        for build in (
            lambda t: storage.landing_dir(t, "events"),
            storage.events_dir,
            storage.rejected_dir,
            lambda t: storage.table_path(t, "items"),
            storage.ingest_state_path,
            storage.models_dir,
            storage.evaluation_dir,
            storage.snapshots_dir,
            storage.tombstones_dir,
            lambda t: TenantEventLog(root, t),
            lambda t: FeedbackLog(root, t),
            lambda t: flush_tenant(root, t),
            lambda t: read_tombstones(root, t),
            lambda t: flush_events(root, [t]),
            lambda t: SnapshotRegistry(os.path.join(root, "snapshots"), tenants=(t,)),
        ):
            with pytest.raises(ValueError, match="invalid tenant id"):
                build(tenant)
    assert os.listdir(root) == []  # nothing was created on the way to the refusal
    # a folder that is not a tenant's is never served or flushed
    os.makedirs(os.path.join(root, "snapshots", "a b"))
    os.makedirs(os.path.join(root, "serving", "events", "a b", "wal"))
    assert SnapshotRegistry(os.path.join(root, "snapshots")).known_tenants() == []
    assert SnapshotRegistry(os.path.join(root, "snapshots")).tenant("a b") is None
    assert flush_events(root) == {}


def test_api_keys_of_a_bad_tenant_are_refused_at_start(monkeypatch, capsys):
    from serving.cli import main

    with pytest.raises(ValueError, match=r"RECSYS_API_KEYS: .*'\.\./default' is not a tenant id"):
        parse_api_keys("k-0123456789=../default:admin")
    with pytest.raises(ValueError, match="not a tenant id"):
        ApiKey("k-0123456789", "a b", frozenset({"recommend"}))
    with pytest.raises(ValueError, match="RECSYS_TENANTS"):
        ServingConfig.from_env({"RECSYS_TENANTS": "acme,~root"})
    secret_key = "sk-live-0123456789abcdef"
    monkeypatch.setenv("RECSYS_API_KEYS", f"{secret_key}=d\u0435fault:recommend")
    assert main(["serve", "--bind", "127.0.0.1:1"]) == 2  # before gunicorn is started
    err = capsys.readouterr().err
    assert err.startswith("error: RECSYS_API_KEYS:") and err.count("\n") == 1
    assert secret_key not in err  # the message names the key by its first characters only


@pytest.mark.parametrize("tenant", ["../default", "", "a b", "d\u0435fault"])
def test_the_cli_refuses_a_bad_tenant_with_a_usage_error(tenant, tmp_path, capsys):
    from recsys.cli import main

    for argv in (
        ["token", "--tenant", tenant, "--secret", SECRET],
        ["events", "flush", "--tenant", tenant],
        ["import", "events", str(tmp_path / "e.csv"), "--tenant", tenant],
        ["demo-data", "--events", "10", "--tenant", tenant],
        ["snapshot", "list", "--tenant", tenant],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(["--data-root", str(tmp_path), *argv])
        assert exit_.value.code == 2, argv
        assert "invalid tenant id" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# --- every operation of the spec ---------------------------------------------------------------
#: Operations served without credentials when the spec does not say (`security: []`).
PUBLIC = {"/healthz", "/readyz", "/metrics", "/version", "/openapi.json", "/docs"}


def operations(client) -> list[tuple[str, str, list[str], dict]]:
    """(method, path template, path parameter names, operation) of every operation of the
    app's /openapi.json."""
    spec = client.simulate_get("/openapi.json").json
    out = []
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in ("get", "put", "post", "patch", "delete"):
                out.append((method.upper(), path, re.findall(r"{(\w+)}", path), op))
    assert len(out) > 40  # the whole API, not a part of it
    return out


def is_public(template: str, op: dict) -> bool:
    return op.get("security") == [] or ("security" not in op and template in PUBLIC)


def assert_listed(resp, method: str, template: str, op: dict) -> None:
    """The answer is a Problem whose status the spec lists for the operation."""
    assert resp.headers["content-type"] == "application/problem+json", (method, template)
    listed = op.get("responses", {})
    assert not listed or str(resp.status_code) in listed, (method, template, resp.status_code)


def fill(path: str, names: list[str], tenant: str) -> str:
    """The path with `{tenant_id}` set to `tenant` (percent-encoded) and other parameters to
    ids that exist nowhere."""
    for name in names:
        value = quote(tenant, safe="") if name == "tenant_id" else f"x-{name}"
        path = path.replace("{" + name + "}", value)
    return path


def files_under(root: str) -> set[str]:
    """What requests wrote under `root`; not the server's own counters and time series
    (``serving/metrics``, no tenant's data) nor the shared snapshots (a symlink: not walked)."""
    out = set()
    for folder, dirs, names in os.walk(root):
        if os.path.relpath(folder, root) == "serving":
            dirs[:] = [d for d in dirs if d != "metrics"]
        out.update(os.path.relpath(os.path.join(folder, n), root) for n in names)
        out.add(os.path.relpath(folder, root) + "/")
    return out


def audit_of(tenant: str) -> set[str]:
    """The audit log of the caller's own tenant: every write is recorded there, a refused one
    too (`serving.control.audit`)."""
    name = os.path.join("serving", "audit", f"{tenant}.sqlite")
    return {"serving/audit/", name, name + "-wal", name + "-shm"}


def call(client, method: str, path: str, headers: dict[str, str]):
    body = b"{}" if method.lower() in BODY_METHODS else None
    return client.simulate_request(
        method, path, body=body, headers={"Content-Type": "application/json", **headers}
    )


def hostile_token(tenant, claim: str = "tenant_id") -> str:
    now = int(time.time())
    claims = {"sub": "attacker", claim: tenant, "scope": "recommend admin", "exp": now + 600}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def test_hostile_tenant_claims_get_401_from_every_operation_and_write_nothing(data_root):
    client = build_client(make_config(data_root))
    ops = operations(client)
    public = sum(is_public(t, op) for _, t, _, op in ops)
    before = files_under(data_root)
    tokens = [hostile_token(t) for t in HOSTILE if t]  # (an empty claim is "no tenant": 403)
    tokens += [hostile_token(7), hostile_token(["acme"]), hostile_token("../acme", "org_id")]
    statuses: dict[int, int] = {}
    for token in tokens:
        for method, template, names, op in ops:
            resp = call(
                client, method, fill(template, names, "acme"), {"Authorization": f"Bearer {token}"}
            )
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            if is_public(template, op):
                assert resp.status_code < 500, (method, template, resp.status_code)
                continue
            assert resp.status_code == 401, (method, template, resp.status_code, resp.text)
            assert_listed(resp, method, template, op)
            assert "not a tenant id" in resp.json["detail"]
    empty = call(
        client, "POST", "/v1/recs/events", {"Authorization": f"Bearer {hostile_token('')}"}
    )
    assert empty.status_code == 403 and empty.json["code"] == "RECSYS_NO_TENANT"
    assert files_under(data_root) == before
    assert max(statuses) < 500 and statuses[401] == len(tokens) * (len(ops) - public)


def test_hostile_x_org_id_is_400_and_another_tenant_403_on_every_operation(data_root):
    client = build_client(make_config(data_root))
    ops = [op for op in operations(client) if not is_public(op[1], op[3])]
    before = files_under(data_root)
    headers = auth("acme", ("recommend", "admin"))
    for org in [t for t in HOSTILE if "\x00" not in t and "\n" not in t]:
        for method, template, names, op in ops:
            resp = call(client, method, fill(template, names, "acme"), {**headers, "X-Org-Id": org})
            assert resp.status_code == 400, (org, method, template, resp.status_code)
            assert resp.json["code"] == "RECSYS_BAD_TENANT"
            assert_listed(resp, method, template, op)
    for method, template, names, _ in ops:
        resp = call(
            client, method, fill(template, names, "acme"), {**headers, "X-Org-Id": "globex"}
        )
        assert resp.status_code == 403, (method, template, resp.status_code)
    assert files_under(data_root) - before <= audit_of("acme")  # the refusals, audited


def test_hostile_tenant_path_parameters_are_400_or_404(data_root):
    client = build_client(make_config(data_root))
    ops = [op for op in operations(client) if "tenant_id" in op[2]]
    assert ops  # the admin routes
    before = files_under(data_root)
    headers = auth("acme", ("recommend", "admin"))
    for tenant in HOSTILE:
        for method, template, names, op in ops:
            resp = call(client, method, fill(template, names, tenant), headers)
            # 400 when the id reaches the route, 404 when it cannot (a '/' or an empty segment)
            assert resp.status_code in (400, 404), (tenant, method, template, resp.status_code)
            assert_listed(resp, method, template, op)
    after = files_under(data_root)
    assert after - before <= audit_of("acme")  # the refusals, audited under the caller
    # the caller's own tenant still works, and writes only under its own folders
    put = client.simulate_put("/v1/admin/tenants/acme/rules", json={"rules": []}, headers=headers)
    assert put.status_code < 500, put.text
    written = [p for p in files_under(data_root) - before if not p.endswith("/")]
    assert all("acme" in p.split(os.sep) or p in audit_of("acme") for p in written), written

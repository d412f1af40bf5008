"""`X-Org-Id` is declared in /openapi.json on exactly the operations that accept it (every secured
one), with the tenant-id pattern and its 400 / 403 answers; the caller's own tenant in it
answers as without it."""

from __future__ import annotations

import re

from serving_helpers import ids, recommend
from test_tenant_ids import HOSTILE, VALID, is_public, operations


def _org_header(op: dict) -> dict | None:
    found = [p for p in op.get("parameters", ()) if p["in"] == "header" and p["name"] == "X-Org-Id"]
    assert len(found) <= 1
    return found[0] if found else None


def test_every_secured_operation_declares_x_org_id_with_the_tenant_pattern(client):
    ops = operations(client)
    for method, template, _, op in ops:
        header = _org_header(op)
        if is_public(template, op):
            assert header is None, (method, template)  # (not read there)
            continue
        assert header is not None, (method, template)
        assert header["required"] is False
        assert {"400", "403"} <= set(op["responses"]), (method, template)
        pattern = re.compile(header["schema"]["pattern"])
        assert [t for t in VALID if pattern.search(t)] == VALID
        assert [t for t in HOSTILE if pattern.search(t)] == []
    assert sum(_org_header(op) is not None for *_, op in ops) > 100


def test_the_callers_own_tenant_in_x_org_id_answers_as_without_it(client):
    body = {"user": {"user_id": "u1"}, "k": 3}
    plain = recommend(client, body)
    own = recommend(client, body, headers={"X-Org-Id": "acme"})
    assert plain.status_code == own.status_code == 200
    assert ids(own) == ids(plain) and len(ids(own)) == 3
    other = recommend(client, body, headers={"X-Org-Id": "globex"})
    bad = recommend(client, body, headers={"X-Org-Id": "../acme"})
    assert (other.status_code, bad.status_code) == (403, 400)

"""What JSON and URLs allow but nothing of ours can store or answer with, found by schemathesis
with more examples than the suite's bounded run (all were 500s, or worse):

- an integer beyond 64 bits in a free-form field: a model's `output_schema` took one into the
  registry, and every later read of the model was a 500; an event's metadata with one was a 500
  for the whole bulk post;
- a NUL character in a URI field (exports, evaluation holdouts): `os.path` raised;
- a path parameter with a final newline: Python's `$` let it match its pattern.

Each is now refused where it would be stored (422, a batch's item alone) or at the door (400)."""

from __future__ import annotations

import json

import pytest
from serving_helpers import auth

from serving.control.registry import dump_tag
from serving.errors import ProblemError
from serving.routing import encodable

ADMIN = auth("acme", ("admin",))
BIG = 2**70


def test_encodable_is_what_the_apis_json_can_store_and_answer_with():
    assert encodable({"a": [2**64 - 1, -(2**63), 1.5e300, "text", None, True], "b": {"c": ""}})
    assert not encodable({"a": [1, {"b": 2**64}]})
    assert not encodable([-(2**63) - 1])
    deep: list = []
    for _ in range(300):
        deep = [deep]
    assert not encodable(deep)


def test_a_model_tag_never_takes_what_could_not_be_read_back():
    assert dump_tag({"a": [1, 2**63 - 1]}, "output_schema") == '{"a":[1,9223372036854775807]}'
    with pytest.raises(ProblemError) as refused:
        dump_tag({"a": [BIG]}, "output_schema")
    assert refused.value.status_code == 422 and "'output_schema'" in refused.value.description


def _problem(resp, status: int, code: str, what: str) -> None:
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.json["code"] == code and what in resp.json["detail"], resp.json


@pytest.mark.parametrize(
    "path,body,field",
    [
        ("/v1/recs/exports", {"kind": "item_features", "uri": "out\x00.parquet"}, "uri"),
        ("/v1/recs/jobs/evaluate", {"holdout_uri": "\x00h.parquet", "model_version": "1"}, ""),
    ],
)
def test_a_uri_with_a_nul_is_a_422_not_a_500(client, path, body, field):
    resp = client.simulate_post(path, json=body, headers=ADMIN)
    _problem(resp, 422, "RECSYS_BAD_URI", "NUL")


def test_path_parameters_with_a_nul_or_a_final_newline_are_400(client):
    # (a pattern ending in `$` matched "f\n" under Python's re: the job lookup went ahead)
    bad = "RECSYS_INVALID_REQUEST"
    _problem(client.simulate_get("/v1/recs/batch/jobs/f\n", headers=ADMIN), 400, bad, "jobId")
    _problem(client.simulate_get("/v1/recs/events/ab\x00c", headers=ADMIN), 400, bad, "NUL")


def test_an_event_with_a_huge_integer_in_its_metadata_is_rejected_alone(client):
    good = {"type": "view", "user_id": "u1", "item_id": "a1"}
    lines = [json.dumps({**good, "metadata": {"n": BIG}}), json.dumps({**good, "user_id": "u2"})]
    resp = client.simulate_post(
        "/v1/recs/events/bulk",
        body="\n".join(lines).encode(),
        headers={**ADMIN, "Content-Type": "application/x-ndjson"},
    )
    assert resp.status_code == 200, resp.text
    assert (resp.json["accepted"], resp.json["rejected"]) == (1, 1)
    (error,) = resp.json["errors"]
    assert error["line"] == 1 and error["reason"] == "unparsable" and "64 bits" in error["detail"]
    one = client.simulate_post(
        "/v1/recs/events", json={**good, "metadata": {"n": BIG}}, headers=ADMIN
    )
    assert one.status_code == 422 and one.json["reason"] == "unparsable", one.text


def test_a_model_takes_neither_a_huge_integer_nor_a_nul_artifact_url(client):
    """Through the registry (MLflow's store under the test's data root): the model stays
    readable, and its version's artifact_url with a NUL is a 422."""
    made = client.simulate_post(
        "/v1/recs/models", json={"name": "m1", "output_schema": {"n": 1}}, headers=ADMIN
    )
    assert made.status_code == 201, made.text
    model = made.json["id"]
    patch = client.simulate_patch(
        f"/v1/recs/models/{model}", json={"output_schema": {"n": BIG}}, headers=ADMIN
    )
    assert patch.status_code == 422 and "output_schema" in patch.json["detail"], patch.text
    got = client.simulate_get(f"/v1/recs/models/{model}", headers=ADMIN)
    assert got.status_code == 200 and got.json["output_schema"] == {"n": 1}, got.text
    resp = client.simulate_post(
        f"/v1/recs/models/{model}/versions", json={"artifact_url": "a\x00b"}, headers=ADMIN
    )
    _problem(resp, 422, "RECSYS_BAD_ARTIFACT_URL", "NUL")

"""/v1/recs/models over a real MLflow registry (sqlite) and real snapshots.

The world: tenant acme has versions 1 and 2 of ``recsys-acme`` (a small fitted hybrid logged by
`recsys.tracking`, as the pipeline does) and a published snapshot of each whose lists are known:
user u1 gets a0 first from version 1's snapshot and a7 first from version 2's. Version 1 is
live (CURRENT and the champion alias). Tenant globex has ``recsys-globex`` version 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import sys
import time

import numpy as np
import orjson
import polars as pl
import pytest
from synthetic_events import cluster_events, cluster_items

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "serving"))
from serving_helpers import auth, build_client, ids, items_frame, make_config  # noqa: E402

from recsys import tracking  # noqa: E402
from recsys.models.data import temporal_split  # noqa: E402
from recsys.models.hybrid import HybridConfig, HybridRecommender  # noqa: E402
from recsys.models.importance import permutation_importance  # noqa: E402
from recsys.outbox import outbox_path  # noqa: E402
from recsys.snapshot import SnapshotStore  # noqa: E402
from recsys.snapshot.writer import write_snapshot  # noqa: E402
from recsys.storage import Storage  # noqa: E402

ADMIN = auth("acme", ("admin",))
READ = auth("acme")
FAST = dict(
    lightfm={"no_components": 4, "epochs": 3, "seed": 1, "num_threads": 1},
    ranker={"max_iter": 10, "max_leaf_nodes": 7, "min_samples_leaf": 5},
    tune={},
    candidates_per_generator=10,
    min_ranker_positives=5,
)
MODEL = "recsys-acme"
BASE = f"/v1/recs/models/{MODEL}"


def _table(ndcg: float) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "model": ["served", "popularity"],
            "users": [10, 10],
            "NDCG@10": [ndcg, 0.1],
            "NDCG@10_low": [ndcg - 0.01, 0.08],
            "NDCG@10_high": [ndcg + 0.01, 0.12],
            "Recall@20": [0.5, 0.3],
            "Recall@20_low": [0.45, 0.25],
            "Recall@20_high": [0.55, 0.35],
            "Coverage@10": [0.4, 0.1],
            "Coverage@10_low": [0.35, 0.05],
            "Coverage@10_high": [0.45, 0.15],
        }
    )


def write_version_snapshot(out_dir: str, tenant: str, prefix: str, name: str, version: int):
    """u1: candidates 0..7, best first (version 1) or reversed (version 2); u2: candidate 9."""
    scores = [0.9 - 0.1 * i for i in range(8)] + [0.5]
    if version % 2 == 0:
        scores = [0.1 + 0.1 * i for i in range(8)] + [0.5]
    cands = {
        "user_idx": [0] * 8 + [1],
        "item_idx": list(range(8)) + [9],
        "score": scores,
        "pop": [0.5] * 9,
        "cooc": [0.0] * 9,
        "emb": [0.1] * 9,
        "ranker": scores,
        "reason": [0] * 9,
    }
    return write_snapshot(
        out_dir,
        tenant=tenant,
        user_ids=["u1", "u2", "u3"],
        items=items_frame(prefix),
        candidates=cands,
        seen={"user_idx": [0], "item_idx": [8]},
        similar={},
        fallbacks={"popular": (np.arange(8, 20), np.linspace(1.0, 0.1, 12))},
        segments=[None, None, None],
        models={"champion": {"name": name, "version": str(version)}},
        write_parquet=False,
    )


def publish(root: str, tenant: str, prefix: str, version: int) -> str:
    store = SnapshotStore(os.path.join(root, "snapshots", tenant))
    tmp = store.new_tmp_dir()
    write_version_snapshot(tmp, tenant, prefix, f"recsys-{tenant}", version)
    return store.publish(tmp, checksums=False, prune=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("models-world"))
    storage = Storage(root)
    uri = storage.mlflow_uri()
    events = cluster_events(np.random.default_rng(2), n_users=60, n_items=20, per_user=8)
    model = HybridRecommender(HybridConfig(**FAST)).fit(events, cluster_items())
    # as the training asset does: the ranker on the evaluation window, logged with the run
    parts = temporal_split(events, 0.2)
    evaluated = HybridRecommender(HybridConfig(**FAST)).fit(parts.train, cluster_items())
    model.info["permutation_importance"] = permutation_importance(
        evaluated, parts.train, parts.test, seed=1
    )
    runs = {}
    for tenant, versions in (("acme", (1, 2)), ("globex", (1,))):
        for v in versions:
            run = tracking.log_training_run(
                tenant=tenant,
                model=model,
                events=events,
                uri=uri,
                artifact_root=storage.mlflow_artifacts(),
                table=_table(0.2 + 0.01 * v),
            )
            assert run.version == str(v)
            runs[(tenant, v)] = run.run_id
    snaps = {
        ("acme", 1): publish(root, "acme", "a", 1),
        ("acme", 2): publish(root, "acme", "a", 2),
        ("globex", 1): publish(root, "globex", "g", 1),
    }
    # a model folder of acme's (what the pipeline writes under models/acme/)
    folder = os.path.join(storage.models_dir("acme"), "final", "hybrid")
    model.save(folder)
    os.makedirs(os.path.join(storage.models_dir("acme"), "broken"))
    client = build_client(make_config(root, mlflow_uri=uri))
    world = {
        "root": root,
        "uri": uri,
        "runs": runs,
        "snaps": snaps,
        "folder": folder,
        "client": client,
    }
    reset(world)
    return world


def mlflow(world):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=world["uri"], registry_uri=world["uri"])


def reset(world) -> None:
    """Version 1 live and champion, no canary or staging, no deployment tags, no experiments."""
    SnapshotStore(os.path.join(world["root"], "snapshots", "acme")).rollback(
        world["snaps"][("acme", 1)]
    )
    c = mlflow(world)
    c.set_registered_model_alias(MODEL, "champion", "1")
    for alias in ("canary", "staging"):
        with contextlib.suppress(Exception):  # (not set: nothing to remove)
            c.delete_registered_model_alias(MODEL, alias)
    for v in c.search_model_versions(f"name = '{MODEL}'"):
        if int(v.version) > 2:  # (registered by a test)
            c.delete_model_version(MODEL, v.version)
            continue
        for key in v.tags:
            if key.startswith("deploy."):
                c.delete_model_version_tag(MODEL, v.version, key)
    exp_dir = os.path.join(world["root"], "serving", "experiments", "acme")
    for name in os.listdir(exp_dir) if os.path.isdir(exp_dir) else ():
        if name.endswith(".json"):
            os.remove(os.path.join(exp_dir, name))


@pytest.fixture()
def api(world):
    reset(world)
    return world["client"]


def first_item(client, user: str = "u1", **body) -> str:
    resp = client.simulate_post(
        "/v1/recommend", json={"k": 3, "user": {"user_id": user}, **body}, headers=READ
    )
    assert resp.status_code == 200, resp.json
    return ids(resp)[0]


def outbox_events(world, tenant: str = "acme") -> list[tuple[str, dict]]:
    with sqlite3.connect(outbox_path(world["root"])) as db:
        rows = db.execute(
            "SELECT type, body FROM messages WHERE tenant = ? ORDER BY created_at", (tenant,)
        ).fetchall()
    return [(t, orjson.loads(b)) for t, b in rows]


# --- models and versions ----------------------------------------------------------------------
def test_models_are_the_tenants_registered_models(api, world):
    listed = api.simulate_get("/v1/recs/models", headers=READ)
    assert listed.status_code == 200, listed.json
    assert [m["id"] for m in listed.json["items"]] == [MODEL]
    one = api.simulate_get(BASE, headers=READ).json
    assert one["aliases"] == {"champion": "1"} and one["tenant"] == "acme"
    assert one["type"] == "hybrid" and one["latest_version"] == "2"

    made = api.simulate_post(
        "/v1/recs/models",
        json={
            "name": "ranker",
            "type": "learning_to_rank",
            "framework": "sklearn",
            "input_schema": {"type": "object"},
        },
        headers=ADMIN,
    )
    assert made.status_code == 201, made.json
    assert made.json["id"] == "recsys-acme~ranker" and made.json["name"] == "ranker"
    assert made.json["input_schema"] == {"type": "object"}
    again = api.simulate_post("/v1/recs/models", json={"name": "ranker"}, headers=ADMIN)
    assert again.status_code == 409
    path = "/v1/recs/models/recsys-acme~ranker"
    patched = api.simulate_patch(
        path, json={"framework": None, "metadata": {"owner": "search"}}, headers=ADMIN
    )
    assert patched.status_code == 200, patched.json
    assert patched.json["framework"] is None and patched.json["metadata"] == {"owner": "search"}
    assert patched.json["type"] == "learning_to_rank"
    # the MLflow registry holds it (tags), as its UI shows
    tags = mlflow(world).get_registered_model("recsys-acme~ranker").tags
    assert tags["recsys.metadata"] == '{"owner":"search"}'
    too_big = api.simulate_patch(path, json={"metadata": {"x": "y" * 6000}}, headers=ADMIN)
    assert too_big.status_code == 422
    assert api.simulate_delete(path, headers=ADMIN).status_code == 204
    assert api.simulate_get(path, headers=READ).status_code == 404
    # the live model cannot be deleted
    assert api.simulate_delete(BASE, headers=ADMIN).status_code == 409
    assert api.simulate_post("/v1/recs/models", json={"name": "x"}, headers=READ).status_code == 403


def test_versions_show_their_status_and_register_only_loadable_artifacts(api, world):
    got = api.simulate_get(f"{BASE}/versions", headers=READ)
    assert got.status_code == 200, got.json
    status = {v["id"]: v["status"] for v in got.json["items"]}
    assert status == {"2": "registered", "1": "deployed"}
    run = world["runs"][("acme", 2)]
    made = api.simulate_post(
        f"{BASE}/versions",
        json={"artifact_url": f"runs:/{run}/model", "version": "v1.2.0", "metadata": {"a": 1}},
        headers=ADMIN,
    )
    assert made.status_code == 201, made.json
    assert made.json["label"] == "v1.2.0" and made.json["run_id"] == run
    assert made.json["status"] == "registered" and made.json["id"] == "3"
    # another tenant's run, a missing path in a run, a folder that is not a model, a folder
    # outside the tenant's models: 422, nothing registered
    foreign = world["runs"][("globex", 1)]
    for url in (
        f"runs:/{foreign}/model",
        f"runs:/{run}/evaluation",
        os.path.join(os.path.dirname(os.path.dirname(world["folder"])), "broken"),
        "/etc",
        f"runs:/{run}/nothing-here",
    ):
        bad = api.simulate_post(f"{BASE}/versions", json={"artifact_url": url}, headers=ADMIN)
        assert bad.status_code == 422, (url, bad.json)
    # a model folder of the tenant's: loaded, then logged to a run of its own
    folder = api.simulate_post(
        f"{BASE}/versions", json={"artifact_url": world["folder"]}, headers=ADMIN
    )
    assert folder.status_code == 201, folder.json
    assert folder.json["run_id"] not in world["runs"].values()
    assert folder.json["source"].endswith("/model")
    listed = api.simulate_get(f"{BASE}/versions", headers=READ).json
    assert [v["id"] for v in listed["items"]] == ["4", "3", "2", "1"]
    # archiving: a tag; the deployed version cannot be archived
    arch = api.simulate_patch(
        f"{BASE}/versions/3", json={"archived": True, "description": "old"}, headers=ADMIN
    )
    assert arch.status_code == 200, arch.json
    assert arch.json["status"] == "archived" and arch.json["description"] == "old"
    assert mlflow(world).get_model_version(MODEL, "3").tags["recsys.archived"] == "true"
    live = api.simulate_patch(f"{BASE}/versions/1", json={"archived": True}, headers=ADMIN)
    assert live.status_code == 409
    back = api.simulate_patch(f"{BASE}/versions/3", json={"archived": False}, headers=ADMIN)
    assert back.json["status"] == "registered"
    assert api.simulate_get(f"{BASE}/versions/9", headers=READ).status_code == 404
    assert api.simulate_get("/v1/recs/models/nope/versions", headers=READ).status_code == 404
    c = mlflow(world)
    for v in ("3", "4"):
        c.delete_model_version(MODEL, v)


# --- deployments ------------------------------------------------------------------------------
def test_deploy_at_100_serves_the_version_and_rollback_brings_the_old_lists_back(api, world):
    assert first_item(api) == "a0"
    dep = api.simulate_post(f"{BASE}/versions/2/deploy", json={"env": "prod"}, headers=ADMIN)
    assert dep.status_code == 200, dep.json
    body = dep.json
    assert body["snapshot_id"] == world["snaps"][("acme", 2)]
    assert body["previous_version"] == "1"
    assert body["previous_snapshot_id"] == world["snaps"][("acme", 1)]
    assert first_item(api) == "a7"  # the new lists are served
    c = mlflow(world)
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert c.get_model_version(MODEL, "2").tags["deploy.previous_version"] == "1"
    versions = {
        v["id"]: v for v in api.simulate_get(f"{BASE}/versions", headers=READ).json["items"]
    }
    assert versions["2"]["status"] == "deployed" and versions["1"]["status"] == "registered"
    assert versions["2"]["deployment"]["env"] == "prod"

    # the snapshot a rollback returns to is pinned: the publish's pruning keeps it
    store = SnapshotStore(os.path.join(world["root"], "snapshots", "acme"))
    assert store.pinned() == {world["snaps"][("acme", 1)], world["snaps"][("acme", 2)]}
    assert store.prune(keep=1) == [] and world["snaps"][("acme", 1)] in store.ids()

    back = api.simulate_post(f"{BASE}/versions/2/rollback", headers=ADMIN)
    assert back.status_code == 200, back.json
    assert back.json["previous_version"] == "1" and back.json["status"] == "rolled_back"
    assert first_item(api) == "a0"  # the old lists are back
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert (
        SnapshotStore(os.path.join(world["root"], "snapshots", "acme")).current_id()
        == (world["snaps"][("acme", 1)])
    )
    # version 1 was not deployed through the API and no gate recorded a predecessor
    again = api.simulate_post(f"{BASE}/versions/1/rollback", headers=ADMIN)
    assert again.status_code == 409, again.json
    assert api.simulate_post(f"{BASE}/versions/2/rollback", headers=ADMIN).status_code == 409
    # a previous version whose snapshot is gone is rebuilt first: a Dagster run (none is
    # configured here: 503 naming Dagster), and nothing changes
    dep = api.simulate_post(f"{BASE}/versions/2/deploy", json={}, headers=ADMIN)
    assert dep.status_code == 200, dep.json
    v1_snapshot = store.path_of(world["snaps"][("acme", 1)])
    away = os.path.join(world["root"], "away")
    os.rename(v1_snapshot, away)
    try:
        gone = api.simulate_post(f"{BASE}/versions/2/rollback", headers=ADMIN)
        assert gone.status_code == 503 and gone.json["dependency"] == "dagster", gone.json
        assert first_item(api) == "a7"
    finally:
        os.rename(away, v1_snapshot)
    assert api.simulate_post(f"{BASE}/versions/2/rollback", headers=ADMIN).status_code == 200
    # the webhook events are in the outbox, with the deployment
    events = outbox_events(world)
    kinds = [(t, b["data"]["version"]) for t, b in events[-4:]]
    assert kinds == [("model.deployed", "2"), ("model.rolled_back", "2")] * 2
    assert events[-3][1]["data"]["id"] == back.json["id"]


def test_canary_splits_users_deterministically(api, world):
    dep = api.simulate_post(
        f"{BASE}/versions/2/deploy", json={"env": "prod", "traffic_pct": 10}, headers=ADMIN
    )
    assert dep.status_code == 200, dep.json
    exp_id = dep.json["experiment_id"]
    assert dep.json["env"] == "canary" and exp_id.startswith("canary-")
    # live stays version 1; about 10 % of users get version 2's snapshot
    assert (
        SnapshotStore(os.path.join(world["root"], "snapshots", "acme")).current_id()
        == (world["snaps"][("acme", 1)])
    )
    seen = {}
    for n in range(1000):
        resp = api.simulate_post(
            "/v1/recommend", json={"k": 1, "user": {"user_id": f"x{n}"}}, headers=READ
        )
        assert resp.status_code == 200, resp.json
        seen[f"x{n}"] = resp.json["meta"]["experiment"]["variant"]
    share = sum(v == "v2" for v in seen.values()) / len(seen)
    assert 0.07 <= share <= 0.13, share
    # deterministic: the same user, the same side
    for user in list(seen)[:20]:
        resp = api.simulate_post(
            "/v1/recommend", json={"k": 1, "user": {"user_id": user}}, headers=READ
        )
        assert resp.json["meta"]["experiment"]["variant"] == seen[user]
    # the experiment's results show both sides
    results = api.simulate_get(f"/v1/recs/experiments/{exp_id}/results", headers=READ)
    assert [v["id"] for v in results.json["variants"]] == ["live", "v2"]
    versions = {
        v["id"]: v for v in api.simulate_get(f"{BASE}/versions", headers=READ).json["items"]
    }
    assert versions["2"]["status"] == "canary"
    # rollback ends the split
    back = api.simulate_post(f"{BASE}/versions/2/rollback", headers=ADMIN)
    assert back.status_code == 200, back.json
    assert api.simulate_get(f"/v1/recs/experiments/{exp_id}", headers=READ).status_code == 404
    resp = api.simulate_post(
        "/v1/recommend", json={"k": 1, "user": {"user_id": "x1"}}, headers=READ
    )
    assert "experiment" not in resp.json["meta"]


def test_staging_is_read_only_by_requests_naming_it(api, world):
    dep = api.simulate_post(f"{BASE}/versions/2/deploy", json={"env": "staging"}, headers=ADMIN)
    assert dep.status_code == 200, dep.json
    exp_id = dep.json["experiment_id"]
    assert first_item(api) == "a0"
    named = first_item(api, experiment={"id": exp_id, "variant": "staged"})
    assert named == "a7"
    assert str(mlflow(world).get_model_version_by_alias(MODEL, "staging").version) == "2"


def test_unloadable_artifacts_are_422_and_change_nothing(api, world):
    c = mlflow(world)
    broken = os.path.join(world["root"], "broken-model")
    os.makedirs(broken, exist_ok=True)
    with open(os.path.join(broken, "hybrid.json"), "w") as f:
        f.write("{not json")
    mv = c.create_model_version(MODEL, source=broken, tags={"tenant": "acme"})
    # a snapshot claiming that version exists, so only the artifacts are at fault
    before = SnapshotStore(os.path.join(world["root"], "snapshots", "acme")).current_id()
    resp = api.simulate_post(f"{BASE}/versions/{mv.version}/deploy", json={}, headers=ADMIN)
    assert resp.status_code == 422, resp.json
    assert resp.json["code"] == "RECSYS_MODEL_UNLOADABLE"
    assert SnapshotStore(os.path.join(world["root"], "snapshots", "acme")).current_id() == before
    assert str(c.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert first_item(api) == "a0"
    c.delete_model_version(MODEL, mv.version)


def test_a_second_deploy_while_one_runs_is_409(api, world):
    lock = os.path.join(world["root"], "serving", "deployments", "acme.lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    fd = os.open(lock, os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a deployment of acme is running (another worker)
        resp = api.simulate_post(f"{BASE}/versions/2/deploy", json={}, headers=ADMIN)
        assert resp.status_code == 409 and resp.json["code"] == "RECSYS_DEPLOYMENT_RUNNING"
        # another tenant is not held up
        other = api.simulate_post(
            "/v1/recs/models/recsys-globex/versions/1/rollback", headers=auth("globex", ("admin",))
        )
        assert other.status_code == 409 and other.json["code"] == "RECSYS_NOTHING_TO_ROLL_BACK"
    finally:
        os.close(fd)
    assert first_item(api) == "a0"


def test_a_version_without_a_kept_snapshot_needs_a_rebuild(api, world):
    run = world["runs"][("acme", 1)]
    made = api.simulate_post(
        f"{BASE}/versions", json={"artifact_url": f"runs:/{run}/model"}, headers=ADMIN
    )
    assert made.status_code == 201
    # the rebuild is a Dagster run: none is configured here -> 503 naming Dagster
    resp = api.simulate_post(f"{BASE}/versions/{made.json['id']}/deploy", json={}, headers=ADMIN)
    assert resp.status_code == 503 and resp.json["dependency"] == "dagster", resp.json
    assert first_item(api) == "a0"
    # a model the pipeline does not publish has no way to a snapshot: 409
    other = api.simulate_post("/v1/recs/models", json={"name": "side"}, headers=ADMIN)
    assert other.status_code == 201
    side = "/v1/recs/models/recsys-acme~side"
    v = api.simulate_post(
        f"{side}/versions", json={"artifact_url": f"runs:/{run}/model"}, headers=ADMIN
    )
    assert v.status_code == 201, v.json
    resp = api.simulate_post(f"{side}/versions/1/deploy", json={}, headers=ADMIN)
    assert resp.status_code == 409 and resp.json["code"] == "RECSYS_SNAPSHOT_NOT_KEPT"
    mlflow(world).delete_registered_model("recsys-acme~side")


@pytest.mark.slow
def test_publish_job_rebuilds_a_versions_snapshot_without_making_it_live(api, world):
    """What the rebuild run does (the publish assets with model_version and make_live false),
    in process; then deploy finds the rebuilt snapshot and makes it live."""
    import dagster as dg

    from pipelines import publish
    from pipelines.resources import StorageResource

    storage = Storage(world["root"])
    d = storage.path("warehouse", "acme", "events", "date=2024-01-01")
    if not os.path.isdir(d):
        os.makedirs(d)
        events = cluster_events(np.random.default_rng(2), n_users=60, n_items=20, per_user=8)
        events.write_parquet(os.path.join(d, "part-0.parquet"))
    run = world["runs"][("acme", 1)]
    made = api.simulate_post(
        f"{BASE}/versions", json={"artifact_url": f"runs:/{run}/model"}, headers=ADMIN
    )
    number = made.json["id"]
    cfg = {"tenants": ["acme"], "n_per_user": 8, "model_version": number, "make_live": False}
    cfg["mlflow_uri"] = world["uri"]
    names = ("user_recommendations", "item_similarities", "fallback_lists", "serving_snapshot")
    store = SnapshotStore(storage.snapshots_dir("acme"))
    before = store.current_id()
    result = dg.materialize(
        [dg.AssetSpec("champion_model"), *publish.assets],
        resources={"storage": StorageResource(root=world["root"])},
        run_config={"ops": {n: {"config": cfg} for n in names}},
    )
    assert result.success
    assert store.current_id() == before  # published beside the live one
    rebuilt = max(store.ids())
    with open(os.path.join(store.path_of(rebuilt), "manifest.json"), "rb") as f:
        champion = orjson.loads(f.read())["models"]["champion"]
    assert champion["name"] == MODEL and champion["version"] == number
    try:
        dep = api.simulate_post(f"{BASE}/versions/{number}/deploy", json={}, headers=ADMIN)
        assert dep.status_code == 200, dep.json
        assert dep.json["snapshot_id"] == rebuilt and store.current_id() == rebuilt
        resp = api.simulate_post(
            "/v1/recommend", json={"k": 3, "user": {"user_id": "u1"}}, headers=READ
        )
        assert resp.json["meta"]["algo_version"] == f"{MODEL}@{number}"
    finally:
        reset(world)
        shutil.rmtree(store.path_of(rebuilt))


@pytest.mark.slow
def test_deploy_launches_the_rebuild_as_a_dagster_run(world, dagster_server):
    from serving.control.dagster import ACTIVE, DagsterClient

    client = build_client(
        make_config(world["root"], mlflow_uri=world["uri"], dagster_url=dagster_server.url)
    )
    reset(world)
    run = world["runs"][("acme", 1)]
    made = client.simulate_post(
        f"{BASE}/versions", json={"artifact_url": f"runs:/{run}/model"}, headers=ADMIN
    )
    number = made.json["id"]
    dagster = DagsterClient(dagster_server.url)
    launched = []
    try:
        dep = client.simulate_post(f"{BASE}/versions/{number}/deploy", json={}, headers=ADMIN)
        assert dep.status_code == 202, dep.json
        job = dep.json["job"]
        launched.append(job["run_id"])
        assert dep.json["status"] == "rebuilding" and job["job"] == "publish_job"
        assert dep.headers["Location"] == f"/v1/recs/jobs/{job['run_id']}"
        got = dagster.run(job["run_id"])
        assert got.job == "publish_job" and got.tags["recsys/model_version"] == f"{MODEL}@{number}"
        assert f"model_version: '{number}'" in got.run_config_yaml or (
            f'model_version: "{number}"' in got.run_config_yaml
        )
        assert "make_live: false" in got.run_config_yaml
        # while it runs, another deploy of the tenant is refused
        if dagster.run(job["run_id"]).status in ACTIVE:
            again = client.simulate_post(f"{BASE}/versions/{number}/deploy", json={}, headers=ADMIN)
            if again.status_code == 202:  # (it finished in between)
                launched.append(again.json["job"]["run_id"])
            else:
                assert again.status_code == 409, again.json
        assert first_item(client) == "a0"  # nothing live changed
    finally:
        for run_id in launched:  # (the run belongs to this test's world, not the server's)
            dagster.terminate(run_id)
        reset(world)


# --- metrics and explanations -----------------------------------------------------------------
def test_metrics_come_from_the_runs_with_intervals(api, world):
    got = api.simulate_get(f"{BASE}/metrics", headers=READ)
    assert got.status_code == 200, got.json
    by_version = {m["version"]: m for m in got.json["items"]}
    assert set(by_version) == {"1", "2"}
    v2 = by_version["2"]
    assert v2["run_id"] == world["runs"][("acme", 2)]
    assert v2["served"]["NDCG@10"] == pytest.approx({"value": 0.22, "low": 0.21, "high": 0.23})
    assert v2["served"]["Recall@20"] == pytest.approx({"value": 0.5, "low": 0.45, "high": 0.55})
    assert v2["baselines"]["popularity"]["NDCG@10"]["value"] == 0.1
    assert v2["model_bytes"] > 1000 and v2["data_rows"] == 480
    assert v2["training_seconds"] > 0
    one = api.simulate_get(f"{BASE}/metrics", params={"version": "1"}, headers=READ).json
    assert [m["version"] for m in one["items"]] == ["1"]
    future = api.simulate_get(
        f"{BASE}/metrics", params={"since": "2999-01-01T00:00:00Z"}, headers=READ
    ).json
    assert future["items"] == []
    past = api.simulate_get(
        f"{BASE}/metrics", params={"until": "2000-01-01T00:00:00Z"}, headers=READ
    ).json
    assert past["items"] == []
    assert (
        api.simulate_get(f"{BASE}/metrics", params={"version": "7"}, headers=READ).status_code
        == 404
    )


def test_feature_importance_and_explain_schema(api, world):
    got = api.simulate_get(f"{BASE}/versions/1/feature-importance", headers=READ)
    assert got.status_code == 200, got.json
    features = got.json["features"]
    from recsys.models.hybrid import FEATURE_NAMES

    assert {f["name"] for f in features} == set(FEATURE_NAMES)
    gains = [f["gain"] for f in features]
    assert abs(sum(gains) - 1.0) < 1e-6 and gains == sorted(gains, reverse=True)
    assert got.json["permutation"]["rows"] > 0
    schema = api.simulate_get(f"{BASE}/explain-schema", headers=READ).json
    assert schema["version"] == "1"
    assert "feature_importance" in [e["kind"] for e in schema["explanations"]]
    assert set(schema["features"]) == set(FEATURE_NAMES)


# --- tenancy and dependencies -----------------------------------------------------------------
ROUTES = [
    ("GET", BASE, None),
    ("PATCH", BASE, {"description": "x"}),
    ("DELETE", BASE, None),
    ("GET", f"{BASE}/versions", None),
    ("POST", f"{BASE}/versions", {"artifact_url": "runs:/x/model"}),
    ("GET", f"{BASE}/versions/1", None),
    ("PATCH", f"{BASE}/versions/1", {"archived": False}),
    ("POST", f"{BASE}/versions/1/deploy", {}),
    ("POST", f"{BASE}/versions/1/rollback", None),
    ("GET", f"{BASE}/metrics", None),
    ("GET", f"{BASE}/explain-schema", None),
    ("GET", f"{BASE}/versions/1/feature-importance", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
def test_no_tenant_reaches_another_tenants_models(api, method, path, body):
    spy = api.simulate_request(method, path, json=body, headers=auth("globex", ("admin",)))
    assert spy.status_code == 404, (path, spy.status_code, spy.text)
    assert "acme" not in spy.text.replace(MODEL, "")
    assert api.simulate_request(method, path, json=body, headers={}).status_code == 401
    org = auth("acme", ("admin",), **{"X-Org-Id": "globex"})
    assert api.simulate_request(method, path, json=body, headers=org).status_code == 403
    listed = api.simulate_get("/v1/recs/models", headers=auth("globex")).json
    assert [m["id"] for m in listed["items"]] == ["recsys-globex"]


def test_mlflow_down_is_503_naming_it_while_recommendations_serve(world):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = build_client(make_config(world["root"], mlflow_uri=f"http://127.0.0.1:{port}"))
    t0 = time.perf_counter()
    for method, path in (("GET", "/v1/recs/models"), ("GET", f"{BASE}/versions")):
        resp = client.simulate_request(method, path, headers=READ)
        assert resp.status_code == 503, resp.json
        assert "MLflow" in resp.json["detail"] and resp.json["dependency"] == "mlflow"
    deploy = client.simulate_post(f"{BASE}/versions/2/deploy", json={}, headers=ADMIN)
    assert deploy.status_code == 503
    assert time.perf_counter() - t0 < 10
    assert first_item(client) == "a0"

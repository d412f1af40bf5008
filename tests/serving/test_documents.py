"""The versioned-document store (serving/documents.py): revision preconditions and their
answers, compare-and-swap across processes, cached reads, files of earlier releases, ids."""

from __future__ import annotations

import hashlib
import multiprocessing
import os

import orjson
import pytest
from falcon import testing

from serving.crr.records import RecordStore
from serving.documents import (
    ANY,
    NONE,
    Collection,
    Conflict,
    DocumentStore,
    Legacy,
    Preconditions,
    default_revision,
)
from serving.errors import ProblemError
from serving.experiments import ExperimentStore


@pytest.fixture()
def store(tmp_path) -> DocumentStore:
    return DocumentStore(str(tmp_path / "serving"), check_interval_s=3600)


@pytest.fixture()
def notes(store) -> Collection:
    return store.collection("notes", prefix="note", missing_code="RECSYS_UNKNOWN_NOTE")


def if_match(*tags: str) -> Preconditions:
    return Preconditions(if_match=tags)


def test_create_get_list_patch_delete(notes, store):
    made = notes.create("acme", "n1", {"text": "hello"})
    assert made.revision.startswith("note_") and made.created_at == made.updated_at
    assert made.stored
    got = notes.get("acme", "n1")
    assert got == made
    path = os.path.join(store.root, "notes", "acme", "n1.json")
    with open(path, "rb") as f:
        assert orjson.loads(f.read()) == {
            "id": "n1",
            "revision": made.revision,
            "created_at": made.created_at,
            "updated_at": made.updated_at,
            "body": {"text": "hello"},
        }
    notes.create("acme", "n0", {"text": "first"})
    assert [d.id for d in notes.list("acme")] == ["n0", "n1"] and notes.count("acme") == 2
    assert notes.list("globex") == [] and notes.get("globex", "n1") is None
    changed = notes.patch("acme", "n1", lambda d: {**d.body, "seen": True}, if_match(made.revision))
    assert changed.body == {"text": "hello", "seen": True} and changed.revision != made.revision
    assert changed.created_at == made.created_at
    gone = notes.delete("acme", "n1", if_match(changed.revision))
    assert gone == changed and notes.get("acme", "n1") is None and notes.count("acme") == 1
    # nothing but the documents and the lock is left in the folder (no temporary files)
    assert sorted(os.listdir(os.path.dirname(path))) == [".lock", "n0.json"]


def test_each_failed_precondition_has_its_status(notes):
    first = notes.create("acme", "n1", {"v": 1})
    cases = [
        # (operation, status, code, current_version)
        (lambda: notes.create("acme", "n1", {"v": 2}), 409, "RECSYS_DOCUMENT_EXISTS"),
        (
            lambda: notes.put("acme", "n1", {"v": 2}, if_match("stale")),
            409,
            "RECSYS_VERSION_CONFLICT",
        ),
        (
            lambda: notes.patch("acme", "n1", dict, if_match("stale")),
            409,
            "RECSYS_VERSION_CONFLICT",
        ),
        (lambda: notes.delete("acme", "n1", if_match("stale")), 409, "RECSYS_VERSION_CONFLICT"),
        (
            lambda: notes.put("acme", "n1", {"v": 2}, Preconditions(if_none_match=(ANY,))),
            412,
            "RECSYS_PRECONDITION_FAILED",
        ),
        (
            lambda: notes.put(
                "acme", "n1", {"v": 2}, Preconditions(if_none_match=(first.revision,))
            ),
            412,
            "RECSYS_PRECONDITION_FAILED",
        ),
    ]
    for operation, status, code in cases:
        with pytest.raises(Conflict) as caught:
            operation()
        assert (caught.value.status_code, caught.value.problem_code) == (status, code)
        assert caught.value.current == first.revision
        assert caught.value.extra == {"current_version": first.revision}
    assert notes.get("acme", "n1") == first  # nothing was written
    with pytest.raises(Conflict) as caught:
        notes.put("acme", "n2", {"v": 1}, if_match(ANY))
    assert caught.value.status_code == 412 and caught.value.current is None
    with pytest.raises(Conflict) as caught:
        notes.put("acme", "n2", {"v": 1}, if_match("guess"))
    assert caught.value.status_code == 409 and caught.value.current is None
    with pytest.raises(ProblemError) as missing:
        notes.patch("acme", "n2", dict)
    assert missing.value.status_code == 404 and missing.value.problem_code == "RECSYS_UNKNOWN_NOTE"
    # preconditions that hold
    put, created = notes.put("acme", "n1", {"v": 2}, if_match("other", first.revision))
    assert not created and put.body == {"v": 2}
    assert notes.put("acme", "n1", {"v": 3}, if_match(ANY))[0].body == {"v": 3}
    assert notes.put("acme", "n2", {"v": 1}, Preconditions(if_none_match=(ANY,)))[1] is True
    assert notes.put("acme", "n2", {"v": 2}, NONE)[0].body == {"v": 2}  # unconditional


def test_replace_needs_match_answers_428(store):
    records = store.collection("records", hashed_ids=True, replace_needs_match=True)
    made, created = records.put("acme", "r1", {"v": 1})
    assert created
    with pytest.raises(Conflict) as caught:
        records.put("acme", "r1", {"v": 2})
    assert caught.value.status_code == 428 and caught.value.current == made.revision
    assert records.put("acme", "r1", {"v": 2}, if_match(made.revision))[0].body == {"v": 2}


def test_defaults_have_a_revision_a_first_put_may_name(notes):
    defaults = {"k": 20, "limits": {"max_k": 200}}
    shown = notes.get("acme", "cfg", default=defaults)
    assert not shown.stored and shown.body == defaults
    assert shown.revision == default_revision("note", defaults)
    assert default_revision("note", {"k": 21, "limits": {"max_k": 200}}) != shown.revision
    assert notes.get("acme", "cfg") is None  # without defaults: missing
    with pytest.raises(Conflict) as caught:
        notes.put("acme", "cfg", {"k": 5}, if_match("note_defaults_0"), default=defaults)
    assert caught.value.status_code == 409 and caught.value.current == shown.revision
    # If-None-Match: * holds while only the defaults exist
    first, created = notes.put("acme", "cfg", {"k": 5}, if_match(shown.revision), default=defaults)
    assert created and first.stored
    with pytest.raises(Conflict):
        notes.put("acme", "cfg", {"k": 6}, if_match(shown.revision), default=defaults)
    other = notes.put(
        "globex", "cfg", {"k": 7}, Preconditions(if_none_match=(ANY,)), default=defaults
    )
    assert other[1]


def _increment(root: str, n: int) -> None:
    counters = DocumentStore(root, check_interval_s=3600).collection("counters")
    for _ in range(n):
        counters.put("acme", "c", lambda cur: {"n": (cur.body["n"] if cur else 0) + 1})


def _swap(root: str, revision: str, barrier, results) -> None:
    counters = DocumentStore(root).collection("counters")
    barrier.wait()
    try:
        counters.put("acme", "c", {"n": -1}, Preconditions(if_match=(revision,)))
        results.put("won")
    except Conflict:
        results.put("lost")


def test_compare_and_swap_holds_across_processes(store):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_increment, args=(store.root, 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    counters = store.collection("counters")
    doc = counters.get("acme", "c")
    assert doc.body == {"n": 100}  # no lost update
    # four writers holding the same revision: exactly one wins
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [
        ctx.Process(target=_swap, args=(store.root, doc.revision, barrier, results))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(results.get(timeout=5) for _ in range(4)) == ["lost", "lost", "lost", "won"]


def test_cached_reads_restat_once_per_interval(tmp_path):
    root = str(tmp_path / "serving")
    slow = DocumentStore(root, check_interval_s=3600).collection("notes")
    fast = DocumentStore(root, check_interval_s=0).collection("notes")
    writer = DocumentStore(root).collection("notes")  # another worker
    assert slow.cached("acme", "n") is None and slow.cached_list("acme") == {}
    first = writer.create("acme", "n", {"v": 1})
    assert slow.cached("acme", "n") is None  # not re-checked within the interval
    assert slow.cached_list("acme") == {}
    assert fast.cached("acme", "n") == first
    again = fast.cached("acme", "n")
    assert again is fast.cached("acme", "n")  # unchanged: the same object
    lst = fast.cached_list("acme")
    assert list(lst) == ["n"] and fast.cached_list("acme") is lst
    second = writer.put("acme", "n", {"v": 2})[0]
    assert fast.cached("acme", "n") == second and fast.cached_list("acme")["n"] == second
    slow.invalidate("acme")
    assert slow.cached("acme", "n") == second and list(slow.cached_list("acme")) == ["n"]
    # a collection's own write is seen at once by its own cached reads
    third = slow.put("acme", "n", {"v": 3})[0]
    assert slow.cached("acme", "n") == third


def test_files_of_an_earlier_release_load_and_move(tmp_path):
    root = tmp_path / "seeds"
    root.mkdir()
    (root / "acme.json").write_bytes(
        orjson.dumps({"version": "seed_1", "surfaces": {"home": {"item_ids": ["a"]}}})
    )
    seeds = Collection(
        str(root),
        "seeds",
        folder="{tenant}",
        ids=("surfaces",),
        legacy=Legacy(
            lambda raw: (raw["version"], {"surfaces": raw["surfaces"]}, None, None),
            path=lambda tenant, _: f"{tenant}.json",
        ),
        check_interval_s=0,
    )
    old = seeds.get("acme", "surfaces")
    assert old.revision == "seed_1" and old.body["surfaces"]["home"]["item_ids"] == ["a"]
    assert seeds.cached("acme", "surfaces") == old
    new, created = seeds.put("acme", "surfaces", {"surfaces": {}}, if_match("seed_1"))
    assert not created
    assert not (root / "acme.json").exists() and (root / "acme" / "surfaces.json").exists()
    assert seeds.get("acme", "surfaces") == new
    assert seeds.get("acme", "other") is None  # the collection holds only "surfaces"
    with pytest.raises(ValueError):
        seeds.path("acme", "other")


def test_ids_and_tenants_that_could_leave_the_folder_are_refused(store, notes, tmp_path):
    for tenant in ("../default", "x/../default", "", "a" * 300, "a\x00b", "default/", ".", ".."):
        with pytest.raises(ValueError):
            notes.create(tenant, "n1", {"v": 1})
        with pytest.raises(ValueError):
            notes.cached(tenant, "n1")
    for doc_id in ("../x", "a/b", "", ".hidden", "x" * 65):
        assert not notes.valid_id(doc_id) and notes.get("acme", doc_id) is None
        with pytest.raises(ValueError):
            notes.create("acme", doc_id, {"v": 1})
    # free-form ids live in files named by their hash, inside the tenant's folder
    records = store.collection("records", hashed_ids=True)
    for odd in ("../../etc/passwd", "a/b", "ü", "x" * 300):
        records.create("acme", odd, {"v": odd})
        assert records.get("acme", odd).body == {"v": odd}
    assert records.count("acme") == 4
    written = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    assert all(p.startswith(os.path.join(store.root, "")) for p in written)


def test_preconditions_of_a_request():
    def of(**headers: str) -> Preconditions:
        return Preconditions.of(testing.create_req(headers=headers))

    assert of() == NONE
    assert of(**{"If-Match": '"r1"'}) == Preconditions(if_match=("r1",))
    assert of(**{"If-Match": 'W/"r1", "r2"'}) == Preconditions(if_match=("r1", "r2"))
    assert of(**{"If-Match": "*"}) == Preconditions(if_match=(ANY,))
    assert of(**{"If-None-Match": "*"}) == Preconditions(if_none_match=(ANY,))
    assert of(**{"If-Match": '"r1"'}).matching("r9") == Preconditions(if_match=("r9",))
    assert of(**{"If-Match": '"r1"'}).matching(None) == Preconditions(if_match=("r1",))


def test_experiments_and_records_of_an_earlier_release_load(tmp_path):
    data_root = str(tmp_path)
    exp_dir = tmp_path / "serving" / "experiments" / "acme"
    exp_dir.mkdir(parents=True)
    flat = {
        "id": "home-ab",
        "name": "old",
        "surface": "home",
        "status": "running",
        "variants": [
            {"id": "A", "traffic": 1.0, "snapshot": "current"},
            {"id": "B", "traffic": 1.0, "snapshot": "current"},
        ],
        "metrics": ["ctr"],
        "primary_metric": "ctr",
        "alpha": 0.05,
        "start": None,
        "end": None,
        "description": None,
        "assignments": {"u1": "A"},
        "created_at": "2026-01-01T00:00:00.000Z",
        "updated_at": "2026-01-02T00:00:00.000Z",
        "version": "exp_old_1",
    }
    (exp_dir / "home-ab.json").write_bytes(orjson.dumps(flat))
    experiments = ExperimentStore(str(tmp_path / "serving" / "experiments"))
    assert experiments.read("acme", "home-ab") == flat
    assert experiments.list("acme") == [flat]
    assert experiments.pick("acme", "home", "u1") == (
        "home-ab",
        {"name": "A", "weight": 1.0, "snapshot": "current"},
        False,
    )
    changed = experiments.update("acme", "home-ab", {"status": "paused"}, if_match("exp_old_1"))
    assert changed["status"] == "paused" and changed["assignments"] == {"u1": "A"}
    assert changed["created_at"] == flat["created_at"] and changed["version"] != "exp_old_1"

    records = RecordStore(data_root)
    rec_dir = tmp_path / "serving" / "crr" / "acme" / "users"
    rec_dir.mkdir(parents=True)
    old = {
        "id": "alice",
        "rid": "0f" * 16,
        "record": {"segment": "vip"},
        "created_at": "2026-01-01T00:00:00.000Z",
        "updated_at": "2026-01-01T00:00:00.000Z",
    }
    name = hashlib.sha256(b"alice").hexdigest()[:40] + ".json"
    (rec_dir / name).write_bytes(orjson.dumps(old))
    assert records.get("acme", "users", "alice") == old and records.count("acme", "users") == 1
    with pytest.raises(Conflict) as caught:
        records.put("acme", "users", "alice", {"segment": "new"})
    assert caught.value.status_code == 428 and caught.value.current == old["rid"]
    new, created = records.put("acme", "users", "alice", {"segment": "new"}, if_match(old["rid"]))
    assert not created and new["record"] == {"segment": "new"} and new["rid"] != old["rid"]

"""Landing and ingest on real files: idempotence, deduplication, rejects kept, nothing lost."""

from __future__ import annotations

import os
import posixpath
import time
from collections import Counter
from datetime import UTC, date, datetime, timedelta

import orjson
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys import ingest
from recsys.contract import ITEM_SCHEMA
from recsys.demo import DemoSpec, generate

NOW = datetime(2026, 11, 2, tzinfo=UTC)


def _csv(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_import_then_ingest_keeps_every_valid_row_once(storage, tmp_path):
    path = _csv(
        tmp_path,
        "events.csv",
        "user,sku,kind,ts\n"
        "u1,i1,view,2026-10-01T10:00:00Z\n"
        "u1,i2,purchase,2026-10-02T10:00:00Z\n"
        "u2,i1,view,not-a-time\n"
        "u3,i3\n",
    )
    mapping = {"user": "user_id", "sku": "item_id", "kind": "event_type", "ts": "timestamp"}
    first = ingest.import_file(storage, "events", path, mapping=mapping)
    assert (first.rows, first.unparsable, first.would_reject) == (3, 1, {"bad_timestamp": 1})
    again = ingest.import_file(storage, "events", path, mapping=mapping)
    assert again.already_landed and again.landed == first.landed

    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.rows_read, report.rows_new, report.rejected) == (4, 2, 2)
    assert report.rejected_by_reason == {"bad_timestamp": 1, "unparsable": 1}
    events = ingest.read_events(storage, "default")
    assert sorted(events["item_id"].to_list()) == ["i1", "i2"]
    days = sorted(p.name for p in (tmp_path / "data/warehouse/default/events").iterdir())
    assert days == ["date=2026-10-01", "date=2026-10-02"]

    # nothing new: a second run is a no-op; a full refresh rebuilds the same table
    assert ingest.ingest_events(storage, "default", now=NOW).rows_new == 0
    refreshed = ingest.ingest_events(storage, "default", now=NOW, full_refresh=True)
    assert refreshed.rows_new == 2
    assert ingest.read_events(storage, "default").sort("event_id").equals(events.sort("event_id"))
    assert ingest.scan_rejected(storage, "default").collect().height == 2


def test_overlapping_files_do_not_duplicate_events(storage, tmp_path):
    a = _csv(
        tmp_path,
        "a.csv",
        "user_id,item_id,event_type,timestamp\nu1,i1,view,1759312800\nu2,i2,view,1759312801\n",
    )
    b = _csv(
        tmp_path,
        "b.csv",
        "user_id,item_id,event_type,timestamp\nu2,i2,view,1759312801\nu3,i3,view,1759312802\n",
    )
    ingest.import_file(storage, "events", a)
    assert ingest.ingest_events(storage, "default", now=NOW).rows_new == 2
    ingest.import_file(storage, "events", b)
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.rows_new, report.duplicates) == (1, 1)
    assert ingest.read_events(storage, "default").height == 3


def test_demo_data_is_deterministic_and_ingests_with_the_planted_faults(storage, tmp_path):
    spec = DemoSpec(events=20_000, seed=3, end_date="2026-11-01", chunk_events=8_000)
    summary = generate(spec, storage)
    assert summary.events_written == 20_000 + summary.duplicates
    assert generate(spec, storage).skipped  # idempotent
    other = generate(spec, type(storage)(str(tmp_path / "other")))
    for mine, theirs in zip(summary.files, other.files, strict=True):
        assert pl.read_parquet(mine).equals(pl.read_parquet(theirs))

    report = ingest.ingest_events(storage, "default", now=NOW)
    assert report.rejected == summary.malformed
    assert report.duplicates == summary.duplicates
    assert report.rows_new == 20_000 - summary.malformed
    assert set(report.rejected_by_reason) == {
        "missing_id",
        "bad_timestamp",
        "unknown_event_type",
        "oversize_field",
        "bad_value",
    }
    events = ingest.read_events(storage, "default")
    assert events["event_id"].n_unique() == events.height
    types = set(events["event_type"].unique())
    assert {"view", "add_to_cart", "purchase"} <= types


def test_demo_events_cover_the_window_up_to_its_end(storage):
    """Chunks were once cut to size by dropping their latest events, which left the window's
    last one or two days empty (and the freshness check failing on the demo)."""
    spec = DemoSpec(events=30_000, seed=5, end_date="2026-11-01", days=30, chunk_events=10_000)
    summary = generate(spec, storage)
    assert summary.events_written == 30_000 + summary.duplicates
    end = datetime(2026, 11, 1, tzinfo=UTC)
    ingest.ingest_events(storage, "default", now=end + timedelta(days=1))
    events = ingest.read_events(storage, "default")
    views = events.filter(pl.col("event_type") == "view")
    assert views["timestamp"].max() > end - timedelta(hours=2)  # (~40 views an hour)
    assert views["timestamp"].max() < end
    per_day = views.group_by(pl.col("timestamp").dt.date()).len()
    last_day = per_day.filter(pl.col("timestamp") == date(2026, 10, 31))["len"].item()
    assert last_day > 0.7 * per_day["len"].mean()
    items, rep = ingest.build_table(storage, "default", "items")
    assert rep.rows == spec.n_items and items["tags"].list.len().min() >= 3
    assert set(events["item_id"].unique()) <= set(items["item_id"])


def test_demo_users_have_tastes_a_model_can_learn(storage):
    """Users concentrate on few categories, unlike popularity: the signal models must find."""
    generate(DemoSpec(events=30_000, seed=5, end_date="2026-11-01"), storage)
    ingest.ingest_events(storage, "default", now=NOW)
    items, _ = ingest.build_table(storage, "default", "items")
    ev = ingest.read_events(storage, "default").join(
        items.select("item_id", "category"), on="item_id"
    )
    share = (
        ev.group_by("user_id", "category")
        .len()
        .with_columns((pl.col("len") / pl.col("len").sum().over("user_id")).alias("s"))
        .group_by("user_id")
        .agg(pl.col("s").max(), pl.col("len").sum().alias("n"))
        .filter(pl.col("n") >= 20)
    )
    # an active user's top category holds far more than the 1/20 a taste-free user would give
    assert share["s"].median() > 0.3


def test_items_upsert_latest_file_wins(storage, tmp_path):
    import os
    import time

    first = _csv(tmp_path, "items1.csv", "item_id,title,price\na,Old,1\nb,B,2\n")
    ingest.import_file(storage, "items", first)
    time.sleep(0.01)
    second = _csv(tmp_path, "items2.csv", "item_id,title,price\na,New,3\n")
    res = ingest.import_file(storage, "items", second)
    os.utime(res.landed, (time.time() + 5, time.time() + 5))
    table, report = ingest.build_table(storage, "default", "items")
    assert dict(zip(table["item_id"], table["title"], strict=True)) == {"a": "New", "b": "B"}
    assert ingest.pending_files(storage, "default", "items") == []


def test_events_deleted_through_the_api_leave_the_warehouse(storage, tmp_path):
    a = _csv(
        tmp_path,
        "a.csv",
        "event_id,user_id,item_id,event_type,timestamp\n"
        "k1,u1,i1,view,1759312800\nd1,u2,i2,view,1759312801\n"
        "k2,u3,i3,view,1759399200\n",
    )
    ingest.import_file(storage, "events", a)
    assert ingest.ingest_events(storage, "default", now=NOW).rows_new == 3

    # the server's event log records deletions as tombstones; one id is already stored,
    # one arrives only in the next file
    tombs = storage.tombstones_dir("default")
    storage.makedirs(tombs)
    pl.DataFrame(
        {"event_id": ["d1", "d2"], "deleted_at": [datetime(2026, 10, 2, tzinfo=UTC)] * 2}
    ).write_parquet(f"{tombs}/seg-000001.parquet")
    b = _csv(
        tmp_path,
        "b.csv",
        "event_id,user_id,item_id,event_type,timestamp\n"
        "d2,u4,i4,view,1759312802\nk3,u5,i5,view,1759312803\n",
    )
    ingest.import_file(storage, "events", b)
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert report.deleted == 2 and report.rows_new == 1
    events = ingest.read_events(storage, "default")
    assert sorted(events["event_id"].to_list()) == ["k1", "k2", "k3"]
    # the rewrite left one part per touched day and no duplicates; a re-run is a no-op
    assert ingest.load_state(storage, "default")["events"].get("compacting") is None
    again = ingest.ingest_events(storage, "default", now=NOW)
    assert (again.deleted, again.rows_new) == (0, 0)
    assert ingest.read_events(storage, "default").height == 3


def test_a_file_with_some_columns_updates_only_those(storage, tmp_path):
    """A price feed (item_id,price) changes prices and leaves titles, tags and availability
    as the catalogue had them; an item it names for the first time gets the contract's
    defaults; an empty cell clears a value; a file with every column replaces whole rows."""
    import os
    import time

    def land(name, text, at):
        res = ingest.import_file(storage, "items", _csv(tmp_path, name, text))
        os.utime(res.landed, (at, at))

    now = time.time()
    land(
        "catalogue.csv",
        'item_id,title,category,price,tags,available\na,A,shoes,10,"[""red""]",false\n'
        'b,B,hats,20,"[""blue""]",true\n',
        now,
    )
    land("prices.csv", "item_id,price\na,12.5\nc,7\nb,\n", now + 1)
    table, report = ingest.build_table(storage, "default", "items")
    rows = {r["item_id"]: r for r in table.iter_rows(named=True)}
    assert report.rows == 3 and list(rows) == ["a", "b", "c"]
    assert rows["a"] | {"created_at": None} == {
        "item_id": "a", "title": "A", "category": "shoes", "brand": None, "price": 12.5,
        "tags": ["red"], "available": False, "created_at": None, "attributes": None,
    }  # fmt: skip
    assert rows["b"]["price"] is None and rows["b"]["title"] == "B"
    assert rows["c"]["price"] == 7.0 and rows["c"]["available"] is True
    assert rows["c"]["title"] is None and rows["c"]["tags"] == []
    # a file of every column replaces the whole row (b's tags and category go)
    header = ",".join(ITEM_SCHEMA)
    land("full.csv", f"{header}\nb,B2,,,,,,,\n", now + 2)
    table, _ = ingest.build_table(storage, "default", "items")
    b = table.filter(pl.col("item_id") == "b").row(0, named=True)
    assert (b["title"], b["category"], b["tags"], b["price"]) == ("B2", None, [], None)


def test_the_catalogue_folds_only_the_files_landed_since_the_last_build(storage, tmp_path):
    """After a build, a later one reads only the files landed since (incremental: a build moves
    what it folded out of landing) and gives the table and rejects a rebuild from every file
    gives; a file landed with an earlier time than the folded ones makes the next build fold
    every file again, and a rebuild after a moved file is removed leaves its rows out."""
    import os
    import time

    def land(name, text, at):
        res = ingest.import_file(storage, "items", _csv(tmp_path, name, text))
        os.utime(res.landed, (at, at))
        return res.landed

    def both(**kw):
        table, report = ingest.build_table(storage, "default", "items", **kw)
        rejected = pl.read_parquet(storage.table_path("default", "rejected_items"))
        return table, rejected, report

    now = time.time()
    header = ",".join(ITEM_SCHEMA)
    land("full.csv", f"{header}\na,A,shoes,,10,,,,\nb,B,hats,,20,,,,\n", now)
    land("prices.csv", "item_id,price\na,11\nc,oops\n", now + 1)
    table, rejected, report = both()
    assert (report.files_folded, report.rows, report.rejected) == (2, 2, 1)
    assert storage.landing_files("default", "items") == []
    moved, sidecars = ingest.ingested_files(storage, "default", "items")
    assert [t for t, _ in moved] == [pytest.approx(now, abs=1e-5), pytest.approx(now + 1, abs=1e-5)]
    assert [os.path.basename(p).split("~", 1)[1][:5] for _, p in moved] == ["full-", "price"]
    last = land("stock.csv", 'item_id,available\nb,false\nd,true\n"x\n', now + 2)
    state_path = storage.ingest_state_path("default")
    state_before = storage.fs.cat_file(state_path)
    table, rejected, report = both()
    assert report.files_folded == 1 and report.rows_read == 2
    full_table, full_rejected, full = both(rebuild=True)
    assert full.files_folded == 3
    assert table.equals(full_table) and rejected.equals(full_rejected)
    # a build that wrote its tables but crashed before its state: the next folds every file
    storage.fs.pipe_file(state_path, state_before)
    table, rejected, report = both()
    assert report.files_folded == 3 and rejected.equals(full_rejected)
    rows = {r["item_id"]: (r["price"], r["available"]) for r in table.iter_rows(named=True)}
    assert rows == {"a": (11.0, True), "b": (20.0, False), "d": (None, True)}
    assert sorted(rejected["reason"].to_list()) == ["bad_value", "unparsable"]
    # nothing new: nothing read
    assert both()[2].files_folded == 0
    # a file whose time comes before the folded ones: every file again, in their order
    land("old.csv", "item_id,price\ne,5\n", now - 10)
    table, _, report = both()
    assert report.files_folded == 4 and table["item_id"].to_list() == ["a", "b", "d", "e"]
    assert table["price"].to_list() == [11.0, 20.0, None, 5.0]
    assert storage.landing_files("default", "items") == []
    # a moved file removed, then a rebuild: every file again, without its rows
    (moved_last,) = [
        p
        for _, p in ingest.ingested_files(storage, "default", "items")[0]
        if p.endswith("~" + os.path.basename(last))
    ]
    os.remove(moved_last)
    os.remove(moved_last.replace(".parquet", ingest.REJECTED_SUFFIX))  # (its import's rejects)
    table, rejected, report = both(rebuild=True)
    assert report.files_folded == 3 and table["item_id"].to_list() == ["a", "b", "e"]
    assert table["available"].to_list() == [True, True, True] and rejected.height == 1


def test_files_of_one_schema_are_validated_together_and_rejects_keep_their_file(storage, tmp_path):
    """Consecutive files with the same columns go through the validator in one pass; each
    reject still names its own file and its row within that file, in file order."""
    import os
    import time

    now = time.time()
    landed = []
    for n, text in enumerate(
        [
            "item_id,price\na,1\nb,-2\nc,3\n",  # (b: a negative price)
            "item_id,price\n,4\nd,5\n",  # (row 1: no id)
            "item_id,price\na,6\ne,x\n",  # (e: not a number)
        ]
    ):
        res = ingest.import_file(storage, "items", _csv(tmp_path, f"p{n}.csv", text))
        os.utime(res.landed, (now + n, now + n))
        landed.append(os.path.basename(res.landed))
    table, report = ingest.build_table(storage, "default", "items")
    assert dict(zip(table["item_id"], table["price"], strict=True)) == {
        "a": 6.0, "c": 3.0, "d": 5.0
    }  # fmt: skip
    rejected = pl.read_parquet(storage.table_path("default", "rejected_items"))
    assert rejected.select("source_file", "row_number", "reason").rows() == [
        (landed[0], 2, "bad_value"),
        (landed[1], 1, "missing_id"),
        (landed[2], 2, "bad_value"),
    ]
    assert report.rejected == 3 and report.rows_read == 7


def test_the_readers_rejects_of_a_landed_file_reach_the_rejected_table(storage, tmp_path):
    """Lines the reader could not parse are landed beside the file (its sidecar) and listed
    with the validator's rejects, after that file's own."""
    res = ingest.import_file(
        storage, "items", _csv(tmp_path, "q.csv", 'item_id,price\na,-1\nb,2\n"c,3\n')
    )
    assert res.unparsable == 1
    table, report = ingest.build_table(storage, "default", "items")
    assert table["item_id"].to_list() == ["b"]
    rejected = pl.read_parquet(storage.table_path("default", "rejected_items"))
    assert rejected["reason"].to_list() == ["bad_value", "unparsable"]
    assert report.rejected == 2


_COLUMNS = ("title", "brand", "price")
_FILE = st.tuples(
    st.lists(st.sampled_from(_COLUMNS), unique=True),  # the columns it carries, besides the id
    st.lists(
        st.tuples(st.sampled_from("abcd"), st.sampled_from(["", "t", "u", "7", "x"])),
        min_size=1,
        max_size=4,
    ),  # rows: (id, the one value every carried column gets; "x" is no price)
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(files=st.lists(_FILE, min_size=1, max_size=5))
def test_building_after_each_landing_equals_one_build_of_every_file(files):
    """Any sequence of partial catalogue files, built after each one lands (the incremental
    fold), gives the table and rejects that one build from every file gives."""
    import os
    import tempfile
    import time

    from recsys.storage import Storage

    with tempfile.TemporaryDirectory() as root:
        storage = Storage(os.path.join(root, "data"))
        now = time.time()
        for n, (columns, rows) in enumerate(files):
            text = ",".join(["item_id", *columns]) + "\n"
            text += "".join(",".join([i, *[v] * len(columns)]) + "\n" for i, v in rows)
            path = os.path.join(root, f"f{n}.csv")
            with open(path, "w") as f:
                f.write(text)
            landed = ingest.import_file(storage, "items", path).landed
            os.utime(landed, (now + n, now + n))
            table, report = ingest.build_table(storage, "default", "items")
            rejected = pl.read_parquet(storage.table_path("default", "rejected_items"))
        assert report.files_folded <= 1  # (0: a file with the same content landed before)
        full, _ = ingest.build_table(storage, "default", "items", rebuild=True)
        full_rejected = pl.read_parquet(storage.table_path("default", "rejected_items"))
    assert table.equals(full) and rejected.equals(full_rejected)


def test_landing_runs_read_a_folder_and_an_object_store_alike(tmp_path):
    """Consecutive files of one schema come as one run (paths, row counts, rows in file order),
    read in one call from a local folder and file by file from an object store."""
    import uuid

    from recsys.durable import write_parquet_atomic
    from recsys.storage import Storage

    frames = [
        pl.DataFrame({"item_id": ["a", "b"], "price": ["1", "2"]}),
        pl.DataFrame({"item_id": ["c"], "price": ["3"]}),
        pl.DataFrame(
            {"item_id": [], "price": []}, schema={"item_id": pl.String, "price": pl.String}
        ),
        pl.DataFrame({"item_id": ["a"], "title": ["A"]}),
        pl.DataFrame({"item_id": ["d"], "price": ["4"]}),
    ]
    runs = {}
    for name, storage in (
        ("folder", Storage(str(tmp_path / "data"))),
        ("object store", Storage(f"memory://runs-{uuid.uuid4().hex[:8]}")),
    ):
        folder = storage.landing_dir("default", "items")
        storage.makedirs(folder)
        paths = [f"{folder}/f{n}.parquet" for n in range(len(frames))]
        for frame, path in zip(frames, paths, strict=True):
            write_parquet_atomic(frame, path, storage.fs, sync=False)
        runs[name] = [
            ([p.rsplit("/", 1)[1] for p in run], sizes, rows)
            for run, sizes, rows in ingest.landing_runs(storage, paths)
        ]
    for name, got in runs.items():
        assert [(files, sizes) for files, sizes, _ in got] == [
            (["f0.parquet", "f1.parquet", "f2.parquet"], [2, 1, 0]),
            (["f3.parquet"], [1]),
            (["f4.parquet"], [1]),
        ], name
        assert got[0][2]["item_id"].to_list() == ["a", "b", "c"], name
    assert all(a[2].equals(b[2]) for a, b in zip(runs["folder"], runs["object store"], strict=True))


def test_small_event_files_read_together_answer_as_each_file_read_alone(tmp_path, monkeypatch):
    """Consecutive small event files are validated in one pass (`ingest._event_batches`): the
    same events, and the same rejects named by their file and row, as when each file is read
    alone (SMALL_FILE_ROWS 0: every file in batches of its own row groups). The files mix two
    schemas, a large file split in row-group batches, an empty file and a batch-size limit."""
    from recsys.storage import Storage

    def events(rows, **extra):
        columns = ("user_id", "item_id", "event_type", "timestamp")
        frame = pl.DataFrame(rows, schema=dict.fromkeys(columns, pl.String), orient="row")
        return frame.with_columns(**{name: pl.Series(v) for name, v in extra.items()})

    t = "2026-10-01T10:00:0{}Z"
    files = {
        "a": events([("u1", "i1", "view", t.format(1)), ("u1", "i2", "view", "soon")]),
        "b": events([("u2", None, "view", t.format(2)), ("u2", "i3", "add_to_cart", t.format(3))]),
        "c": events(
            [("u3", "i1", "view", t.format(4))] * 2 + [("u3", "i4", "rating", t.format(5))],
            value=["1", "1", "abc"],
        ),
        "d": events(
            [(f"u{n}", "i5", "view" if n != 7 else "zoom", t.format(n)) for n in range(10)]
        ),
        "e": events([("u9", "i9", "view", "2026-13-01")], session_id=["s1"]),
        "f": events([]),
        "g": events([("u8", "i8", "purchase", t.format(8))]),
    }

    def unreadable(path, exc):
        raise AssertionError(f"{path} is readable") from exc

    results = {}
    for label, small in (("alone", 0), ("together", 5)):
        monkeypatch.setattr(ingest, "SMALL_FILE_ROWS", small)
        monkeypatch.setattr(ingest, "BATCH_ROWS", 6)
        storage = Storage(str(tmp_path / label))
        folder = tmp_path / label / "landing" / "default" / "events"
        folder.mkdir(parents=True)
        for n, (name, frame) in enumerate(files.items()):
            frame.write_parquet(folder / f"{name}.parquet", row_group_size=4)
            os.utime(folder / f"{name}.parquet", (1_700_000_000 + n,) * 2)  # (landing order)
        if label == "together":  # (how the files were batched)
            names = [
                ([p.rsplit("/", 1)[1][0] for p in paths], sizes, raw["_row"].to_list())
                for paths, sizes, raw in ingest._event_batches(
                    storage, ingest.landing_data_files(storage, "default", "events"), unreadable
                )
            ]
            assert [(paths, sizes) for paths, sizes, _ in names] == [
                (["a", "b"], [2, 2]),
                (["c"], [3]),
                (["d"], [10]),  # (large: its row groups of 4, 4 and 2 rows in two batches)
                (["d"], [10]),
                (["e"], [1]),  # (a schema of its own)
                (["f", "g"], [0, 1]),
            ]
            assert names[0][2] == [1, 2, 3, 4] and names[3][2] == [5, 6, 7, 8, 9, 10]
        report = ingest.ingest_events(storage, "default", now=NOW)
        results[label] = (
            (report.rows_read, report.rows_new, report.rejected, report.rejected_by_reason),
            ingest.read_events(storage, "default").sort("event_id"),
            ingest.scan_rejected(storage, "default")
            .collect()
            .drop("rejected_at")
            .sort("source_file", "row_number"),
        )
    alone, together = results["alone"], results["together"]
    assert (
        together[0]
        == alone[0]
        == (
            19,
            13,  # (c's first two rows are one event)
            5,
            {"bad_timestamp": 2, "bad_value": 1, "missing_id": 1, "unknown_event_type": 1},
        )
    )
    assert together[1].equals(alone[1])
    assert together[2].equals(alone[2])
    assert together[2].select("source_file", "row_number", "reason").rows() == [
        ("a.parquet", 2, "bad_timestamp"),
        ("b.parquet", 1, "missing_id"),
        ("c.parquet", 3, "bad_value"),
        ("d.parquet", 8, "unknown_event_type"),
        ("e.parquet", 1, "bad_timestamp"),
    ]


@pytest.mark.parametrize("small_file_rows", [0, ingest.SMALL_FILE_ROWS])
def test_unreadable_landing_files_are_rejects_and_the_others_are_read(
    tmp_path, monkeypatch, small_file_rows
):
    """A landing file that is not Parquet, one cut short (a copy still in progress) and one
    whose footer is whole but a page damaged are each one reject, without a row number; the
    files around them are ingested and the run goes on. Both ways of reading the event files
    (each alone, in row-group batches; small ones together) and the items build agree."""
    from recsys.storage import Storage

    monkeypatch.setattr(ingest, "SMALL_FILE_ROWS", small_file_rows)
    storage = Storage(str(tmp_path / "data"))
    t = "2026-10-01T10:00:00Z"
    good = {
        "events": lambda n, u: pl.DataFrame(
            {"user_id": [u] * n, "item_id": [f"i{j}" for j in range(n)]}
        ).with_columns(event_type=pl.lit("view"), timestamp=pl.lit(t)),
        "items": lambda n, u: pl.DataFrame({"item_id": [f"{u}-{j}" for j in range(n)]}),
    }
    for kind, frame in good.items():
        folder = tmp_path / "data" / "landing" / "default" / kind
        folder.mkdir(parents=True)
        frame(2, "a").write_parquet(folder / "a.parquet")
        (folder / "b.parquet").write_bytes(b"PAR1 not a parquet file PAR1")
        frame(1000, "c").write_parquet(folder / "c.parquet")
        whole = (folder / "c.parquet").read_bytes()
        (folder / "c.parquet").write_bytes(whole[: len(whole) // 2])  # (cut short)
        frame(1000, "d").write_parquet(folder / "d.parquet")
        damaged = bytearray((folder / "d.parquet").read_bytes())
        damaged[60:400] = b"\x55" * 340  # (a page: the footer is whole)
        (folder / "d.parquet").write_bytes(damaged)
        frame(1, "e").write_parquet(folder / "e.parquet")
        for n, name in enumerate("abcde"):
            os.utime(folder / f"{name}.parquet", (1_700_000_000 + n,) * 2)

    def unreadable(rejects):
        rows = rejects.filter(pl.col("row_number").is_null())
        assert set(rows["reason"]) == {"unparsable"}
        assert all(d.startswith("file unreadable: ") for d in rows["detail"])
        return sorted(rows["source_file"])

    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.rows_read, report.rows_new, report.rejected) == (3, 3, 3)
    assert report.rejected_by_reason == {"unparsable": 3}
    assert sorted(ingest.read_events(storage, "default")["user_id"]) == ["a", "a", "e"]
    rejected = ingest.scan_rejected(storage, "default").collect()
    assert unreadable(rejected) == ["b.parquet", "c.parquet", "d.parquet"]
    assert ingest.pending_files(storage, "default") == []  # (done: not read again and again)

    table, built = ingest.build_table(storage, "default", "items")
    assert table["item_id"].to_list() == ["a-0", "a-1", "e-0"]
    assert built.rejected_by_reason == {"unparsable": 3}
    items_rejected = pl.read_parquet(storage.table_path("default", "rejected_items"))
    assert unreadable(items_rejected) == ["b.parquet", "c.parquet", "d.parquet"]


def test_pending_files_and_their_keys_come_from_one_listing(monkeypatch):
    """On an object store a request a file is what a sensor tick cost: the sizes that key the
    files come from the folder's listing, not from one `info` a file."""
    import uuid

    from recsys.durable import write_parquet_atomic
    from recsys.storage import Storage

    storage = Storage(f"memory://pending-{uuid.uuid4().hex[:8]}")
    folder = storage.landing_dir("default", "events")
    storage.makedirs(folder)
    frame = pl.DataFrame({"user_id": ["u1"], "item_id": ["i1"], "event_type": ["view"]})
    for n in range(20):
        write_parquet_atomic(
            frame.with_columns(timestamp=pl.lit(f"2026-10-01T10:00:{n:02d}Z")),
            f"{folder}/f{n:02d}.parquet",
            storage.fs,
            sync=False,
        )
    infos = []
    real_info = storage.fs.info
    monkeypatch.setattr(
        storage.fs, "info", lambda path, **kw: infos.append(path) or real_info(path, **kw)
    )
    assert len(ingest.pending_files(storage, "default")) == 20
    assert len(infos) <= 2  # (the folder's, not the files')
    # the keys are the ones `info` gives: a file recorded as done is no longer pending
    done = {"files": [f"f00.parquet:{real_info(f'{folder}/f00.parquet')['size']}"]}
    ingest.save_state(storage, "default", "events", done)
    assert len(ingest.pending_files(storage, "default")) == 19


def test_an_unreadable_event_file_landed_just_now_waits_for_a_later_run(storage, tmp_path):
    """A file still being copied into landing is not Parquet yet: for `LANDING_SETTLE_S` after
    its last change it stays pending (no reject); older, it is a reject and done."""
    folder = tmp_path / "data" / "landing" / "default" / "events"
    folder.mkdir(parents=True)
    pl.DataFrame(
        {"user_id": ["u1"], "item_id": ["i1"], "event_type": ["view"], "timestamp": ["1759312800"]}
    ).write_parquet(folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"PAR1 half a copy")  # (modified now)
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.rows_new, report.rejected, report.deferred) == (
        1,
        0,
        [str(folder / "b.parquet")],
    )
    assert ingest.pending_files(storage, "default") == [str(folder / "b.parquet")]
    past = time.time() - ingest.LANDING_SETTLE_S - 1
    os.utime(folder / "b.parquet", (past, past))
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.rows_new, report.rejected_by_reason, report.deferred) == (
        0,
        {"unparsable": 1},
        [],
    )
    assert ingest.pending_files(storage, "default") == []


def test_ingested_event_files_leave_landing_and_a_full_refresh_reads_them_again(storage, tmp_path):
    """Landing keeps only what is pending: an ingested file (with its import sidecar) moves to
    the warehouse's ingested_landing/date=<day>/ and the state forgets its key. A file landed
    again under an ingested name is new; a full refresh reads every file again, moved or not,
    and gives the same events and rejects."""
    source = _csv(
        tmp_path,
        "a.csv",
        "user_id,item_id,event_type,timestamp\nu1,i1,view,1759312800\nu2,i2,view,oops\nu3\n",
    )
    landed = ingest.import_file(storage, "events", source).landed
    name = os.path.basename(landed)
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.rows_new, report.rejected_by_reason) == (
        1,
        {"bad_timestamp": 1, "unparsable": 1},
    )
    assert storage.landing_files("default", "events") == []
    assert ingest.load_state(storage, "default")["events"]["files"] == []
    landed_at = (
        datetime.fromtimestamp(os.path.getmtime(landed), UTC) if os.path.exists(landed) else None
    )
    assert landed_at is None
    (moved,), sidecars = ingest.ingested_files(storage, "default", "events")
    at = datetime.fromtimestamp(moved[0], UTC)
    folder = tmp_path / "data/warehouse/default/ingested_landing/events" / f"date={at:%Y-%m-%d}"
    stamped = f"{at:%Y%m%dT%H%M%S.%fZ}~{name}"
    assert moved[1] == str(folder / stamped)
    assert sidecars == {str(folder / stamped.replace(".parquet", ingest.REJECTED_SUFFIX))}
    # importing the same file again lands nothing: it was ingested (known from import's own
    # record, without listing the moved files)
    from recsys.storage import Storage

    def no_listing(*args, **kwargs):
        raise AssertionError("import listed the moved files")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Storage, "glob", no_listing)
        assert ingest.import_file(storage, "events", source).already_landed
    assert ingest.pending_files(storage, "default") == []

    # landed again under that name with other rows: pending, ingested, kept beside the first
    pl.DataFrame(
        {"user_id": ["u4"], "item_id": ["i4"], "event_type": ["view"], "timestamp": ["1759312900"]}
    ).write_parquet(landed)
    assert ingest.pending_files(storage, "default") == [landed]
    assert ingest.ingest_events(storage, "default", now=NOW).rows_new == 1
    moved = [os.path.basename(p) for _, p in ingest.ingested_files(storage, "default", "events")[0]]
    assert len(moved) == 2 and moved[0] == stamped and moved[1].endswith("~" + name)

    events = ingest.read_events(storage, "default").sort("event_id")
    refreshed = ingest.ingest_events(storage, "default", now=NOW, full_refresh=True)
    assert (refreshed.rows_read, refreshed.rows_new, refreshed.rejected) == (4, 2, 2)
    assert ingest.read_events(storage, "default").sort("event_id").equals(events)
    assert sorted(events["user_id"].to_list()) == ["u1", "u4"]
    assert ingest.scan_rejected(storage, "default").collect().height == 2
    assert storage.landing_files("default", "events") == []
    assert len(ingest.ingested_files(storage, "default", "events")[0]) == 2


def test_files_a_stopped_run_ingested_but_did_not_move_are_moved_not_read_again(
    storage, tmp_path, monkeypatch
):
    """A run that saved its state and stopped before moving its files (here: the move fails)
    leaves them done: not pending, and the next run moves them without reading them."""
    folder = tmp_path / "data" / "landing" / "default" / "events"
    folder.mkdir(parents=True)
    for n in range(2):
        pl.DataFrame(
            {
                "user_id": [f"u{n}"],
                "item_id": ["i1"],
                "event_type": ["view"],
                "timestamp": ["1759312800"],
            }
        ).write_parquet(folder / f"f{n}.parquet")
    real_mv = storage.fs.mv

    def mv_fails(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(storage.fs, "mv", mv_fails)
    with pytest.raises(OSError, match="disk gone"):
        ingest.ingest_events(storage, "default", now=NOW)
    assert ingest.read_events(storage, "default").height == 2
    assert len(ingest.load_state(storage, "default")["events"]["files"]) == 2
    assert ingest.pending_files(storage, "default") == []

    monkeypatch.setattr(storage.fs, "mv", real_mv)
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.rows_read, report.rows_new) == (0, 0)
    assert storage.landing_files("default", "events") == []
    moved = ingest.ingested_files(storage, "default", "events")[0]
    assert [os.path.basename(p).split("~")[1] for _, p in moved] == ["f0.parquet", "f1.parquet"]
    assert ingest.load_state(storage, "default")["events"]["files"] == []
    assert ingest.read_events(storage, "default").height == 2


def test_each_kind_saves_its_state_without_undoing_another_kinds(storage):
    """The events, items and users assets of one run may run at once: each saves its own
    kind's entry over the state on disk, not over the copy it read when it started."""
    stale = ingest.load_state(storage, "default")  # (a build's copy, read at its start)
    ingest.save_state(storage, "default", "events", {"files": ["a.parquet:1"]})  # (meanwhile)
    stale["items"] = {"files": [], "folded_until": 1.0, "rejected": 0}
    ingest.save_state(storage, "default", "items", stale["items"])
    assert ingest.load_state(storage, "default") == {
        "events": {"files": ["a.parquet:1"]},
        "items": {"files": [], "folded_until": 1.0, "rejected": 0},
    }


def _land_one(storage, tmp_path, n: int, day: str = "2026-10-01") -> None:
    """One landing file of two events on `day` (the n-th: its own users), as the API lands."""
    folder = tmp_path / "data" / "landing" / "default" / "events"
    folder.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "user_id": [f"u{n}", f"v{n}"],
            "item_id": ["i1", "i2"],
            "event_type": ["view", "view"],
            "timestamp": [f"{day}T10:00:00Z", f"{day}T11:00:00Z"],
        }
    ).write_parquet(folder / f"api-{n:04d}.parquet")


def test_a_day_of_many_runs_is_merged_into_one_part_and_readers_keep_theirs(
    storage, tmp_path, monkeypatch
):
    """Each run adds a part to the day it writes; past DAY_PARTS_MAX the day is rewritten as
    one part. The events read are the same; a reader that listed the parts before reads them
    still, until MERGED_PARTS_KEEP_S has passed and a later run removes them."""
    monkeypatch.setattr(ingest, "DAY_PARTS_MAX", 4)
    day_dir = tmp_path / "data/warehouse/default/events/date=2026-10-01"
    for n in range(4):
        _land_one(storage, tmp_path, n)
        assert ingest.ingest_events(storage, "default", now=NOW).days_merged == []
    assert len(ingest.event_parts(storage, "default")) == 4
    before = ingest.event_parts(storage, "default")  # (a training step's listing)
    _land_one(storage, tmp_path, 4)
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.rows_new, report.days_merged) == (2, ["2026-10-01"])
    (merged,) = ingest.event_parts(storage, "default")
    assert merged.endswith("-m1.parquet") and len(list(day_dir.iterdir())) == 6
    users = sorted(f"{p}{n}" for p in "uv" for n in range(5))
    assert sorted(ingest.read_events(storage, "default")["user_id"].to_list()) == users
    assert ingest.scan_events(storage, "default", before).collect().height == 8
    # a later run within the keep time leaves the old parts; past it, removes them
    _land_one(storage, tmp_path, 5, day="2026-10-02")
    ingest.ingest_events(storage, "default", now=NOW)
    assert len(list(day_dir.iterdir())) == 6
    monkeypatch.setattr(ingest, "MERGED_PARTS_KEEP_S", 0.0)
    _land_one(storage, tmp_path, 6, day="2026-10-02")
    ingest.ingest_events(storage, "default", now=NOW)
    assert [p.name for p in day_dir.iterdir()] == [os.path.basename(merged)]
    assert ingest.load_state(storage, "default")["events"]["merges"] == []
    assert ingest.read_events(storage, "default").height == 14


def test_a_days_parts_are_merged_tier_by_tier_so_each_row_is_rewritten_once_a_tier(
    storage, tmp_path, monkeypatch
):
    """Past DAY_PARTS_MAX parts of one tier, those parts become one part of the next tier, which
    may fill it in turn. 27 runs with at most 2 parts a tier: never more than 2 live parts of a
    tier, the events read are every run's, and the merges wrote each row 3 times in all, one
    a tier: 162 rows (merging the whole day at each merge wrote 390 here, and the gap grows
    with the runs: ~90 writes a row for a day of 2,880 runs past 16 parts)."""
    monkeypatch.setattr(ingest, "DAY_PARTS_MAX", 2)
    for n in range(27):
        _land_one(storage, tmp_path, n)
        ingest.ingest_events(storage, "default", now=NOW)
        tiers = Counter(map(ingest.part_tier, ingest.event_parts(storage, "default")))
        assert max(tiers.values()) <= 2, (n, tiers)
    (part,) = ingest.event_parts(storage, "default")
    assert ingest.part_tier(part) == 3 and part.endswith("-m3.parquet")
    events = ingest.read_events(storage, "default")
    assert sorted(events["user_id"].to_list()) == sorted(f"{p}{n}" for p in "uv" for n in range(27))
    merges = ingest.load_state(storage, "default")["events"]["merges"]
    written = sum(pl.read_parquet(m["new"]).height for m in merges)
    assert (len(merges), written) == (9 + 3 + 1, 3 * 54)


def test_the_rejected_rows_parts_are_merged_tier_by_tier_and_none_is_lost(
    storage, tmp_path, monkeypatch
):
    """Each run that rejects rows writes a part of `rejected_events`; past DAY_PARTS_MAX parts of
    a tier they become one part of the next, as a day of events: 9 runs of one good and one
    bad row each, at most 2 parts a tier, leave 1 part of tier 2 holding every reject once
    (with its file and reason), and the replaced parts go after MERGED_PARTS_KEEP_S."""
    monkeypatch.setattr(ingest, "DAY_PARTS_MAX", 2)
    folder = tmp_path / "data" / "landing" / "default" / "events"
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(9):
        pl.DataFrame(
            {
                "user_id": [f"u{n}", f"v{n}"],
                "item_id": ["i1", "i2"],
                "event_type": ["view", "wishlist"],  # (the second: not a known type)
                "timestamp": ["2026-10-01T10:00:00Z", "2026-10-01T11:00:00Z"],
            }
        ).write_parquet(folder / f"api-{n:04d}.parquet")
        report = ingest.ingest_events(storage, "default", now=NOW)
        assert (report.rows_new, report.rejected) == (1, 1)
        tiers = Counter(map(ingest.part_tier, ingest.rejected_parts(storage, "default")))
        assert max(tiers.values()) <= 2, (n, tiers)
    (part,) = ingest.rejected_parts(storage, "default")
    assert ingest.part_tier(part) == 2 and os.path.basename(part).startswith("part-")
    rejected = ingest.scan_rejected(storage, "default").collect()
    assert sorted(orjson.loads(raw)["user_id"] for raw in rejected["raw"]) == [
        f"v{n}" for n in range(9)
    ]
    assert set(rejected["reason"].to_list()) == {"unknown_event_type"}
    assert sorted(rejected["source_file"].to_list()) == [f"api-{n:04d}.parquet" for n in range(9)]
    rejected_dir = tmp_path / "data/warehouse/default/rejected_events"
    assert len(list(rejected_dir.iterdir())) > 1  # (the replaced parts, kept for a while)
    monkeypatch.setattr(ingest, "MERGED_PARTS_KEEP_S", 0.0)
    ingest.ingest_events(storage, "default", now=NOW)
    assert [p.name for p in rejected_dir.iterdir()] == [os.path.basename(part)]
    assert ingest.scan_rejected(storage, "default").collect().equals(rejected)


def test_storage_glob_lists_alike_on_a_folder_a_file_uri_and_an_object_store(tmp_path):
    """`Storage.glob` lists a local root with the standard library (no stat a file) and any
    other root through fsspec: the same matches, sorted, as URIs of the root, and never a
    dot-file (fsspec's own glob matches those)."""
    import uuid

    from recsys.storage import Storage

    names = ["date=1/a.parquet", "date=1/.b.parquet", "date=2/c.parquet", "date=2/d.tmp"]
    names += [".date=3/e.parquet", "date=1/f.parquet"]
    bucket = f"memory://glob-{uuid.uuid4().hex}"
    roots = [str(tmp_path / "plain"), f"file://{tmp_path / 'uri'}", bucket]
    found = []
    for root in roots:
        storage = Storage(root)
        for name in names:
            path = storage.path("events", name)
            storage.makedirs(posixpath.dirname(path))
            with storage.fs.open(path, "wb") as fh:
                fh.write(b"x")
        listed = storage.glob(storage.path("events", "*", "*.parquet"))
        found.append(["events/" + p.split("/events/", 1)[1] for p in listed])
        assert all(storage.exists(p) for p in listed), listed
    expected = ["events/date=1/a.parquet", "events/date=1/f.parquet", "events/date=2/c.parquet"]
    assert found == [expected] * 3


def test_the_time_range_is_kept_by_each_run_not_scanned(storage, tmp_path, monkeypatch):
    """Each run widens the stored events' time span in the state by what it wrote, so
    `events_time_range` reads no part; a deletion recomputes it (the newest event deleted: the
    span shrinks), a full refresh starts it afresh, and a state an older version wrote (no span)
    is scanned once. Every answer equals a scan of the stored events."""

    def scanned():
        ts = ingest.read_events(storage, "default")["timestamp"]
        return ts.min().isoformat(), ts.max().isoformat()

    _land_one(storage, tmp_path, 0, day="2026-10-02")
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.min_timestamp, report.max_timestamp) == scanned()
    _land_one(storage, tmp_path, 1, day="2026-10-01")
    _land_one(storage, tmp_path, 2, day="2026-10-03")
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.min_timestamp, report.max_timestamp) == scanned()
    assert scanned() == ("2026-10-01T10:00:00+00:00", "2026-10-03T11:00:00+00:00")

    def no_scan(*args, **kwargs):
        raise AssertionError("the time range scanned the events")

    expected = scanned()
    with monkeypatch.context() as patch:
        patch.setattr(ingest, "scan_events", no_scan)
        assert ingest.events_time_range(storage, "default") == expected

    newest = ingest.read_events(storage, "default").sort("timestamp")["event_id"][-1]
    tombs = tmp_path / "data" / "serving" / "events" / "default" / "tombstones"
    tombs.mkdir(parents=True)
    pl.DataFrame({"event_id": [newest], "deleted_at": [1]}).write_parquet(tombs / "t.parquet")
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert report.deleted == 1 and report.max_timestamp == "2026-10-03T10:00:00+00:00"
    assert ingest.events_time_range(storage, "default") == scanned()

    refreshed = ingest.ingest_events(storage, "default", now=NOW, full_refresh=True)
    assert (refreshed.min_timestamp, refreshed.max_timestamp) == scanned()

    state = ingest.load_state(storage, "default")
    del state["events"]["time_range"]  # (as an older version left it)
    ingest.save_state(storage, "default", "events", state["events"])
    ingest.ingest_events(storage, "default", now=NOW)  # (nothing new: scans once, keeps it)
    assert ingest.load_state(storage, "default")["events"]["time_range"] is not None
    expected = scanned()
    with monkeypatch.context() as patch:
        patch.setattr(ingest, "scan_events", no_scan)
        assert ingest.events_time_range(storage, "default") == expected


def test_part_tier_reads_the_suffix_after_the_run_tag_only():
    """A run's tag is 8 hex digits ("c1234567" is one): only a suffix after it is a tier; an
    older version's whole-day parts (``-m``, ``-c``) are tier 1."""
    day = "events/date=2026-10-01/"
    cases = {
        "part-20261001T100000-c1234567.parquet": 0,
        "part-20261001T100000-0123abcd.parquet": 0,
        "part-20261001T100000-0123abcd-m2.parquet": 2,
        "part-20261001T100000-0123abcd-c3.parquet": 3,
        "part-20261001T100000-0123abcd-m.parquet": 1,
        "part-20261001T100000-0123abcd-c.parquet": 1,
    }
    assert {name: ingest.part_tier(day + name) for name in cases} == cases


def test_a_merge_stopped_before_its_part_leaves_the_day_whole(storage, tmp_path, monkeypatch):
    """A merge is recorded before its part is written: stopped in between, the listing keeps
    the day's parts, and the next run forgets the merge and merges again."""
    monkeypatch.setattr(ingest, "DAY_PARTS_MAX", 2)
    for n in range(2):
        _land_one(storage, tmp_path, n)
        ingest.ingest_events(storage, "default", now=NOW)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ingest, "write_parquet_parts_atomic", disk_full)
    _land_one(storage, tmp_path, 2)
    with pytest.raises(OSError, match="disk full"):
        ingest.ingest_events(storage, "default", now=NOW)
    assert len(ingest.load_state(storage, "default")["events"]["merges"]) == 1
    assert len(ingest.event_parts(storage, "default")) == 3
    assert ingest.read_events(storage, "default").height == 6
    monkeypatch.undo()
    monkeypatch.setattr(ingest, "DAY_PARTS_MAX", 2)
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert report.days_merged == ["2026-10-01"]
    assert len(ingest.load_state(storage, "default")["events"]["merges"]) == 1
    assert len(ingest.event_parts(storage, "default")) == 1
    assert ingest.read_events(storage, "default").height == 6


def test_deleting_an_event_of_a_merged_day_removes_it_from_every_part(
    storage, tmp_path, monkeypatch
):
    """The parts a merge replaced are still on disk for a while; a deletion rewrites the day
    from its live parts and removes those too, so no file keeps the deleted event and none is
    read twice."""
    monkeypatch.setattr(ingest, "DAY_PARTS_MAX", 2)
    for n in range(3):
        _land_one(storage, tmp_path, n)
        ingest.ingest_events(storage, "default", now=NOW)
    assert len(ingest.event_parts(storage, "default")) == 1
    events = ingest.read_events(storage, "default")
    gone = events.filter(pl.col("user_id") == "u1")["event_id"][0]
    tombs = tmp_path / "data" / "serving" / "events" / "default" / "tombstones"
    tombs.mkdir(parents=True)
    pl.DataFrame({"event_id": [gone], "deleted_at": [1]}).write_parquet(tombs / "t.parquet")
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert report.deleted == 1
    day_dir = tmp_path / "data/warehouse/default/events/date=2026-10-01"
    on_disk = pl.read_parquet(list(day_dir.iterdir()))
    assert on_disk.height == 5 and gone not in on_disk["event_id"].to_list()
    assert ingest.read_events(storage, "default").height == 5
    assert ingest.load_state(storage, "default")["events"]["merges"] == []


def _save_many(root: str, kind: str, times: int) -> None:
    from recsys.storage import Storage

    storage = Storage(root)
    for n in range(times):
        if n:  # (nobody undid this kind's last write)
            assert ingest.load_state(storage, "default")[kind] == {"n": n - 1}
        ingest.save_state(storage, "default", kind, {"n": n})


def test_kinds_saving_at_once_in_two_processes_lose_no_entry(tmp_path):
    """The state is read, changed and written under a lock: two processes saving their own
    kind 100 times each never find their last entry undone and leave both kinds' last entries
    (without it, one's write of a stale copy undoes the other's)."""
    import multiprocessing

    root = str(tmp_path / "data")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_save_many, args=(root, kind, 100)) for kind in ("events", "items")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    from recsys.storage import Storage

    assert ingest.load_state(Storage(root), "default") == {"events": {"n": 99}, "items": {"n": 99}}


def _import_many(root: str, sources: list[str]) -> None:
    from recsys.storage import Storage

    storage = Storage(root)
    for source in sources:
        assert not ingest.import_file(storage, "events", source).already_landed


def test_imports_at_once_in_two_processes_keep_every_name_in_the_record(tmp_path):
    """Import's record of the names it landed is read and rewritten under a lock: two
    processes importing 40 files each leave all 80 names in it, so once ingested, no file is
    landed again by a later import of it."""
    import multiprocessing

    from recsys.storage import Storage

    root = str(tmp_path / "data")
    sources = []
    for n in range(80):
        path = tmp_path / f"e{n}.csv"
        path.write_text(f"user_id,item_id,event_type,timestamp\nu{n},i1,view,1759312800\n")
        sources.append(str(path))
    ctx = multiprocessing.get_context("spawn")  # (a forked child of Polars' pool can hang)
    procs = [ctx.Process(target=_import_many, args=(root, sources[k::2])) for k in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    storage = Storage(root)
    assert ingest.ingest_events(storage, "default", now=NOW).rows_new == 80
    again = [ingest.import_file(storage, "events", s) for s in sources]
    assert all(r.already_landed and not r.pending for r in again)
    assert storage.landing_files("default", "events") == []


def test_an_unreadable_catalogue_file_landed_just_now_waits_for_a_later_build(storage, tmp_path):
    """As for events: a catalogue file still being copied in stays in landing, no reject, and
    the build folds the rest; once whole, the next build folds it onto the table."""
    folder = tmp_path / "data" / "landing" / "default" / "items"
    folder.mkdir(parents=True)
    pl.DataFrame({"item_id": ["a"], "price": ["1"]}).write_parquet(folder / "a.parquet")
    (folder / "b.parquet").write_bytes(b"PAR1 half a copy")  # (modified now)
    table, report = ingest.build_table(storage, "default", "items")
    assert (table["item_id"].to_list(), report.rejected) == (["a"], 0)
    assert report.deferred == [str(folder / "b.parquet")]
    assert ingest.pending_files(storage, "default", "items") == [str(folder / "b.parquet")]
    pl.DataFrame({"item_id": ["b"], "price": ["2"]}).write_parquet(folder / "b.parquet")
    table, report = ingest.build_table(storage, "default", "items")
    assert (table["item_id"].to_list(), table["price"].to_list()) == (["a", "b"], [1.0, 2.0])
    assert (report.rejected, report.incremental, report.deferred) == (0, True, [])
    assert storage.landing_files("default", "items") == []


def test_a_sidecar_landed_without_its_data_file_reaches_the_rejects(storage, tmp_path):
    """A connector batch whose every message was malformed lands only its rejects: the ingest
    records them (once, and again on a full refresh), and the items build too."""
    from recsys.contract import REJECTED_SCHEMA

    def rejects(source: str, n: int) -> pl.DataFrame:
        rows = [
            {
                "source_file": source,
                "row_number": i + 1,
                "reason": "unparsable",
                "detail": "not JSON",
                "raw": "{",
            }
            for i in range(n)
        ]
        return pl.DataFrame(rows, schema=REJECTED_SCHEMA)

    for kind, n in (("events", 2), ("items", 3)):
        folder = tmp_path / "data" / "landing" / "default" / kind
        folder.mkdir(parents=True)
        rejects(f"nats-{kind}", n).write_parquet(folder / f"nats-s-1{ingest.REJECTED_SUFFIX}")
    report = ingest.ingest_events(storage, "default", now=NOW)
    assert (report.rows_read, report.rejected_by_reason) == (2, {"unparsable": 2})
    assert storage.landing_listing("default", "events") == []  # (moved out, with the others)
    assert ingest.ingest_events(storage, "default", now=NOW).rejected == 0
    refreshed = ingest.ingest_events(storage, "default", now=NOW, full_refresh=True)
    assert refreshed.rejected_by_reason == {"unparsable": 2}
    assert (
        ingest.scan_rejected(storage, "default").collect()["source_file"].to_list()
        == ["nats-events"] * 2
    )

    _, built = ingest.build_table(storage, "default", "items")
    assert built.rejected_by_reason == {"unparsable": 3}
    assert storage.landing_listing("default", "items") == []
    _, again = ingest.build_table(storage, "default", "items")
    assert (again.incremental, again.rejected) == (True, 3)  # (the table's rejects, not again)
    _, rebuilt = ingest.build_table(storage, "default", "items", rebuild=True)
    assert rebuilt.rejected == 3


def test_the_catalogue_as_of_a_cutoff_reads_only_the_files_holding_its_late_ids(storage, tmp_path):
    """A build records the ids each file it folds holds; the point-in-time catalogue then reads
    the files that hold a late id, and every file no build has recorded, and answers as when
    it read every file."""
    import datetime as dt

    from recsys.features import LOG_SCHEMA, catalogue_as_of

    folder = tmp_path / "data" / "landing" / "default" / "items"
    folder.mkdir(parents=True)
    start = time.time() - 100

    def land(name: str, rows: dict, at: float) -> str:
        path = folder / f"{name}.parquet"
        pl.DataFrame(rows).write_parquet(path)
        os.utime(path, (at, at))
        return name

    land("f0", {"item_id": ["a", "b"], "category": ["c1", "c1"]}, start)
    land("f1", {"item_id": ["b"], "category": ["c2"]}, start + 1)
    land("f2", {"item_id": ["c"], "category": ["c3"]}, start + 2)
    table, _ = ingest.build_table(storage, "default", "items")
    land("f3", {"item_id": ["a"], "category": ["c4"]}, start + 3)  # (landed, not built yet)
    every = ingest.catalogue_files(storage, "default", "items")
    held = ingest.files_holding(storage, "default", "items", every, {"a"})
    assert [ingest.landing_name(f) for _, f in held] == ["f0.parquet", "f3.parquet"]
    held = ingest.files_holding(storage, "default", "items", every, {"b", "zz"})
    assert [ingest.landing_name(f) for _, f in held] == ["f0.parquet", "f1.parquet", "f3.parquet"]

    # b's category upserted for after the cut-off: as of it, b has the category f1 gave it
    cutoff = dt.datetime.fromtimestamp(start + 10, dt.UTC)
    late = dt.datetime.fromtimestamp(start + 20, dt.UTC)
    log = pl.DataFrame(
        {
            "entity_type": ["item"],
            "entity_id": ["b"],
            "feature": ["category"],
            "value": ['"c9"'],
            "event_timestamp": [late],
            "created_timestamp": [dt.datetime.now(dt.UTC)],
        },
        schema=LOG_SCHEMA,
    )
    now = table.with_columns(
        category=pl.when(pl.col("item_id") == "b").then(pl.lit("c9")).otherwise("category")
    )
    as_of, report = catalogue_as_of(storage, "default", "items", now, cutoff, log)
    assert dict(as_of.select("item_id", "category").iter_rows()) == {
        "a": "c1",
        "b": "c2",
        "c": "c3",
    }
    assert report.rows_changed == 1
    import shutil

    shutil.rmtree(tmp_path / "data" / "warehouse" / "default" / "items_held_ids")
    read_all, _ = catalogue_as_of(storage, "default", "items", now, cutoff, log)
    assert read_all.equals(as_of)


def test_held_ids_skip_large_files_and_merge_their_parts(storage, tmp_path, monkeypatch):
    """A file of more than HELD_IDS_MAX rows is not recorded, so always read; past
    HELD_PARTS_MAX the records (a part a build) are merged into one, with the same answers."""
    monkeypatch.setattr(ingest, "HELD_IDS_MAX", 1)
    monkeypatch.setattr(ingest, "HELD_PARTS_MAX", 2)
    folder = tmp_path / "data" / "landing" / "default" / "items"
    folder.mkdir(parents=True)
    start = time.time() - 100
    for n, ids in enumerate([["a", "b"], ["b"], ["c"], ["a"]]):
        path = folder / f"f{n}.parquet"
        pl.DataFrame({"item_id": ids}).write_parquet(path)
        os.utime(path, (start + n, start + n))
        ingest.build_table(storage, "default", "items")  # (a build a file: a record a build)
    held_dir = tmp_path / "data" / "warehouse" / "default" / "items_held_ids"
    assert len(list(held_dir.iterdir())) == 2  # (3 parts merged into 1, then the 4th)
    every = ingest.catalogue_files(storage, "default", "items")
    names = {
        want: [
            ingest.landing_name(f)
            for _, f in ingest.files_holding(storage, "default", "items", every, {want})
        ]
        for want in "abcz"
    }
    assert names == {
        "a": ["f0.parquet", "f3.parquet"],  # (f0: two rows, not recorded, always read)
        "b": ["f0.parquet", "f1.parquet"],
        "c": ["f0.parquet", "f2.parquet"],
        "z": ["f0.parquet"],
    }

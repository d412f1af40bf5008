"""recsys.durable: a reader sees the old file or the new one, never a part, and no temporary
file is left behind, on a local folder and on an fsspec object store (the memory one)."""

from __future__ import annotations

import io
import os

import fsspec
import polars as pl
import pytest

from recsys.durable import write_atomic, write_parquet_atomic
from recsys.storage import Storage

FRAME = pl.DataFrame({"event_id": ["a", "b", "c"], "value": [1.0, None, 3.5]})


def test_write_atomic_replaces_the_content_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "doc.json")
    write_atomic(path, b'{"v": 1}')
    write_atomic(path, b'{"v": 2}')
    assert (tmp_path / "doc.json").read_bytes() == b'{"v": 2}'
    assert os.listdir(tmp_path) == ["doc.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "events.parquet")
    write_parquet_atomic(FRAME, path)

    class Broken:
        def write_parquet(self, f, **options):
            f.write(b"PAR1 half a file")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_parquet_atomic(Broken(), path)
    assert pl.read_parquet(path).equals(FRAME)
    assert os.listdir(tmp_path) == ["events.parquet"]


def test_parquet_through_a_local_storage_root_and_a_file_uri(tmp_path):
    storage = Storage(str(tmp_path))
    path = storage.path("landing", "acme", "events", "x.parquet")
    storage.makedirs(os.path.dirname(path))
    write_parquet_atomic(FRAME, path, storage.fs, row_group_size=2)
    assert pl.read_parquet(path).equals(FRAME)
    write_parquet_atomic(FRAME.head(1), "file://" + path, storage.fs)
    assert pl.read_parquet(path).equals(FRAME.head(1))
    assert os.listdir(os.path.dirname(path)) == ["x.parquet"]


def test_object_store_writes_move_a_whole_temporary_object_into_place():
    fs = fsspec.filesystem("memory")
    fs.mkdir("/bucket/landing")
    write_parquet_atomic(FRAME, "/bucket/landing/x.parquet", fs)
    write_atomic("/bucket/landing/state.json", b"{}", fs)
    assert pl.read_parquet(io.BytesIO(fs.cat_file("/bucket/landing/x.parquet"))).equals(FRAME)
    assert fs.cat_file("/bucket/landing/state.json") == b"{}"
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("/bucket/landing", detail=False)) == [
        "state.json",
        "x.parquet",
    ]


def test_a_batch_written_without_fsync_is_whole_for_readers_and_synced_at_once(tmp_path):
    from recsys.durable import sync_all

    paths = [str(tmp_path / f"part-{i}.parquet") for i in range(3)]
    for i, path in enumerate(paths):
        write_parquet_atomic(FRAME.head(i + 1), path, sync=False)
    sync_all()
    sync_all(fsspec.filesystem("memory"))  # nothing to flush on an object store
    assert [pl.read_parquet(p).height for p in paths] == [1, 2, 3]
    assert sorted(os.listdir(tmp_path)) == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]

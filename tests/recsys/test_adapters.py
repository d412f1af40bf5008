"""Adapters against the real files in ../shared/data (skipped where absent) and small fakes."""

from __future__ import annotations

import polars as pl
import pytest

from recsys import adapters, ingest
from recsys.errors import RecsysError


@pytest.mark.realdata
def test_movielens_100k(shared_data):
    events, items, users = adapters.movielens_100k(str(shared_data / "ml-100k"))
    assert (events.height, items.height, users.height) == (100_000, 1682, 943)
    assert set(events["event_type"].unique()) == {"rating"}
    assert events["value"].min() == 1 and events["value"].max() == 5
    toy = items.filter(pl.col("item_id") == "1").row(0, named=True)
    assert toy["title"] == "Toy Story (1995)"
    assert set(toy["tags"]) == {"genre:animation", "genre:children-s", "genre:comedy"}
    assert users.filter(pl.col("user_id") == "1")["segment"][0] == "technician"


@pytest.mark.realdata
def test_taobao_userbehavior(shared_data):
    path = shared_data / "taobao-sample" / "UserBehavior_head84475.csv"
    events, items = adapters.taobao_userbehavior(str(path))
    assert events.height == 84_475
    assert events["user_id"].n_unique() == 815 and items.height == 55_368
    counts = dict(events["event_type"].value_counts().iter_rows())
    assert counts["view"] > counts["add_to_cart"] > counts["purchase"] > 0


@pytest.mark.realdata
def test_import_cli_path_guesses_adapter_for_well_known_names(shared_data, storage):
    res = ingest.import_file(storage, "events", str(shared_data / "ml-100k" / "u.data"))
    assert res.rows == 100_000 and res.would_reject == {}


def test_movielens_dat_and_csv_formats(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    (tmp_path / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's\n".encode("latin-1")
    )
    raw, rej = adapters.read_source(str(tmp_path / "ratings.dat"), "events")
    assert raw.select("user_id", "item_id", "value", "event_type").rows() == [
        ("1", "1193", "5", "rating"),
        ("1", "661", "3", "rating"),
    ]
    raw, _ = adapters.read_source(str(tmp_path / "movies.dat"), "items")
    assert raw.row(0, named=True)["tags"] == "genre:animation|genre:children-s"
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,2,3.5,1112486027\n")
    raw, _ = adapters.read_source(str(tmp_path / "ratings.csv"), "events")
    assert raw.select("user_id", "item_id", "value").row(0) == ("1", "2", "3.5")


def test_retail_export_maps_purchases_and_returns(tmp_path):
    p = tmp_path / "online_retail.csv"
    p.write_text(
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        "536365,85123A,WHITE HANGING HEART,6,12/1/2010 8:26,2.55,17850.0,United Kingdom\n"
        "C536379,85123A,WHITE HANGING HEART,-1,12/1/2010 9:41,2.55,17850.0,United Kingdom\n"
    )
    raw, _ = adapters.read_source(str(p), "events", adapter="retail")
    assert raw.select("user_id", "item_id", "event_type", "value", "timestamp").rows() == [
        ("17850", "85123A", "purchase", "6.0", "2010-12-01T08:26:00"),
        ("17850", "85123A", "return", "1.0", "2010-12-01T09:41:00"),
    ]
    items, _ = adapters.read_source(str(p), "items", adapter="retail")
    assert items.select("item_id", "title", "price").rows() == [
        ("85123A", "WHITE HANGING HEART", "2.55")
    ]


def test_unknown_adapter_kind_and_bad_mapping_are_clear_errors(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("a,b\n1,2\n")
    with pytest.raises(RecsysError, match="has no users mapping"):
        adapters.read_source(str(p), "users", adapter="taobao")
    with pytest.raises(RecsysError, match="does not have"):
        adapters.read_source(str(p), "events", mapping={"zzz": "user_id"})

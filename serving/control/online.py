"""Online evaluation: the business figures of what was served - CTR, conversion and revenue per
impression - per model version, surface and experiment variant, per day.

From the tenant's events (`serving.events_log.scan_all_events`: the warehouse, the API's landed
files and the log), by the convention the bandits use (`recsys.bandits.count_arms`):

* an *impression* is an event of type ``impression`` for one shown item, whose JSON context
  carries the ``request_id`` of the recommend answer (``meta.request_id``) and what served it:
  ``model`` (``meta.algo_version``, or ``snapshot_id``), ``surface``, and
  ``experiment: {"id", "variant"}`` when one assigned the request;
* a ``click`` or ``purchase`` is *attributed* to the impression of the same ``request_id`` and
  item (each pair counts once, so a repeated click is one click);
* revenue is a purchase's ``context.revenue`` when given, else its quantity (``value``, 1 when
  absent) times the item's price in the warehouse's items table.

Rows group by (day of the impression, model, surface, variant); impressions without a context
field count under null. Reads are lazy and filtered by time and event type first.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

REWARDS = ("click", "purchase")


def online_figures(
    data_root: str, tenant: str, start: float, end: float, tlog: Any = None
) -> list[dict[str, Any]]:
    """One row per (day, model, surface, variant) with impressions in [start, end)."""
    import polars as pl

    from serving.events_log import scan_all_events

    t0 = dt.datetime.fromtimestamp(start, dt.UTC)
    t1 = dt.datetime.fromtimestamp(end, dt.UTC)
    ctx = pl.col("context")
    events = (
        scan_all_events(data_root, tenant, tlog)
        .filter(pl.col("event_type").is_in(["impression", *REWARDS]))
        .filter(pl.col("timestamp") >= t0)
        .select(
            "event_type",
            "item_id",
            "timestamp",
            "value",
            ctx.str.json_path_match("$.request_id").alias("req"),
            pl.coalesce(
                ctx.str.json_path_match("$.model"), ctx.str.json_path_match("$.snapshot_id")
            ).alias("model"),
            ctx.str.json_path_match("$.surface").alias("surface"),
            ctx.str.json_path_match("$.experiment.variant").alias("variant"),
            ctx.str.json_path_match("$.revenue").cast(pl.Float64, strict=False).alias("revenue"),
        )
        .filter(pl.col("req").is_not_null())
        .collect()
    )
    shown = (
        events.filter((pl.col("event_type") == "impression") & (pl.col("timestamp") < t1))
        .sort("timestamp")
        .unique(subset=["req", "item_id"], keep="first", maintain_order=True)
        .with_columns(pl.col("timestamp").dt.date().cast(pl.String).alias("day"))
        .select("req", "item_id", "day", "model", "surface", "variant")
    )
    if shown.height == 0:
        return []
    rewards = events.filter(pl.col("event_type").is_in(list(REWARDS)))
    prices = _prices(data_root, tenant)
    purchases = (
        rewards.filter(pl.col("event_type") == "purchase")
        .join(prices, on="item_id", how="left")
        .with_columns(
            pl.coalesce(
                "revenue", pl.col("value").fill_null(1.0) * pl.col("price").fill_null(0.0)
            ).alias("amount")
        )
        .group_by("req", "item_id")
        .agg(pl.col("amount").sum(), pl.len().alias("purchases"))
        .with_columns(pl.lit(1).alias("purchased"))
    )
    clicks = (
        rewards.filter(pl.col("event_type") == "click")
        .select("req", "item_id")
        .unique()
        .with_columns(pl.lit(1).alias("clicked"))
    )
    joined = (
        shown.join(clicks, on=["req", "item_id"], how="left")
        .join(
            purchases.select("req", "item_id", "purchased", "amount"),
            on=["req", "item_id"],
            how="left",
        )
        .group_by("day", "model", "surface", "variant")
        .agg(
            pl.len().alias("impressions"),
            pl.col("req").n_unique().alias("requests"),
            pl.col("clicked").sum().alias("clicks"),
            pl.col("purchased").sum().alias("purchases"),
            pl.col("amount").sum().alias("revenue"),
        )
        .sort("day", "model", "surface", "variant", nulls_last=True)
    )
    out = []
    for row in joined.iter_rows(named=True):
        n = row["impressions"]
        revenue = float(row["revenue"] or 0.0)
        out.append(
            {
                **row,
                "clicks": int(row["clicks"] or 0),
                "purchases": int(row["purchases"] or 0),
                "revenue": round(revenue, 6),
                "ctr": (row["clicks"] or 0) / n,
                "conversion": (row["purchases"] or 0) / n,
                "revenue_per_impression": revenue / n,
            }
        )
    return out


def _prices(data_root: str, tenant: str):
    import polars as pl

    path = os.path.join(data_root, "warehouse", tenant, "items.parquet")
    if not os.path.exists(path):
        return pl.DataFrame(
            {"item_id": [], "price": []}, schema={"item_id": pl.String, "price": pl.Float64}
        )
    return pl.read_parquet(path, columns=["item_id", "price"]).unique("item_id", keep="last")

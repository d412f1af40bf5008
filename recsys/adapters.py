"""Ready-made adapters from well-known export formats to the data contract's column names.

An adapter knows a source's layout (delimiter, header, encoding) and how its fields map onto
contract columns. Its output is still raw (text) and goes through recsys.validation like any
other import. Supported: MovieLens (u.data/u.item/u.user, ratings.dat/movies.dat,
ratings.csv/movies.csv), retail invoice-line exports, and Taobao UserBehavior.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import polars as pl

from recsys.errors import RecsysError
from recsys.readers import TextLayout, detect_format, read_raw, rejects_frame
from recsys.validation import validate_events, validate_items, validate_users

MOVIELENS_GENRES = (
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
)
TAOBAO_BEHAVIORS = {"pv": "view", "cart": "add_to_cart", "fav": "like", "buy": "purchase"}

Mapper = Callable[[pl.DataFrame], pl.DataFrame]


@dataclass(frozen=True)
class Adapter:
    """How to read one kind of file of one source and map it onto contract columns."""

    name: str
    kind: str  # events | items | users
    fmt: str
    layout: TextLayout
    mapper: Mapper
    separator: str | None = None  # multi-character separators (MovieLens '::') become this


def _slug(col: pl.Expr) -> pl.Expr:
    return col.str.to_lowercase().str.replace_all(r"[^a-z0-9]+", "-").str.strip_chars("-")


def _genre_tags(genres: pl.Expr) -> pl.Expr:
    """A list of genre names -> tags 'genre:<slug>' as a JSON-free '|'-joined text."""
    return genres.list.eval(pl.lit("genre:") + _slug(pl.element())).list.join("|")


# --- MovieLens -------------------------------------------------------------------------------
def _ml_ratings(df: pl.DataFrame) -> pl.DataFrame:
    return df.select(
        "_row",
        "user_id",
        "item_id",
        pl.lit("rating").alias("event_type"),
        pl.col("rating").alias("value"),
        "timestamp",
    )


def _ml100k_items(df: pl.DataFrame) -> pl.DataFrame:
    flags = [
        pl.when(pl.col(f"g{i}") == "1").then(pl.lit(g)) for i, g in enumerate(MOVIELENS_GENRES)
    ]
    genres = pl.concat_list(flags).list.drop_nulls()
    released = pl.col("release_date").str.to_date("%d-%b-%Y", strict=False)
    return df.select(
        "_row",
        "item_id",
        "title",
        genres.list.first().alias("category"),
        _genre_tags(genres).alias("tags"),
        released.cast(pl.String).alias("created_at"),
        pl.struct(pl.col("imdb_url")).struct.json_encode().alias("attributes"),
    )


def _ml_genre_items(df: pl.DataFrame) -> pl.DataFrame:
    genres = (
        pl.col("genres")
        .str.split("|")
        .list.eval(pl.element().filter(pl.element() != "(no genres listed)"))
    )
    year = pl.col("title").str.extract(r"\((\d{4})\)\s*$")
    return df.select(
        "_row",
        "item_id",
        "title",
        genres.list.first().alias("category"),
        _genre_tags(genres).alias("tags"),
        pl.when(year.is_not_null()).then(year + "-01-01").alias("created_at"),
    )


def _ml100k_users(df: pl.DataFrame) -> pl.DataFrame:
    return df.select(
        "_row",
        "user_id",
        pl.col("occupation").alias("segment"),
        pl.struct("age", "gender", "zip").struct.json_encode().alias("attributes"),
    )


def _ml1m_users(df: pl.DataFrame) -> pl.DataFrame:
    return df.select(
        "_row",
        "user_id",
        pl.col("occupation").alias("segment"),
        pl.struct("age", "gender", "zip").struct.json_encode().alias("attributes"),
    )


# --- Taobao UserBehavior ---------------------------------------------------------------------
def _taobao_events(df: pl.DataFrame) -> pl.DataFrame:
    behavior = pl.col("behavior").str.strip_chars().str.to_lowercase()
    return df.select(
        "_row",
        "user_id",
        "item_id",
        # unknown behaviours pass through unchanged so validation rejects them by name
        behavior.replace(TAOBAO_BEHAVIORS).alias("event_type"),
        "timestamp",
        pl.struct(pl.col("category_id")).struct.json_encode().alias("context"),
    )


def _taobao_items(df: pl.DataFrame) -> pl.DataFrame:
    return df.select(
        "_row",
        "item_id",
        pl.col("category_id").alias("category"),
        (pl.lit("category:") + pl.col("category_id")).alias("tags"),
    ).unique(subset="item_id", keep="last", maintain_order=True)


# --- Retail invoice lines (e.g. the UCI Online Retail export) -----------------------------------
RETAIL_ALIASES = {
    "invoice": ("invoiceno", "invoice", "invoice_no", "invoice_id", "order_id"),
    "product": ("stockcode", "stock_code", "product_code", "productcode", "sku", "product_id"),
    "description": ("description", "product_name", "title"),
    "quantity": ("quantity", "qty"),
    "date": ("invoicedate", "invoice_date", "date", "timestamp"),
    "unit_price": ("unitprice", "unit_price", "price"),
    "customer": ("customerid", "customer_id", "customer", "user_id"),
    "country": ("country",),
}


def _retail_columns(df: pl.DataFrame) -> dict[str, str]:
    lower = {c.lower().replace(" ", "").replace("-", "_"): c for c in df.columns}
    found: dict[str, str] = {}
    for field, aliases in RETAIL_ALIASES.items():
        for alias in aliases:
            if alias.replace("_", "") in {k.replace("_", "") for k in lower}:
                key = next(k for k in lower if k.replace("_", "") == alias.replace("_", ""))
                found[field] = lower[key]
                break
    missing = [f for f in ("product", "quantity", "date", "customer") if f not in found]
    if missing:
        raise RecsysError(
            f"retail export lacks columns for {missing}; found {df.columns}. "
            "Use --map to name them."
        )
    return found


def _retail_date(col: pl.Expr) -> pl.Expr:
    """Invoice dates as ISO text: ISO stays, US 'm/d/Y H:M' (the common export) is converted."""
    us = col.str.to_datetime("%m/%d/%Y %H:%M", strict=False)
    return pl.when(us.is_not_null()).then(us.dt.to_string("%Y-%m-%dT%H:%M:%S")).otherwise(col)


def _retail_events(df: pl.DataFrame) -> pl.DataFrame:
    c = _retail_columns(df)
    qty = pl.col(c["quantity"]).cast(pl.Float64, strict=False)
    cancelled = (pl.col(c["invoice"]).str.starts_with("C") if "invoice" in c else pl.lit(False)) | (
        qty < 0
    )
    context = {k: pl.col(c[k]) for k in ("unit_price", "country") if k in c}
    return df.select(
        "_row",
        pl.col(c["customer"]).str.replace(r"\.0$", "").alias("user_id"),
        pl.col(c["product"]).alias("item_id"),
        pl.when(cancelled).then(pl.lit("return")).otherwise(pl.lit("purchase")).alias("event_type"),
        pl.when(qty.is_not_null())
        .then(qty.abs().cast(pl.String))
        .otherwise(pl.col(c["quantity"]))
        .alias("value"),
        _retail_date(pl.col(c["date"])).alias("timestamp"),
        (pl.col(c["invoice"]) if "invoice" in c else pl.lit(None, pl.String)).alias("session_id"),
        (pl.struct(**context).struct.json_encode() if context else pl.lit(None, pl.String)).alias(
            "context"
        ),
    )


def _retail_items(df: pl.DataFrame) -> pl.DataFrame:
    c = _retail_columns(df)
    return df.select(
        "_row",
        pl.col(c["product"]).alias("item_id"),
        (pl.col(c["description"]) if "description" in c else pl.lit(None, pl.String)).alias(
            "title"
        ),
        (pl.col(c["unit_price"]) if "unit_price" in c else pl.lit(None, pl.String)).alias("price"),
    ).unique(subset="item_id", keep="last", maintain_order=True)


_ML100K_ITEM_COLS = ("item_id", "title", "release_date", "video_date", "imdb_url") + tuple(
    f"g{i}" for i in range(len(MOVIELENS_GENRES))
)
_TAOBAO_COLS = ("user_id", "item_id", "category_id", "behavior", "timestamp")
_TAB = TextLayout(delimiter="\t", has_header=False)

ADAPTERS: dict[tuple[str, str], Adapter] = {
    ("movielens-100k", "events"): Adapter(
        "movielens-100k",
        "events",
        "tsv",
        TextLayout("\t", False, ("user_id", "item_id", "rating", "timestamp")),
        _ml_ratings,
    ),
    ("movielens-100k", "items"): Adapter(
        "movielens-100k",
        "items",
        "csv",
        TextLayout("|", False, _ML100K_ITEM_COLS, "latin-1", quoted=False),
        _ml100k_items,
    ),
    ("movielens-100k", "users"): Adapter(
        "movielens-100k",
        "users",
        "csv",
        TextLayout("|", False, ("user_id", "age", "gender", "occupation", "zip")),
        _ml100k_users,
    ),
    ("movielens-1m", "events"): Adapter(
        "movielens-1m",
        "events",
        "csv",
        TextLayout("\x1f", False, ("user_id", "item_id", "rating", "timestamp")),
        _ml_ratings,
        separator="::",
    ),
    ("movielens-1m", "items"): Adapter(
        "movielens-1m",
        "items",
        "csv",
        TextLayout("\x1f", False, ("item_id", "title", "genres"), "latin-1", quoted=False),
        _ml_genre_items,
        separator="::",
    ),
    ("movielens-1m", "users"): Adapter(
        "movielens-1m",
        "users",
        "csv",
        TextLayout("\x1f", False, ("user_id", "gender", "age", "occupation", "zip")),
        _ml1m_users,
        separator="::",
    ),
    ("movielens", "events"): Adapter(
        "movielens",
        "events",
        "csv",
        TextLayout(",", True, ("user_id", "item_id", "rating", "timestamp")),
        _ml_ratings,
    ),
    ("movielens", "items"): Adapter(
        "movielens",
        "items",
        "csv",
        TextLayout(",", True, ("item_id", "title", "genres")),
        _ml_genre_items,
    ),
    ("retail", "events"): Adapter("retail", "events", "csv", TextLayout(), _retail_events),
    ("retail", "items"): Adapter("retail", "items", "csv", TextLayout(), _retail_items),
    ("taobao", "events"): Adapter(
        "taobao", "events", "csv", TextLayout(",", False, _TAOBAO_COLS), _taobao_events
    ),
    ("taobao", "items"): Adapter(
        "taobao", "items", "csv", TextLayout(",", False, _TAOBAO_COLS), _taobao_items
    ),
}
ADAPTER_NAMES = sorted({name for name, _ in ADAPTERS})

_KNOWN_FILES = {
    "u.data": "movielens-100k",
    "u.item": "movielens-100k",
    "u.user": "movielens-100k",
    "ratings.dat": "movielens-1m",
    "movies.dat": "movielens-1m",
    "users.dat": "movielens-1m",
    "ratings.csv": "movielens",
    "movies.csv": "movielens",
}


def guess_adapter(path: str) -> str | None:
    """The adapter a file's well-known name implies (u.data -> movielens-100k, ...), or None."""
    name = os.path.basename(path).lower()
    if name in _KNOWN_FILES:
        return _KNOWN_FILES[name]
    if name.startswith("userbehavior"):
        return "taobao"
    return None


def read_with_adapter(path: str, kind: str, adapter: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read `path` as `kind` with a named adapter: (raw contract-named rows, rejects)."""
    spec = ADAPTERS.get((adapter, kind))
    if spec is None:
        have = [k for a, k in ADAPTERS if a == adapter]
        raise RecsysError(
            f"adapter {adapter!r} has no {kind} mapping"
            + (f" (it maps: {', '.join(have)})" if have else f"; known: {', '.join(ADAPTER_NAMES)}")
        )
    if spec.separator:
        with _resplit(path, spec.separator, spec.layout.delimiter, spec.layout.encoding) as tmp:
            raw, rejects = read_raw(tmp, spec.fmt, spec.layout)
    else:
        raw, rejects = read_raw(path, spec.fmt, spec.layout)
    if raw.height == 0:
        return raw, rejects
    return spec.mapper(raw), rejects


@contextlib.contextmanager
def _resplit(path: str, sep: str, delimiter: str, encoding: str) -> Iterator[str]:
    """Multi-character separators rewritten to a one-character delimiter, in a temp copy."""
    from fsspec.core import url_to_fs

    fs, fpath = url_to_fs(path)
    with fs.open(fpath, "rb") as fh:
        data = fh.read()
    with tempfile.TemporaryDirectory(prefix="recsys-") as d:
        tmp = os.path.join(d, os.path.basename(fpath))
        with open(tmp, "wb") as out:
            out.write(data.replace(sep.encode(encoding), delimiter.encode(encoding)))
        yield tmp


def apply_mapping(raw: pl.DataFrame, mapping: dict[str, str]) -> pl.DataFrame:
    """Rename source columns to contract columns ({source: contract}); unknown sources fail."""
    missing = [src for src in mapping if src not in raw.columns]
    if missing:
        raise RecsysError(
            f"--map names columns the file does not have: {missing}; it has "
            f"{[c for c in raw.columns if c != '_row']}"
        )
    return raw.rename(mapping)


def read_source(
    path: str,
    kind: str,
    *,
    adapter: str | None = None,
    fmt: str | None = None,
    layout: TextLayout | None = None,
    mapping: dict[str, str] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read any supported file as `kind`: through an adapter when one is named (or implied by
    a well-known file name), else as a generic CSV/TSV/NDJSON/Parquet with a column mapping."""
    from fsspec.core import url_to_fs

    fs, fpath = url_to_fs(path)
    if not fs.exists(fpath):
        raise RecsysError(f"no such file: {path}")
    adapter = adapter or guess_adapter(path)
    if adapter and adapter != "generic":
        raw, rejects = read_with_adapter(path, kind, adapter)
    else:
        raw, rejects = read_raw(path, fmt or detect_format(path), layout)
    if mapping:
        raw = apply_mapping(raw, mapping)
    return raw, rejects


# --- Whole data sets, validated (for benchmarks, tests and notebooks) ---------------------------
def movielens_100k(folder: str, tenant: str = "default"):
    """MovieLens 100K as validated (events, items, users) frames of the data contract."""
    ev_raw, _ = read_with_adapter(os.path.join(folder, "u.data"), "events", "movielens-100k")
    events, _ = validate_events(ev_raw, tenant=tenant, source="u.data")
    it_raw, _ = read_with_adapter(os.path.join(folder, "u.item"), "items", "movielens-100k")
    items, _ = validate_items(it_raw, source="u.item")
    us_raw, _ = read_with_adapter(os.path.join(folder, "u.user"), "users", "movielens-100k")
    users, _ = validate_users(us_raw, source="u.user")
    return events, items, users


def taobao_userbehavior(path: str, tenant: str = "default"):
    """A Taobao UserBehavior CSV as validated (events, items) frames of the data contract."""
    ev_raw, _ = read_with_adapter(path, "events", "taobao")
    events, _ = validate_events(ev_raw, tenant=tenant, source=os.path.basename(path))
    it_raw, _ = read_with_adapter(path, "items", "taobao")
    items, _ = validate_items(it_raw, source=os.path.basename(path))
    return events, items


__all__ = [
    "ADAPTERS",
    "ADAPTER_NAMES",
    "Adapter",
    "apply_mapping",
    "detect_format",
    "guess_adapter",
    "movielens_100k",
    "read_source",
    "read_with_adapter",
    "rejects_frame",
    "taobao_userbehavior",
]

"""The demo storefront and merchandiser playground (`/demo`), served only in demo mode.

Demo mode is on when `ServingConfig.demo_tenants` (RECSYS_DEMO_TENANTS) names tenants; it is off
by default, and then every route here answers 404. In demo mode:

- `GET /demo` and its static files (`serving/demo/`: plain HTML and ES modules built from
  `web/src/` by `scripts/gen_client.sh`, nothing from a CDN) are public;
- `POST /demo/login` mints a short-lived HS256 token (`DEMO_TOKEN_TTL_S`) for one of the demo
  tenants, with the recommend scope or recommend + admin: never for a tenant outside
  `demo_tenants`, so no tenant can be reached that the operator did not name, and nothing at all
  is minted outside demo mode;
- `GET /demo/items` and `GET /demo/users` give the page what the API does not carry (titles,
  prices, tags; a few user ids to pick from), read from the caller's live snapshot (titles from
  its analyst copy `parquet/items.parquet`, when it was written).

Everything else the page does goes through the public API with the minted token.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import falcon
import msgspec
import orjson
from msgspec import Meta

from recsys.tenancy import TENANT_ID_PATTERN, TENANT_ID_RULE, is_valid_tenant
from serving.auth import SCOPE_ADMIN, SCOPE_RECOMMEND, mint_token
from serving.config import ServingConfig
from serving.crr.records import RecordStore
from serving.errors import ProblemError
from serving.snapshot import SnapshotRegistry

#: Lifetime of a demo token (seconds): long enough for a session, short enough to be harmless.
DEMO_TOKEN_TTL_S = 900
#: The page's files (flat under serving/demo/), each a public route of its own.
STATIC_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "demo")
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "openapi-fetch.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_CACHED_SNAPSHOTS = 2  # title tables kept per tenant (the live one and the one it replaced)


# --- bodies ---------------------------------------------------------------------------------
class DemoLogin(msgspec.Struct, forbid_unknown_fields=True):
    """Who the demo page acts as: one of the server's demo tenants, optionally as its admin."""

    tenant: Annotated[str, Meta(pattern=TENANT_ID_PATTERN, description=TENANT_ID_RULE)]
    admin: bool = False


class DemoToken(msgspec.Struct):
    token: str
    token_type: str
    tenant: str
    scopes: list[str]
    expires_in: int


class DemoInfo(msgspec.Struct):
    demo: bool
    tenants: list[str]


class DemoItem(msgspec.Struct, omit_defaults=True):
    item_id: str
    title: str | None = None
    category: str | None = None
    brand: str | None = None
    price: float | None = None
    tags: list[str] = []
    available: bool = True


class DemoItems(msgspec.Struct):
    snapshot_id: str
    items: list[DemoItem]
    unknown: list[str]


class DemoItemsQuery(msgspec.Struct, omit_defaults=True):
    ids: Annotated[str, Meta(max_length=20_000, description="comma-separated item ids")] | None = (
        None
    )
    limit: Annotated[int, Meta(ge=1, le=500)] = 24


class DemoUsers(msgspec.Struct):
    snapshot_id: str
    users: list[str]


class DemoUsersQuery(msgspec.Struct, omit_defaults=True):
    limit: Annotated[int, Meta(ge=1, le=200)] = 12


# --- resources ------------------------------------------------------------------------------
def _demo_off() -> ProblemError:
    return ProblemError(
        404,
        "The demo is off on this server (set RECSYS_DEMO_TENANTS to turn demo mode on).",
        code="RECSYS_DEMO_OFF",
    )


class DemoResources:
    """The page, its files, the development login and the catalogue lookups."""

    def __init__(self, config: ServingConfig, store: SnapshotRegistry) -> None:
        self._tenants = tuple(config.demo_tenants)
        for tenant in self._tenants:
            if not is_valid_tenant(tenant):
                raise ValueError(f"RECSYS_DEMO_TENANTS: {tenant!r} is not a tenant id")
        if self._tenants and not config.jwt_secret:
            raise ValueError("demo mode (RECSYS_DEMO_TENANTS) needs RECSYS_JWT_SECRET")
        self._secret = config.jwt_secret
        self._store = store
        # (the item pages read the one entity view: the live snapshot, already overlaid with
        # the rule fields of upserts, plus the fields of the items' records)
        self._records = RecordStore(config.data_root)
        self._titles_cache: dict[str, dict[str, str]] = {}
        self._files: dict[str, bytes] = {}

    def _file(self, name: str) -> bytes:
        if not self._tenants:
            raise _demo_off()
        data = self._files.get(name)
        if data is None:
            with open(os.path.join(STATIC_DIR, name), "rb") as f:
                data = self._files[name] = f.read()
        return data

    # GET /demo
    def on_get_page(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._file("index.html")
        resp.content_type = falcon.MEDIA_HTML
        resp.cache_control = ["no-cache"]

    def _send(self, resp: falcon.Response, name: str) -> None:
        resp.data = self._file(name)
        resp.content_type = STATIC_FILES[name]
        resp.cache_control = ["no-cache"]

    # GET /demo/app.js, /demo/api.js, /demo/openapi-fetch.js, /demo/style.css
    def on_get_app_js(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._send(resp, "app.js")

    def on_get_api_js(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._send(resp, "api.js")

    def on_get_fetch_js(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._send(resp, "openapi-fetch.js")

    def on_get_style(self, req: falcon.Request, resp: falcon.Response) -> None:
        self._send(resp, "style.css")

    # GET /demo/info
    def on_get_info(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._tenants:
            raise _demo_off()
        resp.data = orjson.dumps({"demo": True, "tenants": list(self._tenants)})
        resp.content_type = falcon.MEDIA_JSON

    # POST /demo/login
    def on_post_login(self, req: falcon.Request, resp: falcon.Response) -> None:
        if not self._tenants:
            raise _demo_off()
        body: DemoLogin = req.context.body
        if body.tenant not in self._tenants:
            raise ProblemError(
                403,
                f"The demo mints tokens only for its tenants ({', '.join(self._tenants)}).",
                code="RECSYS_DEMO_TENANT",
            )
        scopes = [SCOPE_RECOMMEND, SCOPE_ADMIN] if body.admin else [SCOPE_RECOMMEND]
        token = mint_token(
            self._secret,
            body.tenant,
            scopes,
            DEMO_TOKEN_TTL_S,
            subject=f"demo-{body.tenant}{'-admin' if body.admin else ''}",
        )
        resp.data = orjson.dumps(
            {
                "token": token,
                "token_type": "Bearer",
                "tenant": body.tenant,
                "scopes": scopes,
                "expires_in": DEMO_TOKEN_TTL_S,
            }
        )
        resp.content_type = falcon.MEDIA_JSON
        resp.cache_control = ["no-store"]

    # GET /demo/items
    def on_get_items(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = self._tenant(req)
        query: DemoItemsQuery = req.context.query
        live = self._store.require_live(tenant)
        snap = live.snap
        if query.ids:
            wanted = [i for i in dict.fromkeys(query.ids.split(",")) if i]
        else:
            wanted = snap.item_ids(list(range(min(query.limit, snap.n_items))))
        titles = self._titles(tenant, live.snapshot_id, snap.path)
        items, unknown = [], []
        for item_id in wanted:
            index = snap.item_index(item_id)
            if index is None:
                unknown.append(item_id)
            else:
                item = _describe(snap, index, item_id, titles.get(item_id))
                record = self._records.get(tenant, "items", item_id)
                if record is not None:
                    body = record["record"]
                    item.update({k: body[k] for k in _SHOWN if body.get(k) is not None})
                items.append(item)
        resp.data = orjson.dumps(
            {"snapshot_id": live.snapshot_id, "items": items, "unknown": unknown}
        )
        resp.content_type = falcon.MEDIA_JSON

    # GET /demo/users
    def on_get_users(self, req: falcon.Request, resp: falcon.Response) -> None:
        tenant = self._tenant(req)
        query: DemoUsersQuery = req.context.query
        live = self._store.require_live(tenant)
        users = [live.snap.user_id(u) for u in range(min(query.limit, live.snap.n_users))]
        resp.data = orjson.dumps({"snapshot_id": live.snapshot_id, "users": users})
        resp.content_type = falcon.MEDIA_JSON

    def _tenant(self, req: falcon.Request) -> str:
        tenant = req.context.principal.tenant
        if tenant not in self._tenants:
            raise _demo_off()
        return tenant

    def _titles(self, tenant: str, snapshot_id: str, path: str) -> dict[str, str]:
        """Item titles of a snapshot (its analyst copy `parquet/items.parquet`; none when the
        snapshot was written without it), read once per snapshot."""
        key = f"{tenant}/{snapshot_id}"
        found = self._titles_cache.get(key)
        if found is None:
            found = {}
            file = os.path.join(path, "parquet", "items.parquet")
            if os.path.exists(file):
                import polars as pl  # (only a demo server pays for the import)

                frame = pl.read_parquet(file, columns=["item_id", "title"])
                found = dict(frame.drop_nulls().iter_rows())
            stale = [k for k in self._titles_cache if k.startswith(f"{tenant}/")]
            for old in stale[: max(0, len(stale) - _CACHED_SNAPSHOTS + 1)]:
                del self._titles_cache[old]
            self._titles_cache[key] = found
        return found


#: The item fields the page shows (a record's values replace the snapshot's).
_SHOWN = ("title", "category", "brand", "price", "tags", "available")


def _describe(snap: Any, index: int, item_id: str, title: str | None) -> dict[str, Any]:
    """What the page shows of an item, from the snapshot's arrays (and its title)."""
    out: dict[str, Any] = {"item_id": item_id}
    if title is not None:
        out["title"] = title
    category = snap.category_name(int(snap.category_id[index]))
    brand = snap.brand_name(int(snap.brand_id[index]))
    if category is not None:
        out["category"] = category
    if brand is not None:
        out["brand"] = brand
    price = float(snap.price[index])
    if price == price:  # (NaN: unknown)
        out["price"] = round(price, 2)
    out["tags"] = [snap.tag_name(int(t)) for t in snap.item_tags(index)]
    out["available"] = bool(snap.available[index])
    return out


def dump_openapi(path: str) -> None:
    """Write the app's /openapi.json (from `create_app`, without a server) to `path`, with
    sorted keys, for the generated TypeScript client (`scripts/gen_client.sh`)."""
    import tempfile

    from falcon import testing

    from serving.app import create_app

    with tempfile.TemporaryDirectory() as root:
        config = ServingConfig(data_root=root, version="0.0.0-spec", access_log=False)
        result = testing.TestClient(create_app(config)).simulate_get("/openapi.json")
    if result.status_code != 200:
        raise RuntimeError(f"/openapi.json answered {result.status_code}: {result.text[:200]}")
    spec = orjson.loads(result.content)
    with open(path, "wb") as f:
        f.write(orjson.dumps(spec, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n")

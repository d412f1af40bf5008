"""Server configuration: one immutable object, read from the environment once.

Every setting has a documented default; `ServingConfig.from_env()` is the only place in the
serving package that reads `os.environ` (entry points call it; tests build the object directly).

| variable | default | meaning |
|---|---|---|
| RECSYS_DATA_ROOT | `data` | data root: snapshots in `snapshots/`, admin state in `serving/` |
| RECSYS_TENANTS | (all under `snapshots/`) | comma list of tenants to serve |
| RECSYS_JWT_SECRET | (unset) | HS256 shared secret for Bearer tokens |
| RECSYS_JWT_PUBLIC_KEY | (unset) | RS256 public key: PEM text, or a path to a PEM file |
| RECSYS_JWT_ISSUER / RECSYS_JWT_AUDIENCE | (unset) | checked when set |
| RECSYS_JWT_TENANT_CLAIMS | `tenant_id,org_id,tenant` | claims searched for the tenant |
| RECSYS_API_KEYS | (unset) | `key=tenant:scope+scope,key2=tenant2:recommend` |
| RECSYS_REDIS_URL | (unset) | rate limits shared across hosts (else by the host's workers) |
| RECSYS_RATE_LIMIT | `6000/60` | requests per window (seconds) per API key / token subject (GCRA) |
| RECSYS_TENANT_RATE_LIMIT | `60000/60` | requests per window per tenant (all keys together) |
| RECSYS_CORS_ORIGINS | (none) | comma list of allowed origins, or `*` |
| RECSYS_MAX_BODY_BYTES | `262144` | larger bodies get 413 |
| RECSYS_MAX_K | `200` | hard upper bound of `k` (tenant limits may only lower it) |
| RECSYS_MAX_LIST_IDS | `5000` | hard bound of `include_ids` / `exclude_ids` lengths |
| RECSYS_MAX_ANCHORS | `50` | hard bound of `anchors.item_ids` |
| RECSYS_MAX_TAGS | `64` | bound of required/forbidden tags and `max_per_tag` entries |
| RECSYS_DEADLINE_MS | `250` | per-request deadline; exceeded -> 504 |
| RECSYS_SNAPSHOT_CHECK_S | `1.0` | how often a worker stats CURRENT for a new snapshot |
| RECSYS_GZIP_MIN_BYTES | `1024` | smaller bodies are never compressed |
| RECSYS_ACCESS_LOG | `1` | JSON access log lines on the `recsys.access` logger |
| RECSYS_EVENTS_FLUSH_S | `30` | an older non-empty event-log segment is closed and landed |
| RECSYS_EVENTS_SEGMENT_BYTES | `67108864` | an event-log segment is landed at this size |
| RECSYS_EVENTS_LINGER_MS | `2` | longest a group commit waits for more requests (`0`: never) |
| RECSYS_DEMO_TENANTS | (none: off) | tenants `/demo` may mint short-lived tokens for |
| RECSYS_DAGSTER_URL | (unset: job routes 503) | a Dagster webserver, e.g. `http://127.0.0.1:3000` |
| RECSYS_MLFLOW_URI / MLFLOW_TRACKING_URI | `<data root>/mlflow/mlflow.db` | the MLflow store |
| RECSYS_PG_URL | (unset) | the deployment's PostgreSQL (Dagster's), checked by /v1/recs/health |
| RECSYS_SERVER_SECRET | (a 0600 file under the data root) | secret of the stored keys' HMAC |
| RECSYS_PROBLEM_BASE | `https://errors.recsys.example/problem/` | prefix of Problem `type` URIs |
| RECSYS_VERSION / RECSYS_GIT_SHA / RECSYS_BUILT_AT | package version / `unknown` | /version |
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata

from recsys.tenancy import TENANT_ID_RULE, describe, is_valid_tenant


@dataclass(frozen=True)
class ApiKey:
    """One static API key: the tenant it belongs to and the scopes it grants (`ValueError`
    when the tenant is not a valid tenant id: the server refuses to start)."""

    key: str
    tenant: str
    scopes: frozenset[str]

    def __post_init__(self) -> None:
        if not is_valid_tenant(self.tenant):
            raise ValueError(
                f"API key {self.key[:4]}...: tenant {describe(self.tenant)} is not a tenant id "
                f"({TENANT_ID_RULE})"
            )


@dataclass(frozen=True)
class RateLimitSpec:
    """`limit` requests per `window_s` seconds: up to `limit` at once, then one every
    `interval` seconds (`serving.ratelimit`)."""

    limit: int
    window_s: int
    interval: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        interval = self.window_s / self.limit if self.limit > 0 else math.inf
        object.__setattr__(self, "interval", interval)

    @classmethod
    def parse(cls, text: str) -> RateLimitSpec:
        count, _, window = text.partition("/")
        spec = cls(int(count), int(window or 60))
        if spec.limit < 1 or spec.window_s < 1:
            raise ValueError(f"rate limit {text!r} must be <positive count>/<positive seconds>")
        return spec


@dataclass(frozen=True)
class ServingConfig:
    """Everything the server needs to know; see the module docstring for the variables."""

    data_root: str = "data"
    tenants: tuple[str, ...] = ()
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_tenant_claims: tuple[str, ...] = ("tenant_id", "org_id", "tenant")
    api_keys: tuple[ApiKey, ...] = ()
    redis_url: str | None = None
    rate_limit: RateLimitSpec = field(default_factory=lambda: RateLimitSpec(6000, 60))
    tenant_rate_limit: RateLimitSpec = field(default_factory=lambda: RateLimitSpec(60000, 60))
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 262_144
    max_k: int = 200
    max_list_ids: int = 5000
    max_anchors: int = 50
    max_tags: int = 64
    deadline_ms: float = 250.0
    events_flush_s: float = 30.0
    events_segment_bytes: int = 64 * 1024 * 1024
    events_linger_ms: float = 2.0
    snapshot_check_s: float = 1.0
    gzip_min_bytes: int = 1024
    access_log: bool = True
    problem_base: str = "https://errors.recsys.example/problem/"
    demo_tenants: tuple[str, ...] = ()  # demo mode (serving.resources.demo) when non-empty
    dagster_url: str | None = None
    mlflow_uri: str | None = None  # None: recsys.storage.Storage(data_root).mlflow_uri()
    server_secret: str | None = None
    postgres_url: str | None = None  # RECSYS_PG_URL (SQLAlchemy or libpq URL)
    version: str = field(default_factory=lambda: _package_version())
    git_sha: str = "unknown"
    built_at: str = "unknown"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServingConfig:
        """Build the config from environment variables (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        d = cls()

        def get(name: str, default: str | None = None) -> str | None:
            value = env.get(name)
            return value if value not in (None, "") else default

        public_key = get("RECSYS_JWT_PUBLIC_KEY")
        if public_key and "BEGIN" not in public_key and os.path.isfile(public_key):
            with open(public_key, encoding="utf-8") as f:
                public_key = f.read()
        return cls(
            data_root=get("RECSYS_DATA_ROOT", d.data_root),
            tenants=_tenants(get("RECSYS_TENANTS", "")),
            jwt_secret=get("RECSYS_JWT_SECRET"),
            jwt_public_key=public_key,
            jwt_issuer=get("RECSYS_JWT_ISSUER"),
            jwt_audience=get("RECSYS_JWT_AUDIENCE"),
            jwt_tenant_claims=_csv(get("RECSYS_JWT_TENANT_CLAIMS", ",".join(d.jwt_tenant_claims))),
            api_keys=parse_api_keys(get("RECSYS_API_KEYS", "")),
            redis_url=get("RECSYS_REDIS_URL"),
            rate_limit=RateLimitSpec.parse(get("RECSYS_RATE_LIMIT", "6000/60")),
            tenant_rate_limit=RateLimitSpec.parse(get("RECSYS_TENANT_RATE_LIMIT", "60000/60")),
            cors_origins=_csv(get("RECSYS_CORS_ORIGINS", "")),
            max_body_bytes=int(get("RECSYS_MAX_BODY_BYTES", str(d.max_body_bytes))),
            max_k=int(get("RECSYS_MAX_K", str(d.max_k))),
            max_list_ids=int(get("RECSYS_MAX_LIST_IDS", str(d.max_list_ids))),
            max_anchors=int(get("RECSYS_MAX_ANCHORS", str(d.max_anchors))),
            max_tags=int(get("RECSYS_MAX_TAGS", str(d.max_tags))),
            deadline_ms=float(get("RECSYS_DEADLINE_MS", str(d.deadline_ms))),
            events_flush_s=float(get("RECSYS_EVENTS_FLUSH_S", str(d.events_flush_s))),
            events_segment_bytes=int(
                get("RECSYS_EVENTS_SEGMENT_BYTES", str(d.events_segment_bytes))
            ),
            events_linger_ms=float(get("RECSYS_EVENTS_LINGER_MS", str(d.events_linger_ms))),
            snapshot_check_s=float(get("RECSYS_SNAPSHOT_CHECK_S", str(d.snapshot_check_s))),
            gzip_min_bytes=int(get("RECSYS_GZIP_MIN_BYTES", str(d.gzip_min_bytes))),
            access_log=get("RECSYS_ACCESS_LOG", "1").lower() not in ("0", "false", "no", "off"),
            problem_base=get("RECSYS_PROBLEM_BASE", d.problem_base),
            demo_tenants=_csv(get("RECSYS_DEMO_TENANTS", "")),
            dagster_url=get("RECSYS_DAGSTER_URL"),
            mlflow_uri=get("RECSYS_MLFLOW_URI", get("MLFLOW_TRACKING_URI")),
            server_secret=get("RECSYS_SERVER_SECRET"),
            postgres_url=get("RECSYS_PG_URL"),
            version=get("RECSYS_VERSION", d.version),
            git_sha=get("RECSYS_GIT_SHA", d.git_sha),
            built_at=get("RECSYS_BUILT_AT", d.built_at),
        )


def parse_api_keys(text: str) -> tuple[ApiKey, ...]:
    """Parse ``key=tenant:scope+scope,...`` (scopes default to ``recommend``); `ValueError`
    for an entry that is malformed or names an invalid tenant id."""
    keys = []
    for entry in _csv(text):
        key, sep, rest = entry.partition("=")
        tenant, _, scopes = rest.partition(":")
        if not sep or not key or not tenant:
            raise ValueError(
                f"bad RECSYS_API_KEYS entry {entry[:4]!r}...; expected key=tenant:scopes"
            )
        scope_set = frozenset(s for s in (scopes or "recommend").split("+") if s)
        try:
            keys.append(ApiKey(key=key, tenant=tenant, scopes=scope_set))
        except ValueError as e:
            raise ValueError(f"RECSYS_API_KEYS: {e}") from None
    return tuple(keys)


def _tenants(text: str | None) -> tuple[str, ...]:
    tenants = _csv(text)
    for t in tenants:
        if not is_valid_tenant(t):
            raise ValueError(f"RECSYS_TENANTS: {describe(t)} is not a tenant id ({TENANT_ID_RULE})")
    return tenants


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def _package_version() -> str:
    try:
        return metadata.version("recsys")
    except metadata.PackageNotFoundError:
        return "0.0.0"

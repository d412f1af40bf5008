"""Who is calling: Bearer JWTs (HS256 secret or RS256 public key), static API keys
(``RECSYS_API_KEYS``) and stored keys (``rsk_...``, made by ``POST /v1/recs/keys``).

A verified caller becomes a `Principal` (tenant, scopes, rate-limit key). Everything a request
touches is scoped to `Principal.tenant`; no resource reads a tenant from the request body. A
token whose tenant claim is not a valid tenant id (`recsys.tenancy`) is refused (401), and
API keys are checked when the configuration is built, so `Principal.tenant` is always one.
"""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jwt

from recsys.tenancy import TENANT_ID_RULE, is_valid_tenant
from serving.config import ServingConfig
from serving.errors import ProblemError

SCOPE_RECOMMEND = "recommend"
SCOPE_ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller."""

    tenant: str
    scopes: frozenset[str]
    subject: str  # rate-limit key: "jwt:<sub>" or "key:<first 8 chars>"
    #: The rate-limit counter keys of the credential and of the tenant (computed once: a
    #: verified token's Principal is cached).
    limit_keys: tuple[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        keys = (f"k:{self.tenant}:{self.subject}", f"t:{self.tenant}")
        object.__setattr__(self, "limit_keys", keys)

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes or (scope == SCOPE_RECOMMEND and SCOPE_ADMIN in self.scopes)


def _unauthorized(detail: str) -> ProblemError:
    return ProblemError(
        401,
        detail,
        code="RECSYS_UNAUTHORIZED",
        headers={"WWW-Authenticate": 'Bearer realm="recsys"'},
    )


class Authenticator:
    """Verifies credentials; caches verified tokens briefly (verification is the costly part)."""

    def __init__(self, config: ServingConfig, cache_size: int = 4096) -> None:
        self._tenant_claims = config.jwt_tenant_claims
        self._issuer = config.jwt_issuer
        self._audience = config.jwt_audience
        self._keys: list[tuple[Any, str]] = []
        if config.jwt_secret:
            self._keys.append((config.jwt_secret, "HS256"))
        if config.jwt_public_key:
            self._keys.append((config.jwt_public_key, "RS256"))
        self._api_keys = {k.key: k for k in config.api_keys}
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._cache_size = cache_size
        # keys made through POST /v1/recs/keys (`serving.control.access`): looked up by their
        # keyed hash in a map every worker rebuilds when a key is added or revoked
        from serving.control.access import KeyRing, server_secret

        self._stored = KeyRing(config.data_root, lambda: server_secret(config))

    @property
    def enabled(self) -> bool:
        return bool(self._keys or self._api_keys)

    def authenticate(self, authorization: str | None, api_key: str | None) -> Principal:
        """The caller of a request with these `Authorization` / `X-Api-Key` headers, or 401."""
        if api_key:
            return self._from_api_key(api_key)
        # (verified bearer tokens are cached by the whole header value, which names the token)
        cached = self._cache.get(authorization) if authorization else None
        now = time.time()
        if cached is not None and cached[1] > now:
            return cached[0]
        if not authorization:
            raise _unauthorized("Missing credentials: send 'Authorization: Bearer <token>'.")
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() == "apikey" and token:
            return self._from_api_key(token)
        if scheme.lower() != "bearer" or not token:
            raise _unauthorized("The Authorization header must be 'Bearer <token>'.")
        principal, expires = self._verify(token)
        self._cache[authorization] = (principal, min(expires, now + 300.0))
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return principal

    def _from_api_key(self, presented: str) -> Principal:
        for key, entry in self._api_keys.items():
            if hmac.compare_digest(key.encode(), presented.encode()):
                return Principal(entry.tenant, entry.scopes, "key:" + key[:8])
        if presented.startswith("rsk_"):
            stored = self._stored.find(presented)
            if stored is not None:
                if stored.expires_at is not None and time.time() >= stored.expires_at:
                    raise _unauthorized("The API key has expired.")
                self._stored.touch(stored)
                return stored.principal
        raise _unauthorized("Unknown API key.")

    def _verify(self, token: str) -> tuple[Principal, float]:
        if not self._keys:
            raise _unauthorized("Bearer tokens are not accepted: no JWT key is configured.")
        options = {"require": ["exp"]}
        last_error: Exception | None = None
        claims = None
        try:
            header_alg = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as e:
            raise _unauthorized(f"Malformed token: {e}") from None
        for key, alg in self._keys:
            if alg != header_alg:
                continue
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self._issuer,
                    options=options,
                    leeway=5,
                )
                break
            except jwt.PyJWTError as e:
                last_error = e
        if claims is None:
            reason = str(last_error) if last_error else f"algorithm {header_alg!r} not accepted"
            raise _unauthorized(f"Invalid token: {reason}")
        name = next((c for c in self._tenant_claims if claims.get(c)), None)
        if name is None:  # (an empty claim carries no tenant either)
            raise ProblemError(403, "The token carries no tenant claim.", code="RECSYS_NO_TENANT")
        tenant = claims[name]
        if not is_valid_tenant(tenant):  # never let a hostile id near a path
            raise _unauthorized(
                f"Invalid token: its {name!r} claim is not a tenant id ({TENANT_ID_RULE})."
            )
        scopes = claims.get("scope", claims.get("scp", ""))
        scope_set = frozenset(scopes.split() if isinstance(scopes, str) else scopes)
        subject = "jwt:" + str(claims.get("sub") or tenant)
        return Principal(tenant, scope_set, subject), float(claims["exp"])


def mint_token(
    secret: str,
    tenant: str,
    scopes: list[str] | tuple[str, ...] = (SCOPE_RECOMMEND,),
    ttl_s: int = 3600,
    subject: str | None = None,
    algorithm: str = "HS256",
) -> str:
    """A development token for `tenant` with `scopes` (HS256 secret or RS256 private key)."""
    now = int(time.time())
    claims = {
        "sub": subject or f"dev-{tenant}",
        "tenant_id": tenant,
        "scope": " ".join(scopes),
        "iat": now,
        "exp": now + int(ttl_s),
    }
    return jwt.encode(claims, secret, algorithm=algorithm)

"""The MLflow model registry as the control plane reads and changes it (no store of its own).

A model of the API is an MLflow registered model, its id the registered name: the pipeline's
``recsys-<tenant>`` and the models a tenant registers through the API, named
``recsys-<tenant>~<name>`` ('~' is in no tenant id, so one tenant's names never reach into
another's). A model belongs to the tenant of its ``tenant`` tag and name; any other is unknown
to the caller (404), whatever MLflow holds.

What the API shows of a model or version lives in MLflow itself, so the MLflow UI shows it too:

* metadata (type, framework, input / output schema, free metadata): tags ``recsys.*`` (JSON);
* a version's status: its aliases (``champion`` = deployed in prod, ``canary``, ``staging``) and
  the tag ``recsys.archived``; its last deployment: the tags ``deploy.*`` (see
  `serving.control.models`).

Every call goes through `Registry.call`, which turns MLflow's failures into Problem Details:
a missing object is None to the caller, a tracking server that does not answer (or a store that
cannot be read) is 503 naming MLflow. For an http(s) tracking URI, `/health` is asked first with
a short timeout, so a server that is down answers in about a second instead of after MLflow's
retries (minutes).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from serving.errors import ProblemError
from serving.routing import encodable

T = TypeVar("T")

CHAMPION = "champion"  # recsys.tracking.CHAMPION_ALIAS (not imported: it pulls polars in)
ALIAS_STATUS = {CHAMPION: "deployed", "canary": "canary", "staging": "staging"}
ARCHIVED_TAG = "recsys.archived"
META_TAGS = ("type", "framework", "input_schema", "output_schema", "metadata")
#: MLflow keeps at most this many characters of a tag value (5000 in MLflow 3).
MAX_TAG_CHARS = 5000


def pipeline_model(tenant: str) -> str:
    """The registered model the pipeline writes for `tenant` (`recsys.tracking`)."""
    return f"recsys-{tenant}"


def api_model_name(tenant: str, name: str) -> str:
    """The registered name of a model `name` a tenant registers through the API."""
    return f"recsys-{tenant}~{name}"


def owns(tenant: str, name: str, tags: dict[str, str]) -> bool:
    """Whether registered model `name` (with `tags`) belongs to `tenant`."""
    in_namespace = name == pipeline_model(tenant) or name.startswith(f"recsys-{tenant}~")
    return in_namespace and tags.get("tenant") == tenant


def mlflow_unavailable(detail: str) -> ProblemError:
    return ProblemError(
        503,
        f"MLflow (the model registry) is unavailable: {detail}",
        code="RECSYS_MLFLOW_UNAVAILABLE",
        headers={"Retry-After": "5"},
        extra={"dependency": "mlflow"},
    )


class Registry:
    """An MLflow tracking + registry client for one URI, with its failures as Problem Details."""

    def __init__(self, uri: str, health_timeout_s: float = 1.5, health_ttl_s: float = 2.0):
        self.uri = uri
        self._timeout = health_timeout_s
        self._ttl = health_ttl_s
        self._client: Any = None
        self._healthy_at = -1e18
        self._lock = threading.Lock()

    # --- the client -------------------------------------------------------------------------
    def client(self) -> Any:
        """The MlflowClient (created once), after a health check of an http(s) server."""
        if self.uri.startswith(("http://", "https://")):
            self._check_health()
        with self._lock:
            if self._client is None:
                import os

                from mlflow import MlflowClient

                if self.uri.startswith("sqlite:///"):
                    os.makedirs(os.path.dirname(self.uri[len("sqlite:///") :]), exist_ok=True)
                self._client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            return self._client

    def _check_health(self) -> None:
        if time.monotonic() - self._healthy_at < self._ttl:
            return
        import urllib.error
        import urllib.request

        url = self.uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=self._timeout) as resp:  # noqa: S310
                status = resp.status
        except urllib.error.HTTPError as ex:
            status = ex.code
        except (OSError, ValueError) as ex:
            raise mlflow_unavailable(f"{self.uri} does not answer ({type(ex).__name__}).") from None
        if status != 200:
            raise mlflow_unavailable(f"{url} answered {status}.")
        self._healthy_at = time.monotonic()

    @contextmanager
    def errors(self) -> Iterator[None]:
        """MLflow's failures as Problem Details: 503 for an unreachable or unreadable store,
        409 for a name that exists, 422 for a value MLflow refuses."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except ProblemError:
            raise
        except MlflowException as ex:
            code = getattr(ex, "error_code", "")
            if code == "RESOURCE_ALREADY_EXISTS":
                raise ProblemError(409, ex.message, code="RECSYS_MODEL_EXISTS") from None
            if code == "INVALID_PARAMETER_VALUE":
                raise ProblemError(422, ex.message, code="RECSYS_UNPROCESSABLE") from None
            raise mlflow_unavailable(f"{code or type(ex).__name__}: {ex.message[:300]}") from None
        except (OSError, ConnectionError) as ex:
            raise mlflow_unavailable(f"{type(ex).__name__}: {ex}") from None
        except Exception as ex:  # requests' and SQLAlchemy's errors: the store did not answer
            module = type(ex).__module__.split(".")[0]
            if module in ("requests", "urllib3", "sqlalchemy", "httpx"):
                raise mlflow_unavailable(f"{type(ex).__name__}: {str(ex)[:300]}") from None
            raise

    def call(self, fn: Callable[[Any], T]) -> T:
        """`fn(client)` with MLflow's failures translated (see `errors`)."""
        with self.errors():
            return fn(self.client())

    def find(self, fn: Callable[[Any], T]) -> T | None:
        """`call`, but None when MLflow says the object does not exist."""
        from mlflow.exceptions import MlflowException

        with self.errors():
            client = self.client()
            try:
                return fn(client)
            except MlflowException as ex:
                if getattr(ex, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                    return None
                raise

    # --- models -----------------------------------------------------------------------------
    def models(self, tenant: str) -> list[Any]:
        """The tenant's registered models, by name."""

        def search(client: Any) -> list[Any]:
            out, token = [], None
            while True:
                page = client.search_registered_models(
                    filter_string=f"tags.tenant = '{tenant}'", max_results=1000, page_token=token
                )
                out.extend(m for m in page if owns(tenant, m.name, m.tags))
                token = page.token
                if not token:
                    return sorted(out, key=lambda m: m.name)

        return self.call(search)

    def model(self, tenant: str, name: str) -> Any:
        """The tenant's registered model `name`, or 404."""
        found = self.find(lambda c: c.get_registered_model(name))
        if found is None or not owns(tenant, found.name, found.tags):
            raise ProblemError(404, f"No model '{name}'.", code="RECSYS_UNKNOWN_MODEL")
        return found

    def versions(self, model: Any) -> list[Any]:
        """Every version of registered model `model`, newest first, with their aliases (a
        search of versions leaves them out)."""
        name = model.name

        def search(client: Any) -> list[Any]:
            out, token = [], None
            while True:
                page = client.search_model_versions(
                    f"name = '{name}'", max_results=1000, page_token=token
                )
                out.extend(page)
                token = page.token
                if not token:
                    return sorted(out, key=lambda v: -int(v.version))

        found = self.call(search)
        for v in found:
            v.aliases = aliases_of(model, v.version)
        return found

    def version(self, tenant: str, name: str, version: str) -> Any:
        """Version `version` of the tenant's model `name` (with its aliases), or 404."""
        model = self.model(tenant, name)
        if not version.isdigit():
            raise ProblemError(404, f"No version '{version}' of model '{name}'.", code=_NO_VERSION)
        found = self.find(lambda c: c.get_model_version(name, version))
        if found is None:
            raise ProblemError(404, f"No version '{version}' of model '{name}'.", code=_NO_VERSION)
        found.aliases = aliases_of(model, found.version)
        return found

    def alias_version(self, name: str, alias: str) -> Any | None:
        """The version holding `alias` (None when no version does)."""
        model = self.call(lambda c: c.get_registered_model(name))
        number = (model.aliases or {}).get(alias)
        if number is None:
            return None
        found = self.find(lambda c: c.get_model_version(name, str(number)))
        if found is not None:
            found.aliases = aliases_of(model, found.version)
        return found


def aliases_of(model: Any, version: Any) -> list[str]:
    """The aliases of `model` that name `version`."""
    return sorted(a for a, n in (model.aliases or {}).items() if str(n) == str(version))


_NO_VERSION = "RECSYS_UNKNOWN_MODEL_VERSION"


def version_status(version: Any) -> str:
    """deployed / canary / staging (aliases, in that order), archived (tag), else registered."""
    aliases = set(version.aliases or ())
    for alias, status in ALIAS_STATUS.items():
        if alias in aliases:
            return status
    if (version.tags or {}).get(ARCHIVED_TAG) == "true":
        return "archived"
    return "registered"


def tag_json(tags: dict[str, str], key: str) -> Any:
    """A JSON tag's value (None when absent)."""
    raw = tags.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def dump_tag(value: Any, field: str) -> str:
    """A value as a JSON tag; 422 when it is longer than MLflow keeps, or holds what the API's
    JSON cannot answer with (`encodable`: stored, it would fail every later read)."""
    if not encodable(value):
        raise ProblemError(
            422, f"Field '{field}' holds an integer beyond 64 bits or nests too deep."
        )
    text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_TAG_CHARS:
        raise ProblemError(
            422,
            f"Field '{field}' is {len(text)} characters as JSON; MLflow keeps at most "
            f"{MAX_TAG_CHARS}.",
        )
    return text

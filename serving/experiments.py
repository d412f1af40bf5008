"""A/B experiments over snapshot variants or model versions: the durable store, deterministic
assignment, the hook `/v1/recommend` calls, and results with Wilson intervals and z-tests.

Storage: one JSON document per experiment at
``<data root>/serving/experiments/<tenant>/<experiment id>.json`` (temporary file, fsync,
`os.replace`, fsync of the folder), written under an `flock` of the tenant folder so a
read-check-write is atomic across gunicorn workers. Every write gets a new `version`, sent as
the ETag; a write with a stale `If-Match` is refused (409), as for the admin config.

Assignment: a user (or anonymous/session id) is placed by `serving.rules.assign_variant`, a
blake2b hash of ``"<experiment id>:<unit>"`` over the variants' traffic shares, unless the user
was force-assigned (`assignments`). At most one experiment per surface is `running` at a time.

Attribution (how `results` counts): see `compute_results`.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import math
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import orjson
import polars as pl

from recsys.durable import fsync_dir, write_atomic
from serving.errors import ProblemError, bad_request, unprocessable
from serving.rules import assign_variant

STATUSES = ("draft", "running", "paused", "stopped")
METRICS = ("ctr", "conversion")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_FIELDS = frozenset(
    {
        "id",
        "name",
        "surface",
        "status",
        "variants",
        "metrics",
        "primary_metric",
        "alpha",
        "start",
        "end",
        "description",
    }
)
_VARIANT_FIELDS = frozenset({"id", "name", "snapshot", "model", "traffic", "weight"})
MAX_VARIANTS = 10
MAX_FORCED = 10_000


class ExperimentConflict(Exception):
    """If-Match did not name the stored version (`current` is the stored one, or None)."""

    def __init__(self, current: str | None) -> None:
        super().__init__(current)
        self.current = current


# --- validation ----------------------------------------------------------------------------------
def _parse_time(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"Field '{field}' must be an ISO-8601 date-time string or null.")
    try:
        t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise bad_request(f"Field '{field}' is not an ISO-8601 date-time: {value!r}.") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def validate_experiment(body: Any) -> dict[str, Any]:
    """The user-settable part of an experiment, normalised; raises 400/422 Problems.

    Variants: ``{"id", "traffic", "snapshot" | "model"}`` (``name`` / ``weight`` are accepted
    as the admin config's spellings). ``snapshot`` is ``current`` or a snapshot id; ``model``
    is ``<name>@<version>`` as reported in ``meta.algo_version`` and resolves to the newest
    published snapshot built from that model.
    """
    if not isinstance(body, dict):
        raise bad_request("An experiment is a JSON object.")
    unknown = set(body) - _FIELDS - {"version", "assignments", "created_at", "updated_at"}
    if unknown:
        raise bad_request(f"Unknown field(s): {', '.join(sorted(unknown))}.")
    out: dict[str, Any] = {}
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 256):
        raise bad_request("Field 'name' must be a string of 1..256 characters.")
    out["name"] = name
    desc = body.get("description")
    if desc is not None and (not isinstance(desc, str) or len(desc) > 4096):
        raise bad_request("Field 'description' must be a string of at most 4096 characters.")
    out["description"] = desc
    surface = body.get("surface", "home")
    if not isinstance(surface, str) or not 0 < len(surface) <= 256:
        raise bad_request("Field 'surface' must be a non-empty string.")
    out["surface"] = surface
    status = body.get("status", "draft")
    if status not in STATUSES:
        raise bad_request(f"Field 'status' must be one of {', '.join(STATUSES)}.")
    out["status"] = status
    variants = body.get("variants")
    if not isinstance(variants, list) or not 2 <= len(variants) <= MAX_VARIANTS:
        raise bad_request(f"Field 'variants' must be an array of 2..{MAX_VARIANTS} variants.")
    seen: set[str] = set()
    norm = []
    for i, v in enumerate(variants):
        where = f"variants[{i}]"
        if not isinstance(v, dict) or set(v) - _VARIANT_FIELDS:
            raise bad_request(f"{where} must be an object of {', '.join(sorted(_VARIANT_FIELDS))}.")
        vid = v.get("id", v.get("name"))
        if not isinstance(vid, str) or not _ID.match(vid):
            raise bad_request(f"{where}.id must match {_ID.pattern}.")
        if vid in seen:
            raise unprocessable(f"Variant id '{vid}' is used twice.")
        seen.add(vid)
        traffic = v.get("traffic", v.get("weight", 1))
        if isinstance(traffic, bool) or not isinstance(traffic, int | float) or traffic <= 0:
            raise unprocessable(f"{where}.traffic must be a positive number (a share).")
        snapshot, model = v.get("snapshot"), v.get("model")
        if snapshot is not None and model is not None:
            raise unprocessable(f"{where} names both a snapshot and a model; pick one.")
        for key, value in (("snapshot", snapshot), ("model", model)):
            if value is not None and (not isinstance(value, str) or not value):
                raise bad_request(f"{where}.{key} must be a non-empty string.")
        if model is not None and "@" not in model:
            raise unprocessable(f"{where}.model must be <name>@<version> (see meta.algo_version).")
        entry: dict[str, Any] = {"id": vid, "traffic": float(traffic)}
        if model is not None:
            entry["model"] = model
        else:
            entry["snapshot"] = snapshot or "current"
        norm.append(entry)
    out["variants"] = norm
    metrics = body.get("metrics", list(METRICS))
    if not isinstance(metrics, list) or not metrics or any(m not in METRICS for m in metrics):
        raise bad_request(f"Field 'metrics' must be a non-empty subset of {', '.join(METRICS)}.")
    out["metrics"] = list(dict.fromkeys(metrics))
    primary = body.get("primary_metric", out["metrics"][-1])
    if primary not in out["metrics"]:
        raise unprocessable("Field 'primary_metric' must be one of 'metrics'.")
    out["primary_metric"] = primary
    alpha = body.get("alpha", 0.05)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 0.5:
        raise unprocessable("Field 'alpha' must be a number in (0, 0.5).")
    out["alpha"] = float(alpha)
    out["start"] = _parse_time(body.get("start"), "start")
    out["end"] = _parse_time(body.get("end"), "end")
    if out["start"] and out["end"] and out["end"] <= out["start"]:
        raise unprocessable("Field 'end' must be after 'start'.")
    return out


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """RFC 7396 JSON merge patch (null deletes a member; objects merge; the rest replaces)."""
    out = dict(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_patch(out[key], value)
        else:
            out[key] = value
    return out


def is_live(exp: dict[str, Any], now: dt.datetime | None = None) -> bool:
    """Running and inside its [start, end) window."""
    if exp.get("status") != "running":
        return False
    stamp = (now or dt.datetime.now(dt.UTC)).isoformat().replace("+00:00", "Z")
    if exp.get("start") and stamp < exp["start"]:
        return False
    return not (exp.get("end") and stamp >= exp["end"])


# --- the durable store ---------------------------------------------------------------------------
class ExperimentStore:
    """Experiments of every tenant under ``<root>/<tenant>/<id>.json`` (root =
    ``<data root>/serving/experiments``), with a per-tenant cache the hot path reads."""

    def __init__(self, root: str, registry=None, check_interval_s: float = 1.0) -> None:
        self.root = root
        self._registry = registry
        self._interval = check_interval_s
        self._lock = threading.Lock()
        # tenant -> (checked at, folder signature, {id: doc})
        self._cache: dict[str, tuple[float, tuple, dict[str, dict[str, Any]]]] = {}
        self._models: dict[tuple[str, str], tuple[str | None, str | None]] = {}

    # -- files
    def _dir(self, tenant: str) -> str:
        return os.path.join(self.root, tenant)

    def _path(self, tenant: str, exp_id: str) -> str:
        return os.path.join(self._dir(tenant), f"{exp_id}.json")

    def read(self, tenant: str, exp_id: str) -> dict[str, Any] | None:
        if not _ID.match(exp_id):
            return None
        try:
            with open(self._path(tenant, exp_id), "rb") as f:
                return orjson.loads(f.read())
        except FileNotFoundError:
            return None

    def list(self, tenant: str) -> list[dict[str, Any]]:
        return sorted(self._docs(tenant).values(), key=lambda d: (d["created_at"], d["id"]))

    def _docs(self, tenant: str) -> dict[str, dict[str, Any]]:
        """All documents of a tenant, re-read when the folder changed (checked per interval)."""
        now = time.monotonic()
        entry = self._cache.get(tenant)
        if entry is not None and now - entry[0] < self._interval:
            return entry[2]
        d = self._dir(tenant)
        try:
            st = os.stat(d)
            sig = (st.st_ino, st.st_mtime_ns)
        except FileNotFoundError:
            sig = ()
        if entry is not None and entry[1] == sig:
            self._cache[tenant] = (now, sig, entry[2])
            return entry[2]
        docs: dict[str, dict[str, Any]] = {}
        if sig:
            for name in os.listdir(d):
                if name.endswith(".json") and not name.startswith("."):
                    doc = self.read(tenant, name[:-5])
                    if doc is not None:
                        docs[doc["id"]] = doc
        self._cache[tenant] = (now, sig, docs)
        return docs

    def _write(self, tenant: str, doc: dict[str, Any]) -> None:
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
        write_atomic(self._path(tenant, doc["id"]), data)
        self._cache.pop(tenant, None)

    def _locked(self, tenant: str):
        os.makedirs(self._dir(tenant), exist_ok=True)
        return _FolderLock(os.path.join(self._dir(tenant), ".lock"), self._lock)

    # -- use cases
    def create(self, tenant: str, body: Any) -> dict[str, Any]:
        spec = validate_experiment(body)
        exp_id = body.get("id") if isinstance(body, dict) else None
        if exp_id is not None and (not isinstance(exp_id, str) or not _ID.match(exp_id)):
            raise bad_request(f"Field 'id' must match {_ID.pattern}.")
        exp_id = exp_id or f"exp-{uuid.uuid4().hex[:12]}"
        with self._locked(tenant):
            if self.read(tenant, exp_id) is not None:
                raise ProblemError(
                    409,
                    f"Experiment '{exp_id}' exists; PATCH it or choose another id.",
                    code="RECSYS_EXPERIMENT_EXISTS",
                )
            self._check_surface(tenant, exp_id, spec)
            now = _now()
            doc = {
                "id": exp_id,
                **spec,
                "assignments": {},
                "created_at": now,
                "updated_at": now,
                "version": _version(),
            }
            self._write(tenant, doc)
        return doc

    def update(self, tenant: str, exp_id: str, patch: Any, if_match: str | None) -> dict[str, Any]:
        if not isinstance(patch, dict):
            raise bad_request("A PATCH body is a JSON merge patch (an object).")
        if "id" in patch and patch["id"] != exp_id:
            raise unprocessable("The id of an experiment cannot change.")
        with self._locked(tenant):
            current = self._existing(tenant, exp_id, if_match)
            user_part = {k: v for k, v in current.items() if k in _FIELDS and k != "id"}
            spec = validate_experiment(merge_patch(user_part, patch))
            if spec["variants"] != current["variants"]:
                ids = {v["id"] for v in spec["variants"]}
                forced = {u: v for u, v in current["assignments"].items() if v in ids}
            else:
                forced = current["assignments"]
            self._check_surface(tenant, exp_id, spec)
            doc = {
                **current,
                **spec,
                "assignments": forced,
                "updated_at": _now(),
                "version": _version(),
            }
            self._write(tenant, doc)
        return doc

    def delete(self, tenant: str, exp_id: str, if_match: str | None) -> None:
        with self._locked(tenant):
            self._existing(tenant, exp_id, if_match)
            os.unlink(self._path(tenant, exp_id))
            fsync_dir(self._dir(tenant))
            self._cache.pop(tenant, None)

    def force_assign(
        self, tenant: str, exp_id: str, unit: str, variant: str | None, if_match: str | None
    ) -> dict[str, Any]:
        """Pin `unit` to `variant` (None: back to the hashed assignment)."""
        with self._locked(tenant):
            current = self._existing(tenant, exp_id, if_match)
            forced = dict(current["assignments"])
            if variant is None:
                forced.pop(unit, None)
            else:
                if variant not in {v["id"] for v in current["variants"]}:
                    raise unprocessable(
                        f"Experiment '{exp_id}' has no variant '{variant}'.",
                        code="RECSYS_UNKNOWN_VARIANT",
                    )
                if unit not in forced and len(forced) >= MAX_FORCED:
                    raise unprocessable(
                        f"At most {MAX_FORCED} forced assignments per experiment (debugging aid)."
                    )
                forced[unit] = variant
            doc = {**current, "assignments": forced, "updated_at": _now(), "version": _version()}
            self._write(tenant, doc)
        return doc

    def _existing(self, tenant: str, exp_id: str, if_match: str | None) -> dict[str, Any]:
        current = self.read(tenant, exp_id)
        if current is None:
            raise ProblemError(404, f"No experiment '{exp_id}'.", code="RECSYS_UNKNOWN_EXPERIMENT")
        if if_match not in (None, "*") and if_match != current["version"]:
            raise ExperimentConflict(current["version"])
        return current

    def _check_surface(self, tenant: str, exp_id: str, spec: dict[str, Any]) -> None:
        if spec["status"] != "running":
            return
        for other in self._docs_uncached(tenant):
            if (
                other["id"] != exp_id
                and other["status"] == "running"
                and other["surface"] == spec["surface"]
            ):
                raise ProblemError(
                    409,
                    f"Experiment '{other['id']}' is already running on surface "
                    f"'{spec['surface']}'; pause or stop it first.",
                    code="RECSYS_EXPERIMENT_CONFLICT",
                )

    def _docs_uncached(self, tenant: str) -> list[dict[str, Any]]:
        self._cache.pop(tenant, None)
        return list(self._docs(tenant).values())

    # -- assignment (the /v1/recommend hook)
    def assign(self, tenant: str, exp: dict[str, Any], unit: str) -> tuple[dict[str, Any], bool]:
        """(variant, forced?) of `unit` in `exp`."""
        forced = exp["assignments"].get(unit)
        if forced is not None:
            return next(v for v in exp["variants"] if v["id"] == forced), True
        weighted = [{**v, "weight": v["traffic"]} for v in exp["variants"]]
        return assign_variant(exp["id"], unit, weighted), False

    def pick(self, tenant: str, surface: str, unit: str) -> tuple[str, dict[str, Any], bool] | None:
        """The running experiment of `surface` for `unit`: (experiment id, variant in the
        service's shape ``{"name", "weight", "snapshot"}``, hashed (True) or forced), or None."""
        for exp in self._docs(tenant).values():
            if exp["surface"] == surface and is_live(exp):
                return self.resolve(tenant, exp["id"], unit)
        return None

    def resolve(
        self, tenant: str, exp_id: str, unit: str, variant_id: str | None = None
    ) -> tuple[str, dict[str, Any], bool] | None:
        """Like `pick` for a named experiment (and optionally a named variant); None when the
        tenant has no such experiment (or variant)."""
        exp = self._docs(tenant).get(exp_id)
        if exp is None:
            return None
        if variant_id is not None:
            variant = next((v for v in exp["variants"] if v["id"] == variant_id), None)
            if variant is None:
                return None
            assigned = False
        else:
            variant, forced = self.assign(tenant, exp, unit)
            assigned = not forced
        return exp_id, self.service_variant(tenant, variant), assigned

    def service_variant(self, tenant: str, variant: dict[str, Any]) -> dict[str, Any]:
        snapshot = variant.get("snapshot", "current")
        if "model" in variant:
            snapshot = self.snapshot_of_model(tenant, variant["model"])
            if snapshot is None:
                raise ProblemError(
                    503,
                    f"No published snapshot of model '{variant['model']}' (variant "
                    f"'{variant['id']}').",
                    code="RECSYS_NO_SNAPSHOT",
                )
        return {"name": variant["id"], "weight": variant["traffic"], "snapshot": snapshot}

    def snapshot_of_model(self, tenant: str, model: str) -> str | None:
        """The newest published snapshot whose champion is `model` (``name@version``);
        cached until the tenant's current snapshot changes."""
        holder = self._registry.tenant(tenant) if self._registry is not None else None
        if holder is None:
            return None
        current = holder.store.current_id()
        cached = self._models.get((tenant, model))
        if cached is not None and cached[0] == current:
            return cached[1]
        found = None
        for info in holder.store.list():  # newest first
            try:
                with open(
                    os.path.join(holder.store.path_of(info.snapshot_id), "manifest.json"), "rb"
                ) as f:
                    manifest = orjson.loads(f.read())
            except (OSError, orjson.JSONDecodeError):
                continue
            champ = (manifest.get("models") or {}).get("champion") or {}
            if f"{champ.get('name')}@{champ.get('version')}" == model:
                found = info.snapshot_id
                break
        self._models[(tenant, model)] = (current, found)
        return found


class _FolderLock:
    def __init__(self, path: str, mutex: threading.Lock) -> None:
        self._path = path
        self._mutex = mutex

    def __enter__(self):
        self._mutex.acquire()
        self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._mutex.release()


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _version() -> str:
    return f"exp_{time.time_ns():x}_{uuid.uuid4().hex[:6]}"


# --- statistics ----------------------------------------------------------------------------------
def wilson_interval(successes: int, trials: int, alpha: float) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion at confidence 1 - alpha."""
    if trials <= 0:
        return None
    z = NormalDist().inv_cdf(1 - alpha / 2)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def two_proportion_z(x1: int, n1: int, x2: int, n2: int) -> tuple[float, float] | None:
    """(z, two-sided p) of H0: p1 == p2 with the pooled standard error; None when undefined
    (an empty arm, or no variance: both rates 0 or both 1)."""
    if n1 <= 0 or n2 <= 0:
        return None
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return None
    z = (x2 / n2 - x1 / n1) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass
class _Arm:
    users: int = 0
    impressions: int = 0
    clicks: int = 0
    purchases: int = 0
    converters: int = 0
    purchase_value: float = 0.0


def attributed_events(events: pl.LazyFrame, exp: dict[str, Any]) -> tuple[pl.DataFrame, dict]:
    """Events of `exp` with the variant they count for, and counters of what was left out.

    Attribution:
    1. An event whose context names the experiment (``{"experiment": {"id", "variant"}}`` as
       echoed in ``meta.experiment`` of /v1/recommend, or flat ``experiment_id`` + ``variant``)
       counts for that variant. A variant the experiment does not have is `unknown_variant`.
    2. A user is *exposed* to a variant by an impression attributed to it. Users exposed to more
       than one variant (a forced re-assignment, changed traffic shares) are dropped entirely
       (`mixed_users`).
    3. A click or purchase without experiment context counts for the variant its user was
       exposed to, when it happened at or after the user's first exposure (last-touch is not
       needed: an exposed user has exactly one variant).
    Only impression, click and purchase events inside the experiment's [start, end) window
    count; tagged clicks and purchases of users not exposed to that variant are ignored
    (`not_exposed`).
    """
    ctx = pl.col("context")
    lf = events.filter(pl.col("event_type").is_in(["impression", "click", "purchase"]))
    if exp.get("start"):
        lf = lf.filter(pl.col("timestamp") >= _ts(exp["start"]))
    if exp.get("end"):
        lf = lf.filter(pl.col("timestamp") < _ts(exp["end"]))
    df = lf.with_columns(
        pl.coalesce(
            ctx.str.json_path_match("$.experiment.id"), ctx.str.json_path_match("$.experiment_id")
        ).alias("_exp"),
        pl.coalesce(
            ctx.str.json_path_match("$.experiment.variant"), ctx.str.json_path_match("$.variant")
        ).alias("_var"),
    ).collect()
    ids = [v["id"] for v in exp["variants"]]
    mine = df.filter(pl.col("_exp") == exp["id"])
    unknown = mine.filter(~pl.col("_var").is_in(ids)).height
    tagged = mine.filter(pl.col("_var").is_in(ids))
    exposure = (
        tagged.filter(pl.col("event_type") == "impression")
        .group_by("user_id")
        .agg(
            pl.col("_var").n_unique().alias("_n"),
            pl.col("_var").first().alias("_exposed"),
            pl.col("timestamp").min().alias("_first"),
        )
    )
    mixed = exposure.filter(pl.col("_n") > 1)["user_id"]
    exposure = exposure.filter(pl.col("_n") == 1).drop("_n")
    untagged = df.filter(pl.col("_exp").is_null() & (pl.col("event_type") != "impression"))
    inferred = (
        untagged.join(exposure, on="user_id", how="inner")
        .filter(pl.col("timestamp") >= pl.col("_first"))
        .with_columns(pl.col("_exposed").alias("_var"))
    )
    cols = ["event_id", "user_id", "event_type", "value", "_var"]
    counted = pl.concat([tagged.select(cols), inferred.select(cols)])
    exposed_counted = counted.join(
        exposure.select("user_id", "_exposed"), on="user_id", how="inner"
    ).filter(pl.col("_var") == pl.col("_exposed"))
    left_out = {
        "unknown_variant": unknown,
        "mixed_users": mixed.len(),
        "not_exposed": counted.height
        - exposed_counted.height
        - counted.filter(pl.col("user_id").is_in(mixed.to_list())).height,
    }
    return exposed_counted.drop("_exposed"), left_out


def compute_results(
    events: pl.LazyFrame, exp: dict[str, Any], alpha: float | None = None
) -> dict[str, Any]:
    """Per variant: exposed users, impressions, clicks, purchases; CTR = clicks / impressions
    and conversion = users with a purchase / exposed users, each with a Wilson interval at
    1 - alpha. Pairwise two-proportion z-tests per metric; the `winner` is the variant with the
    best primary-metric rate when it beats every other variant with p < alpha / (k - 1)
    (Bonferroni over its k - 1 comparisons); otherwise null."""
    alpha = exp["alpha"] if alpha is None else alpha
    counted, left_out = attributed_events(events, exp)
    arms = {v["id"]: _Arm() for v in exp["variants"]}
    if counted.height:
        per_var = counted.group_by("_var").agg(
            pl.col("user_id").n_unique().alias("users"),
            (pl.col("event_type") == "impression").sum().alias("impressions"),
            (pl.col("event_type") == "click").sum().alias("clicks"),
            (pl.col("event_type") == "purchase").sum().alias("purchases"),
            pl.col("user_id")
            .filter(pl.col("event_type") == "purchase")
            .n_unique()
            .alias("converters"),
            pl.col("value")
            .filter(pl.col("event_type") == "purchase")
            .fill_null(0)
            .sum()
            .alias("purchase_value"),
        )
        for row in per_var.iter_rows(named=True):
            arm = arms[row["_var"]]
            arm.users, arm.impressions = row["users"], row["impressions"]
            arm.clicks, arm.purchases = row["clicks"], row["purchases"]
            arm.converters, arm.purchase_value = row["converters"], float(row["purchase_value"])

    def proportions(arm: _Arm) -> dict[str, tuple[int, int]]:
        return {
            "ctr": (min(arm.clicks, arm.impressions), arm.impressions),
            "conversion": (arm.converters, arm.users),
        }

    variants = []
    for vid, arm in arms.items():
        entry: dict[str, Any] = {
            "id": vid,
            "users": arm.users,
            "impressions": arm.impressions,
            "clicks": arm.clicks,
            "purchases": arm.purchases,
            "converters": arm.converters,
            "purchase_value": round(arm.purchase_value, 6),
        }
        for metric, (x, n) in proportions(arm).items():
            ci = wilson_interval(x, n, alpha)
            entry[metric] = {
                "successes": x,
                "trials": n,
                "rate": round(x / n, 6) if n else None,
                "ci_low": round(ci[0], 6) if ci else None,
                "ci_high": round(ci[1], 6) if ci else None,
            }
        variants.append(entry)
    comparisons = []
    ids = list(arms)
    for metric in exp["metrics"]:
        for i in range(len(ids)):
            for j in range(i + 1, len(ids)):
                x1, n1 = proportions(arms[ids[i]])[metric]
                x2, n2 = proportions(arms[ids[j]])[metric]
                test = two_proportion_z(x1, n1, x2, n2)
                comparisons.append(
                    {
                        "metric": metric,
                        "a": ids[i],
                        "b": ids[j],
                        "difference": round(x2 / n2 - x1 / n1, 6) if n1 and n2 else None,
                        "z": round(test[0], 6) if test else None,
                        "p_value": test[1] if test else None,
                    }
                )
    primary = exp["primary_metric"]
    threshold = alpha / (len(ids) - 1)
    for c in comparisons:
        c["significant"] = c["p_value"] is not None and c["p_value"] < threshold
    winner = None
    rated = [(v[primary]["rate"], v["id"]) for v in variants if v[primary]["rate"] is not None]
    if len(rated) == len(ids):
        best = max(rated)[1]
        mine = [c for c in comparisons if c["metric"] == primary and best in (c["a"], c["b"])]
        if all(c["significant"] for c in mine):
            winner = {
                "variant": best,
                "metric": primary,
                "p_value": max(c["p_value"] for c in mine),
            }
    return {
        "experiment_id": exp["id"],
        "status": exp["status"],
        "alpha": alpha,
        "corrected_alpha": threshold,
        "primary_metric": primary,
        "variants": variants,
        "comparisons": comparisons,
        "winner": winner,
        "left_out": left_out,
        "computed_at": _now(),
    }


def _ts(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))

"""A/B experiments over snapshot variants or model versions: the durable store, deterministic
assignment, the hook `/v1/recommend` calls, and results with Wilson intervals and z-tests.

Storage: one document per experiment in the document store (`serving.documents`), at
``<data root>/serving/experiments/<tenant>/<experiment id>.json``. Every write gets a new
revision (the experiment's `version`, sent as the ETag); a write with a stale `If-Match` is
refused (409), as for the admin config.

Assignment: a user (or anonymous/session id) is placed by `serving.rules.assign_variant`, a
blake2b hash of ``"<experiment id>:<unit>"`` over the variants' traffic shares, unless the user
was force-assigned (`assignments`). When a bandit names the experiment
(`serving.bandit_routing`), the bandit's policy places the unit instead (forced assignments
still win). At most one experiment per surface is `running` at a time.

Attribution (how `results` counts): see `compute_results`.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import uuid
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import orjson
import polars as pl

from serving.documents import NONE, Collection, Document, Legacy, Preconditions, now_iso
from serving.errors import ProblemError, bad_request, unprocessable
from serving.recs.schemas import ExperimentSpec
from serving.routing import check
from serving.rules import assign_variant

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
MAX_FORCED = 10_000


# --- validation ----------------------------------------------------------------------------------
def _utc(t: dt.datetime | None) -> str | None:
    return None if t is None else t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def validate_experiment(body: Any) -> dict[str, Any]:
    """The user-settable part of an experiment, normalised. `body` is an `ExperimentSpec`
    (`serving.recs.schemas`), or plain JSON values checked against it (400 naming the field);
    then what the schema cannot state (422): a variant id used twice, a variant naming both a
    snapshot and a model, a primary metric not among `metrics`, an end not after the start.

    Variants: ``{"id", "traffic", "snapshot" | "model"}`` (``name`` / ``weight`` are accepted
    as the admin config's spellings). ``snapshot`` is ``current`` or a snapshot id; ``model``
    is ``<name>@<version>`` as reported in ``meta.algo_version`` and resolves to the newest
    published snapshot built from that model.
    """
    spec = body if type(body) is ExperimentSpec else check(body, ExperimentSpec, "body")
    out: dict[str, Any] = {
        "name": spec.name,
        "description": spec.description,
        "surface": spec.surface,
        "status": spec.status,
    }
    seen: set[str] = set()
    norm = []
    for i, v in enumerate(spec.variants):
        vid = v.id if v.id is not None else v.name
        if vid is None:
            raise unprocessable(f"variants[{i}] needs an id (or its spelling 'name').")
        if vid in seen:
            raise unprocessable(f"Variant id '{vid}' is used twice.")
        seen.add(vid)
        if v.snapshot is not None and v.model is not None:
            raise unprocessable(f"variants[{i}] names both a snapshot and a model; pick one.")
        traffic = v.traffic if v.traffic is not None else v.weight
        entry: dict[str, Any] = {"id": vid, "traffic": float(traffic or 1.0)}
        if v.model is not None:
            entry["model"] = v.model
        else:
            entry["snapshot"] = v.snapshot or "current"
        norm.append(entry)
    out["variants"] = norm
    out["metrics"] = list(dict.fromkeys(spec.metrics))
    primary = spec.primary_metric or out["metrics"][-1]
    if primary not in out["metrics"]:
        raise unprocessable("Field 'primary_metric' must be one of 'metrics'.")
    out["primary_metric"] = primary
    out["alpha"] = float(spec.alpha)
    out["start"], out["end"] = _utc(spec.start), _utc(spec.end)
    if spec.start and spec.end and spec.end <= spec.start:
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
def _legacy_experiment(raw: dict[str, Any]) -> tuple[str, dict[str, Any], str | None, str | None]:
    """An experiment file before the document store: one flat object with its `version`."""
    body = {k: v for k, v in raw.items() if k not in ("id", "version", "created_at", "updated_at")}
    return raw["version"], body, raw.get("created_at"), raw.get("updated_at")


def _flat(doc: Document) -> dict[str, Any]:
    """An experiment as the API and the assignment read it: its body with its id, times and
    revision (`version`, the ETag)."""
    return {
        "id": doc.id,
        **doc.body,
        "created_at": doc.created_at,
        "updated_at": doc.updated_at,
        "version": doc.revision,
    }


class ExperimentStore:
    """Experiments of every tenant, one document each (`serving.documents`) under
    ``<root>/<tenant>/<id>.json`` (root = ``<data root>/serving/experiments``), with a
    per-tenant cache the hot path reads."""

    def __init__(self, root: str, registry=None, check_interval_s: float = 1.0) -> None:
        self.root = root
        self._registry = registry
        self.documents = Collection(
            root,
            "experiment",
            folder="{tenant}",
            prefix="exp",
            exists_code="RECSYS_EXPERIMENT_EXISTS",
            missing_code="RECSYS_UNKNOWN_EXPERIMENT",
            legacy=Legacy(_legacy_experiment),
            check_interval_s=check_interval_s,
        )
        # tenant -> (the collection's cached {id: Document}, {id: flat experiment} of it)
        self._flat: dict[str, tuple[dict[str, Document], dict[str, dict[str, Any]]]] = {}
        self._models: dict[tuple[str, str], tuple[str | None, str | None]] = {}
        #: The bandits' router (`serving.bandit_routing.BanditRouter`), set by the bandits
        #: area; None: assignment is the hash's.
        self.bandits = None

    def read(self, tenant: str, exp_id: str) -> dict[str, Any] | None:
        doc = self.documents.get(tenant, exp_id)
        return _flat(doc) if doc is not None else None

    def list(self, tenant: str) -> list[dict[str, Any]]:
        return sorted(self._docs(tenant).values(), key=lambda d: (d["created_at"], d["id"]))

    def _docs(self, tenant: str) -> dict[str, dict[str, Any]]:
        """All experiments of a tenant, re-read when the folder changed (checked per interval)."""
        docs = self.documents.cached_list(tenant)
        memo = self._flat.get(tenant)
        if memo is None or memo[0] is not docs:
            memo = (docs, {i: _flat(d) for i, d in docs.items()})
            self._flat[tenant] = memo
        return memo[1]

    # -- use cases
    def create(self, tenant: str, body: Any) -> dict[str, Any]:
        spec = validate_experiment(body)
        exp_id = (body.id if type(body) is ExperimentSpec else body.get("id")) or (
            f"exp-{uuid.uuid4().hex[:12]}"
        )

        def new(_: None) -> dict[str, Any]:
            self._check_surface(tenant, exp_id, spec)
            return {**spec, "assignments": {}}

        return _flat(self.documents.create(tenant, exp_id, new))

    def update(
        self, tenant: str, exp_id: str, patch: Any, pre: Preconditions = NONE
    ) -> dict[str, Any]:
        if not isinstance(patch, dict):
            raise bad_request("A PATCH body is a JSON merge patch (an object).")
        if "id" in patch and patch["id"] != exp_id:
            raise unprocessable("The id of an experiment cannot change.")

        def change(current: Document) -> dict[str, Any]:
            user_part = {k: v for k, v in current.body.items() if k in _FIELDS}
            spec = validate_experiment(merge_patch(user_part, patch))
            forced = current.body["assignments"]
            if spec["variants"] != current.body["variants"]:
                ids = {v["id"] for v in spec["variants"]}
                forced = {u: v for u, v in forced.items() if v in ids}
            self._check_surface(tenant, exp_id, spec)
            return {**current.body, **spec, "assignments": forced}

        return _flat(self.documents.patch(tenant, exp_id, change, pre))

    def delete(self, tenant: str, exp_id: str, pre: Preconditions = NONE) -> None:
        self.documents.delete(tenant, exp_id, pre)

    def force_assign(
        self, tenant: str, exp_id: str, unit: str, variant: str | None, pre: Preconditions = NONE
    ) -> dict[str, Any]:
        """Pin `unit` to `variant` (None: back to the hashed assignment)."""

        def change(current: Document) -> dict[str, Any]:
            forced = dict(current.body["assignments"])
            if variant is None:
                forced.pop(unit, None)
            else:
                if variant not in {v["id"] for v in current.body["variants"]}:
                    raise unprocessable(
                        f"Experiment '{exp_id}' has no variant '{variant}'.",
                        code="RECSYS_UNKNOWN_VARIANT",
                    )
                if unit not in forced and len(forced) >= MAX_FORCED:
                    raise unprocessable(
                        f"At most {MAX_FORCED} forced assignments per experiment (debugging aid)."
                    )
                forced[unit] = variant
            return {**current.body, "assignments": forced}

        return _flat(self.documents.patch(tenant, exp_id, change, pre))

    def _check_surface(self, tenant: str, exp_id: str, spec: dict[str, Any]) -> None:
        """At most one running experiment per surface (read from disk: called under the lock)."""
        if spec["status"] != "running":
            return
        for other in self.documents.list(tenant):
            if (
                other.id != exp_id
                and other.body["status"] == "running"
                and other.body["surface"] == spec["surface"]
            ):
                raise ProblemError(
                    409,
                    f"Experiment '{other.id}' is already running on surface "
                    f"'{spec['surface']}'; pause or stop it first.",
                    code="RECSYS_EXPERIMENT_CONFLICT",
                )

    # -- assignment (the /v1/recommend hook)
    def assign(self, tenant: str, exp: dict[str, Any], unit: str) -> tuple[dict[str, Any], bool]:
        """(variant, forced?) of `unit` in `exp`: forced, else the arm of the bandit that routes
        the experiment (the variant then carries ``"bandit": <bandit id>``), else hashed."""
        forced = exp["assignments"].get(unit)
        if forced is not None:
            return next(v for v in exp["variants"] if v["id"] == forced), True
        if self.bandits is not None:
            bandit = self.bandits.for_experiment(tenant, exp["id"])
            if bandit is not None:
                ids = {v["id"] for v in exp["variants"]}
                arm = self.bandits.choose(tenant, bandit, unit, ids)
                if arm is not None:
                    chosen = next(v for v in exp["variants"] if v["id"] == arm)
                    return {**chosen, "bandit": bandit.id}, False
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
        out = {"name": variant["id"], "weight": variant["traffic"], "snapshot": snapshot}
        if "bandit" in variant:
            out["bandit"] = variant["bandit"]
        return out

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


def window_events(events: pl.LazyFrame, exp: dict[str, Any]) -> pl.DataFrame:
    """The impressions, clicks and purchases inside the experiment's window, with the
    experiment (`_exp`), variant (`_var`) and request id (`_req`) their context names."""
    ctx = pl.col("context")
    lf = events.filter(pl.col("event_type").is_in(["impression", "click", "purchase"]))
    if exp.get("start"):
        lf = lf.filter(pl.col("timestamp") >= _ts(exp["start"]))
    if exp.get("end"):
        lf = lf.filter(pl.col("timestamp") < _ts(exp["end"]))
    return lf.with_columns(
        pl.coalesce(
            ctx.str.json_path_match("$.experiment.id"), ctx.str.json_path_match("$.experiment_id")
        ).alias("_exp"),
        pl.coalesce(
            ctx.str.json_path_match("$.experiment.variant"), ctx.str.json_path_match("$.variant")
        ).alias("_var"),
        ctx.str.json_path_match("$.request_id").alias("_req"),
    ).collect()


def attributed_events(df: pl.DataFrame, exp: dict[str, Any]) -> tuple[pl.DataFrame, dict]:
    """Events of `exp` (`df`: `window_events`) with the variant they count for, and counters
    of what was left out.

    Attribution:
    1. An event whose context names the experiment (``{"experiment": {"id", "variant"}}`` as
       echoed in ``meta.experiment`` of /v1/recommend, or flat ``experiment_id`` + ``variant``)
       counts for that variant. A variant the experiment does not have is `unknown_variant`.
    2. A user is *exposed* to a variant by an impression attributed to it. Users exposed to more
       than one variant (a forced re-assignment, changed traffic shares, a bandit whose choice
       for the unit changed with its counts) are dropped entirely (`mixed_users`).
    3. A click or purchase without experiment context counts for the variant its user was
       exposed to, when it happened at or after the user's first exposure (last-touch is not
       needed: an exposed user has exactly one variant).
    Only impression, click and purchase events inside the experiment's [start, end) window
    count; tagged clicks and purchases of users not exposed to that variant are ignored
    (`not_exposed`).
    """
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


BUCKETS = {"hour": "1h", "day": "1d"}


def allocation(df: pl.DataFrame, exp: dict[str, Any], bucket: str = "day") -> dict[str, Any]:
    """How the traffic was split over time (`df`: `window_events`): per UTC `bucket` (hour or
    day) and variant, the impressions tagged with the experiment and that variant, the requests
    they came from (``context.request_id``; an impression without one counts alone) and the
    units (distinct users) they reached. Every tagged impression of a known variant in the
    window counts, also those of users the results leave out as mixed (a bandit moves units
    between arms)."""
    ids = [v["id"] for v in exp["variants"]]
    shown = df.filter(
        (pl.col("event_type") == "impression")
        & (pl.col("_exp") == exp["id"])
        & pl.col("_var").is_in(ids)
    )
    series: list[dict[str, Any]] = []
    if shown.height:
        per = (
            shown.with_columns(
                pl.col("timestamp").dt.truncate(BUCKETS[bucket]).alias("_b"),
                pl.coalesce("_req", pl.lit("event:") + pl.col("event_id")).alias("_r"),
            )
            .group_by("_b", "_var")
            .agg(
                pl.len().alias("impressions"),
                pl.col("_r").n_unique().alias("requests"),
                pl.col("user_id").n_unique().alias("units"),
            )
            .sort("_b", "_var")
        )
        by_bucket: dict[Any, dict[str, Any]] = {}
        for b, var, n_imp, n_req, n_units in per.iter_rows():
            by_bucket.setdefault(b, {})[var] = {
                "impressions": n_imp,
                "requests": n_req,
                "units": n_units,
            }
        series = [{"start": _utc(b), "variants": by_bucket[b]} for b in sorted(by_bucket)]
    return {"bucket": bucket, "series": series}


def compute_results(
    events: pl.LazyFrame, exp: dict[str, Any], alpha: float | None = None, bucket: str = "day"
) -> dict[str, Any]:
    """Per variant: exposed users, impressions, clicks, purchases; CTR = clicks / impressions
    and conversion = users with a purchase / exposed users, each with a Wilson interval at
    1 - alpha. Pairwise two-proportion z-tests per metric; the `winner` is the variant with the
    best primary-metric rate when it beats every other variant with p < alpha / (k - 1)
    (Bonferroni over its k - 1 comparisons); otherwise null. `allocation`: the traffic each
    variant got per hour or day (`allocation`)."""
    alpha = exp["alpha"] if alpha is None else alpha
    window = window_events(events, exp)
    counted, left_out = attributed_events(window, exp)
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
        "allocation": allocation(window, exp, bucket),
        "computed_at": now_iso(),
    }


def _ts(iso: str) -> dt.datetime:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00"))

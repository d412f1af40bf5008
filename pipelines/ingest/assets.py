"""The ingest assets: validated tables built from the landing zone of every tenant."""

import dagster as dg
import polars as pl

from pipelines.resources import IngestPolicy, StorageResource
from recsys import ingest
from recsys.storage import Storage
from serving.documents import declared_event_types

GROUP = "ingest"


class IngestConfig(dg.Config):
    """Run options of the events ingest."""

    full_refresh: bool = False  # rebuild the warehouse from every landing file
    tenants: list[str] = []  # default: every tenant with a landing folder


def _preview(df: pl.DataFrame, n: int = 5) -> dg.MetadataValue:
    with pl.Config(
        tbl_formatting="MARKDOWN",
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
        fmt_str_lengths=40,
        tbl_width_chars=400,
    ):
        return dg.MetadataValue.md(str(df.head(n)))


def _tenants(storage: Storage, wanted: list[str]) -> list[str]:
    found = ingest.tenants_with_landing(storage)
    return [t for t in (wanted or found)]


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "events",
            group_name=GROUP,
            kinds={"parquet", "polars"},
            description="Validated, deduplicated interaction events, one folder a day, "
            "per tenant (warehouse/<tenant>/events/date=YYYY-MM-DD).",
        ),
        dg.AssetSpec(
            "rejected_events",
            group_name=GROUP,
            kinds={"parquet"},
            description="Every event row that failed validation, with its reason.",
        ),
    ],
)
def events_and_rejects(
    context: dg.AssetExecutionContext,
    config: IngestConfig,
    storage: StorageResource,
    policy: IngestPolicy,
):
    """Validate the pending landing event files of every tenant into the warehouse."""
    store = storage.storage()
    tenants = _tenants(store, config.tenants)
    reports = []
    for tenant in tenants:
        report = ingest.ingest_events(
            store,
            tenant,
            full_refresh=config.full_refresh,
            extra_event_types=declared_event_types(store, tenant),
        )
        context.log.info(
            f"{tenant}: {len(report.files)} files, {report.rows_read:,} rows read, "
            f"{report.rows_new:,} new, {report.duplicates:,} duplicates, {report.rejected:,} "
            f"rejected in {report.seconds:.1f}s"
        )
        _log_deferred(context, tenant, report.deferred)
        reports.append(report)
    total = {t: ingest.scan_events(store, t).select(pl.len()).collect().item() for t in tenants}
    preview = ingest.scan_events(store, tenants[0]).head(5).collect() if tenants else pl.DataFrame()
    rejected_total = {
        t: ingest.scan_rejected(store, t).select(pl.len()).collect().item() for t in tenants
    }
    by_reason: dict[str, int] = {}
    for r in reports:
        for k, v in r.rejected_by_reason.items():
            by_reason[k] = by_reason.get(k, 0) + v
    ranges = {r.tenant: (r.min_timestamp, r.max_timestamp) for r in reports}  # (kept by the run)
    yield dg.MaterializeResult(
        asset_key="events",
        metadata={
            "tenants": tenants,
            "files_ingested": sum(len(r.files) - len(r.deferred) for r in reports),
            "files_deferred": sum(len(r.deferred) for r in reports),
            "rows_read": sum(r.rows_read for r in reports),
            "rows_new": sum(r.rows_new for r in reports),
            "duplicates_dropped": sum(r.duplicates for r in reports),
            "dagster/row_count": sum(total.values()),
            "rows_per_tenant": total,
            "days_written": sum(len(r.days_written) for r in reports),
            "time_range": {t: {"min": lo, "max": hi} for t, (lo, hi) in ranges.items()},
            "seconds": round(sum(r.seconds for r in reports), 2),
            "path": store.path("warehouse", "<tenant>", "events"),
            "preview": _preview(preview),
        },
    )
    rej_preview = (
        ingest.scan_rejected(store, tenants[0]).head(5).collect() if tenants else pl.DataFrame()
    )
    yield dg.MaterializeResult(
        asset_key="rejected_events",
        metadata={
            "rejected_this_run": sum(r.rejected for r in reports),
            "rejected_by_reason": by_reason,
            "reject_rate_this_run": round(
                sum(r.rejected for r in reports) / max(1, sum(r.rows_read for r in reports)), 5
            ),
            "dagster/row_count": sum(rejected_total.values()),
            "path": store.path("warehouse", "<tenant>", "rejected_events"),
            "preview": _preview(rej_preview.drop("raw", strict=False)),
        },
    )


def _log_deferred(context: dg.AssetExecutionContext, tenant: str, deferred: list[str]) -> None:
    if deferred:
        context.log.warning(
            f"{tenant}: {len(deferred)} landing files cannot be read yet and changed less than "
            f"{ingest.LANDING_SETTLE_S:.0f} s ago (still being copied?): left for a later run: "
            f"{', '.join(deferred[:5])}"
        )


def _table_asset(kind: str, description: str):
    @dg.asset(name=kind, group_name=GROUP, kinds={"parquet", "polars"}, description=description)
    def _asset(
        context: dg.AssetExecutionContext, config: IngestConfig, storage: StorageResource
    ) -> dg.MaterializeResult:
        store = storage.storage()
        rows, rejected, reasons, preview = {}, 0, {}, pl.DataFrame()
        files_read = {}
        for tenant in _tenants(store, config.tenants):
            table, report = ingest.build_table(store, tenant, kind, rebuild=config.full_refresh)
            rows[tenant] = report.rows
            read = "since the last build" if report.incremental else "every file"
            files_read[tenant] = f"{report.files_folded} ({read})"
            rejected += report.rejected
            for k, v in report.rejected_by_reason.items():
                reasons[k] = reasons.get(k, 0) + v
            if preview.height == 0:
                preview = table.head(5)
            _log_deferred(context, tenant, report.deferred)
            context.log.info(
                f"{tenant}: {report.rows:,} {kind}, {report.rejected:,} rejected; "
                f"{report.files_folded:,} landing files folded ({read})"
            )
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": sum(rows.values()),
                "rows_per_tenant": rows,
                "rejected": rejected,
                "rejected_by_reason": reasons,
                "landing_files_read": files_read,
                "path": store.path("warehouse", "<tenant>", f"{kind}.parquet"),
                "preview": _preview(preview),
            }
        )

    return _asset


items = _table_asset(
    "items",
    "The item catalog per tenant: latest row of every item_id across "
    "the landing files, validated (warehouse/<tenant>/items.parquet).",
)
users = _table_asset(
    "users",
    "User profiles per tenant (optional): segment, country, attributes "
    "(warehouse/<tenant>/users.parquet).",
)

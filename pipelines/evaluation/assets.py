"""Evaluation assets: the offline table of every model, and the champion gate + registry."""

import os

import dagster as dg

from pipelines.evaluation.config import ChampionConfig, EvaluationConfig
from pipelines.resources import MlflowResource, StorageResource
from pipelines.training.assets import (
    MODEL_EVENT_COLUMNS,
    _md_table,
    load_hybrid,
    model_path,
    read_json,
    tenants,
    write_json,
)
from recsys import ingest, tracking
from recsys.evaluation.evaluate import format_table, plot_table
from recsys.evaluation.offline import evaluate_fitted
from recsys.models.data import temporal_split_scan

GROUP = "evaluation"


def _table_metadata(table) -> dg.MetadataValue:
    cols = [c for c in table.columns if c not in ("model",)]
    schema = dg.TableSchema(
        columns=[dg.TableColumn("model", "string")] + [dg.TableColumn(c, "float") for c in cols]
    )
    records = [
        dg.TableRecord({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
        for r in table.iter_rows(named=True)
    ]
    return dg.MetadataValue.table(records=records, schema=schema)


@dg.asset(group_name=GROUP, deps=["ranker_model"], kinds={"polars", "matplotlib"})
def model_evaluation(
    context: dg.AssetExecutionContext, config: EvaluationConfig, storage: StorageResource
) -> dg.MaterializeResult:
    """Scores of popularity, EASE, co-occurrence, LightFM and the served list on the test
    period (evaluation/<tenant>/evaluation.csv + .png), with bootstrap CIs.

    The events are never held: the split is cut on a streamed scan and the held-out pairs
    are folded from it (`temporal_split_scan`, `holdout_pairs`), so memory is the model's
    plus the test window's pairs."""
    store = storage.storage()
    metadata: dict = {}
    summary = []
    for tenant in tenants(store, config.tenants):
        split = read_json(store, model_path(store, tenant, "split.json"))
        scan = ingest.scan_events(store, tenant).select(MODEL_EVENT_COLUMNS)
        s = temporal_split_scan(scan, split["test_fraction"])
        model = load_hybrid(store, model_path(store, tenant, "eval", "hybrid"))
        table, holdout, _ = evaluate_fitted(
            model, s.train, s.test, config.bootstrap_resamples, config.seed
        )
        out_dir = store.evaluation_dir(tenant)
        store.makedirs(out_dir)
        selection = model.info.get("selection") or {}
        record = {
            "tenant": tenant,
            "users": holdout.n_users,
            "pairs": holdout.n_pairs,
            # what serves, chosen on the validation window inside train (never on this test)
            "served_by": model.info.get("served_by"),
            "selection": selection.get("reason"),
        }
        if selection.get("validation_ndcg@10"):
            metadata[f"{tenant}/validation_ndcg@10"] = dg.MetadataValue.json(selection)
        if table.height:
            table.write_csv(os.path.join(out_dir, "evaluation.csv"))
            plot_table(table, os.path.join(out_dir, "evaluation.png"))
            served = table.filter(table["model"] == "served").row(0, named=True)
            record["served_ndcg@10"] = round(served["NDCG@10"], 4)
            # reported, never used for a choice: the best baseline on this test window
            base = table.filter(table["model"] != "served").sort("NDCG@10", descending=True)
            if base.height:
                best = base.row(0, named=True)
                record["best_baseline"] = best["model"]
                record["best_baseline_ndcg@10"] = round(best["NDCG@10"], 4)
            record["skipped"] = ""
            metadata[f"{tenant}/table"] = _md_table(format_table(table).to_dicts())
            metadata[f"{tenant}/metrics"] = _table_metadata(table)
            metadata[f"{tenant}/plot"] = dg.MetadataValue.path(
                os.path.join(out_dir, "evaluation.png")
            )
        else:
            record["served_ndcg@10"] = None
            record["skipped"] = "no test positives on known users and items (too little data)"
            context.log.warning(f"{tenant}: evaluation skipped: {record['skipped']}")
        write_json(store, os.path.join(out_dir, "evaluation.json"), record)
        summary.append(record)
    metadata["summary"] = _md_table(summary)
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(group_name=GROUP, deps=[model_evaluation], kinds={"mlflow"})
def champion_model(
    context: dg.AssetExecutionContext,
    config: ChampionConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    """Logs the final (all-data) model to MLflow as a new version of recsys-<tenant> and gives
    it the `champion` alias unless its served NDCG@10 regressed beyond the tolerance."""
    import polars as pl

    store = storage.storage()
    uri = mlflow.resolve_tracking_uri(store)
    rows = []
    for tenant in tenants(store, config.tenants):
        # streamed: the fingerprint sorts them, nothing else reads the events here
        events = ingest.scan_events(store, tenant).select(MODEL_EVENT_COLUMNS)
        ev_dir = store.evaluation_dir(tenant)
        csv = os.path.join(ev_dir, "evaluation.csv")
        table = pl.read_csv(csv) if os.path.exists(csv) else None
        png = os.path.join(ev_dir, "evaluation.png")
        final = read_json(store, model_path(store, tenant, "final", "hybrid", "hybrid.json"))
        selection = final["info"].get("selection") or {}
        served_by = final["info"].get("served_by")
        # LightFM weighed on validation (hybrid.weigh_lightfm): kept or not, why, both figures
        lightfm = selection.get("lightfm") or {}
        run = tracking.log_training_run(
            tenant=tenant,
            model=model_path(store, tenant, "final", "hybrid"),  # logged as saved
            events=events,
            uri=uri,
            artifact_root=mlflow.artifact_root(store),
            table=table,
            plot_path=png if os.path.exists(png) else None,
            extra_params={
                "split": read_json(store, model_path(store, tenant, "split.json")),
                "selection": {
                    **{k: v for k, v in selection.items() if k in ("served", "reason")},
                    **({"lightfm": {k: lightfm[k] for k in ("kept", "reason")}} if lightfm else {}),
                },
            },
            extra_metrics={
                **{
                    f"validation.{name}.NDCG_at_10": value
                    for name, value in (selection.get("validation_ndcg@10") or {}).items()
                },
                **{
                    f"validation.hybrid_{side}_lightfm.NDCG_at_10": value
                    for side, value in (lightfm.get("validation_ndcg@10") or {}).items()
                },
            },
            tolerance=config.tolerance,
        )
        gate = {**run.gate, "run_id": run.run_id, "version": run.version, "model": run.model_name}
        # what the version serves and why (e.g. popularity: too little data to beat it)
        gate["served_by"] = served_by
        gate["served_because"] = selection.get("reason")
        write_json(store, model_path(store, tenant, "gate.json"), gate)
        rows.append(
            {
                "tenant": tenant,
                "version": run.version,
                "promoted": gate["promoted"],
                "candidate": gate["candidate_ndcg_at_10"],
                "champion": gate["champion_ndcg_at_10"],
                "reason": gate["reason"],
                "served_by": served_by,
            }
        )
        context.log.info(f"{tenant}: version {run.version}: {gate['reason']}")
    return dg.MaterializeResult(
        metadata={
            "gate": _md_table(rows),
            "tracking_uri": uri,
            "tolerance": config.tolerance,
        }
    )

"""The documented PostgreSQL Dagster instance, used for real against the local server."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from pipelines import ingest as ingest_defs

pytestmark = pytest.mark.services
REPO = Path(__file__).resolve().parents[2]


def test_ingest_assets_materialise_on_a_postgres_instance(
    pg_database_url, ingest_resources, tmp_path, monkeypatch
):
    monkeypatch.setenv("RECSYS_PG_URL", pg_database_url)
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text(
        (REPO / "dagster_home" / "dagster-postgres.yaml").read_text()
    )
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        result = dg.materialize(
            [*ingest_defs.assets, *ingest_defs.asset_checks],
            resources=ingest_resources,
            instance=instance,
        )
        assert result.success
        stored = instance.get_run_by_id(result.run_id)
        assert stored is not None and stored.is_success
        record = instance.get_latest_materialization_event(dg.AssetKey("events"))
        assert record is not None and record.asset_materialization.metadata["rows_new"].value > 0

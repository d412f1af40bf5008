"""The documented PostgreSQL Dagster instance, used for real against the local server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import dagster as dg
import pytest

from pipelines import ingest as ingest_defs

pytestmark = pytest.mark.services
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pg_database():
    psycopg2 = pytest.importorskip("psycopg2")
    host = os.environ.get("RECSYS_PG_HOST", "127.0.0.1")
    try:
        admin = psycopg2.connect(
            host=host, port=5432, user="postgres", dbname="postgres", connect_timeout=3
        )
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {host}:5432: {exc}")
    admin.autocommit = True
    name = f"recsys_test_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield {"RECSYS_PG_URL": f"postgresql+psycopg2://postgres@{host}:5432/{name}"}
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def test_ingest_assets_materialise_on_a_postgres_instance(
    pg_database, ingest_resources, tmp_path, monkeypatch
):
    for k, v in pg_database.items():
        monkeypatch.setenv(k, v)
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

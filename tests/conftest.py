"""Shared fixtures: seeded randomness, a temporary data root, the real data sets when present."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from recsys.storage import Storage

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RECSYS_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def storage(tmp_path: Path) -> Storage:
    return Storage(str(tmp_path / "data"))


@pytest.fixture
def shared_data() -> Path:
    """../shared/data, or a skip with the reason when this checkout has none beside it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (set RECSYS_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture
def pg_database_url():
    """A fresh, empty database on the local PostgreSQL (dropped afterwards), as an SQLAlchemy
    URL with the psycopg2 driver; a skip with the reason where the server is not reachable."""
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
        yield f"postgresql+psycopg2://postgres@{host}:5432/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

from __future__ import annotations

import pytest

from pipelines.resources import IngestPolicy, StorageResource
from recsys.demo import DemoSpec, generate


@pytest.fixture
def demo_root(storage):
    generate(DemoSpec(events=20_000, seed=11, end_date="2026-11-01", chunk_events=10_000), storage)
    return storage


@pytest.fixture
def ingest_resources(demo_root):
    return {"storage": StorageResource(root=demo_root.root), "policy": IngestPolicy()}

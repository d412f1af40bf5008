"""Fixtures of the serving tests (helpers and the tiny snapshots: serving_helpers.py)."""

from __future__ import annotations

import os

import pytest
from serving_helpers import build_client, make_config, publish_tiny

from serving.config import ServingConfig


@pytest.fixture(scope="session")
def snapshot_root(tmp_path_factory) -> str:
    """A data root with published snapshots of acme (a*) and globex (g*)."""
    root = str(tmp_path_factory.mktemp("data"))
    publish_tiny(root, "acme", "a")
    publish_tiny(root, "globex", "g")
    return root


@pytest.fixture()
def data_root(snapshot_root, tmp_path) -> str:
    """Per test: the shared snapshots (symlinked) plus a fresh, empty admin state folder."""
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(os.path.join(snapshot_root, "snapshots"), root / "snapshots")
    return str(root)


@pytest.fixture()
def config(data_root) -> ServingConfig:
    return make_config(data_root)


@pytest.fixture()
def client(config):
    return build_client(config)

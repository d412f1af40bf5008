"""Ingest: landing files -> validated events (partitioned by day), rejected rows, items, users."""

from pipelines.ingest.assets import events_and_rejects, items, users
from pipelines.ingest.checks import asset_checks
from pipelines.ingest.sensors import ingest_job, landing_sensor

assets = [events_and_rejects, items, users]
jobs = [ingest_job]
sensors = [landing_sensor]

__all__ = ["asset_checks", "assets", "jobs", "sensors"]

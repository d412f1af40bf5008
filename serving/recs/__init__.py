"""The /v1/recs surface (issue 6): durable events and feedback that close the loop, plus the
runtime routes built on the serving engine. `register(app, ...)` mounts every route."""

from serving.recs.routes import register

__all__ = ["register"]

"""Control plane: connectors (being built; see serving/control/__init__.py for the shape of an area)."""

from __future__ import annotations

from typing import Any

from serving.routing import Route

ROUTES: tuple[Route, ...] = ()


def resources(ctx: Any) -> dict[str, Any]:
    return {}

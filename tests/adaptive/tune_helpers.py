"""A source and a downstream stage for the ``pipeline tune`` tests, named from a config file."""

from __future__ import annotations

from typing import Any

CALLED: list[Any] = []
"""Keys that reached :func:`record`; tune must never run a stage after the tuned one."""


def requests_to(*, url: str, n: int) -> list[dict[str, Any]]:
    """``n`` items, each a GET of ``url``."""
    return [{"id": i, "url": url} for i in range(n)]


def record(item: dict[str, Any]) -> dict[str, Any]:
    """A downstream side effect."""
    CALLED.append(item["id"])
    return item

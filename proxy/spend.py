"""The spend API under ``/api/v1/`` (never proxied upstream)."""

from __future__ import annotations

from aiohttp import web


def add_routes(app: web.Application) -> None:
    """Register the spend API routes on ``app``."""

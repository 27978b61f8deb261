"""Typed application state: what the handlers find on the app, and the config snapshot.

A request reads ``app[RUNTIME].current`` once and keeps that snapshot to the end, so a
config swap never changes the rules half-way through a request.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.auth import Authenticator
from proxy.config import Settings
from proxy.ledger import Ledger
from proxy.pricing import PriceTable
from proxy.tokens import Tokenizer


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one version of the caps file."""

    settings: Settings
    auth: Authenticator
    prices: PriceTable
    tokenizer: Tokenizer

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Blocking on first use (loads the encodings): call it off the event loop."""
        return cls(
            settings=settings,
            auth=Authenticator(settings),
            prices=PriceTable(overrides=settings.pricing.models, default=settings.pricing.default),
            tokenizer=Tokenizer(overrides=settings.tokenizer.encodings),
        )


class RuntimeRef:
    """The current ``Runtime``; replaced whole, never mutated."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime


RUNTIME = web.AppKey("runtime", RuntimeRef)
SESSION = web.AppKey("session", aiohttp.ClientSession)
LEDGER = web.AppKey("ledger", Ledger)

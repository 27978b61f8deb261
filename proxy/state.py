"""Typed application state: what the handlers find on the app, and the config snapshot.

A request reads ``app[RUNTIME].current`` once and keeps that snapshot to the end, so a
config swap never changes the rules half-way through a request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.alerts import Alerter
from proxy.auth import Authenticator
from proxy.config import Settings
from proxy.journal import Journal
from proxy.ledger import Ledger
from proxy.metrics import Metrics
from proxy.price_files import SizeTier, merge_price_files
from proxy.pricing import BUILTIN_PRICES, PriceTable
from proxy.tokens import Tokenizer
from proxy.upstream import UpstreamClient


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one version of the caps file."""

    settings: Settings
    auth: Authenticator
    prices: PriceTable
    # Prices by prompt size (price-file entries with ``*_above_<N>k_tokens``), by entry.
    size_tiers: Mapping[str, tuple[SizeTier, ...]]
    tokenizer: Tokenizer
    # Metric labels are only ever these names (anything else folds into "other").
    tenant_ids: frozenset[str]
    agent_ids: frozenset[str]
    model_names: frozenset[str]

    @classmethod
    def build(cls, settings: Settings) -> Runtime:
        """Reads the price files: call it off the event loop."""
        file_prices, tiers, _ = merge_price_files(settings.pricing.files)
        return cls(
            settings=settings,
            auth=Authenticator(settings),
            prices=PriceTable(
                overrides=settings.pricing.models,
                default=settings.pricing.default,
                tools=settings.pricing.tools,
                files=file_prices,
            ),
            size_tiers=tiers,
            tokenizer=Tokenizer(overrides=settings.tokenizer.encodings),
            tenant_ids=frozenset(t.id for t in settings.tenants),
            agent_ids=settings.cost_caps.agent_ids,
            model_names=frozenset(BUILTIN_PRICES)
            | frozenset(settings.pricing.models)
            | frozenset(file_prices),
        )


class RuntimeRef:
    """The current ``Runtime``; replaced whole, never mutated."""

    def __init__(self, runtime: Runtime) -> None:
        self.current = runtime


class Lifecycle:
    """Whether the app takes new work, and the request tasks it must wait for at shutdown."""

    def __init__(self) -> None:
        self.ready = True
        self.inflight: set[asyncio.Task[object]] = set()

    async def drain(self, grace_s: float) -> int:
        """Let in-flight requests finish for ``grace_s``; cancel what is left (their
        handlers still settle what they owe). Returns how many had to be cancelled."""
        self.ready = False
        if not self.inflight:
            return 0
        _, late = await asyncio.wait(set(self.inflight), timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=10)
        return len(late)


RUNTIME = web.AppKey("runtime", RuntimeRef)
# Alerts' webhooks go out on this session; requests to upstreams on UPSTREAM.
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", UpstreamClient)
LEDGER = web.AppKey("ledger", Ledger)
METRICS = web.AppKey("metrics", Metrics)
ALERTER = web.AppKey("alerter", Alerter)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
# None when no journal is configured (set either way: a lookup of a missing key raises).
JOURNAL: web.AppKey[Journal | None] = web.AppKey("journal")

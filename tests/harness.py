"""Builds settings in code and runs the real app against the fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Iterator, Mapping
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from proxy.config import Settings
from proxy.counters import Counter, Store
from proxy.pricing import micros_to_usd
from proxy.redis_store import RedisStore
from proxy.windows import Window
from tests.redis_topology import RedisCluster, SentinelSet

TENANT_KEY = "sk-acme-test-key"
OTHER_KEY = "sk-globex-test-key"
UPSTREAM_KEY = "sk-upstream-secret"
# $1 per 1M input tokens, $2 per 1M output: easy arithmetic in tests.
TEST_MODEL_PRICE: dict[str, Any] = {
    "input_per_mtok": 1,
    "cached_input_per_mtok": "0.5",
    "output_per_mtok": 2,
    "max_output_tokens": 1000,
}


def merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def settings_for(upstream_url: str, **over: Any) -> Settings:
    """Two tenants, default caps as in the seed, one priced test model."""
    base: dict[str, Any] = {
        "store": {"url": "memory://", "timeout_ms": 250},
        "upstreams": [
            {
                "name": "fake",
                "base_url": upstream_url,
                "api_key": UPSTREAM_KEY,
                "models": ["*"],
                "timeout_s": 5,
                "connect_timeout_s": 1,
            }
        ],
        "tenants": [
            {"id": "acme", "api_keys": [TENANT_KEY]},
            {"id": "globex", "api_keys": [OTHER_KEY]},
        ],
        "cost_caps": {
            "enabled": True,
            "default_budget_caps": [
                {"window": "hourly", "hard_limit_usd": 10, "soft_limit_usd": 8},
                {"window": "daily", "hard_limit_usd": 100},
            ],
            "default_token_cap": {
                "max_prompt_tokens": 4096,
                "max_completion_tokens": 4096,
                "max_total_tokens": 8192,
            },
            "agents": [
                {
                    "agent_id": "premium-agent",
                    "budget_caps": [
                        {"window": "daily", "hard_limit_usd": 500, "soft_limit_usd": 400}
                    ],
                    "token_cap": {"max_prompt_tokens": 16384},
                }
            ],
        },
        "pricing": {"models": {"test-model": TEST_MODEL_PRICE}},
    }
    return Settings.model_validate(merge(base, over))


def auth(key: str = TENANT_KEY, agent: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if agent is not None:
        headers["X-Agent-Id"] = agent
    return headers


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "test-model", "messages": [{"role": "user", "content": content}], **extra}


async def spent(
    store: Store,
    tenant: str = "acme",
    agent: str | None = "_default",
    window: Window = Window.HOURLY,
) -> tuple[Decimal, Decimal]:
    """(spent, held) in USD of one counter (``agent=None``: tenant-wide) in its period now."""
    (state,) = await store.snapshot([Counter(tenant, agent, window, 1)], tz=ZoneInfo("UTC"))
    return micros_to_usd(state.spent), micros_to_usd(state.held)


class AccessLog(logging.Handler):
    """Collects ``capproxy.access`` lines by agent; ``line(agent)`` waits for one."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: dict[str, dict[str, Any]] = {}
        self._events: dict[str, asyncio.Event] = {}

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping) and isinstance(fields.get("agent"), str):
            agent = fields["agent"]
            self.lines[agent] = dict(fields)
            self._events.setdefault(agent, asyncio.Event()).set()

    async def line(self, agent: str) -> dict[str, Any]:
        await self._events.setdefault(agent, asyncio.Event()).wait()
        return self.lines[agent]


@contextlib.contextmanager
def access_log() -> Iterator[AccessLog]:
    logger = logging.getLogger("capproxy.access")
    handler = AccessLog()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def cluster_store(cluster: RedisCluster, prefix: str, timeout_s: float = 0.5) -> RedisStore:
    """A store on the cluster, through any of its nodes."""
    return RedisStore.from_url(cluster.seed_url, prefix=prefix, timeout_s=timeout_s, mode="cluster")


def sentinel_store(sentinels: SentinelSet, prefix: str, timeout_s: float = 0.5) -> RedisStore:
    """A store on the primary the sentinels name (the url gives nothing but the scheme)."""
    return RedisStore.from_url(
        "redis://",
        prefix=prefix,
        timeout_s=timeout_s,
        mode="sentinel",
        sentinels=sentinels.sentinel_nodes,
        service_name=sentinels.service_name,
    )

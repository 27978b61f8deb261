"""The store path alone: a reservation and its settle through the ledger, on a Redis of its
own, as a request of the default agent makes them (its budget counters: the tenant's
monthly cap, and the hourly and daily default caps), at a fixed concurrency.

    .venv/bin/python bench/store.py                      # 20,000 requests at concurrency 50
    .venv/bin/python bench/store.py --requests 2000 --concurrency 1

It prints the CPU this process spent per request (Redis's own CPU is not in it). The
machine's noise moves that figure by 10-20 % between runs; for an A/B comparison, count
instructions instead, which do not move with the machine's load:

    valgrind --tool=callgrind .venv/bin/python bench/store.py --requests 1000
    valgrind --tool=callgrind .venv/bin/python bench/store.py --requests 3000
    # instructions per request: (second "Collected" - first) / 2000
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from zoneinfo import ZoneInfo

from proxy import budget
from proxy.app import new_event_loop
from proxy.config import Settings
from proxy.counters import Amounts
from proxy.ledger import Ledger
from proxy.redis_store import RedisStore

WARMUP = 2500  # requests before the measured ones (connections, scripts, memos)


def settings(redis_url: str) -> Settings:
    return Settings.model_validate(
        {
            "store": {"url": redis_url},
            "upstreams": [{"name": "u", "base_url": "http://127.0.0.1:9/v1", "models": ["*"]}],
            "tenants": [
                {
                    "id": "bench",
                    "api_keys": ["sk-bench"],
                    "budget_caps": [{"window": "monthly", "hard_limit_usd": 100_000_000}],
                }
            ],
            "cost_caps": {
                "default_budget_caps": [
                    {"window": "hourly", "hard_limit_usd": 10_000_000},
                    {"window": "daily", "hard_limit_usd": 100_000_000},
                ],
            },
            "pricing": {"models": {"m": {"input_per_mtok": 1, "output_per_mtok": 2}}},
        }
    )


async def run(redis_url: str, requests: int, concurrency: int) -> tuple[float, int]:
    """CPU seconds per request of ``requests`` holds and settles at ``concurrency``, and
    the counters each one holds."""
    store = RedisStore.from_url(redis_url, prefix="bench", timeout_s=0.25)
    ledger = Ledger(store, fail_open=False)
    plan = budget.plan_budget(
        settings(redis_url),
        "bench",
        "_default",
        amount_micros=1000,
        tokens=100,
        model="m",
        user=None,
    )
    tz = ZoneInfo("UTC")

    async def worker(count: int) -> None:
        for _ in range(count):
            async with ledger.hold(plan, tz=tz, hold_ttl_s=30) as hold:
                await hold.commit(Amounts(500, 50, 1))

    try:
        await asyncio.gather(*(worker(WARMUP // concurrency) for _ in range(concurrency)))
        started = time.process_time()
        await asyncio.gather(*(worker(requests // concurrency) for _ in range(concurrency)))
        done = requests // concurrency * concurrency
        return (time.process_time() - started) / done, len(plan.counters)
    finally:
        await store.aclose()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    args = parser.parse_args(argv)
    redis = shutil.which("redis-server")
    if redis is None:
        raise SystemExit("redis-server is not on PATH")
    port = free_port()
    server = subprocess.Popen(
        [redis, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.05)
        loop = new_event_loop()
        try:
            cpu, counters = loop.run_until_complete(
                run(f"redis://127.0.0.1:{port}/0", args.requests, args.concurrency)
            )
        finally:
            loop.close()
    finally:
        server.terminate()
        server.wait()
    print(
        f"reserve + settle through the ledger, {counters} counters, "
        f"concurrency {args.concurrency}: "
        f"{cpu * 1e6:.1f} us CPU per request"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The store's pure side: its types and protocol need no Redis client."""

from __future__ import annotations

import subprocess
import sys


def test_the_budget_logic_does_not_import_redis() -> None:
    modules = "proxy.counters, proxy.budget, proxy.ledger, proxy.memory_store, proxy.alerts"
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m[:5] == 'redis'))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_the_redis_store_does() -> None:
    code = "import sys, proxy.redis_store; print('redis' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "True"

"""The store's pure side: its types and protocol need no Redis client."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys

from proxy.counters import Counter, Unit
from proxy.windows import Window


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


def test_a_counters_hash_is_its_fields_and_survives_a_trip_to_another_process() -> None:
    counter = Counter("acme", "bot", Window.DAILY, 5, Unit.TOKENS, None, "u1")
    assert hash(counter) == hash(Counter("acme", "bot", Window.DAILY, 5, Unit.TOKENS, None, "u1"))
    assert {counter: 1}[dataclasses.replace(counter)] == 1
    assert dataclasses.replace(counter, limit=6) != counter
    # Strings hash differently in another process: an unpickled counter is rebuilt there.
    script = (
        "import pickle, sys\n"
        "from proxy.counters import Counter, Unit\n"
        "from proxy.windows import Window\n"
        "c = pickle.loads(sys.stdin.buffer.read())\n"
        "fresh = Counter('acme', 'bot', Window.DAILY, 5, Unit.TOKENS, None, 'u1')\n"
        "print(c == fresh and hash(c) == hash(fresh) and {fresh: 1}[c] == 1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=pickle.dumps(counter),
        capture_output=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        check=True,
    )
    assert done.stdout.strip() == b"True"

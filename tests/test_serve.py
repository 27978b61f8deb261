"""``capproxy serve`` end to end: the real command in a subprocess, a fake upstream, a real Redis.

Each test writes a caps file, starts ``python -m proxy serve`` on a free loopback port (JSON
logs on stderr, captured to a file) against the fake upstream served by the test's own event
loop and a private redis-server, and stops it with a signal. Every wait is a poll against a
deadline; the process is killed on the way out whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from redis.asyncio import Redis

from proxy.endpoints import Endpoint
from proxy.pricing import micros_to_usd
from proxy.tokens import Tokenizer
from tests.fake_upstream import FakeUpstream
from tests.harness import TEST_MODEL_PRICE, chat
from tests.redis_server import RedisServer, free_port

REPO = Path(__file__).resolve().parent.parent
TENANT_KEY = "sk-serve-acme-key"
UPSTREAM_KEY = "sk-serve-upstream-key"
ADMIN_TOKEN = "serve-admin-token"
# Budget caps are only ever read from these keys (the store's default prefix).
HOURLY_KEYS = "capproxy:{{{tenant}}}:a:{agent}:hourly:*"
# The fake upstream's usage (10 prompt + 20 completion tokens) at $1 / $2 per 1M tokens.
USAGE_MICROS = 10 * 1 + 20 * 2
USAGE_USD = str(micros_to_usd(USAGE_MICROS))  # as access lines write it
START_TIMEOUT_S = 60.0  # interpreter start + encodings load, on a busy machine
WAIT_S = 30.0  # any other effect the test waits for
EXIT_MARGIN_S = 10.0  # beyond the shutdown grace, for the process to be gone
POLL_S = 0.05
DONE = b"data: [DONE]\n\n"


def caps(
    upstream_url: str,
    store_url: str,
    *,
    grace_s: float = 5,
    tenant_key: str = TENANT_KEY,
    upstream_key: str = UPSTREAM_KEY,
    admin_token: str = ADMIN_TOKEN,
    hourly_usd: str = "10.0000",
) -> dict[str, Any]:
    """A caps file like ``tests.harness.settings_for``, as YAML data."""
    return {
        "server": {"host": "127.0.0.1", "shutdown_grace_s": grace_s},
        "store": {"url": store_url, "timeout_ms": 1000},
        "auth": {"mode": "keys", "admin_token": admin_token},
        "upstreams": [
            {
                "name": "fake",
                "base_url": upstream_url,
                "api_key": upstream_key,
                "models": ["*"],
                "timeout_s": 120,
                "connect_timeout_s": 5,
            }
        ],
        "tenants": [{"id": "acme", "api_keys": [tenant_key]}],
        "cost_caps": {
            "enabled": True,
            "default_budget_caps": [
                {"window": "hourly", "hard_limit_usd": hourly_usd},
                {"window": "daily", "hard_limit_usd": "100"},
            ],
            "default_token_cap": {
                "max_prompt_tokens": 4096,
                "max_completion_tokens": 4096,
                "max_total_tokens": 8192,
            },
        },
        "pricing": {"models": {"test-model": TEST_MODEL_PRICE}},
    }


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@dataclass
class Proxy:
    """A running ``capproxy serve`` process and a client session for talking to it."""

    proc: subprocess.Popen[bytes]
    port: int
    config: Path
    stderr: Path
    stdout: Path
    http: aiohttp.ClientSession

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log_text(self) -> str:
        return self.stderr.read_text(errors="replace")

    def log(self) -> list[dict[str, Any]]:
        """Every stderr line, each of which must be one JSON object."""
        records: list[dict[str, Any]] = []
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"stderr line is not JSON: {line!r}")
            assert isinstance(record, dict), line
            assert {"ts", "level", "logger", "msg"} <= record.keys(), line
            records.append(record)
        return records

    async def wait_log(self, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The first log record ``match`` accepts, polling until one is written."""
        deadline = time.monotonic() + WAIT_S
        while True:
            found = [r for r in self.log() if match(r)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                pytest.fail(f"no such log line in:\n{self.log_text()}")
            await asyncio.sleep(POLL_S)

    async def wait_msg(self, part: str) -> dict[str, Any]:
        """The first log record whose message contains ``part``."""
        return await self.wait_log(lambda r: part in str(r["msg"]))

    async def wait_exit(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"capproxy still running after {timeout_s:g} s:\n{self.log_text()}")
            await asyncio.sleep(POLL_S)
        return self.proc.returncode


def _spawn(config: Path, attempt: int, http: aiohttp.ClientSession) -> Proxy:
    port = free_port()
    stderr = config.with_name(f"stderr-{attempt}.log")
    stdout = config.with_name(f"stdout-{attempt}.log")
    env = {**os.environ, "CAPPROXY_LOG_LEVEL": "INFO"}
    argv = [sys.executable, "-m", "proxy", "serve", "--config", str(config)]
    argv += ["--host", "127.0.0.1", "--port", str(port)]
    with stderr.open("wb") as err, stdout.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err
        )
    return Proxy(proc, port, config, stderr, stdout, http)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


async def _ready(proxy: Proxy) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proxy.proc.poll() is None:
        if await readyz(proxy) == 200:
            return True
        await asyncio.sleep(POLL_S)
    return False


async def readyz(proxy: Proxy) -> int | None:
    """``GET /readyz`` on a fresh connection: its status, or None when nothing answers."""
    timeout = aiohttp.ClientTimeout(total=5)
    connector = aiohttp.TCPConnector(force_close=True)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as probe,
            probe.get(proxy.url("/readyz")) as resp,
        ):
            await resp.read()
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return None


@asynccontextmanager
async def serve(tmp_path: Path, settings: dict[str, Any]) -> AsyncIterator[Proxy]:
    """Write ``settings`` as the caps file, start ``capproxy serve``, wait for /readyz."""
    config = tmp_path / "caps.yaml"
    config.write_text(yaml.safe_dump(settings, sort_keys=False))
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_S))
    proxy: Proxy | None = None
    try:
        for attempt in range(3):
            proxy = _spawn(config, attempt, http)
            if await _ready(proxy):
                break
            _kill(proxy.proc)
            # Another process may have taken the free port first: try another one.
            if attempt == 2 or "address already in use" not in proxy.log_text().lower():
                pytest.fail(f"capproxy serve did not become ready:\n{proxy.log_text()}")
        assert proxy is not None
        yield proxy
    finally:
        if proxy is not None:
            _kill(proxy.proc)
        await http.close()


async def hourly_spend(
    redis_url: str, tenant: str = "acme", agent: str = "_default"
) -> tuple[int, int]:
    """(spent, held) in micro-USD over the agent's hourly counters (every period)."""
    client = Redis.from_url(redis_url)
    spent = held = 0
    try:
        async for key in client.scan_iter(match=HOURLY_KEYS.format(tenant=tenant, agent=agent)):
            if key.endswith(b":holds"):
                continue
            s, h = await client.hmget(key, ["spent", "held"])
            spent += int(s or 0)
            held += int(h or 0)
    finally:
        await client.aclose()
    return spent, held


async def read_until(resp: aiohttp.ClientResponse, marker: bytes) -> bytes:
    seen = b""
    async with asyncio.timeout(WAIT_S):
        while marker not in seen:
            chunk = await resp.content.readany()
            assert chunk, f"the stream ended before {marker!r}: {seen!r}"
            seen += chunk
    return seen


def events(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get("event") == name]


# --- start, serve, stop --------------------------------------------------------------------


async def test_serve_starts_proxies_and_logs_json(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    async with serve(tmp_path, caps(upstream.url, redis_server.url)) as proxy:
        for path in ("/healthz", "/readyz"):
            async with proxy.http.get(proxy.url(path)) as resp:
                assert resp.status == 200, path
        async with proxy.http.post(
            proxy.url("/v1/chat/completions"), json=chat(), headers=bearer(TENANT_KEY)
        ) as resp:
            assert resp.status == 200
            assert resp.headers["x-budget-window"] == "hourly"
            answer = await resp.json()
        assert answer["choices"][0]["message"]["content"] == "Hi!"
        assert upstream.count == 1
        assert upstream.received[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert await hourly_spend(redis_server.url) == (USAGE_MICROS, 0)

        access = await proxy.wait_log(lambda r: r.get("event") == "request")
        assert access["logger"] == "capproxy.access"
        assert (access["status"], access["tenant"], access["cost_usd"]) == (200, "acme", USAGE_USD)
        records = proxy.log()
        startup = records[0]
        assert startup["event"] == "startup" and startup["level"] == "INFO"
        assert startup["logger"] == "capproxy"
        assert (startup["host"], startup["port"]) == ("127.0.0.1", proxy.port)
        assert (startup["tenants"], startup["upstreams"]) == (1, 1)
        assert startup["config"] == str(proxy.config)
        assert [r["kind"] for r in events(records, "store")] == ["redis"]

        proxy.proc.send_signal(signal.SIGTERM)
        assert await proxy.wait_exit(5 + EXIT_MARGIN_S) == 0
        records = proxy.log()
        assert [r["grace_s"] for r in events(records, "shutdown")] == [5]
        assert records[-1]["event"] == "stopped"
        assert proxy.stdout.read_bytes() == b""


# --- graceful shutdown ---------------------------------------------------------------------


async def test_sigterm_lets_streams_in_flight_finish_and_records_them(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    grace_s = 10
    upstream.pause_after = 2  # keep-alive and role chunk sent, then the upstream waits
    settings = caps(upstream.url, redis_server.url, grace_s=grace_s)
    responses: list[aiohttp.ClientResponse] = []
    try:
        async with serve(tmp_path, settings) as proxy:
            body = chat(stream=True, max_tokens=100)
            heads: list[bytes] = []
            for _ in range(3):
                resp = await proxy.http.post(
                    proxy.url("/v1/chat/completions"), json=body, headers=bearer(TENANT_KEY)
                )
                responses.append(resp)
                assert resp.status == 200
                heads.append(await read_until(resp, b"chat.completion.chunk"))
            assert upstream.count == 3
            spent, held = await hourly_spend(redis_server.url)
            assert spent == 0 and held > 0  # three holds in place mid-stream

            sent = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            # No new work while draining: /readyz fails, or nothing listens any more.
            deadline = time.monotonic() + WAIT_S
            while await readyz(proxy) == 200:
                assert time.monotonic() < deadline, "/readyz still 200 after SIGTERM"
                await asyncio.sleep(POLL_S)
            assert proxy.proc.poll() is None, "exited with streams in flight"

            upstream.resume.set()
            for resp, head in zip(responses, heads, strict=True):
                data = head + await resp.read()
                assert data.endswith(DONE), data
                assert data.count(b'"content": "') == 6  # role chunk + 5 deltas, all relayed
            assert await proxy.wait_exit(grace_s + EXIT_MARGIN_S) == 0
            took = time.monotonic() - sent
            assert took < grace_s + EXIT_MARGIN_S

            assert await hourly_spend(redis_server.url) == (3 * USAGE_MICROS, 0)
            records = proxy.log()
            assert len(events(records, "shutdown")) == 1
            done = [r for r in events(records, "request") if r["streamed"]]
            assert [(r["status"], r["cost_usd"]) for r in done] == [(200, USAGE_USD)] * 3
            assert records[-1]["event"] == "stopped"
    finally:
        upstream.resume.set()
        for resp in responses:
            resp.close()


async def test_stream_open_at_the_deadline_is_cut_and_charged_its_hold(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    grace_s = 1
    upstream.pause_after = 3  # keep-alive, role chunk, "Hel"; then never resumes
    settings = caps(upstream.url, redis_server.url, grace_s=grace_s)
    body = chat(stream=True, max_tokens=600)
    resp: aiohttp.ClientResponse | None = None
    try:
        async with serve(tmp_path, settings) as proxy:
            resp = await proxy.http.post(
                proxy.url("/v1/chat/completions"), json=body, headers=bearer(TENANT_KEY)
            )
            assert resp.status == 200
            received = bytearray(await read_until(resp, b'"Hel"'))
            assert (await hourly_spend(redis_server.url))[1] > 0

            sent = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)
            assert await proxy.wait_exit(grace_s + EXIT_MARGIN_S) == 0
            took = time.monotonic() - sent
            # Cut at the grace deadline, not a multiple of it.
            assert grace_s * 0.9 <= took < grace_s + 3

            # The client sees its stream break: no invented ending.
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(WAIT_S):
                    async for chunk in resp.content.iter_any():
                        received += chunk
            assert DONE not in received

            # No usage came: charged the hold, prompt estimate + 600 output tokens.
            prompt = Tokenizer().estimate(Endpoint.CHAT, body)
            output = 600
            assert prompt > 0
            assert await hourly_spend(redis_server.url) == (prompt + 2 * output, 0)
            records = proxy.log()
            (access,) = events(records, "request")
            assert access["streamed"] is True
            assert access["status"] == 200
            assert access["cost_usd"] == str(micros_to_usd(prompt + 2 * output))
            assert records[-1]["event"] == "stopped"
    finally:
        upstream.resume.set()
        if resp is not None:
            resp.close()


# --- secrets -------------------------------------------------------------------------------

MARK = "k4n4ry"  # in every secret below, and nowhere else
TENANT_SECRET = f"tenant-{MARK}-5d1c0e97b2"
WRONG_SECRET = f"tenant-{MARK}-5d1c0e97b3"
UPSTREAM_SECRET = f"upstream-{MARK}-a83f62"
ADMIN_SECRET = f"admin-{MARK}-19c4bd"
REDIS_SECRET = f"redis-{MARK}-7e02aa"


def assert_clean(text: str, where: str) -> None:
    at = text.lower().find(MARK)
    assert at < 0, f"a secret leaked into {where}: ...{text[max(0, at - 300) : at + 100]}..."


async def test_secrets_stay_out_of_logs_metrics_bodies_keys_and_upstream(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    admin = Redis.from_url(redis_server.url)
    try:
        await admin.config_set("requirepass", REDIS_SECRET)
    finally:
        await admin.aclose()
    store_url = f"redis://:{REDIS_SECRET}@127.0.0.1:{redis_server.port}/0"
    settings = caps(
        upstream.url,
        store_url,
        tenant_key=TENANT_SECRET,
        upstream_key=UPSTREAM_SECRET,
        admin_token=ADMIN_SECRET,
    )
    answers: list[str] = []  # everything the proxy sent back, headers and bodies

    async with serve(tmp_path, settings) as proxy:

        async def call(
            method: str, path: str, headers: dict[str, str], body: Any = None
        ) -> tuple[int, bytes]:
            kwargs: dict[str, Any] = {"headers": headers}
            if isinstance(body, bytes):
                kwargs["data"] = body
            elif body is not None:
                kwargs["json"] = body
            async with proxy.http.request(method, proxy.url(path), **kwargs) as resp:
                data = await resp.read()
                answers.append(f"{resp.status} {list(resp.headers.items())}")
                answers.append(data.decode(errors="replace"))
                return resp.status, data

        def code(data: bytes) -> str:
            error: dict[str, Any] = json.loads(data)["error"]
            return str(error["code"])

        post = "/v1/chat/completions"
        assert (await call("POST", post, bearer(TENANT_SECRET), chat()))[0] == 200
        assert (await call("POST", post, {"x-api-key": TENANT_SECRET}, chat()))[0] == 200
        status, data = await call("POST", post, bearer(WRONG_SECRET), chat())
        assert (status, code(data)) == (401, "invalid_api_key")
        status, data = await call("POST", post, bearer(ADMIN_SECRET), chat())
        assert (status, code(data)) == (401, "invalid_api_key")
        status, data = await call("POST", post, bearer(TENANT_SECRET), chat(max_tokens=99999))
        assert (status, code(data)) == (429, "token_cap_exceeded")
        status, data = await call("POST", post, bearer(TENANT_SECRET), b"{not json")
        assert status == 400
        status, data = await call("POST", post, bearer(TENANT_SECRET), chat(stream=True))
        assert status == 200 and data.endswith(DONE)
        assert (await call("GET", "/v1/models", bearer(TENANT_SECRET)))[0] == 200

        assert (await call("GET", "/metrics", {}))[0] == 401
        assert (await call("GET", "/metrics", bearer(TENANT_SECRET)))[0] == 401
        status, metrics = await call("GET", "/metrics", bearer(ADMIN_SECRET))
        assert status == 200 and b"capproxy_" in metrics

        spend = "/api/v1/costs/current"
        status, data = await call("GET", spend, bearer(TENANT_SECRET))
        assert status == 200 and json.loads(data)["tenant_id"] == "acme"
        assert (await call("GET", f"{spend}?tenant_id=acme", bearer(ADMIN_SECRET)))[0] == 200
        assert (await call("GET", spend, bearer(WRONG_SECRET)))[0] == 401
        assert (await call("GET", "/api/v1/caps", bearer(TENANT_SECRET)))[0] == 200
        assert (await call("GET", "/api/v1/tenants", bearer(ADMIN_SECRET)))[0] == 200
        assert (await call("GET", "/api/v1/tenants", bearer(TENANT_SECRET)))[0] == 403

        # Redis: key names and hash fields never hold a secret.
        client = Redis.from_url(store_url)
        try:
            keys = [key async for key in client.scan_iter(count=1000)]
            assert keys, "the proxy wrote nothing to Redis"
            for key in keys:
                assert_clean(key.decode(errors="replace"), "a Redis key name")
                if await client.type(key) == b"hash":
                    fields = await client.hkeys(key)
                    assert_clean(repr(fields), f"the fields of Redis key {key!r}")
        finally:
            await client.aclose()

        # Rejected reloads say what is wrong where, never the values around it.
        bad = caps(
            upstream.url,
            f"redis://:{REDIS_SECRET}-2@127.0.0.1:1/0",
            tenant_key=f"sha256:{TENANT_SECRET}",
            upstream_key=UPSTREAM_SECRET,
            admin_token=ADMIN_SECRET,
        )
        bad["auth"]["admin_token"] = [ADMIN_SECRET]
        bad["upstreams"][0]["base_url"] = f"ftp://user:{UPSTREAM_SECRET}@127.0.0.1/v1"
        twice = caps(upstream.url, store_url, tenant_key=TENANT_SECRET)
        twice["tenants"].append({"id": "other", "api_keys": [TENANT_SECRET]})
        valid = yaml.safe_dump(settings, sort_keys=False)
        versions = [
            (yaml.safe_dump(bad, sort_keys=False), "tenants[0].api_keys[0]"),
            (yaml.safe_dump(twice, sort_keys=False), "duplicate api key"),
            (f'{valid}  oops: "{ADMIN_SECRET} {UPSTREAM_SECRET}\n', "<yaml>"),
        ]
        for text, problem in versions:
            proxy.config.write_text(text)
            proxy.proc.send_signal(signal.SIGHUP)
            await proxy.wait_msg(problem)

        # The store goes away: its errors must not carry the URL's password either.
        redis_server.stop()
        status, data = await call("POST", post, bearer(TENANT_SECRET), chat())
        assert (status, code(data)) == (503, "store_unavailable")
        assert (await call("GET", "/readyz", {}))[0] == 503

        proxy.proc.send_signal(signal.SIGTERM)
        assert await proxy.wait_exit(5 + EXIT_MARGIN_S) == 0
        log = proxy.log_text()
        assert proxy.log()  # every line JSON, and there are lines
        assert_clean(log, "the stderr log")
        assert_clean(proxy.stdout.read_text(errors="replace"), "stdout")

    assert_clean(metrics.decode(), "/metrics")
    for answer in answers:
        assert_clean(answer, "a response to the client")

    # Upstream: only ever the upstream key, and only in Authorization.
    assert [(r.method, r.path) for r in upstream.received] == [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ]
    for r in upstream.received:
        for name, value in r.headers.items():
            if name.lower() == "authorization":
                assert value == f"Bearer {UPSTREAM_SECRET}"
            else:
                assert_clean(f"{name}: {value}", "a header sent upstream")
        assert r.headers.get("Authorization") == f"Bearer {UPSTREAM_SECRET}"
        assert_clean(json.dumps(r.body), "a body sent upstream")


# --- reload --------------------------------------------------------------------------------


async def test_sighup_applies_a_lowered_cap(
    tmp_path: Path, upstream: FakeUpstream, redis_server: RedisServer
) -> None:
    async with serve(tmp_path, caps(upstream.url, redis_server.url)) as proxy:
        post = proxy.url("/v1/chat/completions")
        async with proxy.http.post(post, json=chat(), headers=bearer(TENANT_KEY)) as resp:
            assert resp.status == 200
        assert await hourly_spend(redis_server.url) == (USAGE_MICROS, 0)

        # Lower the hourly cap below what is already spent. The new file has the same size
        # and is written in place with its old mtime put back: its stat does not change, so
        # the file watcher has nothing to notice and SIGHUP is what makes the proxy read it.
        before = proxy.config.stat()
        lowered = yaml.safe_dump(
            caps(upstream.url, redis_server.url, hourly_usd="0.00001"), sort_keys=False
        ).encode()
        assert len(lowered) == before.st_size
        fd = os.open(proxy.config, os.O_WRONLY)
        try:
            assert os.pwrite(fd, lowered, 0) == len(lowered)
        finally:
            os.close(fd)
        os.utime(proxy.config, ns=(before.st_atime_ns, before.st_mtime_ns))
        proxy.proc.send_signal(signal.SIGHUP)

        deadline = time.monotonic() + WAIT_S
        while True:
            async with proxy.http.get(
                proxy.url("/api/v1/caps"), headers=bearer(TENANT_KEY)
            ) as resp:
                assert resp.status == 200
                shown = json.loads(await resp.read(), parse_float=Decimal)
            hourly = shown["agent_budget_caps"][0]
            assert hourly["window"] == "hourly"
            if hourly["hard_limit_usd"] == Decimal("0.00001"):
                break
            assert time.monotonic() < deadline, f"the lowered cap never applied: {shown}"
            await asyncio.sleep(POLL_S)

        async with proxy.http.post(post, json=chat(), headers=bearer(TENANT_KEY)) as resp:
            assert resp.status == 429
            error = (await resp.json())["error"]
        assert error["code"] == "budget_exceeded"
        assert upstream.count == 1
        assert await hourly_spend(redis_server.url) == (USAGE_MICROS, 0)
        await proxy.wait_msg("reload requested")
        reloaded = await proxy.wait_msg("reloaded")
        assert "cost_caps" in reloaded["msg"]

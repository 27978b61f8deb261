"""What capproxy costs per request: latency and CPU, against a bare passthrough and no proxy.

    .venv/bin/python bench/overhead.py                          # full run (under a minute)
    .venv/bin/python bench/overhead.py --quick --json out.json  # smoke run, results as JSON
    .venv/bin/python bench/overhead.py --requests 4000 --concurrency 4

Every part runs in its own OS process on loopback, started by this script (which
re-runs itself in a hidden role for each one):

    load generator --> direct:    fake upstream
                   --> baseline:  bare aiohttp passthrough --> fake upstream
                   --> capproxy:  capproxy serve (Redis store) --> fake upstream

The fake upstream answers OpenAI-style chat completions: a JSON body with usage, or an
SSE stream of one role chunk, N content chunks, a finish chunk, a usage chunk and
``[DONE]`` (N + 4 frames), optionally paced by a delay between frames.

A new load-generator process runs each phase for each target: a warm-up, then a fixed
number of requests at a fixed concurrency over one keep-alive pool. The proxy's CPU time
is ``utime + stime`` from ``/proc/<pid>/stat`` read just before and just after the
measured requests, so it counts the proxy process alone, never the generator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import http.client
import itertools
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from aiohttp import web

MODEL = "bench-model"
TENANT_KEY = "sk-bench-tenant-key"
UPSTREAM_KEY = "sk-bench-upstream-key"
CHAT_PATH = "/v1/chat/completions"
EVENTS_HEADER = "X-Bench-Events"  # content chunks per stream, read by the fake upstream
DELAY_HEADER = "X-Bench-Delay-Ms"  # pause before each stream frame after the first
FRAMING_FRAMES = 4  # role chunk, finish chunk, usage chunk, [DONE]
MAX_EVENTS = 10_000
MAX_DELAY_MS = 1_000.0
BURST = 1_000  # streams of the burst phase, all at once
BIG_PROMPT_BYTES = 900_000  # the large prompt sent in a loop in the "big" phases
# The agent whose token cap the large prompt's bound passes: its prompt is never counted.
BULK_AGENT = "bulk"

REQUEST_TIMEOUT_S = 30.0
PHASE_TIMEOUT_S = 600.0  # a whole warm-up + measured run of one load generator
START_TIMEOUT_S = 60.0  # a child becoming ready
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


# --- the fake upstream (role "_upstream") --------------------------------------------


def _chunk(delta: dict[str, Any] | None, finish: str | None, usage: Any = None) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
    }
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _usage(completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": 14,
        "completion_tokens": completion_tokens,
        "total_tokens": 14 + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


@functools.lru_cache(maxsize=64)
def stream_frames(events: int, include_usage: bool) -> tuple[bytes, ...]:
    """The SSE frames of one streamed answer with ``events`` content chunks."""
    frames = [_chunk({"role": "assistant", "content": ""}, None)]
    frames += [_chunk({"content": f" tok{i}"}, None) for i in range(events)]
    frames.append(_chunk({}, "stop"))
    if include_usage:
        frames.append(_chunk(None, None, _usage(events)))
    frames.append(b"data: [DONE]\n\n")
    return tuple(frames)


JSON_ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": _usage(9),
    }
).encode()


def _header_number(request: web.Request, name: str, default: float, top: float) -> float:
    try:
        value = float(request.headers.get(name, default))
    except ValueError:
        value = default
    return min(max(value, 0.0), top)


async def _upstream_chat(request: web.Request) -> web.StreamResponse:
    body = json.loads(await request.read())
    if body.get("stream") is not True:
        return web.Response(body=JSON_ANSWER, content_type="application/json")
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    events = int(_header_number(request, EVENTS_HEADER, 50, MAX_EVENTS))
    delay_s = _header_number(request, DELAY_HEADER, 0.0, MAX_DELAY_MS) / 1000
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i, frame in enumerate(stream_frames(events, include_usage)):
        if delay_s and i:
            await asyncio.sleep(delay_s)
        await resp.write(frame)
    await resp.write_eof()
    return resp


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def upstream_role(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="overhead.py _upstream")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    app = web.Application()
    app.router.add_post(CHAT_PATH, _upstream_chat)
    app.router.add_get("/healthz", _healthz)
    web.run_app(
        app, host="127.0.0.1", port=args.port, access_log=None, print=None, shutdown_timeout=1
    )
    return 0


# --- the baseline: a bare aiohttp passthrough (role "_baseline") -----------------------

HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "host"}
    | {"content-length", "proxy-authorization", "proxy-authenticate"}
)
BASELINE_SESSION = web.AppKey("session", aiohttp.ClientSession)
BASELINE_UPSTREAM = web.AppKey("upstream", str)


async def _baseline_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[BASELINE_SESSION] = session
        yield


async def _passthrough(request: web.Request) -> web.StreamResponse:
    """Relay the request and the response (JSON or stream) unchanged; no checks."""
    body = await request.read()
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
    async with request.app[BASELINE_SESSION].request(
        request.method,
        request.app[BASELINE_UPSTREAM] + request.path_qs,
        headers=headers,
        data=body,
        allow_redirects=False,
    ) as up:
        if up.content_type == "text/event-stream":
            out = web.StreamResponse(status=up.status)
        else:
            out = web.Response(status=up.status, body=await up.read())
        for name, value in up.headers.items():
            if name.lower() not in HOP_BY_HOP:
                out.headers.add(name, value)
        if isinstance(out, web.Response):
            return out
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


def baseline_role(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="overhead.py _baseline")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="origin, e.g. http://127.0.0.1:9000")
    args = parser.parse_args(argv)
    app = web.Application()
    app[BASELINE_UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(_baseline_session)
    app.router.add_get("/healthz", _healthz)
    app.router.add_route("*", "/v1/{path:.*}", _passthrough)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        print=None,
        shutdown_timeout=1,
        loop=_event_loop(),
    )
    return 0


def _event_loop() -> asyncio.AbstractEventLoop:
    """The baseline serves on the event loop capproxy serves on (uvloop's, where it is
    installed), so that it stays the ceiling capproxy is measured against."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# --- the load generator (role "_load") ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    ok: bool
    latency_s: float
    ttfb_s: float | None = None
    error: str = ""


def _request_body(stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "max_completion_tokens": 64,
    }
    if stream:
        # Asked by the client, so every path relays the same frames and capproxy has no
        # reason to rewrite the body.
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _big_request_body(size: int) -> bytes:
    """A non-streamed chat request with a user message of about ``size`` bytes of words
    (about 200k tokens at the default size)."""
    words = ("budget", "cap", "proxy", "token", "stream", "agent", "window", "settle")
    text = " ".join(f"{words[i % len(words)]}{i % 997}" for i in range(size // 8))
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": text[:size]}],
        "max_completion_tokens": 16,
    }
    return json.dumps(body).encode()


async def _big_loop(
    headers: dict[str, str], url: str, body: bytes, stop: asyncio.Event
) -> tuple[int, int]:
    """Send ``body`` one request after another, on a connection of its own, until
    ``stop``; (answered, failed)."""
    answered = failed = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
        while not stop.is_set():
            sample = await _one(session, url, body, 0)
            answered, failed = (answered + 1, failed) if sample.ok else (answered, failed + 1)
    return answered, failed


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, frames: int) -> Sample:
    start = time.perf_counter()
    ttfb: float | None = None
    try:
        async with session.post(url, data=body) as resp:
            if frames == 0:
                data = await resp.read()
            else:
                parts: list[bytes] = []
                async for chunk in resp.content.iter_any():
                    if ttfb is None:
                        ttfb = time.perf_counter() - start
                    parts.append(chunk)
                data = b"".join(parts)
            latency = time.perf_counter() - start
            if resp.status != 200:
                return Sample(False, latency, ttfb, f"HTTP {resp.status}: {data[:300]!r}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sample(False, time.perf_counter() - start, ttfb, f"{type(exc).__name__}: {exc}")
    received = data.count(b"\n\n")
    if frames and (received != frames or not data.endswith(b"data: [DONE]\n\n")):
        return Sample(False, latency, ttfb, f"stream of {received} frames, {frames} expected")
    return Sample(True, latency, ttfb)


async def _run(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    *,
    count: int,
    concurrency: int,
    frames: int,
    stagger_s: float,
) -> list[Sample]:
    samples: list[Sample] = []
    todo = iter(range(count))  # shared: each worker takes the next request number

    async def worker(i: int) -> None:
        await asyncio.sleep(i * stagger_s)  # paced streams: don't all start at once
        for _ in todo:
            samples.append(await _one(session, url, body, frames))

    await asyncio.gather(*(worker(i) for i in range(max(1, min(concurrency, count)))))
    return samples


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values), max(1, round(q * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def summarize(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": quantile(ordered, 0.50) * 1000,
        "p90_ms": quantile(ordered, 0.90) * 1000,
        "p99_ms": quantile(ordered, 0.99) * 1000,
        "max_ms": (ordered[-1] if ordered else float("nan")) * 1000,
    }


def _cpu_self_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    stream = args.events > 0
    frames = args.events + FRAMING_FRAMES if stream else 0
    headers = {
        "Authorization": f"Bearer {TENANT_KEY}",
        "Content-Type": "application/json",
        EVENTS_HEADER: str(args.events),
        DELAY_HEADER: str(args.delay_ms),
    }
    connector = aiohttp.TCPConnector(limit=args.concurrency, keepalive_timeout=60)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    body = _request_body(stream)
    url = args.url.rstrip("/") + CHAT_PATH
    async with (
        asyncio.timeout(PHASE_TIMEOUT_S),
        aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session,
    ):
        run = functools.partial(
            _run,
            session,
            url,
            body,
            concurrency=args.concurrency,
            stagger_s=args.stagger_ms / 1000,
        )
        warm = await run(count=args.warmup, frames=frames)
        big_headers = {**headers, "X-Agent-Id": args.big_agent} if args.big_agent else headers
        big_body = _big_request_body(args.big_prompt_bytes) if args.big_prompt_bytes else b""
        if big_body:
            # One large prompt before the measured run: the first prompt a proxy counts
            # loads its encoding (once per process), which is not what this phase measures.
            async with aiohttp.ClientSession(timeout=timeout, headers=big_headers) as one:
                warm.append(await _one(one, url, big_body, 0))
        failed = [s.error for s in warm if not s.ok]
        print(json.dumps({"ready": True, "warmup_errors": len(failed), "first": failed[:1]}))
        sys.stdout.flush()
        if sys.stdin.readline().strip() != "GO":  # blocks this idle loop on purpose
            return {"aborted": True}
        cpu0, start = _cpu_self_s(), time.perf_counter()
        stop = asyncio.Event()
        big = None
        if big_body:
            big = asyncio.create_task(_big_loop(big_headers, url, big_body, stop))
        samples = await run(count=args.requests, frames=frames)
        wall = time.perf_counter() - start
        stop.set()
        big_answered, big_failed = await big if big is not None else (0, 0)
        cpu = _cpu_self_s() - cpu0
        print(json.dumps({"done": True}))
        sys.stdout.flush()
    ok = [s for s in samples if s.ok]
    errors = [s.error for s in samples if not s.ok]
    return {
        "requests": len(samples),
        "errors": len(errors),
        "store_errors": sum("store_unavailable" in e for e in errors),
        "first_error": errors[0] if errors else "",
        "wall_s": wall,
        "rps": len(samples) / wall if wall > 0 else 0.0,
        "latency": summarize([s.latency_s for s in ok]),
        "ttfb": summarize([s.ttfb_s for s in ok if s.ttfb_s is not None]) if stream else {},
        "loadgen_cpu_s": cpu,
        "big_requests": big_answered,
        "big_errors": big_failed,
    }


def load_role(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="overhead.py _load")
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--events", type=int, default=0, help="0: non-streamed requests")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--stagger-ms", type=float, default=0.0, help="worker i starts i x this")
    parser.add_argument(
        "--big-prompt-bytes", type=int, default=0, help="also send a prompt this big in a loop"
    )
    parser.add_argument("--big-agent", default="", help="the agent that sends the big prompt")
    result = asyncio.run(_load(parser.parse_args(argv)))
    print(json.dumps(result))
    sys.stdout.flush()
    return 0


# --- processes -------------------------------------------------------------------------


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _libc()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if this script dies without cleaning up."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class Children:
    """The processes this run started; ``stop`` ends each one, newest first."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[tuple[str, subprocess.Popen[str]]] = []

    def start(
        self, name: str, argv: Sequence[str], *, pipes: bool = False
    ) -> subprocess.Popen[str]:
        log = (self.logdir / f"{name}.log").open("a")
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log,
                text=True,
                start_new_session=True,  # a Ctrl-C reaches this script, which stops them
                preexec_fn=_die_with_parent,  # no threads in this process
            )
        finally:
            log.close()
        self._procs.append((name, proc))
        return proc

    def check(self, name: str, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 25) -> str:
        path = self.logdir / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self._procs)):
            try:
                self.stop(proc)
            except (OSError, subprocess.SubprocessError) as exc:
                print(f"could not stop pid {proc.pid}: {exc}", file=sys.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _poll_until(ready: Callable[[], bool], *, what: str, alive: Callable[[], None]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    for _ in range(int(START_TIMEOUT_S / POLL_INTERVAL_S) + 1):
        alive()
        if ready():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(POLL_INTERVAL_S)
    raise RuntimeError(f"{what} did not become ready within {START_TIMEOUT_S:.0f} s")


def http_ok(port: int, path: str = "/healthz") -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def redis_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def redis_connections(port: int) -> int:
    """Connections the Redis has accepted since it started (INFO stats)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO stats\r\n")
        data = b""
        while b"total_connections_received:" not in data or not data.endswith(b"\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    line = data.split(b"total_connections_received:")[1].split(b"\r\n")[0]
    return int(line)


def read_message(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    """The next JSON line a load generator prints, waiting at most ``timeout_s``."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise RuntimeError(f"load generator (pid {proc.pid}) silent for {timeout_s:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"load generator (pid {proc.pid}) exited with {proc.wait(5)}")
    message: dict[str, Any] = json.loads(line)
    return message


# --- profiling (optional) ----------------------------------------------------------------


def start_py_spy(children: Children, pid: int, output: Path) -> subprocess.Popen[str]:
    """Sample ``pid`` until stopped; collapsed stacks go to ``output``.

    Each sample pauses the process briefly (whole stacks, not torn ones): CPU and latency
    of a profiled run are a little worse than without.
    """
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    argv = [exe, "record", "--pid", str(pid), "--rate", "250"]
    proc = children.start(output.stem, [*argv, "--format", "raw", "--output", str(output)])
    time.sleep(1.0)  # let it attach before the measured requests start
    children.check(output.stem, proc)
    return proc


def stop_py_spy(children: Children, proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    try:
        proc.wait(timeout=STOP_TIMEOUT_S * 3)
    finally:
        children.stop(proc)


def _idle(leaf: str) -> bool:
    """A sample of a thread waiting: the loop in epoll, an executor thread on its queue."""
    return "select (selectors.py" in leaf or leaf.startswith("_worker (concurrent/futures/")


def _module(frame: str) -> str:
    return frame.partition(" (")[2].rpartition(":")[0]


def hot_spots(path: Path, top: int = 12) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's collapsed stacks, as percentages of the busy samples.

    ``self``: the function on CPU. ``proxy_module`` and ``proxy_line``: the deepest frame
    of ``proxy/`` on the stack, so a line's share includes the library code it calls;
    samples without one are aiohttp and the event loop serving the connection.
    """
    own: dict[str, int] = {}
    modules: dict[str, int] = {}
    lines: dict[str, int] = {}
    total = 0
    outer = ("main (proxy/cli.py", "_serve (proxy/cli.py", "run (proxy/app.py")
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        frames = stack.split(";")
        if _idle(frames[-1]):
            continue
        count = int(count_text)
        total += count
        leaf = f"{frames[-1].partition(' (')[0]} ({_module(frames[-1])})"
        own[leaf] = own.get(leaf, 0) + count
        mine = [f for f in frames if "(proxy/" in f and not f.startswith(outer)]
        deepest = mine[-1] if mine else "(no proxy/ frame: aiohttp, asyncio)"
        where = f"{_module(deepest)} {deepest.partition(' (')[0]}" if mine else deepest
        modules[where] = modules.get(where, 0) + count
        lines[deepest] = lines.get(deepest, 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda item: -item[1])[:top]
        return [(key, round(100 * n / max(1, total), 1)) for key, n in best]

    return {"self": ranked(own), "proxy_function": ranked(modules), "proxy_line": ranked(lines)}


# --- CPU accounting ------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    """utime + stime of the whole process (all threads), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3, "state"
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_ns(pid: int) -> int:
    """On-CPU time of the live threads, in ns, from /proc/<pid>/task/*/schedstat."""
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int((task / "schedstat").read_text().split()[0])
    return total


def machine_busy_s() -> float:
    """CPU time spent by everything on the machine (all CPUs), from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass(frozen=True, slots=True)
class CpuMark:
    stat_s: dict[str, float]
    sched_ns: dict[str, int]
    machine_s: float
    at: float

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuMark:
        return cls(
            {name: cpu_s(pid) for name, pid in pids.items()},
            {name: cpu_ns(pid) for name, pid in pids.items()},
            machine_busy_s(),
            time.monotonic(),
        )


# --- the run -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    title: str
    requests: int
    warmup: int
    concurrency: int
    events: int = 0  # content chunks per stream; 0 = JSON
    delay_ms: float = 0.0
    big_prompt_bytes: int = 0  # meanwhile, a prompt this big sent in a loop
    big_agent: str = ""  # by this agent ("": the default one)

    @property
    def frames(self) -> int:
        return self.events + FRAMING_FRAMES if self.events else 0

    @property
    def stagger_ms(self) -> float:
        """Spread paced streams evenly over one stream's duration (a burst: all at once)."""
        if self.name == "burst":
            return 0.0
        return self.delay_ms * max(0, self.frames - 1) / self.concurrency


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str
    proxy: str | None  # the child whose CPU is "the proxy"; None when direct


@dataclass
class Result:
    phase: str
    target: str
    load: dict[str, Any]
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)
    cpu_us_per_request_schedstat: dict[str, float] = field(default_factory=dict)
    other_cpu_pct: float = 0.0  # CPU used meanwhile by anything but the benchmark's processes


def capproxy_config(upstream_port: int, redis_port: int, port: int) -> dict[str, Any]:
    """One tenant key; 2 windows of tenant caps + 2 of agent caps (4 counters per reserve)."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_grace_s": 1},
        "store": {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout_ms": 250},  # the default
        "upstreams": [
            {
                "name": "fake",
                "base_url": f"http://127.0.0.1:{upstream_port}/v1",
                "api_key": UPSTREAM_KEY,
                "models": ["*"],
                "timeout_s": REQUEST_TIMEOUT_S,
                "connect_timeout_s": 2,
            }
        ],
        "tenants": [
            {
                "id": "bench",
                "api_keys": [TENANT_KEY],
                "budget_caps": [
                    {"window": "hourly", "hard_limit_usd": 1_000_000},
                    {"window": "daily", "hard_limit_usd": 10_000_000},
                ],
            }
        ],
        "cost_caps": {
            "enabled": True,
            "default_budget_caps": [
                {"window": "hourly", "hard_limit_usd": 1_000_000, "soft_limit_usd": 900_000},
                {"window": "daily", "hard_limit_usd": 10_000_000},
            ],
            "default_token_cap": {
                # The "big" phase's prompt fits, once counted: its bound (900,000) does not.
                "max_prompt_tokens": 400_000,
                "max_completion_tokens": 4096,
                "max_total_tokens": 404_096,
            },
            "agents": [
                {
                    "agent_id": BULK_AGENT,
                    "token_cap": {
                        "max_prompt_tokens": 1_000_000,
                        "max_completion_tokens": 4096,
                        "max_total_tokens": 1_004_096,
                    },
                }
            ],
        },
        "pricing": {
            "models": {
                MODEL: {
                    "input_per_mtok": "2.50",
                    "cached_input_per_mtok": "1.25",
                    "output_per_mtok": 10,
                    "max_output_tokens": 16384,
                }
            }
        },
    }


def phases_for(requests: int, warmup: int, concurrency: int, events: int) -> list[Phase]:
    small = max(50, requests // 4)
    return [
        Phase(
            "json", f"non-streamed chat, concurrency {concurrency}", requests, warmup, concurrency
        ),
        Phase("json_c1", "non-streamed chat, concurrency 1 (latency)", small, warmup, 1),
        Phase(
            "big",
            f"non-streamed chat, concurrency 1, while a {BIG_PROMPT_BYTES / 1e6:.1f} MB prompt "
            "is sent in a loop",
            small,
            warmup,
            1,
            big_prompt_bytes=BIG_PROMPT_BYTES,
        ),
        Phase(
            "big_bound",
            f"non-streamed chat, concurrency 1, while a {BIG_PROMPT_BYTES / 1e6:.1f} MB prompt "
            "is sent in a loop by an agent whose token cap its bound passes (never counted)",
            small,
            warmup,
            1,
            big_prompt_bytes=BIG_PROMPT_BYTES,
            big_agent=BULK_AGENT,
        ),
        Phase(
            "stream",
            f"streamed chat, {events} content chunks back to back, concurrency {concurrency}",
            requests,
            warmup,
            concurrency,
            events,
        ),
        Phase(
            "paced",
            f"streamed chat, 20 chunks 2 ms apart, concurrency {concurrency} (first byte)",
            small,
            max(10, warmup // 4),
            concurrency,
            20,
            2.0,
        ),
        Phase(
            "burst",
            f"{BURST} streams started at once, 20 chunks 2 ms apart, no warm-up (store errors)",
            BURST,
            0,
            BURST,
            20,
            2.0,
        ),
    ]


def run_phase(
    children: Children,
    script: Path,
    phase: Phase,
    target: Target,
    pids: dict[str, int],
    profile_dir: Path | None = None,
) -> Result:
    argv = [sys.executable, str(script), "_load", "--url", target.url]
    argv += ["--requests", str(phase.requests), "--warmup", str(phase.warmup)]
    argv += ["--concurrency", str(phase.concurrency), "--events", str(phase.events)]
    argv += ["--delay-ms", str(phase.delay_ms), "--stagger-ms", str(phase.stagger_ms)]
    argv += ["--big-prompt-bytes", str(phase.big_prompt_bytes), "--big-agent", phase.big_agent]
    name = f"load-{phase.name}-{target.name}"
    proc = children.start(name, argv, pipes=True)
    try:
        ready = read_message(proc, PHASE_TIMEOUT_S)
        if ready.get("warmup_errors"):
            raise RuntimeError(f"{name}: warm-up failed: {ready['first']}")
        spy = None
        if profile_dir is not None and target.proxy is not None:
            spy = start_py_spy(children, pids[target.proxy], profile_dir / f"{name}.txt")
        watched = {**pids, "loadgen": proc.pid}
        before = CpuMark.take(watched)
        assert proc.stdin is not None
        proc.stdin.write("GO\n")
        proc.stdin.flush()
        read_message(proc, PHASE_TIMEOUT_S)  # {"done": true}, printed right after the last
        after = CpuMark.take(watched)
        if spy is not None:
            stop_py_spy(children, spy)
        load = read_message(proc, PHASE_TIMEOUT_S)
    finally:
        children.stop(proc)
    n = max(1, load["requests"])
    result = Result(phase.name, target.name, load)
    ours = sum(after.stat_s[w] - before.stat_s[w] for w in watched)
    others = after.machine_s - before.machine_s - ours  # other processes, this script, kernel
    result.other_cpu_pct = max(0.0, others / max(1e-9, after.at - before.at) * 100)
    for who in pids:
        result.cpu_us_per_request[who] = (after.stat_s[who] - before.stat_s[who]) / n * 1e6
        sched = after.sched_ns[who] - before.sched_ns[who]
        result.cpu_us_per_request_schedstat[who] = sched / n / 1e3
    return result


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A memory figure of the process from /proc/<pid>/status, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    redis = shutil.which("redis-server") or ""
    version = ""
    if redis:
        out = subprocess.run([redis, "--version"], capture_output=True, text=True, timeout=10)
        version = out.stdout.split(" v=")[1].split()[0] if " v=" in out.stdout else ""
    return {
        "cpus": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "redis_server": version,
        "clock_ticks_per_s": CLK_TCK,
        "load_average_1m_at_start": os.getloadavg()[0],
    }


def derive(results: list[Result], phases: list[Phase]) -> dict[str, Any]:
    """The headline figures per target."""
    by = {(r.phase, r.target): r for r in results}
    frames = {p.name: p.frames for p in phases}
    summary: dict[str, Any] = {}
    targets = [r.target for r in results if r.phase == "json"]
    for target in targets:
        entry: dict[str, Any] = {}
        for phase in ("json", "json_c1", "stream", "paced"):
            r, direct = by.get((phase, target)), by.get((phase, "direct"))
            if r is None or direct is None:
                continue
            lat = r.load["latency"]
            entry[phase] = {
                "latency_ms": lat,
                "added_p50_ms": lat["p50_ms"] - direct.load["latency"]["p50_ms"],
                "rps": r.load["rps"],
                "errors": r.load["errors"],
                "ttfb_p50_ms": r.load["ttfb"].get("p50_ms"),
                "cpu_us_per_request": r.cpu_us_per_request,
            }
        json_r, stream_r, paced_r = by.get(("json", target)), by.get(("stream", target)), None
        paced_r = by.get(("paced", target))
        proxy = "capproxy" if target == "capproxy" else "baseline" if target == "baseline" else ""
        if proxy and json_r and stream_r and paced_r:
            per_req = json_r.cpu_us_per_request[proxy]
            entry["proxy_cpu_us_per_request"] = per_req
            entry["proxy_cpu_us_per_request_schedstat"] = json_r.cpu_us_per_request_schedstat[proxy]
            for name, r in (("stream", stream_r), ("paced", paced_r)):
                per_stream = r.cpu_us_per_request[proxy]
                entry[f"proxy_cpu_us_per_event_{name}"] = (per_stream - per_req) / frames[name]
                entry[f"proxy_cpu_us_per_event_{name}_raw"] = per_stream / frames[name]
            if proxy == "capproxy":
                entry["redis_cpu_us_per_request"] = json_r.cpu_us_per_request["redis"]
        summary[target] = entry
    return summary


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(
    out: TextIO, info: dict[str, Any], settings: dict[str, Any], results: list[Result]
) -> None:
    by = {(r.phase, r.target): r for r in results}
    cpu = f"{info['cpus']} CPUs ({info['cpu_model']})"
    print(
        f"\nmachine: {cpu}, Linux {info['kernel']}, Python {info['python']}, "
        f"aiohttp {info['aiohttp']}, redis-server {info['redis_server']}; "
        f"1-minute load average {info['load_average_1m_at_start']:.2f} at start, "
        f"{info['load_average_1m_at_end']:.2f} at end",
        file=out,
    )
    print(
        "every part is its own process: load generator, fake upstream, proxy (and Redis); "
        "they share those CPUs, so latency and req/s include contention; CPU figures do not.",
        file=out,
    )
    print(
        "us/req columns: CPU of that process per request; loadgen %: the generator's CPU "
        "(100 = one CPU); other %: CPU used meanwhile by anything else on the machine "
        "(high values disturb latency and req/s).",
        file=out,
    )
    print(
        f"requests per phase {settings['requests']} (latency-only and paced phases "
        f"{settings['small_requests']}), warm-up {settings['warmup']}, "
        f"concurrency {settings['concurrency']}",
        file=out,
    )
    for phase in settings["phases"]:
        name = phase["name"]
        print(f"\n{phase['title']}", file=out)
        streaming = phase["events"] > 0
        head = f"  {'target':<9} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'+p50 ms':>8}"
        head += f" {'req/s':>7}"
        head += f" {'ttfb p50':>8}" if streaming else ""
        head += f" {'proxy us/req':>12} {'upstream':>8} {'redis':>6}"
        head += f" {'loadgen %':>9} {'other %':>7} errors"
        print(head, file=out)
        direct = by.get((name, "direct"))
        for target in ("direct", "baseline", "capproxy"):
            r = by.get((name, target))
            if r is None:
                continue
            lat = r.load["latency"]
            added = lat["p50_ms"] - direct.load["latency"]["p50_ms"] if direct else None
            proxy_cpu = r.cpu_us_per_request.get(target) if target != "direct" else None
            redis_cpu = r.cpu_us_per_request.get("redis") if target == "capproxy" else None
            gen_pct = r.load["loadgen_cpu_s"] / r.load["wall_s"] * 100 if r.load["wall_s"] else 0
            row = f"  {target:<9} {lat['p50_ms']:7.2f} {lat['p90_ms']:7.2f} {lat['p99_ms']:7.2f}"
            row += f" {_fmt(added):>8} {r.load['rps']:7.0f}"
            row += f" {_fmt(r.load['ttfb'].get('p50_ms')):>8}" if streaming else ""
            row += f" {_fmt(proxy_cpu, 0):>12} {r.cpu_us_per_request['upstream']:8.0f}"
            row += f" {_fmt(redis_cpu, 0):>6} {gen_pct:9.0f} {r.other_cpu_pct:7.0f}"
            row += f" {r.load['errors']}"
            print(row, file=out)
    summary = derive(results, [Phase(**p) for p in settings["phases"]])
    print("\nproxy CPU (utime+stime of the proxy process over the measured requests):", file=out)
    tick_ms = 1000 / info["clock_ticks_per_s"]
    print(
        f"  /proc tick {tick_ms:.0f} ms: resolution {tick_ms * 1000 / settings['requests']:.0f}"
        f" us/request at {settings['requests']} requests,"
        f" {tick_ms * 1000 / settings['small_requests']:.0f} at {settings['small_requests']}"
        " (schedstat, in ns, in parentheses)",
        file=out,
    )
    print(
        "  per event = (CPU per stream - CPU per non-streamed request) / frames per stream"
        f" ({settings['events']} + {FRAMING_FRAMES} back to back; 20 + {FRAMING_FRAMES} paced)",
        file=out,
    )
    for target in ("baseline", "capproxy"):
        s = summary.get(target, {})
        if "proxy_cpu_us_per_request" not in s:
            continue
        line = f"  {target:<9} {s['proxy_cpu_us_per_request']:6.0f} us/request"
        line += f" ({s['proxy_cpu_us_per_request_schedstat']:.0f})"
        line += f"  {s['proxy_cpu_us_per_event_stream']:5.1f} us/event back to back"
        line += f"  {s['proxy_cpu_us_per_event_paced']:5.1f} us/event paced"
        if target == "capproxy":
            line += f"  (+ Redis {s['redis_cpu_us_per_request']:.0f} us/request)"
        print(line, file=out)
    memory = info.get("memory", {})
    if memory:
        print(
            "\nmemory (MB): "
            + "; ".join(
                f"{name} RSS idle {m['rss_idle_mb']:.0f}, peak {m.get('rss_peak_mb', 0):.0f}"
                for name, m in memory.items()
            ),
            file=out,
        )
    for target, phase in itertools.product(("baseline", "capproxy"), ("big", "big_bound")):
        r, alone = by.get((phase, target)), by.get(("json_c1", target))
        if r is not None and alone is not None:
            how = "counted" if phase == "big" else "held on its bound"
            print(
                f"large prompt ({how} by capproxy), {target}: small requests p50/p99 "
                f"{alone.load['latency']['p50_ms']:.2f}/{alone.load['latency']['p99_ms']:.2f} ms"
                f" alone, {r.load['latency']['p50_ms']:.2f}/{r.load['latency']['p99_ms']:.2f} ms"
                f" while {r.load['big_requests']} prompts of {BIG_PROMPT_BYTES / 1e6:.1f} MB"
                f" went through ({r.load['big_errors']} failed)",
                file=out,
            )
    for target in ("baseline", "capproxy"):
        r = by.get(("burst", target))
        if r is not None:
            print(
                f"burst of {r.load['requests']} streams, {target}: {r.load['errors']} errors, "
                f"{r.load.get('store_errors', 0)} store errors (503 store_unavailable), "
                f"{r.load.get('redis_connections_opened', 0)} Redis connections opened"
                + (f"; first: {r.load['first_error'][:160]}" if r.load["errors"] else ""),
                file=out,
            )
    base, cap = summary.get("baseline", {}), summary.get("capproxy", {})
    if "proxy_cpu_us_per_request" in base and "proxy_cpu_us_per_request" in cap:
        ratios = [
            ("CPU/request", "proxy_cpu_us_per_request"),
            ("CPU/event back to back", "proxy_cpu_us_per_event_stream"),
            ("CPU/event paced", "proxy_cpu_us_per_event_paced"),
        ]
        parts = [f"{label} x{cap[key] / base[key]:.2f}" for label, key in ratios if base[key] >= 1]
        b1, c1 = base.get("json_c1", {}), cap.get("json_c1", {})
        if b1 and c1:
            parts.append(
                f"added p50 at concurrency 1: {c1['added_p50_ms']:.2f} ms vs "
                f"{b1['added_p50_ms']:.2f} ms"
            )
        print("capproxy vs baseline: " + "; ".join(parts), file=out)


def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    script = Path(__file__).resolve()
    requests = args.requests if args.requests is not None else (300 if args.quick else 2000)
    warmup = args.warmup if args.warmup is not None else max(20, requests // 10)
    phases = phases_for(requests, warmup, args.concurrency, args.events)
    redis = shutil.which("redis-server")
    if redis is None:
        raise RuntimeError("redis-server is not on PATH")
    capproxy = Path(sys.executable).with_name("capproxy")
    serve = [str(capproxy)] if capproxy.exists() else [sys.executable, "-m", "proxy"]
    info = machine()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="capproxy-bench-") as tmp:
        logdir = Path(args.logdir) if args.logdir else Path(tmp)
        logdir.mkdir(parents=True, exist_ok=True)
        if args.py_spy:
            args.py_spy.mkdir(parents=True, exist_ok=True)
        children = Children(logdir)
        try:
            ports = {name: free_port() for name in ("redis", "upstream", "baseline", "capproxy")}
            config = Path(tmp) / "capproxy.yaml"
            config.write_text(
                json.dumps(capproxy_config(ports["upstream"], ports["redis"], ports["capproxy"]))
            )
            py = [sys.executable, str(script)]
            origin = f"http://127.0.0.1:{ports['upstream']}"
            commands = {
                "redis": [redis, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                "upstream": [*py, "_upstream"],
                "baseline": [*py, "_baseline", "--upstream", origin],
                "capproxy": [*serve, "serve", "--config", str(config), "--host", "127.0.0.1"],
            }
            for name, argv in commands.items():
                argv.extend(["--port", str(ports[name])])
            procs = {name: children.start(name, argv) for name, argv in commands.items()}
            for name, proc in procs.items():
                port = ports[name]
                probe = (
                    (lambda p=port: redis_ok(p))
                    if name == "redis"
                    else functools.partial(http_ok, port)
                )
                _poll_until(probe, what=name, alive=functools.partial(children.check, name, proc))
            pids = {name: proc.pid for name, proc in procs.items()}
            memory = {n: {"rss_idle_mb": rss_mb(pids[n])} for n in ("baseline", "capproxy")}
            if args.print_pids:
                print(json.dumps(pids), file=sys.stderr)
            targets = [
                Target("direct", origin, None),
                Target("baseline", f"http://127.0.0.1:{ports['baseline']}", "baseline"),
                Target("capproxy", f"http://127.0.0.1:{ports['capproxy']}", "capproxy"),
            ]
            for phase in phases:
                for target in targets:
                    print(f"  {phase.name:<8} {target.name:<9} ...", file=sys.stderr, flush=True)
                    before = redis_connections(ports["redis"])
                    results.append(run_phase(children, script, phase, target, pids, args.py_spy))
                    opened = redis_connections(ports["redis"]) - before - 1  # less this probe's
                    results[-1].load["redis_connections_opened"] = opened
                    for name, proc in procs.items():
                        children.check(name, proc)
            for name in memory:
                memory[name]["rss_peak_mb"] = rss_mb(pids[name], "VmHWM")
        finally:
            children.stop_all()
    info["load_average_1m_at_end"] = os.getloadavg()[0]
    info["memory"] = memory
    settings = {
        "requests": requests,
        "small_requests": phases[1].requests,
        "warmup": warmup,
        "concurrency": args.concurrency,
        "events": args.events,
        "phases": [asdict(p) for p in phases],
    }
    return {
        "machine": info,
        "settings": settings,
        "cpu_formula": {
            "cpu_us_per_request": "(utime+stime after - before) of the process / measured requests",
            "cpu_us_per_event": "(cpu_us_per_stream - cpu_us_per_request of non-streamed chat)"
            " / SSE frames per stream (content chunks + 4)",
            "cpu_us_per_event_raw": "cpu_us_per_stream / SSE frames per stream",
        },
        "results": [asdict(r) for r in results],
        "summary": derive(results, phases),
    }


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    roles = {"_upstream": upstream_role, "_baseline": baseline_role, "_load": load_role}
    if argv and argv[0] in roles:
        return roles[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(
        prog="overhead.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--requests", type=int, help="measured requests per phase (2000)")
    parser.add_argument("--warmup", type=int, help="warm-up requests (requests / 10)")
    parser.add_argument("--concurrency", type=int, default=50, help="in-flight requests (50)")
    parser.add_argument("--events", type=int, default=50, help="content chunks per stream")
    parser.add_argument("--quick", action="store_true", help="300 requests per phase")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--logdir", help="keep the children's logs here")
    parser.add_argument("--print-pids", action="store_true", help="print child pids to stderr")
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record each proxy phase with py-spy into DIR and print the hot spots\n"
        "(the sampler shares the CPUs: don't quote latency from such a run)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 256 or not 1 <= args.events <= MAX_EVENTS:
        parser.error("--concurrency must be 1-256 and --events 1-10000")
    if args.requests is not None and not 1 <= args.requests <= 1_000_000:
        parser.error("--requests must be 1-1000000")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        data = orchestrate(args)
    except KeyboardInterrupt:
        print("interrupted; child processes stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    results = [Result(**r) for r in data["results"]]
    report(sys.stdout, data["machine"], data["settings"], results)
    if args.py_spy:
        data["hot_spots"] = {}
        for path in sorted(args.py_spy.glob("load-*.txt")):
            spots = data["hot_spots"][path.stem] = hot_spots(path)
            if not path.stem.endswith("-capproxy"):
                continue
            print(f"\npy-spy {path} (% of busy samples):")
            for kind, rows in spots.items():
                print(f"  {kind}:")
                for key, share in rows:
                    print(f"    {share:5.1f}%  {key}")
    if args.json:
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

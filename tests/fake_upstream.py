"""A fake OpenAI-compatible upstream on loopback that counts and records what it receives."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    raw: bytes = b""


UsageFn = Callable[[str, dict[str, Any]], dict[str, Any] | None]


def default_usage(path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    if path.endswith("/embeddings"):
        return {"prompt_tokens": 8, "total_tokens": 8}
    if path.endswith("/responses"):
        return {
            "input_tokens": 10,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 20,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 30,
        }
    return {
        "prompt_tokens": 10,
        "completion_tokens": 20,
        "total_tokens": 30,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


@dataclass
class FakeUpstream:
    """Behaviour is set per test by assigning the public fields."""

    url: str = ""  # the base URL, ending in /v1, once served
    received: list[Received] = field(default_factory=list)
    status: int = 200
    error_body: dict[str, Any] = field(
        default_factory=lambda: {"error": {"message": "boom", "type": "server_error"}}
    )
    usage: UsageFn = default_usage
    raw_body: bytes | None = None  # replaces the JSON answer when set
    gate: asyncio.Event | None = None  # when set, answers wait for it
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set by each POST
    delay_s: float = 0.0
    extra_headers: dict[str, str] = field(default_factory=dict)
    # Streaming: "openai" sends the usage-only chunk only when asked (include_usage),
    # "vllm" sends it with "choices": null, "every" puts usage on every chunk, "none" never.
    stream_usage: str = "openai"
    deltas: tuple[str, ...] = ("Hel", "lo", " wor", "ld", "!")
    cut_after: int | None = None  # abort the connection after this many events
    pause_after: int | None = None  # wait for `resume` after this many events
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    event_delay_s: float = 0.0
    streamed: list[bytearray] = field(default_factory=list)  # the bytes sent, per stream
    stream_closed: asyncio.Event = field(default_factory=asyncio.Event)
    blocked_since: float | None = None  # when the current write started waiting
    # Merged into every answer, every chat/completions chunk and the Responses response
    # object (e.g. {"service_tier": "priority"}).
    answer_extra: dict[str, Any] = field(default_factory=dict)
    # Extra Responses output items (hosted tool calls), before the message.
    output_items: list[dict[str, Any]] = field(default_factory=list)
    finished: int = 0  # answers and streams written to their end
    _finished_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, n: int) -> None:
        """Until ``n`` answers or streams have been written to their end."""
        while self.finished < n:
            self._finished_event.clear()
            await self._finished_event.wait()

    def _finish(self) -> None:
        self.finished += 1
        self._finished_event.set()

    @property
    def count(self) -> int:
        return sum(1 for r in self.received if r.method == "POST")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/{path:.+}", self._post)
        app.router.add_get("/v1/models", self._models)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        self.received.append(Received("GET", request.path, dict(request.headers), None))
        return web.json_response({"object": "list", "data": [{"id": "gpt-4o", "object": "model"}]})

    async def _post(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        body = json.loads(raw)
        self.received.append(Received("POST", request.path, dict(request.headers), body, raw))
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.json_response(self.error_body, status=self.status)
        if body.get("stream") is True:
            return await self._stream(request, body)
        if self.raw_body is not None:
            return web.Response(body=self.raw_body, content_type="application/json")
        answer = self.answer(request.path, body)
        self._finish()
        return web.json_response(answer, headers={"x-request-id": "req_123", **self.extra_headers})

    async def _stream(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        events = self.stream_events(request.path, body)
        resp = web.StreamResponse(headers={"x-request-id": "req_stream"})
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        sent = bytearray()
        self.streamed.append(sent)
        try:
            for i, event in enumerate(events):
                if self.cut_after is not None and i == self.cut_after:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if self.pause_after is not None and i == self.pause_after:
                    await self.resume.wait()
                if self.event_delay_s:
                    await asyncio.sleep(self.event_delay_s)
                self.blocked_since = time.monotonic()
                await resp.write(event)
                self.blocked_since = None
                sent += event
            await resp.write_eof()
            self._finish()
        finally:
            self.stream_closed.set()
        return resp

    def stream_events(self, path: str, body: dict[str, Any]) -> list[bytes]:
        """The SSE byte frames for a streamed answer, shaped like OpenAI's."""
        usage = self.usage(path, body)
        if path.endswith("/responses"):
            return self._responses_events(body, usage)
        chat = path.endswith("/chat/completions")
        opts = body.get("stream_options")
        asked = isinstance(opts, dict) and opts.get("include_usage") is True
        base = {"id": "chatcmpl-s", "created": 1, "model": body.get("model"), **self.answer_extra}
        base["object"] = "chat.completion.chunk" if chat else "text_completion"
        every = self.stream_usage == "every" and usage is not None
        chunks: list[dict[str, Any]] = []
        if chat:
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            chunks.append({**base, "choices": [{**first, "finish_reason": None}]})
        for text in self.deltas:
            choice: dict[str, Any] = {"index": 0, "finish_reason": None}
            if chat:
                choice["delta"] = {"content": text}
            else:
                choice["text"] = text
            chunks.append({**base, "choices": [choice]})
        last: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if chat:
            last["delta"] = {}
        else:
            last["text"] = ""
        chunks.append({**base, "choices": [last]})
        if every:
            chunks = [{**c, "usage": usage} for c in chunks]
        elif usage is not None and self.stream_usage == "vllm":
            chunks.append({**base, "choices": None, "usage": usage})
        elif usage is not None and self.stream_usage == "openai" and asked:
            for c in chunks:
                c["usage"] = None
            chunks.append({**base, "choices": [], "usage": usage})
        frames = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
        return [b": keep-alive\n\n", *frames, b"data: [DONE]\n\n"]

    def _responses_events(self, body: dict[str, Any], usage: dict[str, Any] | None) -> list[bytes]:
        model = body.get("model")
        text = "".join(self.deltas)
        response: dict[str, Any] = {
            "id": "resp_s",
            "object": "response",
            "created_at": 1,
            "model": model,
            "status": "in_progress",
            "output": [],
            "usage": None,
            **self.answer_extra,
        }
        item = {"id": "msg_s", "type": "message", "role": "assistant", "status": "in_progress"}
        part = {"type": "output_text", "text": "", "annotations": []}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": response},
            {"type": "response.in_progress", "response": response},
        ]
        for tool_item in self.output_items:
            events.append({"type": "response.output_item.added", "item": tool_item})
            events.append({"type": "response.output_item.done", "item": tool_item})
        events += [
            {
                "type": "response.output_item.added",
                "output_index": 0,
                "item": {**item, "content": []},
            },
            {
                "type": "response.content_part.added",
                "item_id": "msg_s",
                "output_index": 0,
                "content_index": 0,
                "part": part,
            },
        ]
        for delta in self.deltas:
            events.append(
                {
                    "type": "response.output_text.delta",
                    "item_id": "msg_s",
                    "output_index": 0,
                    "content_index": 0,
                    "delta": delta,
                    "logprobs": [],
                }
            )
        done_part = {**part, "text": text}
        done_item = {**item, "status": "completed", "content": [done_part]}
        events += [
            {
                "type": "response.output_text.done",
                "item_id": "msg_s",
                "output_index": 0,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            },
            {
                "type": "response.content_part.done",
                "item_id": "msg_s",
                "output_index": 0,
                "content_index": 0,
                "part": done_part,
            },
            {"type": "response.output_item.done", "output_index": 0, "item": done_item},
        ]
        final = {**response, "status": "completed", "output": [*self.output_items, done_item]}
        if usage is not None and self.stream_usage != "none":
            final["usage"] = usage
        events.append({"type": "response.completed", "response": final})
        out = []
        for seq, event in enumerate(events):
            event["sequence_number"] = seq
            out.append(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
        return out

    def answer(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        usage = self.usage(path, body)
        model = body.get("model", "gpt-4o")
        answer: dict[str, Any]
        if path.endswith("/embeddings"):
            answer = {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": model,
            }
        elif path.endswith("/responses"):
            answer = {
                "id": "resp_1",
                "object": "response",
                "status": "completed",
                "model": model,
                "output": [
                    *self.output_items,
                    {
                        "type": "message",
                        "id": "msg_1",
                        "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": "Hi!", "annotations": []}],
                    },
                ],
            }
        elif path.endswith("/completions") and "chat" not in path:
            answer = {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": model,
                "choices": [{"index": 0, "text": "Hi!", "finish_reason": "stop"}],
            }
        else:
            answer = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hi!"},
                        "finish_reason": "stop",
                    }
                ],
            }
        if usage is not None:
            answer["usage"] = usage
        return {**answer, **self.answer_extra}


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()

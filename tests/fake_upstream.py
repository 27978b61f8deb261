"""A fake OpenAI-compatible upstream on loopback that counts and records what it receives."""

from __future__ import annotations

import asyncio
import json
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
    delay_s: float = 0.0
    extra_headers: dict[str, str] = field(default_factory=dict)

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
        body = await request.json()
        self.received.append(Received("POST", request.path, dict(request.headers), body))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.status != 200:
            return web.json_response(self.error_body, status=self.status)
        if self.raw_body is not None:
            return web.Response(body=self.raw_body, content_type="application/json")
        answer = self.answer(request.path, body)
        return web.json_response(answer, headers={"x-request-id": "req_123", **self.extra_headers})

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
                    {
                        "type": "message",
                        "id": "msg_1",
                        "role": "assistant",
                        "status": "completed",
                        "content": [{"type": "output_text", "text": "Hi!", "annotations": []}],
                    }
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
        return answer


def dumps(obj: Any) -> bytes:
    return json.dumps(obj).encode()

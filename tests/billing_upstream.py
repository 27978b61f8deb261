"""A fake OpenAI-compatible upstream that bills like OpenAI and keeps its own invoice.

    upstream = BillingUpstream(models=MODELS, tool_prices=TOOL_PRICES, prompt_tokens_for=count)
    server = await aiohttp_server(upstream.app())
    upstream.url = str(server.make_url("/v1"))
    upstream.plan("inv-7", Plan(seed=7, pause_after=2))   # optional, per request
    ...                                  # the client sends {"user": "inv-7", ...} through the proxy
    await upstream.finished("inv-7")
    upstream.invoice[request_id("inv-7")]   # what the upstream billed, integer micro-USD
    upstream.total_micros

A request is correlated by its ``user`` field (the marker); its request id
(``request_id(marker)``) is also sent back as ``x-request-id``. What a request costs is
decided when it arrives, from the body the upstream received, and is billed whatever the
client does next (OpenAI bills what it generates, even for a client that went away):

* prompt tokens: ``prompt_tokens_for(path, body)`` over the body's text (the test injects a
  counter), plus hidden input the upstream chooses for images, files, stored state
  (``previous_response_id``, ``conversation``, a stored ``prompt``, ``item_reference``
  items), up to the model's ``max_input_tokens``; each hosted tool call re-reads the
  context plus what the tool brought back (again up to ``max_input_tokens``);
* output tokens per generated choice: up to the LARGEST output-limit field present
  (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``), capped at the model's
  maximum, which is also the limit when none is present; chat generates ``n`` choices,
  completions ``prompts x max(n, best_of)``; reasoning models spend part of it on hidden
  reasoning (reported in the usage details, never in a delta);
* hosted tools (Responses ``web_search``, ``file_search``, ``code_interpreter``): up to
  ``max_tool_calls`` calls in all, else up to ``DEFAULT_CALLS_PER_TOOL`` per tool, each at
  its per-call price (code interpreter by its container's ``memory_limit``, an automatic
  container billed once even when the model never calls it); a chat
  request with ``web_search_options`` searches once, always; each search's results are
  read as input (hidden input, as above), and only Responses reports calls as items;
* ``service_tier``: ``"priority"`` only when a chat or Responses request asked for it
  (billed at the model's ``priority_multiplier``, and reported), else ``"default"``.

The prices here are the upstream's own (``ModelTerms``); ``ModelTerms.config()`` is the
matching ``pricing.models`` entry for the proxy. Nothing here imports the proxy.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

from aiohttp import web

OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Hosted tool types as requested -> the name they are priced under.
HOSTED_TOOLS = {
    "web_search": "web_search",
    "web_search_preview": "web_search",
    "file_search": "file_search",
    "code_interpreter": "code_interpreter",
}
# The output item a hosted call returns, and its in-between stream events.
_CALL_ITEMS = {
    "web_search": ("web_search_call", ("in_progress", "searching", "completed")),
    "file_search": ("file_search_call", ("in_progress", "searching", "completed")),
    "code_interpreter": ("code_interpreter_call", ("in_progress", "interpreting", "completed")),
}
DEFAULT_CALLS_PER_TOOL = 4
# Where OpenAI offers priority processing (and reports the tier served).
PRIORITY_ENDPOINTS = frozenset({"chat/completions", "responses"})
# Hidden input for a model without max_input_tokens (a request the proxy should refuse).
UNBOUNDED_HIDDEN_TOKENS = 1_000_000
# Visible output: one token per word (" a" is one token in cl100k_base and o200k_base).
WORD = " a"
WORDS_PER_DELTA = 64
# Content parts and input items the upstream sizes itself (hidden input).
_UNSIZED_PARTS = frozenset({"image_url", "input_image", "file", "input_file", "input_audio"})
_STATE_FIELDS = ("previous_response_id", "conversation", "prompt")

PromptCounter = Callable[[str, Mapping[str, Any]], int]


def request_id(marker: str) -> str:
    """The upstream request id of the request whose ``user`` is ``marker``."""
    return f"req-{marker}"


@dataclass(frozen=True, kw_only=True)
class ModelTerms:
    """One model as the upstream bills it: USD per 1M tokens (= micro-USD per token)."""

    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal
    output_per_mtok: Decimal
    max_output_tokens: int | None
    max_input_tokens: int | None
    reasoning: bool = False
    priority_multiplier: int = 2

    def config(self) -> dict[str, Any]:
        """The proxy's ``pricing.models`` entry with the same prices."""
        out: dict[str, Any] = {
            "input_per_mtok": str(self.input_per_mtok),
            "cached_input_per_mtok": str(self.cached_input_per_mtok),
            "output_per_mtok": str(self.output_per_mtok),
            "reasoning": self.reasoning,
            "priority_multiplier": self.priority_multiplier,
        }
        if self.max_output_tokens is not None:
            out["max_output_tokens"] = self.max_output_tokens
        if self.max_input_tokens is not None:
            out["max_input_tokens"] = self.max_input_tokens
        return out


@dataclass(kw_only=True)
class Plan:
    """How the upstream behaves for one request (by marker); the amounts come from ``seed``."""

    seed: int = 0
    # Abort the connection after this many stream events (0: before answering at all).
    cut_after: int | None = None
    # Answer (or end the stream) without usage, as some servers do.
    omit_usage: bool = False
    # Wait for ``resume`` after this many stream events (0: before answering at all);
    # ``paused`` is set on arrival there.
    pause_after: int | None = None
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    paused: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(kw_only=True)
class Charge:
    """What the upstream generated and billed for one request."""

    request_id: str
    marker: str | None
    path: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int  # hidden reasoning included
    reasoning_tokens: int
    tool_calls: dict[str, int]
    service_tier: str
    micros: int
    visible: list[int]  # visible output tokens of each returned choice
    streamed: bool
    usage_delivered: bool = False  # the usage reached the wire, and the answer ended
    cut: bool = False  # the upstream aborted the connection


class BadRequest(Exception):
    """An upstream 400, billed nothing."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _amount(rng: random.Random, limit: int) -> int:
    """A token amount in [0, limit], often at the ends: the edges are where caps break."""
    if limit <= 0:
        return 0
    roll = rng.random()
    if roll < 0.45:
        return limit
    if roll < 0.55:
        return 0
    return rng.randint(0, limit)


def _int_field(body: Mapping[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequest(name, f"Invalid '{name}': expected an integer >= {minimum}.")
    return value


def output_limit(body: Mapping[str, Any], terms: ModelTerms) -> int:
    """Per choice: the largest output-limit field present, at most the model's maximum."""
    limits = [v for name in OUTPUT_FIELDS if (v := _int_field(body, name, 1)) is not None]
    ceiling = terms.max_output_tokens
    if not limits:
        return ceiling if ceiling is not None else 4096
    return min(max(limits), ceiling) if ceiling is not None else max(limits)


def prompt_count(prompt: object) -> int:
    """How many prompts a completions ``prompt`` holds (a list of ints is one prompt)."""
    if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
        return len(prompt)
    return 1


def _parts(content: object) -> list[Any]:
    return content if isinstance(content, list) else []


def _hidden_sources(endpoint: str, body: Mapping[str, Any]) -> int:
    """How many pieces of the input the upstream sizes itself."""
    count = 0
    if endpoint == "chat/completions":
        for msg in _parts(body.get("messages")):
            if isinstance(msg, dict):
                count += sum(
                    1
                    for p in _parts(msg.get("content"))
                    if isinstance(p, dict) and p.get("type") in _UNSIZED_PARTS
                )
    elif endpoint == "responses":
        count += sum(1 for name in _STATE_FIELDS if body.get(name) is not None)
        for item in _parts(body.get("input")):
            if not isinstance(item, dict):
                continue
            if item.get("type") == "item_reference":
                count += 1
            count += sum(
                1
                for p in _parts(item.get("content"))
                if isinstance(p, dict) and p.get("type") in _UNSIZED_PARTS
            )
    return count


def text_only(endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` without the input the upstream sizes itself (what a text counter can read)."""
    out = dict(body)

    def strip(msg: object) -> object:
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
            return msg
        kept = [
            p
            for p in msg["content"]
            if not (isinstance(p, dict) and p.get("type") in _UNSIZED_PARTS)
        ]
        return {**msg, "content": kept}

    if endpoint == "chat/completions" and isinstance(body.get("messages"), list):
        out["messages"] = [strip(m) for m in body["messages"]]
    elif endpoint == "responses":
        for name in _STATE_FIELDS:
            out.pop(name, None)
        if isinstance(body.get("input"), list):
            out["input"] = [
                strip(i)
                for i in body["input"]
                if not (isinstance(i, dict) and i.get("type") == "item_reference")
            ]
    return out


def _container_memory(tools: list[Any]) -> str | None:
    """The largest ``memory_limit`` of the automatic code interpreter containers asked for
    (one container serves the response)."""
    sizes = [
        t["container"].get("memory_limit")
        for t in tools
        if isinstance(t, dict)
        and t.get("type") == "code_interpreter"
        and isinstance(t.get("container"), dict)
        and isinstance(t["container"].get("memory_limit"), str)
    ]
    return max(sizes, key=lambda m: float(m.removesuffix("g")), default=None)


def _tool_calls(endpoint: str, body: Mapping[str, Any], rng: random.Random) -> dict[str, int]:
    """Hosted tool calls made (by the name they are priced under), within what the request
    allows: Responses ``tools``; chat ``web_search_options`` (one search, always)."""
    if endpoint == "chat/completions":
        # OpenAI's chat search models search before every answer, and never itemise it.
        return {} if body.get("web_search_options") is None else {"web_search": 1}
    if endpoint != "responses":
        return {}
    tools = _parts(body.get("tools"))
    names = list(
        dict.fromkeys(
            HOSTED_TOOLS[t["type"]]
            for t in tools
            if isinstance(t, dict) and t.get("type") in HOSTED_TOOLS
        )
    )
    if not names:
        return {}
    memory = _container_memory(tools)
    if memory not in (None, "1g"):
        names = [f"{n}_{memory}" if n == "code_interpreter" else n for n in names]
    allowed = _int_field(body, "max_tool_calls", 0)
    calls = {name: _amount(rng, DEFAULT_CALLS_PER_TOOL) for name in names}
    if allowed is not None:
        left = allowed
        for name in names:
            calls[name] = min(calls[name], left)
            left -= calls[name]
    return {name: count for name, count in calls.items() if count}


def _container_sessions(endpoint: str, body: Mapping[str, Any]) -> dict[str, int]:
    """The automatic code interpreter container a Responses request starts (and is billed
    for) whether or not the model calls the tool, by the name it is priced under."""
    tools = _parts(body.get("tools"))
    automatic = any(
        isinstance(t, dict)
        and t.get("type") == "code_interpreter"
        and isinstance(t.get("container"), dict)
        for t in tools
    )
    if endpoint != "responses" or not automatic:
        return {}
    memory = _container_memory(tools) or "1g"
    return {"code_interpreter" if memory == "1g" else f"code_interpreter_{memory}": 1}


def tool_kind(name: str) -> str:
    """The tool a priced name belongs to (``code_interpreter_4g`` -> ``code_interpreter``)."""
    return "code_interpreter" if name.startswith("code_interpreter") else name


def _cost(
    terms: ModelTerms,
    *,
    prompt: int,
    cached: int,
    completion: int,
    tier: str,
    tool_calls: Mapping[str, int],
    tool_prices: Mapping[str, int],
) -> int:
    multiplier = terms.priority_multiplier if tier == "priority" else 1
    tokens = (
        (prompt - cached) * Fraction(terms.input_per_mtok)
        + cached * Fraction(terms.cached_input_per_mtok)
        + completion * Fraction(terms.output_per_mtok)
    ) * multiplier
    calls = sum(count * tool_prices[name] for name, count in tool_calls.items())
    return math.ceil(tokens + calls)


async def _held_or_cut(request: web.Request, charge: Charge, plan: Plan) -> bool:
    """Before answering: wait for ``resume`` if the plan pauses at 0, and True (the
    connection aborted) if it cuts at 0."""
    if plan.pause_after == 0:
        plan.paused.set()
        await plan.resume.wait()
    if plan.cut_after == 0:
        charge.cut = True
        assert request.transport is not None
        request.transport.abort()
        return True
    return False


class BillingUpstream:
    """Serves ``POST /v1/{chat/completions,completions,embeddings,responses}`` and bills them.

    ``invoice`` maps request id -> billed micro-USD; ``received`` lists every marker that
    reached it (billed or not); ``finished(marker)`` / ``wait_for(n)`` wait for answers to end.
    """

    def __init__(
        self,
        *,
        models: Mapping[str, ModelTerms],
        tool_prices: Mapping[str, int],
        prompt_tokens_for: PromptCounter,
    ) -> None:
        self.url = ""
        self.models = dict(models)
        self.tool_prices = dict(tool_prices)
        self.prompt_tokens_for = prompt_tokens_for
        self.received: list[str | None] = []
        self.bodies: dict[str, dict[str, Any]] = {}
        self.charges: dict[str, Charge] = {}
        self.invoice: dict[str, int] = {}
        self.refused: dict[str, int] = {}  # request id -> status, not billed
        self.done = 0
        self._plans: dict[str, Plan] = {}
        self._done_event = asyncio.Event()
        self._finished: dict[str, asyncio.Event] = {}
        self._anonymous = 0

    # --- the test's side ------------------------------------------------------------

    @property
    def total_micros(self) -> int:
        return sum(self.invoice.values())

    def plan(self, marker: str, plan: Plan) -> Plan:
        self._plans[marker] = plan
        return plan

    def saw(self, marker: str) -> bool:
        return marker in self.received

    def charge(self, marker: str) -> Charge | None:
        return self.charges.get(request_id(marker))

    async def finished(self, marker: str) -> None:
        """Until the request with this marker has been answered (or cut) to its end."""
        await self._event(marker).wait()

    async def wait_for(self, n: int) -> None:
        """Until ``n`` requests have been answered (or cut, or refused) to their end."""
        while self.done < n:
            self._done_event.clear()
            await self._done_event.wait()

    def _event(self, marker: str) -> asyncio.Event:
        return self._finished.setdefault(marker, asyncio.Event())

    # --- serving --------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/{path:.+}", self._post)
        return app

    async def _post(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        endpoint = request.match_info["path"]
        marker = body.get("user") if isinstance(body.get("user"), str) else None
        if marker is None:
            self._anonymous += 1
            rid = f"req-anon-{self._anonymous}"
        else:
            rid = request_id(marker)
        self.received.append(marker)
        self.bodies[rid] = body
        plan = self._plans.get(marker or "", Plan())
        try:
            terms = self.models.get(body.get("model", ""))
            if terms is None:
                return self._error(rid, 404, "model", "The model does not exist.")
            try:
                charge = self._bill(rid, marker, endpoint, body, terms, random.Random(plan.seed))
            except BadRequest as exc:
                return self._error(rid, 400, exc.param, str(exc))
            self.charges[rid] = charge
            self.invoice[rid] = charge.micros  # generation has started: it is billed
            if charge.streamed:
                return await self._stream(request, endpoint, body, charge, plan)
            return await self._answer(request, endpoint, body, charge, plan)
        finally:
            self.done += 1
            self._done_event.set()
            if marker is not None:
                self._event(marker).set()

    def _error(self, rid: str, status: int, param: str, message: str) -> web.Response:
        self.refused[rid] = status
        error = {"message": message, "type": "invalid_request_error", "param": param}
        return web.json_response(
            {"error": {**error, "code": "upstream_refused"}},
            status=status,
            headers={"x-request-id": rid},
        )

    def _bill(
        self,
        rid: str,
        marker: str | None,
        endpoint: str,
        body: Mapping[str, Any],
        terms: ModelTerms,
        rng: random.Random,
    ) -> Charge:
        stream = body.get("stream") is True
        n = _int_field(body, "n", 1) or 1
        choices, returned = 1, 1
        if endpoint == "chat/completions":
            choices = returned = n
        elif endpoint == "completions":
            best_of = _int_field(body, "best_of", 1)
            if best_of is not None and best_of < n:
                raise BadRequest("best_of", "best_of must be greater than or equal to n.")
            if stream and best_of is not None and best_of > 1:
                raise BadRequest("stream", "best_of results cannot be streamed.")
            prompts = prompt_count(body.get("prompt"))
            choices, returned = prompts * max(n, best_of or 1), prompts * n
        elif endpoint not in ("responses", "embeddings"):
            raise BadRequest("path", f"Unknown endpoint {endpoint}.")

        cap = terms.max_input_tokens
        text = self.prompt_tokens_for(endpoint, text_only(endpoint, body))
        hidden_limit = cap if cap is not None else UNBOUNDED_HIDDEN_TOKENS
        hidden = sum(_amount(rng, hidden_limit) for _ in range(_hidden_sources(endpoint, body)))
        turn = text + hidden if cap is None else min(text + hidden, max(cap, text))
        calls = _tool_calls(endpoint, body, rng)
        prompt = turn
        for _ in range(sum(calls.values())):
            # Each call's results come back as input, and the model reads it all again.
            results = _amount(rng, hidden_limit)
            prompt += turn + results if cap is None else min(turn + results, max(cap, turn))

        cached = 0
        if endpoint in ("chat/completions", "responses") and rng.random() < 0.3:
            cached = rng.randint(0, prompt)

        visible: list[int] = []
        completion = reasoning = 0
        if endpoint != "embeddings":
            limit = output_limit(body, terms)
            for i in range(choices):
                think = _amount(rng, limit) if terms.reasoning else 0
                shown = _amount(rng, limit - think)
                completion += think + shown
                reasoning += think
                if i < returned:
                    visible.append(shown)

        tier = "default"
        priority = endpoint in PRIORITY_ENDPOINTS and body.get("service_tier") == "priority"
        if priority and rng.random() < 0.7:
            tier = "priority"
        micros = _cost(
            terms,
            prompt=prompt,
            cached=cached,
            completion=completion,
            tier=tier,
            tool_calls={**_container_sessions(endpoint, body), **calls},
            tool_prices=self.tool_prices,
        )
        return Charge(
            request_id=rid,
            marker=marker,
            path=endpoint,
            model=str(body["model"]),
            prompt_tokens=prompt,
            cached_tokens=cached,
            completion_tokens=completion,
            reasoning_tokens=reasoning,
            tool_calls=calls,
            service_tier=tier,
            micros=micros,
            visible=visible,
            streamed=stream and endpoint != "embeddings",
        )

    # --- answers --------------------------------------------------------------------

    async def _answer(
        self,
        request: web.Request,
        endpoint: str,
        body: Mapping[str, Any],
        charge: Charge,
        plan: Plan,
    ) -> web.StreamResponse:
        if await _held_or_cut(request, charge, plan):
            return web.Response()
        answer = _answer_body(endpoint, body, charge)
        if not plan.omit_usage:
            answer["usage"] = _usage(endpoint, charge)
            charge.usage_delivered = True
        return web.json_response(answer, headers={"x-request-id": charge.request_id})

    async def _stream(
        self,
        request: web.Request,
        endpoint: str,
        body: Mapping[str, Any],
        charge: Charge,
        plan: Plan,
    ) -> web.StreamResponse:
        if endpoint == "responses":
            events, usage_at = _responses_events(body, charge, omit_usage=plan.omit_usage)
        else:
            options = body.get("stream_options")
            asked = isinstance(options, dict) and options.get("include_usage") is True
            events, usage_at = _chunk_events(
                endpoint, body, charge, with_usage=asked and not plan.omit_usage
            )
        if await _held_or_cut(request, charge, plan):
            return web.Response()
        resp = web.StreamResponse(headers={"x-request-id": charge.request_id})
        resp.content_type = "text/event-stream"
        await resp.prepare(request)
        try:
            for i, event in enumerate(events):
                if i and i == plan.cut_after:
                    charge.cut = True
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if i and i == plan.pause_after:
                    plan.paused.set()
                    await plan.resume.wait()
                await resp.write(event)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            return resp  # the proxy went away: what was generated is billed all the same
        charge.usage_delivered = usage_at is not None
        return resp


def _usage(endpoint: str, charge: Charge) -> dict[str, Any]:
    prompt, completion = charge.prompt_tokens, charge.completion_tokens
    if endpoint == "embeddings":
        return {"prompt_tokens": prompt, "total_tokens": prompt}
    if endpoint == "responses":
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": charge.cached_tokens},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": charge.reasoning_tokens},
            "total_tokens": prompt + completion,
        }
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if endpoint == "chat/completions":
        usage["prompt_tokens_details"] = {"cached_tokens": charge.cached_tokens, "audio_tokens": 0}
        usage["completion_tokens_details"] = {
            "reasoning_tokens": charge.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        }
    return usage


def _text(tokens: int) -> str:
    return WORD * tokens


def _deltas(tokens: int) -> list[str]:
    return [_text(min(WORDS_PER_DELTA, tokens - i)) for i in range(0, tokens, WORDS_PER_DELTA)]


def _call_items(charge: Charge) -> list[dict[str, Any]]:
    items = []
    for name, count in charge.tool_calls.items():
        kind, _ = _CALL_ITEMS[tool_kind(name)]
        for i in range(count):
            item: dict[str, Any] = {"id": f"{kind}_{i}", "type": kind, "status": "completed"}
            if name == "web_search":
                item["action"] = {"type": "search", "query": "weather"}
            elif name == "file_search":
                item["queries"] = ["weather"]
                item["results"] = None
            else:
                item["code"] = "print(1)"
                item["container_id"] = "cntr_1"
                item["outputs"] = None
            items.append(item)
    return items


def _message_item(charge: Charge, status: str = "completed") -> dict[str, Any]:
    text = _text(charge.visible[0] if charge.visible else 0)
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def _reasoning_item(charge: Charge) -> list[dict[str, Any]]:
    if not charge.reasoning_tokens:
        return []
    return [{"id": "rs_1", "type": "reasoning", "summary": []}]


def _answer_body(endpoint: str, body: Mapping[str, Any], charge: Charge) -> dict[str, Any]:
    model = charge.model
    if endpoint == "embeddings":
        inputs = body.get("input")
        count = prompt_count(inputs) if isinstance(inputs, list) else 1
        data = [{"object": "embedding", "index": i, "embedding": [0.0]} for i in range(count)]
        return {"object": "list", "data": data, "model": model}
    if endpoint == "responses":
        output = [*_reasoning_item(charge), *_call_items(charge), _message_item(charge)]
        return {
            "id": f"resp_{charge.request_id}",
            "object": "response",
            "created_at": 1,
            "status": "completed",
            "model": model,
            "service_tier": charge.service_tier,
            "output": output,
        }
    if endpoint == "completions":
        choices: list[dict[str, Any]] = [
            {"index": i, "text": _text(v), "finish_reason": "length", "logprobs": None}
            for i, v in enumerate(charge.visible)
        ]
        return {
            "id": f"cmpl-{charge.request_id}",
            "object": "text_completion",
            "created": 1,
            "model": model,
            "choices": choices,
        }
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": _text(v), "refusal": None},
            "finish_reason": "length",
            "logprobs": None,
        }
        for i, v in enumerate(charge.visible)
    ]
    return {
        "id": f"chatcmpl-{charge.request_id}",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "service_tier": charge.service_tier,
        "choices": choices,
    }


def _chunk_events(
    endpoint: str, body: Mapping[str, Any], charge: Charge, *, with_usage: bool
) -> tuple[list[bytes], int | None]:
    """Chat / completions SSE frames, and the index of the usage frame (if any)."""
    chat = endpoint == "chat/completions"
    base: dict[str, Any] = {
        "id": f"chatcmpl-{charge.request_id}" if chat else f"cmpl-{charge.request_id}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": 1,
        "model": charge.model,
    }
    if chat:
        base["service_tier"] = charge.service_tier
    if with_usage:
        base["usage"] = None
    chunks: list[dict[str, Any]] = []
    if chat:
        for i in range(len(charge.visible)):
            delta = {"role": "assistant", "content": "", "refusal": None}
            chunks.append({**base, "choices": [{"index": i, "delta": delta}]})
    deltas = [_deltas(v) for v in charge.visible]
    for step in range(max((len(d) for d in deltas), default=0)):
        for i, parts in enumerate(deltas):
            if step < len(parts):
                choice: dict[str, Any] = {"index": i, "finish_reason": None}
                if chat:
                    choice["delta"] = {"content": parts[step]}
                else:
                    choice["text"] = parts[step]
                    choice["logprobs"] = None
                chunks.append({**base, "choices": [choice]})
    for i in range(len(charge.visible)):
        last: dict[str, Any] = {"index": i, "finish_reason": "length"}
        if chat:
            last["delta"] = {}
        else:
            last["text"] = ""
            last["logprobs"] = None
        chunks.append({**base, "choices": [last]})
    usage_at = None
    if with_usage:
        usage_at = len(chunks)
        chunks.append({**base, "choices": [], "usage": _usage(endpoint, charge)})
    frames = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks]
    return [*frames, b"data: [DONE]\n\n"], usage_at


def _responses_events(
    body: Mapping[str, Any], charge: Charge, *, omit_usage: bool
) -> tuple[list[bytes], int | None]:
    """Responses SSE frames, and the index of the ``response.completed`` frame with usage."""
    asked = body.get("service_tier")
    response: dict[str, Any] = {
        "id": f"resp_{charge.request_id}",
        "object": "response",
        "created_at": 1,
        "status": "in_progress",
        "model": charge.model,
        "service_tier": asked if isinstance(asked, str) else "auto",
        "output": [],
        "usage": None,
    }
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": response},
        {"type": "response.in_progress", "response": response},
    ]
    index = 0
    for item in _reasoning_item(charge):
        events.append({"type": "response.output_item.added", "output_index": index, "item": item})
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        index += 1
    for item in _call_items(charge):
        kind = item["type"]
        _, phases = _CALL_ITEMS[next(n for n, (k, _) in _CALL_ITEMS.items() if k == kind)]
        added = {**item, "status": "in_progress"}
        events.append({"type": "response.output_item.added", "output_index": index, "item": added})
        for phase in phases:
            events.append(
                {"type": f"response.{kind}.{phase}", "output_index": index, "item_id": item["id"]}
            )
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        index += 1
    message = _message_item(charge)
    text = message["content"][0]["text"]
    started = {**_message_item(charge, "in_progress"), "content": []}
    events.append({"type": "response.output_item.added", "output_index": index, "item": started})
    part = {"type": "output_text", "text": "", "annotations": []}
    where = {"item_id": "msg_1", "output_index": index, "content_index": 0}
    events.append({"type": "response.content_part.added", **where, "part": part})
    for delta in _deltas(charge.visible[0] if charge.visible else 0):
        events.append({"type": "response.output_text.delta", **where, "delta": delta})
    events.append({"type": "response.output_text.done", **where, "text": text})
    events.append({"type": "response.content_part.done", **where, "part": {**part, "text": text}})
    events.append({"type": "response.output_item.done", "output_index": index, "item": message})
    final = _answer_body("responses", body, charge)
    final["usage"] = None if omit_usage else _usage("responses", charge)
    events.append({"type": "response.completed", "response": final})
    frames = []
    for seq, event in enumerate(events):
        event["sequence_number"] = seq
        frames.append(f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode())
    return frames, None if omit_usage else len(frames) - 1

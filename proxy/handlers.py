"""The request flow, top to bottom; the only place that calls the steps in sequence.

authenticate -> read body -> estimate tokens -> token caps -> plan hold
  -> reserve -> forward -> usage -> cost -> commit -> budget headers
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from aiohttp import web

from proxy import budget, headers, upstream
from proxy.endpoints import Endpoint, endpoint_for
from proxy.errors import (
    BadRequest,
    InvalidJSON,
    MissingModel,
    ModelNotPriced,
    NotFound,
    PayloadTooLarge,
    StreamNotSupported,
    UnsupportedMediaType,
)
from proxy.pricing import cost_micros, estimate_micros
from proxy.state import LEDGER, RUNTIME, SESSION, Runtime
from proxy.usage import InvalidParam, choice_count, extract_usage, output_limit

# Bodies above this size are parsed and tokenized in a worker thread.
OFFLOAD_BYTES = 64 * 1024
# Output tokens assumed for the hold when neither the request, a cap nor the price
# table bounds them.
FALLBACK_OUTPUT_TOKENS = 16_384
# Where each endpoint takes its output limit, when the proxy has to set one.
OUTPUT_PARAM = {
    Endpoint.CHAT: "max_completion_tokens",
    Endpoint.COMPLETIONS: "max_tokens",
    Endpoint.RESPONSES: "max_output_tokens",
}


async def read_body(request: web.Request, limit: int) -> bytes:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding '{encoding[:32]}' is not supported: send the JSON body uncompressed."
        )
    too_large = PayloadTooLarge(f"Request body exceeds the proxy's limit of {limit} bytes.")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidJSON("The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise InvalidJSON("The request body must be a JSON object.")
    return body


async def _offload(raw: bytes, fn: Any, *args: Any) -> Any:
    if len(raw) <= OFFLOAD_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def metered(request: web.Request) -> web.StreamResponse:
    """``POST /v1/{chat/completions,completions,embeddings,responses}``."""
    endpoint = endpoint_for(request.match_info["path"])
    if endpoint is None:
        raise NotFound(f"Unknown request URL: {request.method} {request.path}")
    rt: Runtime = request.app[RUNTIME].current
    settings = rt.settings
    identity = rt.auth.authenticate(request.headers)
    raw = await read_body(request, settings.server.max_body_bytes)
    body: dict[str, Any] = await _offload(raw, parse_json, raw)

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MissingModel("You must provide a model parameter.", param="model")
    if body.get("stream") is True:
        raise StreamNotSupported(
            "Streaming is not supported by this proxy yet; send the request without "
            "'stream': true.",
            param="stream",
        )
    price = rt.prices.lookup(model)
    if price is None:
        raise ModelNotPriced(
            f"Model '{model[:128]}' has no price: add it to pricing.models in the caps file "
            "(or set pricing.default).",
            param="model",
        )
    route = settings.upstream_for(model)
    if route is None:
        raise BadRequest(f"No upstream serves model '{model[:128]}'.", param="model")
    try:
        requested_output = output_limit(endpoint, body)
        n = choice_count(endpoint, body)
    except InvalidParam as exc:
        raise BadRequest(str(exc), param=exc.param) from exc

    prompt: int = await _offload(raw, rt.tokenizer.estimate, endpoint, body)
    token_cap = (
        settings.cost_caps.token_cap_for(identity.agent_id) if settings.cost_caps.enabled else None
    )
    decision = budget.check_tokens(token_cap, prompt=prompt, output=requested_output)
    if decision.inject and endpoint in OUTPUT_PARAM:
        body[OUTPUT_PARAM[endpoint]] = decision.output_limit
        raw = json.dumps(body, separators=(",", ":")).encode()
    hold_output = decision.output_limit
    if hold_output is None:
        hold_output = price.max_output_tokens or FALLBACK_OUTPUT_TOKENS
    plan = budget.plan_budget(
        settings,
        identity.tenant_id,
        identity.agent_id,
        amount_micros=estimate_micros(prompt, hold_output * n, price),
    )

    ledger = request.app[LEDGER]
    hold_ttl_s = math.ceil(route.timeout_s) + 60
    send_headers = headers.request_headers(
        request.headers.items(),
        api_key=identity.client_key or _secret(route.api_key),
        drop=(settings.identity.agent_header,),
    )
    async with (
        ledger.hold(plan, tz=settings.tz, hold_ttl_s=hold_ttl_s) as hold,
        upstream.send(
            request.app[SESSION],
            route,
            endpoint.value,
            method="POST",
            headers=send_headers,
            body=raw,
        ) as resp,
    ):
        if not 200 <= resp.status < 300:
            # Not billed by the upstream: relay it; leaving the block releases the hold.
            data = await upstream.read_body(resp, route)
            return _relay(resp.status, resp.headers.items(), data)
        try:
            data = await upstream.read_body(resp, route)
        except Exception:
            await hold.commit(plan.amount_micros)  # generated, maybe billed: charge the hold
            raise
        charged = await _offload(data, _charge, endpoint, data, price, plan.amount_micros)
        await hold.commit(charged)
        out = _relay(resp.status, resp.headers.items(), data)
    status = budget.status(plan, hold.states, charged_micros=charged) if hold.states else None
    out.headers.update(headers.budget_headers(status))
    return out


def _charge(endpoint: Endpoint, data: bytes, price: Any, hold_micros: int) -> int:
    """The cost of a successful response: its usage priced, else the whole hold."""
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    usage = extract_usage(endpoint, parsed) if isinstance(parsed, dict) else None
    if usage is None:
        return hold_micros
    return int(cost_micros(usage, price))


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def _relay(status: int, items: Any, data: bytes) -> web.Response:
    resp = web.Response(status=status, body=data)
    for name, value in headers.response_headers(items):
        resp.headers.add(name, value)
    return resp


async def models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: forwarded to the first upstream, unmetered."""
    rt: Runtime = request.app[RUNTIME].current
    identity = rt.auth.authenticate(request.headers)
    route = rt.settings.upstreams[0]
    send_headers = headers.request_headers(
        request.headers.items(),
        api_key=identity.client_key or _secret(route.api_key),
        drop=(rt.settings.identity.agent_header,),
    )
    async with upstream.send(
        request.app[SESSION], route, "models", method="GET", headers=send_headers, body=None
    ) as resp:
        data = await upstream.read_body(resp, route)
        return _relay(resp.status, resp.headers.items(), data)


async def healthz(request: web.Request) -> web.StreamResponse:
    """``GET /healthz``: the process serves."""
    return web.json_response({"status": "ok"})

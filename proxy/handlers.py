"""The request flow, top to bottom; the only place that calls the steps in sequence.

authenticate -> read body -> estimate tokens -> token caps -> plan hold
  -> reserve -> forward -> usage -> charge.amount_due -> commit -> budget headers

Every request that was admitted is settled once, in one ``finally``: what it is charged
is decided by ``proxy.charge`` from how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy import budget, headers, upstream
from proxy.auth import AGENT_ID, Identity
from proxy.charge import NOTHING_DUE, Bill, Ending, Tariff, amounts_due
from proxy.config import MAX_MODEL_CHARS, TokenCap, UpstreamConfig, UserCaps
from proxy.counters import Amounts, ReserveResult, Unit, fits
from proxy.endpoints import Endpoint, endpoint_for
from proxy.errors import (
    BadRequest,
    BudgetExceeded,
    CapExceeded,
    ConcurrencyLimitExceeded,
    InvalidJSON,
    MissingModel,
    ModelNotPriced,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    RateLimitExceeded,
    ServiceUnavailable,
    StoreUnavailable,
    TokenCapExceeded,
    TooManyAgents,
    TooManyUsers,
    Unauthorized,
    UnsizedInput,
    UnsupportedMediaType,
    UnsupportedParameter,
    UpstreamError,
)
from proxy.history import Rejection
from proxy.journal import JournalEntry, journal_counter
from proxy.ledger import Hold
from proxy.logs import log_request
from proxy.metrics import Metrics, Outcome, RequestRecord
from proxy.price_files import SizeTier, price_at_prompt_size
from proxy.pricing import ModelPrice, ToolPrice, hold_price
from proxy.relay import StreamEnd, StreamTap, relay_stream
from proxy.spend import is_admin
from proxy.state import ALERTER, JOURNAL, LEDGER, LIFECYCLE, METRICS, RUNTIME, UPSTREAM, Runtime
from proxy.tokens import PromptEstimate
from proxy.usage import (
    InvalidParam,
    Usage,
    choice_count,
    container_memory,
    hosted_tools,
    inject_max_tool_calls,
    inject_output_limit,
    is_background,
    max_tool_calls,
    output_limit,
    read_usage,
    unreported_tool_calls,
    unsized_state,
)
from proxy.windows import period_of

log = logging.getLogger("capproxy")

# Prompts of bodies above this size are sized in a worker thread, below the loop.
OFFLOAD_BYTES = 64 * 1024
WORKER_NICE = 10
# The output limit injected (and held) when neither the request, a cap nor the price
# table bounds a request's output.
FALLBACK_OUTPUT_TOKENS = 16_384


async def read_body(request: web.Request, limit: int) -> bytes:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(
            f"Content-Encoding '{encoding[:32]}' is not supported: send the JSON body uncompressed."
        )
    length = request.content_length
    if length is not None:
        if length > limit:
            raise _too_large(limit)
        return await request.read()  # framed by its length: no more than it says arrives
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"Request body exceeds the proxy's limit of {limit} bytes.")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object (orjson: strict JSON, so NaN, Infinity, numbers
    out of range, integers beyond 64 bits and nesting past 254 levels are refused)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidJSON("The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise InvalidJSON("The request body must be a JSON object.")
    return body


def encode_json(body: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(body)
    except (orjson.JSONEncodeError, RecursionError) as exc:
        raise InvalidJSON("The request body has a number out of range or nests too deep.") from exc


async def _offload(raw: bytes, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, in a worker thread if ``raw`` is large: for work that lets go of the
    interpreter lock (tiktoken's encoder) or is Python code the loop can interleave with.
    JSON is parsed and written on the loop at any size: orjson holds the lock for the
    whole call, so a worker would stop the loop just as long, and longer when the OS
    deschedules the lower-priority worker while it holds the lock."""
    if len(raw) <= OFFLOAD_BYTES:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(None, _below_the_loop, fn, *args)


_worker = threading.local()


def _below_the_loop(fn: Any, *args: Any) -> Any:
    """Run ``fn`` in a worker thread at a lower CPU priority than the event loop's (nice
    +``WORKER_NICE``, set once per thread; Linux applies it per thread): tokenizing a
    huge prompt then takes the CPU the small requests leave, instead of half of it."""
    if not getattr(_worker, "niced", False):
        _worker.niced = True
        with contextlib.suppress(OSError, AttributeError):  # no per-thread nice here
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WORKER_NICE)
    return fn(*args)


@dataclass(kw_only=True, slots=True)
class HoldBasis:
    """What a request's hold is worked out from besides its prompt's tokens (kept so a
    hold taken on the prompt's bound can be worked out again on its exact count)."""

    price: ModelPrice
    size_tiers: tuple[SizeTier, ...]
    service_tier: object
    tool_prices: Mapping[str, ToolPrice]
    min_tool_calls: Mapping[str, int]
    tool_calls: Mapping[str, int]  # hosted tool -> the calls held for it
    output_tokens: int  # per choice
    choices: int
    unsized: tuple[str, ...]  # input the proxy cannot size (held at the model's context)
    user: str | None


@dataclass(kw_only=True, slots=True)
class Admission:
    """Everything decided about a request before the upstream sees it."""

    endpoint: Endpoint
    runtime: Runtime
    identity: Identity
    model: str
    tariff: Tariff
    route: UpstreamConfig
    raw: bytes
    prompt_tokens: int  # as held: counted, or bounded (see prompt_exact)
    # False while the prompt is held on its bound (its texts' UTF-8 length), uncounted.
    prompt_exact: bool
    basis: HoldBasis
    plan: budget.BudgetPlan
    stream: bool
    strip_usage_chunk: bool
    # The upstream's x-ratelimit-* headers reach the client only when they describe the
    # client's own account and no rate cap of the proxy's applies.
    upstream_rate_headers: bool = False


async def admit(
    request: web.Request, endpoint: Endpoint, rt: Runtime, rec: RequestRecord
) -> Admission:
    """authenticate -> read body -> estimate tokens -> token caps -> plan the hold."""
    settings = rt.settings
    identity = rt.auth.authenticate(request.headers)
    rec.tenant_id, rec.agent_id = identity.tenant_id, identity.agent_id
    raw = await read_body(request, settings.server.max_body_bytes)
    body = parse_json(raw)  # on the loop: see _offload

    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MissingModel("You must provide a model parameter.", param="model")
    if len(model) > MAX_MODEL_CHARS:
        raise BadRequest(f"'model' is longer than {MAX_MODEL_CHARS} characters.", param="model")
    rec.model = model
    stream = body.get("stream") is True
    if stream and not endpoint.streams:
        raise BadRequest(f"'stream' is not supported on /v1/{endpoint.value}.", param="stream")
    if is_background(endpoint, body):
        raise UnsupportedParameter(
            "'background' responses are not supported: their cost arrives after the request "
            "ends, so no cap can hold it.",
            param="background",
        )
    found = rt.prices.find(model)
    if found is None:
        request.app[METRICS].unpriced_model(model[:MAX_MODEL_CHARS])
        raise ModelNotPriced(
            f"Model '{model[:128]}' has no price: add it to pricing.models in the caps file "
            "(or set pricing.default).",
            param="model",
        )
    entry, price, origin = found
    size_tiers = rt.size_tiers.get(entry, ()) if origin == "price file" else ()
    route = settings.upstream_for(model)
    if route is None:
        raise BadRequest(f"No upstream serves model '{model[:128]}'.", param="model")
    caps = settings.cost_caps
    user = end_user(request, body, caps.user_caps) if caps.enabled else None
    try:
        requested_output = output_limit(endpoint, body)
        n = choice_count(endpoint, body)
        tools = hosted_tools(endpoint, body)
        tool_limit = max_tool_calls(body) if endpoint is Endpoint.RESPONSES else None
    except InvalidParam as exc:
        raise BadRequest(str(exc), param=exc.param) from exc

    # Held on the prompt's bound while the bound decides nothing a count would decide
    # otherwise; counted exactly when it would (and in shadow mode, which reports them).
    exact = not caps.enforce
    sizer = rt.tokenizer.estimate_prompt if exact else rt.tokenizer.bound_prompt
    estimate: PromptEstimate = await _offload(raw, sizer, endpoint, body)
    unsized = (*estimate.unsized, *unsized_state(endpoint, body))
    if tools:
        unsized += tuple(f"hosted tool '{tool}'" for tool in tools)
    prompt = _bounded_prompt(estimate.tokens, unsized, price, caps.unsized_input, model)
    token_cap = caps.token_cap_for(identity.agent_id) if caps.enabled else None
    least = _bounded_prompt(1, unsized, price, caps.unsized_input, model)
    if (
        not exact
        and prompt > least  # else no count can change it (input held at the whole context)
        and not _bound_decides(
            token_cap, prompt=prompt, output=requested_output, choices=n, tiers=size_tiers
        )
    ):
        exact = True
        estimate = await _offload(raw, rt.tokenizer.estimate_prompt, endpoint, body)
        prompt = _bounded_prompt(estimate.tokens, unsized, price, caps.unsized_input, model)
    try:
        decision = budget.check_tokens(token_cap, prompt=prompt, output=requested_output, choices=n)
    except TokenCapExceeded as exc:
        if caps.enforce:
            raise
        # Shadow mode: note it, and leave the request exactly as the client sent it.
        rec.would_reject = exc.code
        decision = budget.TokenDecision(requested_output, inject=False)
    output = decision.output_limit
    if output is None and endpoint is not Endpoint.EMBEDDINGS and caps.enforce:
        # Nothing bounds the output: run the request with the limit its hold assumes.
        output = price.max_output_tokens or FALLBACK_OUTPUT_TOKENS
        decision = budget.TokenDecision(output, inject=True)
    if decision.inject and decision.output_limit is not None:
        inject_output_limit(endpoint, body, decision.output_limit)
    calls_per_tool = 0
    if tools:
        calls_per_tool = tool_limit or caps.default_max_tool_calls
        if tool_limit is None and endpoint is Endpoint.RESPONSES and caps.enforce:
            # Hosted tool calls bounded by what the hold assumes.
            inject_max_tool_calls(body, calls_per_tool)
    strip_usage_chunk = False
    if stream and endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS):
        strip_usage_chunk = _ask_for_usage(body)
    # The upstream gets the body the proxy judged, never the client's bytes: a parser
    # that reads duplicate keys differently (first wins) must not see another request.
    raw = encode_json(body)
    basis = HoldBasis(
        price=price,
        size_tiers=size_tiers,
        service_tier=body.get("service_tier"),
        tool_prices=rt.prices.tool_prices_for(container_memory=container_memory(endpoint, body)),
        min_tool_calls=unreported_tool_calls(endpoint, body),
        tool_calls={tool: calls_per_tool for tool in tools},
        output_tokens=output or 0,
        choices=n,
        unsized=unsized,
        user=user,
    )
    tariff, plan = _held(rt, identity, model, basis, prompt)
    return Admission(
        endpoint=endpoint,
        runtime=rt,
        identity=identity,
        model=model,
        tariff=tariff,
        route=route,
        raw=raw,
        prompt_tokens=prompt,
        prompt_exact=exact,
        basis=basis,
        plan=plan,
        stream=stream,
        strip_usage_chunk=strip_usage_chunk,
        upstream_rate_headers=identity.client_key is not None
        and all(c.unit is Unit.USD for c in plan.counters),
    )


def _bound_decides(
    cap: TokenCap | None,
    *,
    prompt: int,
    output: int | None,
    choices: int,
    tiers: tuple[SizeTier, ...],
) -> bool:
    """Whether a prompt's bound decides what its exact count would: the token cap lets it
    through without sizing the output from it, and no price tier starts below it."""
    if any(prompt > tier.above_tokens for tier in tiers):
        return False
    if cap is None:
        return True
    if output is None and cap.max_total_tokens is not None:
        return False
    try:
        budget.check_tokens(cap, prompt=prompt, output=output, choices=choices)
    except TokenCapExceeded:
        return False
    return True


def _held(
    rt: Runtime, identity: Identity, model: str, basis: HoldBasis, prompt: int
) -> tuple[Tariff, budget.BudgetPlan]:
    """The tariff and the hold of a request whose prompt is held at ``prompt`` tokens."""
    # Priced by prompt size: held at the tier the prompt (as held) reaches.
    held_at = hold_price(
        price_at_prompt_size(basis.price, basis.size_tiers, prompt), basis.service_tier
    )
    tariff = Tariff(
        price=basis.price,
        hold_price=held_at,
        tool_prices=basis.tool_prices,
        min_tool_calls=basis.min_tool_calls,
        size_tiers=basis.size_tiers,
        prompt_tokens=prompt,
        tools_enabled=bool(basis.tool_calls),
    )
    plan = budget.plan_budget(
        rt.settings,
        identity.tenant_id,
        identity.agent_id,
        amount_micros=budget.hold_micros(
            prompt_tokens=prompt,
            output_tokens=basis.output_tokens,
            choices=basis.choices,
            price=held_at,
            tool_calls=basis.tool_calls,
            tool_prices=basis.tool_prices,
        ),
        tokens=budget.hold_tokens(
            prompt_tokens=prompt,
            output_tokens=basis.output_tokens,
            choices=basis.choices,
            tool_calls=basis.tool_calls,
        ),
        model=model,
        user=basis.user,
    )
    return tariff, plan


async def _counted_plan(adm: Admission, refused: ReserveResult) -> budget.BudgetPlan | None:
    """The hold of ``adm`` on its prompt's exact count, to ask for again after a cap
    refused the one on its bound; None when no count could make it fit (it would not fit
    with a one-token prompt)."""
    basis = adm.basis
    policy = adm.runtime.settings.cost_caps.unsized_input
    least = _bounded_prompt(1, basis.unsized, basis.price, policy, adm.model)
    floor = _held(adm.runtime, adm.identity, adm.model, basis, least)[1].amounts
    if any(not fits(s, floor.of(s.counter.unit)) for s in refused.exceeded):
        return None
    try:
        await count_exactly(adm)
    except Exception as exc:  # the refusal on the bound stands
        log.warning("a prompt could not be counted (%s): refused on its bound", type(exc).__name__)
        return None
    return adm.plan


async def _count_for_charge(adm: Admission, bill: Bill) -> asyncio.CancelledError | None:
    """Count a prompt held on its bound when its charge is worked out from it: no usage
    came back from a request that went out and was not refused. The charge is made
    whatever happens here: a count that fails leaves the hold on the bound (charging
    more, never less), and a cancellation is returned, to raise once the charge is made."""
    if adm.prompt_exact or bill.usage is not None or bill.ending in NOTHING_DUE:
        return None
    try:
        await asyncio.shield(count_exactly(adm))
    except asyncio.CancelledError as exc:
        return exc
    except Exception as exc:
        log.warning("a prompt could not be counted (%s): charged on its bound", type(exc).__name__)
    return None


async def count_exactly(adm: Admission) -> None:
    """Count ``adm``'s prompt exactly, and work its hold out again on that count, if it
    was held on the prompt's bound: the charges the proxy makes up itself (no usage came
    back) and a reservation refused on the bound go by the exact count."""
    if adm.prompt_exact:
        return
    rt = adm.runtime
    body = parse_json(adm.raw)
    estimate: PromptEstimate = await _offload(
        adm.raw, rt.tokenizer.estimate_prompt, adm.endpoint, body
    )
    basis = adm.basis
    policy = rt.settings.cost_caps.unsized_input
    prompt = _bounded_prompt(estimate.tokens, basis.unsized, basis.price, policy, adm.model)
    adm.tariff, adm.plan = _held(rt, adm.identity, adm.model, basis, prompt)
    adm.prompt_tokens, adm.prompt_exact = prompt, True


def end_user(request: web.Request, body: dict[str, Any], caps: UserCaps | None) -> str | None:
    """The end user that ``cost_caps.user_caps`` are kept for, as its source names it;
    None when no user caps are configured or the request names no user."""
    if caps is None:
        return None
    header = caps.header
    value: object = body.get("user") if header is None else request.headers.get(header)
    if value is None or value == "":
        return None
    where = "'user'" if header is None else f"header '{header}'"
    if not isinstance(value, str) or AGENT_ID.fullmatch(value) is None:
        raise BadRequest(
            f"The end user in {where} must be 1-128 characters of letters, digits and "
            ". _ : @ / - (cost_caps.user_caps.source).",
            param="user" if header is None else None,
        )
    return value


def _bounded_prompt(
    tokens: int, unsized: tuple[str, ...], price: ModelPrice, policy: str, model: str
) -> int:
    """The prompt tokens a hold can rely on: the estimate, or for input the proxy cannot
    size, the model's whole input context (``unsized_input: hold_context``)."""
    if not unsized:
        return tokens
    what = ", ".join(dict.fromkeys(unsized))
    if policy == "reject":
        raise UnsizedInput(
            f"The request brings input the proxy cannot size ({what}), and "
            "cost_caps.unsized_input is 'reject'.",
        )
    if price.max_input_tokens is None:
        raise UnsizedInput(
            f"The request brings input the proxy cannot size ({what}), and model "
            f"'{model[:128]}' has no max_input_tokens in its price to hold instead.",
            param="model",
        )
    return max(tokens, price.max_input_tokens)


def _ask_for_usage(body: dict[str, Any]) -> bool:
    """Make a chat/completions stream end with usage; True if the client hadn't asked."""
    options = body.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object.", param="stream_options")
    if options.get("include_usage") is True:
        return False
    body["stream_options"] = {**options, "include_usage": True}
    return True


async def metered(request: web.Request) -> web.StreamResponse:
    """``POST /v1/{chat/completions,completions,embeddings,responses}``, observed."""
    rec = RequestRecord(route=request.match_info["path"], outcome=Outcome.ALLOWED, status=200)
    started = time.perf_counter()
    app = request.app  # a property chain in aiohttp: looked up once
    try:
        resp = await _metered(request, app, rec)
    except ProxyError as exc:
        rec.status = exc.status
        rec.outcome = _outcome(exc)
        if isinstance(exc, CapExceeded):
            rec.rejected = exc.code
            await _note_rejection(app, rec, exc)
        raise
    except asyncio.CancelledError:
        # Cut at the shutdown deadline: a stream keeps the status it was sent with.
        if not rec.streamed:
            rec.status = 503
            rec.outcome = Outcome.UPSTREAM_ERROR
        raise
    except BaseException:
        rec.status = 500
        rec.outcome = Outcome.UPSTREAM_ERROR
        raise
    else:
        rec.status = resp.status
        if resp.status >= 400:
            rec.outcome = Outcome.UPSTREAM_ERROR if resp.status >= 500 else Outcome.CLIENT_ERROR
        return resp
    finally:
        rec.duration_s = time.perf_counter() - started
        # Counted and logged once the response is on its way (the loop's next turn): the
        # client does not wait for the access line.
        asyncio.get_running_loop().call_soon(_account, app[METRICS], rec)


def _account(metrics: Metrics, rec: RequestRecord) -> None:
    metrics.observe(rec)
    log_request(rec)


async def _note_rejection(app: web.Application, rec: RequestRecord, exc: CapExceeded) -> None:
    """Keep a refused request among its tenant's recent rejections (for the dashboard)."""
    if rec.tenant_id is None:
        return
    rejection = Rejection(
        time=time.time(),
        agent=rec.agent_id or "",
        model=rec.model or "",
        code=exc.code,
        windows=exc.windows,
    )
    await app[LEDGER].note_rejection(rec.tenant_id, rejection)


def _outcome(exc: ProxyError) -> Outcome:
    if isinstance(exc, (BudgetExceeded, TooManyAgents, TooManyUsers)):
        return Outcome.BUDGET_REJECTED
    if isinstance(exc, (RateLimitExceeded, ConcurrencyLimitExceeded)):
        return Outcome.RATE_REJECTED
    if isinstance(exc, TokenCapExceeded):
        return Outcome.TOKEN_REJECTED
    if isinstance(exc, StoreUnavailable):
        return Outcome.STORE_ERROR
    if isinstance(exc, UpstreamError) or exc.status >= 500:
        return Outcome.UPSTREAM_ERROR
    return Outcome.CLIENT_ERROR


async def _metered(
    request: web.Request, app: web.Application, rec: RequestRecord
) -> web.StreamResponse:
    endpoint = endpoint_for(request.match_info["path"])
    if endpoint is None:
        raise NotFound(f"Unknown request URL: {request.method} {request.path}")
    rt: Runtime = app[RUNTIME].current
    adm = await admit(request, endpoint, rt, rec)
    settings = rt.settings
    send_headers = _send_headers(request, rt, adm.identity, adm.route)
    alerter = app[ALERTER]
    metrics = app[METRICS]
    journal = app[JOURNAL]
    bill = Bill()
    async with app[LEDGER].hold(
        adm.plan,
        tz=settings.tz,
        hold_ttl_s=settings.store.hold_lease_s,
        enforce=settings.cost_caps.enforce,
        on_reject=alerter.observe_rejection,
        smaller=None if adm.prompt_exact else functools.partial(_counted_plan, adm),
    ) as hold:
        if hold.would_reject is not None:
            rec.would_reject = rec.would_reject or hold.would_reject.code
        rec.fail_open = hold.admitted_without_store and hold.would_reject is None
        if hold.states:
            metrics.hold_started()
        try:
            out = await _forward(request, app[UPSTREAM], adm, hold, bill, rec, send_headers)
        except UpstreamError as exc:
            if not exc.sent:
                bill.ending = Ending.NOT_SENT
            raise
        finally:
            # Every way a request ends passes here, once: an error of the proxy's own, a
            # cancellation or a client gone after the request went out leaves the bill at
            # CUT, which charges the whole hold (as worked out on the prompt's count).
            cancelled = await _count_for_charge(adm, bill)
            charged = _due(adm, bill)
            await hold.commit(charged)
            _settled(rec, adm, charged.micros, bill)
            if journal is not None:
                journal.append(_journal_entry(adm, hold, bill, charged.micros))
            if hold.states:
                metrics.hold_ended()
            if cancelled is not None:
                raise cancelled
    if hold.states:
        alerter.observe(hold.plan, hold.states, charged)
    return out


def _journal_entry(adm: Admission, hold: Hold, bill: Bill, charged: int) -> JournalEntry:
    """The spend journal's line for a settled request."""
    now = time.time()
    if hold.states:
        periods = [(s.counter, s.period) for s in hold.states]
    else:  # admitted without a hold (fail-open, shadow mode): recorded in the periods now
        tz = adm.runtime.settings.tz
        periods = [(c, period_of(c.window, now, tz)) for c in adm.plan.counters]
    usage = bill.usage
    return JournalEntry(
        time=now,
        request_id=hold.rid,
        tenant=adm.identity.tenant_id,
        agent=adm.identity.agent_id,
        model=adm.model,
        endpoint=adm.endpoint.value,
        prompt_tokens=usage.prompt_tokens if usage else None,
        cached_tokens=usage.cached_tokens if usage else None,
        completion_tokens=usage.completion_tokens if usage else None,
        reasoning_tokens=usage.reasoning_tokens if usage else None,
        cost_micros=charged,
        outcome=bill.ending.value,
        usage_missing=usage is None,
        epoch=hold.epoch,
        counters=tuple(journal_counter(c, p) for c, p in periods if c.unit is Unit.USD),
    )


def _due(adm: Admission, bill: Bill) -> Amounts:
    """What ``bill`` comes to (worked out once for the headers and the settle)."""
    known = bill.due
    if (
        known is not None
        and known[0] is bill.ending
        and known[1] is bill.usage
        and known[2] == bill.counted_output
    ):
        return known[3]
    due = amounts_due(bill, adm.tariff, held=adm.plan.amounts)
    bill.due = (bill.ending, bill.usage, bill.counted_output, due)
    return due


async def _forward(
    request: web.Request,
    client: upstream.UpstreamClient,
    adm: Admission,
    hold: Hold,
    bill: Bill,
    rec: RequestRecord,
    send_headers: list[tuple[str, str]],
) -> web.StreamResponse:
    sent = time.perf_counter()
    async with await upstream.send(
        client,
        adm.route,
        adm.endpoint.value,
        method="POST",
        headers=send_headers,
        body=adm.raw,
    ) as resp:
        rec.upstream_s = time.perf_counter() - sent
        limit = adm.runtime.settings.server.max_upstream_body_bytes
        if not 200 <= resp.status < 300:
            # Not billed by the upstream: relay it; the hold is released.
            bill.ending = Ending.REFUSED
            data = await upstream.read_body(resp, adm.route, limit=limit)
            return _relay(resp, data, adm.identity, rate_limits=adm.upstream_rate_headers)
        content_type = resp.headers.get("Content-Type", "")
        if adm.stream and content_type.startswith("text/event-stream"):
            return await _stream(request, adm, hold, resp, bill, rec)
        data = await upstream.read_body(resp, adm.route, limit=limit)
        bill.usage = _usage_of(adm.endpoint, data)  # on the loop: see _offload
        bill.ending = Ending.ANSWERED
        cancelled = await _count_for_charge(adm, bill)
        if cancelled is not None:
            raise cancelled
        out = _relay(resp, data, adm.identity, rate_limits=adm.upstream_rate_headers)
        out.headers.update(_budget_headers(adm, hold, _due(adm, bill)))
        _shadow_header(out, rec)
        return out


def _settled(rec: RequestRecord, adm: Admission, charged: int, bill: Bill) -> None:
    rec.cost_micros = charged
    rec.usage_missing = bill.usage is None
    if bill.usage is not None:
        rec.prompt_tokens = bill.usage.prompt_tokens
        rec.completion_tokens = bill.usage.completion_tokens
    else:
        # A bound is no count of tokens: left out of the line and the token metrics.
        rec.prompt_tokens = adm.prompt_tokens if adm.prompt_exact else None
        rec.completion_tokens = bill.counted_output


async def _stream(
    request: web.Request,
    adm: Admission,
    hold: Hold,
    resp: upstream.Response,
    bill: Bill,
    rec: RequestRecord,
) -> web.StreamResponse:
    rec.streamed = True
    rec.status = resp.status
    out = web.StreamResponse(status=resp.status)
    for name, value in headers.response_headers(
        resp.headers.items(), drop=_hidden(adm.identity), rate_limits=adm.upstream_rate_headers
    ):
        out.headers.add(name, value)
    # Sent before usage is known: the budget as if this request cost its whole hold.
    out.headers.update(_budget_headers(adm, hold, hold.plan.amounts))
    _shadow_header(out, rec)
    settings = adm.runtime.settings
    tap = StreamTap(adm.endpoint, strip_usage_chunk=adm.strip_usage_chunk)
    end = StreamEnd.CLIENT_GONE
    drain = settings.streaming.on_client_disconnect == "drain"
    started = time.perf_counter() - rec.upstream_s if rec.upstream_s else time.perf_counter()
    try:
        try:
            await out.prepare(request)
            client_gone = False
            rec.first_byte_s = time.perf_counter() - started
        except (ConnectionError, RuntimeError):
            client_gone = True  # gone before the first byte: still drained, if asked
        if drain or not client_gone:
            end = await relay_stream(
                resp,
                out,
                tap,
                write_timeout_s=settings.server.client_write_timeout_s,
                drain=drain,
                client_gone=client_gone,
                transport=request.transport,
                writer=request.writer,
            )
    except (ConnectionError, RuntimeError):
        end = StreamEnd.CLIENT_GONE
    finally:
        # Whatever happened, this is what the upstream said it billed (the handler settles).
        bill.usage = tap.billed_usage()
        if end is StreamEnd.COMPLETE and tap.finished:
            bill.ending = Ending.STREAM_COMPLETE
        if bill.usage is None:
            bill.counted_output = await asyncio.shield(_count_output(adm, tap))
    if end is StreamEnd.COMPLETE:
        # The stream's end goes out when the handler returns, after the settle (as for
        # a JSON answer): nothing is left to run once the client has seen the end, so
        # its next request on this connection is read at once.
        return out
    resp.close()  # stop the upstream: closing its connection ends the generation
    if request.transport is not None:
        # No invented ending: the client sees the stream break, as the upstream's did.
        request.transport.abort()
    return out


def _shadow_header(out: web.StreamResponse, rec: RequestRecord) -> None:
    if rec.would_reject is not None:
        out.headers["x-budget-would-reject"] = rec.would_reject


async def _count_output(adm: Admission, tap: StreamTap) -> int:
    """Output tokens counted from a stream's relayed text (when usage never came)."""
    text = tap.text()
    tokenizer = adm.runtime.tokenizer
    if len(text) > OFFLOAD_BYTES:
        loop = asyncio.get_running_loop()
        count: int = await loop.run_in_executor(
            None, _below_the_loop, tokenizer.count, adm.model, text
        )
        return count
    return tokenizer.count(adm.model, text)


def _budget_headers(adm: Admission, hold: Hold, charged: Amounts) -> Mapping[str, str]:
    """The ``x-budget-*`` and ``x-ratelimit-*`` headers, once this request is charged."""
    if not hold.states:
        return {}
    # The states hold what hold.plan reserved (adm.plan may since be counted closer).
    status = budget.status(hold.plan, hold.states, charged_micros=charged.micros)
    rates = budget.rate_status(hold.plan, hold.states, charged=charged, now=hold.now)
    return {**headers.budget_headers(status), **headers.rate_limit_headers(rates)}


def _usage_of(endpoint: Endpoint, data: bytes) -> Usage | None:
    """The usage a successful non-streamed answer reports, or ``None``."""
    return read_usage(endpoint, data)


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def _hidden(identity: Identity) -> frozenset[str]:
    """Headers that stay between the proxy and the upstream when the operator's key is used."""
    return headers.OPERATOR_ACCOUNT if identity.client_key is None else frozenset()


def _send_headers(
    request: web.Request, rt: Runtime, identity: Identity, route: UpstreamConfig
) -> list[tuple[str, str]]:
    return headers.request_headers(
        request.headers.items(),
        api_key=identity.client_key or _secret(route.api_key),
        drop=(rt.settings.identity.agent_header, *_hidden(identity)),
    )


def _relay(
    upstream_resp: upstream.Response,
    data: bytes,
    identity: Identity,
    *,
    rate_limits: bool = True,
) -> web.Response:
    resp = web.Response(status=upstream_resp.status, body=data)
    for name, value in headers.response_headers(
        upstream_resp.headers.items(), drop=_hidden(identity), rate_limits=rate_limits
    ):
        resp.headers.add(name, value)
    return resp


async def models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: forwarded to the first upstream, unmetered."""
    rt: Runtime = request.app[RUNTIME].current
    identity = rt.auth.authenticate(request.headers)
    route = rt.settings.upstreams[0]
    send_headers = _send_headers(request, rt, identity, route)
    async with await upstream.send(
        request.app[UPSTREAM], route, "models", method="GET", headers=send_headers, body=None
    ) as resp:
        data = await upstream.read_body(resp, route)
        return _relay(resp, data, identity, rate_limits=identity.client_key is not None)


async def healthz(request: web.Request) -> web.StreamResponse:
    """``GET /healthz``: the process serves."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.StreamResponse:
    """``GET /readyz``: config loaded, the store answers, and not shutting down."""
    if not request.app[LIFECYCLE].ready:
        raise ServiceUnavailable("shutting down", headers={"Retry-After": "1"})
    await request.app[LEDGER].store.ping()
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.StreamResponse:
    """``GET /metrics``: Prometheus text format (the admin token, when one is configured)."""
    settings = request.app[RUNTIME].current.settings
    if settings.auth.admin_token is not None and not is_admin(settings, request.headers):
        raise Unauthorized("/metrics needs the admin token.")
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})

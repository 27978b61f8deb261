"""Token usage and billing-related request parameters, read from OpenAI-shaped JSON.

    >>> extract_usage(Endpoint.EMBEDDINGS, {"usage": {"prompt_tokens": 8, "total_tokens": 8}})
    Usage(prompt_tokens=8, cached_tokens=0, completion_tokens=0, reasoning_tokens=0, \
service_tier=None, tool_calls=())
    >>> output_limit(Endpoint.CHAT, {"max_tokens": 100, "max_completion_tokens": 50})
    100

Sans-IO functions over parsed JSON (``read_usage`` and ``read_object`` parse the bytes
with orjson first). Response bodies and stream events come from the
upstream and are untrusted: every reader here returns ``None`` (or ``""``, ``()``) on a
shape it does not recognise and never raises. Request parameters are the client's: an
invalid one raises ``InvalidParam``, which names the parameter for the 400 error body.

Wire formats read:

* chat/completions, completions: ``usage = {prompt_tokens, completion_tokens,
  prompt_tokens_details: {cached_tokens}, completion_tokens_details: {reasoning_tokens}}``
  and a top-level ``service_tier`` (on every chunk of a stream)
* embeddings: ``usage = {prompt_tokens, total_tokens}``
* responses: ``usage = {input_tokens, output_tokens, input_tokens_details:
  {cached_tokens}, output_tokens_details: {reasoning_tokens}}``, ``service_tier``, and
  hosted tool calls as ``output`` items (``web_search_call``, ``file_search_call``,
  ``code_interpreter_call``, ``image_generation_call``)

Request parameters read: the output limits (``max_tokens``, ``max_completion_tokens``,
``max_output_tokens``), ``n``/``best_of``/``prompt`` (how many completions), hosted
tools and ``max_tool_calls``, and Responses fields that bring server-side state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.endpoints import Endpoint

# No real request comes near this; a larger count is treated as garbage rather than
# carried into integer micro-USD arithmetic and a 64-bit store counter.
MAX_TOKENS = 2**40
# Largest value accepted for an integer request parameter (max_tokens, n, ...).
MAX_PARAM = 2**31 - 1
# A service tier longer than this is kept cut short (it is unrecognised either way).
_MAX_TIER_CHARS = 64

# Responses API stream events that carry the final ``response`` object with usage.
_RESPONSE_TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)
# Responses API stream events whose ``delta`` is generated text.
_RESPONSE_TEXT_EVENTS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)
# Responses output item types of hosted tools billed per call, by tool name.
_TOOL_CALL_ITEMS: Mapping[str, str] = {
    "web_search_call": "web_search",
    "file_search_call": "file_search",
    "code_interpreter_call": "code_interpreter",
    "image_generation_call": "image_generation",
}
# Request tool types of the same hosted tools. Dated variants of web search
# ("web_search_preview_2025_03_11", "web_search_2025_08_26") are matched by prefix.
_HOSTED_TOOL_TYPES = frozenset({"file_search", "code_interpreter", "image_generation"})
_WEB_SEARCH = "web_search"
# Every output-limit field a generating endpoint may read, its own first.
_OUTPUT_LIMIT_FIELDS: Mapping[Endpoint, tuple[str, ...]] = {
    Endpoint.CHAT: ("max_completion_tokens", "max_tokens", "max_output_tokens"),
    Endpoint.COMPLETIONS: ("max_tokens", "max_completion_tokens", "max_output_tokens"),
    Endpoint.RESPONSES: ("max_output_tokens", "max_tokens", "max_completion_tokens"),
}


@dataclass(slots=True)
class Usage:
    """Tokens one call used, as billed, with the tier it was served at and the hosted tool
    calls it reported.

    ``cached_tokens`` is the part of ``prompt_tokens`` billed at the cached-input price.
    ``reasoning_tokens`` is reported as is: OpenAI counts reasoning inside
    ``completion_tokens``/``output_tokens``, so it is then informational (pricing bills
    it only when a server reports more reasoning than completion tokens).
    ``service_tier`` is the tier the response reports (``None``: not reported);
    ``tool_calls`` is ``(name, count)`` of hosted tool calls, sorted by name.
    """

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    service_tier: str | None = None
    tool_calls: tuple[tuple[str, int], ...] = ()


class InvalidParam(ValueError):
    """A request parameter has an invalid value; ``param`` names it (``"max_tokens"``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


def _count(value: object) -> int | None:
    """``value`` as a token count, or ``None`` unless it is a plausible int (not bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    if value < 0 or value > MAX_TOKENS:
        return None
    return value


def _detail(details: object, key: str, ceiling: int) -> int:
    """An optional sub-count: missing or invalid is 0, and never more than ``ceiling``."""
    if not isinstance(details, (dict, Mapping)):
        return 0
    count = _count(details.get(key))
    return 0 if count is None else min(count, ceiling)


@dataclass(frozen=True, slots=True)
class _Shape:
    """Where one endpoint's usage object keeps its counts."""

    prompt: str
    completion: str | None  # None: the endpoint generates no output (embeddings)
    prompt_details: str
    completion_details: str


_CHAT_SHAPE = _Shape(
    "prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details"
)
_RESPONSES_SHAPE = _Shape(
    "input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details"
)
_EMBEDDINGS_SHAPE = _Shape("prompt_tokens", None, "prompt_tokens_details", "")


def _service_tier(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value[:_MAX_TIER_CHARS]


def _tool_calls(output: object) -> tuple[tuple[str, int], ...]:
    """Hosted tool calls among a Responses ``output`` list, as sorted ``(name, count)``."""
    if not isinstance(output, list):
        return ()
    calls: Counter[str] = Counter()
    for item in output:
        if isinstance(item, (dict, Mapping)):
            name = _tool_name(item.get("type"))
            if name is not None:
                calls[name] += 1
    return tuple(sorted(calls.items()))


def _tool_name(item_type: object) -> str | None:
    return _TOOL_CALL_ITEMS.get(item_type) if isinstance(item_type, str) else None


def _parse_usage(endpoint: Endpoint, usage: object, container: Mapping[str, Any]) -> Usage | None:
    """The usage object ``usage`` of a response (or chunk) ``container``."""
    if not isinstance(usage, (dict, Mapping)):
        return None
    if endpoint is Endpoint.RESPONSES:
        shape = _RESPONSES_SHAPE
    elif endpoint is Endpoint.EMBEDDINGS:
        shape = _EMBEDDINGS_SHAPE
    else:
        shape = _CHAT_SHAPE
    prompt = _count(usage.get(shape.prompt))
    completion = 0 if shape.completion is None else _count(usage.get(shape.completion))
    if prompt is None or completion is None:
        return None
    generates = shape.completion is not None
    return Usage(
        prompt_tokens=prompt,
        cached_tokens=_detail(usage.get(shape.prompt_details), "cached_tokens", prompt),
        completion_tokens=completion,
        reasoning_tokens=_detail(
            usage.get(shape.completion_details), "reasoning_tokens", MAX_TOKENS
        )
        if generates
        else 0,
        service_tier=_service_tier(container.get("service_tier")) if generates else None,
        tool_calls=_tool_calls(container.get("output")) if endpoint is Endpoint.RESPONSES else (),
    )


def _event_type_in(event: Mapping[str, Any], types: frozenset[str]) -> bool:
    kind = event.get("type")
    return isinstance(kind, str) and kind in types


def extract_usage(endpoint: Endpoint, body: Mapping[str, Any]) -> Usage | None:
    """The usage reported in a non-streamed response ``body``, or ``None``.

    ``None`` when usage is missing, null or malformed (a required count that is not a
    non-negative int). Optional details that are malformed count as 0; a cached count
    above the prompt count is clamped to it. The body's ``service_tier`` and (responses)
    the hosted tool calls among its ``output`` items come with it.
    """
    if not isinstance(body, (dict, Mapping)):
        return None
    return _parse_usage(endpoint, body.get("usage"), body)


def read_usage(endpoint: Endpoint, data: bytes | str) -> Usage | None:
    """``extract_usage`` of a non-streamed response as its raw bytes: ``None`` when they
    are not a JSON object (parsed by orjson, several times faster than ``json``)."""
    body = read_object(data)
    return None if body is None else extract_usage(endpoint, body)


def read_object(data: bytes | str) -> dict[str, Any] | None:
    """A JSON object (a response body, a stream event's data), or ``None`` for anything
    else: not JSON, another type, or numbers JSON allows and orjson refuses (integers
    beyond 64 bits, NaN), which no usage count can be."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _terminal_response(event: Mapping[str, Any]) -> Mapping[str, Any] | None:
    if not _event_type_in(event, _RESPONSE_TERMINAL_EVENTS):
        return None
    response = event.get("response")
    return response if isinstance(response, (dict, Mapping)) else None


def extract_stream_usage(endpoint: Endpoint, event: Mapping[str, Any]) -> Usage | None:
    """The usage carried by one parsed stream event, or ``None``.

    chat/completions and completions: the chunk's non-null ``usage`` (OpenAI sends it in
    a final chunk with ``"choices": []``; some servers send ``"choices": null`` or put
    usage on every chunk, so the caller keeps the last one seen), with the chunk's
    ``service_tier``. responses: the ``response.usage`` of a ``response.completed``,
    ``response.incomplete`` or ``response.failed`` event, with that response's
    ``service_tier`` and hosted tool calls.
    """
    if not isinstance(event, (dict, Mapping)):
        return None
    if endpoint is Endpoint.RESPONSES:
        response = _terminal_response(event)
        if response is None:
            return None
        return _parse_usage(endpoint, response.get("usage"), response)
    if endpoint is Endpoint.EMBEDDINGS:
        return None
    return _parse_usage(endpoint, event.get("usage"), event)


def stream_service_tier(endpoint: Endpoint, event: Mapping[str, Any]) -> str | None:
    """The service tier one parsed stream event reports, or ``None``.

    chat/completions and completions: the chunk's ``service_tier`` (on every chunk; the
    caller keeps the last one seen). responses: the ``service_tier`` of the ``response``
    object an event carries (``response.created``, ``response.completed``, ...).
    """
    if not isinstance(event, (dict, Mapping)) or endpoint is Endpoint.EMBEDDINGS:
        return None
    if endpoint is Endpoint.RESPONSES:
        response = event.get("response")
        if not isinstance(response, (dict, Mapping)):
            return None
        return _service_tier(response.get("service_tier"))
    return _service_tier(event.get("service_tier"))


def stream_tool_calls(endpoint: Endpoint, event: Mapping[str, Any]) -> str | None:
    """The hosted tool (``"web_search"``, ``"file_search"``, ``"code_interpreter"``,
    ``"image_generation"``) whose call one Responses ``response.output_item.done`` event
    completes, or ``None``.

    Counting these lets a stream that ends without ``response.completed`` still bill
    the calls it made (each item is done once; ``output_item.added`` is not counted).
    """
    if endpoint is not Endpoint.RESPONSES or not isinstance(event, (dict, Mapping)):
        return None
    if event.get("type") != "response.output_item.done":
        return None
    item = event.get("item")
    return _tool_name(item.get("type")) if isinstance(item, (dict, Mapping)) else None


def is_usage_only_chunk(event: Mapping[str, Any]) -> bool:
    """Whether a chat/completions chunk only carries usage (``choices`` empty or null).

    That is the extra chunk ``stream_options.include_usage`` adds, which the proxy may
    strip when it set the option itself and the client did not ask for it.
    """
    if not isinstance(event, (dict, Mapping)) or not isinstance(event.get("usage"), Mapping):
        return False
    choices = event.get("choices")
    return choices is None or (isinstance(choices, list) and not choices)


def _strings(*values: object) -> list[str]:
    return [value for value in values if isinstance(value, str)]


def _chat_delta_text(delta: object) -> list[str]:
    # Parsed JSON objects are dicts: checked as such (an ABC check per field costs more
    # than the rest of the tap, on every event of every stream).
    if not isinstance(delta, dict):
        return []
    content = delta.get("content")
    parts = [content] if isinstance(content, str) else []
    if len(delta) <= 2 and parts:  # {"content": ...} or with "role": nothing else to read
        return parts
    parts += _strings(delta.get("refusal"))
    # vLLM renamed reasoning_content to reasoning and may send both with the same text.
    reasoning = delta.get("reasoning_content")
    if not isinstance(reasoning, str) or not reasoning:
        reasoning = delta.get("reasoning")
    parts += _strings(reasoning)
    functions = [delta.get("function_call")]  # the deprecated single-function form
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        functions += [call.get("function") for call in calls if isinstance(call, dict)]
    for function in functions:
        if isinstance(function, dict):
            parts += _strings(function.get("name"), function.get("arguments"))
    return parts


def stream_text(endpoint: Endpoint, event: dict[str, Any]) -> str:
    """The generated text one parsed stream event carries, ``""`` if none.

    Used to count output tokens when a stream ends without usage: message content,
    refusals, reasoning text, and tool-call names and arguments.
    """
    if not isinstance(event, dict):
        return ""
    if endpoint is Endpoint.RESPONSES:
        if _event_type_in(event, _RESPONSE_TEXT_EVENTS):
            return "".join(_strings(event.get("delta")))
        return ""
    choices = event.get("choices")
    if endpoint is Endpoint.EMBEDDINGS or not isinstance(choices, list):
        return ""
    if endpoint is Endpoint.CHAT and len(choices) == 1 and isinstance(choices[0], dict):
        # Most chunks: one choice whose delta has content (and perhaps its role) only.
        delta = choices[0].get("delta")
        if isinstance(delta, dict) and len(delta) <= 2:
            content = delta.get("content")
            if isinstance(content, str) and (len(delta) == 1 or "role" in delta):
                return content
    parts: list[str] = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if endpoint is Endpoint.CHAT:
            parts += _chat_delta_text(choice.get("delta"))
        else:
            parts += _strings(choice.get("text"))
    return "".join(parts)


# --- request parameters -------------------------------------------------------------


def _int_param(body: Mapping[str, Any], param: str, minimum: int) -> int | None:
    """``body[param]`` as an int in ``[minimum, MAX_PARAM]``; ``None`` if absent or null."""
    value = body.get(param) if isinstance(body, (dict, Mapping)) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParam(param, f"Invalid type for '{param}': expected an integer.")
    if value < minimum:
        raise InvalidParam(
            param, f"Invalid '{param}': integer below minimum value; expected >= {minimum}."
        )
    if value > MAX_PARAM:
        raise InvalidParam(
            param, f"Invalid '{param}': integer above maximum value; expected <= {MAX_PARAM}."
        )
    return value


def _positive_param(body: Mapping[str, Any], param: str) -> int | None:
    """``body[param]`` as a positive int; ``None`` if absent or null."""
    value = body.get(param) if isinstance(body, (dict, Mapping)) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_PARAM:
        raise InvalidParam(
            param,
            f"Invalid '{param}': expected a positive integer (1 to {MAX_PARAM}).",
        )
    return value


def output_limit(endpoint: Endpoint, body: Mapping[str, Any]) -> int | None:
    """The request's output-token limit per choice, ``None`` if it sets none.

    Every output-limit field present counts, on any generating endpoint: ``max_tokens``,
    ``max_completion_tokens`` and ``max_output_tokens`` (servers accept each other's
    names, and some read 0 as unset and fall back to another field), so the limit is the
    largest of them. A null field is absent; any other value that is not a positive int
    raises ``InvalidParam`` naming that field. Embeddings generate nothing: 0.
    """
    if endpoint is Endpoint.EMBEDDINGS:
        return 0
    limits = [_positive_param(body, field) for field in _OUTPUT_LIMIT_FIELDS[endpoint]]
    present = [limit for limit in limits if limit is not None]
    return max(present) if present else None


def _clamped(value: object, limit: int) -> int:
    """``value`` lowered to ``limit``; ``limit`` if it is not a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return limit
    return min(value, limit)


def inject_output_limit(endpoint: Endpoint, body: dict[str, Any], limit: int) -> None:
    """Make ``body`` ask for at most ``limit`` output tokens per choice, in place.

    Sets the endpoint's own field (chat: ``max_completion_tokens``, completions:
    ``max_tokens``, responses: ``max_output_tokens``) to ``limit`` and lowers every other
    output-limit field present (not null) to at most ``limit``, so no field the upstream
    might read asks for more. Embeddings: nothing to do.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_PARAM:
        raise ValueError(f"an output limit must be a positive int, got {limit!r}")
    if endpoint is Endpoint.EMBEDDINGS:
        return
    own, *others = _OUTPUT_LIMIT_FIELDS[endpoint]
    body[own] = limit
    for field in others:
        if body.get(field) is not None:
            body[field] = _clamped(body[field], limit)


def _prompt_count(body: Mapping[str, Any]) -> int:
    """How many prompts a completions request sends (each gets its own completions)."""
    prompt = body.get("prompt") if isinstance(body, (dict, Mapping)) else None
    if prompt is None or isinstance(prompt, str):
        return 1  # absent: the API's default prompt, one
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return len(prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return 1  # one prompt as a token array
        if all(isinstance(p, list) for p in prompt):
            return len(prompt)  # token arrays
    raise InvalidParam(
        "prompt",
        "Invalid 'prompt': expected a string, an array of strings, an array of tokens, "
        "or an array of token arrays.",
    )


def choice_count(endpoint: Endpoint, body: Mapping[str, Any]) -> int:
    """How many completions the request generates, each up to ``output_limit`` tokens.

    chat/completions: ``n`` (default 1). completions: one set per prompt (a string, or
    one token array, is one prompt; a list of strings or of token arrays is one each),
    of ``max(n, best_of)`` completions (each ``best_of`` candidate is billed).
    responses, embeddings: 1. Raises ``InvalidParam`` for a non-int, bool or value below
    1, a malformed ``prompt``, or a total above ``MAX_PARAM``.
    """
    if endpoint not in (Endpoint.CHAT, Endpoint.COMPLETIONS):
        return 1
    n = _int_param(body, "n", 1) or 1
    if endpoint is Endpoint.CHAT:
        return n
    best_of = _int_param(body, "best_of", 1) or 1
    total = _prompt_count(body) * max(n, best_of)
    if total > MAX_PARAM:
        param = "n" if n >= best_of else "best_of"
        raise InvalidParam(
            param,
            f"Invalid '{param}': prompts x max(n, best_of) is {total} completions; "
            f"expected <= {MAX_PARAM}.",
        )
    return total


def _tools(endpoint: Endpoint, body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The Responses request's tool objects (not objects are left to the upstream)."""
    if endpoint is not Endpoint.RESPONSES or not isinstance(body, (dict, Mapping)):
        return []
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise InvalidParam("tools", "Invalid type for 'tools': expected an array.")
    return [tool for tool in tools if isinstance(tool, (dict, Mapping))]


def _hosted_tool(tool: Mapping[str, Any]) -> str | None:
    kind = tool.get("type")
    if not isinstance(kind, str):
        return None
    if kind.startswith(_WEB_SEARCH):
        return _WEB_SEARCH
    return kind if kind in _HOSTED_TOOL_TYPES else None


def hosted_tools(endpoint: Endpoint, body: Mapping[str, Any]) -> tuple[str, ...]:
    """The hosted tools billed per call that the request enables, each named once.

    responses: ``tools`` of type ``web_search``/``web_search_preview`` (and their dated
    variants; all named ``"web_search"``), ``file_search``, ``code_interpreter`` and
    ``image_generation``. chat/completions: ``"web_search"`` when ``web_search_options``
    is set. Raises ``InvalidParam`` when ``tools`` is not an array.
    """
    if endpoint is Endpoint.CHAT:
        options = body.get("web_search_options") if isinstance(body, (dict, Mapping)) else None
        return (_WEB_SEARCH,) if options is not None else ()
    names = (_hosted_tool(tool) for tool in _tools(endpoint, body))
    return tuple(dict.fromkeys(name for name in names if name is not None))


def _memory_gb(memory: str) -> float:
    try:
        return float(memory.lower().removesuffix("g"))
    except ValueError:
        return float("inf")  # unknown: the largest


def container_memory(endpoint: Endpoint, body: Mapping[str, Any]) -> str | None:
    """The largest ``memory_limit`` of the automatic containers the request's
    ``code_interpreter`` tools ask for (``"1g"``, the default, to ``"64g"``), or ``None``
    without one. A container given by id was created (and billed) beforehand.

    Code interpreter bills per container session by its memory: pass this to
    ``PriceTable.tool_prices_for``.
    """
    sizes: list[str] = []
    for tool in _tools(endpoint, body):
        if tool.get("type") != "code_interpreter":
            continue
        container = tool.get("container")
        if isinstance(container, (dict, Mapping)):
            memory = container.get("memory_limit")
            sizes.append(memory if isinstance(memory, str) and memory else "1g")
    return max(sizes, key=_memory_gb) if sizes else None


def unreported_tool_calls(endpoint: Endpoint, body: Mapping[str, Any]) -> dict[str, int]:
    """Hosted tool calls the upstream bills for a request whose response need not
    itemise them: the least to charge for each tool (``charge_micros(min_tool_calls=)``).

    chat/completions with ``web_search_options``: one web search (chat responses list no
    search calls). responses with a ``code_interpreter`` tool on an automatic container:
    one container session, which OpenAI starts (and bills) whether or not the model
    calls the tool.
    """
    floor: dict[str, int] = {}
    if endpoint is Endpoint.CHAT and hosted_tools(endpoint, body):
        floor[_WEB_SEARCH] = 1
    if container_memory(endpoint, body) is not None:
        floor["code_interpreter"] = 1
    return floor


def max_tool_calls(body: Mapping[str, Any]) -> int | None:
    """The Responses request's ``max_tool_calls`` (the most hosted tool calls the response
    may make, all tools together), ``None`` if absent or null. Raises ``InvalidParam``
    unless it is a positive int."""
    return _positive_param(body, "max_tool_calls")


def inject_max_tool_calls(body: dict[str, Any], limit: int) -> None:
    """Make a Responses ``body`` allow at most ``limit`` hosted tool calls, in place
    (sets ``max_tool_calls``, or lowers it), so a hold sized for ``limit`` calls holds."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_PARAM:
        raise ValueError(f"a tool call limit must be a positive int, got {limit!r}")
    body["max_tool_calls"] = _clamped(body.get("max_tool_calls"), limit)


def unsized_state(endpoint: Endpoint, body: Mapping[str, Any]) -> tuple[str, ...]:
    """The request fields that bring input the proxy never sees, so cannot size.

    responses: ``previous_response_id`` and ``conversation`` (earlier turns stored
    upstream), ``prompt`` when it is a stored prompt reference (an object with an
    ``id``), and ``item_reference`` for ``input`` items that point at stored items.
    Other endpoints carry no server-side state: ``()``.
    """
    if endpoint is not Endpoint.RESPONSES or not isinstance(body, (dict, Mapping)):
        return ()
    fields: list[str] = []
    for field in ("previous_response_id", "conversation"):
        if body.get(field) is not None:
            fields.append(field)
    prompt = body.get("prompt")
    if isinstance(prompt, (dict, Mapping)) and prompt.get("id") is not None:
        fields.append("prompt")
    items = body.get("input")
    if isinstance(items, list) and any(
        isinstance(item, (dict, Mapping)) and item.get("type") == "item_reference" for item in items
    ):
        fields.append("item_reference")
    return tuple(fields)


def is_background(endpoint: Endpoint, body: Mapping[str, Any]) -> bool:
    """Whether a Responses request asks to run in the background (``background`` set and
    not ``false``): its cost arrives after the request ends."""
    if endpoint is not Endpoint.RESPONSES or not isinstance(body, (dict, Mapping)):
        return False
    return body.get("background") not in (None, False)

"""Token usage and token-related request parameters, read from OpenAI-shaped JSON.

    >>> extract_usage(Endpoint.EMBEDDINGS, {"usage": {"prompt_tokens": 8, "total_tokens": 8}})
    Usage(prompt_tokens=8, cached_tokens=0, completion_tokens=0, reasoning_tokens=0)

Sans-IO functions over parsed JSON. Response bodies and stream events come from the
upstream and are untrusted: every reader here returns ``None`` (or ``""``) on a shape
it does not recognise and never raises. Request parameters are the client's: an invalid
one raises ``InvalidParam``, which names the parameter for the 400 error body.

Wire formats read:

* chat/completions, completions: ``usage = {prompt_tokens, completion_tokens,
  prompt_tokens_details: {cached_tokens}, completion_tokens_details: {reasoning_tokens}}``
* embeddings: ``usage = {prompt_tokens, total_tokens}``
* responses: ``usage = {input_tokens, output_tokens, input_tokens_details:
  {cached_tokens}, output_tokens_details: {reasoning_tokens}}``
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.endpoints import Endpoint

# No real request comes near this; a larger count is treated as garbage rather than
# carried into integer micro-USD arithmetic and a 64-bit store counter.
MAX_TOKENS = 2**40
# Largest value accepted for an integer request parameter (max_tokens, n, ...).
MAX_PARAM = 2**31 - 1

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


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one call used, as billed.

    ``cached_tokens`` is the part of ``prompt_tokens`` billed at the cached-input price;
    ``reasoning_tokens`` is the (informational) part of ``completion_tokens`` spent on
    reasoning. OpenAI already counts reasoning in ``completion_tokens``/``output_tokens``.
    """

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int


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
    if not isinstance(details, Mapping):
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


def _parse_usage(endpoint: Endpoint, usage: object) -> Usage | None:
    if not isinstance(usage, Mapping):
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
    return Usage(
        prompt_tokens=prompt,
        cached_tokens=_detail(usage.get(shape.prompt_details), "cached_tokens", prompt),
        completion_tokens=completion,
        reasoning_tokens=_detail(
            usage.get(shape.completion_details), "reasoning_tokens", completion
        ),
    )


def _event_type_in(event: Mapping[str, Any], types: frozenset[str]) -> bool:
    kind = event.get("type")
    return isinstance(kind, str) and kind in types


def extract_usage(endpoint: Endpoint, body: Mapping[str, Any]) -> Usage | None:
    """The usage reported in a non-streamed response ``body``, or ``None``.

    ``None`` when usage is missing, null or malformed (a required count that is not a
    non-negative int). Optional details that are malformed count as 0; a cached count
    above the prompt count is clamped to it.
    """
    if not isinstance(body, Mapping):
        return None
    return _parse_usage(endpoint, body.get("usage"))


def extract_stream_usage(endpoint: Endpoint, event: Mapping[str, Any]) -> Usage | None:
    """The usage carried by one parsed stream event, or ``None``.

    chat/completions and completions: the chunk's non-null ``usage`` (OpenAI sends it in
    a final chunk with ``"choices": []``; some servers send ``"choices": null`` or put
    usage on every chunk, so the caller keeps the last one seen). responses: the
    ``response.usage`` of a ``response.completed``, ``response.incomplete`` or
    ``response.failed`` event.
    """
    if not isinstance(event, Mapping):
        return None
    if endpoint is Endpoint.RESPONSES:
        if not _event_type_in(event, _RESPONSE_TERMINAL_EVENTS):
            return None
        response = event.get("response")
        if not isinstance(response, Mapping):
            return None
        return _parse_usage(endpoint, response.get("usage"))
    if endpoint is Endpoint.EMBEDDINGS:
        return None
    return _parse_usage(endpoint, event.get("usage"))


def is_usage_only_chunk(event: Mapping[str, Any]) -> bool:
    """Whether a chat/completions chunk only carries usage (``choices`` empty or null).

    That is the extra chunk ``stream_options.include_usage`` adds, which the proxy may
    strip when it set the option itself and the client did not ask for it.
    """
    if not isinstance(event, Mapping) or not isinstance(event.get("usage"), Mapping):
        return False
    choices = event.get("choices")
    return choices is None or (isinstance(choices, list) and not choices)


def _strings(*values: object) -> list[str]:
    return [value for value in values if isinstance(value, str)]


def _chat_delta_text(delta: object) -> list[str]:
    if not isinstance(delta, Mapping):
        return []
    parts = _strings(delta.get("content"), delta.get("refusal"))
    # vLLM renamed reasoning_content to reasoning and may send both with the same text.
    reasoning = delta.get("reasoning_content")
    if not isinstance(reasoning, str) or not reasoning:
        reasoning = delta.get("reasoning")
    parts += _strings(reasoning)
    functions = [delta.get("function_call")]  # the deprecated single-function form
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        functions += [call.get("function") for call in calls if isinstance(call, Mapping)]
    for function in functions:
        if isinstance(function, Mapping):
            parts += _strings(function.get("name"), function.get("arguments"))
    return parts


def stream_text(endpoint: Endpoint, event: Mapping[str, Any]) -> str:
    """The generated text one parsed stream event carries, ``""`` if none.

    Used to count output tokens when a stream ends without usage: message content,
    refusals, reasoning text, and tool-call names and arguments.
    """
    if not isinstance(event, Mapping):
        return ""
    if endpoint is Endpoint.RESPONSES:
        if _event_type_in(event, _RESPONSE_TEXT_EVENTS):
            return "".join(_strings(event.get("delta")))
        return ""
    choices = event.get("choices")
    if endpoint is Endpoint.EMBEDDINGS or not isinstance(choices, list):
        return ""
    parts: list[str] = []
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        if endpoint is Endpoint.CHAT:
            parts += _chat_delta_text(choice.get("delta"))
        else:
            parts += _strings(choice.get("text"))
    return "".join(parts)


def _int_param(body: Mapping[str, Any], param: str, minimum: int) -> int | None:
    """``body[param]`` as an int in ``[minimum, MAX_PARAM]``; ``None`` if absent or null."""
    value = body.get(param) if isinstance(body, Mapping) else None
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


def output_limit(endpoint: Endpoint, body: Mapping[str, Any]) -> int | None:
    """The request's output-token limit per choice, ``None`` if it sets none.

    chat/completions: ``max_completion_tokens``, else ``max_tokens``; completions:
    ``max_tokens``; responses: ``max_output_tokens``; embeddings: 0. A null value is
    absent. Raises ``InvalidParam`` for a non-int, bool, negative or absurd value.
    """
    if endpoint is Endpoint.EMBEDDINGS:
        return 0
    if endpoint is Endpoint.RESPONSES:
        return _int_param(body, "max_output_tokens", 0)
    max_tokens = _int_param(body, "max_tokens", 0)
    if endpoint is Endpoint.CHAT:
        max_completion_tokens = _int_param(body, "max_completion_tokens", 0)
        if max_completion_tokens is not None:
            return max_completion_tokens
    return max_tokens


def choice_count(endpoint: Endpoint, body: Mapping[str, Any]) -> int:
    """How many completions the request generates: ``n`` (default 1), and for
    completions ``best_of`` when larger (each candidate is billed). Raises
    ``InvalidParam`` for a non-int, bool or value below 1."""
    if endpoint not in (Endpoint.CHAT, Endpoint.COMPLETIONS):
        return 1
    n = _int_param(body, "n", 1) or 1
    if endpoint is Endpoint.COMPLETIONS:
        best_of = _int_param(body, "best_of", 1) or 1
        return max(n, best_of)
    return n

from __future__ import annotations

import contextlib
import doctest
import json
import random
from collections.abc import Mapping
from typing import Any

import pytest

from proxy import usage as usage_module
from proxy.endpoints import Endpoint
from proxy.usage import (
    MAX_PARAM,
    MAX_TOKENS,
    InvalidParam,
    Usage,
    choice_count,
    container_memory,
    extract_stream_usage,
    extract_usage,
    hosted_tools,
    inject_max_tool_calls,
    inject_output_limit,
    is_background,
    is_usage_only_chunk,
    max_tool_calls,
    output_limit,
    read_object,
    read_usage,
    stream_service_tier,
    stream_text,
    stream_tool_calls,
    unreported_tool_calls,
    unsized_state,
)

# --- real-shaped bodies ---------------------------------------------------------------

CHAT_BODY: dict[str, Any] = {
    "id": "chatcmpl-abc123",
    "object": "chat.completion",
    "created": 1741569952,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 2006,
        "completion_tokens": 300,
        "total_tokens": 2306,
        "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 192,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    },
    "service_tier": "default",
}

COMPLETIONS_BODY: dict[str, Any] = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [{"text": "\n\nThis is a test", "index": 0, "logprobs": None}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}

EMBEDDINGS_BODY: dict[str, Any] = {
    "object": "list",
    "data": [{"object": "embedding", "embedding": [0.0023, -0.0093], "index": 0}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}

RESPONSES_BODY: dict[str, Any] = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac6",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "model": "o3-2025-04-16",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd3acc8d48190a77525dc6de64b4",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "The image depicts", "annotations": []}],
        }
    ],
    "usage": {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 128},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 40},
        "total_tokens": 380,
    },
}


def u(
    prompt: int,
    cached: int,
    completion: int,
    reasoning: int,
    tier: str | None = None,
    tools: tuple[tuple[str, int], ...] = (),
) -> Usage:
    return Usage(
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
        service_tier=tier,
        tool_calls=tools,
    )


def with_usage(body: Mapping[str, Any], usage: Any) -> dict[str, Any]:
    return {**body, "usage": usage}


# --- extract_usage ------------------------------------------------------------------


def test_chat_usage_with_details() -> None:
    assert extract_usage(Endpoint.CHAT, CHAT_BODY) == u(2006, 1920, 300, 192, "default")


def test_completions_usage_without_details() -> None:
    assert extract_usage(Endpoint.COMPLETIONS, COMPLETIONS_BODY) == u(5, 0, 7, 0)


def test_embeddings_usage_has_no_completion() -> None:
    assert extract_usage(Endpoint.EMBEDDINGS, EMBEDDINGS_BODY) == u(8, 0, 0, 0)


def test_responses_usage_with_details() -> None:
    assert extract_usage(Endpoint.RESPONSES, RESPONSES_BODY) == u(328, 128, 52, 40)


def test_reasoning_is_part_of_completion_not_added() -> None:
    usage = extract_usage(Endpoint.RESPONSES, RESPONSES_BODY)
    assert usage is not None
    assert usage.completion_tokens == 52


def test_endpoint_shapes_do_not_mix() -> None:
    assert extract_usage(Endpoint.CHAT, RESPONSES_BODY) is None
    assert extract_usage(Endpoint.RESPONSES, CHAT_BODY) is None


@pytest.mark.parametrize("usage", [None, {}, [], "12", 12, {"total_tokens": 10}])
def test_missing_or_null_usage_is_none(usage: Any) -> None:
    assert extract_usage(Endpoint.CHAT, with_usage(CHAT_BODY, usage)) is None
    assert extract_usage(Endpoint.RESPONSES, with_usage(RESPONSES_BODY, usage)) is None
    assert extract_usage(Endpoint.EMBEDDINGS, with_usage(EMBEDDINGS_BODY, usage)) is None


def test_body_without_usage_key_is_none() -> None:
    body = {k: v for k, v in CHAT_BODY.items() if k != "usage"}
    assert extract_usage(Endpoint.CHAT, body) is None


@pytest.mark.parametrize("bad", [-1, 1.0, 1.5, "5", True, False, None, [1], {"n": 1}, 2**60])
def test_invalid_required_count_is_none(bad: Any) -> None:
    for key in ("prompt_tokens", "completion_tokens"):
        usage = {**CHAT_BODY["usage"], key: bad}
        assert extract_usage(Endpoint.CHAT, with_usage(CHAT_BODY, usage)) is None
    for key in ("input_tokens", "output_tokens"):
        usage = {**RESPONSES_BODY["usage"], key: bad}
        assert extract_usage(Endpoint.RESPONSES, with_usage(RESPONSES_BODY, usage)) is None


def test_chat_usage_needs_completion_tokens() -> None:
    usage = {"prompt_tokens": 5, "total_tokens": 5}
    assert extract_usage(Endpoint.CHAT, with_usage(CHAT_BODY, usage)) is None


@pytest.mark.parametrize("bad", [-1, 1.5, "5", True, None, [], {}])
def test_invalid_details_count_as_zero(bad: Any) -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": bad},
        "completion_tokens_details": {"reasoning_tokens": bad},
    }
    assert extract_usage(Endpoint.CHAT, {"usage": usage}) == u(10, 0, 4, 0)
    junk_details = {"prompt_tokens": 10, "completion_tokens": 4}
    junk_details["prompt_tokens_details"] = bad
    junk_details["completion_tokens_details"] = bad
    assert extract_usage(Endpoint.CHAT, {"usage": junk_details}) == u(10, 0, 4, 0)


def test_null_details_count_as_zero() -> None:
    usage = {
        "input_tokens": 10,
        "output_tokens": 3,
        "input_tokens_details": None,
        "output_tokens_details": None,
    }
    assert extract_usage(Endpoint.RESPONSES, {"usage": usage}) == u(10, 0, 3, 0)


def test_cached_above_prompt_is_clamped_and_reasoning_is_kept_as_reported() -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 9},
    }
    # pricing bills reasoning beyond completion: it must not be clamped away here
    assert extract_usage(Endpoint.CHAT, {"usage": usage}) == u(10, 10, 4, 9)


def test_zero_usage_is_valid() -> None:
    usage = {"prompt_tokens": 0, "completion_tokens": 0}
    assert extract_usage(Endpoint.CHAT, {"usage": usage}) == u(0, 0, 0, 0)


@pytest.mark.parametrize("body", [None, [], "x", 1, [("usage", {})]])
def test_non_mapping_body_is_none(body: Any) -> None:
    for endpoint in Endpoint:
        assert extract_usage(endpoint, body) is None
        assert extract_stream_usage(endpoint, body) is None


def test_usage_from_decoded_json() -> None:
    body = json.loads(json.dumps(CHAT_BODY))
    assert extract_usage(Endpoint.CHAT, body) == u(2006, 1920, 300, 192, "default")


# --- streaming ----------------------------------------------------------------------

CHUNK = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_44709d6fcb",
    "choices": [{"index": 0, "delta": {"content": "Hello"}, "logprobs": None}],
    "usage": None,
}

OPENAI_USAGE_CHUNK = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "choices": [],
    "usage": {
        "prompt_tokens": 19,
        "completion_tokens": 10,
        "total_tokens": 29,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
}

VLLM_USAGE_CHUNK = {
    "id": "chatcmpl-9f2",
    "object": "chat.completion.chunk",
    "created": 1720000000,
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "choices": None,
    "usage": {"prompt_tokens": 12, "total_tokens": 40, "completion_tokens": 28},
}


def test_content_chunk_has_no_usage() -> None:
    assert extract_stream_usage(Endpoint.CHAT, CHUNK) is None
    assert not is_usage_only_chunk(CHUNK)


def test_openai_final_usage_chunk() -> None:
    assert extract_stream_usage(Endpoint.CHAT, OPENAI_USAGE_CHUNK) == u(19, 0, 10, 0)
    assert is_usage_only_chunk(OPENAI_USAGE_CHUNK)
    assert stream_text(Endpoint.CHAT, OPENAI_USAGE_CHUNK) == ""


def test_vllm_usage_chunk_with_null_choices() -> None:
    assert extract_stream_usage(Endpoint.CHAT, VLLM_USAGE_CHUNK) == u(12, 0, 28, 0)
    assert is_usage_only_chunk(VLLM_USAGE_CHUNK)
    assert stream_text(Endpoint.CHAT, VLLM_USAGE_CHUNK) == ""


def test_usage_chunk_without_choices_key() -> None:
    chunk = {k: v for k, v in OPENAI_USAGE_CHUNK.items() if k != "choices"}
    assert is_usage_only_chunk(chunk)


def test_usage_on_every_chunk_last_one_wins() -> None:
    chunks = [
        {**CHUNK, "usage": {"prompt_tokens": 12, "completion_tokens": n, "total_tokens": 12 + n}}
        for n in (1, 2, 3)
    ]
    seen = [extract_stream_usage(Endpoint.CHAT, c) for c in chunks]
    assert seen == [u(12, 0, 1, 0), u(12, 0, 2, 0), u(12, 0, 3, 0)]
    # chunks that carry choices are never usage-only, so they are never stripped
    assert not any(is_usage_only_chunk(c) for c in chunks)


def test_completions_stream_usage_chunk() -> None:
    chunk = {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19},
    }
    assert extract_stream_usage(Endpoint.COMPLETIONS, chunk) == u(3, 0, 16, 0)


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": [], "usage": None},
        {"choices": [], "usage": "x"},
        {"choices": [{"index": 0}], "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        {"choices": {}, "usage": {"prompt_tokens": 1, "completion_tokens": 1}},
        {"choices": "", "usage": {}},
        {},
        # Azure's first chunk: no choices, prompt filter results, no usage
        {"choices": [], "prompt_filter_results": [{"prompt_index": 0}], "usage": None},
    ],
)
def test_not_usage_only(chunk: Any) -> None:
    assert not is_usage_only_chunk(chunk)


@pytest.mark.parametrize("event", [None, [], "x", 3])
def test_usage_only_tolerates_junk(event: Any) -> None:
    assert not is_usage_only_chunk(event)


def response_event(kind: str, usage: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "sequence_number": 42,
        "response": {**RESPONSES_BODY, "status": kind.removeprefix("response."), "usage": usage},
    }


@pytest.mark.parametrize("kind", ["response.completed", "response.incomplete", "response.failed"])
def test_responses_terminal_events_carry_usage(kind: str) -> None:
    event = response_event(kind, RESPONSES_BODY["usage"])
    assert extract_stream_usage(Endpoint.RESPONSES, event) == u(328, 128, 52, 40)


@pytest.mark.parametrize(
    "kind", ["response.created", "response.in_progress", "response.output_text.delta", "", None]
)
def test_other_responses_events_carry_no_usage(kind: Any) -> None:
    event = response_event("response.completed", RESPONSES_BODY["usage"])
    event["type"] = kind
    assert extract_stream_usage(Endpoint.RESPONSES, event) is None


@pytest.mark.parametrize("response", [None, "x", [], {"usage": None}, {}])
def test_responses_terminal_event_without_usage(response: Any) -> None:
    event = {"type": "response.completed", "response": response}
    assert extract_stream_usage(Endpoint.RESPONSES, event) is None


def test_unhashable_event_type_does_not_raise() -> None:
    event = {"type": ["response.completed"], "response": RESPONSES_BODY, "delta": "x"}
    assert extract_stream_usage(Endpoint.RESPONSES, event) is None
    assert stream_text(Endpoint.RESPONSES, event) == ""


def test_embeddings_have_no_stream_usage() -> None:
    assert extract_stream_usage(Endpoint.EMBEDDINGS, OPENAI_USAGE_CHUNK) is None


# --- stream_text ----------------------------------------------------------------------


def chat_chunk(*deltas: Any) -> dict[str, Any]:
    return {
        "object": "chat.completion.chunk",
        "choices": [{"index": i, "delta": d, "finish_reason": None} for i, d in enumerate(deltas)],
    }


def test_chat_content() -> None:
    assert stream_text(Endpoint.CHAT, CHUNK) == "Hello"
    assert stream_text(Endpoint.CHAT, chat_chunk({"role": "assistant", "content": ""})) == ""


def test_chat_refusal() -> None:
    chunk = chat_chunk({"content": None, "refusal": "I can't help with that."})
    assert stream_text(Endpoint.CHAT, chunk) == "I can't help with that."


def test_chat_reasoning_content() -> None:
    chunk = chat_chunk({"reasoning_content": "Let me think", "content": None})
    assert stream_text(Endpoint.CHAT, chunk) == "Let me think"


def test_chat_vllm_reasoning_field() -> None:
    assert stream_text(Endpoint.CHAT, chat_chunk({"reasoning": "hmm"})) == "hmm"


def test_chat_reasoning_sent_under_both_names_counts_once() -> None:
    chunk = chat_chunk({"reasoning": "hmm", "reasoning_content": "hmm"})
    assert stream_text(Endpoint.CHAT, chunk) == "hmm"


def test_chat_tool_calls() -> None:
    first = chat_chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_DdmO9pD3xa9XTPNJ32zg2hcA",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    )
    later = chat_chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"loc'}}]})
    assert stream_text(Endpoint.CHAT, first) == "get_weather"
    assert stream_text(Endpoint.CHAT, later) == '{"loc'


def test_chat_parallel_tool_calls_and_choices() -> None:
    chunk = chat_chunk(
        {
            "tool_calls": [
                {"index": 0, "function": {"arguments": "a"}},
                {"index": 1, "function": {"name": "f", "arguments": "b"}},
            ]
        },
        {"content": "c"},
    )
    assert stream_text(Endpoint.CHAT, chunk) == "afbc"


def test_chat_legacy_function_call() -> None:
    chunk = chat_chunk({"function_call": {"name": "f", "arguments": "{}"}})
    assert stream_text(Endpoint.CHAT, chunk) == "f{}"


def test_completions_text() -> None:
    chunk = {
        "object": "text_completion",
        "choices": [
            {"text": "Hello", "index": 0, "logprobs": None, "finish_reason": None},
            {"text": " there", "index": 1, "logprobs": None, "finish_reason": None},
        ],
    }
    assert stream_text(Endpoint.COMPLETIONS, chunk) == "Hello there"
    # the completions reader looks at text only, not chat deltas
    assert stream_text(Endpoint.COMPLETIONS, CHUNK) == ""


@pytest.mark.parametrize(
    "kind",
    [
        "response.output_text.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
        "response.refusal.delta",
        "response.custom_tool_call_input.delta",
    ],
)
def test_responses_text_events(kind: str) -> None:
    event = {
        "type": kind,
        "item_id": "msg_123",
        "output_index": 0,
        "content_index": 0,
        "delta": "In",
        "sequence_number": 1,
    }
    assert stream_text(Endpoint.RESPONSES, event) == "In"


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.created", "response": RESPONSES_BODY},
        {"type": "response.output_text.done", "text": "Full text"},
        {"type": "response.function_call_arguments.done", "arguments": "{}"},
        {"type": "response.completed", "response": RESPONSES_BODY},
        {"type": "response.output_text.delta", "delta": None},
        {"type": "response.output_text.delta", "delta": 5},
        {"type": "error", "message": "boom"},
        {"delta": "untyped"},
    ],
)
def test_other_responses_events_have_no_text(event: Any) -> None:
    assert stream_text(Endpoint.RESPONSES, event) == ""


@pytest.mark.parametrize(
    "event",
    [
        None,
        [],
        {},
        {"choices": None},
        {"choices": "abc"},
        {"choices": [None, 1, "x", []]},
        {"choices": [{"delta": None}]},
        {"choices": [{"delta": "text"}]},
        {"choices": [{"delta": {"content": 5, "tool_calls": "x"}}]},
        {"choices": [{"delta": {"tool_calls": [None, {"function": None}, {"function": 3}]}}]},
        {"choices": [{"delta": {"tool_calls": [{"function": {"name": 1, "arguments": []}}]}}]},
    ],
)
def test_chat_stream_text_tolerates_junk(event: Any) -> None:
    assert stream_text(Endpoint.CHAT, event) == ""
    assert stream_text(Endpoint.COMPLETIONS, event) == ""


def test_embeddings_have_no_stream_text() -> None:
    assert stream_text(Endpoint.EMBEDDINGS, CHUNK) == ""


# --- fuzz -----------------------------------------------------------------------------

_KEYS = [
    "usage",
    "choices",
    "delta",
    "content",
    "text",
    "type",
    "response",
    "prompt_tokens",
    "completion_tokens",
    "input_tokens",
    "output_tokens",
    "prompt_tokens_details",
    "input_tokens_details",
    "cached_tokens",
    "reasoning_tokens",
    "tool_calls",
    "function",
    "arguments",
    "name",
    "reasoning",
    "reasoning_content",
    "refusal",
    "function_call",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
]
_TYPES = ["response.completed", "response.output_text.delta", "response.failed"]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 4 or roll < 0.35:
        return rng.choice(
            [
                None,
                True,
                False,
                0,
                -1,
                7,
                2**70,
                -(2**70),
                1.5,
                float("nan"),
                float("inf"),
                "",
                "x",
                rng.choice(_TYPES),
            ]
        )
    if roll < 0.55:
        return [_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(_KEYS): _junk(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def test_random_nested_junk_never_raises() -> None:
    rng = random.Random(20240806)
    for _ in range(3000):
        event = _junk(rng)
        for endpoint in Endpoint:
            usage = extract_usage(endpoint, event)
            stream_usage = extract_stream_usage(endpoint, event)
            for found in (usage, stream_usage):
                if found is not None:
                    assert 0 <= found.cached_tokens <= found.prompt_tokens
                    assert 0 <= found.reasoning_tokens <= MAX_TOKENS
                    assert found.service_tier is None or isinstance(found.service_tier, str)
                    assert all(count > 0 for _, count in found.tool_calls)
            assert isinstance(stream_text(endpoint, event), str)
            assert isinstance(is_usage_only_chunk(event), bool)
            # request parameters may be rejected, but only with InvalidParam
            try:
                output_limit(endpoint, event)
                choice_count(endpoint, event)
            except InvalidParam:
                pass


# --- output_limit -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "limit"),
    [
        (Endpoint.CHAT, {}, None),
        (Endpoint.CHAT, {"max_tokens": 100}, 100),
        (Endpoint.CHAT, {"max_completion_tokens": 200}, 200),
        (Endpoint.CHAT, {"max_completion_tokens": 200, "max_tokens": 100}, 200),
        (Endpoint.CHAT, {"max_completion_tokens": None, "max_tokens": 100}, 100),
        (Endpoint.CHAT, {"max_tokens": None}, None),
        (Endpoint.CHAT, {"max_output_tokens": 50}, 50),
        (Endpoint.COMPLETIONS, {"max_tokens": 16}, 16),
        (Endpoint.COMPLETIONS, {"max_completion_tokens": 10}, 10),
        (Endpoint.RESPONSES, {"max_output_tokens": 1024}, 1024),
        (Endpoint.RESPONSES, {"max_tokens": 1024}, 1024),
        (Endpoint.RESPONSES, {}, None),
        (Endpoint.EMBEDDINGS, {}, 0),
        (Endpoint.EMBEDDINGS, {"max_tokens": 99}, 0),
        (Endpoint.CHAT, {"max_tokens": MAX_PARAM}, MAX_PARAM),
    ],
)
def test_output_limit(endpoint: Endpoint, body: dict[str, Any], limit: int | None) -> None:
    assert output_limit(endpoint, body) == limit


@pytest.mark.parametrize("bad", [0, -1, 1.0, 10.5, "100", True, False, [], {}, MAX_PARAM + 1])
@pytest.mark.parametrize(
    ("endpoint", "param"),
    [
        (Endpoint.CHAT, "max_tokens"),
        (Endpoint.CHAT, "max_completion_tokens"),
        (Endpoint.COMPLETIONS, "max_tokens"),
        (Endpoint.RESPONSES, "max_output_tokens"),
        (Endpoint.RESPONSES, "max_tokens"),
        (Endpoint.COMPLETIONS, "max_completion_tokens"),
        (Endpoint.CHAT, "max_output_tokens"),
    ],
)
def test_invalid_output_limit_names_the_param(endpoint: Endpoint, param: str, bad: Any) -> None:
    with pytest.raises(InvalidParam) as info:
        output_limit(endpoint, {param: bad})
    assert info.value.param == param
    assert param in info.value.message
    assert isinstance(info.value, ValueError)


def test_invalid_max_tokens_is_rejected_even_beside_max_completion_tokens() -> None:
    with pytest.raises(InvalidParam) as info:
        output_limit(Endpoint.CHAT, {"max_completion_tokens": 10, "max_tokens": -5})
    assert info.value.param == "max_tokens"


# --- choice_count -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "count"),
    [
        (Endpoint.CHAT, {}, 1),
        (Endpoint.CHAT, {"n": None}, 1),
        (Endpoint.CHAT, {"n": 3}, 3),
        (Endpoint.CHAT, {"best_of": 5}, 1),
        (Endpoint.COMPLETIONS, {"n": 2}, 2),
        (Endpoint.COMPLETIONS, {"n": 2, "best_of": 5}, 5),
        (Endpoint.COMPLETIONS, {"n": 4, "best_of": 1}, 4),
        (Endpoint.COMPLETIONS, {"best_of": None}, 1),
        (Endpoint.RESPONSES, {"n": 4}, 1),
        (Endpoint.EMBEDDINGS, {"n": 4}, 1),
    ],
)
def test_choice_count(endpoint: Endpoint, body: dict[str, Any], count: int) -> None:
    assert choice_count(endpoint, body) == count


@pytest.mark.parametrize("bad", [0, -1, 1.0, "2", True, False, [2], MAX_PARAM + 1])
def test_invalid_n(bad: Any) -> None:
    for endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS):
        with pytest.raises(InvalidParam) as info:
            choice_count(endpoint, {"n": bad})
        assert info.value.param == "n"


@pytest.mark.parametrize("bad", [0, -3, 2.0, "5", True])
def test_invalid_best_of(bad: Any) -> None:
    with pytest.raises(InvalidParam) as info:
        choice_count(Endpoint.COMPLETIONS, {"n": 1, "best_of": bad})
    assert info.value.param == "best_of"


# --- service tier and hosted tool calls ---------------------------------------------


def responses_body(*items: dict[str, Any], tier: Any = "priority") -> dict[str, Any]:
    return {**RESPONSES_BODY, "service_tier": tier, "output": [*items, *RESPONSES_BODY["output"]]}


WEB_SEARCH_CALL = {"type": "web_search_call", "id": "ws_1", "status": "completed"}
FILE_SEARCH_CALL = {"type": "file_search_call", "id": "fs_1", "queries": ["a", "b"]}
CODE_CALL = {"type": "code_interpreter_call", "id": "ci_1", "container_id": "cntr_1"}
IMAGE_CALL = {"type": "image_generation_call", "id": "ig_1", "result": "..."}
FUNCTION_CALL = {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"}


def test_responses_body_reports_its_tier_and_hosted_tool_calls() -> None:
    body = responses_body(
        WEB_SEARCH_CALL, FUNCTION_CALL, WEB_SEARCH_CALL, FILE_SEARCH_CALL, CODE_CALL, IMAGE_CALL
    )
    tools = (
        ("code_interpreter", 1),
        ("file_search", 1),
        ("image_generation", 1),
        ("web_search", 2),
    )
    assert extract_usage(Endpoint.RESPONSES, body) == u(328, 128, 52, 40, "priority", tools)


@pytest.mark.parametrize("kind", ["response.completed", "response.incomplete", "response.failed"])
def test_responses_terminal_event_reports_the_tier_and_tool_calls_of_its_response(
    kind: str,
) -> None:
    event = {"type": kind, "response": responses_body(WEB_SEARCH_CALL, tier="flex")}
    assert extract_stream_usage(Endpoint.RESPONSES, event) == u(
        328, 128, 52, 40, "flex", (("web_search", 1),)
    )


def test_completions_body_without_a_tier_reports_none() -> None:
    assert extract_usage(Endpoint.COMPLETIONS, COMPLETIONS_BODY) == u(5, 0, 7, 0, None)


def test_embeddings_usage_never_has_a_tier_or_tool_calls() -> None:
    body = {**EMBEDDINGS_BODY, "service_tier": "priority", "output": [WEB_SEARCH_CALL]}
    assert extract_usage(Endpoint.EMBEDDINGS, body) == u(8, 0, 0, 0)


def test_chat_bodies_never_report_tool_calls_from_output_items() -> None:
    body = {**CHAT_BODY, "output": [WEB_SEARCH_CALL]}
    usage = extract_usage(Endpoint.CHAT, body)
    assert usage is not None
    assert usage.tool_calls == ()


@pytest.mark.parametrize("tier", [None, "", 5, True, [], {"tier": "priority"}])
def test_a_tier_that_is_not_a_string_is_not_reported(tier: Any) -> None:
    usage = extract_usage(Endpoint.CHAT, {**CHAT_BODY, "service_tier": tier})
    assert usage is not None
    assert usage.service_tier is None
    usage = extract_usage(Endpoint.RESPONSES, responses_body(tier=tier))
    assert usage is not None
    assert usage.service_tier is None


def test_an_overlong_tier_is_cut_short() -> None:
    usage = extract_usage(Endpoint.CHAT, {**CHAT_BODY, "service_tier": "x" * 10_000})
    assert usage is not None
    assert usage.service_tier == "x" * 64


@pytest.mark.parametrize(
    "output", [None, "x", {}, [None, 1, "web_search_call", [], {"type": ["x"]}, {"type": 3}]]
)
def test_junk_output_counts_no_tool_calls(output: Any) -> None:
    usage = extract_usage(Endpoint.RESPONSES, {**RESPONSES_BODY, "output": output})
    assert usage is not None
    assert usage.tool_calls == ()


def test_usage_built_without_tier_or_tools_keeps_working() -> None:
    usage = Usage(prompt_tokens=1, cached_tokens=0, completion_tokens=2, reasoning_tokens=0)
    assert usage.service_tier is None
    assert usage.tool_calls == ()


# --- stream_service_tier, stream_tool_calls -------------------------------------------


def test_every_chat_chunk_reports_its_tier() -> None:
    assert stream_service_tier(Endpoint.CHAT, {**CHUNK, "service_tier": "default"}) == "default"
    usage_chunk = {**OPENAI_USAGE_CHUNK, "service_tier": "priority"}
    assert stream_service_tier(Endpoint.CHAT, usage_chunk) == "priority"
    assert extract_stream_usage(Endpoint.CHAT, usage_chunk) == u(19, 0, 10, 0, "priority")
    assert stream_service_tier(Endpoint.COMPLETIONS, {"service_tier": "flex"}) == "flex"


@pytest.mark.parametrize("kind", ["response.created", "response.in_progress", "response.completed"])
def test_responses_events_report_the_tier_of_their_response(kind: str) -> None:
    event = {"type": kind, "response": {**RESPONSES_BODY, "service_tier": "priority"}}
    assert stream_service_tier(Endpoint.RESPONSES, event) == "priority"


@pytest.mark.parametrize(
    ("endpoint", "event"),
    [
        (Endpoint.CHAT, CHUNK),
        (Endpoint.CHAT, {"service_tier": None}),
        (Endpoint.CHAT, {"service_tier": 1}),
        (Endpoint.CHAT, None),
        (Endpoint.RESPONSES, {"type": "response.output_text.delta", "service_tier": "flex"}),
        (Endpoint.RESPONSES, {"type": "response.created", "response": "x"}),
        (Endpoint.EMBEDDINGS, {"service_tier": "priority"}),
    ],
)
def test_events_without_a_tier_report_none(endpoint: Endpoint, event: Any) -> None:
    assert stream_service_tier(endpoint, event) is None


@pytest.mark.parametrize(
    ("item", "tool"),
    [
        (WEB_SEARCH_CALL, "web_search"),
        (FILE_SEARCH_CALL, "file_search"),
        (CODE_CALL, "code_interpreter"),
        (IMAGE_CALL, "image_generation"),
    ],
)
def test_a_done_hosted_tool_item_names_its_tool(item: dict[str, Any], tool: str) -> None:
    event = {"type": "response.output_item.done", "output_index": 0, "item": item}
    assert stream_tool_calls(Endpoint.RESPONSES, event) == tool


@pytest.mark.parametrize(
    ("endpoint", "event"),
    [
        (Endpoint.RESPONSES, {"type": "response.output_item.added", "item": WEB_SEARCH_CALL}),
        (Endpoint.RESPONSES, {"type": "response.output_item.done", "item": FUNCTION_CALL}),
        (Endpoint.RESPONSES, {"type": "response.output_item.done", "item": None}),
        (Endpoint.RESPONSES, {"type": "response.output_item.done", "item": {"type": 1}}),
        (Endpoint.RESPONSES, {"type": ["response.output_item.done"], "item": CODE_CALL}),
        (Endpoint.RESPONSES, {"type": "response.web_search_call.completed", "item_id": "ws"}),
        (Endpoint.RESPONSES, None),
        (Endpoint.CHAT, {"type": "response.output_item.done", "item": WEB_SEARCH_CALL}),
    ],
)
def test_other_events_name_no_tool(endpoint: Endpoint, event: Any) -> None:
    assert stream_tool_calls(endpoint, event) is None


# --- output limits --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "limit"),
    [
        (Endpoint.CHAT, {"max_tokens": 500, "max_completion_tokens": 100}, 500),
        (Endpoint.CHAT, {"max_tokens": 10, "max_output_tokens": 7000}, 7000),
        (Endpoint.COMPLETIONS, {"max_tokens": 16, "max_completion_tokens": 4096}, 4096),
        (Endpoint.RESPONSES, {"max_output_tokens": 16, "max_tokens": 9000}, 9000),
        (Endpoint.RESPONSES, {"max_output_tokens": None, "max_completion_tokens": 3}, 3),
    ],
)
def test_the_largest_output_limit_field_is_the_limit(
    endpoint: Endpoint, body: dict[str, Any], limit: int
) -> None:
    assert output_limit(endpoint, body) == limit


def test_a_zero_limit_is_rejected_rather_than_read_as_unset() -> None:
    # Some servers take 0 as "unset" and fall back to another, larger field.
    with pytest.raises(InvalidParam) as info:
        output_limit(Endpoint.CHAT, {"max_completion_tokens": 0, "max_tokens": 100})
    assert info.value.param == "max_completion_tokens"
    assert "positive integer" in info.value.message


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        (Endpoint.CHAT, "max_completion_tokens"),
        (Endpoint.COMPLETIONS, "max_tokens"),
        (Endpoint.RESPONSES, "max_output_tokens"),
    ],
)
def test_injecting_a_limit_sets_the_endpoints_own_field(endpoint: Endpoint, field: str) -> None:
    body: dict[str, Any] = {"model": "m"}
    inject_output_limit(endpoint, body, 256)
    assert body == {"model": "m", field: 256}
    assert output_limit(endpoint, body) == 256


def test_injecting_a_limit_lowers_every_other_limit_field() -> None:
    body: dict[str, Any] = {"max_tokens": 5000, "max_output_tokens": 9000}
    inject_output_limit(Endpoint.CHAT, body, 100)
    assert body == {"max_completion_tokens": 100, "max_tokens": 100, "max_output_tokens": 100}


def test_injecting_a_limit_keeps_a_smaller_client_limit_on_other_fields() -> None:
    body: dict[str, Any] = {"max_completion_tokens": 5000, "max_tokens": 50}
    inject_output_limit(Endpoint.CHAT, body, 100)
    assert body == {"max_completion_tokens": 100, "max_tokens": 50}


def test_injecting_a_limit_leaves_null_and_absent_fields_alone() -> None:
    body: dict[str, Any] = {"max_output_tokens": 900, "max_tokens": None}
    inject_output_limit(Endpoint.RESPONSES, body, 300)
    assert body == {"max_output_tokens": 300, "max_tokens": None}


@pytest.mark.parametrize("bad", [0, -4, 1.5, "100", True, [], {}])
def test_injecting_a_limit_overwrites_an_invalid_other_field(bad: Any) -> None:
    body: dict[str, Any] = {"max_tokens": bad}
    inject_output_limit(Endpoint.RESPONSES, body, 300)
    assert body == {"max_output_tokens": 300, "max_tokens": 300}


def test_after_injection_no_field_asks_for_more_than_the_limit() -> None:
    rng = random.Random(7)
    fields = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
    values: list[Any] = [None, 1, 99, 100, 101, 10**6, 0, -1, "9", 2.5, True]
    for _ in range(500):
        body = {f: rng.choice(values) for f in fields if rng.random() < 0.6}
        endpoint = rng.choice([Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES])
        inject_output_limit(endpoint, body, 100)
        assert output_limit(endpoint, body) == 100


def test_injecting_into_an_embeddings_body_changes_nothing() -> None:
    body: dict[str, Any] = {"input": "x", "max_tokens": 5}
    inject_output_limit(Endpoint.EMBEDDINGS, body, 10)
    assert body == {"input": "x", "max_tokens": 5}


@pytest.mark.parametrize("bad", [0, -1, MAX_PARAM + 1, True])
def test_injecting_a_limit_below_one_is_a_programming_error(bad: Any) -> None:
    with pytest.raises(ValueError):
        inject_output_limit(Endpoint.CHAT, {}, bad)


# --- completions per prompt -------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("Say this is a test", 1),
        (["a", "b", "c"], 3),
        ([1212, 318, 257], 1),
        ([[1212, 318], [257], []], 3),
        (["only"], 1),
    ],
)
def test_each_completions_prompt_gets_its_own_completions(prompt: Any, prompts: int) -> None:
    assert choice_count(Endpoint.COMPLETIONS, {"prompt": prompt}) == prompts
    assert choice_count(Endpoint.COMPLETIONS, {"prompt": prompt, "n": 2}) == prompts * 2
    body = {"prompt": prompt, "n": 2, "best_of": 3}
    assert choice_count(Endpoint.COMPLETIONS, body) == prompts * 3


def test_a_completions_request_without_a_prompt_is_one_prompt() -> None:
    assert choice_count(Endpoint.COMPLETIONS, {"n": 2}) == 2
    assert choice_count(Endpoint.COMPLETIONS, {"prompt": None}) == 1


@pytest.mark.parametrize(
    "prompt", [[], ["a", 1], [1, [2]], [True, False], [{"text": "a"}], {"a": 1}, 5, 1.5, True]
)
def test_malformed_prompts_are_rejected(prompt: Any) -> None:
    with pytest.raises(InvalidParam) as info:
        choice_count(Endpoint.COMPLETIONS, {"prompt": prompt})
    assert info.value.param == "prompt"


def test_chat_counts_no_prompts() -> None:
    assert choice_count(Endpoint.CHAT, {"prompt": ["a", "b"], "n": 2}) == 2


def test_an_absurd_number_of_completions_is_rejected() -> None:
    with pytest.raises(InvalidParam) as info:
        choice_count(Endpoint.COMPLETIONS, {"prompt": ["a", "b"], "n": MAX_PARAM})
    assert info.value.param == "n"
    with pytest.raises(InvalidParam) as info:
        choice_count(Endpoint.COMPLETIONS, {"prompt": ["a", "b"], "n": 2, "best_of": 2**30})
    assert info.value.param == "best_of"
    assert choice_count(Endpoint.COMPLETIONS, {"prompt": "a", "n": MAX_PARAM}) == MAX_PARAM


# --- hosted tools -----------------------------------------------------------------------


def test_responses_hosted_tools_are_named_once_each() -> None:
    body = {
        "tools": [
            {"type": "function", "name": "f", "parameters": {}},
            {"type": "web_search_preview"},
            {"type": "file_search", "vector_store_ids": ["vs_1"]},
            {"type": "web_search"},
            {"type": "code_interpreter", "container": {"type": "auto"}},
            {"type": "image_generation"},
            {"type": "mcp", "server_label": "x", "server_url": "https://example.com"},
            {"type": "file_search", "vector_store_ids": ["vs_2"]},
        ]
    }
    assert hosted_tools(Endpoint.RESPONSES, body) == (
        "web_search",
        "file_search",
        "code_interpreter",
        "image_generation",
    )


@pytest.mark.parametrize(
    "kind",
    ["web_search", "web_search_preview", "web_search_preview_2025_03_11", "web_search_2025_08_26"],
)
def test_every_web_search_tool_version_is_web_search(kind: str) -> None:
    assert hosted_tools(Endpoint.RESPONSES, {"tools": [{"type": kind}]}) == ("web_search",)


@pytest.mark.parametrize(
    "tools",
    [None, [], [None, 1, "web_search", {"type": None}], [{"type": "function"}, {"type": "custom"}]],
)
def test_requests_without_hosted_tools_enable_none(tools: Any) -> None:
    assert hosted_tools(Endpoint.RESPONSES, {"tools": tools}) == ()


@pytest.mark.parametrize("tools", ["web_search", {"type": "web_search"}, 1])
def test_tools_that_are_not_an_array_are_rejected(tools: Any) -> None:
    with pytest.raises(InvalidParam) as info:
        hosted_tools(Endpoint.RESPONSES, {"tools": tools})
    assert info.value.param == "tools"


def test_chat_web_search_options_enable_web_search() -> None:
    assert hosted_tools(Endpoint.CHAT, {"web_search_options": {}}) == ("web_search",)
    assert hosted_tools(Endpoint.CHAT, {"web_search_options": None}) == ()
    assert hosted_tools(Endpoint.CHAT, {"tools": [{"type": "web_search"}]}) == ()


def test_completions_and_embeddings_enable_no_hosted_tools() -> None:
    body = {"tools": [{"type": "web_search"}], "web_search_options": {}}
    assert hosted_tools(Endpoint.COMPLETIONS, body) == ()
    assert hosted_tools(Endpoint.EMBEDDINGS, body) == ()


def code_interpreter(container: Any) -> dict[str, Any]:
    return {"type": "code_interpreter", "container": container}


def test_an_auto_container_without_memory_limit_is_1g() -> None:
    body = {"tools": [code_interpreter({"type": "auto"})]}
    assert container_memory(Endpoint.RESPONSES, body) == "1g"


def test_the_largest_container_asked_for_is_the_one_priced() -> None:
    body = {
        "tools": [
            code_interpreter({"type": "auto", "memory_limit": "4g"}),
            code_interpreter({"type": "auto", "memory_limit": "64g"}),
            code_interpreter({"type": "auto", "memory_limit": "16g"}),
        ]
    }
    assert container_memory(Endpoint.RESPONSES, body) == "64g"


def test_an_unknown_memory_limit_sorts_as_the_largest() -> None:
    body = {
        "tools": [
            code_interpreter({"type": "auto", "memory_limit": "64g"}),
            code_interpreter({"type": "auto", "memory_limit": "huge"}),
        ]
    }
    assert container_memory(Endpoint.RESPONSES, body) == "huge"


def test_a_container_given_by_id_is_not_sized_here() -> None:
    body = {"tools": [code_interpreter("cntr_123")]}
    assert container_memory(Endpoint.RESPONSES, body) is None
    assert unreported_tool_calls(Endpoint.RESPONSES, body) == {}


def test_no_code_interpreter_no_container() -> None:
    assert container_memory(Endpoint.RESPONSES, {"tools": [{"type": "web_search"}]}) is None
    assert container_memory(Endpoint.CHAT, {"tools": [code_interpreter({})]}) is None


def test_chat_search_bills_a_web_search_its_response_does_not_list() -> None:
    assert unreported_tool_calls(Endpoint.CHAT, {"web_search_options": {}}) == {"web_search": 1}


def test_an_auto_container_bills_a_session_even_when_the_model_calls_no_tool() -> None:
    body = {"tools": [code_interpreter({"type": "auto"}), {"type": "web_search"}]}
    assert unreported_tool_calls(Endpoint.RESPONSES, body) == {"code_interpreter": 1}


def test_other_requests_bill_no_unlisted_tool_calls() -> None:
    assert unreported_tool_calls(Endpoint.RESPONSES, {"tools": [{"type": "file_search"}]}) == {}
    assert unreported_tool_calls(Endpoint.CHAT, {}) == {}
    assert unreported_tool_calls(Endpoint.COMPLETIONS, {"web_search_options": {}}) == {}


def test_max_tool_calls_reads_a_positive_integer() -> None:
    assert max_tool_calls({"max_tool_calls": 3}) == 3
    assert max_tool_calls({"max_tool_calls": None}) is None
    assert max_tool_calls({}) is None


@pytest.mark.parametrize("bad", [0, -1, 2.0, "3", True, [], MAX_PARAM + 1])
def test_invalid_max_tool_calls_is_rejected(bad: Any) -> None:
    with pytest.raises(InvalidParam) as info:
        max_tool_calls({"max_tool_calls": bad})
    assert info.value.param == "max_tool_calls"


@pytest.mark.parametrize(
    ("before", "after"), [(None, 4), (2, 2), (10, 4), (0, 4), ("x", 4), (True, 4)]
)
def test_injecting_max_tool_calls_sets_or_lowers_it(before: Any, after: int) -> None:
    body: dict[str, Any] = {} if before is None else {"max_tool_calls": before}
    inject_max_tool_calls(body, 4)
    assert body == {"max_tool_calls": after}


def test_injecting_max_tool_calls_below_one_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        inject_max_tool_calls({}, 0)


# --- server-side state ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"previous_response_id": "resp_1"}, ("previous_response_id",)),
        ({"conversation": "conv_1"}, ("conversation",)),
        ({"conversation": {"id": "conv_1"}}, ("conversation",)),
        ({"prompt": {"id": "pmpt_1", "version": "2"}}, ("prompt",)),
        (
            {"input": [{"role": "user", "content": "hi"}, {"type": "item_reference", "id": "m"}]},
            ("item_reference",),
        ),
        (
            {"previous_response_id": "r", "conversation": "c", "prompt": {"id": "p"}},
            ("previous_response_id", "conversation", "prompt"),
        ),
    ],
)
def test_fields_that_bring_server_side_state_are_named(
    body: dict[str, Any], fields: tuple[str, ...]
) -> None:
    assert unsized_state(Endpoint.RESPONSES, {"model": "m", **body}) == fields


@pytest.mark.parametrize(
    "body",
    [
        {"input": "hi"},
        {"input": [{"role": "user", "content": "hi"}, None, "x"]},
        {"previous_response_id": None, "conversation": None, "prompt": None},
        {"prompt": {"variables": {}}},
        {"prompt": "a string"},
        {"input": {"type": "item_reference"}},
    ],
)
def test_requests_without_server_side_state_name_none(body: dict[str, Any]) -> None:
    assert unsized_state(Endpoint.RESPONSES, body) == ()


def test_only_responses_bring_server_side_state() -> None:
    body = {"previous_response_id": "r", "conversation": "c", "prompt": {"id": "p"}}
    for endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS):
        assert unsized_state(endpoint, body) == ()


@pytest.mark.parametrize(
    ("value", "background"),
    [(True, True), ("true", True), (1, True), (False, False), (None, False)],
)
def test_a_responses_request_set_to_background_is_background(value: Any, background: bool) -> None:
    assert is_background(Endpoint.RESPONSES, {"background": value}) is background
    assert is_background(Endpoint.CHAT, {"background": value}) is False


def test_a_request_without_background_is_not_background() -> None:
    assert is_background(Endpoint.RESPONSES, {}) is False


def test_module_docstring_examples_run() -> None:
    assert doctest.testmod(usage_module).failed == 0


# --- fuzz the request readers -----------------------------------------------------------

_REQUEST_KEYS = [
    "prompt",
    "n",
    "best_of",
    "tools",
    "type",
    "container",
    "memory_limit",
    "web_search_options",
    "max_tool_calls",
    "previous_response_id",
    "conversation",
    "input",
    "id",
    "background",
    "service_tier",
    "output",
    "item",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
]
_REQUEST_LEAVES: list[Any] = [
    None,
    True,
    0,
    2,
    -1,
    2**40,
    1.5,
    "x",
    "auto",
    "64g",
    "code_interpreter",
    "web_search",
    "item_reference",
    "web_search_call",
    "response.output_item.done",
]


def _request_junk(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice(_REQUEST_LEAVES)
    if roll < 0.55:
        return [_request_junk(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(_REQUEST_KEYS): _request_junk(rng, depth + 1) for _ in range(5)}


def test_random_request_junk_raises_only_invalid_param() -> None:
    rng = random.Random(20250807)
    readers = (output_limit, choice_count, hosted_tools, container_memory, unreported_tool_calls)
    for _ in range(3000):
        body = _request_junk(rng)
        if not isinstance(body, dict):
            continue
        for endpoint in Endpoint:
            tier = stream_service_tier(endpoint, body)
            assert tier is None or (isinstance(tier, str) and 0 < len(tier) <= 64)
            tool = stream_tool_calls(endpoint, body)
            assert tool is None or isinstance(tool, str)
            assert all(isinstance(f, str) for f in unsized_state(endpoint, body))
            assert isinstance(is_background(endpoint, body), bool)
            for reader in readers:
                with contextlib.suppress(InvalidParam):
                    reader(endpoint, body)
        with contextlib.suppress(InvalidParam):
            max_tool_calls(body)


# --- from raw bytes (orjson) ------------------------------------------------------------


def test_usage_read_from_the_raw_answer_is_the_usage_of_the_parsed_one() -> None:
    raw = json.dumps(CHAT_BODY).encode()
    assert read_usage(Endpoint.CHAT, raw) == extract_usage(Endpoint.CHAT, CHAT_BODY)
    assert read_usage(Endpoint.CHAT, raw.decode()) == extract_usage(Endpoint.CHAT, CHAT_BODY)


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[1, 2]", b'"usage"', b"{", b'{"usage": NaN}', b"\xff\xfe", b"1e999999"],
)
def test_an_answer_that_is_not_a_json_object_has_no_usage(raw: bytes) -> None:
    assert read_usage(Endpoint.CHAT, raw) is None
    assert read_object(raw) is None


def test_a_count_beyond_64_bits_reads_as_no_usage() -> None:
    raw = b'{"usage": {"prompt_tokens": 1' + b"0" * 30 + b', "completion_tokens": 1}}'
    assert read_usage(Endpoint.CHAT, raw) is None

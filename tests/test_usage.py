from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Any

import pytest

from proxy.endpoints import Endpoint
from proxy.usage import (
    MAX_PARAM,
    InvalidParam,
    Usage,
    choice_count,
    extract_stream_usage,
    extract_usage,
    is_usage_only_chunk,
    output_limit,
    stream_text,
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


def u(prompt: int, cached: int, completion: int, reasoning: int) -> Usage:
    return Usage(
        prompt_tokens=prompt,
        cached_tokens=cached,
        completion_tokens=completion,
        reasoning_tokens=reasoning,
    )


def with_usage(body: Mapping[str, Any], usage: Any) -> dict[str, Any]:
    return {**body, "usage": usage}


# --- extract_usage ------------------------------------------------------------------


def test_chat_usage_with_details() -> None:
    assert extract_usage(Endpoint.CHAT, CHAT_BODY) == u(2006, 1920, 300, 192)


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


def test_cached_above_prompt_is_clamped() -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 50},
        "completion_tokens_details": {"reasoning_tokens": 9},
    }
    assert extract_usage(Endpoint.CHAT, {"usage": usage}) == u(10, 10, 4, 4)


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
    assert extract_usage(Endpoint.CHAT, body) == u(2006, 1920, 300, 192)


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
                    assert 0 <= found.reasoning_tokens <= found.completion_tokens
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
        (Endpoint.CHAT, {"max_output_tokens": 50}, None),
        (Endpoint.COMPLETIONS, {"max_tokens": 16}, 16),
        (Endpoint.COMPLETIONS, {"max_tokens": 0}, 0),
        (Endpoint.COMPLETIONS, {"max_completion_tokens": 10}, None),
        (Endpoint.RESPONSES, {"max_output_tokens": 1024}, 1024),
        (Endpoint.RESPONSES, {"max_tokens": 1024}, None),
        (Endpoint.RESPONSES, {}, None),
        (Endpoint.EMBEDDINGS, {}, 0),
        (Endpoint.EMBEDDINGS, {"max_tokens": 99}, 0),
        (Endpoint.CHAT, {"max_tokens": MAX_PARAM}, MAX_PARAM),
    ],
)
def test_output_limit(endpoint: Endpoint, body: dict[str, Any], limit: int | None) -> None:
    assert output_limit(endpoint, body) == limit


@pytest.mark.parametrize("bad", [-1, 1.0, 10.5, "100", True, False, [], {}, MAX_PARAM + 1])
@pytest.mark.parametrize(
    ("endpoint", "param"),
    [
        (Endpoint.CHAT, "max_tokens"),
        (Endpoint.CHAT, "max_completion_tokens"),
        (Endpoint.COMPLETIONS, "max_tokens"),
        (Endpoint.RESPONSES, "max_output_tokens"),
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

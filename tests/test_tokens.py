from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import socket
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

# The reference implementation the shipped encodings are compared against.
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy import tokens
from proxy.endpoints import Endpoint
from proxy.tokens import (
    CHUNK_CHARS,
    ENCODINGS,
    MAX_REMEMBERED_MODELS,
    EncodingFileError,
    PromptEstimate,
    Tokenizer,
    _cut,
    load_encoding,
    read_ranks,
)
from tests.test_images import data_url, jpeg, png

URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"

TEXTS = [
    "",
    "hello world",
    "Hello, World!  How's it going?\n\n\tTabs\r\nand CRLF   ",
    "naïve café façade Ærøskøbing Straße ΑΒΓ αβγ Ünïcödé",
    "日本語のテキストと中文文本\uff0c还有한국어 텍스트。",
    "مرحبا بالعالم — שלום עולם — नमस्ते दुनिया",
    "emoji 🎉🚀 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 skin 👍🏽",
    'def f(x: int) -> int:\n    return {"a": [1, 2, 3]}[x]  # comment\n\nprint(f(0))\n',
    "<|endoftext|> and <|endofprompt|> and <|fim_prefix|><|fim_middle|><|fim_suffix|>",
    "1234567890 3.14159 -42 1e10 0xDEADBEEF",
    "I'm, you're, they've, we'll, she'd, IT'S, DON'T",
    "   leading and trailing spaces   ",
    "lone surrogate \ud800 here",
    "a" * 5000,
    "https://example.com/path?q=1&r=%20#frag //comment /* block */",
]

# OpenAI cookbook "How to count tokens with tiktoken" (openai/openai-cookbook,
# examples/How_to_count_tokens_with_tiktoken.ipynb): prompt_tokens reported by the API.
COOKBOOK_MESSAGES: list[dict[str, str]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on "
        "opportunities for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]
COOKBOOK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, tiktoken.Encoding]]:
    """tiktoken's own registry, fed offline: its cache dir holds the shipped files."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name in ENCODINGS:
        gz = resources.files("proxy").joinpath(f"encodings/{name}.tiktoken.gz").read_bytes()
        key = hashlib.sha1(URL.format(name).encode()).hexdigest()
        (cache / key).write_bytes(gzip.decompress(gz))

    def no_download(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        mp.setattr(tiktoken.load, "read_file", no_download)
        yield {name: tiktoken.get_encoding(name) for name in ENCODINGS}


def n(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode(text, disallowed_special=()))


def chat(model: str, messages: list[Any], **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": messages, **extra}


# --- loading -----------------------------------------------------------------------------------


def test_shipped_files_match_pinned_sha256() -> None:
    for name, spec in ENCODINGS.items():
        gz = resources.files("proxy").joinpath(f"encodings/{name}.tiktoken.gz").read_bytes()
        assert hashlib.sha256(gzip.decompress(gz)).hexdigest() == spec.sha256


def test_corrupt_copy_is_rejected() -> None:
    gz = resources.files("proxy").joinpath("encodings/cl100k_base.tiktoken.gz").read_bytes()
    data = bytearray(gzip.decompress(gz))
    data[100] ^= 0x01
    with pytest.raises(EncodingFileError, match="sha256"):
        read_ranks("cl100k_base", gzip.compress(bytes(data)))
    with pytest.raises(EncodingFileError, match="decompress"):
        read_ranks("cl100k_base", gz[: len(gz) // 2])
    with pytest.raises(EncodingFileError, match="decompress"):
        read_ranks("cl100k_base", b"not gzip at all")
    with pytest.raises(EncodingFileError, match="sha256"):
        read_ranks("o200k_base", gz)  # a valid file, but not the one pinned for this name


def test_loading_never_touches_network_or_tiktoken_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network or tiktoken cache used")

    monkeypatch.setattr(tokens, "_loaded", {})
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    monkeypatch.setattr(tiktoken.load, "read_file_cached", refuse)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "/nonexistent")
    assert Tokenizer().count("gpt-4o", "hello world") == 2


def test_encodings_are_loaded_once_per_process(tokenizer: Tokenizer) -> None:
    assert load_encoding("o200k_base") is load_encoding("o200k_base")
    assert Tokenizer()._counter("cl100k_base")._enc is load_encoding("cl100k_base")


def test_a_tokenizer_loads_an_encoding_on_its_first_use_only() -> None:
    fresh = Tokenizer()
    assert fresh._counters == {}  # nothing held before a request needs it
    assert fresh.count("gpt-4", "hello world") == 2
    assert list(fresh._counters) == ["cl100k_base"]


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_encoding_is_identical_to_tiktoken_registry(
    name: str, reference: dict[str, tiktoken.Encoding]
) -> None:
    ours, ref = load_encoding(name), reference[name]
    assert ours is not ref
    assert ours._pat_str == ref._pat_str
    assert ours._special_tokens == ref._special_tokens
    # The ranks live in the Rust core (the Python copy is dropped): every token of the
    # reference decodes from its rank to the same bytes.
    assert ours._mergeable_ranks == {}
    assert ours.max_token_value == ref.max_token_value
    assert all(ours.decode_single_token_bytes(r) == t for t, r in ref._mergeable_ranks.items())
    assert ours.n_vocab == ref.n_vocab
    for text in TEXTS:
        assert ours.encode_ordinary(text) == ref.encode_ordinary(text)


# --- model -> encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        *[
            (m, "o200k_base")
            for m in (
                "gpt-4o",
                "gpt-4o-mini",
                "gpt-4o-2024-08-06",
                "chatgpt-4o-latest",
                "gpt-4.1",
                "gpt-4.1-nano",
                "gpt-4.5-preview",
                "gpt-5",
                "gpt-5-mini",
                "o1",
                "o1-mini",
                "o3-mini",
                "o4-mini",
                "openai/gpt-4o",
                "ft:gpt-4o-mini:acme::abc123",
                "GPT-4O",
                "some-unknown-model",
                "",
            )
        ],
        *[
            (m, "cl100k_base")
            for m in (
                "gpt-4",
                "gpt-4-0613",
                "gpt-4-32k",
                "gpt-4-turbo",
                "gpt-4-turbo-2024-04-09",
                "gpt-4-1106-preview",
                "gpt-3.5-turbo",
                "gpt-3.5-turbo-0125",
                "gpt-35-turbo",
                "text-embedding-3-small",
                "text-embedding-3-large",
                "text-embedding-ada-002",
                "openai/gpt-4",
                "azure/gpt-35-turbo",
                "openrouter/openai/gpt-3.5-turbo",
                "ft:gpt-3.5-turbo-0125:acme::xyz",
                "GPT-4-Turbo",
            )
        ],
    ],
)
def test_encoding_name(tokenizer: Tokenizer, model: str, expected: str) -> None:
    assert tokenizer.encoding_name(model) == expected


def test_overrides_come_first() -> None:
    t = Tokenizer(overrides={"my-model-*": "cl100k_base", "gpt-4-turbo": "o200k_base"})
    assert t.encoding_name("my-model-7b") == "cl100k_base"
    assert t.encoding_name("gpt-4-turbo") == "o200k_base"
    assert t.encoding_name("gpt-4") == "cl100k_base"
    assert t.count("my-model-x", "hello world") == 2


def test_the_encoding_of_a_model_is_remembered_within_a_bound() -> None:
    t = Tokenizer()
    for i in range(MAX_REMEMBERED_MODELS + 10):
        model = f"gpt-4-{i}" if i % 2 else f"gpt-4o-{i}"
        assert t.encoding_name(model) == ("cl100k_base" if i % 2 else "o200k_base")
        assert t.encoding_name(model) == ("cl100k_base" if i % 2 else "o200k_base")
    assert len(t._names) <= MAX_REMEMBERED_MODELS


def test_unknown_override_encoding_is_rejected() -> None:
    with pytest.raises(ValueError, match="p50k_base"):
        Tokenizer(overrides={"x": "p50k_base"})


# --- count -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_count_matches_tiktoken(
    tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding], model: str
) -> None:
    ref = reference[tokenizer.encoding_name(model)]
    for text in TEXTS:
        assert tokenizer.count(model, text) == n(ref, text), text[:40]


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_count_of_long_text_is_exact(
    tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding], model: str
) -> None:
    ref = reference[tokenizer.encoding_name(model)]
    rng = random.Random(7)
    words = [t for t in " ".join(TEXTS).split(" ") if t] + ["  ", "\n", "\t", "!!", "x" * 300]
    for size in (20_000, 150_000):
        text = " ".join(rng.choice(words) for _ in range(size // 20))
        assert len(text) > size
        assert tokenizer.count(model, text) == len(ref.encode_ordinary(text))


@pytest.mark.parametrize("model", ["gpt-4o", "gpt-4"])
def test_chunk_cuts_never_split_a_token(
    tokenizer: Tokenizer,
    reference: dict[str, tiktoken.Encoding],
    monkeypatch: pytest.MonkeyPatch,
    model: str,
) -> None:
    # Tiny chunks, adversarial text with a safe cut ("z ") at least every 14 characters.
    monkeypatch.setattr(tokens, "CHUNK_CHARS", 64)
    ref = reference[tokenizer.encoding_name(model)]
    alphabet = [
        *"  \n\r\t'sdlmtvreABCxyz019!?.,/-_\u00e9\u0301\u4e2d\u00a0\U0001f389",
        "'LL",
        "\r\n",
    ]
    rng = random.Random(5)
    for _ in range(500):
        segments = (
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(12))) + "z "
            for _ in range(rng.randrange(5, 60))
        )
        text = "".join(segments)
        assert tokenizer.count(model, text) == len(ref.encode_ordinary(text)), repr(text)


def test_count_of_pathological_text_is_close(
    tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding]
) -> None:
    ref = reference["o200k_base"]
    for text in (" " * 100_000, "x" * 100_000, "\u4e2d" * 50_000, "ab/" * 40_000):
        assert abs(tokenizer.count("gpt-4o", text) - len(ref.encode_ordinary(text))) <= 2 * (
            len(text) // (tokens.CHUNK_CHARS // 2)
        )


def test_count_never_panics(tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    # A million spaces overflow the o200k regex inside tiktoken's Rust core (a panic, which is
    # a BaseException). Chunking avoids it; without chunking the byte length is the fallback.
    spaces = " " * 1_100_000
    assert 0 < tokenizer.count("gpt-4o", spaces) < 20_000
    monkeypatch.setattr(tokens, "CHUNK_CHARS", 10_000_000)
    assert tokenizer.count("gpt-4o", spaces) == len(spaces)


# --- estimate: chat ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "prompt_tokens"),
    [("gpt-4o", 124), ("gpt-4o-mini", 124), ("gpt-4-0613", 129), ("gpt-3.5-turbo", 129)],
)
def test_cookbook_messages(tokenizer: Tokenizer, model: str, prompt_tokens: int) -> None:
    assert tokenizer.estimate(Endpoint.CHAT, chat(model, COOKBOOK_MESSAGES)) == prompt_tokens


@pytest.mark.parametrize(
    ("model", "prompt_tokens"),
    [("gpt-4o", 101), ("gpt-4o-mini", 101), ("gpt-4", 105), ("gpt-3.5-turbo", 105)],
)
def test_cookbook_tools(tokenizer: Tokenizer, model: str, prompt_tokens: int) -> None:
    body = chat(model, COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS)
    assert tokenizer.estimate(Endpoint.CHAT, body) == prompt_tokens
    legacy = chat(model, COOKBOOK_TOOL_MESSAGES, functions=[COOKBOOK_TOOLS[0]["function"]])
    assert tokenizer.estimate(Endpoint.CHAT, legacy) == prompt_tokens


def test_chat_plain_and_named(
    tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding]
) -> None:
    o = reference["o200k_base"]
    body = chat("gpt-4o", [{"role": "user", "content": "Hi there"}])
    assert tokenizer.estimate(Endpoint.CHAT, body) == 3 + n(o, "user") + n(o, "Hi there") + 3
    body = chat("gpt-4o", [{"role": "user", "name": "bob", "content": "Hi"}])
    assert tokenizer.estimate(Endpoint.CHAT, body) == 3 + n(o, "user") + n(o, "bob") + 1 + 1 + 3


def test_chat_multipart(tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding]) -> None:
    o = reference["o200k_base"]
    parts = [
        {"type": "text", "text": "Describe these."},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/b.png", "detail": "high"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==" * 1000, "format": "wav"}},
        {"type": "file", "file": {"file_data": "JVBERi0=" * 1000, "filename": "a.pdf"}},
        {"type": "refusal", "refusal": "I can't."},
    ]
    expected = 3 + n(o, "user") + n(o, "Describe these.") + n(o, "I can't.") + 3
    # Was 85 + 4 x 1445 (every non-low image, audio and file part a flat 1445). Now images
    # are priced for the model (gpt-4o: low 85, an unfetched URL its most, 85 + 8 x 170 =
    # 1445), and audio and file parts count 0, listed as unsized for the handler's policy.
    expected += 85 + 2 * 1445
    body = chat("gpt-4o", [{"role": "user", "content": parts}])
    assert tokenizer.estimate(Endpoint.CHAT, body) == expected
    assert tokenizer.estimate_prompt(Endpoint.CHAT, body) == PromptEstimate(
        expected, ("input_audio part", "file part")
    )


def test_chat_tool_calls(tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding]) -> None:
    c = reference["cl100k_base"]
    args = '{"location": "Paris, France"}'
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_w", "arguments": args},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "22C"},
    ]
    expected = 3 + n(c, "user") + n(c, "Weather?")
    expected += 3 + n(c, "assistant") + 3 + n(c, "get_w") + n(c, args)
    expected += 3 + n(c, "tool") + n(c, "call_1") + n(c, "22C") + 3
    assert tokenizer.estimate(Endpoint.CHAT, chat("gpt-4", messages)) == expected


def test_chat_schema_extras_count_as_json(
    tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding]
) -> None:
    o = reference["o200k_base"]
    base = tokenizer.estimate(Endpoint.CHAT, chat("gpt-4o", COOKBOOK_TOOL_MESSAGES))
    items = {"items": {"type": "object", "properties": {"x": {"type": "number"}}}}
    tool = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"xs": {"type": "array", **items}}},
        },
    }
    expected = 7 + n(o, "f:") + 3 + 3 + n(o, "xs:array:") + n(o, json.dumps(items)) + 12
    body = chat("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=[tool])
    assert tokenizer.estimate(Endpoint.CHAT, body) == base + expected
    web = {"type": "web_search_preview"}
    body = chat("gpt-4o", COOKBOOK_TOOL_MESSAGES, tools=[web])
    assert tokenizer.estimate(Endpoint.CHAT, body) == base + n(o, json.dumps(web)) + 12
    schema = {"name": "out", "schema": {"type": "object"}}
    body = chat(
        "gpt-4o",
        COOKBOOK_TOOL_MESSAGES,
        response_format={"type": "json_schema", "json_schema": schema},
    )
    assert tokenizer.estimate(Endpoint.CHAT, body) == base + n(o, json.dumps(schema))


def test_chat_large_prompt_is_exact(
    tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding]
) -> None:
    o = reference["o200k_base"]
    text = " ".join(TEXTS) * 400  # about 200k words and symbols
    body = chat("gpt-4o", [{"role": "user", "content": text}])
    assert tokenizer.estimate(Endpoint.CHAT, body) == 3 + n(o, "user") + n(o, text) + 3


# --- estimate: completions, embeddings, responses ---------------------------------------------


@pytest.mark.parametrize("endpoint", [Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS])
def test_prompt_forms(
    tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding], endpoint: Endpoint
) -> None:
    c = reference["cl100k_base"]
    key = "prompt" if endpoint == Endpoint.COMPLETIONS else "input"
    model = "gpt-3.5-turbo-instruct" if key == "prompt" else "text-embedding-3-small"
    cases: list[tuple[Any, int]] = [
        ("Say this is a test", n(c, "Say this is a test")),
        (["one two", "three"], n(c, "one two") + n(c, "three")),
        ([1, 2, 3, 4], 4),
        ([[1, 2, 3], [4, 5]], 5),
        ("<|endoftext|>", n(c, "<|endoftext|>")),
    ]
    for value, expected in cases:
        assert tokenizer.estimate(endpoint, {"model": model, key: value}) == expected
    assert tokenizer.estimate(endpoint, {"model": model}) == 1


def test_completions_suffix(tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding]) -> None:
    c = reference["cl100k_base"]
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "def f(", "suffix": "    return x"}
    expected = n(c, "def f(") + n(c, "    return x")
    assert tokenizer.estimate(Endpoint.COMPLETIONS, body) == expected


def test_responses_inputs(tokenizer: Tokenizer, reference: dict[str, tiktoken.Encoding]) -> None:
    o = reference["o200k_base"]
    body: dict[str, Any] = {"model": "gpt-4.1", "input": "Tell me a joke"}
    plain = 3 + n(o, "user") + n(o, "Tell me a joke") + 3
    assert tokenizer.estimate(Endpoint.RESPONSES, body) == plain
    body["instructions"] = "Be brief."
    with_instructions = plain + 3 + n(o, "developer") + n(o, "Be brief.")
    assert tokenizer.estimate(Endpoint.RESPONSES, body) == with_instructions

    args = '{"city":"Paris"}'
    items = [
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "What is in this image?"},
                {"type": "input_image", "image_url": "https://e.com/x.png", "detail": "low"},
                {"type": "input_image", "file_id": "file-abc"},
                {"type": "input_file", "file_id": "file-pdf"},
            ],
        },
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "A cat.", "annotations": []}],
        },
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Hm."}]},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": args},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "item_reference", "id": "msg_0"},
    ]
    expected = 3 + n(o, "user") + n(o, "What is in this image?") + 85
    # Was 2 x 1445 (the file_id image and the input_file a flat 1445 each). Now the file_id
    # image costs the most a gpt-4.1 image can (85 + 8 x 170) and the input_file is unsized.
    expected += 1445
    expected += 3 + n(o, "assistant") + n(o, "A cat.")
    expected += 3 + n(o, "Hm.")
    expected += 3 + n(o, "weather") + n(o, args)
    expected += 3 + n(o, "sunny")
    expected += 3 + 3
    assert tokenizer.estimate(Endpoint.RESPONSES, {"model": "gpt-4.1", "input": items}) == expected
    estimate = tokenizer.estimate_prompt(Endpoint.RESPONSES, {"model": "gpt-4.1", "input": items})
    assert estimate == PromptEstimate(expected, ("input_file part",))


def test_responses_tools_match_chat_tools(tokenizer: Tokenizer) -> None:
    fn = COOKBOOK_TOOLS[0]["function"]
    flat = [{"type": "function", **fn, "strict": True}]
    empty = tokenizer.estimate(Endpoint.RESPONSES, {"model": "gpt-4o", "input": []})
    with_tools = tokenizer.estimate(Endpoint.RESPONSES, {"model": "gpt-4o", "tools": flat})
    chat_base = tokenizer.estimate(Endpoint.CHAT, chat("gpt-4o", []))
    chat_tools = tokenizer.estimate(Endpoint.CHAT, chat("gpt-4o", [], tools=COOKBOOK_TOOLS))
    assert with_tools - empty == chat_tools - chat_base > 0


# --- estimate_prompt: images, files, audio -----------------------------------------------------


def user(*parts: Any) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


def image_url(url: str, detail: str | None = None) -> dict[str, Any]:
    ref = {"url": url} if detail is None else {"url": url, "detail": detail}
    return {"type": "image_url", "image_url": ref}


def input_image(detail: str | None = None, **ref: str) -> dict[str, Any]:
    part = {"type": "input_image", **ref}
    return part if detail is None else {**part, "detail": detail}


def image_cost(tokenizer: Tokenizer, endpoint: Endpoint, model: str, part: Any) -> PromptEstimate:
    """What one image part adds to a prompt: the estimate with it, less the one without."""
    if endpoint == Endpoint.CHAT:
        with_it, without = chat(model, user(part)), chat(model, user())
    else:
        with_it = {"model": model, "input": [{"role": "user", "content": [part]}]}
        without = {"model": model, "input": [{"role": "user", "content": []}]}
    estimate = tokenizer.estimate_prompt(endpoint, with_it)
    tokens = estimate.tokens - tokenizer.estimate_prompt(endpoint, without).tokens
    return PromptEstimate(tokens, estimate.unsized)


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_text_only_bodies_are_fully_sized(tokenizer: Tokenizer, endpoint: Endpoint) -> None:
    bodies: list[dict[str, Any]] = [
        chat("gpt-4o", COOKBOOK_MESSAGES),
        chat("gpt-4o-mini", COOKBOOK_TOOL_MESSAGES, tools=COOKBOOK_TOOLS),
        {"model": "gpt-4.1", "input": "Tell me a joke", "instructions": "Be brief."},
        {"model": "text-embedding-3-small", "input": ["one", "two"]},
        {"model": "gpt-3.5-turbo-instruct", "prompt": "Say this", "suffix": "x"},
    ]
    for body in bodies:
        estimate = tokenizer.estimate_prompt(endpoint, body)
        assert estimate.unsized == ()
        assert estimate.tokens == tokenizer.estimate(endpoint, body)


@pytest.mark.parametrize(
    ("model", "size", "detail", "tokens"),
    [
        ("gpt-4o", (1024, 1024), "high", 765),  # the guide's example
        ("gpt-4o", (1024, 1024), "auto", 765),
        ("gpt-4o", (1024, 1024), None, 765),
        ("gpt-4o", (2048, 4096), "high", 1105),  # the guide's example
        ("gpt-4o", (4096, 8192), "low", 85),  # the guide's example
        ("gpt-4o-2024-08-06", (512, 512), "high", 255),
        ("gpt-4o-mini", (1024, 1024), "high", 2833 + 4 * 5667),
        ("openai/gpt-4o-mini", (1024, 1024), "low", 2833),
        ("gpt-5", (1024, 1024), "high", 70 + 4 * 140),
        ("o3", (1024, 1024), "high", 75 + 4 * 150),
        ("gpt-4.1-mini", (1024, 1024), "high", 1660),  # 1024 patches x 1.62, + 1
        ("gpt-4.1-mini", (1800, 2400), "low", 2354),  # 1452 patches x 1.62, + 1
        ("o4-mini", (1024, 1024), None, 1763),  # 1024 patches x 1.72, + 1
    ],
)
@pytest.mark.parametrize("endpoint", [Endpoint.CHAT, Endpoint.RESPONSES])
def test_inline_images_are_sized_from_their_header(
    tokenizer: Tokenizer,
    endpoint: Endpoint,
    model: str,
    size: tuple[int, int],
    detail: str | None,
    tokens: int,
) -> None:
    url = data_url(png(*size))
    part = (
        image_url(url, detail) if endpoint == Endpoint.CHAT else input_image(detail, image_url=url)
    )
    assert image_cost(tokenizer, endpoint, model, part) == PromptEstimate(tokens, ())


def test_a_jpeg_with_large_metadata_is_still_sized(tokenizer: Tokenizer) -> None:
    url = data_url(jpeg(1024, 1024, metadata=30_000), "image/jpeg")
    assert image_cost(tokenizer, Endpoint.CHAT, "gpt-4o", image_url(url)).tokens == 765


@pytest.mark.parametrize(
    ("model", "low", "high"),
    [
        ("gpt-4o", 85, 85 + 8 * 170),
        ("gpt-4.1", 85, 85 + 8 * 170),
        ("gpt-4o-mini", 2833, 2833 + 8 * 5667),
        ("gpt-5-chat-latest", 70, 70 + 8 * 140),
        ("o1", 75, 75 + 8 * 150),
        ("computer-use-preview", 65, 65 + 8 * 129),
        ("gpt-4.1-mini", 2490, 2490),  # 1536 patches x 1.62, + 1: no low-detail figure
        ("gpt-4.1-nano", 3780, 3780),
        ("o4-mini", 2643, 2643),
    ],
)
def test_unfetched_images_cost_the_most_for_their_detail(
    tokenizer: Tokenizer, model: str, low: int, high: int
) -> None:
    https = "https://example.com/cat.png"
    not_an_image = data_url(b"%PDF-1.7 not an image")
    cases = [
        (Endpoint.CHAT, image_url(https, "low"), low),
        (Endpoint.CHAT, image_url(https, "high"), high),
        (Endpoint.CHAT, image_url(https, "auto"), high),
        (Endpoint.CHAT, image_url(https), high),
        (Endpoint.CHAT, {"type": "image_url", "image_url": https}, high),  # a bare URL
        (Endpoint.CHAT, image_url(not_an_image, "high"), high),
        (Endpoint.CHAT, {"type": "image_url", "image_url": {"detail": "low"}}, low),
        (Endpoint.RESPONSES, input_image("low", image_url=https), low),
        (Endpoint.RESPONSES, input_image(image_url=https), high),
        (Endpoint.RESPONSES, input_image("low", file_id="file-abc"), low),
        (Endpoint.RESPONSES, input_image("auto", file_id="file-abc"), high),
        (Endpoint.RESPONSES, input_image(file_id="file-abc"), high),
    ]
    for endpoint, part, cost in cases:
        assert image_cost(tokenizer, endpoint, model, part) == PromptEstimate(cost, ()), part


def test_images_for_an_undocumented_model_are_unsized(tokenizer: Tokenizer) -> None:
    url = data_url(png(64, 64))
    body = chat("test-chat", user(image_url(url), image_url("https://e.com/x.png", "low")))
    estimate = tokenizer.estimate_prompt(Endpoint.CHAT, body)
    assert estimate.unsized == ("image_url part for model 'test-chat'",)
    assert (
        estimate.tokens
        == tokenizer.estimate_prompt(Endpoint.CHAT, chat("test-chat", user())).tokens
    )
    body = {"model": "gpt-5.2", "input": [{"role": "user", "content": [input_image(file_id="f")]}]}
    estimate = tokenizer.estimate_prompt(Endpoint.RESPONSES, body)
    assert estimate.unsized == ("input_image part for model 'gpt-5.2'",)


def test_files_and_audio_are_unsized(tokenizer: Tokenizer) -> None:
    pdf = "data:application/pdf;base64," + "JVBERi0=" * 1000
    chat_parts = [
        {"type": "file", "file": {"file_id": "file-abc"}},
        {"type": "file", "file": {"file_data": pdf, "filename": "secret-plans.pdf"}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==" * 1000, "format": "wav"}},
    ]
    body = chat("gpt-4o", user({"type": "text", "text": "hi"}, *chat_parts))
    estimate = tokenizer.estimate_prompt(Endpoint.CHAT, body)
    assert estimate.tokens == tokenizer.estimate(
        Endpoint.CHAT, chat("gpt-4o", user({"type": "text", "text": "hi"}))
    )
    assert estimate.unsized == ("file part", "input_audio part")  # each kind once, in order

    responses_parts = [
        {"type": "input_file", "file_id": "file-abc"},
        {"type": "input_file", "file_url": "https://example.com/secret-plans.pdf"},
        {"type": "input_file", "filename": "secret-plans.pdf", "file_data": pdf},
    ]
    body = {"model": "gpt-4.1", "input": [{"role": "user", "content": responses_parts}]}
    estimate = tokenizer.estimate_prompt(Endpoint.RESPONSES, body)
    assert estimate.unsized == ("input_file part",)
    for reason in estimate.unsized:  # names kinds of input, never what the client sent
        assert "secret" not in reason and "http" not in reason and "JVBER" not in reason


def test_earlier_audio_and_generated_images_are_unsized(tokenizer: Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "audio": {"id": "audio_abc"}},
        {"role": "user", "content": "Again"},
    ]
    estimate = tokenizer.estimate_prompt(Endpoint.CHAT, chat("gpt-4o-audio-preview", messages))
    assert estimate.unsized == ("assistant audio",)
    item = {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": "iVBO"}
    body = {"model": "gpt-4.1", "input": [item]}
    assert tokenizer.estimate_prompt(Endpoint.RESPONSES, body).unsized == (
        "image_generation_call item",
    )


def test_a_computer_screenshot_is_an_image(tokenizer: Tokenizer) -> None:
    screenshot = {"type": "computer_screenshot", "image_url": data_url(png(1024, 768))}
    output = {"type": "computer_call_output", "call_id": "c1", "output": screenshot}
    body = {"model": "computer-use-preview", "input": [output]}
    estimate = tokenizer.estimate_prompt(Endpoint.RESPONSES, body)
    # 1024 x 768: short side already 768, 2 x 2 tiles.
    assert estimate == PromptEstimate(3 + 65 + 4 * 129 + 3, ())
    by_file = {**output, "output": {"type": "computer_screenshot", "file_id": "file-1"}}
    estimate = tokenizer.estimate_prompt(Endpoint.RESPONSES, {**body, "input": [by_file]})
    assert estimate == PromptEstimate(3 + 65 + 8 * 129 + 3, ())


def test_many_large_inline_images_are_sized(tokenizer: Tokenizer) -> None:
    # Only each image's header is decoded (a KiB of it), not its 4 MB.
    url = data_url(png(2000, 1000) + bytes(4 << 20))
    body = chat("gpt-4o", user(*[image_url(url)] * 500))
    estimate = tokenizer.estimate_prompt(Endpoint.CHAT, body)
    # 2000 x 1000 -> 1536 x 768: 3 x 2 tiles.
    assert estimate == PromptEstimate(3 + 1 + 500 * (85 + 6 * 170) + 3, ())


# --- untrusted bodies --------------------------------------------------------------------------

JUNK: list[Any] = [
    None,
    True,
    -1,
    1.5,
    "text",
    [],
    {},
    [None, 1, "x", [1, "a", None], {"a": 1}],
    {"type": 5, "text": 7, "function": [], "image_url": "x", "content": {"a": []}},
    [{"type": "image_url", "image_url": None}, {"type": "function", "function": "x"}],
    [{"function": {"name": 1, "description": [], "parameters": {"properties": [1]}}}],
    [{"name": "f", "parameters": {"properties": {"a": 1, "b": {"enum": [1, None, {}]}}}}],
    [{"role": ["x"], "content": [{"type": "text", "text": None}], "tool_calls": {"a": 1}}],
    [{"tool_calls": [1, None, {"function": 2}, {"function": {"name": [], "arguments": {}}}]}],
    [{"function_call": "x", "name": None, "output": [1, {}], "summary": 3}],
    [{"type": "input_image", "image_url": {"url": 5, "detail": []}, "detail": {}}],
    [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!", "detail": 1}}],
    [{"type": ["image_url"], "content": {"type": "computer_screenshot", "image_url": None}}],
    [{"type": "input_file"}, {"type": "file", "file": None}, {"role": "x", "audio": {}}],
    float("nan"),
]
KEYS = ["model", "messages", "tools", "functions", "response_format", "prompt", "suffix"]
KEYS += ["input", "instructions"]


@pytest.mark.parametrize("endpoint", list(Endpoint))
def test_bad_bodies_never_raise(tokenizer: Tokenizer, endpoint: Endpoint) -> None:
    for junk in JUNK:
        for key in KEYS:
            assert tokenizer.estimate(endpoint, {key: junk}) >= 1
            assert tokenizer.estimate(endpoint, {key: [junk], "messages": [junk]}) >= 1
    not_objects: list[Any] = [None, [], "x", 5]
    for body in not_objects:
        assert tokenizer.estimate(endpoint, body) == 1


TINY_PNG = data_url(png(3, 2))


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -7, 2.5, 10**30])
    if kind in (2, 3):
        return rng.choice(
            [
                *("text", "image_url", "input_image", "function", "low", "", "🎉", "input_file"),
                *("computer_screenshot", "data:image/png;base64,iVBORw0KGgo", "https://e.com/a"),
                *(TINY_PNG, "gpt-4o-mini", "o4-mini", "input_audio"),
            ]
        )
    if kind == 4:
        return rng.choice(["type", "text", "role", "content", "name", "detail", "url", "audio"])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["type", "text", "role", "content", "name", "function", "image_url", "detail", "url"]
    keys += ["tool_calls", "arguments", "parameters", "properties", "enum", "output", "summary"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_random_bodies_never_raise(tokenizer: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        body = {key: random_json(rng) for key in rng.sample(KEYS, rng.randrange(1, len(KEYS)))}
        for endpoint in Endpoint:
            estimate = tokenizer.estimate_prompt(endpoint, body)
            assert estimate.tokens >= 1
            assert all(isinstance(reason, str) for reason in estimate.unsized)


def test_deeply_nested_schema_never_raises(tokenizer: Tokenizer) -> None:
    nested: Any = "leaf"
    for _ in range(500):
        nested = {"type": "object", "properties": {"p": nested}}
    body = chat("gpt-4o", [], tools=[{"type": "function", "function": {"parameters": nested}}])
    assert tokenizer.estimate(Endpoint.CHAT, body) > 500


def test_encoding_files_exist_in_package() -> None:
    folder = Path(str(resources.files("proxy"))) / "encodings"
    assert sorted(p.name for p in folder.glob("*.gz")) == sorted(
        f"{name}.tiktoken.gz" for name in ENCODINGS
    )


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(["a", "b", " ", "\n", "\t", "é", "\u3000"]), min_size=0),
    st.integers(min_value=0, max_value=3),
)
def test_chunks_are_cut_where_a_space_follows_a_non_space(filler: str, scale: int) -> None:
    text = (filler or "x") * (1 + (CHUNK_CHARS * (scale + 1)) // max(1, len(filler or "x")))
    start = len(text) // 7
    if len(text) - start <= CHUNK_CHARS:
        return
    end = start + CHUNK_CHARS
    matches = list(re.finditer(r"(?<=\S) ", text[:end]))
    expected = next(
        (m.start() for m in reversed(matches) if m.start() >= end - CHUNK_CHARS // 2), end
    )
    assert _cut(text, start) == expected


# --- the bound ---------------------------------------------------------------------------------

# Texts where tokens and bytes part ways: words, digits, punctuation runs, whitespace,
# accents, CJK, emoji, and the special tokens' spelling (counted as text).
_PIECES = st.sampled_from(
    [
        *(" ", "  ", "\n", "\t", "\r\n", "\u3000", "hello", "world", "a", "'s", "ll"),
        *("1234567", "!!!", "...", "é", "日本語", "🦜", "ﬁ", "<|endoftext|>"),
    ]
)
_TEXT = st.lists(_PIECES, max_size=40).map("".join) | st.text(max_size=60)
_PART = st.one_of(
    _TEXT,
    st.fixed_dictionaries({"type": st.just("text"), "text": _TEXT}),
    st.fixed_dictionaries({"type": st.just("input_audio"), "input_audio": st.just({})}),
)
_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]), "content": _TEXT | st.lists(_PART)},
    optional={"name": _TEXT},
)
_TOOL = st.fixed_dictionaries(
    {
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {"name": _TEXT, "description": _TEXT},
            optional={
                "parameters": st.fixed_dictionaries(
                    {"type": st.just("object"), "properties": st.dictionaries(_TEXT, _TEXT)}
                )
            },
        ),
    }
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["gpt-4o", "gpt-4"]),
    st.lists(_MESSAGE, max_size=4),
    st.lists(_TOOL, max_size=2),
)
def test_the_bound_is_never_below_the_count_and_sizes_the_same_input(
    model: str, messages: list[Any], tools: list[Any]
) -> None:
    tokenizer = Tokenizer()
    for endpoint, body in (
        (Endpoint.CHAT, chat(model, messages, tools=tools)),
        (Endpoint.RESPONSES, {"model": model, "input": messages, "tools": tools}),
        (Endpoint.COMPLETIONS, {"model": model, "prompt": [m["role"] for m in messages]}),
    ):
        exact, bound = (
            tokenizer.estimate_prompt(endpoint, body),
            tokenizer.bound_prompt(endpoint, body),
        )
        assert bound.tokens >= exact.tokens
        assert bound.unsized == exact.unsized


def test_the_bound_counts_bytes_and_loads_no_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(name: str) -> tiktoken.Encoding:
        raise AssertionError(f"encoding {name} loaded")

    monkeypatch.setattr(tokens, "load_encoding", refuse)
    tokenizer = Tokenizer()
    body = chat("gpt-4o", [{"role": "user", "content": "héllo 日本"}])
    # 3 per message + "user" (4) + "héllo 日本" (13 bytes) + 3 priming the reply.
    assert tokenizer.bound_prompt(Endpoint.CHAT, body) == PromptEstimate(3 + 4 + 13 + 3)
    with pytest.raises(AssertionError, match="o200k_base loaded"):
        tokenizer.estimate_prompt(Endpoint.CHAT, body)

from __future__ import annotations

import gzip
import hashlib
import json
import random
import socket
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

# The reference implementation the shipped encodings are compared against.
import tiktoken
import tiktoken.load

from proxy import tokens
from proxy.endpoints import Endpoint
from proxy.tokens import (
    ENCODINGS,
    IMAGE_LOW_TOKENS,
    MEDIA_TOKENS,
    EncodingFileError,
    Tokenizer,
    load_encoding,
    read_ranks,
)

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
    assert Tokenizer()._counters["cl100k_base"]._enc is load_encoding("cl100k_base")


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_encoding_is_identical_to_tiktoken_registry(
    name: str, reference: dict[str, tiktoken.Encoding]
) -> None:
    ours, ref = load_encoding(name), reference[name]
    assert ours is not ref
    assert ours._pat_str == ref._pat_str
    assert ours._special_tokens == ref._special_tokens
    assert ours._mergeable_ranks == ref._mergeable_ranks
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
    expected += IMAGE_LOW_TOKENS + 4 * MEDIA_TOKENS
    body = chat("gpt-4o", [{"role": "user", "content": parts}])
    assert tokenizer.estimate(Endpoint.CHAT, body) == expected


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
    expected = 3 + n(o, "user") + n(o, "What is in this image?") + IMAGE_LOW_TOKENS
    expected += 2 * MEDIA_TOKENS
    expected += 3 + n(o, "assistant") + n(o, "A cat.")
    expected += 3 + n(o, "Hm.")
    expected += 3 + n(o, "weather") + n(o, args)
    expected += 3 + n(o, "sunny")
    expected += 3 + 3
    assert tokenizer.estimate(Endpoint.RESPONSES, {"model": "gpt-4.1", "input": items}) == expected


def test_responses_tools_match_chat_tools(tokenizer: Tokenizer) -> None:
    fn = COOKBOOK_TOOLS[0]["function"]
    flat = [{"type": "function", **fn, "strict": True}]
    empty = tokenizer.estimate(Endpoint.RESPONSES, {"model": "gpt-4o", "input": []})
    with_tools = tokenizer.estimate(Endpoint.RESPONSES, {"model": "gpt-4o", "tools": flat})
    chat_base = tokenizer.estimate(Endpoint.CHAT, chat("gpt-4o", []))
    chat_tools = tokenizer.estimate(Endpoint.CHAT, chat("gpt-4o", [], tools=COOKBOOK_TOOLS))
    assert with_tools - empty == chat_tools - chat_base > 0


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


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 4 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False, 0, -7, 2.5, 10**30])
    if kind in (2, 3):
        return rng.choice(["text", "image_url", "input_image", "function", "low", "", "🎉"])
    if kind == 4:
        return rng.choice(["type", "text", "role", "content", "name", "detail"])
    if kind == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["type", "text", "role", "content", "name", "function", "image_url", "detail"]
    keys += ["tool_calls", "arguments", "parameters", "properties", "enum", "output", "summary"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(5))}


def test_random_bodies_never_raise(tokenizer: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        body = {key: random_json(rng) for key in rng.sample(KEYS, rng.randrange(1, len(KEYS)))}
        for endpoint in Endpoint:
            assert tokenizer.estimate(endpoint, body) >= 1


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

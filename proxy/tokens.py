"""Prompt-token estimates for OpenAI request bodies, from the BPE files shipped in the package.

    estimate = tokenizer.estimate_prompt(Endpoint.CHAT, body)
    estimate.tokens    # the prompt's tokens, images included
    estimate.unsized   # e.g. ("input_file part",): input counted as 0, as it cannot be sized

The encodings load from ``proxy/encodings/*.tiktoken.gz`` (OpenAI's exact ``.tiktoken`` files,
checked against the sha256 that tiktoken itself pins); nothing is downloaded or cached on disk.
Estimation rules (chat follows OpenAI's cookbook "How to count tokens with tiktoken"):

* chat: 3 per message + every string field (``name`` +1) + 3 priming the reply. Text parts
  (``text``/``input_text``/``output_text``/``refusal``) count their text. An image
  (``image_url``, ``input_image``, a ``computer_screenshot`` output) counts what
  ``proxy.images.image_tokens`` gives for the request's model: a ``data:`` URL sized from
  its header bytes, any other URL or a ``file_id`` at the most an image can cost at its
  ``detail``. Images for a model with no documented image pricing, file parts (``file``,
  ``input_file``), audio parts (``input_audio``: their tokens depend on the sound, not the
  bytes) and an assistant's ``audio`` reference count 0 and are listed in ``unsized``.
  A tool call counts 3 + its name + its arguments.
* tools/functions: the cookbook formula (per function 7 on o200k, 10 on cl100k, + ``name:desc``;
  3 if it has properties, then per property 3 + ``name:type:desc`` and 3 + value per enum value,
  -3 once per enum; 12 once at the end). Schema keywords the formula ignores (nested objects,
  ``items``, ``anyOf``...) and non-function tools count as their JSON. A ``json_schema`` response
  format counts as its JSON.
* completions/embeddings: each string's tokens, a token array's length; plus ``suffix``.
* responses: ``instructions`` and a string ``input`` count as messages; list items count 3 +
  role/name/arguments/input text + content/output/summary parts, as chat; tools as above.
  An ``image_generation_call`` item (an image the model sees again) is unsized.

Texts over 16k characters are encoded in chunks cut before a space that follows a non-space, a
point no token straddles, so the count stays exact; only text with no such point for 8k
characters (a long run of whitespace, one huge word) is cut anywhere, off by a token or two.
Should tiktoken's core still panic on some text, that text counts as its UTF-8 length (an upper
bound). ``tokens`` is never less than 1; ``unsized`` names kinds of input, never their content.

``bound_prompt`` counts every text as its UTF-8 length instead: an upper
bound of the exact estimate (a byte-level BPE token is at least one byte), by the same rules,
with no encoding loaded and nothing encoded. The proxy holds on it while it decides nothing.
"""

from __future__ import annotations

import binascii
import gzip
import hashlib
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from typing import Any, NamedTuple

import tiktoken

from proxy import images
from proxy.endpoints import Endpoint

PER_MESSAGE = 3
PER_NAME = 1
REPLY_PRIMING = 3
PER_TOOL_CALL = 3
CHUNK_CHARS = 16_384
# Models whose encoding is remembered (the memo starts over past this many names).
MAX_REMEMBERED_MODELS = 4096
IMAGE_PARTS = ("image_url", "input_image", "computer_screenshot")  # tuples: `in` must not hash
UNSIZED_PARTS = ("file", "input_file", "input_audio", "audio")
UNSIZED_ITEMS = ("image_generation_call",)

_O200K_PAT = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
_CL100K_PAT = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""  # noqa: E501


class EncodingSpec(NamedTuple):
    sha256: str  # of the decompressed .tiktoken file
    pat_str: str
    special_tokens: dict[str, int]
    func_init: int  # cookbook tools formula: tokens opening each function


ENCODINGS: dict[str, EncodingSpec] = {
    "o200k_base": EncodingSpec(
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        _O200K_PAT,
        {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
        7,
    ),
    "cl100k_base": EncodingSpec(
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        _CL100K_PAT,
        {
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
        10,
    ),
}
_PARAMS_KEYS = ("type", "properties", "required", "additionalProperties")
# Long texts are encoded in chunks cut at a space that follows a non-space: no o200k or
# cl100k token spans a non-space then a space, so the chunks' counts add up exactly.
CL100K_MODELS = (
    *("gpt-4", "gpt-4-*", "gpt-3.5*", "gpt-35*", "davinci-002", "babbage-002"),
    *("text-embedding-3-*", "text-embedding-ada-002"),
)


class EncodingFileError(RuntimeError):
    """A shipped encoding file is missing, unreadable or not the pinned bytes."""


def read_ranks(name: str, gz: bytes) -> dict[bytes, int]:
    """Decompress a ``.tiktoken.gz``, check it against the pinned sha256, parse its ranks."""
    try:
        data = gzip.decompress(gz)
    except (OSError, EOFError, ValueError) as exc:
        raise EncodingFileError(f"encoding {name}: cannot decompress: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != ENCODINGS[name].sha256:
        raise EncodingFileError(
            f"encoding {name}: sha256 {digest} does not match {ENCODINGS[name].sha256}"
        )
    return {binascii.a2b_base64(t): int(r) for t, r in (ln.split() for ln in data.splitlines())}


_lock = threading.Lock()
_loaded: dict[str, tiktoken.Encoding] = {}


def load_encoding(name: str) -> tiktoken.Encoding:
    """The encoding ``name`` built from the shipped file, once per process."""
    with _lock:
        if name not in _loaded:
            spec = ENCODINGS[name]
            try:
                gz = resources.files("proxy").joinpath(f"encodings/{name}.tiktoken.gz").read_bytes()
            except OSError as exc:
                raise EncodingFileError(f"encoding {name}: cannot read: {exc}") from exc
            encoding = tiktoken.Encoding(
                name=name,
                pat_str=spec.pat_str,
                mergeable_ranks=read_ranks(name, gz),
                special_tokens=dict(spec.special_tokens),
            )
            # The Rust core holds its own copy of the ranks; tiktoken keeps the Python
            # dict only to pickle the encoding, which the proxy never does. Dropping it
            # frees about 25 MB per encoding (o200k_base: 200,000 entries).
            encoding._mergeable_ranks = {}
            _loaded[name] = encoding
        return _loaded[name]


@dataclass(slots=True)
class PromptEstimate:
    """A prompt's estimated tokens, and the kinds of input in it the estimate could not size
    (counted as 0): short reasons such as ``"input_file part"``, each listed once, in order."""

    tokens: int
    unsized: tuple[str, ...] = ()


class Tokenizer:
    """Counts prompt tokens the way OpenAI bills them, before the request goes upstream.

        tokenizer = Tokenizer(overrides={"my-finetune-*": "cl100k_base"})
        tokenizer.count("gpt-4o", "hello world")  # 2; its encoding loads on first use, ~0.5 s
        tokenizer.estimate_prompt(Endpoint.CHAT, {"model": "gpt-4o", "messages": [...]})
        tokenizer.estimate(Endpoint.CHAT, body)  # just the tokens
        tokenizer.bound_prompt(Endpoint.CHAT, body)  # at least as many, nothing loaded

    Models map to an encoding by ``overrides`` (fnmatch globs, first match, on the name as
    sent), then by the name lowercased and stripped of a provider prefix (``openai/gpt-4o``,
    ``azure/gpt-35-turbo``) and of ``ft:``: gpt-4, gpt-4-*, gpt-3.5*, text-embedding-3-* and
    ada-002 are cl100k_base; everything else (gpt-4o, 4.1, 4.5, 5, o1, o3, o4...) is o200k_base.
    Methods are thread-safe and never raise on malformed bodies.
    """

    def __init__(self, *, overrides: Mapping[str, str] | None = None) -> None:
        self._overrides = dict(overrides or {})
        for glob, name in self._overrides.items():
            if name not in ENCODINGS:
                raise ValueError(f"override {glob!r}: unknown encoding {name!r}")
        # Each encoding (~70 MB of ranks) loads on its first use: most deployments use one.
        self._counters: dict[str, _Exact] = {}
        self._names: dict[str, str] = {}  # model -> encoding, as found (bounded)

    def _counter(self, name: str) -> _Exact:
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = _Exact(load_encoding(name))
        return counter

    def encoding_name(self, model: str) -> str:
        name = self._names.get(model)
        if name is None:
            if len(self._names) >= MAX_REMEMBERED_MODELS:
                self._names.clear()
            name = self._names[model] = self._find_encoding(model)
        return name

    def _find_encoding(self, model: str) -> str:
        for glob, name in self._overrides.items():
            if fnmatchcase(model, glob):
                return name
        bare = model.lower().rpartition("/")[2].removeprefix("ft:")
        if any(fnmatchcase(bare, glob) for glob in CL100K_MODELS):
            return "cl100k_base"
        return "o200k_base"

    def count(self, model: str, text: str) -> int:
        return self._counter(self.encoding_name(model)).text(text)

    def estimate(self, endpoint: Endpoint, body: Mapping[str, Any]) -> int:
        return self.estimate_prompt(endpoint, body).tokens

    def estimate_prompt(self, endpoint: Endpoint, body: Mapping[str, Any]) -> PromptEstimate:
        return self._estimate(endpoint, body, bound=False)

    def bound_prompt(self, endpoint: Endpoint, body: Mapping[str, Any]) -> PromptEstimate:
        """An upper bound of ``estimate_prompt`` that loads no encoding and encodes
        nothing: every text counts its UTF-8 length (a token is at least one byte),
        everything else as ``estimate_prompt`` counts it."""
        return self._estimate(endpoint, body, bound=True)

    def _estimate(
        self, endpoint: Endpoint, body: Mapping[str, Any], *, bound: bool
    ) -> PromptEstimate:
        if not isinstance(body, (dict, Mapping)):
            return PromptEstimate(1)
        model = body.get("model")
        model = model if isinstance(model, str) else ""
        name = self.encoding_name(model)
        c = _BOUND if bound else self._counter(name)
        media = _Media(model)
        if endpoint == Endpoint.CHAT:
            messages = _items(body.get("messages"))
            total = sum(c.message(m, media, every_field=True) for m in messages)
            total += REPLY_PRIMING + c.tools(body.get("tools"), ENCODINGS[name].func_init)
            total += c.tools(body.get("functions"), ENCODINGS[name].func_init)
            fmt = body.get("response_format")
            total += c.json(fmt.get("json_schema")) if isinstance(fmt, (dict, Mapping)) else 0
        elif endpoint == Endpoint.RESPONSES:
            total = REPLY_PRIMING + c.tools(body.get("tools"), ENCODINGS[name].func_init)
            if isinstance(body.get("instructions"), str):
                instructions = {"role": "developer", "content": body["instructions"]}
                total += c.message(instructions, media)
            prompt = body.get("input")
            items = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            total += sum(c.message(item, media) for item in _items(items))
        elif endpoint == Endpoint.COMPLETIONS:
            total = c.prompt(body.get("prompt")) + c.prompt(body.get("suffix"))
        else:
            total = c.prompt(body.get("input"))
        return PromptEstimate(max(total, 1), tuple(dict.fromkeys(media.unsized)))


def _items(value: object) -> Iterable[Any]:
    return value if isinstance(value, list | tuple) else ()


class _Media:
    """One request's images, priced for its model, and the input it could not size."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.unsized: list[str] = []

    def image(self, kind: str, part: Mapping[str, Any]) -> int:
        ref = part.get("image_url")
        if isinstance(ref, (dict, Mapping)):  # chat: {"url": ..., "detail": ...}
            url, detail = ref.get("url"), ref.get("detail")
        else:  # responses (or a bare chat URL): the URL, its detail beside it
            url, detail = ref, part.get("detail")
        size = images.data_url_size(url) if isinstance(url, str) else None
        tokens = images.image_tokens(
            self.model, detail=detail if isinstance(detail, str) else None, size=size
        )
        if tokens is None:
            self.unsized.append(f"{kind} part for model '{self.model[:128]}'")
            return 0
        return tokens


class _Counter:
    """Token arithmetic over a request's parts; every method accepts any JSON value. How a
    text counts is up to the subclass: exactly, or bounded."""

    def text(self, text: object) -> int:
        raise NotImplementedError

    def json(self, value: object) -> int:
        return 0 if value is None else self.text(_dump(value))

    def prompt(self, value: object) -> int:
        if not isinstance(value, list | tuple):
            return self.text(value)
        return sum(
            self.text(v) if isinstance(v, str) else len(v) if isinstance(v, list) else 1
            for v in value
        )

    def parts(self, content: object, media: _Media) -> int:
        if isinstance(content, (dict, Mapping)):  # a computer_call_output's screenshot
            return self.part(content, media)
        if not isinstance(content, list | tuple):
            return self.text(content)
        return sum(self.part(part, media) for part in content)

    def part(self, part: object, media: _Media) -> int:
        if not isinstance(part, (dict, Mapping)):
            return self.text(part)
        kind = part.get("type")
        if kind in IMAGE_PARTS:
            return media.image(kind, part)
        if kind in UNSIZED_PARTS:
            media.unsized.append(f"{kind} part")
            return 0
        return self.text(part.get("text")) + self.text(part.get("refusal"))

    def message(self, msg: object, media: _Media, *, every_field: bool = False) -> int:
        if not isinstance(msg, (dict, Mapping)):
            return PER_MESSAGE + self.text(msg)
        if msg.get("type") in UNSIZED_ITEMS:
            media.unsized.append(f"{msg['type']} item")
        total = PER_MESSAGE
        for key, value in msg.items():
            if key in ("content", "output", "summary"):
                total += self.parts(value, media)
            elif key == "audio" and isinstance(value, (dict, Mapping)):  # an earlier audio reply
                media.unsized.append("assistant audio")
            elif key == "tool_calls":
                total += sum(self.call(call) for call in _items(value))
            elif key == "function_call" and isinstance(value, (dict, Mapping)):
                total += self.call(value)
            elif every_field or key in ("role", "name", "arguments", "input"):
                total += self.text(value) + (PER_NAME if key == "name" and every_field else 0)
        return total

    def call(self, call: object) -> int:
        fn = call.get("function", call) if isinstance(call, (dict, Mapping)) else None
        if not isinstance(fn, (dict, Mapping)):
            return PER_TOOL_CALL
        return PER_TOOL_CALL + self.text(fn.get("name")) + self.text(fn.get("arguments"))

    def tools(self, tools: object, func_init: int) -> int:
        total = 0
        for tool in _items(tools):
            fn = tool.get("function", tool) if isinstance(tool, (dict, Mapping)) else None
            if isinstance(fn, (dict, Mapping)) and fn.get("type", "function") == "function":
                total += func_init + self.function(fn)
            else:
                total += self.json(tool)
        return (total + 12) if total else 0

    def function(self, fn: Mapping[str, Any]) -> int:
        total = self.text(f"{_str(fn.get('name'))}:{_str(fn.get('description'))}")
        params = fn.get("parameters")
        if not isinstance(params, (dict, Mapping)):
            return total + self.json(params)
        rest = {k: v for k, v in params.items() if k not in _PARAMS_KEYS}
        total += self.json(rest) if rest else 0
        props = params.get("properties")
        if not isinstance(props, (dict, Mapping)) or not props:
            return total + (self.json(props) if props else 0)
        total += 3
        for key, prop in props.items():
            prop = prop if isinstance(prop, (dict, Mapping)) else {"description": prop}
            total += 3 + self.text(
                f"{key}:{_str(prop.get('type'))}:{_str(prop.get('description'))}"
            )
            enum = prop.get("enum")
            if isinstance(enum, list) and enum:
                total += -3 + sum(3 + self.text(_str(item, strip=False)) for item in enum)
            rest = {k: v for k, v in prop.items() if k not in ("type", "description", "enum")}
            total += self.json(rest) if rest else 0
        return total


class _Exact(_Counter):
    """Counts each text's tokens in one encoding."""

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self._enc = encoding

    def text(self, text: object) -> int:
        if not isinstance(text, str):
            return 0
        if len(text) <= CHUNK_CHARS:
            return self._encode(text)
        total, start = 0, 0
        while len(text) - start > CHUNK_CHARS:
            end = _cut(text, start)
            total += self._encode(text[start:end])
            start = end
        return total + self._encode(text[start:])

    def _encode(self, text: str) -> int:
        try:
            return len(self._enc.encode_ordinary(text))
        except BaseException as exc:  # the Rust core panics (PanicException) on regex overflow
            if type(exc).__name__ != "PanicException":
                raise
            return _utf8_len(text)  # a token is at least one byte


class _Bound(_Counter):
    """Counts each text as its UTF-8 length: never fewer than its tokens, as every token
    of a byte-level BPE is at least one byte of the text."""

    def text(self, text: object) -> int:
        return _utf8_len(text) if isinstance(text, str) else 0


_BOUND = _Bound()


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _str(value: object, *, strip: bool = True) -> str:
    """A schema field as the cookbook formats it: strings as-is minus one final period."""
    if isinstance(value, str):
        return value.removesuffix(".") if strip else value
    return "" if value is None else _dump(value)


def _dump(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (ValueError, TypeError, RecursionError):  # nested too deep for the C encoder
        words: list[str] = []
        stack: list[object] = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, (dict, Mapping)):
                words.extend(map(str, item))
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                stack.extend(item)
            else:
                words.append(str(item))
        return " ".join(words)


def _cut(text: str, start: int) -> int:
    """Where to end the chunk from ``start``: the last safe cut in its second half (a space
    after a non-space), if any. Searched backwards with ``str.rfind``:
    scanning every match of the half chunk holds the interpreter lock ten times longer."""
    end = start + CHUNK_CHARS
    low = end - CHUNK_CHARS // 2
    space = text.rfind(" ", low, end)
    while space != -1:
        if not text[space - 1].isspace():
            return space
        space = text.rfind(" ", low, space)
    return end

from __future__ import annotations

import asyncio
import doctest
import json
from decimal import Decimal
from pathlib import Path

import pytest

from proxy import price_files
from proxy.cli import main
from proxy.config import ConfigError, load_settings
from proxy.endpoints import Endpoint
from proxy.price_files import (
    PriceFile,
    PriceFileError,
    SizeTier,
    load_price_file,
    merge_price_files,
    parse_price_file,
    price_at_prompt_size,
)
from proxy.pricing import MAX_PER_MTOK, ModelPrice, TierPrice, estimate_micros, hold_price
from proxy.redis_store import RedisStore
from proxy.tokens import Tokenizer
from tests.conftest import MakeClient
from tests.fake_upstream import FakeUpstream
from tests.harness import TENANT_KEY, auth, spent

SOURCE = "litellm.json"

# Entries shaped as in LiteLLM's model_prices_and_context_window.json, unknown fields and all.
SAMPLE = """{
    "sample_spec": {
        "input_cost_per_token": 0.0,
        "output_cost_per_token": 0.0,
        "litellm_provider": "one of https://docs.litellm.ai/docs/providers",
        "max_input_tokens": "max input tokens, if the provider specifies it",
        "max_tokens": "LEGACY parameter",
        "mode": "one of: chat, embedding, completion, image_generation, ..."
    },
    "gpt-4o-mini": {
        "cache_read_input_token_cost": 7.5e-08,
        "input_cost_per_token": 1.5e-07,
        "input_cost_per_token_batches": 7.5e-08,
        "litellm_provider": "openai",
        "max_input_tokens": 128000,
        "max_output_tokens": 16384,
        "max_tokens": 16384,
        "mode": "chat",
        "output_cost_per_token": 6e-07,
        "supports_function_calling": true,
        "supports_vision": true
    },
    "gpt-4.1": {
        "cache_read_input_token_cost": 5e-07,
        "input_cost_per_token": 2e-06,
        "litellm_provider": "openai",
        "max_input_tokens": 1047576,
        "max_output_tokens": 32768,
        "mode": "chat",
        "output_cost_per_token": 8e-06
    },
    "anthropic/claude-3-5-sonnet-20241022": {
        "cache_creation_input_token_cost": 3.75e-06,
        "cache_read_input_token_cost": 3e-07,
        "input_cost_per_token": 3e-06,
        "litellm_provider": "anthropic",
        "max_input_tokens": 200000,
        "max_output_tokens": 8192,
        "max_tokens": 8192,
        "mode": "chat",
        "output_cost_per_token": 1.5e-05,
        "supports_prompt_caching": true
    },
    "gemini/gemini-2.5-pro": {
        "cache_read_input_token_cost": 3.125e-07,
        "cache_read_input_token_cost_above_200k_tokens": 6.25e-07,
        "input_cost_per_token": 1.25e-06,
        "input_cost_per_token_above_200k_tokens": 2.5e-06,
        "litellm_provider": "gemini",
        "max_input_tokens": 1048576,
        "max_output_tokens": 65535,
        "mode": "chat",
        "output_cost_per_reasoning_token": 1e-05,
        "output_cost_per_token": 1e-05,
        "output_cost_per_token_above_200k_tokens": 1.5e-05,
        "supports_reasoning": true
    },
    "dall-e-3": {
        "input_cost_per_pixel": 4.0054321e-08,
        "litellm_provider": "openai",
        "mode": "image_generation",
        "output_cost_per_pixel": 0.0
    },
    "deepseek/deepseek-reasoner": {
        "cache_read_input_token_cost": 1.4e-07,
        "input_cost_per_token": 5.5e-07,
        "litellm_provider": "deepseek",
        "max_input_tokens": 65536,
        "max_tokens": 8192,
        "mode": "chat",
        "output_cost_per_reasoning_token": 2.5e-06,
        "output_cost_per_token": 2.19e-06
    },
    "text-embedding-3-small": {
        "input_cost_per_token": 2e-08,
        "litellm_provider": "openai",
        "max_input_tokens": 8191,
        "max_tokens": 8191,
        "mode": "embedding",
        "output_vector_size": 1536
    },
    "groq/llama3-70b-8192": {
        "input_cost_per_token": 5.9e-07,
        "litellm_provider": "groq",
        "max_tokens": 8192,
        "mode": "chat",
        "output_cost_per_token": 7.9e-07
    },
    "whisper-1": {
        "input_cost_per_second": 0.0001,
        "litellm_provider": "openai",
        "mode": "audio_transcription",
        "output_cost_per_second": 0.0001
    },
    "cohere/rerank-english-v3.0": {
        "input_cost_per_query": 0.002,
        "input_cost_per_token": 0.0,
        "litellm_provider": "cohere",
        "mode": "rerank",
        "output_cost_per_token": 0.0
    },
    "ft:babbage-002": {
        "litellm_provider": "text-completion-openai",
        "max_tokens": 16384,
        "mode": "completion"
    }
}"""


@pytest.fixture
def sample() -> PriceFile:
    return parse_price_file(SAMPLE, source=SOURCE)


def _tiered() -> tuple[ModelPrice, tuple[SizeTier, ...]]:
    price = ModelPrice(
        input_per_mtok=Decimal(1),
        cached_input_per_mtok=Decimal("0.25"),
        output_per_mtok=Decimal(4),
        max_input_tokens=1_000_000,
    )
    tiers = (
        SizeTier(
            above_tokens=128_000,
            input_per_mtok=Decimal(2),
            output_per_mtok=Decimal(8),
            cached_input_per_mtok=Decimal("0.5"),
        ),
        SizeTier(
            above_tokens=256_000,
            input_per_mtok=Decimal(3),
            output_per_mtok=Decimal(12),
            cached_input_per_mtok=None,
        ),
    )
    return price, tiers


def _raw(entries: dict[str, dict[str, str]]) -> str:
    """A price file whose field values are written verbatim (``"3e-06"`` is a number)."""
    objects = (
        json.dumps(name)
        + ": {"
        + ", ".join(f"{json.dumps(k)}: {v}" for k, v in fields.items())
        + "}"
        for name, fields in entries.items()
    )
    return "{" + ", ".join(objects) + "}"


def _entry(**fields: str) -> str:
    return _raw({"acme/model-x": {"mode": '"chat"', **fields}})


def test_the_module_docstring_example_runs() -> None:
    result = doctest.testmod(price_files)
    assert result.attempted > 0
    assert result.failed == 0


# --- conversion ---------------------------------------------------------------------


def test_an_openai_entry_converts_to_exact_prices_per_million_tokens(sample: PriceFile) -> None:
    assert sample.path == SOURCE
    assert sample.prices["gpt-4o-mini"] == ModelPrice(
        input_per_mtok=Decimal("0.15"),
        cached_input_per_mtok=Decimal("0.075"),
        output_per_mtok=Decimal("0.6"),
        max_input_tokens=128_000,
        max_output_tokens=16_384,
    )
    gpt41 = sample.prices["gpt-4.1"]
    assert (gpt41.input_per_mtok, gpt41.cached_input_per_mtok, gpt41.output_per_mtok) == (
        Decimal(2),
        Decimal("0.5"),
        Decimal(8),
    )


@pytest.mark.parametrize(
    ("per_token", "per_mtok"),
    [
        ("3e-06", "3"),
        ("1.25e-07", "0.125"),
        ("2.5e-06", "2.5"),
        ("0.000003", "3"),
        ("3.125e-07", "0.3125"),
        ("4.0054321e-08", "0.040054321"),
        ("1.2345678901234567890123456789e-06", "1.2345678901234567890123456789"),
        ("0", "0"),
        ("0.0", "0"),
        ("-0.0", "0"),
        ("1e-03", "1000"),
    ],
)
def test_a_cost_per_token_scales_to_per_million_without_rounding(
    per_token: str, per_mtok: str
) -> None:
    file = parse_price_file(
        _entry(input_cost_per_token=per_token, output_cost_per_token="0"), source=SOURCE
    )
    price = file.prices["acme/model-x"].input_per_mtok
    assert price == Decimal(per_mtok)
    assert str(price) == per_mtok
    assert not price.is_signed()


def test_a_whole_price_is_a_plain_integer_not_an_exponent() -> None:
    file = parse_price_file(
        _entry(input_cost_per_token="0", output_cost_per_token="1.5e-05"), source=SOURCE
    )
    assert str(file.prices["acme/model-x"].output_per_mtok) == "15"


def test_the_cache_write_price_is_recorded_and_leaves_the_input_price(sample: PriceFile) -> None:
    claude = sample.prices["anthropic/claude-3-5-sonnet-20241022"]
    assert claude.input_per_mtok == Decimal(3)
    assert claude.cached_input_per_mtok == Decimal("0.3")
    assert claude.output_per_mtok == Decimal(15)
    assert claude.max_output_tokens == 8192
    assert sample.cache_write_per_mtok["anthropic/claude-3-5-sonnet-20241022"] == Decimal("3.75")
    assert sample.cache_write_per_mtok["claude-3-5-sonnet-20241022"] == Decimal("3.75")
    assert "gpt-4o-mini" not in sample.cache_write_per_mtok


def test_a_dearer_reasoning_price_is_the_output_price(sample: PriceFile) -> None:
    deepseek = sample.prices["deepseek-reasoner"]
    assert deepseek.output_per_mtok == Decimal("2.5")
    assert deepseek.input_per_mtok == Decimal("0.55")
    assert deepseek.reasoning is True
    # the hold for 1000 output tokens covers them all being reasoning tokens
    assert estimate_micros(0, 1000, deepseek) == 2500


def test_a_cheaper_or_equal_reasoning_price_leaves_the_output_price() -> None:
    file = parse_price_file(
        _entry(
            input_cost_per_token="1e-06",
            output_cost_per_token="2e-06",
            output_cost_per_reasoning_token="2e-06",
        ),
        source=SOURCE,
    )
    price = file.prices["model-x"]
    assert price.output_per_mtok == Decimal(2)
    assert price.reasoning is True


def test_a_reasoning_price_alone_prices_the_output() -> None:
    text = '{"r1": {"input_cost_per_token": 1e-06, "output_cost_per_reasoning_token": 4e-06}}'
    assert parse_price_file(text, source=SOURCE).prices["r1"].output_per_mtok == Decimal(4)


def test_supports_reasoning_marks_a_reasoning_model(sample: PriceFile) -> None:
    assert sample.prices["gemini-2.5-pro"].reasoning is True
    assert sample.prices["gpt-4.1"].reasoning is False


def test_max_output_tokens_comes_first_then_the_legacy_max_tokens(sample: PriceFile) -> None:
    assert sample.prices["deepseek-reasoner"].max_output_tokens == 8192
    assert sample.prices["deepseek-reasoner"].max_input_tokens == 65_536
    text = '{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,'
    text += ' "max_output_tokens": 4096, "max_tokens": 100000}}'
    assert parse_price_file(text, source=SOURCE).prices["m"].max_output_tokens == 4096


def test_zero_or_null_max_tokens_are_not_stated() -> None:
    text = '{"m": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06,'
    text += ' "max_output_tokens": 0, "max_tokens": null, "max_input_tokens": 8192.0}}'
    price = parse_price_file(text, source=SOURCE).prices["m"]
    assert price.max_output_tokens is None
    assert price.max_input_tokens == 8192


def test_an_embedding_model_without_output_price_has_free_output(sample: PriceFile) -> None:
    embedding = sample.prices["text-embedding-3-small"]
    assert embedding.input_per_mtok == Decimal("0.02")
    assert embedding.output_per_mtok == 0


def test_unknown_fields_are_ignored() -> None:
    text = _entry(
        input_cost_per_token="1e-06",
        output_cost_per_token="1e-06",
        brand_new_field='{"nested": [1, "x"]}',
        input_cost_per_token_priority='"not read"',
        cache_creation_input_token_cost_above_1hr='"not read"',
        output_cost_per_token_flex_above_272k_tokens='"not read"',
        input_cost_per_character_above_128k_tokens='"not read"',
    )
    file = parse_price_file(text, source=SOURCE)
    assert file.prices["model-x"].input_per_mtok == 1
    assert "model-x" not in file.tiers


# --- skipping -----------------------------------------------------------------------


def test_skipped_entries_are_counted_and_absent(sample: PriceFile) -> None:
    # sample_spec, dall-e-3 (image_generation), whisper-1 (audio_transcription), the
    # rerank model, and ft:babbage-002 (no input price)
    assert sample.skipped == 5
    for name in ("sample_spec", "dall-e-3", "whisper-1", "cohere/rerank-english-v3.0"):
        assert name not in sample.prices
    assert "rerank-english-v3.0" not in sample.prices
    assert "ft:babbage-002" not in sample.prices


@pytest.mark.parametrize("mode", ["chat", "completion", "responses", "embedding", None])
def test_text_modes_and_no_mode_are_kept(mode: str | None) -> None:
    fields = {"input_cost_per_token": "1e-06", "output_cost_per_token": "1e-06"}
    if mode is not None:
        fields["mode"] = json.dumps(mode)
    file = parse_price_file(_raw({"m": fields}), source=SOURCE)
    assert file.skipped == 0
    assert "m" in file.prices


@pytest.mark.parametrize(
    "mode", ["image_generation", "audio_transcription", "audio_speech", "rerank", "moderation"]
)
def test_other_modes_are_skipped_unchecked(mode: str) -> None:
    text = json.dumps({"m": {"mode": mode, "input_cost_per_token": "not checked"}})
    file = parse_price_file(text, source=SOURCE)
    assert file.skipped == 1
    assert file.prices == {}


def test_a_chat_model_with_no_output_price_is_skipped_never_free() -> None:
    file = parse_price_file('{"m": {"mode": "chat", "input_cost_per_token": 1e-06}}', source="f")
    assert file.skipped == 1
    assert file.prices == {}


# --- provider prefixes ----------------------------------------------------------------


def test_a_prefixed_entry_also_prices_its_bare_name(sample: PriceFile) -> None:
    assert (
        sample.prices["claude-3-5-sonnet-20241022"]
        is sample.prices["anthropic/claude-3-5-sonnet-20241022"]
    )
    assert sample.prices["llama3-70b-8192"] is sample.prices["groq/llama3-70b-8192"]
    assert sample.prices["llama3-70b-8192"].max_output_tokens == 8192
    assert sample.tiers["gemini-2.5-pro"] == sample.tiers["gemini/gemini-2.5-pro"]


def test_a_bare_entry_wins_over_a_prefixed_one_in_either_order() -> None:
    bare = {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06}
    prefixed = {"input_cost_per_token": 5e-06, "output_cost_per_token": 9e-06}
    for document in (
        {"claude-x": bare, "anthropic/claude-x": prefixed},
        {"anthropic/claude-x": prefixed, "claude-x": bare},
    ):
        file = parse_price_file(json.dumps(document), source=SOURCE)
        assert file.prices["claude-x"].input_per_mtok == 1
        assert file.prices["anthropic/claude-x"].input_per_mtok == 5


def test_the_nearest_prefix_wins_and_every_suffix_is_a_name() -> None:
    near = {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06}
    far = {"input_cost_per_token": 7e-06, "output_cost_per_token": 7e-06}
    document = {"openrouter/meta-llama/llama-3-70b": far, "deepinfra/llama-3-70b": near}
    file = parse_price_file(json.dumps(document), source=SOURCE)
    assert file.prices["meta-llama/llama-3-70b"].input_per_mtok == 7
    assert file.prices["llama-3-70b"].input_per_mtok == 1
    assert file.ambiguous == ()


def test_providers_that_disagree_leave_the_bare_name_unpriced() -> None:
    document = {
        "groq/llama-x": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06},
        "together_ai/llama-x": {"input_cost_per_token": 2e-06, "output_cost_per_token": 1e-06},
        "fireworks/mistral-x": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06},
        "deepinfra/mistral-x": {"input_cost_per_token": 1e-06, "output_cost_per_token": 1e-06},
    }
    file = parse_price_file(json.dumps(document), source=SOURCE)
    assert "llama-x" not in file.prices
    assert file.ambiguous == ("llama-x",)
    assert file.prices["mistral-x"].input_per_mtok == 1  # they agree: priced


# --- size tiers -----------------------------------------------------------------------


def test_above_200k_fields_become_a_size_tier(sample: PriceFile) -> None:
    gemini = sample.prices["gemini-2.5-pro"]
    assert gemini.input_per_mtok == Decimal("1.25")
    assert gemini.cached_input_per_mtok == Decimal("0.3125")
    assert gemini.output_per_mtok == Decimal(10)
    assert sample.tiers["gemini-2.5-pro"] == (
        SizeTier(
            above_tokens=200_000,
            input_per_mtok=Decimal("2.5"),
            output_per_mtok=Decimal(15),
            cached_input_per_mtok=Decimal("0.625"),
        ),
    )
    assert "gpt-4o-mini" not in sample.tiers


def test_tiers_are_sorted_and_fill_in_missing_prices() -> None:
    text = _entry(
        input_cost_per_token="1e-06",
        output_cost_per_token="3e-06",
        input_cost_per_token_above_256k_tokens="4e-06",
        output_cost_per_token_above_128k_tokens="6e-06",
        input_cost_per_token_above_1m_tokens="5e-06",
    )
    tiers = parse_price_file(text, source=SOURCE).tiers["model-x"]
    assert [t.above_tokens for t in tiers] == [128_000, 256_000, 1_000_000]
    assert tiers[0].input_per_mtok == 1  # no input price: the base one
    assert tiers[0].output_per_mtok == 6
    assert tiers[1].output_per_mtok == 3  # no output price: the base one
    assert all(t.cached_input_per_mtok is None for t in tiers)


def test_a_tier_output_is_never_below_the_reasoning_price() -> None:
    text = _raw(
        {
            "m": {
                "input_cost_per_token": "1e-06",
                "output_cost_per_token": "2e-06",
                "output_cost_per_reasoning_token": "8e-06",
                "output_cost_per_token_above_200k_tokens": "4e-06",
            }
        }
    )
    file = parse_price_file(text, source=SOURCE)
    assert file.prices["m"].output_per_mtok == 8
    assert file.tiers["m"][0].output_per_mtok == 8


@pytest.mark.parametrize(
    ("prompt_tokens", "input_", "cached", "output"),
    [
        (0, "1", "0.25", "4"),
        (127_999, "1", "0.25", "4"),
        (128_000, "1", "0.25", "4"),  # at the threshold: not above it
        (128_001, "2", "0.5", "8"),
        (255_999, "2", "0.5", "8"),
        (256_000, "2", "0.5", "8"),
        (256_001, "3", None, "12"),
        (10_000_000, "3", None, "12"),
    ],
)
def test_the_highest_tier_the_prompt_exceeds_applies(
    prompt_tokens: int, input_: str, cached: str | None, output: str
) -> None:
    price, tiers = _tiered()
    for order in (tiers, tiers[::-1]):
        applied = price_at_prompt_size(price, order, prompt_tokens)
        assert applied.input_per_mtok == Decimal(input_)
        assert applied.cached_input_per_mtok == (None if cached is None else Decimal(cached))
        assert applied.output_per_mtok == Decimal(output)
        assert applied.max_input_tokens == 1_000_000


def test_gemini_above_200k_from_the_file(sample: PriceFile) -> None:
    gemini = sample.prices["gemini-2.5-pro"]
    tiers = sample.tiers["gemini-2.5-pro"]
    assert price_at_prompt_size(gemini, tiers, 199_999) is gemini
    assert price_at_prompt_size(gemini, tiers, 200_000) is gemini
    above = price_at_prompt_size(gemini, tiers, 200_001)
    assert (above.input_per_mtok, above.output_per_mtok) == (Decimal("2.5"), Decimal(15))
    assert above.cached_input_per_mtok == Decimal("0.625")
    assert above.reasoning is True


def test_no_tiers_leave_the_price_as_is() -> None:
    price, _ = _tiered()
    assert price_at_prompt_size(price, (), 5_000_000) is price


def test_a_tiered_price_drops_explicit_service_tier_prices() -> None:
    price, tiers = _tiered()
    price = price.model_copy(
        update={"priority": TierPrice(input_per_mtok=Decimal("1.5"), output_per_mtok=Decimal(6))}
    )
    applied = price_at_prompt_size(price, tiers, 300_000)
    assert applied.priority is None
    assert hold_price(applied, "priority").input_per_mtok == 6  # twice the tier price


@pytest.mark.parametrize("bad", [-1, True])
def test_a_bad_prompt_size_is_refused(bad: int) -> None:
    price, tiers = _tiered()
    with pytest.raises(ValueError, match="prompt_tokens"):
        price_at_prompt_size(price, tiers, bad)


# --- malformed files --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "raw", "problem"),
    [
        ("input_cost_per_token", "-1e-06", "negative"),
        ("output_cost_per_token", '"3e-06"', "not a number"),
        ("output_cost_per_token", "true", "not a number"),
        ("cache_read_input_token_cost", "[1]", "not a number"),
        ("input_cost_per_token", "NaN", "not a finite number"),
        ("output_cost_per_token", "Infinity", "not a finite number"),
        ("cache_read_input_token_cost", "-Infinity", "not a finite number"),
        ("input_cost_per_token", "0.0011", "above the most"),
        ("output_cost_per_token", "1e999999", "above the most"),
        ("output_cost_per_reasoning_token", "-2e-06", "negative"),
        ("cache_creation_input_token_cost", '"x"', "not a number"),
        ("input_cost_per_token_above_200k_tokens", "-1e-06", "negative"),
        ("cache_creation_input_token_cost_above_200k_tokens", "NaN", "not a finite"),
        ("max_input_tokens", "-1", "negative"),
        ("max_output_tokens", "8192.5", "not a whole number"),
        ("max_tokens", '"8192"', "not a whole number"),
        ("max_tokens", "NaN", "not a whole number"),
        ("max_input_tokens", "false", "not a whole number"),
        ("max_input_tokens", "1e300", "above the most tokens"),
        ("max_output_tokens", str(2**41), "above the most tokens"),
        ("mode", "7", "not a string"),
        ("supports_reasoning", '"yes"', "not true or false"),
    ],
)
def test_a_malformed_field_names_the_source_model_and_field(
    field: str, raw: str, problem: str
) -> None:
    fine = {"input_cost_per_token": "1e-06", "output_cost_per_token": "2e-06"}
    # the malformed field comes last, so it is the one a JSON parser keeps
    text = _raw({"gpt-4o-mini": fine, "acme/model-x": {**fine, "mode": '"chat"', field: raw}})
    with pytest.raises(PriceFileError) as caught:
        parse_price_file(text, source="prices/litellm.json")
    message = str(caught.value)
    assert message.startswith("prices/litellm.json: model 'acme/model-x': field ")
    assert repr(field) in message
    assert problem in message


def test_a_cost_at_the_ceiling_is_accepted() -> None:
    text = '{"m": {"input_cost_per_token": 0.001, "output_cost_per_token": 0.001}}'
    assert parse_price_file(text, source=SOURCE).prices["m"].input_per_mtok == MAX_PER_MTOK


@pytest.mark.parametrize("document", ["[]", '"prices"', "42", "null"])
def test_a_file_that_is_not_an_object_is_refused(document: str) -> None:
    with pytest.raises(PriceFileError, match=r"^f\.json: a price file is a JSON object"):
        parse_price_file(document, source="f.json")


@pytest.mark.parametrize("text", ["{", '{"m": }', b"\xff\xfe\x00", ""])
def test_invalid_json_names_the_source(text: str | bytes) -> None:
    with pytest.raises(PriceFileError, match=r"^f\.json: not valid JSON"):
        parse_price_file(text, source="f.json")


@pytest.mark.parametrize("entry", ["[]", '"gpt"', "1e-06"])
def test_an_entry_that_is_not_an_object_names_the_model(entry: str) -> None:
    with pytest.raises(PriceFileError, match=r"^f\.json: model 'gpt-x': an entry is a JSON"):
        parse_price_file(f'{{"gpt-x": {entry}}}', source="f.json")


def test_an_empty_model_name_is_refused() -> None:
    with pytest.raises(PriceFileError, match="model name is empty"):
        parse_price_file('{"": {"input_cost_per_token": 1e-06}}', source="f.json")


def test_bytes_parse_like_text() -> None:
    assert parse_price_file(SAMPLE.encode(), source=SOURCE) == parse_price_file(
        SAMPLE, source=SOURCE
    )


# --- files ---------------------------------------------------------------------------


def test_load_price_file_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "model_prices_and_context_window.json"
    path.write_text(SAMPLE, encoding="utf-8")
    file = load_price_file(path)
    assert file.path == str(path)
    assert file.prices == parse_price_file(SAMPLE, source=str(path)).prices


def test_a_missing_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(PriceFileError, match=r"missing\.json: cannot read the price file"):
        load_price_file(path)


def test_an_error_in_a_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"m": {"input_cost_per_token": -1}}', encoding="utf-8")
    with pytest.raises(PriceFileError) as caught:
        load_price_file(path)
    assert str(caught.value).startswith(f"{path}: model 'm': field 'input_cost_per_token'")


# --- merging ---------------------------------------------------------------------------


def test_later_files_win_and_sources_say_where_each_entry_came_from(sample: PriceFile) -> None:
    override = parse_price_file(
        _raw(
            {
                "gpt-4o-mini": {"input_cost_per_token": "1e-06", "output_cost_per_token": "1e-06"},
                "gemini-2.5-pro": {"input_cost_per_token": "2e-06", "output_cost_per_token": "0"},
                "my-local-model": {"input_cost_per_token": "0", "output_cost_per_token": "0"},
            }
        ),
        source="override.json",
    )
    prices, tiers, sources = merge_price_files([sample, override])
    assert prices["gpt-4o-mini"].input_per_mtok == 1
    assert sources["gpt-4o-mini"] == "override.json"
    assert prices["gpt-4.1"] == sample.prices["gpt-4.1"]
    assert sources["gpt-4.1"] == SOURCE
    assert sources["claude-3-5-sonnet-20241022"] == SOURCE
    assert prices["my-local-model"].input_per_mtok == 0
    assert sources["my-local-model"] == "override.json"
    # the override's untiered entry replaces the tiered one whole
    assert prices["gemini-2.5-pro"].input_per_mtok == 2
    assert "gemini-2.5-pro" not in tiers
    assert tiers["gemini/gemini-2.5-pro"] == sample.tiers["gemini/gemini-2.5-pro"]
    assert set(prices) == set(sources)


def test_merge_order_decides(sample: PriceFile) -> None:
    other = parse_price_file(
        '{"gpt-4o-mini": {"input_cost_per_token": 5e-06, "output_cost_per_token": 5e-06}}',
        source="other.json",
    )
    prices, _, sources = merge_price_files([other, sample])
    assert prices["gpt-4o-mini"] == sample.prices["gpt-4o-mini"]
    assert sources["gpt-4o-mini"] == SOURCE


def test_merging_nothing_gives_nothing() -> None:
    assert merge_price_files([]) == ({}, {}, {})


# --- in the caps file, the proxy and the command line -------------------------------------

PRICE_FILE = {
    "sample_spec": {"input_cost_per_token": 0},
    "acme-llm": {"input_cost_per_token": 1e-06, "output_cost_per_token": 2e-06, "mode": "chat"},
    "groq/tiered-llm": {
        "input_cost_per_token": 1e-06,
        "output_cost_per_token": 2e-06,
        "input_cost_per_token_above_1k_tokens": 4e-06,
        "output_cost_per_token_above_1k_tokens": 8e-06,
        "max_input_tokens": 100000,
        "mode": "chat",
    },
    "test-model": {"input_cost_per_token": 9e-06, "output_cost_per_token": 9e-06},
}


def caps_with_files(tmp_path: Path, upstream_url: str) -> Path:
    (tmp_path / "prices").mkdir()
    (tmp_path / "prices" / "litellm.json").write_text(json.dumps(PRICE_FILE))
    caps = tmp_path / "caps.yaml"
    caps.write_text(
        f"upstreams: [{{name: up, base_url: '{upstream_url}', models: ['*']}}]\n"
        f"tenants: [{{id: acme, api_keys: ['{TENANT_KEY}']}}]\n"
        "cost_caps: {enabled: true, default_budget_caps: [{window: hourly, hard_limit_usd: 10}]}\n"
        "pricing:\n"
        "  files: [prices/litellm.json]\n"
        "  models: {test-model: {input_per_mtok: 1, output_per_mtok: 2}}\n"
    )
    return caps


def test_price_files_load_relative_to_the_caps_file(tmp_path: Path) -> None:
    settings = load_settings(caps_with_files(tmp_path, "http://127.0.0.1:9"))
    (loaded,) = settings.pricing.files
    assert loaded.path.endswith("litellm.json")
    assert "tiered-llm" in loaded.prices and "acme-llm" in loaded.prices


def test_a_bad_price_file_is_refused_like_a_bad_caps_file(tmp_path: Path) -> None:
    caps = caps_with_files(tmp_path, "http://127.0.0.1:9")
    (tmp_path / "prices" / "litellm.json").write_text(
        json.dumps({"acme-llm": {"input_cost_per_token": -1, "output_cost_per_token": 0}})
    )
    with pytest.raises(ConfigError) as info:
        load_settings(caps)
    (error,) = info.value.errors
    assert "pricing.files[0]" in error and "acme-llm" in error and "input_cost_per_token" in error


def test_the_prices_command_says_where_each_price_comes_from(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    caps = caps_with_files(tmp_path, "http://127.0.0.1:9")
    assert main(["prices", "--config", str(caps), "acme-llm", "test-model", "gpt-4o"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("acme-llm: price file ") and "litellm.json" in out[0]
    assert "input_per_mtok=1 output_per_mtok=2" in out[0]
    assert out[1].startswith("test-model: caps file: input_per_mtok=1")  # the caps file wins
    assert out[2].startswith("gpt-4o: built-in:")
    assert main(["prices", "--config", str(caps), "tiered-llm", "nobody-llm"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("tiered-llm: price file ")
    assert out[1] == "  prompts over 1000 tokens: input_per_mtok=4 output_per_mtok=8"
    assert out[2] == "nobody-llm: not priced (refused)"


async def test_requests_are_held_and_charged_at_the_price_files_size_tier(
    tmp_path: Path, upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    settings = load_settings(caps_with_files(tmp_path, upstream.url))
    client = await make_client(settings, store=redis_store)
    # A small prompt is charged at the base price: 10 x $1 + 20 x $2 per 1M.
    upstream.usage = lambda _p, _b: {"prompt_tokens": 10, "completion_tokens": 20}
    body = {
        "model": "tiered-llm",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
    }
    resp = await client.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200
    assert (await spent(redis_store))[0] == Decimal("0.00005")
    # A prompt over 1k tokens is charged at the tier's: 1500 x $4 + 20 x $8 per 1M.
    upstream.usage = lambda _p, _b: {"prompt_tokens": 1500, "completion_tokens": 20}
    resp = await client.post("/v1/chat/completions", json=body, headers=auth())
    assert resp.status == 200
    assert (await spent(redis_store))[0] == Decimal("0.00005") + Decimal("0.00616")
    # Held at the tier the estimate reaches: a long prompt is held at the tier price.
    long_body = {**body, "messages": [{"role": "user", "content": "word " * 1200}]}
    upstream.gate = asyncio.Event()
    upstream.arrived.clear()
    task = asyncio.create_task(client.post("/v1/chat/completions", json=long_body, headers=auth()))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    held = (await spent(redis_store))[1]
    upstream.gate.set()
    assert (await task).status == 200
    estimate = Tokenizer().estimate(Endpoint.CHAT, long_body)
    assert estimate > 1000
    assert held == (Decimal(estimate * 4 + 20 * 8) / 10**6)


async def test_a_prompt_whose_bound_reaches_a_tier_its_count_does_not_is_held_below_it(
    tmp_path: Path, upstream: FakeUpstream, make_client: MakeClient, redis_store: RedisStore
) -> None:
    settings = load_settings(caps_with_files(tmp_path, upstream.url))
    client = await make_client(settings, store=redis_store)
    body = {
        "model": "tiered-llm",
        "messages": [{"role": "user", "content": "word " * 700}],
        "max_tokens": 20,
    }
    estimate = Tokenizer().estimate(Endpoint.CHAT, body)
    assert estimate < 1000 < Tokenizer().bound_prompt(Endpoint.CHAT, body).tokens
    upstream.gate = asyncio.Event()
    task = asyncio.create_task(client.post("/v1/chat/completions", json=body, headers=auth()))
    await asyncio.wait_for(upstream.arrived.wait(), 5)
    held = (await spent(redis_store))[1]
    upstream.gate.set()
    assert (await task).status == 200
    # Held at the base price ($1 / $2 per 1M), on the count.
    assert held == (Decimal(estimate * 1 + 20 * 2) / 10**6)

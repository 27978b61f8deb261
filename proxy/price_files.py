"""Price tables in LiteLLM's ``model_prices_and_context_window.json`` format.

    >>> file = parse_price_file(
    ...     '{"gemini/gemini-2.5-pro": {"mode": "chat", "input_cost_per_token": 1.25e-06,'
    ...     ' "output_cost_per_token": 1e-05, "input_cost_per_token_above_200k_tokens": 2.5e-06,'
    ...     ' "output_cost_per_token_above_200k_tokens": 1.5e-05, "max_input_tokens": 1048576}}',
    ...     source="prices.json",
    ... )
    >>> price = file.prices["gemini-2.5-pro"]  # the bare name matches the prefixed entry
    >>> price.input_per_mtok, price.output_per_mtok
    (Decimal('1.25'), Decimal('10'))
    >>> price_at_prompt_size(price, file.tiers["gemini-2.5-pro"], 250_000).input_per_mtok
    Decimal('2.5')
    >>> prices, tiers, sources = merge_price_files([file])
    >>> sources["gemini-2.5-pro"]
    'prices.json'

The file is a JSON object mapping model names to entries; LiteLLM's prices are USD per
token, capproxy's USD per 1M tokens. The JSON is parsed with ``Decimal`` floats and scaled
by moving the decimal point, so ``2.5e-06`` becomes exactly ``2.5``: no float ever holds
a price.

Fields read (any other field is ignored, as LiteLLM adds fields often):

* ``input_cost_per_token`` (required), ``output_cost_per_token``,
  ``cache_read_input_token_cost`` (the cached input price).
* ``output_cost_per_reasoning_token``: when dearer than ``output_cost_per_token``, it is
  the output price, so that a hold (output tokens x output price) stays an upper bound
  whatever share of the output is reasoning. Its presence, or ``supports_reasoning``,
  marks the model ``reasoning`` (its output cannot be counted from the text it returns).
* ``cache_creation_input_token_cost``: capproxy bills no cache writes, so the input
  price is left as it is and the cache write price is only recorded, in
  ``PriceFile.cache_write_per_mtok``.
* ``max_input_tokens``; ``max_output_tokens``, else the legacy ``max_tokens`` (which
  LiteLLM uses for the output limit). ``0`` or ``null`` means not stated.
* ``{input_cost_per_token,output_cost_per_token,cache_read_input_token_cost}_above_<N>k_tokens``
  (also ``<N>m``): prices for prompts of more than N thousand (million) tokens, as
  ``SizeTier`` s. A tier that names no input or output price has the base one; one that
  names no cached price bills cached tokens at its input price (never under the real
  price). ``cache_creation_input_token_cost_above_*`` is checked, and not kept.

Entries loaded: ``mode`` ``chat``, ``completion``, ``responses``, ``embedding`` or no
mode, with an ``input_cost_per_token`` (and, except embeddings, an output price: a
model whose output is unpriced is never free). The rest (images, audio, rerank, ...,
and the ``sample_spec`` key documenting the format) are skipped and counted.

Provider prefixes: ``groq/llama3-70b-8192`` also prices ``llama3-70b-8192``, and
``openrouter/anthropic/claude-3.5-sonnet`` also ``anthropic/claude-3.5-sonnet`` and
``claude-3.5-sonnet``. An entry of the exact name always wins; otherwise the entry with
the fewest segments stripped does. Entries tied there that price differently leave the
name unpriced (``PriceFile.ambiguous``): which provider serves it is unknown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from proxy.pricing import MAX_PER_MTOK, ModelPrice
from proxy.usage import MAX_TOKENS

SAMPLE_SPEC = "sample_spec"
PRICED_MODES = frozenset({"chat", "completion", "responses", "embedding"})

_INPUT = "input_cost_per_token"
_OUTPUT = "output_cost_per_token"
_CACHE_READ = "cache_read_input_token_cost"
_CACHE_WRITE = "cache_creation_input_token_cost"
_REASONING = "output_cost_per_reasoning_token"
_TIER_FIELD = re.compile(
    r"^(?P<kind>input_cost_per_token|output_cost_per_token|cache_read_input_token_cost"
    r"|cache_creation_input_token_cost)_above_(?P<count>\d{1,9})(?P<unit>[km])_tokens$"
)
_UNITS = {"k": 1_000, "m": 1_000_000}
_MICRO_EXPONENT = 6  # USD per token -> USD per 1M tokens


class PriceFileError(ValueError):
    """A price file that cannot be read or holds a malformed entry; the message names
    the file, and the model and field where there is one."""


@dataclass(frozen=True)
class SizeTier:
    """USD per 1M tokens for prompts of more than ``above_tokens`` tokens.

        SizeTier(above_tokens=200_000, input_per_mtok=Decimal("2.5"),
                 output_per_mtok=Decimal("15"), cached_input_per_mtok=Decimal("0.625"))

    ``cached_input_per_mtok`` ``None``: cached input pays this tier's input price.
    """

    above_tokens: int
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None


@dataclass(frozen=True, kw_only=True)
class PriceFile:
    """The prices one file gives, by model name (prefixed names and their bare aliases).

        file = load_price_file(Path("model_prices_and_context_window.json"))
        price = file.prices.get("claude-3-5-sonnet-20241022")
        held = price_at_prompt_size(price, file.tiers.get(model, ()), prompt_tokens)

    ``tiers``: prompt size tiers, lowest threshold first, for models that have any.
    ``cache_write_per_mtok``: cache write prices (informative: capproxy bills none).
    ``skipped``: top-level keys not loaded (``sample_spec``, unpriced or non-text
    models). ``ambiguous``: bare names left unpriced because providers disagree.
    """

    path: str
    prices: Mapping[str, ModelPrice]
    tiers: Mapping[str, tuple[SizeTier, ...]]
    skipped: int
    cache_write_per_mtok: Mapping[str, Decimal] = field(default_factory=dict)
    ambiguous: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Entry:
    price: ModelPrice
    tiers: tuple[SizeTier, ...]
    cache_write: Decimal | None


# --- parsing ------------------------------------------------------------------------


def load_price_file(path: Path) -> PriceFile:
    """Read and parse the price file at ``path`` (see ``parse_price_file``)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PriceFileError(f"{path}: cannot read the price file: {exc}") from exc
    return parse_price_file(data, source=str(path))


def parse_price_file(text: str | bytes, *, source: str) -> PriceFile:
    """The prices in ``text``, a LiteLLM-format JSON object; ``source`` names it in
    errors and becomes ``PriceFile.path``. Raises ``PriceFileError``."""
    try:
        document = json.loads(text, parse_float=Decimal, parse_constant=Decimal)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise PriceFileError(f"{source}: not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise PriceFileError(
            f"{source}: a price file is a JSON object of models, not {_kind(document)}"
        )
    exact: dict[str, _Entry] = {}
    skipped = 0
    for name, raw in document.items():
        entry = None if name == SAMPLE_SPEC else _parse_entry(raw, source=source, model=name)
        if entry is None:
            skipped += 1
        else:
            exact[name] = entry
    entries, ambiguous = _with_bare_names(exact)
    return PriceFile(
        path=source,
        prices={name: e.price for name, e in entries.items()},
        tiers={name: e.tiers for name, e in entries.items() if e.tiers},
        skipped=skipped,
        cache_write_per_mtok={
            name: e.cache_write for name, e in entries.items() if e.cache_write is not None
        },
        ambiguous=ambiguous,
    )


def _parse_entry(raw: object, *, source: str, model: str) -> _Entry | None:
    """``raw``'s price, or ``None`` for an entry that is not a priced text model."""
    where = f"{source}: model {model!r}"
    if not model:
        raise PriceFileError(f"{source}: a model name is empty")
    if not isinstance(raw, dict):
        raise PriceFileError(f"{where}: an entry is a JSON object, not {_kind(raw)}")
    mode = raw.get("mode")
    if mode is not None and not isinstance(mode, str):
        raise PriceFileError(f"{where}: field 'mode': not a string: {mode!r}")
    if mode is not None and mode not in PRICED_MODES:
        return None
    costs = _Costs(raw, where)
    input_ = costs.get(_INPUT)
    output = costs.get(_OUTPUT)
    reasoning_output = costs.get(_REASONING)
    cached = costs.get(_CACHE_READ)
    cache_write = costs.get(_CACHE_WRITE)
    tier_costs = _parse_tiers(raw, costs)
    supports_reasoning = raw.get("supports_reasoning")
    if supports_reasoning is not None and not isinstance(supports_reasoning, bool):
        raise PriceFileError(
            f"{where}: field 'supports_reasoning': not true or false: {supports_reasoning!r}"
        )
    max_input = _max_tokens(raw, "max_input_tokens", where)
    max_output = _max_tokens(raw, "max_output_tokens", where)
    legacy_max = _max_tokens(raw, "max_tokens", where)
    if input_ is None:
        return None
    if reasoning_output is not None and (output is None or reasoning_output > output):
        output = reasoning_output
    if output is None:
        if mode != "embedding":
            return None  # an unpriced output is never free
        output = Decimal(0)
    tiers = tuple(
        SizeTier(
            above_tokens=above,
            input_per_mtok=input_ if t_input is None else t_input,
            output_per_mtok=max(
                output if t_output is None else t_output, reasoning_output or Decimal(0)
            ),
            cached_input_per_mtok=t_cached,
        )
        for above, (t_input, t_output, t_cached) in sorted(tier_costs.items())
    )
    try:
        price = ModelPrice(
            input_per_mtok=input_,
            cached_input_per_mtok=cached,
            output_per_mtok=output,
            max_input_tokens=max_input,
            max_output_tokens=max_output if max_output is not None else legacy_max,
            reasoning=bool(supports_reasoning) or reasoning_output is not None,
        )
    except ValidationError as exc:  # every field is checked above; kept as a backstop
        raise PriceFileError(f"{where}: {exc}") from exc
    return _Entry(price=price, tiers=tiers, cache_write=cache_write)


_TierCosts = tuple[Decimal | None, Decimal | None, Decimal | None]  # input, output, cached


def _parse_tiers(raw: Mapping[str, Any], costs: _Costs) -> dict[int, _TierCosts]:
    tiers: dict[int, _TierCosts] = {}
    for name in raw:
        match = _TIER_FIELD.match(name)
        if match is None:
            continue
        cost = costs.get(name)
        if cost is None:
            continue
        kind = match["kind"]
        if kind == _CACHE_WRITE:
            continue  # checked, not kept: capproxy bills no cache writes
        above = int(match["count"]) * _UNITS[match["unit"]]
        t_input, t_output, t_cached = tiers.get(above, (None, None, None))
        if kind == _INPUT:
            t_input = cost
        elif kind == _OUTPUT:
            t_output = cost
        else:
            t_cached = cost
        tiers[above] = (t_input, t_output, t_cached)
    return tiers


class _Costs:
    """Reads an entry's USD-per-token fields as exact USD per 1M tokens."""

    def __init__(self, raw: Mapping[str, Any], where: str) -> None:
        self._raw = raw
        self._where = where

    def get(self, name: str) -> Decimal | None:
        value = self._raw.get(name)
        if value is None:
            return None
        place = f"{self._where}: field {name!r}"
        if isinstance(value, bool) or not isinstance(value, int | Decimal):
            raise PriceFileError(f"{place}: not a number: {value!r}")
        cost = Decimal(value)
        if not cost.is_finite():
            raise PriceFileError(f"{place}: not a finite number: {value}")
        if cost < 0:
            raise PriceFileError(f"{place}: a cost cannot be negative: {value}")
        per_mtok = _per_mtok(cost)
        if per_mtok > MAX_PER_MTOK:
            raise PriceFileError(
                f"{place}: {value} USD per token is {per_mtok} per 1M tokens, "
                f"above the most capproxy accepts ({MAX_PER_MTOK})"
            )
        return per_mtok


def _per_mtok(per_token: Decimal) -> Decimal:
    """``per_token`` x 1_000_000, exactly: the decimal point moves, no digit is rounded."""
    if per_token == 0:
        return Decimal(0)
    sign, digits, exponent = per_token.as_tuple()
    assert isinstance(exponent, int)  # a finite number
    scaled = Decimal((sign, digits, exponent + _MICRO_EXPONENT))
    if exponent + _MICRO_EXPONENT > 0 and scaled <= MAX_PER_MTOK:
        return Decimal(int(scaled))  # "3" rather than "3E+1" for a whole number
    return scaled


def _max_tokens(raw: Mapping[str, Any], name: str, where: str) -> int | None:
    value = raw.get(name)
    if value is None:
        return None
    place = f"{where}: field {name!r}"
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise PriceFileError(f"{place}: not a whole number of tokens: {value!r}")
    if isinstance(value, Decimal):
        if not value.is_finite() or value != value.to_integral_value():
            raise PriceFileError(f"{place}: not a whole number of tokens: {value}")
        if value > MAX_TOKENS:
            raise PriceFileError(f"{place}: {value} is above the most tokens counted")
        value = int(value)
    if value < 0:
        raise PriceFileError(f"{place}: a token count cannot be negative: {value}")
    if value > MAX_TOKENS:
        raise PriceFileError(f"{place}: {value} is above the most tokens counted")
    return value or None  # 0: not stated


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


# --- provider prefixes ----------------------------------------------------------------


def _bare_names(model: str) -> list[str]:
    """``a/b/c`` -> ``["b/c", "c"]``: the names with leading provider segments stripped."""
    parts = model.split("/")
    return ["/".join(parts[i:]) for i in range(1, len(parts)) if all(parts[i:])]


def _with_bare_names(exact: Mapping[str, _Entry]) -> tuple[dict[str, _Entry], tuple[str, ...]]:
    """``exact`` plus each prefixed entry under its bare names (see the module docstring)."""
    candidates: dict[str, tuple[int, list[_Entry]]] = {}
    for model, entry in exact.items():
        for depth, bare in enumerate(_bare_names(model), start=1):
            if bare in exact:
                continue
            best = candidates.get(bare)
            if best is None or depth < best[0]:
                candidates[bare] = (depth, [entry])
            elif depth == best[0]:
                best[1].append(entry)
    entries = dict(exact)
    ambiguous: list[str] = []
    for bare, (_, found) in candidates.items():
        if all(e == found[0] for e in found[1:]):
            entries[bare] = found[0]
        else:
            ambiguous.append(bare)
    return entries, tuple(sorted(ambiguous))


# --- using the prices -----------------------------------------------------------------


def price_at_prompt_size(
    price: ModelPrice, tiers: Sequence[SizeTier], prompt_tokens: int
) -> ModelPrice:
    """The price that applies to a prompt of ``prompt_tokens`` tokens: that of the
    highest tier whose threshold the prompt exceeds (more than ``above_tokens``), else
    ``price`` itself.

    A tiered price keeps ``price``'s limits and tier multipliers but not its explicit
    ``priority``/``flex`` prices, which are for the base size: priority is then held at
    its multiplier (twice by default) of the tier price, flex at the tier price.
    """
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 0:
        raise ValueError(f"prompt_tokens must be a non-negative int, got {prompt_tokens!r}")
    applies = [t for t in tiers if prompt_tokens > t.above_tokens]
    if not applies:
        return price
    tier = max(applies, key=lambda t: t.above_tokens)
    return price.model_copy(
        update={
            "input_per_mtok": tier.input_per_mtok,
            "cached_input_per_mtok": tier.cached_input_per_mtok,
            "output_per_mtok": tier.output_per_mtok,
            "priority": None,
            "flex": None,
        }
    )


def merge_price_files(
    files: Sequence[PriceFile],
) -> tuple[dict[str, ModelPrice], dict[str, tuple[SizeTier, ...]], dict[str, str]]:
    """The prices, size tiers and source path of each model over ``files``: for a name
    several files price, the last file's entry wins whole (its tiers, or its having
    none, included)."""
    prices: dict[str, ModelPrice] = {}
    tiers: dict[str, tuple[SizeTier, ...]] = {}
    sources: dict[str, str] = {}
    for file in files:
        for name, price in file.prices.items():
            prices[name] = price
            sources[name] = file.path
            file_tiers = file.tiers.get(name)
            if file_tiers:
                tiers[name] = file_tiers
            else:
                tiers.pop(name, None)
    return prices, tiers, sources

"""Model and hosted-tool prices, and exact cost arithmetic in integer micro-USD.

    >>> table = PriceTable()
    >>> price = table.lookup("gpt-4o-2024-08-06")  # a dated snapshot prices as "gpt-4o"
    >>> cost_micros(Usage(prompt_tokens=1_000_000, cached_tokens=0,
    ...                   completion_tokens=0, reasoning_tokens=0), price)
    2500000
    >>> estimate_micros(1_000_000, 0, hold_price(price, "priority"))  # the hold: $4.25/M
    4250000
    >>> charge_micros(Usage(prompt_tokens=1_000_000, cached_tokens=0, completion_tokens=0,
    ...                     reasoning_tokens=0, service_tier="priority",
    ...                     tool_calls=(("web_search", 2),)), price, table.tool_prices)
    4300000

A price is USD per 1M tokens, so ``tokens x price`` is micro-USD exactly. All arithmetic
is exact ``Decimal`` in a context that traps any rounding, never floats; only the final
total is rounded, and the store counts whole micro-USD. Charges round up (a call is never
under-charged) and limits round down (a limit never grows), so rounding always errs
towards spending less than the cap allows.

Service tiers: the upstream may serve a request at the ``priority`` or ``flex`` tier, at
other prices. ``hold_price`` is the dearest price a request can land on (for the hold,
before forwarding); ``tier_price`` is the price of the tier the response reports (for the
charge). A model with no priority price is held and charged at twice its standard price;
one with no flex price is charged flex at its standard price (flex is never dearer).

Hosted tools (web search, file search, code interpreter, ...) are billed per call on top
of tokens: ``tool_call_micros``. An unpriced hosted tool is never free.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from decimal import ROUND_CEILING, ROUND_FLOOR, Context, Decimal, Inexact, InvalidOperation
from types import MappingProxyType

from pydantic import BaseModel, ConfigDict, Field

from proxy.usage import Usage

MAX_PER_MTOK = Decimal(1000)
MAX_TIER_MULTIPLIER = Decimal(10)
MAX_PER_CALL_USD = Decimal(1000)
MICROS_PER_USD = 1_000_000
# What priority costs, relative to standard, for a model whose price names no priority
# price or multiplier. OpenAI's published priority prices are 1.7x-2x standard.
DEFAULT_PRIORITY_MULTIPLIER = Decimal(2)

PRIORITY = "priority"
FLEX = "flex"
# Tiers a response may report that bill at the standard price. "scale" is prepaid Scale
# Tier capacity: charging it at the standard price over-states, never under-states it.
_STANDARD_TIERS = frozenset({"", "auto", "default", "standard", "scale"})


class TierPrice(BaseModel):
    """USD per 1M tokens at one service tier (``priority`` or ``flex`` of a ``ModelPrice``).

    ``cached_input_per_mtok`` ``None``: cached input pays this tier's input price."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok: Decimal = Field(ge=0, le=MAX_PER_MTOK)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0, le=MAX_PER_MTOK)
    output_per_mtok: Decimal = Field(default=Decimal(0), ge=0, le=MAX_PER_MTOK)


class ModelPrice(BaseModel):
    """USD per 1M tokens for one model (the ``pricing.models`` entries of the caps file).

        ModelPrice(input_per_mtok=Decimal("1.25"), cached_input_per_mtok=Decimal("0.125"),
                   output_per_mtok=Decimal("10"), reasoning=True, max_input_tokens=272_000,
                   priority=TierPrice(...), flex_multiplier=Decimal("0.5"))

    The top-level prices are the standard tier. ``priority``/``flex`` give a tier's prices
    outright; ``priority_multiplier``/``flex_multiplier`` scale the standard prices instead
    (an explicit tier price wins over a multiplier). ``reasoning``: the model bills hidden
    reasoning tokens, so its output cannot be counted from the text it returns.
    ``max_input_tokens``: its input context, the most input one call can bill.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok: Decimal = Field(ge=0, le=MAX_PER_MTOK)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0, le=MAX_PER_MTOK)
    output_per_mtok: Decimal = Field(default=Decimal(0), ge=0, le=MAX_PER_MTOK)
    max_output_tokens: int | None = Field(default=None, gt=0)
    max_input_tokens: int | None = Field(default=None, gt=0)
    reasoning: bool = False
    priority: TierPrice | None = None
    flex: TierPrice | None = None
    priority_multiplier: Decimal | None = Field(default=None, ge=0, le=MAX_TIER_MULTIPLIER)
    flex_multiplier: Decimal | None = Field(default=None, ge=0, le=MAX_TIER_MULTIPLIER)


class ToolPrice(BaseModel):
    """USD per call of one hosted tool (``pricing.tools`` entries of the caps file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    per_call_usd: Decimal = Field(ge=0, le=MAX_PER_CALL_USD)


def _tier(input_: str, cached: str | None, output: str) -> TierPrice:
    return TierPrice(
        input_per_mtok=Decimal(input_),
        cached_input_per_mtok=None if cached is None else Decimal(cached),
        output_per_mtok=Decimal(output),
    )


def _price(
    input_: str,
    cached: str | None,
    output: str,
    max_output: int | None = None,
    *,
    max_input: int,
    reasoning: bool = False,
) -> ModelPrice:
    return ModelPrice(
        input_per_mtok=Decimal(input_),
        cached_input_per_mtok=None if cached is None else Decimal(cached),
        output_per_mtok=Decimal(output),
        max_output_tokens=max_output,
        max_input_tokens=max_input,
        reasoning=reasoning,
    )


# OpenAI list prices, USD per 1M tokens: input, cached input, output, and the model's max
# output tokens; ``max_input`` is its input context and ``reasoning`` whether it bills
# hidden reasoning tokens. Standard tier as of 2025-08 (the GPT-5 launch price list on
# openai.com/api/pricing and platform.openai.com/docs/pricing, including its "legacy
# models" table); context sizes from each model's page on platform.openai.com/docs/models.
# Batch is not modelled (the proxy meters no batch endpoint). Operators override any
# entry (or add models) with ``pricing.models`` in the caps file.
#
# Snapshots priced differently from their alias are listed explicitly, so that the
# snapshot -> alias fallback in ``PriceTable.lookup`` never under-prices them.
_GPT5 = 272_000  # a 400k context, of which 128k is kept for output
_O_SERIES = 200_000
_GPT41 = 1_047_576
_STANDARD: dict[str, ModelPrice] = {
    # GPT-5 family
    "gpt-5": _price("1.25", "0.125", "10.00", 128_000, max_input=_GPT5, reasoning=True),
    "gpt-5-mini": _price("0.25", "0.025", "2.00", 128_000, max_input=_GPT5, reasoning=True),
    "gpt-5-nano": _price("0.05", "0.005", "0.40", 128_000, max_input=_GPT5, reasoning=True),
    "gpt-5-chat-latest": _price("1.25", "0.125", "10.00", 16_384, max_input=128_000),
    "gpt-5-pro": _price("15.00", None, "120.00", 272_000, max_input=_GPT5, reasoning=True),
    # GPT-4.1 family
    "gpt-4.1": _price("2.00", "0.50", "8.00", 32_768, max_input=_GPT41),
    "gpt-4.1-mini": _price("0.40", "0.10", "1.60", 32_768, max_input=_GPT41),
    "gpt-4.1-nano": _price("0.10", "0.025", "0.40", 32_768, max_input=_GPT41),
    # GPT-4o family
    "gpt-4o": _price("2.50", "1.25", "10.00", 16_384, max_input=128_000),
    "gpt-4o-2024-05-13": _price("5.00", None, "15.00", 4_096, max_input=128_000),
    "gpt-4o-mini": _price("0.15", "0.075", "0.60", 16_384, max_input=128_000),
    # o-series reasoning models
    "o1": _price("15.00", "7.50", "60.00", 100_000, max_input=_O_SERIES, reasoning=True),
    "o3": _price("2.00", "0.50", "8.00", 100_000, max_input=_O_SERIES, reasoning=True),
    "o3-mini": _price("1.10", "0.55", "4.40", 100_000, max_input=_O_SERIES, reasoning=True),
    "o1-mini": _price("1.10", "0.55", "4.40", 65_536, max_input=128_000, reasoning=True),
    "o1-pro": _price("150.00", None, "600.00", 100_000, max_input=_O_SERIES, reasoning=True),
    "o3-pro": _price("20.00", None, "80.00", 100_000, max_input=_O_SERIES, reasoning=True),
    "o4-mini": _price("1.10", "0.275", "4.40", 100_000, max_input=_O_SERIES, reasoning=True),
    # Legacy chat models
    "gpt-4-turbo": _price("10.00", None, "30.00", 4_096, max_input=128_000),
    "gpt-4-0125-preview": _price("10.00", None, "30.00", 4_096, max_input=128_000),
    "gpt-4-1106-preview": _price("10.00", None, "30.00", 4_096, max_input=128_000),
    "gpt-4": _price("30.00", None, "60.00", 8_192, max_input=8_192),
    "gpt-3.5-turbo": _price("0.50", None, "1.50", 4_096, max_input=16_385),
    "gpt-3.5-turbo-1106": _price("1.00", None, "2.00", 4_096, max_input=16_385),
    "gpt-3.5-turbo-0613": _price("1.50", None, "2.00", 4_096, max_input=4_096),
    # Legacy completions models
    "gpt-3.5-turbo-instruct": _price("1.50", None, "2.00", 4_096, max_input=4_096),
    "davinci-002": _price("2.00", None, "2.00", max_input=16_384),
    "babbage-002": _price("0.40", None, "0.40", max_input=16_384),
    # Embeddings (input only)
    "text-embedding-3-small": _price("0.02", None, "0", max_input=8_191),
    "text-embedding-3-large": _price("0.13", None, "0", max_input=8_191),
    "text-embedding-ada-002": _price("0.10", None, "0", max_input=8_191),
}

# Priority processing, from openai.com/api-priority-processing (1.7x-2x standard). A model
# not listed there is held and charged at DEFAULT_PRIORITY_MULTIPLIER x standard.
_PRIORITY: dict[str, TierPrice] = {
    "gpt-5": _tier("2.50", "0.25", "20.00"),
    "gpt-5-mini": _tier("0.45", "0.045", "3.60"),
    "gpt-4.1": _tier("3.50", "0.875", "14.00"),
    "gpt-4.1-mini": _tier("0.70", "0.175", "2.80"),
    "gpt-4.1-nano": _tier("0.20", "0.05", "0.80"),
    "gpt-4o": _tier("4.25", "2.125", "17.00"),
    "gpt-4o-2024-05-13": _tier("8.75", None, "26.25"),
    "gpt-4o-mini": _tier("0.25", "0.125", "1.00"),
    "o3": _tier("3.50", "0.875", "14.00"),
    "o4-mini": _tier("2.00", "0.50", "8.00"),
}

# Flex processing (the pricing page's "Flex" tab): half of standard, for o3, o4-mini and
# the GPT-5 reasoning models. o4-mini's cached price is published rounded up ($0.138 for
# 0.1375) and is kept so. A model not listed is charged flex at its standard price.
_FLEX: dict[str, TierPrice] = {
    "gpt-5": _tier("0.625", "0.0625", "5.00"),
    "gpt-5-mini": _tier("0.125", "0.0125", "1.00"),
    "gpt-5-nano": _tier("0.025", "0.0025", "0.20"),
    "o3": _tier("1.00", "0.25", "4.00"),
    "o4-mini": _tier("0.55", "0.138", "2.20"),
}

BUILTIN_PRICES: Mapping[str, ModelPrice] = MappingProxyType(
    {
        name: price.model_copy(update={"priority": _PRIORITY.get(name), "flex": _FLEX.get(name)})
        for name, price in _STANDARD.items()
    }
)


def _tool(usd: str) -> ToolPrice:
    return ToolPrice(per_call_usd=Decimal(usd))


# OpenAI hosted tools, USD per call (openai.com/api/pricing, "Built-in tools"):
# * web search: $10 / 1k calls for ``web_search`` and for ``web_search_preview`` on
#   reasoning models, $25 / 1k for ``web_search_preview`` on other models. Both tool
#   types count as "web_search", so it is priced at the dearer $25 / 1k. Search content
#   tokens are billed as input tokens and are in the response's usage.
# * file search: $2.50 / 1k calls (storage is billed per day, outside any request).
# * code interpreter: per container session (20 minutes), by the container's memory:
#   1 GB $0.03, 4 GB $0.12, 16 GB $0.48, 64 GB $1.92. Priced per call, which over-states
#   several calls in one container. ``PriceTable.tool_prices_for`` picks the request's size.
# * image generation is not listed: its image-model tokens are not in the response's usage
#   and depend on an image model the request need not name, so there is no sound bound
#   per call. Unpriced, it costs the dearest known per-call price (see tool_call_micros);
#   set ``pricing.tools.image_generation`` to price it.
CODE_INTERPRETER = "code_interpreter"
BUILTIN_TOOL_PRICES: Mapping[str, ToolPrice] = MappingProxyType(
    {
        "web_search": _tool("0.025"),
        "web_search_preview": _tool("0.025"),  # the tool type's own name, for overrides
        "file_search": _tool("0.0025"),
        CODE_INTERPRETER: _tool("0.03"),  # a 1 GB container, the default
        "code_interpreter_4g": _tool("0.12"),
        "code_interpreter_16g": _tool("0.48"),
        "code_interpreter_64g": _tool("1.92"),
    }
)

# One snapshot suffix: "-2024-08-06", "-0613" (a month-day) or "-preview".
_SNAPSHOT_SUFFIX = re.compile(
    r"-(?:\d{4}-\d{2}-\d{2}|(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])|preview)$"
)


# Real snapshot names carry at most two suffixes ("-0125-preview"); stopping early keeps a
# hostile name from costing more than a few regex scans.
_MAX_SUFFIXES = 3


def _base_names(model: str) -> list[str]:
    """The names a snapshot falls back to, nearest first (``gpt-4-0125-preview`` ->
    ``gpt-4-0125``, ``gpt-4``). Only whole trailing suffixes are stripped, never an
    arbitrary prefix match, so ``gpt-4o-mini-x`` never resolves to ``gpt-4o``."""
    names: list[str] = []
    for _ in range(_MAX_SUFFIXES):
        base = _SNAPSHOT_SUFFIX.sub("", model, count=1)
        if base == model or not base:
            break
        names.append(base)
        model = base
    return names


_MAX_REMEMBERED = 1024  # model names whose price lookup is remembered


class PriceTable:
    """Resolves a request's ``model`` to its price, and hosted tools to theirs.

        table = PriceTable(overrides=settings.pricing.models, tools=settings.pricing.tools)
        price = table.lookup(body["model"])
        if price is None:
            raise ModelNotPriced(...)  # an unknown model is never free
        tool_prices = table.tool_prices_for(container_memory="4g")

    Order: exact override, exact price-file entry, exact built-in, then the snapshot's base
    name (override, price file, built-in, nearest base first), then ``default``, else
    ``None``. Tool overrides replace the built-in price of the same name.
    """

    def __init__(
        self,
        *,
        overrides: Mapping[str, ModelPrice] | None = None,
        default: ModelPrice | None = None,
        tools: Mapping[str, ToolPrice] | None = None,
        files: Mapping[str, ModelPrice] | None = None,
    ) -> None:
        self._overrides: Mapping[str, ModelPrice] = dict(overrides or {})
        self._found: dict[str, tuple[str, ModelPrice, str] | None] = {}
        self._files: Mapping[str, ModelPrice] = dict(files or {})
        self._default = default
        self._tools: Mapping[str, ToolPrice] = MappingProxyType(
            {**BUILTIN_TOOL_PRICES, **(tools or {})}
        )

    def lookup(self, model: str) -> ModelPrice | None:
        """The price of ``model``, or ``None`` if it is not priced (never ``$0``)."""
        found = self.find(model)
        return found[1] if found is not None else None

    def find(self, model: str) -> tuple[str, ModelPrice, str] | None:
        """``(entry name, price, where from)`` for ``model``: where from is ``caps file``
        (``pricing.models``), ``price file``, ``built-in`` or ``default``. Answers are
        remembered (a bounded number of model names; the table never changes)."""
        try:
            return self._found[model]
        except KeyError:
            pass
        if len(self._found) >= _MAX_REMEMBERED:
            self._found.clear()
        found = self._found[model] = self._find(model)
        return found

    def _find(self, model: str) -> tuple[str, ModelPrice, str] | None:
        for name in (model, *_base_names(model)):
            for table, origin in (
                (self._overrides, "caps file"),
                (self._files, "price file"),
                (BUILTIN_PRICES, "built-in"),
            ):
                price = table.get(name)
                if price is not None:
                    return name, price, origin
        return (model, self._default, "default") if self._default is not None else None

    @property
    def tool_prices(self) -> Mapping[str, ToolPrice]:
        """Per-call prices by hosted tool name: the built-ins with the overrides on top."""
        return self._tools

    def tool_prices_for(self, *, container_memory: str | None) -> Mapping[str, ToolPrice]:
        """``tool_prices`` with ``code_interpreter`` priced for a request's container size
        (``usage.container_memory``: ``"1g"``, ``"4g"``, ``"16g"``, ``"64g"``).

        A size with its own entry (``code_interpreter_4g``) prices ``code_interpreter``;
        an unknown size, the dearest ``code_interpreter*`` entry. ``None`` and ``"1g"``
        leave ``code_interpreter`` as it is.
        """
        if container_memory is None or container_memory == "1g":
            return self._tools
        sized = self._tools.get(f"{CODE_INTERPRETER}_{container_memory}")
        if sized is None:
            sized = max(
                (p for n, p in self._tools.items() if n.startswith(CODE_INTERPRETER)),
                key=lambda p: p.per_call_usd,
                default=_dearest(self._tools),
            )
        return MappingProxyType({**self._tools, CODE_INTERPRETER: sized})


# Token counts stay below 2**40 and prices below 1000 x MAX_TIER_MULTIPLIER with few
# decimals: 60 significant digits hold every product and sum here exactly, so nothing is
# rounded but the final ceil (an amount that would need more raises instead).
_EXACT = Context(prec=60, rounding=ROUND_CEILING, traps=[InvalidOperation, Inexact])


def _exact(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError(f"not a finite amount: {value}")
    return value


# Prices as exact integer ratios (numerator, denominator), by value: token costs are summed
# in integers. Prices come from the caps file and price files: bounded, but cleared past this.
_RATIOS: dict[Decimal, tuple[int, int]] = {}
MAX_REMEMBERED_RATIOS = 4096


def _ratio(value: Decimal) -> tuple[int, int]:
    found = _RATIOS.get(_exact(value))
    if found is None:
        found = value.as_integer_ratio()
        if len(_RATIOS) >= MAX_REMEMBERED_RATIOS:
            _RATIOS.clear()
        _RATIOS[value] = found
    return found


def _ceil(total: Decimal) -> int:
    return int(total.to_integral_value(rounding=ROUND_CEILING))


def _check_tokens(**counts: int) -> None:
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{name} must be a non-negative int, got {count!r}")


# --- service tiers ------------------------------------------------------------------


def _flat(
    price: ModelPrice, input_: Decimal, cached: Decimal | None, output: Decimal
) -> ModelPrice:
    """``price`` at other token prices, with no tier information left to apply twice."""
    return price.model_copy(
        update={
            "input_per_mtok": input_,
            "cached_input_per_mtok": cached,
            "output_per_mtok": output,
            "priority": None,
            "flex": None,
            "priority_multiplier": None,
            "flex_multiplier": None,
        }
    )


def _scaled(price: ModelPrice, multiplier: Decimal) -> ModelPrice:
    mul = _EXACT.multiply
    m = _exact(multiplier)
    cached = price.cached_input_per_mtok
    return _flat(
        price,
        mul(_exact(price.input_per_mtok), m),
        None if cached is None else mul(_exact(cached), m),
        mul(_exact(price.output_per_mtok), m),
    )


def _explicit(price: ModelPrice, tier: TierPrice) -> ModelPrice:
    return _flat(price, tier.input_per_mtok, tier.cached_input_per_mtok, tier.output_per_mtok)


def _priority(price: ModelPrice) -> ModelPrice:
    if price.priority is not None:
        return _explicit(price, price.priority)
    multiplier = price.priority_multiplier
    return _scaled(price, DEFAULT_PRIORITY_MULTIPLIER if multiplier is None else multiplier)


def _flex(price: ModelPrice) -> ModelPrice:
    if price.flex is not None:
        return _explicit(price, price.flex)
    if price.flex_multiplier is not None:
        return _scaled(price, price.flex_multiplier)
    return price


def _cached_or_input(price: ModelPrice) -> Decimal:
    cached = price.cached_input_per_mtok
    return price.input_per_mtok if cached is None else cached


def _highest_of(price: ModelPrice, *others: ModelPrice) -> ModelPrice:
    """The component-wise maximum of prices: each of input, cached input (the input price
    where a price has no cached one) and output at its dearest."""
    prices = (price, *others)
    return _flat(
        price,
        max(p.input_per_mtok for p in prices),
        max(_cached_or_input(p) for p in prices),
        max(p.output_per_mtok for p in prices),
    )


def _highest(price: ModelPrice) -> ModelPrice:
    return _highest_of(price, _priority(price), _flex(price))


def tier_price(price: ModelPrice, tier: str | None) -> ModelPrice:
    """The price of ``price``'s model at the service tier a response reports.

    ``"priority"`` and ``"flex"`` are those tiers; ``None``, ``""``, ``"auto"``,
    ``"default"``, ``"standard"`` and ``"scale"`` are standard (``price`` itself). Any
    other tier is one the proxy does not know, so it is charged at the highest of the
    model's tiers (component-wise). A tier price carries no tier information itself.
    """
    if tier is None or tier in _STANDARD_TIERS:
        return price
    if tier == PRIORITY:
        return _priority(price)
    if tier == FLEX:
        return _flex(price)
    return _highest(price)


def hold_price(price: ModelPrice, requested_tier: object) -> ModelPrice:
    """The dearest price a request asking for ``requested_tier`` (its ``service_tier``)
    can be billed at, for the hold.

    ``"priority"``: the priority price. ``"flex"``: the dearer of flex and standard,
    component-wise (a flex request may be served at standard). Absent, ``null``,
    ``"auto"``, ``"default"`` and ``"scale"``: standard. Anything else: the highest tier.

    ``"auto"`` is held at standard because that is what a project's default tier is
    unless changed: a project whose default tier is priority must have its clients set
    ``service_tier``, or price the model at its priority price in ``pricing.models``.
    """
    if requested_tier is None or (
        isinstance(requested_tier, str) and requested_tier in _STANDARD_TIERS
    ):
        return price
    if requested_tier == PRIORITY:
        return _priority(price)
    if requested_tier == FLEX:
        return _highest_of(price, _flex(price))
    return _highest(price)


# --- tokens -------------------------------------------------------------------------


def billed_output_tokens(usage: Usage) -> int:
    """The output tokens ``usage`` bills: ``completion_tokens``, which includes reasoning
    on OpenAI. A server that reports more reasoning than completion tokens evidently
    counts them apart, so then both are billed."""
    if usage.reasoning_tokens > usage.completion_tokens:
        return usage.completion_tokens + usage.reasoning_tokens
    return usage.completion_tokens


def cost_micros(usage: Usage, price: ModelPrice) -> int:
    """What ``usage``'s tokens cost at ``price`` (as given: no tier applied, no tools), in
    whole micro-USD, rounded up.

    Uncached prompt tokens pay the input price, cached ones the cached price (the input
    price when the model has none), and the output tokens (``billed_output_tokens``,
    reasoning included) the output price. Rounding up means a call is never
    under-charged; a priced call that used any token costs at least 1 micro-USD.
    """
    _check_tokens(
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=usage.cached_tokens,
        completion_tokens=usage.completion_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    a, b = _ratio(price.input_per_mtok)
    c, d = (a, b) if price.cached_input_per_mtok is None else _ratio(price.cached_input_per_mtok)
    e, f = _ratio(price.output_per_mtok)
    # USD per 1M tokens is micro-USD per token: the sum over one denominator, rounded up.
    total = (
        (usage.prompt_tokens - cached) * a * d * f
        + cached * c * b * f
        + billed_output_tokens(usage) * e * b * d
    )
    return -(-total // (b * d * f))


def estimate_micros(prompt_tokens: int, output_tokens: int, price: ModelPrice) -> int:
    """The hold for a request's tokens, in whole micro-USD, rounded up.

    Every prompt token is held at the full input price (whether the prompt will hit
    the cache is unknown until the upstream answers) and ``output_tokens`` at the
    output price. Pass ``hold_price(...)`` as ``price`` so the hold covers the tier.
    """
    _check_tokens(prompt_tokens=prompt_tokens, output_tokens=output_tokens)
    a, b = _ratio(price.input_per_mtok)
    c, d = _ratio(price.output_per_mtok)
    return -(-(prompt_tokens * a * d + output_tokens * c * b) // (b * d))


# --- hosted tools -------------------------------------------------------------------


def _dearest(prices: Mapping[str, ToolPrice]) -> ToolPrice:
    return max(prices.values() or BUILTIN_TOOL_PRICES.values(), key=lambda p: p.per_call_usd)


def tool_call_micros(calls: Mapping[str, int], prices: Mapping[str, ToolPrice]) -> int:
    """What hosted tool ``calls`` (name -> count) cost, in whole micro-USD, rounded up.

    A tool with no entry in ``prices`` is never free: each of its calls costs the dearest
    per-call price in ``prices`` (in the built-in table if ``prices`` is empty).
    """
    if not calls:
        return 0
    _check_tokens(**{f"calls[{name!r}]": count for name, count in calls.items()})
    total = Decimal(0)
    dearest: ToolPrice | None = None
    for name, count in calls.items():
        if not count:
            continue
        price = prices.get(name)
        if price is None:
            if dearest is None:
                dearest = _dearest(prices)
            price = dearest
        per_call = _EXACT.multiply(_exact(price.per_call_usd), MICROS_PER_USD)
        total = _EXACT.add(total, _EXACT.multiply(count, per_call))
    return _ceil(total)


def charge_micros(
    usage: Usage,
    price: ModelPrice,
    tool_prices: Mapping[str, ToolPrice] | None = None,
    *,
    min_tool_calls: Mapping[str, int] | None = None,
) -> int:
    """What a call that reported ``usage`` is charged, in whole micro-USD: its tokens at
    the tier it was served at (``tier_price(price, usage.service_tier)``, with ``price``
    the model's standard price) plus its hosted tool calls.

    ``tool_prices``: per-call prices (``PriceTable.tool_prices_for``; the built-ins if
    ``None``). ``min_tool_calls``: calls the request is billed for whether or not the
    response itemises them (``usage.unreported_tool_calls``); each tool is charged for
    the larger of the two counts.
    """
    calls = dict(usage.tool_calls)
    for name, floor in (min_tool_calls or {}).items():
        calls[name] = max(calls.get(name, 0), floor)
    tokens = cost_micros(usage, tier_price(price, usage.service_tier))
    prices = BUILTIN_TOOL_PRICES if tool_prices is None else tool_prices
    return tokens + tool_call_micros(calls, prices)


# --- USD <-> micro-USD --------------------------------------------------------------


def usd_to_micros(usd: Decimal) -> int:
    """A USD limit in whole micro-USD, rounded down (a limit never rounds up).

    Computed over the exact value of ``usd``, so ``Decimal("0.1")`` is exactly 100000.
    """
    return int(_EXACT.multiply(_exact(usd), MICROS_PER_USD).to_integral_value(ROUND_FLOOR))


def usd_to_micros_up(usd: Decimal) -> int:
    """The least whole micro-USD amount at or above ``usd`` (exact, as ``usd_to_micros``)."""
    return int(_EXACT.multiply(_exact(usd), MICROS_PER_USD).to_integral_value(ROUND_CEILING))


def usd_text(micros: int) -> str:
    """Whole micro-USD as USD with six decimal places: ``str(micros_to_usd(micros))``,
    worked out on integers."""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{'-' if micros < 0 else ''}{whole}.{frac:06d}"


def micros_to_usd(micros: int) -> Decimal:
    """Whole micro-USD as an exact ``Decimal`` with six decimal places."""
    # The string constructor is exact: no context precision or rounding applies.
    return Decimal(f"{int(micros)}E-6")


def max_output_tokens(price: ModelPrice) -> int | None:
    """The model's output-token ceiling, if the price entry states one."""
    return price.max_output_tokens

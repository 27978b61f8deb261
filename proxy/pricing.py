"""Model prices (USD per 1M tokens) and exact cost arithmetic in integer micro-USD."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

MAX_PER_MTOK = Decimal(1000)


class ModelPrice(BaseModel):
    """USD per 1M tokens for one model (the ``pricing.models`` entries of the caps file)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input_per_mtok: Decimal = Field(ge=0, le=MAX_PER_MTOK)
    cached_input_per_mtok: Decimal | None = Field(default=None, ge=0, le=MAX_PER_MTOK)
    output_per_mtok: Decimal = Field(default=Decimal(0), ge=0, le=MAX_PER_MTOK)
    max_output_tokens: int | None = Field(default=None, gt=0)

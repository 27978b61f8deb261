"""What the store keeps besides the live counters: spend per hour and per day, and the
latest rejections, per tenant (for the dashboard and the spend API).

    hour, day = buckets(at=time.time(), tz=ZoneInfo("UTC"))   # bucket starts, epoch s
    history = await store.history("acme")                      # SpendHistory
    history.hours   # ((start, micros), ...) oldest first, the last HOURS_KEPT hours
    history.days    # ((start, micros), ...) oldest first, the last DAYS_KEPT days
    await store.note_rejection("acme", Rejection(time=t, agent="bot", model="gpt-4o",
                                                 code="budget_exceeded", windows=("daily",)))
    await store.rejections("acme")                              # newest first, at most 100

A settle adds its cost to the hour and the day it lands in (in the caps file's time zone;
an hour is the local hour), in the same store call; buckets older than what is kept are
trimmed when a new one starts, and a tenant's history expires when it spends nothing
for as long as it keeps. Rejections are a bounded list per tenant: the newest
``REJECTIONS_KEPT``, forgotten ``REJECTIONS_TTL_S`` after the last one. Neither holds
anything but ids, model names, error codes, window names and amounts.

Pure data and arithmetic: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from proxy.windows import Window, period_of

__all__ = [
    "DAYS_KEPT",
    "HOURS_KEPT",
    "REJECTIONS_KEPT",
    "REJECTIONS_TTL_S",
    "Rejection",
    "SpendHistory",
    "buckets",
    "cutoffs",
]

HOURS_KEPT = 48
DAYS_KEPT = 90
REJECTIONS_KEPT = 100
REJECTIONS_TTL_S = 7 * 86_400
HOUR_S = 3_600
DAY_S = 86_400
MAX_MODEL_CHARS = 128  # a rejected request's model name, as kept


@dataclass(frozen=True, slots=True)
class SpendHistory:
    """A tenant's settled spend per hour and per day: (bucket start, micro-USD), oldest
    first; buckets without spend are absent."""

    hours: tuple[tuple[int, int], ...] = ()
    days: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    """One request a cap refused (429): when, who, for what model, and why.

    ``windows`` names the budget windows that refused it, as ``"daily"`` for a
    tenant-wide window and ``"agent daily"`` for an agent's (empty for other caps)."""

    time: float
    agent: str
    model: str
    code: str
    windows: tuple[str, ...] = ()

    def encode(self) -> str:
        """The JSON text the store keeps."""
        return json.dumps(
            {
                "time": round(self.time, 3),
                "agent": self.agent,
                "model": self.model[:MAX_MODEL_CHARS],
                "code": self.code,
                "windows": list(self.windows),
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, text: str | bytes) -> Rejection | None:
        """A kept entry, or None for one this version cannot read."""
        try:
            data = json.loads(text)
            return cls(
                time=float(data["time"]),
                agent=str(data["agent"]),
                model=str(data["model"]),
                code=str(data["code"]),
                windows=tuple(str(w) for w in data.get("windows", ())),
            )
        except (ValueError, KeyError, TypeError):
            return None


def buckets(at: float, tz: ZoneInfo) -> tuple[int, int]:
    """The starts of the hour and the day (local, in ``tz``) that contain ``at``."""
    return period_of(Window.HOURLY, at, tz).start, period_of(Window.DAILY, at, tz).start


def cutoffs(at: float) -> tuple[int, int]:
    """Hour and day buckets starting before these are no longer kept (a day is given an
    hour more, for days of 25 hours)."""
    return int(at) - HOURS_KEPT * HOUR_S, int(at) - DAYS_KEPT * DAY_S - HOUR_S


def buckets_since(points: Iterable[tuple[int, int]], since: int) -> tuple[tuple[int, int], ...]:
    """The buckets that start at ``since`` or later, with spend, oldest first."""
    return tuple(sorted((s, m) for s, m in points if s >= since and m > 0))

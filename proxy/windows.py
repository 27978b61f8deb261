"""Calendar windows of budgets and rate caps: which period an instant falls in, in a time zone.

    >>> from zoneinfo import ZoneInfo
    >>> p = period_of(Window.DAILY, 1_700_000_000.0, ZoneInfo("UTC"))
    >>> p.end - p.start
    86400

Pure arithmetic over an epoch timestamp; the clock that supplies it is the store's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo


class Window(StrEnum):
    MINUTE = "minute"  # starts at :00 seconds
    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"  # starts Monday 00:00 local time
    MONTHLY = "monthly"  # calendar month


@dataclass(frozen=True, slots=True)
class Period:
    """A half-open interval ``[start, end)`` of epoch seconds."""

    start: int
    end: int

    def resets_in(self, now: float) -> int:
        """Whole seconds until the period ends, at least 1."""
        return max(1, math.ceil(self.end - now))


def _local_midnight(day: datetime, tz: ZoneInfo) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=tz)


# The last period computed per (window, zone): most calls fall inside it.
_recent: dict[tuple[Window, ZoneInfo], Period] = {}


def period_of(window: Window, now: float, tz: ZoneInfo) -> Period:
    """The period of ``window`` that contains ``now``, aligned to local time in ``tz``."""
    key = (window, tz)
    recent = _recent.get(key)
    if recent is not None and recent.start <= now < recent.end:
        return recent
    period = _compute(window, now, tz)
    _recent[key] = period
    return period


def _compute(window: Window, now: float, tz: ZoneInfo) -> Period:
    if window is Window.MINUTE:  # every zone's offset is whole minutes
        start_ts = math.floor(now) // 60 * 60
        return Period(start_ts, start_ts + 60)
    local = datetime.fromtimestamp(now, tz)
    if window is Window.HOURLY:
        # The local hour that contains ``now``, measured back from ``now`` itself so that
        # the period always contains it, even across a 30- or 45-minute DST change.
        start_ts = math.floor(now) - (local.minute * 60 + local.second)
        return Period(start_ts, start_ts + 3600)
    if window is Window.DAILY:
        start = _local_midnight(local, tz)
        end = _local_midnight(start + timedelta(days=1, hours=12), tz)
    elif window is Window.WEEKLY:
        monday = local - timedelta(days=local.weekday())
        start = _local_midnight(monday, tz)
        end = _local_midnight(start + timedelta(days=7, hours=12), tz)
    else:
        start = datetime(local.year, local.month, 1, tzinfo=tz)
        nxt = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        end = datetime(nxt[0], nxt[1], 1, tzinfo=tz)
    return Period(int(start.timestamp()), int(end.timestamp()))

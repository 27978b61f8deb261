from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from proxy.windows import Period, Window, period_of

UTC_TZ = ZoneInfo("UTC")
NEW_YORK = ZoneInfo("America/New_York")
KOLKATA = ZoneInfo("Asia/Kolkata")


def at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """An instant given in UTC, as epoch seconds."""
    return int(datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp())


def utc(text: str) -> int:
    """``"2024-05-15 10:00[:ss]"`` in UTC, as epoch seconds."""
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


# (window, zone, instant, expected period start, end), all in UTC; boundaries are checked
# 1 s before and at the boundary.
CASES = [
    # UTC
    (Window.HOURLY, UTC_TZ, "2024-05-15 09:59:59", "2024-05-15 09:00", "2024-05-15 10:00"),
    (Window.HOURLY, UTC_TZ, "2024-05-15 10:00", "2024-05-15 10:00", "2024-05-15 11:00"),
    (Window.DAILY, UTC_TZ, "2024-05-15 23:59:59", "2024-05-15 00:00", "2024-05-16 00:00"),
    (Window.DAILY, UTC_TZ, "2024-05-16 00:00", "2024-05-16 00:00", "2024-05-17 00:00"),
    # 2024-01-01 is a Monday: the week of Sunday 2023-12-31 started Monday 2023-12-25.
    (Window.WEEKLY, UTC_TZ, "2023-12-31 23:59:59", "2023-12-25 00:00", "2024-01-01 00:00"),
    (Window.WEEKLY, UTC_TZ, "2024-01-01 00:00", "2024-01-01 00:00", "2024-01-08 00:00"),
    (Window.WEEKLY, UTC_TZ, "2024-01-03 12:00", "2024-01-01 00:00", "2024-01-08 00:00"),
    (Window.MONTHLY, UTC_TZ, "2023-12-31 23:59:59", "2023-12-01 00:00", "2024-01-01 00:00"),
    (Window.MONTHLY, UTC_TZ, "2024-01-01 00:00", "2024-01-01 00:00", "2024-02-01 00:00"),
    (Window.MONTHLY, UTC_TZ, "2024-02-29 12:00", "2024-02-01 00:00", "2024-03-01 00:00"),
    # New York, DST starts 2024-03-10 02:00 EST -> 03:00 EDT (07:00Z): a 23-hour day.
    (Window.DAILY, NEW_YORK, "2024-03-10 04:59:59", "2024-03-09 05:00", "2024-03-10 05:00"),
    (Window.DAILY, NEW_YORK, "2024-03-10 05:00", "2024-03-10 05:00", "2024-03-11 04:00"),
    (Window.HOURLY, NEW_YORK, "2024-03-10 06:59:59", "2024-03-10 06:00", "2024-03-10 07:00"),
    (Window.HOURLY, NEW_YORK, "2024-03-10 07:00", "2024-03-10 07:00", "2024-03-10 08:00"),
    # DST ends 2024-11-03 02:00 EDT -> 01:00 EST (06:00Z): a 25-hour day, 01:00 twice.
    (Window.DAILY, NEW_YORK, "2024-11-03 12:00", "2024-11-03 04:00", "2024-11-04 05:00"),
    (Window.HOURLY, NEW_YORK, "2024-11-03 05:59:59", "2024-11-03 05:00", "2024-11-03 06:00"),
    (Window.HOURLY, NEW_YORK, "2024-11-03 06:00", "2024-11-03 06:00", "2024-11-03 07:00"),
    (Window.HOURLY, NEW_YORK, "2024-11-03 06:30", "2024-11-03 06:00", "2024-11-03 07:00"),
    (Window.WEEKLY, NEW_YORK, "2024-03-10 12:00", "2024-03-04 05:00", "2024-03-11 04:00"),
    (Window.MONTHLY, NEW_YORK, "2024-11-15 00:00", "2024-11-01 04:00", "2024-12-01 05:00"),
    (Window.MONTHLY, NEW_YORK, "2025-01-01 04:59:59", "2024-12-01 05:00", "2025-01-01 05:00"),
    (Window.MONTHLY, NEW_YORK, "2025-01-01 05:00", "2025-01-01 05:00", "2025-02-01 05:00"),
    # Kolkata, +05:30 all year: local hours start at half past the UTC hour.
    (Window.HOURLY, KOLKATA, "2024-05-15 10:29:59", "2024-05-15 09:30", "2024-05-15 10:30"),
    (Window.HOURLY, KOLKATA, "2024-05-15 10:30", "2024-05-15 10:30", "2024-05-15 11:30"),
    (Window.DAILY, KOLKATA, "2024-05-14 18:29:59", "2024-05-13 18:30", "2024-05-14 18:30"),
    (Window.DAILY, KOLKATA, "2024-05-14 18:30", "2024-05-14 18:30", "2024-05-15 18:30"),
    (Window.WEEKLY, KOLKATA, "2023-12-31 18:29:59", "2023-12-24 18:30", "2023-12-31 18:30"),
    (Window.WEEKLY, KOLKATA, "2023-12-31 18:30", "2023-12-31 18:30", "2024-01-07 18:30"),
    (Window.MONTHLY, KOLKATA, "2024-12-31 18:29:59", "2024-11-30 18:30", "2024-12-31 18:30"),
    (Window.MONTHLY, KOLKATA, "2024-12-31 18:30", "2024-12-31 18:30", "2025-01-31 18:30"),
]


@pytest.mark.parametrize(("window", "tz", "now", "start", "end"), CASES)
def test_period_of(window: Window, tz: ZoneInfo, now: str, start: str, end: str) -> None:
    expected = Period(utc(start), utc(end))
    assert period_of(window, utc(now), tz) == expected
    assert period_of(window, utc(now) + 0.999, tz) == expected


def test_period_lengths_across_dst() -> None:
    spring = period_of(Window.DAILY, at(2024, 3, 10, 12), NEW_YORK)
    autumn = period_of(Window.DAILY, at(2024, 11, 3, 12), NEW_YORK)
    assert spring.end - spring.start == 23 * 3600
    assert autumn.end - autumn.start == 25 * 3600
    # Every hour of the 25-hour day is one absolute hour.
    hours = {period_of(Window.HOURLY, autumn.start + 60 + 3600 * i, NEW_YORK) for i in range(25)}
    assert len(hours) == 25
    assert all(p.end - p.start == 3600 for p in hours)


def test_fractional_instant_before_boundary_stays_in_period() -> None:
    boundary = at(2024, 5, 16)
    assert period_of(Window.DAILY, boundary - 0.001, UTC_TZ) == Period(at(2024, 5, 15), boundary)


ZONES = ["UTC", "America/New_York", "Asia/Kolkata", "Asia/Kathmandu", "America/Santiago"]


@pytest.mark.parametrize("zone", ZONES)
@pytest.mark.parametrize("window", list(Window))
def test_periods_tile_time(zone: str, window: Window) -> None:
    """Consecutive periods meet exactly, and each contains the instants it was asked for."""
    tz = ZoneInfo(zone)
    t = at(2024, 1, 1)
    stop = at(2025, 1, 1)
    step = {
        Window.MINUTE: 3600 * 5 + 61,
        Window.HOURLY: 3600 * 7 + 1,
        Window.DAILY: 86400,
        Window.WEEKLY: 86400 * 7,
        Window.MONTHLY: 86400 * 28,
    }[window]
    while t < stop:
        p = period_of(window, t, tz)
        assert p.start <= t < p.end
        assert period_of(window, p.start, tz) == p
        assert period_of(window, p.end - 1, tz) == p
        assert period_of(window, p.end, tz).start == p.end
        t += step


@pytest.mark.parametrize(
    ("zone", "now"),
    [
        # 2023-04-02 02:00 +11:00 -> 01:30 +10:30 at 15:00Z; 15:10Z is 01:40 (second time).
        ("Australia/Lord_Howe", at(2023, 4, 1, 15, 10)),
        # 2023-04-02 03:45 +13:45 -> 02:45 +12:45 at 14:00Z; 14:00Z is 02:45 (second time).
        ("Pacific/Chatham", at(2023, 4, 1, 14, 0)),
        # 15:00Z is 03:45 +12:45, just after the repeated local interval.
        ("Pacific/Chatham", at(2023, 4, 1, 15, 0)),
    ],
)
def test_hourly_contains_instant_in_half_hour_dst_zones(zone: str, now: int) -> None:
    p = period_of(Window.HOURLY, now, ZoneInfo(zone))
    assert p.start <= now < p.end


@pytest.mark.parametrize(
    ("now", "expected"),
    [(100.0, 100), (150.2, 50), (199.0, 1), (199.5, 1), (200.0, 1), (250.0, 1)],
)
def test_resets_in(now: float, expected: int) -> None:
    assert Period(100, 200).resets_in(now) == expected


def test_resets_in_at_real_boundary() -> None:
    now = at(2024, 5, 15, 23, 59, 59)
    assert period_of(Window.DAILY, now, UTC_TZ).resets_in(now) == 1
    assert period_of(Window.DAILY, now + 1, UTC_TZ).resets_in(now + 1) == 86400
    assert period_of(Window.DAILY, now + 0.5, UTC_TZ).resets_in(now + 0.5) == 1

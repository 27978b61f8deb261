"""The spend journal: entry format, writer thread, rotation, faults and reading back.

Writers are built with ``flush_interval_s=3600`` so that they write only when a test asks
(``flush``/``aclose``): every effect is awaited, none is waited for by sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.counters import MAX_MICROS, Counter
from proxy.journal import (
    MAX_LINE_BYTES,
    Journal,
    JournalEntry,
    counter_of,
    journal_counter,
    journal_files,
    read_entries,
)
from proxy.windows import Period, Window

T0 = datetime(2026, 12, 1, 10, 20, 30, tzinfo=UTC).timestamp()
NOV = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC).timestamp()
DEC = datetime(2026, 12, 1, 0, 0, 1, tzinfo=UTC).timestamp()
JAN = datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC).timestamp()
HOUR = int(T0) // 3600 * 3600


def entry(
    n: int = 0,
    *,
    task: str = "t0",
    at: float = T0,
    cost: int = 123,
    tokens: int | None = 10,
) -> JournalEntry:
    return JournalEntry(
        time=at,
        request_id=f"req-{task}-{n:05d}",
        tenant="acme",
        agent="planner",
        model="gpt-4o",
        endpoint="chat/completions",
        prompt_tokens=tokens,
        cached_tokens=None if tokens is None else 0,
        completion_tokens=tokens,
        reasoning_tokens=None,
        cost_micros=cost,
        outcome="ok",
        usage_missing=tokens is None,
        epoch="e1",
        counters=(
            ("planner", "hourly", HOUR, HOUR + 3600),
            (None, "hourly", HOUR, HOUR + 3600),
            (None, "monthly", 1796083200, 1798761600),
        ),
    )


def ids(entries: Iterator[JournalEntry] | list[JournalEntry]) -> list[str]:
    return [e.request_id for e in entries]


def journal(path: Path, **kwargs: object) -> Journal:
    return Journal(path, flush_interval_s=3600, **kwargs)  # type: ignore[arg-type]


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


class _ListHandler(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def journal_log() -> Iterator[list[logging.LogRecord]]:
    """What ``capproxy.journal`` logs (whether or not ``logs.setup`` stopped propagation)."""
    logger = logging.getLogger("capproxy.journal")
    records: list[logging.LogRecord] = []
    handler = _ListHandler(records)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def warnings_of(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.WARNING]


# --- the entry ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cost", "usd"),
    [(0, "0.000000"), (1, "0.000001"), (123, "0.000123"), (MAX_MICROS, "9007199254.740992")],
)
def test_an_entry_round_trips_through_one_line_with_an_exact_cost(cost: int, usd: str) -> None:
    original = entry(cost=cost, tokens=None)
    line = original.to_json()
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["cost_usd"] == usd
    assert obj["cost_micros"] == cost
    assert obj["prompt_tokens"] is None
    assert obj["counters"][1] == [None, "hourly", HOUR, HOUR + 3600]
    assert JournalEntry.from_json(line) == original
    assert JournalEntry.from_json(line.encode()) == original


def test_the_line_keeps_a_fixed_key_order() -> None:
    assert list(json.loads(entry().to_json())) == [
        "v",
        "time",
        "request_id",
        "tenant",
        "agent",
        "model",
        "endpoint",
        "prompt_tokens",
        "cached_tokens",
        "completion_tokens",
        "reasoning_tokens",
        "cost_micros",
        "cost_usd",
        "outcome",
        "usage_missing",
        "epoch",
        "counters",
    ]


def test_model_cap_and_end_user_counters_round_trip_with_their_kind() -> None:
    scoped = Counter("acme", None, Window.DAILY, 0, model_cap="frontier")
    user = Counter("acme", None, Window.DAILY, 0, user_id="u@x")
    period = Period(HOUR, HOUR + 86_400)
    keys = (journal_counter(scoped, period), journal_counter(user, period))
    assert keys == (
        ("frontier", "daily", HOUR, HOUR + 86_400, "model"),
        ("u@x", "daily", HOUR, HOUR + 86_400, "user"),
    )
    original = dataclasses.replace(entry(), counters=keys)
    again = JournalEntry.from_json(original.to_json())
    assert again == original
    assert [counter_of("acme", key) for key in again.counters] == [scoped, user]
    assert counter_of("acme", entry().counters[0]).agent_id == "planner"


def test_windows_are_the_distinct_windows_of_the_counters() -> None:
    assert entry().windows == (
        ("hourly", HOUR, HOUR + 3600),
        ("monthly", 1796083200, 1798761600),
    )


def _edit(**changes: object) -> str:
    obj = json.loads(entry().to_json())
    for key, value in changes.items():
        if value is KeyError:
            del obj[key]
        else:
            obj[key] = value
    return json.dumps(obj)


@pytest.mark.parametrize(
    "line",
    [
        "",
        '{"v":1,"time":17',
        "[1, 2]",
        _edit(cost_micros=KeyError),
        _edit(extra="x"),
        _edit(v=2),
        _edit(v=True),
        _edit(time="1764631234"),
        _edit(time=-1),
        '{"v":1,"time":NaN' + entry().to_json()[len('{"v":1,"time":1796120430.0') :],
        _edit(tenant=""),
        _edit(agent=7),
        _edit(prompt_tokens="10"),
        _edit(prompt_tokens=-1),
        _edit(completion_tokens=1.5),
        _edit(cost_micros=-1, cost_usd="-0.000001"),
        _edit(cost_micros=True),
        _edit(cost_micros=MAX_MICROS + 1, cost_usd="9007199254.740993"),
        _edit(cost_usd="0.000124"),
        _edit(cost_usd=0.000123),
        _edit(usage_missing=0),
        _edit(counters=[["planner", "hourly", 2, 1]]),
        _edit(counters=[["planner", "hourly", 1]]),
        _edit(counters=[[1, "hourly", 1, 2]]),
        _edit(counters={"a": 1}),
        _edit(counters=[["frontier", "daily", 1, 2, "team"]]),
        _edit(counters=[[None, "daily", 1, 2, "model"]]),
    ],
)
def test_a_malformed_line_raises_value_error(line: str) -> None:
    with pytest.raises(ValueError):
        JournalEntry.from_json(line)


def test_an_entry_with_a_negative_cost_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="cost_micros"):
        entry(cost=-1)


# --- writing ----------------------------------------------------------------------------


async def test_entries_are_written_once_and_flush_reports_them_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "spend.jsonl"
    async with journal(path) as j:
        for n in range(3):
            j.append(entry(n))
        assert await j.flush()
        assert ids(read_entries([path])) == ids([entry(n) for n in range(3)])
        j.append(entry(3))
    assert ids(read_entries([path])) == ids([entry(n) for n in range(4)])
    assert j.stats.written == 4
    assert j.stats.pending == 0
    assert j.stats.dropped == 0
    assert path.stat().st_mode & 0o777 == 0o640 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_many_concurrent_tasks_have_every_entry_written_once_in_task_order(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spend.jsonl"
    tasks, per_task = 20, 50

    async def settle(task: int, j: Journal) -> None:
        for n in range(per_task):
            j.append(entry(n, task=f"{task:02d}"))
            if n % 10 == 0:
                assert await j.flush()
            await asyncio.sleep(0)

    async with journal(path, max_bytes=20_000) as j:
        await asyncio.gather(*(settle(t, j) for t in range(tasks)))
    reader = read_entries(journal_files(path))
    got = ids(reader)
    assert reader.malformed == 0
    assert len(got) == len(set(got)) == tasks * per_task
    for t in range(tasks):
        mine = [i for i in got if i.startswith(f"req-{t:02d}-")]
        assert mine == [entry(n, task=f"{t:02d}").request_id for n in range(per_task)]
    assert j.stats.written == tasks * per_task
    assert j.stats.rotations == len(journal_files(path)) - 1 > 0


@pytest.mark.parametrize("batches", ["one batch", "a batch per entry"])
async def test_a_file_is_rotated_before_it_would_exceed_max_bytes(
    tmp_path: Path, batches: str
) -> None:
    path = tmp_path / "spend.jsonl"
    size = len(entry().to_json()) + 1
    async with journal(path, max_bytes=2 * size + 1) as j:
        for n in range(7):
            j.append(entry(n))
            if batches != "one batch":
                assert await j.flush()
    files = journal_files(path)
    assert [f.name for f in files] == [
        "spend.2026-12.1.jsonl",
        "spend.2026-12.2.jsonl",
        "spend.2026-12.3.jsonl",
        "spend.jsonl",
    ]
    assert [len(lines_of(f)) for f in files] == [2, 2, 2, 1]
    assert all(line.endswith(b"\n") for f in files for line in lines_of(f))
    assert ids(read_entries(files)) == ids([entry(n) for n in range(7)])
    assert j.stats.rotations == 3


async def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "spend.jsonl"
    async with journal(path, max_bytes=1) as j:
        for n in range(3):
            j.append(entry(n))
    files = journal_files(path)
    assert [len(lines_of(f)) for f in files] == [1, 1, 1]
    assert ids(read_entries(files)) == ids([entry(n) for n in range(3)])


async def test_a_file_is_rotated_when_the_entries_reach_a_later_utc_month(tmp_path: Path) -> None:
    path = tmp_path / "spend.jsonl"
    late_november = entry(4, at=NOV)
    async with journal(path) as j:
        j.append(entry(0, at=NOV - 10))
        j.append(entry(1, at=NOV))
        assert await j.flush()
        j.append(entry(2, at=DEC))
        j.append(entry(3, at=DEC + 1))
        j.append(late_november)  # a late settle stays in the current file
        j.append(entry(5, at=JAN))
    files = journal_files(path)
    assert [f.name for f in files] == [
        "spend.2026-11.1.jsonl",
        "spend.2026-12.1.jsonl",
        "spend.jsonl",
    ]
    assert [ids(read_entries([f])) for f in files] == [
        ["req-t0-00000", "req-t0-00001"],
        ["req-t0-00002", "req-t0-00003", "req-t0-00004"],
        ["req-t0-00005"],
    ]
    assert j.stats.rotations == 2


async def test_a_restart_appends_and_numbers_rotations_past_existing_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spend.jsonl"
    older = tmp_path / "spend.2026-11.1.jsonl"
    older.write_text(entry(0, at=NOV - 100).to_json() + "\n")
    async with journal(path) as j:
        j.append(entry(1, at=NOV))
    async with journal(path) as j:
        j.append(entry(2, at=NOV))
        assert await j.flush()
        assert j.stats.rotations == 0
        j.append(entry(3, at=DEC))
    files = journal_files(path)
    assert [f.name for f in files] == [older.name, "spend.2026-11.2.jsonl", "spend.jsonl"]
    assert ids(read_entries(files)) == ids([entry(n) for n in range(4)])


async def test_a_file_whose_first_line_is_unreadable_takes_the_clock_month(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spend.jsonl"
    path.write_text("garbage\n" + entry(0, at=NOV).to_json() + "\n")
    async with journal(path, clock=lambda: NOV) as j:
        j.append(entry(1, at=DEC))
    assert [f.name for f in journal_files(path)] == ["spend.2026-11.1.jsonl", "spend.jsonl"]


# --- reading ------------------------------------------------------------------------------


async def test_a_torn_last_line_is_skipped_and_counted_and_the_next_line_stays_whole(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spend.jsonl"
    whole = "".join(entry(n).to_json() + "\n" for n in range(2))
    path.write_text(whole + entry(2).to_json()[:40])  # the process died mid-write
    reader = read_entries([path])
    assert ids(reader) == ids([entry(n) for n in range(2)])
    assert reader.malformed == 1
    assert (reader.problems[0].path, reader.problems[0].line) == (path, 3)

    async with journal(path) as j:  # a restart ends the fragment before writing
        j.append(entry(3))
    reader = read_entries([path])
    assert ids(reader) == ids([entry(n) for n in (0, 1, 3)])
    assert reader.malformed == 1


def test_an_overlong_line_is_skipped_as_malformed(tmp_path: Path) -> None:
    path = tmp_path / "spend.jsonl"
    path.write_bytes(b"x" * (MAX_LINE_BYTES + 10) + b"\n\n" + entry().to_json().encode())
    reader = read_entries([path])
    assert ids(reader) == [entry().request_id]
    assert reader.malformed == 1
    assert reader.problems[0].reason == "line too long"


def test_journal_files_lists_rotated_files_oldest_first_then_the_current_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spend.jsonl"
    assert journal_files(tmp_path / "missing" / "spend.jsonl") == []
    assert journal_files(path) == []
    names = [
        "spend.2026-12.10.jsonl",
        "spend.2026-12.2.jsonl",
        "spend.2025-01.1.jsonl",
        "spend.jsonl",
        "other.2026-12.1.jsonl",
        "spend.2026-12.x.jsonl",
        "spend.2026-12.0.jsonl",
        "spend.2026-12.1.json",
    ]
    for name in names:
        (tmp_path / name).write_text("")
    assert [f.name for f in journal_files(path)] == [
        "spend.2025-01.1.jsonl",
        "spend.2026-12.2.jsonl",
        "spend.2026-12.10.jsonl",
        "spend.jsonl",
    ]


# --- lifecycle ----------------------------------------------------------------------------


async def test_appends_after_aclose_are_dropped_counted_and_warned_once(
    tmp_path: Path, journal_log: list[logging.LogRecord]
) -> None:
    path = tmp_path / "spend.jsonl"
    j = journal(path)
    await j.start()
    j.append(entry(0))
    await j.aclose()
    for n in range(1, 4):
        j.append(entry(n))  # never raises into the request path
    await j.aclose()  # idempotent
    assert await j.flush()
    assert ids(read_entries([path])) == [entry(0).request_id]
    assert j.dropped == j.stats.dropped == 3
    assert warnings_of(journal_log) == ["journal closed: dropping entries"]


async def test_appends_before_start_wait_for_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "spend.jsonl"
    j = journal(path)
    j.append(entry(0))
    with pytest.raises(RuntimeError):
        await j.flush()
    async with j:
        with pytest.raises(RuntimeError):
            await j.start()
    assert ids(read_entries([path])) == [entry(0).request_id]


async def test_closing_a_journal_never_started_drops_what_it_holds(tmp_path: Path) -> None:
    j = journal(tmp_path / "spend.jsonl")
    j.append(entry(0))
    await j.aclose()
    assert j.stats.dropped == 1
    assert not (tmp_path / "spend.jsonl").exists()


async def test_start_raises_when_the_file_cannot_be_opened(tmp_path: Path) -> None:
    path = tmp_path / "spend.jsonl"
    path.mkdir()
    j = journal(path)
    with pytest.raises(IsADirectoryError):
        await j.start()
    await j.aclose()


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["mid-line", "line boundary"])
async def test_a_failed_write_is_counted_and_retried_from_where_it_stopped(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    journal_log: list[logging.LogRecord],
    cut: str,
) -> None:
    path = tmp_path / "spend.jsonl"
    line = len(entry().to_json()) + 1
    real_write = os.write
    disk = {"state": "partial"}

    def flaky_write(fd: int, data: bytes | memoryview) -> int:
        raw = bytes(data)
        if b'"request_id"' not in raw or disk["state"] == "ok":
            return real_write(fd, raw)
        if disk["state"] == "partial":
            disk["state"] = "full"
            return real_write(fd, raw[: line + (7 if cut == "mid-line" else 0)])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", flaky_write)
    async with journal(path) as j:
        for n in range(5):
            j.append(entry(n))  # never raises
        assert not await j.flush()
        assert j.stats.write_errors == 1
        assert j.stats.written == 1
        assert j.stats.pending == 4
        j.append(entry(5))
        assert not await j.flush()
        assert j.stats.write_errors == 2
        disk["state"] = "ok"
        assert await j.flush()
    reader = read_entries([path])
    assert ids(reader) == ids([entry(n) for n in range(6)])
    assert reader.malformed == 0
    assert j.stats.written == 6
    assert warnings_of(journal_log) == [
        "journal write failed; retrying with the next batch",
        "journal writes recovered",
    ]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_a_full_disk_is_counted_and_what_is_unwritten_at_close_is_dropped() -> None:
    j = journal(Path("/dev/full"))
    await j.start()
    for n in range(3):
        j.append(entry(n))
    assert not await j.flush()
    assert j.stats.write_errors == 1
    await j.aclose()
    assert (j.stats.written, j.stats.dropped, j.stats.pending) == (0, 3, 0)


async def test_a_failed_rotation_is_counted_and_the_lines_go_to_the_current_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spend.jsonl"
    real_rename = os.rename
    allowed = {"rename": False}

    def rename(src: str | Path, dst: str | Path) -> None:
        if not allowed["rename"]:
            raise PermissionError(errno.EACCES, "Permission denied")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    async with journal(path, max_bytes=1) as j:
        j.append(entry(0))
        j.append(entry(1))
        assert await j.flush()
        assert (j.stats.rotations, j.stats.write_errors) == (0, 1)
        allowed["rename"] = True
        j.append(entry(2))
    files = journal_files(path)
    assert [len(lines_of(f)) for f in files] == [2, 1]
    assert ids(read_entries(files)) == ids([entry(n) for n in range(3)])
    assert j.stats.rotations == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_a_read_only_directory_blocks_rotation_not_writing(tmp_path: Path) -> None:
    path = tmp_path / "spend.jsonl"
    async with journal(path, max_bytes=1) as j:
        j.append(entry(0))
        assert await j.flush()
        tmp_path.chmod(0o500)
        try:
            j.append(entry(1))
            assert await j.flush()
            assert (j.stats.rotations, j.stats.write_errors) == (0, 1)
        finally:
            tmp_path.chmod(0o700)
        j.append(entry(2))
    assert j.stats.rotations == 1
    assert ids(read_entries(journal_files(path))) == ids([entry(n) for n in range(3)])


def _stall_writes(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the journal's writes block until ``release`` is set; ``entered`` when one does."""
    entered, release = threading.Event(), threading.Event()
    real_write = os.write

    def stalled_write(fd: int, data: bytes | memoryview) -> int:
        raw = bytes(data)
        if b'"request_id"' in raw:
            entered.set()
            release.wait(timeout=60)
        return real_write(fd, raw)

    monkeypatch.setattr(os, "write", stalled_write)
    return entered, release


async def test_a_full_buffer_drops_and_counts_while_the_disk_stalls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal_log: list[logging.LogRecord]
) -> None:
    path = tmp_path / "spend.jsonl"
    entered, release = _stall_writes(monkeypatch)
    async with journal(path, max_pending=5) as j:
        try:
            j.append(entry(0))
            first = asyncio.ensure_future(j.flush())
            assert await asyncio.to_thread(entered.wait, 60)
            for n in range(1, 11):
                j.append(entry(n))  # returns at once though the writer is stuck
            assert (j.stats.pending, j.dropped) == (5, 6)
        finally:
            release.set()
        assert await first
        assert await j.flush()
    assert ids(read_entries([path])) == ids([entry(n) for n in range(5)])
    assert (j.stats.written, j.stats.dropped) == (5, 6)
    assert warnings_of(journal_log) == [
        "journal buffer full (5): dropping entries",
        "journal buffer was full: 6 entries dropped",
    ]


async def test_append_does_no_file_io_on_the_calling_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spend.jsonl"
    seen: list[tuple[str, threading.Thread]] = []

    def recording(name: str, real: Callable[..., object], mine: Callable[..., bool]) -> None:
        def call(*args: object) -> object:
            if mine(*args):
                seen.append((name, threading.current_thread()))
            return real(*args)

        monkeypatch.setattr(os, name, call)

    recording("open", os.open, lambda p, *_: str(p).startswith(str(tmp_path)))
    recording("write", os.write, lambda _, data: b"req-" in bytes(data))
    recording("fsync", os.fsync, lambda _: True)
    recording("rename", os.rename, lambda *_: True)
    async with journal(path, max_bytes=1000) as j:
        for n in range(20):
            j.append(entry(n))
        assert await j.flush()
        j.append(entry(20))
    assert {name for name, _ in seen} == {"open", "write", "fsync", "rename"}
    assert threading.main_thread() not in {thread for _, thread in seen}
    assert "capproxy-journal" in {thread.name for name, thread in seen if name == "write"}
    assert len(list(read_entries(journal_files(path)))) == 21


@pytest.mark.parametrize("opens", [True, False])
async def test_aclose_during_start_waits_for_it_and_closes(tmp_path: Path, opens: bool) -> None:
    path = tmp_path / "spend.jsonl"
    if not opens:
        path.mkdir()
    j = journal(path)
    j.append(entry(0))
    starting = asyncio.ensure_future(j.start())  # runs first: opens the file in a thread
    closing = asyncio.ensure_future(j.aclose())
    results = await asyncio.gather(starting, closing, return_exceptions=True)
    assert results[1] is None
    if opens:
        assert results[0] is None
        assert ids(read_entries([path])) == [entry(0).request_id]
        assert (j.stats.written, j.stats.dropped) == (1, 0)
    else:
        assert isinstance(results[0], IsADirectoryError)
        assert (j.stats.written, j.stats.dropped) == (0, 1)
    j.append(entry(1))
    assert j.stats.dropped == 2 - opens

"""The spend journal: one JSON line per settled request, appended to a local file.

    journal = Journal(Path("/var/lib/capproxy/spend.jsonl"))
    await journal.start()                    # owned by a cleanup_ctx; OSError if unopenable
    journal.append(entry)                    # after each settle: never blocks, never raises
    await journal.aclose()                   # writes what is pending, stops the writer

    reader = read_entries(journal_files(path))   # oldest file first
    for entry in reader:
        ...
    reader.malformed                             # lines skipped (torn by a crash, edited)

It is the chargeback record and the source to rebuild spend from after a store lost its
data. One line per entry, ASCII, no spaces, keys in this order::

    {"v":1,"time":1764631234.5,"request_id":"req_1","tenant":"acme","agent":"planner",
     "model":"gpt-4o","endpoint":"chat/completions","prompt_tokens":1200,"cached_tokens":0,
     "completion_tokens":80,"reasoning_tokens":null,"cost_micros":3800,
     "cost_usd":"0.003800","outcome":"ok","usage_missing":false,"epoch":"e7",
     "counters":[["planner","hourly",1764630000,1764633600],[null,"daily",...]]}

``counters`` names every budget counter the cost was recorded in: (agent id, or null for
the tenant-wide one; window; period start; period end), and for a model cap's or an end
user's counter a fifth item, ``"model"`` or ``"user"``, with the cap's name or the user's
id in the first. The entry holds ids, never keys.

Writing. ``append`` only puts the entry on a bounded in-memory buffer (``max_pending``
lines); a full buffer drops the entry and counts it in ``stats.dropped``, with one warning
per burst of drops. Entries appended before ``start`` wait in the buffer; entries
appended once ``aclose`` has begun are dropped and counted the same way (a settle racing
shutdown must not raise). One writer thread, started by ``start`` and ended by
``aclose``, wakes every ``flush_interval_s`` (sooner on ``flush()``, ``aclose()`` or a
half-full buffer), writes the batch with ``os.write`` to a file opened ``O_APPEND`` and
fsyncs it once: a crash loses at most the last interval, and an idle journal costs no
IO. A failed write (disk full, EIO) is logged on ``capproxy.journal``, counted in
``stats.write_errors`` and retried with the next batch from the byte where it stopped,
so a line is neither lost, nor split, nor written twice. A failed fsync is counted, not
retried (its bytes were written). What is still unwritten when ``aclose`` ends is
counted as dropped.

Files. A file that ends in a torn line (the process died mid-write) gets a newline
before the first new line, so only the fragment is malformed and readers skip it.
Before a line that would take the file past ``max_bytes``, or whose UTC month is later
than the file's (the month of its first line), the file is renamed to
``<stem>.<YYYY-MM>.<n><suffix>`` (its month; ``n`` one more than any file of that month
already there) and a new one started at ``path``. An entry of an earlier month (a late
settle) goes to the current file. A line is never split across files; one line longer
than ``max_bytes`` gets a file of its own. A failed rotation is counted as a write
error and the lines go to the current file. One ``Journal`` per file: two processes
must not share a path, and the journal does its own rotation (an external logrotate
that moves the file would leave the writer appending to the moved file).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from proxy.counters import MAX_MICROS, Counter
from proxy.pricing import usd_text
from proxy.usage import MAX_TOKENS
from proxy.windows import Period, Window

__all__ = [
    "FORMAT_VERSION",
    "EntryReader",
    "Journal",
    "JournalEntry",
    "JournalStats",
    "Malformed",
    "journal_files",
    "read_entries",
]

FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 256 * 1024**2
DEFAULT_MAX_PENDING = 100_000
MAX_LINE_BYTES = 64 * 1024  # a longer line is not one the journal wrote: read as malformed
_MAX_TIME = 253_402_300_800.0  # 10000-01-01T00:00:00Z: months stay "YYYY-MM"
_MAX_WRITE = 1 << 20  # bytes joined into one os.write
_FILE_MODE = 0o640
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_STR_FIELDS = ("request_id", "tenant", "agent", "model", "endpoint", "outcome", "epoch")
_NONEMPTY_FIELDS = frozenset({"request_id", "tenant"})
_TOKEN_FIELDS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens")
_KEYS = frozenset(
    {"v", "time", *_STR_FIELDS, *_TOKEN_FIELDS}
    | {"cost_micros", "cost_usd", "usage_missing", "counters"}
)

_log = logging.getLogger("capproxy.journal")

# (agent or None, window, start, end), or (model cap or user, window, start, end, kind)
CounterKey = tuple[str | None, str, int, int] | tuple[str, str, int, int, str]
SCOPE_KINDS = frozenset({"model", "user"})


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalEntry:
    """One settled request, as the journal records it; validated on construction.

    ``time`` is the settle time (epoch seconds); token counts are ``None`` when the usage is
    unknown; ``epoch`` is the tenant's store epoch at settle time (opaque)."""

    time: float
    request_id: str
    tenant: str
    agent: str
    model: str
    endpoint: str
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    reasoning_tokens: int | None
    cost_micros: int
    outcome: str
    usage_missing: bool
    epoch: str
    counters: tuple[CounterKey, ...]

    def __post_init__(self) -> None:
        t: object = self.time
        if isinstance(t, bool) or not isinstance(t, int | float):
            raise TypeError("time must be a number")
        if not (math.isfinite(t) and 0 <= t < _MAX_TIME):
            raise ValueError(f"time out of range: {t!r}")
        object.__setattr__(self, "time", float(t))
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a string")
            if not value and name in _NONEMPTY_FIELDS:
                raise ValueError(f"{name} must not be empty")
        for name in _TOKEN_FIELDS:
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), MAX_TOKENS)
        _check_int("cost_micros", self.cost_micros, MAX_MICROS)
        if not isinstance(self.usage_missing, bool):
            raise TypeError("usage_missing must be a boolean")
        if not isinstance(self.counters, tuple | list):
            raise TypeError("counters must be a sequence")
        object.__setattr__(self, "counters", tuple(_counter(c) for c in self.counters))

    @property
    def cost_usd(self) -> str:
        """The cost in USD, exact, six decimal places: ``"0.003800"``."""
        return usd_text(self.cost_micros)

    @property
    def windows(self) -> tuple[tuple[str, int, int], ...]:
        """The distinct (window, period start, period end) of ``counters``, in order."""
        return tuple(dict.fromkeys((c[1], c[2], c[3]) for c in self.counters))

    def to_json(self) -> str:
        """The entry as one line of JSON (no newline)."""
        obj: dict[str, Any] = {"v": FORMAT_VERSION}
        for name in ("time", *_STR_FIELDS[:5], *_TOKEN_FIELDS, "cost_micros"):
            obj[name] = getattr(self, name)
        obj["cost_usd"] = self.cost_usd
        obj["outcome"] = self.outcome
        obj["usage_missing"] = self.usage_missing
        obj["epoch"] = self.epoch
        obj["counters"] = [list(c) for c in self.counters]
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, line: str | bytes) -> JournalEntry:
        """Parse one line written by ``to_json``; ``ValueError`` names what is wrong."""
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if obj.keys() != _KEYS:
            missing, unknown = sorted(_KEYS - obj.keys()), sorted(obj.keys() - _KEYS)
            raise ValueError(f"keys: missing {missing}, unknown {unknown}")
        if obj["v"] != FORMAT_VERSION or isinstance(obj["v"], bool):
            raise ValueError(f"unsupported version {obj['v']!r}")
        counters = obj["counters"]
        if not isinstance(counters, list) or not all(isinstance(c, list) for c in counters):
            raise ValueError("counters must be a list of lists")
        fields = {k: obj[k] for k in _KEYS - {"v", "cost_usd", "counters"}}
        try:
            entry = cls(**fields, counters=tuple(tuple(c) for c in counters))
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        if obj["cost_usd"] != entry.cost_usd:
            raise ValueError(f"cost_usd {obj['cost_usd']!r} is not cost_micros {entry.cost_micros}")
        return entry


def _check_int(name: str, value: object, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer")
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} out of range [0, {maximum}]: {value}")


def _counter(value: object) -> CounterKey:
    if not isinstance(value, tuple | list) or len(value) not in (4, 5):
        raise TypeError("a counter is (agent or None, window, period start, period end[, kind])")
    agent, window, start, end = value[:4]
    if not (agent is None or isinstance(agent, str)) or not isinstance(window, str):
        raise TypeError("a counter's agent is a string or None, its window a string")
    _check_int("period start", start, int(_MAX_TIME))
    _check_int("period end", end, int(_MAX_TIME))
    if start > end:
        raise ValueError(f"period start {start} is after its end {end}")
    if len(value) == 4:
        return (agent, window, start, end)
    kind = value[4]
    if kind not in SCOPE_KINDS or agent is None:
        raise ValueError("a counter's kind is 'model' or 'user', named in its first item")
    return (agent, window, start, end, kind)


def _month(t: float) -> str:
    tm = time.gmtime(t)
    return f"{tm.tm_year:04d}-{tm.tm_mon:02d}"


# --- reading ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Malformed:
    """A line ``read_entries`` skipped: its file, 1-based line number and why."""

    path: Path
    line: int
    reason: str


class EntryReader(Iterator[JournalEntry]):
    """The entries of some journal files, in file then line order, skipping bad lines.

        reader = read_entries(journal_files(path))
        total = sum(e.cost_micros for e in reader)
        if reader.malformed: ...   # how many lines were skipped; reader.problems: the first 100

    The counts are complete once the iteration has ended."""

    def __init__(self, paths: Iterable[Path], *, max_problems: int = 100) -> None:
        self.malformed = 0
        self.problems: list[Malformed] = []
        self._max_problems = max_problems
        self._entries = self._read(list(paths))

    def __next__(self) -> JournalEntry:
        return next(self._entries)

    def close(self) -> None:
        """Stop early, closing the file being read."""
        self._entries.close()

    def _skip(self, path: Path, line: int, reason: str) -> None:
        self.malformed += 1
        if len(self.problems) < self._max_problems:
            self.problems.append(Malformed(path, line, reason))

    def _read(self, paths: list[Path]) -> Generator[JournalEntry, None, None]:
        for path in paths:
            with path.open("rb") as f:
                number = 0
                while raw := f.readline(MAX_LINE_BYTES + 1):
                    number += 1
                    if len(raw) > MAX_LINE_BYTES:
                        while raw and not raw.endswith(b"\n"):
                            raw = f.readline(MAX_LINE_BYTES + 1)
                        self._skip(path, number, "line too long")
                        continue
                    if not raw.strip():
                        continue
                    try:
                        entry = JournalEntry.from_json(raw)
                    except ValueError as exc:
                        self._skip(path, number, str(exc))
                        continue
                    yield entry


def read_entries(paths: Iterable[Path]) -> EntryReader:
    """Iterate the entries of ``paths``; malformed lines are skipped and counted on the
    returned reader (``reader.malformed``, ``reader.problems``). A missing file raises."""
    return EntryReader(paths)


def journal_files(path: Path) -> list[Path]:
    """``path``'s rotated files, oldest first, then ``path`` itself (those that exist)."""
    found = sorted(_rotated(path).items())
    return [p for _, p in found] + ([path] if path.exists() else [])


def _rotated(path: Path) -> dict[tuple[str, int], Path]:
    pattern = re.compile(
        rf"{re.escape(path.stem)}\.(\d{{4}}-\d{{2}})\.([1-9]\d{{0,8}}){re.escape(path.suffix)}"
    )
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return {}
    found: dict[tuple[str, int], Path] = {}
    for name in names:
        if m := pattern.fullmatch(name):
            found[(m[1], int(m[2]))] = path.parent / name
    return found


# --- writing ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class JournalStats:
    """Line counts since the journal was made. ``pending``: accepted, not yet written."""

    written: int
    dropped: int
    rotations: int
    write_errors: int
    pending: int


@dataclass(frozen=True, slots=True)
class _Line:
    data: bytes
    month: str
    seq: int


class Journal:
    """The append-only spend journal at ``path`` (see the module docstring).

    async with Journal(path, max_bytes=64 * 1024**2) as journal:
        journal.append(entry)
        await journal.flush()   # True: everything appended so far is on disk
    """

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        flush_interval_s: float = 1.0,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < 1 or max_pending < 1 or not flush_interval_s > 0:
            raise ValueError("max_bytes, max_pending and flush_interval_s must be positive")
        self._path = Path(path)
        self._max_bytes = max_bytes
        self._interval = flush_interval_s
        self._max_pending = max_pending
        self._wake_at = max(1, max_pending // 2)
        self._clock = clock
        self._wake = threading.Event()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Shared with the writer, under _lock.
        self._lock = threading.Lock()
        self._state = "new"  # -> starting -> running -> closing -> closed
        self._buf: list[JournalEntry] = []
        self._waiters: list[tuple[int, concurrent.futures.Future[bool]]] = []
        self._accepted = 0
        self._pending = 0
        self._dropped = 0
        self._burst = 0  # drops since the buffer last had room
        # The writer's own (the writer thread, or start() before it runs).
        self._carry: list[_Line] = []  # drained, not yet fully written, oldest first
        self._offset = 0  # bytes of _carry[0] already written
        self._seq = 0
        self._written = 0
        self._rotations = 0
        self._write_errors = 0
        self._failing = False
        self._fd: int | None = None
        self._size = 0
        self._file_month: str | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def stats(self) -> JournalStats:
        with self._lock:
            return JournalStats(
                written=self._written,
                dropped=self._dropped,
                rotations=self._rotations,
                write_errors=self._write_errors,
                pending=self._pending,
            )

    def append(self, entry: JournalEntry) -> None:
        """Queue ``entry`` for writing. O(1), no IO; a full or closed journal drops it."""
        with self._lock:
            if self._state in ("new", "starting", "running") and self._pending < self._max_pending:
                self._buf.append(entry)
                self._pending += 1
                self._accepted += 1
                if len(self._buf) == self._wake_at:
                    self._wake.set()
                return
            self._dropped += 1
            self._burst += 1
            if self._burst > 1:
                return
            closed = self._state in ("closing", "closed")
        reason = "journal closed" if closed else f"journal buffer full ({self._max_pending})"
        _log.warning("%s: dropping entries", reason, extra={"fields": {"path": str(self._path)}})

    async def start(self) -> None:
        """Open the file (``OSError`` if it cannot be) and start the writer thread."""
        with self._lock:
            if self._state != "new":
                raise RuntimeError(f"journal is {self._state}")
            self._state = "starting"
        try:
            await asyncio.to_thread(self._open)
        except BaseException:
            with self._lock:
                closing = self._state == "closing"  # an aclose() is waiting
                if not closing:
                    self._state = "new"
            if closing:
                self._finish()
            raise
        thread = threading.Thread(target=self._run, name="capproxy-journal", daemon=True)
        with self._lock:
            if self._state == "starting":
                self._state = "running"
        thread.start()  # if an aclose() came meanwhile, it makes its one last attempt

    async def flush(self) -> bool:
        """Have the writer write everything appended so far now.

        True when none of it is still pending (a failed write leaves it pending, to be
        retried with the next batch). After ``aclose``: whether nothing is pending."""
        fut: concurrent.futures.Future[bool] = concurrent.futures.Future()
        with self._lock:
            if self._state in ("new", "starting"):
                raise RuntimeError("journal not started")
            if self._state != "running":
                return self._pending == 0
            self._waiters.append((self._accepted, fut))
        self._wake.set()
        return await asyncio.shield(asyncio.wrap_future(fut))

    async def aclose(self) -> None:
        """Write what is pending (one last attempt), stop the writer, close the file.

        Idempotent. Entries appended from now on are dropped and counted."""
        with self._lock:
            state = self._state
            if state == "new":
                self._state = "closed"
                lost, self._pending = self._pending, 0
                self._dropped += lost
                self._buf.clear()
            elif state in ("starting", "running"):
                self._state = "closing"
        if state == "new":
            if lost:
                _log.error("journal closed before it started: %d entries dropped", lost)
            return
        self._wake.set()
        await asyncio.shield(asyncio.wrap_future(self._done))

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # --- the writer thread ----------------------------------------------------------

    def _run(self) -> None:
        try:
            closing = False
            while not closing:
                self._wake.wait(self._interval)
                self._wake.clear()
                with self._lock:
                    batch, self._buf = self._buf, []
                    waiters, self._waiters = self._waiters, []
                    closing = self._state == "closing"
                try:
                    self._encode(batch)
                    self._write_batch()
                except Exception:  # a bug, not IO: log it, keep journaling
                    _log.exception("journal writer failed")
                first = self._carry[0].seq if self._carry else self._seq + 1
                for target, fut in waiters:
                    _resolve(fut, first > target)
                self._end_burst(closing)
        finally:
            self._finish()

    def _encode(self, batch: list[JournalEntry]) -> None:
        for entry in batch:
            self._seq += 1
            try:
                data = (entry.to_json() + "\n").encode("ascii")
            except Exception:
                _log.exception("journal entry not encodable: dropped")
                with self._lock:
                    self._pending -= 1
                    self._dropped += 1
                continue
            self._carry.append(_Line(data, _month(entry.time), self._seq))

    def _end_burst(self, closing: bool) -> None:
        with self._lock:
            if closing or not self._burst or self._pending >= self._max_pending:
                return
            burst, self._burst = self._burst, 0
        _log.warning("journal buffer was full: %d entries dropped", burst)

    def _finish(self) -> None:
        with self._lock:
            self._state = "closed"
            lost = len(self._carry) + len(self._buf)
            self._pending -= lost
            self._dropped += lost
            self._buf.clear()
            waiters, self._waiters = self._waiters, []
        self._carry.clear()
        if lost:
            _log.error("journal closed with %d entries unwritten: dropped", lost)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        for _, fut in waiters:
            _resolve(fut, False)
        _resolve(self._done, None)

    def _write_batch(self) -> None:
        """Write the carried lines, rotating on the way; fsync once if anything was written."""
        written, errors, rotate = False, 0, True
        while self._carry:
            try:
                if self._fd is None:
                    self._open()
                if rotate and self._offset == 0 and self._needs_rotation(self._carry[0]):
                    try:
                        self._rotate()
                    except OSError as exc:
                        errors += 1
                        rotate = False  # this batch stays in the current file
                        self._error("rotation", exc)
                        if self._fd is None:
                            continue
                written = True
                self._write_lines(self._segment(rotate))
            except OSError as exc:
                errors += 1
                self._error("write", exc)
                if self._offset == 0 and self._fd is not None:
                    # Reopen next time (the path may have been fixed), unless a line is
                    # half written: that one is finished in this file first.
                    fd, self._fd = self._fd, None
                    with contextlib.suppress(OSError):
                        os.fsync(fd)
                    with contextlib.suppress(OSError):
                        os.close(fd)
                break
        if written and self._fd is not None:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                errors += 1
                self._error("fsync", exc)
        if not errors and self._failing:
            self._failing = False
            _log.warning("journal writes recovered", extra={"fields": self._fields()})

    def _needs_rotation(self, line: _Line, size: int | None = None) -> bool:
        size = self._size if size is None else size
        if size == 0:
            return False
        month = self._file_month
        return size + len(line.data) > self._max_bytes or (month is not None and line.month > month)

    def _segment(self, rotate: bool) -> int:
        """How many carried lines go to the current file in one write."""
        size = self._size - self._offset
        total = 0
        for n, line in enumerate(self._carry):
            if n and (total >= _MAX_WRITE or (rotate and self._needs_rotation(line, size))):
                return n
            if size == 0:
                self._file_month = line.month
            size += len(line.data)
            total += len(line.data)
        return len(self._carry)

    def _write_lines(self, n: int) -> None:
        """Write the first ``n`` carried lines (from ``_offset``); account even on error."""
        assert self._fd is not None
        data = memoryview(b"".join(line.data for line in self._carry[:n]))
        start = pos = self._offset
        try:
            while pos < len(data):
                wrote = os.write(self._fd, data[pos:])
                if wrote <= 0:
                    raise OSError("write made no progress")
                pos += wrote
        finally:
            self._size += pos - start
            done = 0
            for line in self._carry[:n]:
                if pos < len(line.data):
                    break
                pos -= len(line.data)
                done += 1
            del self._carry[:done]
            self._offset = pos
            with self._lock:
                self._written += done
                self._pending -= done

    def _open(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, _OPEN_FLAGS, _FILE_MODE)
        try:
            size = os.fstat(fd).st_size
            month, last = self._read_ends() if size else (None, b"\n")
            if last != b"\n":  # torn by a crash: end the fragment so the next line is whole
                os.write(fd, b"\n")
                size += 1
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._size = fd, size
        self._file_month = month if month or not size else _month(self._clock())

    def _read_ends(self) -> tuple[str | None, bytes]:
        """The month of the file's first line (if it parses) and its last byte."""
        with self._path.open("rb") as f:
            first = f.readline(MAX_LINE_BYTES + 1)
            f.seek(-1, os.SEEK_END)
            last = f.read(1)
        try:
            return _month(JournalEntry.from_json(first).time), last
        except ValueError:
            return None, last

    def _rotate(self) -> None:
        assert self._fd is not None
        month = self._file_month or _month(self._clock())
        n = 1 + max((k for m, k in _rotated(self._path) if m == month), default=0)
        target = self._path.with_name(f"{self._path.stem}.{month}.{n}{self._path.suffix}")
        if target.exists():
            raise FileExistsError(target)
        os.rename(self._path, target)
        with self._lock:
            self._rotations += 1
        fd, self._fd, self._size, self._file_month = self._fd, None, 0, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self._path.parent)
        self._open()

    def _error(self, what: str, exc: OSError) -> None:
        with self._lock:
            self._write_errors += 1
        if not self._failing:
            self._failing = True
            _log.warning(
                "journal %s failed; retrying with the next batch",
                what,
                extra={"fields": {**self._fields(), "error": str(exc)}},
            )

    def _fields(self) -> dict[str, Any]:
        return {"path": str(self._path), "pending": self._pending}


def _resolve(fut: concurrent.futures.Future[Any], value: Any) -> None:
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        fut.set_result(value)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def journal_counter(counter: Counter, period: Period) -> CounterKey:
    """How the journal names a budget counter in its period."""
    kind, ident = counter.scope
    window = counter.window.value
    if kind in SCOPE_KINDS:
        return (ident, window, period.start, period.end, kind)
    return (counter.agent_id, window, period.start, period.end)


def counter_of(tenant: str, key: CounterKey) -> Counter:
    """The budget counter a journal entry names (its limit unknown: 0)."""
    window = Window(key[1])
    if len(key) == 5:
        if key[4] == "model":
            return Counter(tenant, None, window, 0, model_cap=key[0])
        return Counter(tenant, None, window, 0, user_id=key[0])
    return Counter(tenant, key[0], window, 0)

"""Hot reload of the caps file: watch it, validate each new version, swap the runtime.

    reloader = Reloader(path, app[RUNTIME], on_result=count_reload)
    task = asyncio.create_task(reloader.run())   # owned by a cleanup_ctx, cancelled at shutdown
    loop.add_signal_handler(signal.SIGHUP, reloader.trigger)

Detection: ``os.stat`` (mtime, size, inode, device) is polled every ``interval_s``, which sees
in-place writes as well as editors' write-a-temp-then-rename saves. A new stat is acted on once
it has held still across two polls, and the bytes count only if the stat did not move while
they were read, so a writer caught mid-write is normally not loaded at all. A writer that pauses
longer than two polls can still have its partial file loaded: it is rejected and reported once if
invalid, and the finished version is loaded when the stat changes again (a partial file that
happens to be valid applies until then; saving by rename avoids both). Bytes identical to the
active version (a touch) are ignored silently; bytes identical to the last rejected version are
not reported again.

Loading: parsing, validation and ``Runtime.build`` run in the default executor. The swap is the
single assignment ``ref.current = runtime``: a request reads ``ref.current`` once, so it ends
under the version it started with. A rejected file (unreadable, bad YAML, invalid settings, a
runtime that cannot be built) leaves the active version in place and logs each
``file:line: field.path: message`` line. Spend lives in the store, which reloading never touches.

Restart-only sections: ``server`` and ``store`` are bound when the process starts (listen socket,
store connection), so a change there is logged as needing a restart, the running values are
kept, and the rest of the file applies. ``time_zone`` applies on reload, with a warning: budget
windows realign to the new zone from the next request on, and spend already recorded stays in
the periods of the old alignment (a restart would realign them the same way).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from proxy.config import ConfigError, Settings, settings_from_bytes
from proxy.state import Runtime, RuntimeRef

__all__ = ["RESTART_SECTIONS", "Reloader"]

log = logging.getLogger("capproxy.reload")

RESTART_SECTIONS = ("server", "store", "alerts")
"""Top-level sections that only a restart applies; a reload keeps their running values."""


class _Stat(NamedTuple):
    mtime_ns: int
    size: int
    ino: int
    dev: int


_MISSING = _Stat(-1, -1, -1, -1)
"""The stat of a file that cannot be stat'ed (deleted, or mid-rename on some systems)."""


def _stat(path: Path) -> _Stat:
    try:
        st = os.stat(path)
    except OSError:
        return _MISSING
    return _Stat(st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    """One read of the file; ``steady`` is false when its stat moved during the read."""

    stat: _Stat
    raw: bytes | None
    error: str
    steady: bool

    @property
    def digest(self) -> bytes:
        return b"" if self.raw is None else hashlib.sha256(self.raw).digest()


def _read(path: Path) -> _Snapshot:
    before = _stat(path)
    try:
        raw: bytes | None = path.read_bytes()
        error = ""
    except OSError as exc:
        raw, error = None, f"{path}: cannot read: {exc.strerror or exc}"
    after = _stat(path)
    return _Snapshot(after, raw, error, steady=before == after)


@dataclass(frozen=True, slots=True)
class _Candidate:
    """A valid new version: what differs from the running settings, and its runtime."""

    settings: Settings
    changed: tuple[str, ...]  # top-level sections that now differ
    pinned: tuple[str, ...]  # restart-only sections whose new values were set aside
    runtime: Runtime | None  # None when nothing changed
    file_sections: dict[str, object]  # the restart-only sections as this version has them


class Reloader:
    """Watches the caps file and swaps the runtime when a valid new version appears.

    ``run()`` is the watch loop (a tracked task, cancelled at shutdown); ``trigger()`` asks it
    to reload now (SIGHUP), even if the stat looks unchanged; ``reload()`` does one check,
    load, validate and swap, and answers whether a new version became active. ``on_result``
    hears ``True`` for each version applied and ``False`` for each version rejected.
    The reloader is the only writer of ``ref.current``.
    """

    def __init__(
        self,
        path: Path,
        ref: RuntimeRef,
        *,
        build: Callable[[Settings], Runtime] = Runtime.build,
        on_result: Callable[[bool], None] | None = None,
        interval_s: float = 0.25,
    ) -> None:
        self._path = Path(path)
        self._ref = ref
        self._build = build
        self._on_result = on_result
        self._interval_s = interval_s
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._requested = False
        self._polled: _Stat | None = None  # the stat seen by the last poll
        self._judged: _Stat | None = None  # the stat whose bytes were last judged
        self._active: bytes | None = None  # digest of the bytes behind ref.current
        # Restart-only sections as the file had them when last accepted. They are compared
        # with the file, not with the running settings, which command-line flags may override.
        self._file_sections: dict[str, object] | None = None
        self._rejected: bytes | None = None  # digest of the last rejected bytes

    async def run(self) -> None:
        """Poll until cancelled. The first look at the file adopts it as the active version
        (quietly when it matches the running settings, as it does after a normal start)."""
        while True:
            self._wake.clear()
            try:
                if self._requested:
                    self._requested = False
                    log.info("%s: reload requested", self._path)
                    await self.reload()
                else:
                    await self._poll()
            except Exception:
                log.exception("%s: unexpected error while checking; still watching", self._path)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await self._wake.wait()

    def trigger(self) -> None:
        """Reload at the loop's next turn. Call it on the event loop thread (a handler
        installed with ``loop.add_signal_handler``)."""
        self._requested = True
        self._wake.set()

    async def reload(self) -> bool:
        """Read the file now and apply it if it is a valid new version; ``True`` if it became
        active. Unlike polling, this re-reports a version rejected before."""
        return await self._check(requested=True)

    # --- internals -------------------------------------------------------------------------

    async def _poll(self) -> bool:
        loop = asyncio.get_running_loop()
        stat = await loop.run_in_executor(None, _stat, self._path)
        settled = stat == self._polled
        self._polled = stat
        if not settled or stat == self._judged:
            return False
        return await self._check(requested=False)

    async def _check(self, *, requested: bool) -> bool:
        async with self._lock:
            loop = asyncio.get_running_loop()
            snap = await loop.run_in_executor(None, _read, self._path)
            self._polled = snap.stat
            if not snap.steady:
                return False  # still being written; polling loads it once it holds still
            self._judged = snap.stat
            digest = snap.digest
            if digest == self._active:
                if self._rejected is not None:
                    log.info("%s: back to the active version", self._path)
                elif requested:
                    log.info("%s: unchanged; nothing to reload", self._path)
                self._rejected = None
                return False
            if digest == self._rejected and not requested:
                return False
            running = self._ref.current
            try:
                if snap.raw is None:
                    raise ConfigError([snap.error])
                candidate = await loop.run_in_executor(
                    None, self._prepare, snap.raw, running.settings, self._file_sections
                )
            except ConfigError as exc:
                self._reject(digest, exc.errors)
                return False
            except Exception as exc:
                log.debug("runtime build failed", exc_info=True)
                problem = f"{self._path}: cannot build the runtime: {type(exc).__name__}: {exc}"
                self._reject(digest, [problem])
                return False
            first_look = self._active is None and self._rejected is None
            self._active, self._rejected = digest, None
            self._file_sections = candidate.file_sections
            return self._apply(candidate, running.settings, quiet=first_look)

    def _prepare(
        self, raw: bytes, running: Settings, previous: dict[str, object] | None
    ) -> _Candidate:
        """Off the event loop: parse, validate, set restart-only sections aside, build."""
        settings = settings_from_bytes(raw, source=str(self._path), base_dir=self._path.parent)
        file_sections = {s: getattr(settings, s) for s in RESTART_SECTIONS}
        # On the first look the running values came from this file (plus any flags).
        pinned = tuple(
            s for s in RESTART_SECTIONS if previous is not None and file_sections[s] != previous[s]
        )
        settings = settings.model_copy(update={s: getattr(running, s) for s in RESTART_SECTIONS})
        changed = tuple(
            name
            for name in Settings.model_fields
            if getattr(settings, name) != getattr(running, name)
        )
        runtime = self._build(settings) if changed else None
        return _Candidate(settings, changed, pinned, runtime, file_sections)

    def _apply(self, candidate: _Candidate, old: Settings, *, quiet: bool) -> bool:
        if candidate.pinned:
            log.warning(
                "%s: %s changed; restart capproxy to apply (the running values stay in effect)",
                self._path,
                " and ".join(candidate.pinned),
            )
        if candidate.runtime is None:
            if not quiet:
                log.info("%s: new version, no effective change", self._path)
            return False
        new = candidate.settings
        if "time_zone" in candidate.changed:
            log.warning(
                "%s: time_zone %s -> %s: budget windows now align to %s; spend already "
                "recorded stays in the periods of the old alignment",
                self._path,
                old.time_zone,
                new.time_zone,
                new.time_zone,
            )
        self._ref.current = candidate.runtime
        log.info(
            "%s: reloaded; changed: %s (%s)", self._path, ", ".join(candidate.changed), _sizes(new)
        )
        self._report(True)
        return True

    def _reject(self, digest: bytes, errors: Iterable[str]) -> None:
        self._rejected = digest
        lines = tuple(errors)
        log.error(
            "%s: rejected, the active version stays in effect (%d problem%s):",
            self._path,
            len(lines),
            "" if len(lines) == 1 else "s",
        )
        for line in lines:
            log.error("  %s", line)
        self._report(False)

    def _report(self, ok: bool) -> None:
        if self._on_result is None:
            return
        try:
            self._on_result(ok)
        except Exception:
            log.exception("reload result hook failed")


def _sizes(settings: Settings) -> str:
    def count(n: int, noun: str) -> str:
        return f"{n} {noun}" + ("" if n == 1 else "s")

    return ", ".join(
        (
            count(len(settings.tenants), "tenant"),
            count(len(settings.cost_caps.agents), "agent override"),
            count(len(settings.upstreams), "upstream"),
            count(len(settings.pricing.models), "priced model"),
        )
    )

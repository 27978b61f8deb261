"""The caps-file watcher: a real file on disk, the real parser and runtime builder."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import reload as reload_module
from proxy.config import Settings, load_settings
from proxy.reload import Reloader
from proxy.state import Runtime, RuntimeRef
from tests.harness import OTHER_KEY, TENANT_KEY, UPSTREAM_KEY, merge

INTERVAL_S = 0.02
DEADLINE_S = 2.0  # a new version must be active this soon after the save


def caps(daily: int | str = 100, **over: Any) -> dict[str, Any]:
    """A caps file as data: two tenants, default hourly and daily caps, one priced model."""
    base: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 8080},
        "store": {"url": "memory://", "timeout_ms": 250},
        "upstreams": [
            {"name": "fake", "base_url": "http://127.0.0.1:9/v1", "api_key": UPSTREAM_KEY}
        ],
        "tenants": [
            {"id": "acme", "api_keys": [TENANT_KEY]},
            {"id": "globex", "api_keys": [OTHER_KEY]},
        ],
        "cost_caps": {
            "default_budget_caps": [
                {"window": "hourly", "hard_limit_usd": 10, "soft_limit_usd": 8},
                {"window": "daily", "hard_limit_usd": daily},
            ],
            "agents": [
                {
                    "agent_id": "premium-agent",
                    "budget_caps": [{"window": "daily", "hard_limit_usd": 500}],
                }
            ],
        },
        "pricing": {"models": {"test-model": {"input_per_mtok": 1, "output_per_mtok": 2}}},
    }
    return merge(base, over)


def dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def write_in_place(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)


def write_by_rename(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def daily_cap(runtime: Runtime) -> Decimal:
    caps = runtime.settings.cost_caps.default_budget_caps
    return next(cap.hard_limit_usd for cap in caps if cap.window == "daily")


@dataclass
class Watch:
    """A running reloader over ``path``, with what it reported and how often it looked."""

    path: Path
    ref: RuntimeRef
    reloader: Reloader
    results: list[bool] = field(default_factory=list)
    looks: list[int] = field(default_factory=lambda: [0])

    async def until(self, done: Callable[[], bool], what: str) -> None:
        """Poll ``done`` in small steps; fail after ``DEADLINE_S``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while not done():
            if loop.time() > deadline:
                pytest.fail(f"not within {DEADLINE_S} s: {what}")
            await asyncio.sleep(INTERVAL_S / 2)

    async def cap_becomes(self, value: int) -> None:
        await self.until(lambda: daily_cap(self.ref.current) == value, f"daily cap {value}")

    async def polls(self, n: int = 5) -> None:
        """Let the watcher stat the file ``n`` more times (one per poll, two per read)."""
        target = self.looks[0] + n
        await self.until(lambda: self.looks[0] >= target, f"{n} more polls")


def start_file(path: Path, text: str) -> RuntimeRef:
    """Write the first version, dated in the past so that any later write changes the mtime."""
    path.write_text(text, encoding="utf-8")
    st = path.stat()
    past = st.st_mtime_ns - 10_000_000_000
    os.utime(path, ns=(past, past))
    return RuntimeRef(Runtime.build(load_settings(path)))


@pytest.fixture
def counted_stat(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the watcher's looks at the file."""
    calls = [0]
    real = reload_module._stat

    def counting(path: Path) -> Any:
        calls[0] += 1
        return real(path)

    monkeypatch.setattr(reload_module, "_stat", counting)
    return calls


@pytest.fixture
async def watch(
    tmp_path: Path, counted_stat: list[int], caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Watch]:
    caplog.set_level(logging.INFO, logger="capproxy.reload")
    path = tmp_path / "caps.yaml"
    ref = start_file(path, dump(caps()))
    results: list[bool] = []
    reloader = Reloader(path, ref, on_result=results.append, interval_s=INTERVAL_S)
    assert await reloader.reload() is False  # adopts the file the runtime came from
    w = Watch(path, ref, reloader, results, counted_stat)
    task = asyncio.create_task(reloader.run())
    await w.polls(2)
    caplog.clear()
    try:
        yield w
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=1)


def reload_logs(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "capproxy.reload" and r.levelno >= level
    ]


# --- applying new versions ---------------------------------------------------------------


async def test_in_place_write_lowers_cap(watch: Watch, caplog: pytest.LogCaptureFixture) -> None:
    write_in_place(watch.path, dump(caps(daily=40)))
    await watch.cap_becomes(40)
    assert watch.results == [True]
    (line,) = reload_logs(caplog)
    assert "reloaded; changed: cost_caps" in line
    assert "2 tenants, 1 agent override, 1 upstream, 1 priced model" in line


async def test_rename_based_save_is_detected(watch: Watch) -> None:
    before = watch.path.stat().st_ino
    write_by_rename(watch.path, dump(caps(daily=55)))
    assert watch.path.stat().st_ino != before
    await watch.cap_becomes(55)
    assert watch.results == [True]


async def test_summary_lists_sections_and_no_secret(
    watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    new_secret = "sk-brand-new-upstream-secret"
    data = caps(daily=70)
    data["upstreams"][0]["api_key"] = new_secret
    data["tenants"].append({"id": "initech", "api_keys": ["sk-initech-key"]})
    write_in_place(watch.path, dump(data))
    await watch.cap_becomes(70)
    (line,) = reload_logs(caplog)
    assert "changed: upstreams, tenants, cost_caps (3 tenants," in line
    assert new_secret not in caplog.text
    assert "sk-initech-key" not in caplog.text
    tenant = watch.ref.current.settings.tenant("initech")
    assert tenant is not None


async def test_request_in_flight_keeps_its_version(watch: Watch) -> None:
    in_flight = watch.ref.current  # what a request reads once at its start
    write_in_place(watch.path, dump(caps(daily=25)))
    await watch.cap_becomes(25)
    assert daily_cap(in_flight) == 100
    assert watch.ref.current is not in_flight


async def test_writer_caught_mid_write_is_rejected_once_then_picked_up(
    watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    text = dump(caps(daily=50))
    cut = text.index("hard_limit_usd: 50") + len("hard_li")  # mid-key: invalid YAML
    with watch.path.open("w", encoding="utf-8") as f:
        f.write(text[:cut])
        f.flush()
        await watch.until(lambda: watch.results == [False], "the torn file is rejected")
        await watch.polls(5)
        assert watch.results == [False]
        assert daily_cap(watch.ref.current) == 100
        f.write(text[cut:])
    await watch.cap_becomes(50)
    assert watch.results == [False, True]
    errors = reload_logs(caplog, logging.ERROR)
    assert any(re.search(rf"{re.escape(str(watch.path))}:\d+: <yaml>: ", e) for e in errors)


# --- rejecting bad versions --------------------------------------------------------------


def _with(section: str, value: Any) -> Callable[[], str]:
    return lambda: dump(caps(**{section: value}))


def _bad_daily(**cap: Any) -> Callable[[], str]:
    def text() -> str:
        data = caps()
        data["cost_caps"]["default_budget_caps"][1] = {"window": "daily", **cap}
        return dump(data)

    return text


def _truncated() -> str:
    text = dump(caps(daily=30))
    cut = text.index("hard_limit_usd: 30")  # about half-way: the daily cap lost its limit
    assert len(text) // 3 < cut < 2 * len(text) // 3
    return text[:cut]


BAD_FILES: dict[str, tuple[Callable[[], str], str]] = {
    "yaml syntax": (lambda: dump(caps()) + "tenants: [unclosed\n", r"<yaml>: "),
    "unknown field": (
        lambda: dump(caps(cost_caps={"bogus": 1})),
        r"cost_caps\.bogus: Extra inputs are not permitted",
    ),
    "negative cap": (
        _bad_daily(hard_limit_usd=-5),
        r"cost_caps\.default_budget_caps\[1\]\.hard_limit_usd: ",
    ),
    "soft above hard": (
        _bad_daily(hard_limit_usd=100, soft_limit_usd=150),
        r"cost_caps\.default_budget_caps\[1\]\.soft_limit_usd: must be below hard_limit_usd",
    ),
    "unknown window": (
        lambda: dump(
            caps(cost_caps={"default_budget_caps": [{"window": "yearly", "hard_limit_usd": 5}]})
        ),
        r"cost_caps\.default_budget_caps\[0\]\.window: ",
    ),
    "truncated half file": (
        _truncated,
        r"cost_caps\.default_budget_caps\[1\]\.hard_limit_usd: Field required",
    ),
    "missing price": (
        _with("pricing", {"models": {"my-model": {"output_per_mtok": 1}}}),
        r"pricing\.models\['?my-model'?\]\.input_per_mtok: Field required",
    ),
    "not utf-8": (lambda: dump(caps()) + "# \udcff\n", r"<file>: not valid UTF-8"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
async def test_bad_file_keeps_old_config_reports_once_then_good_file_applies(
    watch: Watch, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    make, expected = BAD_FILES[kind]
    active = watch.ref.current
    watch.path.write_bytes(make().encode("utf-8", "surrogateescape"))
    await watch.until(lambda: watch.results == [False], f"{kind} is rejected")
    await watch.polls(5)
    assert watch.results == [False]  # reported once, not on every poll
    assert watch.ref.current is active
    errors = reload_logs(caplog, logging.ERROR)
    assert "rejected, the active version stays in effect" in errors[0]
    pattern = rf"{re.escape(str(watch.path))}:\d+: {expected}"
    assert any(re.search(pattern, e) for e in errors[1:]), errors

    write_in_place(watch.path, dump(caps(daily=60)))
    await watch.cap_becomes(60)
    assert watch.results == [False, True]


async def test_touching_a_rejected_file_does_not_report_again(watch: Watch) -> None:
    watch.path.write_text("tenants: [\n", encoding="utf-8")
    await watch.until(lambda: watch.results == [False], "rejected")
    os.utime(watch.path)
    await watch.polls(5)
    assert watch.results == [False]


async def test_deleted_file_is_rejected_once_and_recreated_file_applies(watch: Watch) -> None:
    active = watch.ref.current
    watch.path.unlink()
    await watch.until(lambda: watch.results == [False], "deletion is rejected")
    await watch.polls(5)
    assert watch.results == [False]
    assert watch.ref.current is active
    write_in_place(watch.path, dump(caps(daily=45)))
    await watch.cap_becomes(45)


async def test_runtime_that_cannot_be_built_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "caps.yaml"
    ref = start_file(path, dump(caps()))
    results: list[bool] = []

    def build(settings: Settings) -> Runtime:
        raise RuntimeError("no tokenizer")

    reloader = Reloader(path, ref, build=build, on_result=results.append)
    active = ref.current
    write_in_place(path, dump(caps(daily=20)))
    assert await reloader.reload() is False
    assert ref.current is active
    assert results == [False]


async def test_reverting_to_the_active_version_is_quiet(
    watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    good = watch.path.read_text(encoding="utf-8")
    watch.path.write_text("tenants: [\n", encoding="utf-8")
    await watch.until(lambda: watch.results == [False], "rejected")
    active = watch.ref.current
    write_in_place(watch.path, good)
    await watch.until(
        lambda: any("back to the active version" in m for m in reload_logs(caplog)), "revert seen"
    )
    assert watch.ref.current is active
    assert watch.results == [False]


# --- what does not reload ----------------------------------------------------------------


async def test_touch_without_change_does_nothing(
    watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    active = watch.ref.current
    os.utime(watch.path)
    await watch.polls(5)
    write_by_rename(watch.path, watch.path.read_text(encoding="utf-8"))
    await watch.polls(5)
    assert watch.ref.current is active
    assert watch.results == []
    assert reload_logs(caplog, logging.DEBUG) == []


async def test_first_look_adopts_the_running_version_quietly(
    tmp_path: Path, counted_stat: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="capproxy.reload")
    path = tmp_path / "caps.yaml"
    ref = start_file(path, dump(caps()))
    active = ref.current
    results: list[bool] = []
    reloader = Reloader(path, ref, on_result=results.append, interval_s=INTERVAL_S)
    watch = Watch(path, ref, reloader, results, counted_stat)
    task = asyncio.create_task(reloader.run())
    try:
        await watch.polls(8)  # two polls to settle, one read, then more polls
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ref.current is active
    assert results == []
    assert reload_logs(caplog, logging.INFO) == []


async def test_first_look_with_command_line_overrides_warns_nothing(
    tmp_path: Path, counted_stat: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    # `capproxy serve --port` overrides server.port: the file still differs from the running
    # settings there, which is no change of the file and needs no restart warning.
    caplog.set_level(logging.DEBUG, logger="capproxy.reload")
    path = tmp_path / "caps.yaml"
    ref = start_file(path, dump(caps()))
    running = ref.current.settings
    overridden = running.model_copy(
        update={"server": running.server.model_copy(update={"port": 18099})}
    )
    ref.current = Runtime.build(overridden)
    results: list[bool] = []
    reloader = Reloader(path, ref, on_result=results.append, interval_s=INTERVAL_S)
    watch = Watch(path, ref, reloader, results, counted_stat)
    task = asyncio.create_task(reloader.run())
    try:
        await watch.polls(8)
        write_by_rename(path, dump(caps(daily=50)))
        await watch.until(lambda: daily_cap(ref.current) == 50, "the new cap")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert ref.current.settings.server.port == 18099
    assert not any("restart" in m for m in reload_logs(caplog, logging.WARNING))


# --- SIGHUP ------------------------------------------------------------------------------


async def test_sighup_reloads_a_change_the_stat_does_not_show(watch: Watch) -> None:
    before = watch.path.stat()
    write_in_place(watch.path, dump(caps(daily=200)))  # same size as daily=100
    os.utime(watch.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = watch.path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    await watch.polls(5)
    assert daily_cap(watch.ref.current) == 100

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, watch.reloader.trigger)
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        await watch.cap_becomes(200)
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
    assert watch.results == [True]


async def test_trigger_with_unchanged_file_reports_nothing(
    watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    active = watch.ref.current
    watch.reloader.trigger()
    await watch.until(lambda: any("unchanged" in m for m in reload_logs(caplog)), "looked")
    assert watch.ref.current is active
    assert watch.results == []


async def test_trigger_re_reports_a_rejected_version(watch: Watch) -> None:
    watch.path.write_text("tenants: [\n", encoding="utf-8")
    await watch.until(lambda: watch.results == [False], "rejected")
    watch.reloader.trigger()
    await watch.until(lambda: watch.results == [False, False], "rejected again on request")


async def test_reload_answers_whether_a_new_version_became_active(tmp_path: Path) -> None:
    path = tmp_path / "caps.yaml"
    ref = start_file(path, dump(caps()))
    reloader = Reloader(path, ref)
    assert await reloader.reload() is False
    write_in_place(path, dump(caps(daily=15)))
    assert await reloader.reload() is True
    assert daily_cap(ref.current) == 15
    assert await reloader.reload() is False


# --- restart-only sections and the time zone ---------------------------------------------


async def test_server_and_store_changes_keep_running_values(
    watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    old = watch.ref.current.settings
    data = caps(
        daily=35,
        server={"port": 9999, "max_body_bytes": 1024},
        store={"url": "redis://127.0.0.1:6390/0", "timeout_ms": 900},
    )
    write_in_place(watch.path, dump(data))
    await watch.cap_becomes(35)
    new = watch.ref.current.settings
    assert new.server == old.server
    assert new.store == old.store
    assert new.server.port == 8080
    assert new.store.url.get_secret_value() == "memory://"
    warnings = reload_logs(caplog, logging.WARNING)
    assert any("server and store changed; restart capproxy" in w for w in warnings), warnings
    assert "6390" not in caplog.text
    assert watch.results == [True]


async def test_server_only_change_swaps_nothing_but_warns(
    watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    active = watch.ref.current
    write_in_place(watch.path, dump(caps(server={"port": 9090})))
    await watch.until(
        lambda: any("server changed; restart" in m for m in reload_logs(caplog)), "warning"
    )
    assert watch.ref.current is active
    assert watch.results == []


async def test_time_zone_change_applies_with_a_warning(
    watch: Watch, caplog: pytest.LogCaptureFixture
) -> None:
    write_in_place(watch.path, dump(caps(time_zone="Europe/Paris")))
    await watch.until(lambda: watch.ref.current.settings.time_zone == "Europe/Paris", "new zone")
    assert watch.results == [True]
    warnings = reload_logs(caplog, logging.WARNING)
    assert any("time_zone UTC -> Europe/Paris" in w for w in warnings), warnings


# --- lifecycle ---------------------------------------------------------------------------


async def test_cancel_during_a_slow_build_exits_promptly_and_swaps_nothing(
    tmp_path: Path,
) -> None:
    path = tmp_path / "caps.yaml"
    ref = start_file(path, dump(caps()))
    active = ref.current
    entered, release = threading.Event(), threading.Event()

    def slow_build(settings: Settings) -> Runtime:
        entered.set()
        release.wait(timeout=5)
        return Runtime.build(settings)

    reloader = Reloader(path, ref, build=slow_build, interval_s=INTERVAL_S)
    write_in_place(path, dump(caps(daily=10)))
    task = asyncio.create_task(reloader.run())
    try:
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, entered.wait, DEADLINE_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=0.5)
    finally:
        release.set()
    assert ref.current is active


async def test_failing_result_hook_does_not_stop_the_watcher(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "caps.yaml"
    ref = start_file(path, dump(caps()))
    calls: list[bool] = []

    def hook(ok: bool) -> None:
        calls.append(ok)
        raise ValueError("metrics down")

    reloader = Reloader(path, ref, on_result=hook, interval_s=INTERVAL_S)
    await reloader.reload()
    task = asyncio.create_task(reloader.run())
    try:
        write_in_place(path, dump(caps(daily=11)))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while daily_cap(ref.current) != 11 and loop.time() < deadline:
            await asyncio.sleep(INTERVAL_S / 2)
        write_in_place(path, dump(caps(daily=12)))
        while daily_cap(ref.current) != 12 and loop.time() < deadline:
            await asyncio.sleep(INTERVAL_S / 2)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert daily_cap(ref.current) == 12
    assert calls == [True, True]
    assert "reload result hook failed" in caplog.text

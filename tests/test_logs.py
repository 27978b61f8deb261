from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest

from proxy import logs
from proxy.metrics import Outcome, RequestRecord

RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    """``setup`` changes the process-wide ``capproxy`` logger: put it back after each test."""
    loggers = [logging.getLogger(name) for name in (logs.ROOT, "aiohttp", "asyncio")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        for handler in list(logger.handlers):
            if handler not in handlers:
                logger.removeHandler(handler)
                handler.close()
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.fixture
def stream() -> io.StringIO:
    out = io.StringIO()
    logs.setup("INFO", stream=out)
    return out


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    text = stream.getvalue()
    assert text.endswith("\n") or not text
    return [json.loads(line) for line in text.splitlines()]


ALLOWED: dict[str, Any] = {
    "route": "chat/completions",
    "outcome": Outcome.ALLOWED,
    "status": 200,
    "tenant_id": "acme",
    "agent_id": "planner",
    "model": "gpt-4o",
    "prompt_tokens": 1200,
    "completion_tokens": 345,
    "cost_micros": 6_450,
    "duration_s": 0.81234,
    "upstream_s": 0.8,
    "streamed": True,
}


def allowed(**changes: Any) -> RequestRecord:
    """An allowed chat request's record, with ``changes``."""
    return RequestRecord(**{**ALLOWED, **changes})


def test_log_request_writes_one_json_line(stream: io.StringIO) -> None:
    logs.log_request(allowed())
    [line] = lines(stream)
    assert RFC3339_UTC.fullmatch(line.pop("ts"))
    assert line == {
        "level": "INFO",
        "logger": "capproxy.access",
        "msg": "request",
        "event": "request",
        "route": "chat/completions",
        "tenant": "acme",
        "agent": "planner",
        "model": "gpt-4o",
        "prompt_tokens": 1200,
        "completion_tokens": 345,
        "cost_usd": "0.006450",
        "outcome": "allowed",
        "status": 200,
        "latency_ms": 812.3,
        "upstream_ms": 800.0,
        "streamed": True,
        "usage_missing": False,
        "would_reject": None,
        "fail_open": False,
    }


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_an_access_line_is_the_same_with_or_without_another_handler(
    stream: io.StringIO,
) -> None:
    # Alone, the JSON handler gets the line written directly; with another handler on the
    # access logger, the line goes through logging: both write the same line.
    rec = allowed(agent_id="caf\u00e9 sk-abcdefghijklmnop")
    logs.log_request(rec)
    other = _Collect()
    access = logging.getLogger(logs.ACCESS)
    access.addHandler(other)
    try:
        logs.log_request(rec)
    finally:
        access.removeHandler(other)
    assert stream.getvalue().isascii()
    direct, through_logging = lines(stream)
    assert RFC3339_UTC.fullmatch(direct.pop("ts"))
    assert RFC3339_UTC.fullmatch(through_logging.pop("ts"))
    assert direct == through_logging
    assert direct["agent"] == "caf\u00e9 sk-[REDACTED]"
    [record] = other.records
    assert record.getMessage() == "request"


def test_timestamps_are_rfc3339_to_the_millisecond() -> None:
    assert logs._timestamp(0.0) == "1970-01-01T00:00:00.000Z"
    assert logs._timestamp(1_796_204_085.9996) == "2026-12-02T09:34:45.999Z"
    assert logs._timestamp(1_796_204_086.25) == "2026-12-02T09:34:46.250Z"


def test_log_request_of_a_rejection(stream: io.StringIO) -> None:
    logs.log_request(
        RequestRecord(
            route="responses",
            outcome=Outcome.BUDGET_REJECTED,
            status=429,
            tenant_id="acme",
            agent_id="x" * 500,
            model="gpt-4o",
            duration_s=0.0021,
        )
    )
    [line] = lines(stream)
    assert line["outcome"] == "budget_rejected"
    assert line["status"] == 429
    assert line["cost_usd"] is None
    assert line["upstream_ms"] is None
    assert line["latency_ms"] == 2.1
    assert line["agent"] == "x" * logs.MAX_VALUE_CHARS + "..."


@pytest.mark.parametrize(
    ("micros", "usd"),
    [(0, "0.000000"), (1, "0.000001"), (1_000_000, "1.000000"), (123_456_789, "123.456789")],
)
def test_cost_is_an_exact_decimal_string(stream: io.StringIO, micros: int, usd: str) -> None:
    logs.log_request(
        RequestRecord(route="embeddings", outcome=Outcome.ALLOWED, status=200, cost_micros=micros)
    )
    assert lines(stream)[0]["cost_usd"] == usd


def test_log_event(stream: io.StringIO) -> None:
    logs.log_event("startup", port=8080, tenants=3)
    logs.log_event("reload", level=logging.ERROR, result="error", error="tenants[0].id: bad")
    first, second = lines(stream)
    assert first["logger"] == "capproxy"
    assert (first["level"], first["msg"], first["event"]) == ("INFO", "startup", "startup")
    assert (first["port"], first["tenants"]) == (8080, 3)
    assert (second["level"], second["event"], second["result"]) == ("ERROR", "reload", "error")


def test_fields_cannot_replace_the_standard_keys(stream: io.StringIO) -> None:
    logging.getLogger("capproxy").info("real", extra={"fields": {"msg": "fake", "level": "X"}})
    [line] = lines(stream)
    assert (line["msg"], line["level"]) == ("real", "INFO")
    assert (line["field_msg"], line["field_level"]) == ("fake", "X")


def test_child_loggers_write_json_too(stream: io.StringIO) -> None:
    logging.getLogger("capproxy.ledger").warning("settle queue %s", "full")
    [line] = lines(stream)
    assert (line["logger"], line["level"], line["msg"]) == (
        "capproxy.ledger",
        "WARNING",
        "settle queue full",
    )


def test_aiohttp_lines_are_json_and_redacted(stream: io.StringIO) -> None:
    # aiohttp's server quotes the raw request line of a bad request, headers included.
    logging.getLogger("aiohttp.server").error(
        "Error handling request: bad header b'Authorization: Bearer sk-live-0123456789abcdef'"
    )
    [line] = lines(stream)
    assert line["logger"] == "aiohttp.server"
    assert "0123456789abcdef" not in stream.getvalue()


def test_setup_is_idempotent() -> None:
    first = io.StringIO()
    logs.setup(stream=first)
    logs.setup(stream=first)
    logs.log_event("once")
    assert len(lines(first)) == 1

    second = io.StringIO()
    logs.setup(stream=second)  # the last call's stream wins
    logs.log_event("moved")
    assert len(lines(first)) == 1
    assert [line["event"] for line in lines(second)] == ["moved"]
    assert (
        sum(isinstance(h, logging.StreamHandler) for h in logging.getLogger("capproxy").handlers)
        == 1
    )


def test_setup_leaves_the_root_logger_alone(stream: io.StringIO) -> None:
    root = io.StringIO()
    handler = logging.StreamHandler(root)
    logging.getLogger().addHandler(handler)
    try:
        logs.log_event("startup")
    finally:
        logging.getLogger().removeHandler(handler)
    assert root.getvalue() == ""
    assert len(lines(stream)) == 1


def test_level() -> None:
    out = io.StringIO()
    logs.setup("warning", stream=out)
    logs.log_request(RequestRecord(route="models", outcome=Outcome.ALLOWED, status=200))
    logs.log_event("startup")
    logs.log_event("reload", level=logging.WARNING)
    assert [line["event"] for line in lines(out)] == ["reload"]
    with pytest.raises(ValueError, match="unknown log level"):
        logs.setup("LOUD")


def test_credentials_are_redacted(stream: io.StringIO) -> None:
    log = logging.getLogger("capproxy.upstream")
    log.warning("upstream said: Incorrect API key provided: sk-proj-Ab12Cd34Ef56Gh78")
    log.warning(
        "forwarding",
        extra={
            "fields": {
                "authorization": "Bearer cp-tenant-key-0123456789",
                "nested": {"keys": ["sk-abcdefghijklmnop", "fine"], "basic": "basic dXNlcjpwdw=="},
                "store": "redis://:hunter2@redis:6379/0",
                "count": 3,
            }
        },
    )
    text = stream.getvalue()
    for secret in (
        "Ab12Cd34Ef56Gh78",
        "sk-abcdefghijklmnop",
        "cp-tenant-key",
        "dXNlcjpwdw",
        "hunter2",
    ):
        assert secret not in text
    first, second = lines(stream)
    assert first["msg"] == "upstream said: Incorrect API key provided: sk-[REDACTED]"
    assert second["authorization"] == "Bearer [REDACTED]"
    assert second["nested"] == {"keys": ["sk-[REDACTED]", "fine"], "basic": "basic [REDACTED]"}
    assert second["store"] == "redis://[REDACTED]@redis:6379/0"
    assert second["count"] == 3


def test_redaction_spares_ordinary_words() -> None:
    text = "task-1234567890 risk-averse ask-me-anything http://example.com/v1 Bearer"
    assert logs.redact(text) == text


def test_an_exception_is_one_line_without_a_traceback(stream: io.StringIO) -> None:
    def fail(password: str) -> None:
        raise ConnectionError(f"could not reach redis://:{password}@store:6379")

    try:
        fail("s3cret-value")
    except ConnectionError:
        logging.getLogger("capproxy").exception("store unreachable")
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert "Traceback" not in text
    assert "s3cret-value" not in text
    [line] = lines(stream)
    assert line["msg"] == "store unreachable"
    assert line["level"] == "ERROR"
    assert line["exc"] == "ConnectionError: could not reach redis://[REDACTED]@store:6379"


def test_exception_names_carry_their_module(stream: io.StringIO) -> None:
    class StoreDown(Exception):
        pass

    try:
        raise StoreDown
    except StoreDown:
        logging.getLogger("capproxy").exception("down")
    assert (
        lines(stream)[0]["exc"]
        == f"{__name__}.test_exception_names_carry_their_module.<locals>.StoreDown"
    )


def test_a_bad_format_string_does_not_raise_at_the_call_site(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging, "raiseExceptions", False)
    logging.getLogger("capproxy").info("%d widgets", "many")  # logging reports, never raises
    logs.log_event("after")
    assert [line["event"] for line in lines(stream)] == ["after"]


def test_newlines_and_unicode_stay_on_one_line(stream: io.StringIO) -> None:
    logs.log_event("odd", note="a\nb\u2028c\x00d", model="gpt-4o-\u00e9")
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert text.isascii()
    [line] = lines(stream)
    assert (line["note"], line["model"]) == ("a\nb\u2028c\x00d", "gpt-4o-\u00e9")


def test_a_key_in_a_long_model_name_is_redacted_before_the_line_cuts_it() -> None:
    out = io.StringIO()
    logs.setup("INFO", stream=out)
    rec = RequestRecord(route="chat/completions", outcome=Outcome.CLIENT_ERROR, status=400)
    rec.model = "m" * 118 + "/sk-proj-abcdefghijklmnop"
    logs.log_request(rec)
    model = json.loads(out.getvalue())["model"]
    assert model == "m" * 118 + "/sk-[REDAC..."

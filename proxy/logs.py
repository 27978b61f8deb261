"""Structured logs: one JSON object per line, from the ``capproxy`` logger and its children.

    logs.setup("INFO")                            # once, at startup (idempotent)
    logs.log_event("startup", port=8080)          # startup / reload / shutdown lines
    logs.log_request(record)                      # the access line of one proxied request
    log.warning("store slow", extra={"fields": {"ms": 812}})   # any capproxy.* logger

Each line has ``ts`` (RFC 3339, UTC), ``level``, ``logger`` and ``msg``, then the record's
``fields``. An exception becomes one ``exc`` string (its type and message); tracebacks are
not written.

The code never logs credentials: ``RequestRecord`` has no key in it, and keys stay inside
``auth``. ``Redact`` is defence in depth only, for a key that reaches a message by mistake
(an upstream error echoing a header, a URL with a password in it).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

from proxy.metrics import RequestRecord
from proxy.pricing import usd_text

ROOT = "capproxy"
ACCESS = "capproxy.access"
# Keys the formatter writes itself; a field with one of these names is written as "field_<name>".
RESERVED = frozenset({"ts", "level", "logger", "msg", "exc"})
# Client-chosen strings (model, agent id) are cut to this many characters in access lines.
MAX_VALUE_CHARS = 128

_SECRETS = (
    # OpenAI-style keys: sk-..., sk-proj-...
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{8,}"), "sk-[REDACTED]"),
    # Authorization header values
    (re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=\-]+", re.IGNORECASE), r"\1 [REDACTED]"),
    # user:password@ in URLs (redis://:secret@host)
    (re.compile(r"(\b[a-z][a-z0-9+.\-]*://)[^/\s@]*@", re.IGNORECASE), r"\1[REDACTED]@"),
)
# One pass that finds whether any pattern could match (most text has nothing to redact).
_ANY_SECRET = re.compile("|".join(f"(?:{p.pattern})" for p, _ in _SECRETS), re.IGNORECASE)

_log = logging.getLogger(ROOT)
_access = logging.getLogger(ACCESS)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced."""
    if _ANY_SECRET.search(text) is None:
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(value: object) -> object:
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(v) for v in value]
    return value


class Redact(logging.Filter):
    """Rewrites a record's message and ``fields`` with credentials masked (defence only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True  # a bad format string: the handler reports it when it emits
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping) and not getattr(record, "fields_redacted", False):
            record.fields = _redact_value(fields)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for key, value in fields.items():
                name = str(key)
                out[f"field_{name}" if name in RESERVED else name] = value
        if record.exc_info and record.exc_info[1] is not None:
            out["exc"] = redact(_describe(record.exc_info[1]))
        return _json_line(out)


def _json_line(out: dict[str, Any]) -> str:
    """``out`` as one line of ASCII JSON (escapes keep a line one line, no raw U+2028,
    whatever the stream's encoding): orjson, or the json module for what orjson leaves
    (non-ASCII text, integers beyond 64 bits)."""
    try:
        line = orjson.dumps(out, default=str).decode()
    except orjson.JSONEncodeError:
        line = ""
    if line and line.isascii():
        return line
    return json.dumps(out, separators=(",", ":"), default=str)


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _timestamp(created: float) -> str:
    """RFC 3339 in UTC to the millisecond (the date and time of a second formatted once)."""
    second = int(created)
    if _second[0] != second:
        _second[:] = [second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_second[1]}.{int((created - second) * 1000):03d}Z"


def _describe(exc: BaseException) -> str:
    kind = type(exc)
    name = (
        kind.__qualname__
        if kind.__module__ == "builtins"
        else f"{kind.__module__}.{kind.__qualname__}"
    )
    text = str(exc)
    return f"{name}: {text}" if text else name


_THIRD_PARTY = ("aiohttp", "asyncio")


def setup(level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send the ``capproxy`` loggers to ``stream`` (stderr) as JSON lines, at ``level``.

    Calling it again replaces the handler it installed (so the last call's stream and
    level win); other handlers on the logger are left alone. The ``capproxy`` logger no
    longer propagates to the root logger, so a root handler doesn't print lines twice.
    """
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}")
    handler = _JsonHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(Redact())
    # aiohttp and asyncio log too (aiohttp quotes raw request lines, headers included): the
    # same JSON handler and redaction cover them.
    for logger in (_log, *(logging.getLogger(name) for name in _THIRD_PARTY)):
        for old in list(logger.handlers):
            if isinstance(old, _JsonHandler):
                logger.removeHandler(old)
                old.close()
        logger.addHandler(handler)
        logger.propagate = False
    _log.setLevel(numeric)


class _JsonHandler(logging.StreamHandler[TextIO]):
    """The handler ``setup`` installs (a type of its own, so it can find it again)."""

    def write_line(self, line: str) -> None:
        """Write a formatted line as ``emit`` would (a failed write is reported alike)."""
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.write(line + self.terminator)
                self.flush()
            except Exception:
                self.handleError(_LINE_RECORD)


# What ``handleError`` reports about a line written without a record.
_LINE_RECORD = logging.LogRecord(ACCESS, logging.INFO, "", 0, "request", (), None)


def _sole_handler() -> _JsonHandler | None:
    """The JSON handler, when it is the only one an access line reaches and no filter
    or disabled logger stands in the way (else the line goes through ``logging``)."""
    if _access.handlers or _access.filters or _access.disabled or not _access.propagate:
        return None
    handlers = _log.handlers
    if len(handlers) != 1 or _log.filters or _log.disabled:
        return None
    handler = handlers[0]
    if not isinstance(handler, _JsonHandler) or handler.level > logging.INFO:
        return None
    if len(handler.filters) != 1 or not isinstance(handler.filters[0], Redact):
        return None
    return handler


def log_request(rec: RequestRecord) -> None:
    """The access line of one proxied request, on ``capproxy.access``."""
    if not _access.isEnabledFor(logging.INFO):
        return
    # The client's own strings are redacted here; the rest are ids, numbers and flags.
    fields = {
        "event": "request",
        "route": rec.route,
        "tenant": rec.tenant_id,
        "agent": _clip(rec.agent_id),
        "model": _clip(rec.model),
        "prompt_tokens": rec.prompt_tokens,
        "completion_tokens": rec.completion_tokens,
        "cost_usd": None if rec.cost_micros is None else usd_text(rec.cost_micros),
        "outcome": str(rec.outcome),
        "status": rec.status,
        "latency_ms": round(rec.duration_s * 1000, 1),
        "upstream_ms": None if rec.upstream_s is None else round(rec.upstream_s * 1000, 1),
        "streamed": rec.streamed,
        "usage_missing": rec.usage_missing,
        "would_reject": rec.would_reject,
        "fail_open": rec.fail_open,
    }
    handler = _sole_handler()
    if handler is not None:
        # Only the JSON handler takes it: the line is written without a log record (its
        # fields are redacted already, and the message is a constant).
        line = _json_line(
            {
                "ts": _timestamp(time.time()),
                "level": "INFO",
                "logger": ACCESS,
                "msg": "request",
                **fields,
            }
        )
        handler.write_line(line)
        return
    # Built and handled directly: an access line needs no caller lookup (a stack walk
    # per request in ``Logger.info``).
    record = _access.makeRecord(
        ACCESS,
        logging.INFO,
        "",
        0,
        "request",
        (),
        None,
        extra={"fields": fields, "fields_redacted": True},
    )
    _access.handle(record)


def log_event(event: str, *, level: int = logging.INFO, **fields: object) -> None:
    """A lifecycle line (``startup``, ``reload``, ``shutdown``) on ``capproxy``."""
    _log.log(level, event, extra={"fields": {"event": event, **fields}})


def _clip(value: str | None) -> str | None:
    """A client-chosen string for an access line: redacted, then cut (so a cut cannot
    leave a credential too short to be recognised)."""
    if value is None:
        return None
    value = redact(value)
    return value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS] + "..."

"""Logging: the parent's handlers, and records forwarded from workers.

Only the parent writes the log. A worker logs through a ForwardingHandler,
which turns each record into a plain dict and sends it up the worker's pipe;
the parent rebuilds the record and hands it to the same logger there:

    worker process                          parent process
    log.info(...)                           supervisor loop
      -> ForwardingHandler                    ("log", data) from the pipe
           record_to_dict(record) --pipe-->   handle_forwarded(data)
                                                -> logger.handle(record)
                                                     -> stderr, or the file

So one process owns the file and rotation never races. setup_worker_logging()
drops whatever handlers a worker inherited, so it cannot write around it.

Everything lives under the `ralph_supervisor` logger. setup_logging() gives it
its own handlers and stops propagation to the root logger, so the service
writes each line once whatever the host program did to the root logger.

Logs carry prompt digests, never prompts: prompts_loggable() is true only with
logging.debug, and other modules ask it before putting prompt text in a log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from ralph_supervisor.errors import ConfigError

NAMESPACE = "ralph_supervisor"

log = logging.getLogger(__name__)

# The defaults of the logging.* keys, for a settings object that lacks some.
_DEFAULTS: dict[str, Any] = {
    "level": "INFO",
    "format": "json",
    "file": None,
    "max_bytes": 10 * 1024 * 1024,
    "backup_count": 5,
    "verbose": False,
    "debug": False,
}

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# The attributes every LogRecord has; anything else on a record came from
# extra={...} and is a structured field. "message" and "asctime" are set by
# formatters, "taskName" by Python 3.12.
_STANDARD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
}

# Marks the handlers that setup_logging() installed, so that a second call
# (SIGHUP reload) replaces them and leaves anybody else's alone.
_OWNED = "_ralph_supervisor_owned"

_prompts_loggable = False


def prompt_digest(prompt: str) -> str:
    """Return what logs carry instead of a prompt: 12 hex chars of its SHA-256."""
    data = prompt.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:12]


def prompts_loggable() -> bool:
    """Say whether prompt text may go into a log (only with logging.debug)."""
    return _prompts_loggable


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Return the structured fields a record carries from extra={...}."""
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD_ATTRS and not key.startswith("_")
    }


def _jsonable(value: Any) -> Any:
    # A field that JSON cannot carry is kept as its repr: the line must
    # still be written, and the repr is what an operator would want to see.
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    return value


def _utc_iso(created: float) -> str:
    moment = datetime.fromtimestamp(created, tz=UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then extras."""

    def __init__(self, *, source: bool = False) -> None:
        super().__init__()
        self.source = source

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.source:
            payload["source"] = f"{record.module}:{record.funcName}:{record.lineno}"

        for key, value in extra_fields(record).items():
            payload.setdefault(key, _jsonable(value))

        traceback_text = _traceback_text(self, record)
        if traceback_text:
            payload["traceback"] = traceback_text
        if record.stack_info:
            payload["stack"] = record.stack_info

        return json.dumps(payload, ensure_ascii=False, default=repr)


class TextFormatter(logging.Formatter):
    """A readable line: time, level, logger, message, then key=value extras."""

    def __init__(self, *, source: bool = False) -> None:
        super().__init__()
        self.source = source

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _utc_iso(record.created),
            f"{record.levelname:<7}",
            f"{record.name}:",
            record.getMessage(),
        ]
        fields = extra_fields(record)
        if self.source:
            fields = {"source": f"{record.module}:{record.funcName}:{record.lineno}"} | fields
        parts.extend(f"{key}={_text_value(value)}" for key, value in fields.items())
        line = " ".join(parts)

        traceback_text = _traceback_text(self, record)
        if traceback_text:
            line += "\n" + traceback_text
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if text and not any(ch.isspace() or ch in '"=' for ch in text):
        return text
    # Quoted like JSON so that a value with spaces stays one field.
    return json.dumps(text, ensure_ascii=False)


def _traceback_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    # A forwarded record arrives with its traceback already rendered in
    # exc_text; a local one still has exc_info.
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or ""


class _MissingAsDash(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "-"


class TemplateFormatter(logging.Formatter):
    """A user's %-style format string, in UTC like the other formats.

    A field that a record lacks (say %(request_id)s on a record without one)
    prints as "-" instead of failing the whole line.
    """

    converter = staticmethod(time.gmtime)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (stdlib name)
        return self._fmt % _MissingAsDash(record.__dict__) if self._fmt else record.message


def make_formatter(fmt: str, *, source: bool = False) -> logging.Formatter:
    """Return the formatter for logging.format: json, text or a format string."""
    name = fmt.strip().lower()
    if name == "json":
        return JsonFormatter(source=source)
    if name == "text":
        return TextFormatter(source=source)

    try:
        formatter = TemplateFormatter(fmt, style="%")
        formatter.format(logging.makeLogRecord({"msg": "probe"}))
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"logging.format: expected json, text or a %-style format string, got {fmt!r}: {exc}"
        ) from None
    return formatter


def _setting(settings: Any, name: str) -> Any:
    value = getattr(settings, name, None) if settings is not None else None
    return _DEFAULTS[name] if value is None and name != "file" else value


def _level_of(settings: Any) -> int:
    raw = _setting(settings, "level")
    if isinstance(raw, int) and not isinstance(raw, bool):
        level = raw
    elif isinstance(raw, str) and raw.strip().upper() in _LEVELS:
        level = logging.getLevelName(raw.strip().upper())
    else:
        raise ConfigError(f"logging.level: expected one of {', '.join(_LEVELS)}, got {raw!r}")

    # verbose asks for at least INFO; debug asks for everything.
    if _setting(settings, "debug"):
        return logging.DEBUG
    if _setting(settings, "verbose"):
        return min(level, logging.INFO)
    return level


def _open_file_handler(settings: Any) -> logging.Handler:
    path = Path(os.path.expanduser(str(_setting(settings, "file"))))
    max_bytes = int(_setting(settings, "max_bytes"))
    backup_count = int(_setting(settings, "backup_count"))

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # As in the standard library, backup_count 0 means the file is never
        # rotated: rotation with nowhere to rotate to would discard the log.
        return logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backup_count, encoding="utf-8"
        )
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(f"logging.file: cannot write {path}: {reason}") from None


def setup_logging(settings: Any = None, *, stream: IO[str] | None = None) -> None:
    """Configure the parent's logging from the logging.* settings.

    `settings` is any object with the attributes level, format, file,
    max_bytes, backup_count, verbose and debug (missing ones take their
    defaults). Lines go to logging.file when it is set, and to `stream`
    (stderr by default) when it is not: never both, so that a unit which
    appends stderr to the same file does not get every line twice.

    Calling it again (a SIGHUP reload) replaces the handlers it installed. The
    new handler is built first, so a bad new setting raises ConfigError and
    leaves the old logging working.
    """
    global _prompts_loggable

    level = _level_of(settings)
    detailed = bool(_setting(settings, "debug") or _setting(settings, "verbose"))
    formatter = make_formatter(str(_setting(settings, "format")), source=detailed)

    handler: logging.Handler
    if _setting(settings, "file"):
        handler = _open_file_handler(settings)
    else:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    setattr(handler, _OWNED, True)

    logger = logging.getLogger(NAMESPACE)
    _remove_owned_handlers(logger)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False

    _prompts_loggable = bool(_setting(settings, "debug"))


def setup_worker_logging(
    send: Callable[[dict[str, Any]], None],
    level: int | str = logging.INFO,
    *,
    prompts: bool = False,
) -> None:
    """Configure a worker process: every record goes up the pipe via `send`.

    Removes whatever handlers the worker inherited (by fork they would write
    the parent's file from a second process).
    """
    global _prompts_loggable

    handler = ForwardingHandler(send)
    setattr(handler, _OWNED, True)

    logger = logging.getLogger(NAMESPACE)
    for inherited in list(logger.handlers):
        logger.removeHandler(inherited)
    logger.addHandler(handler)
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    logger.propagate = False
    _prompts_loggable = prompts


def shutdown_logging() -> None:
    """Flush and close the handlers setup_logging() installed."""
    global _prompts_loggable

    logger = logging.getLogger(NAMESPACE)
    _remove_owned_handlers(logger)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    _prompts_loggable = False


def _remove_owned_handlers(logger: logging.Logger) -> None:
    for old in list(logger.handlers):
        if getattr(old, _OWNED, False):
            logger.removeHandler(old)
            old.close()


def record_to_dict(record: logging.LogRecord) -> dict[str, Any]:
    """Turn a record into a picklable dict that handle_forwarded() rebuilds.

    The message is formatted here, with its args, because the args may not
    pickle; the traceback is rendered to text for the same reason. Extras are
    kept, as their repr when JSON cannot carry them.
    """
    data: dict[str, Any] = {}
    for key, value in record.__dict__.items():
        if key in ("args", "exc_info", "msg", "message"):
            continue
        data[key] = value if key in _STANDARD_ATTRS else _jsonable(value)

    data["msg"] = record.getMessage()
    data["args"] = None
    data["exc_info"] = None
    if record.exc_info and not record.exc_text:
        data["exc_text"] = logging.Formatter().formatException(record.exc_info)
    data.setdefault("worker_pid", record.process)
    return data


def handle_forwarded(data: dict[str, Any]) -> None:
    """Log, in the parent, a record that a worker forwarded as a dict."""
    # Called from the supervisor loop: a malformed dict from a confused
    # worker must cost one record, never the loop.
    try:
        record = logging.makeLogRecord(data)
        name = record.name if isinstance(record.name, str) else NAMESPACE
        logger = logging.getLogger(name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
    except Exception:
        log.debug("dropped a malformed forwarded log record", exc_info=True)


class ForwardingHandler(logging.Handler):
    """The worker's handler: sends each record to the parent, never raises.

    A broken pipe means the parent is gone or going; the record is dropped
    rather than reported, since there is nowhere left to report it.
    """

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(record_to_dict(record))
        except Exception:
            pass

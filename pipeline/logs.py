"""Log lines as text or JSON (``INVSORT_LOG_FORMAT``), each record carrying the job and batch it was logged for.

- :func:`log_context` names the job and batch (any fields) that the records logged inside it are about: a context
  variable, so it holds for this thread (a thread started inside does not inherit it).
- :class:`ContextFilter` puts those fields on every record a handler formats, as attributes (``job_id``,
  ``batch_no``); a field given to one call (``log.info(..., extra={...})``) wins.
- :func:`formatter`: ``text`` is ``TIME LEVEL LOGGER: MESSAGE``; ``json`` is one JSON object a line
  (python-json-logger): ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``pid``, ``message``, ``job_id`` and
  ``batch_no`` where known, ``exc_info`` with the traceback of an error, and the ``extra`` fields of the call.
- :func:`configure_logging` (the command line's root handler) and :func:`format_handler` (a handler someone else
  made: Celery's).

Nothing here reads settings: the caller passes the format (:attr:`pipeline.settings.Settings.log_format`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")

_fields: ContextVar[tuple[tuple[str, Any], ...]] = ContextVar("invsort_log_fields", default=())
_handler: logging.Handler | None = None  # the handler configure_logging made


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Records logged inside the block (in this thread) carry ``fields`` (e.g. ``job_id=..., batch_no=3``)."""
    token = _fields.set((*((k, v) for k, v in _fields.get() if k not in fields), *fields.items()))
    try:
        yield
    finally:
        _fields.reset(token)


def context_fields() -> dict[str, Any]:
    """The fields :func:`log_context` set for this thread now."""
    return dict(_fields.get())


class ContextFilter(logging.Filter):
    """Adds the :func:`log_context` fields to each record as attributes (an attribute already there wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _fields.get():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``log_format``: ``text`` or ``json`` (see the module docstring).

    Raises:
        ValueError: another format.
    """
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    if log_format != "json":
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    from pythonjsonlogger.json import JsonFormatter

    return JsonFormatter("%(levelname)s %(name)s %(process)d %(message)s", timestamp="time",
                         rename_fields={"levelname": "level", "name": "logger", "process": "pid"})


def format_handler(handler: logging.Handler, log_format: str) -> None:
    """Give ``handler`` the formatter of ``log_format`` and the :class:`ContextFilter` (once). With ``json``,
    Python's warnings are logged too (as JSON lines, not printed)."""
    handler.setFormatter(formatter(log_format))
    if log_format == "json":
        logging.captureWarnings(True)
    if not any(isinstance(f, ContextFilter) for f in handler.filters):
        handler.addFilter(ContextFilter())


def configure_logging(level: int, log_format: str | None = None) -> None:
    """The command line's logging: records of ``level`` and above to stderr, in ``log_format`` (None or an unknown
    name: text; the settings check the name when a command reads them). A root logger that already has other
    handlers (a test's) is left alone, as :func:`logging.basicConfig` leaves it."""
    global _handler
    root = logging.getLogger()
    if root.handlers and _handler not in root.handlers:
        return
    root.setLevel(level)
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        root.addHandler(_handler)
    format_handler(_handler, log_format if log_format in LOG_FORMATS else "text")


def set_log_format(log_format: str) -> None:
    """Switch the handler :func:`configure_logging` made to ``log_format`` (nothing when it made none)."""
    if _handler is not None:
        format_handler(_handler, log_format)

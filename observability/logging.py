"""JSON-lines logging with the current request's ids and trace id on every line.

Log lines carry ids, outcomes and error types, never secret material, keys or secret ids.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from contextvars import ContextVar

from opentelemetry import trace

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# The caller's own X-Request-ID, when it sent one: beside the request's id, never as it.
CLIENT_REQUEST_ID: ContextVar[str | None] = ContextVar("client_request_id", default=None)

_UNSET = object()


def current_trace_id() -> str | None:
    """The 32-hex-digit id of the trace the current span belongs to, or None outside one."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def install_trace_id_stamp() -> None:
    """Stamp ``record.trace_id`` on every log record as it is created.

    A record may be formatted later, on another thread or by another handler (pytest's
    caplog), when the span it was logged in is no longer current; the stamp keeps its trace.
    A record factory rather than a filter, so records reaching any handler carry it.
    """
    factory = logging.getLogRecordFactory()
    if getattr(factory, "stamps_trace_id", False):
        return

    def stamped(*args: object, **kwargs: object) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.trace_id = current_trace_id()
        return record

    stamped.stamps_trace_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(stamped)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, request_id, client_request_id
    (when the caller sent its own X-Request-ID), trace_id."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = REQUEST_ID.get()
        request_id = getattr(record, "request_id", None) or current
        client_request_id = getattr(record, "client_request_id", None)
        if client_request_id is None and request_id == current:  # not a line about another
            client_request_id = CLIENT_REQUEST_ID.get()
        if request_id:
            entry["request_id"] = request_id
        if client_request_id:
            entry["client_request_id"] = client_request_id
        trace_id = getattr(record, "trace_id", _UNSET)
        if trace_id is _UNSET:  # created before the stamp was installed: best effort
            trace_id = current_trace_id()
        if trace_id:
            entry["trace_id"] = trace_id
        # Tracebacks are deliberately not rendered: exception text can carry data.
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
        return json.dumps(entry, ensure_ascii=False)


# Libraries whose DEBUG lines quote the data they handle: pymongo's command log prints every
# command and reply, so secret ids (and sealed records) in clear. Never below INFO.
_QUOTING_LOGGERS = ("pymongo",)


def configure_logging(level: str = "INFO") -> None:
    """Send every logger, Hypercorn's included, to stderr as JSON lines."""
    install_trace_id_stamp()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    floor = max(logging.getLevelName(level), logging.INFO)
    for name in _QUOTING_LOGGERS:
        logging.getLogger(name).setLevel(floor)

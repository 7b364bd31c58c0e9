"""The server's log lines: `text` (one line a record) or `json` (one object a line, for log collectors), with
the trace and span ids of the current span when tracing is on (telemetry.py hands over the lookup)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TraceIds = Callable[[], "tuple[str, str] | None"]
_trace_ids: TraceIds | None = None


def use_trace_ids(lookup: TraceIds) -> None:
    """From now on, records carry the ids `lookup` returns (trace id, span id), when it returns some."""
    global _trace_ids
    _trace_ids = lookup


class TraceIdFilter(logging.Filter):
    """Adds `trace_id` and `span_id` to every record ("" outside a span, or with tracing off)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _trace_ids() if _trace_ids is not None else None
        record.trace_id, record.span_id = ids or ("", "")
        return True


class TextFormatter(logging.Formatter):
    """TEXT_FORMAT, then ` trace_id=... span_id=...` on records made inside a span."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        trace_id = getattr(record, "trace_id", "")
        if not trace_id:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} trace_id={trace_id} span_id={record.span_id}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (ISO 8601, UTC), level, logger, message, trace_id and span_id when inside a
    span, exception (the traceback) when there is one. Hand-written: twenty lines, not a runtime dependency."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if getattr(record, "trace_id", ""):
            entry["trace_id"], entry["span_id"] = record.trace_id, record.span_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def handler(log_format: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing lines in `log_format` (text or json), with the trace ids, to `stream` (stderr)."""
    out = logging.StreamHandler(stream)
    out.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    out.addFilter(TraceIdFilter())
    return out


def configure(level: str, log_format: str) -> None:
    """The root logger's one handler (stderr) in `log_format` (text or json), at `level`."""
    logging.basicConfig(level=level, handlers=[handler(log_format)], force=True)

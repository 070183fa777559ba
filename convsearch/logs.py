"""One log format for every service, as text or as JSON lines, each line carrying the id of the
request being served when there is one.

Text: `time level logger: message`, then ` request_id=...` when there is one. JSON: one object a
line with time, level, logger and message, request_id when there is one, the structured fields a
call passed in `extra` (an RPC's line: method, code, duration_ms), and exception when one is
logged.
"""

import datetime
import json
import logging
import os

from convsearch.observability import current_request_id

LOG_FORMATS = ("text", "json")
# Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class RequestIdFilter(logging.Filter):
    """Gives each record the request id of the context it was logged in (unless it has one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id()
        return True


class TextFormatter(logging.Formatter):
    """`time level logger: message`, and ` request_id=...` when the record has one."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{text} request_id={request_id}" if request_id else text


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request_id and any
    fields passed in `extra`, and exception (the traceback) when one is logged."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((key, value) for key, value in record.__dict__.items()
                    if key not in _STANDARD and value is not None)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def check_log_format(log_format: str) -> None:
    """Raises ValueError unless `log_format` is one of LOG_FORMATS."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")


def setup_logging(component: str, log_format: str = "text") -> logging.Logger:
    """Configures the root logger (level from CONVSEARCH_LOG_LEVEL) to write `log_format` lines
    to stderr, each with its request id; returns the logger for `component`."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=os.environ.get("CONVSEARCH_LOG_LEVEL", "INFO").upper(), handlers=[handler],
                        force=True)
    return logging.getLogger(component)

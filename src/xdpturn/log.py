"""Logging set-up: JSON lines for machines (the default), plain text for people.

Structured fields travel as `extra=` on the standard `logging` calls, e.g.
`log.info("allocation opened", extra={"client": "192.0.2.1:5000", "relay_port": 49152})`;
every attribute of a record that `logging` itself does not define becomes a field. One JSON object
per line, so `jq -r '"\\(.time) \\(.level) \\(.message)"'` reads it back.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

LogFormat = Literal["json", "text", "auto"]
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def rfc3339(timestamp: float, *, digits: Literal["milliseconds", "microseconds"]) -> str:
    text = datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec=digits)
    return text.replace("+00:00", "Z")


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k[0] != "_"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": rfc3339(record.created, digits="microseconds"),
            "level": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
        }
        out.update(record_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        # default=str: addresses, enums and the like are logged as their text form.
        return json.dumps(out, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={_text(v)}" for k, v in record_fields(record).items())
        line = f"{rfc3339(record.created, digits='milliseconds')} {record.levelname:<7} "
        line += record.getMessage() + (f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text(value: object) -> str:
    if isinstance(value, list | tuple | set | frozenset):
        return ",".join(str(v) for v in value)
    text = str(value)
    return repr(text) if (" " in text or not text) else text


def resolve_format(fmt: LogFormat, stream: TextIO) -> Literal["json", "text"]:
    """`auto`: text when a person is watching (a terminal), else JSON lines."""
    if fmt != "auto":
        return fmt
    isatty = getattr(stream, "isatty", None)
    return "text" if isatty is not None and isatty() else "json"


def setup_logging(
    fmt: LogFormat = "auto", level: str = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Route all logging (ours and libraries') to one handler on `stream` (stderr by default).

    Calling it again replaces the handler it installed before.
    """
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.set_name("xdpturn")
    chosen = resolve_format(fmt, stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "xdpturn"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler

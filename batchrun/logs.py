"""Logging for people and for cron: plain text, or one JSON object per event.

Events carry an ``event`` name (start, resume, progress, retry, row_failed,
summary, stopped) and their fields as ``extra`` on the log record, so the JSON
form needs no parsing of messages. Nothing logged holds the API key: the key
lives only in the HTTP client.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

import orjson

_STANDARD = set(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, message and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "log"),
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in data and not key.startswith("_"):
                data[key] = value
        return orjson.dumps(data, default=str).decode()


def setup_logging(
    log_file: Path | None, log_format: str, verbose: bool, quiet: bool = False
) -> None:
    """Send batchrun's log to stderr and, when asked, every event (retries and
    row failures included) to ``log_file``.

    On a terminal stderr shows warnings only (the progress bar tells the rest);
    off a terminal (cron) it shows info events too, progress lines among them.
    """
    logger = logging.getLogger("batchrun")
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    text = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    formatter: logging.Formatter = JsonFormatter() if log_format == "json" else text
    console = logging.StreamHandler(sys.stderr)
    quiet_level = logging.WARNING if quiet or sys.stderr.isatty() else logging.INFO
    console.setLevel(logging.DEBUG if verbose else quiet_level)
    console.setFormatter(formatter)
    # The CLI prints a stop's message itself; the console need not say it twice.
    console.addFilter(lambda record: getattr(record, "event", None) != "stopped")
    logger.addHandler(console)
    if log_file is not None:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setLevel(logging.DEBUG)
        handler.setFormatter(formatter)
        logger.addHandler(handler)

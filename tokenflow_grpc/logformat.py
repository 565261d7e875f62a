"""Logging set-up of the long-running commands: text lines, or one JSON object
per line (`--log-format json`) with the request fields as their own keys."""

from __future__ import annotations

import datetime
import json
import logging
from typing import Any

from tokenflow_grpc.request_id import current_request_id

FORMAT_JSON = "json"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Fields that the request log line passes in `extra`, copied into JSON objects.
REQUEST_FIELDS = ("method", "code", "duration_ms", "client", "request_bytes")


class RequestIdFilter(logging.Filter):
    """Adds the id of the request being served, if any, to every record as request_id."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = current_request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: time (UTC, RFC 3339), level, logger,
    message, then request_id, the request fields, worker, pid and exception
    where the record has them."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        time = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", "")
        if request_id:
            entry["request_id"] = request_id
        for name in REQUEST_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if self.worker is not None:
            entry["worker"] = self.worker
            entry["pid"] = record.process
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, log_format: str, worker: int | None = None) -> None:
    """Send records at level and above to stderr as text or JSON lines.

    worker: the index of a `serve --workers N` worker, added to each line.
    """
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if log_format == FORMAT_JSON:
        handler.setFormatter(JsonFormatter(worker))
    elif worker is None:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        handler.setFormatter(
            logging.Formatter(
                f"%(asctime)s %(levelname)s %(name)s (worker {worker}, pid %(process)d): "
                "%(message)s"
            )
        )
    logging.basicConfig(level=level, handlers=[handler])

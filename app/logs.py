"""Structured logs: one JSON object per line, carrying the request id or job id it belongs to.

The API sets `request_id` per request (app.metrics.ObservedRequests, echoed as
X-Request-ID); the worker sets `job_id` while it runs a job. `SBORA_LOG_FORMAT=text`
gives plain lines for reading in a terminal.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id: ContextVar[str | None] = ContextVar("job_id", default=None)

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
# (uvicorn's `color_message` repeats the message with terminal colours.)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName",
                                                                          "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, var in (("request_id", request_id), ("job_id", job_id)):
            if (value := var.get()) is not None:
                entry[name] = value
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: str | None = None, level: str | None = None) -> None:
    """Route the root logger (and uvicorn's, Celery's) through one handler on stderr."""
    from app.core.config import get_settings

    settings = get_settings()
    fmt = fmt or settings.log_format
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or settings.log_level).upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task", "celery.worker"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Our own request log carries route, status and duration; uvicorn's access line would repeat it.
    logging.getLogger("uvicorn.access").disabled = True
    # bitsandbytes warns on every CPU 4-bit job that an optional kernels package is missing: noise
    # that says nothing about the job.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

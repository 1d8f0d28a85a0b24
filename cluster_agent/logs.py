"""Log set-up: one line per event, as text or JSON lines, with secrets redacted from every line (tracebacks too).

JSON lines carry `ts`, `level`, `logger`, `message` and, on job events, `job_id`, `event` and `duration_s`
(plus `status` / `failure_reason` where known), so a log pipeline can index them without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime, timezone

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Fields the agent attaches with `extra=` on job events.
EVENT_FIELDS = ("job_id", "event", "duration_s", "status", "failure_reason", "container_id")


class RedactingFormatter(logging.Formatter):
    def __init__(self, fmt: str = _FORMAT) -> None:
        super().__init__(fmt)
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add_secret(self, secret: str | None) -> None:
        if secret and len(secret) >= 4:
            with self._lock:
                self._secrets.add(secret)

    def redact(self, text: str) -> str:
        with self._lock:
            secrets = list(self._secrets)
        for secret in secrets:
            text = text.replace(secret, "[REDACTED]")
        return text

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(RedactingFormatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in EVENT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self.redact(json.dumps(line, ensure_ascii=False, default=str))


def configure(level: str, fmt: str = "text") -> RedactingFormatter:
    formatter: RedactingFormatter = JsonFormatter() if fmt == "json" else RedactingFormatter()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; the agent logs what matters itself.
    for noisy in ("httpx", "httpcore", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return formatter

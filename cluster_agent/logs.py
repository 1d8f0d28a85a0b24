"""Log set-up: one line per event, as text or JSON lines, with secrets redacted from every line (tracebacks too).

JSON lines carry `ts`, `level`, `logger`, `message` and, on job events, `job_id`, `event` and `duration_s`
(plus `status` / `failure_reason` where known), so a log pipeline can index them without parsing messages.

Messages carry untrusted text (job ids, control-plane answers), so two rules hold for every record:

- Secrets are redacted before any encoding, in every form they can take (see redaction.py), and the finished line
  is redacted again in case formatting produced a form the message did not have.
- One record is one line: control characters in the message are escaped visibly (`\\n`, `\\x1b`, `\\u2028`), so a
  job id like "x\\n2026-01-01 00:00:00 INFO cluster_agent: forged" cannot forge a record. A traceback (the agent's
  own) keeps its line breaks in text format, each continuation line indented so that none can pass for a record,
  and lives inside the `exception` string in JSON.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import datetime, timezone

from .redaction import REPLACEMENT, Redactor

__all__ = ["JsonFormatter", "RedactingFormatter", "configure", "escape_controls"]

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Fields the agent attaches with `extra=` on job events.
EVENT_FIELDS = ("job_id", "event", "duration_s", "status", "failure_reason", "container_id")

# C0, DEL, C1 and the Unicode line and paragraph separators: everything that can end or rewrite a line somewhere
# (terminals, `str.splitlines()`, JavaScript's JSON.parse of older engines).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# Tracebacks keep their newlines and tabs (source lines); a \r or \x1b from an exception message is escaped.
_CONTROL_BUT_LINE_BREAKS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
# Escaped by json.dumps(ensure_ascii=False) only below U+0020; these would reach a JSON line raw.
_RAW_IN_JSON = re.compile("[\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
TRACEBACK_INDENT = "    "


def escape_controls(text: str) -> str:
    """`text` on one line: each control character as a visible escape (`\\n`, `\\xNN`, `\\uNNNN`)."""
    return _CONTROL.sub(_escape, text)


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


class RedactingFormatter(logging.Formatter):
    """Text lines: `<time> <level> <logger>: <message>`, the message redacted and on one line.

    The `redactor` can be shared (give one, or read `formatter.redactor`), so job output and results are
    redacted with the same secrets as the log.
    """

    def __init__(self, fmt: str = _FORMAT, redactor: Redactor | None = None) -> None:
        super().__init__(fmt)
        self.redactor = redactor if redactor is not None else Redactor()

    def add_secret(self, secret: str | None) -> None:
        self.redactor.add(secret)

    def redact(self, text: str) -> str:
        return self.redactor.redact(text)

    def safe_message(self, record: logging.LogRecord) -> str:
        """The record's message (after `%` args), redacted, then escaped onto one line.

        Redaction comes first: escaping could turn a secret with a control character into a form not matched.
        """
        return escape_controls(self.redact(record.getMessage()))

    def safe_traceback(self, record: logging.LogRecord) -> str:
        """The record's traceback and stack, redacted; line breaks kept, other control characters escaped."""
        exception = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else "")
        parts = [part for part in (exception, self.formatStack(record.stack_info) if record.stack_info else "") if part]
        return _CONTROL_BUT_LINE_BREAKS.sub(_escape, self.redact("\n".join(parts)))

    def format(self, record: logging.LogRecord) -> str:
        # Not super().format(): it would cache the raw traceback on the record and append it unescaped.
        record.message = self.safe_message(record)
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        traceback = self.safe_traceback(record)
        if traceback:
            # Indented, so a forged "2026-01-01 ... INFO ..." inside an exception message never starts a line.
            line += "\n" + "\n".join(TRACEBACK_INDENT + part for part in traceback.split("\n"))
        # The finished line again, for a form the formatting made: the agent's own secrets only. A running job's
        # (scopes) were taken out of its message and traceback; over the whole line they would let a job blank the
        # time, level or logger of every line (a value such as "cluster_agent").
        return self.redactor.redact_own(line)


class JsonFormatter(RedactingFormatter):
    """JSON lines: one object per record, every string redacted before encoding, the line redacted again after."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": self.safe_message(record),
        }
        for field in EVENT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = self.redact(value) if isinstance(value, str) else value
        traceback = self.safe_traceback(record)
        if traceback:
            line["exception"] = traceback
        encoded = self._encode(line)
        # Every string was redacted above, a running job's values included; the encoded line only with the agent's
        # own secrets: a job's value such as '"ts": "2026-' matched across the JSON syntax of every record, and
        # each was withheld while that job ran.
        redacted = self.redactor.redact_own(encoded)
        if redacted != encoded and not _parses(redacted):
            # A secret form matched across JSON syntax; never print it, never print a broken line.
            return self._encode({key: line[key] for key in ("ts", "level", "logger")} | {
                "message": f"{REPLACEMENT} (record withheld: a secret in it could not be redacted cleanly)",
            })
        return redacted

    @staticmethod
    def _encode(line: dict[str, object]) -> str:
        encoded = json.dumps(line, ensure_ascii=False, default=str)
        # Valid inside JSON strings, the only place these characters can be in the output.
        return _RAW_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", encoded)


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def configure(level: str, fmt: str = "text", redactor: Redactor | None = None) -> RedactingFormatter:
    """Log to stderr at `level`, as text or JSON lines; the returned formatter's `redactor` holds the secrets."""
    formatter: RedactingFormatter = JsonFormatter(redactor=redactor) if fmt == "json" else RedactingFormatter(redactor=redactor)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; the agent logs what matters itself.
    for noisy in ("httpx", "httpcore", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return formatter

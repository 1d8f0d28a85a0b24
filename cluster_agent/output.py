"""A job's output: bounded collection of stdout/stderr, and resolution of the output payload.

Resolution order (contract): `/workspace/output.json` if it exists (valid JSON, at most the output limit, else
invalid_output); else the whole stdout if it is one JSON document; else the last 10,000 characters of stdout and
stderr. Memory stays bounded whatever the job prints: tails are ring buffers, and stdout is kept whole only
while it could still be a JSON document within the output limit.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from pathlib import Path
from typing import Any, Callable

from .errors import JobFailed
from .json_depth import nesting_depth
from .models import FailureReason, OutputSource
from .redaction import RedactingOutput, Redactor

__all__ = ["OutputCollector", "read_output_json", "resolve_output", "wrapped_output"]

# pydantic-core refuses to serialize a value nested deeper than 255 levels (its recursion guard: "Circular
# reference detected (depth exceeded)"), and the completion carries the payload: an output nested deeper than this
# is refused as invalid_output, with room to spare for the completion's own nesting.
MAX_OUTPUT_DEPTH = 200
TAIL_CHARS = 10_000
# UTF-8 uses at most 4 bytes a character: this many bytes always hold the last TAIL_CHARS characters.
TAIL_BYTES = TAIL_CHARS * 4
_JSON_START = frozenset(b'{["-0123456789tfn')


class _Tail:
    def __init__(self, limit: int) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> None:
        if len(data) >= self._limit:
            self._buf[:] = data[-self._limit :]
            return
        self._buf += data
        excess = len(self._buf) - self._limit
        if excess > 0:
            del self._buf[:excess]

    def text(self, chars: int) -> str:
        return self._buf.decode("utf-8", errors="replace")[-chars:]


class OutputCollector:
    """Receives the job's stdout and stderr as they arrive; thread-safe for one writer and later readers.

    `secrets`: the job's, redacted from the tails as they are kept (through the stream redaction the live log
    uses), never after the cut: a cut secret matches nothing, and its part inside the tail would go out in clear.
    The whole stdout (a JSON document) is kept as printed: it is redacted once parsed, whole."""

    def __init__(self, max_output_bytes: int, secrets: Redactor | None = None) -> None:
        self._limit = max_output_bytes
        self._stdout_tail = _Tail(TAIL_BYTES)
        self._stderr_tail = _Tail(TAIL_BYTES)
        self._stdout_sink: Callable[[bytes], None] = self._stdout_tail.feed
        self._stderr_sink: Callable[[bytes], None] = self._stderr_tail.feed
        self._redacting: list[RedactingOutput] = []
        if secrets is not None and len(secrets):
            self._redacting = [RedactingOutput(self._stdout_tail.feed, secrets),
                               RedactingOutput(self._stderr_tail.feed, secrets)]
            self._stdout_sink, self._stderr_sink = self._redacting
        self._head: bytearray | None = bytearray()  # None once stdout can no longer be one JSON document
        self.stdout_bytes = 0
        self.stderr_bytes = 0

    def feed_stdout(self, data: bytes) -> None:
        self.stdout_bytes += len(data)
        self._stdout_sink(data)
        if self._head is None:
            return
        if len(self._head) + len(data) > self._limit:
            self._head = None
            return
        self._head += data
        stripped = self._head.lstrip()
        if stripped and stripped[0] not in _JSON_START:
            self._head = None

    def feed_stderr(self, data: bytes) -> None:
        self.stderr_bytes += len(data)
        self._stderr_sink(data)

    def stdout_document(self) -> bytes | None:
        """The whole stdout, if it was small enough to be an output payload."""
        return bytes(self._head) if self._head is not None else None

    def stdout_tail(self) -> str:
        self._flush()
        return self._stdout_tail.text(TAIL_CHARS)

    def stderr_tail(self, chars: int = TAIL_CHARS) -> str:
        self._flush()
        return self._stderr_tail.text(chars)

    def _flush(self) -> None:
        for stream in self._redacting:  # what the redaction still held back, once the job has ended
            stream.flush()


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is out of range for JSON")
    return value


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_output(data: bytes) -> Any:
    """A job's output document. ValueError names why it cannot be a result: not JSON (NaN, Infinity and numbers
    out of range are not JSON either: they would travel as null), or nested deeper than MAX_OUTPUT_DEPTH."""
    try:
        value = json.loads(data, parse_constant=_not_json, parse_float=_finite)
    except RecursionError:
        raise ValueError("it nests deeper than any JSON parser here goes") from None
    except UnicodeDecodeError as exc:
        raise ValueError(str(exc)) from None
    depth = nesting_depth(value)
    if depth > MAX_OUTPUT_DEPTH:
        raise ValueError(f"it nests {depth} levels deep, over the {MAX_OUTPUT_DEPTH} a result may have")
    return value


def read_output_json(workspace: Path, limit: int) -> Any | None:
    """The parsed `output.json`, None when there is none; JobFailed(invalid_output) when it is unusable.

    The job controls that path: it is opened without following links and must be a regular file, so a job
    cannot make the agent read (and send) a host file through a symlink.
    """
    path = workspace / "output.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JobFailed(FailureReason.INVALID_OUTPUT, "output.json is a symbolic link; write the JSON file itself") from None
        raise JobFailed(FailureReason.INVALID_OUTPUT, f"output.json cannot be read: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise JobFailed(FailureReason.INVALID_OUTPUT, "output.json is not a regular file; write the JSON file itself")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > limit:
            raise JobFailed(
                FailureReason.INVALID_OUTPUT,
                f"output.json is {info.st_size} bytes, over the output limit of {limit} bytes; write less "
                "(large artefacts belong in object storage) or raise --max-output-bytes",
            )
        data = handle.read(limit + 1)
    if len(data) > limit:  # grew after fstat
        raise JobFailed(FailureReason.INVALID_OUTPUT, f"output.json is over the output limit of {limit} bytes")
    try:
        return parse_output(data)
    except ValueError as exc:
        raise JobFailed(FailureReason.INVALID_OUTPUT, f"output.json is not valid JSON: {exc}") from None


def resolve_output(workspace: Path, collected: OutputCollector, limit: int) -> tuple[Any, OutputSource]:
    payload = read_output_json(workspace, limit)
    if payload is not None or os.path.lexists(workspace / "output.json"):
        return payload, OutputSource.OUTPUT_JSON
    document = collected.stdout_document()
    if document is not None and document.strip():
        try:
            return parse_output(document), OutputSource.STDOUT_JSON
        except ValueError:
            pass
    return wrapped_output(collected), OutputSource.WRAPPED


def wrapped_output(collected: OutputCollector) -> dict[str, str]:
    return {"stdout": collected.stdout_tail(), "stderr": collected.stderr_tail()}

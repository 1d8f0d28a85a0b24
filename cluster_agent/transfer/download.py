"""One file fetched over HTTP(S): streamed to disk with bounded memory, resumed with a Range request after a
broken connection, retried with backoff, checked against its size and SHA-256.

Rules (RFC 9110): a `206` whose Content-Range starts where the partial file ends is appended; a `200` to a Range
request means the server ignores ranges, so the file starts over; `408`, `429` and `5xx` are retried, every other
`4xx` is final. `Accept-Encoding: identity` is asked for: the bytes on disk are the bytes the URL names, and byte
ranges stay meaningful.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..errors import TransferFailed
from ..http_transport import LazyClient, request_deadline
from ..redaction import Redactor
from .urls import redact_url, url_secrets

__all__ = ["Downloader", "Fetched"]

CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
STALL_SECONDS = 60.0  # an attempt that receives under STALL_BYTES in this long is cut off and tried again
STALL_BYTES = 64 * 1024


@dataclass(frozen=True)
class Fetched:
    size_bytes: int
    sha256: str | None  # None when no digest was asked for (hashing costs ~0.6 s per GiB on one core)


class _Retry(Exception):
    """A failure worth another attempt (the connection broke, the server was busy)."""


class _Canceled(Exception):
    pass


class Downloader:
    """Shares one connection pool among all jobs' downloads. Thread-safe.

    It sends no credentials of its own: the cluster token is for the control plane only, and an input URL carries
    whatever access it needs (a presigned query string)."""

    def __init__(self, *, retries: int = 5, timeout: float = 60.0, backoff_max: float = 30.0,
                 attempt_timeout: float = 3600.0, transport: httpx.BaseTransport | None = None) -> None:
        self._retries = retries
        self._backoff_max = backoff_max
        self._attempt_timeout = attempt_timeout
        # Each attempt ends by `attempt_timeout` whatever the server trickles (request_deadline below).
        self._client = LazyClient(
            transport, follow_redirects=True, timeout=httpx.Timeout(timeout, connect=min(timeout, 30.0)),
            headers={"Accept-Encoding": "identity", "User-Agent": "radix-cluster-agent"},
        )

    @property
    def _http(self) -> httpx.Client:
        return self._client.get()

    def close(self) -> None:
        self._client.close()

    def fetch(self, url: str, dest: Path, *, limit: int, sha256: str | None = None, size_bytes: int | None = None,
              cancel: threading.Event | None = None, name: str = "input") -> Fetched:
        """Download `url` into `dest` (created or truncated; never followed if it is a link). At most `limit`
        bytes. Raises TransferFailed (message names `name` and the redacted URL; also when `cancel` is set), or
        OSError when the file cannot be written here (a full disk: the node's fault, not the input's)."""
        cancel = cancel or threading.Event()
        where = f"{name} from {redact_url(url)}"
        redactor = Redactor(url_secrets(url))
        if size_bytes is not None and size_bytes > limit:
            raise TransferFailed(f"{where}: its declared size ({size_bytes} bytes) is over the limit of {limit} bytes "
                                 "per job (--max-input-bytes)", permanent=True)
        fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        state = _State(fd, hashing=sha256 is not None)
        try:
            retrying = Retrying(
                stop=stop_after_attempt(self._retries + 1),
                wait=wait_exponential(multiplier=0.5, max=self._backoff_max),
                retry=retry_if_exception(lambda exc: isinstance(exc, _Retry)),
                sleep=lambda seconds: _sleep_or_cancel(cancel, seconds),
                reraise=True,
            )
            retrying(self._attempt, url, state, limit, size_bytes, cancel, where, redactor)
        except _Retry as exc:
            raise TransferFailed(f"{where}: {exc} (gave up after {self._retries + 1} attempts); check that the "
                                 "server is up and the URL is reachable from this host") from None
        except _Canceled:
            raise TransferFailed(f"{where}: stopped before it finished (the job was canceled)") from None
        finally:
            os.close(fd)
        digest = state.hash.hexdigest() if state.hash is not None else None
        if size_bytes is not None and state.size != size_bytes:
            raise TransferFailed(f"{where}: got {state.size} bytes, but the job says size_bytes {size_bytes}; check the "
                                 "URL or the size in the job", permanent=True)
        if sha256 is not None and digest != sha256:
            raise TransferFailed(f"{where}: its SHA-256 is {digest}, but the job says {sha256}; the file changed "
                                 "or the URL names another one", permanent=True)
        return Fetched(state.size, digest)

    def _attempt(self, url: str, state: _State, limit: int, size_bytes: int | None, cancel: threading.Event,
                 where: str, redactor: Redactor) -> None:
        if cancel.is_set():
            raise _Canceled
        headers = {"Range": f"bytes={state.size}-"} if state.size else {}
        try:
            with request_deadline(self._attempt_timeout), self._http.stream("GET", url, headers=headers) as response:
                self._check_status(response, state, size_bytes, where)
                if response.status_code == 416:
                    return  # already complete: the body is an error page, not file content
                total = _expected_total(response, state)
                if total is not None and total > limit:
                    raise TransferFailed(f"{where}: it is {total} bytes, over the limit of {limit} bytes per job "
                                         "(--max-input-bytes)", permanent=True)
                if size_bytes is not None and total is not None and total != size_bytes:
                    raise TransferFailed(f"{where}: the server says it is {total} bytes, but the job says "
                                         f"size_bytes {size_bytes}; check the URL or the size in the job", permanent=True)
                window_start, window_size = time.monotonic(), state.size
                # As read from the socket: a chunker would hold up to a chunk that a broken connection loses.
                for chunk in response.iter_raw():
                    if cancel.is_set():
                        raise _Canceled
                    state.append(chunk)
                    if state.size > limit:
                        raise TransferFailed(f"{where}: more than the limit of {limit} bytes per job "
                                             "(--max-input-bytes)", permanent=True)
                    if total is not None and state.size > total:
                        raise TransferFailed(f"{where}: the server sent more than the {total} bytes it announced",
                                             permanent=True)
                    if time.monotonic() - window_start >= STALL_SECONDS:
                        if state.size - window_size < STALL_BYTES:
                            raise _Retry(f"the server sent under {STALL_BYTES} bytes in {STALL_SECONDS:g} s")
                        window_start, window_size = time.monotonic(), state.size
                if total is not None and state.size < total:
                    raise _Retry(f"the connection ended after {state.size} of {total} bytes")
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            # httpx names the URL in some errors: its query string must not reach a message.
            raise _Retry(redactor.redact(f"{type(exc).__name__}: {exc}") or type(exc).__name__) from None
        except (httpx.HTTPError, ValueError, UnicodeError) as exc:
            # Redirect loops, URLs no client can send: no retry changes them.
            raise TransferFailed(f"{where}: {redactor.redact(f'{type(exc).__name__}: {exc}')[:300]}",
                                 permanent=True) from None

    @staticmethod
    def _check_status(response: httpx.Response, state: _State, size_bytes: int | None, where: str) -> None:
        status = response.status_code
        if status == 206:
            match = CONTENT_RANGE.match(response.headers.get("content-range", ""))
            if match and int(match.group(1)) == state.size:
                return  # the rest of the file, appended
            state.restart()  # a range other than the one asked for: start over (the stream is read from 0 next)
            raise _Retry("the server answered another byte range than the one asked for")
        if status == 200:
            if state.size:
                state.restart()  # the server ignores Range: the whole file comes again
            return
        if status == 416 and state.size and size_bytes == state.size:
            return  # it was all there already
        reason = f"HTTP {status} {response.reason_phrase}".strip()
        if status in (408, 429) or status >= 500:
            raise _Retry(reason)
        state.restart()
        raise TransferFailed(f"{where}: {reason}; check the URL and that it is still valid (presigned URLs expire)",
                             permanent=True)


class _State:
    """What has been written so far: the resume point and the running hash."""

    def __init__(self, fd: int, *, hashing: bool) -> None:
        self.fd = fd
        self.size = 0
        self._hashing = hashing
        self.hash = hashlib.sha256() if hashing else None

    def append(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            view = view[os.write(self.fd, view):]
        if self.hash is not None:
            self.hash.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.size = 0
        self.hash = hashlib.sha256() if self._hashing else None


def _expected_total(response: httpx.Response, state: _State) -> int | None:
    """The whole file's size, when the answer says it."""
    if response.status_code == 206:
        match = CONTENT_RANGE.match(response.headers.get("content-range", ""))
        return int(match.group(3)) if match and match.group(3) != "*" else None
    if response.status_code == 416:
        return state.size
    length = response.headers.get("content-length")
    return int(length) if length and length.isdigit() else None


def _sleep_or_cancel(cancel: threading.Event, seconds: float) -> None:
    if cancel.wait(seconds):
        raise _Canceled

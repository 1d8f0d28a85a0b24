"""How the control-plane client's requests travel (private to control_plane.py): retries, deadlines, bounds.

Network errors, 5xx, 408 and 429 are retried with capped exponential backoff and jitter, honouring Retry-After;
401/403 become TokenRejected. Sleeping between retries waits on an event, so shutdown interrupts it. Every request
has an overall deadline (a server that trickles its answer cannot hold a thread past it) and every answer a size
bound (read as a stream, so a huge one never sits in memory whole). A request that can never be built (an id no
header or URL can carry) is RequestNotSendable at once, never retried. The token travels only in a header, and is
redacted from any quote of an answer before the quote is cut.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_never, wait_exponential_jitter
from tenacity.stop import stop_base

from . import __version__
from .errors import ControlPlaneError, ControlPlaneUnavailable, MalformedResponse, RequestNotSendable, TokenRejected
from .http_transport import DeadlineTransport, InterruptibleTransport, deadline_passed, request_deadline
from .metrics import Metrics
from .redaction import Redactor

log = logging.getLogger("cluster_agent.control_plane")

RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
ANSWER_LIMIT = 1024 * 1024
"""Largest answer read from an endpoint other than the poll: those answers are acknowledgements of a few bytes."""
ERROR_DETAIL_LIMIT = 4096
"""Bytes of an error answer read for its log line: it only names the error, and the line shows 200 characters."""


@dataclass(frozen=True)
class RetryPolicy:
    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 1.0
    # Seconds between attempts after a 401/403: slow enough never to hammer a server that rejects us.
    token_rejected: float = 60.0


@dataclass(frozen=True)
class Budget:
    """How long a request may take in all, and how large its answer may be."""

    seconds: float
    limit: int
    # True where the status alone is the outcome (heartbeat, start, logs, complete): a 2xx stands even when its
    # body is too large or too slow to read, so a delivered result is not sent again forever.
    body_optional: bool = False


@dataclass(frozen=True)
class Answer:
    """A read answer: status, headers and the body, whole and within its bound."""

    status: int
    headers: httpx.Headers
    content: bytes


def _encode_body(body: dict[str, Any]) -> bytes:
    """The JSON body, as httpx would encode it; lone surrogates (which UTF-8 cannot carry) are sent escaped.

    Raises RequestNotSendable for what JSON cannot carry at all (NaN, infinities, non-JSON types).
    """
    try:
        try:
            text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            return text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(body, ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:
        raise RequestNotSendable(f"the request body cannot be sent as JSON: {exc}") from None


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


class _BackoffWait:
    """Exponential backoff with jitter, never shorter than the server's Retry-After, capped."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._exp = wait_exponential_jitter(initial=policy.initial, max=policy.maximum, jitter=policy.jitter)

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, TokenRejected):
            return self._policy.token_rejected
        wait = self._exp(state)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after:
            wait = max(wait, retry_after)
        return min(wait, self._policy.maximum)


class AnyEvent:
    """Looks like an Event to the retry loop: set when any of its events is set."""

    def __init__(self, *events: threading.Event) -> None:
        self._events = events

    def is_set(self) -> bool:
        return any(event.is_set() for event in self._events)

    def wait(self, timeout: float) -> bool:
        # Retry sleeps are seconds long at most; slice them so either event ends the wait promptly.
        deadline = time.monotonic() + timeout
        while not self.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._events[0].wait(min(remaining, 0.2))
        return True


class _StopOn(stop_base):
    def __init__(self, event: threading.Event | AnyEvent) -> None:
        self._event = event

    def __call__(self, state: RetryCallState) -> bool:
        return self._event.is_set()


class Transport:
    """Sends one endpoint's requests for the client: thread-safe; polls go through a client of their own, whose
    in-flight request `interrupt_poll()` breaks off (see http_transport.py)."""

    def __init__(
        self,
        base: str,
        tenant_id: str,
        *,
        token: str | None,
        http: httpx.Client | None,
        retry: RetryPolicy,
        request_timeout: float,
        metrics: Metrics | None,
    ) -> None:
        self._metrics = metrics
        self._base = base
        self._tenant_id = tenant_id
        self.token = token
        # Quotes of answers are cut to a few hundred characters: the client's own secrets are redacted before the
        # cut, which would otherwise leave a prefix of an echoed token that no later redaction recognises.
        self.secrets = Redactor([token])
        self._retry = retry
        self.timeout = request_timeout
        self._unreachable_said = False  # the hint below, once per outage
        headers = {"User-Agent": f"radix-cluster-agent/{__version__}"}
        # Both clients run on deadline transports: a request made inside request_deadline() ends by its deadline
        # whatever the server does (see http_transport.py).
        self._http = http or httpx.Client(
            timeout=httpx.Timeout(request_timeout),
            headers=headers,
            transport=DeadlineTransport(httpx.Limits(max_connections=64, max_keepalive_connections=16)),
        )
        self._poll_transport: InterruptibleTransport | None = None
        if http is None:
            self._poll_transport = InterruptibleTransport()
            self.poll_http = httpx.Client(timeout=httpx.Timeout(request_timeout), headers=headers, transport=self._poll_transport)
        else:
            self.poll_http = http

    def close(self) -> None:
        self._http.close()
        if self.poll_http is not self._http:
            self.poll_http.close()

    def interrupt_poll(self) -> None:
        if self._poll_transport is not None:
            self._poll_transport.interrupt()

    def set_token(self, token: str) -> None:
        self.secrets.add(token)
        self.token = token

    def send(
        self,
        path: str,
        body: dict[str, Any],
        *,
        cancel: threading.Event | AnyEvent,
        headers: dict[str, str] | None = None,
        attempts: int | None = None,
        timeout: httpx.Timeout | None = None,
        budget: Budget | None = None,
        body_optional: bool = False,
        auth: bool = True,
        retry_on: Callable[[BaseException], bool] | None = None,
        http: httpx.Client | None = None,
    ) -> Answer:
        url = f"{self._base}/{path}"
        client = http or self._http
        budget = budget or Budget(self.timeout, ANSWER_LIMIT, body_optional)
        request_headers = {"X-Radix-Tenant-Id": self._tenant_id, "Content-Type": "application/json"}
        if auth:
            if not self.token:
                raise TokenRejected("no cluster token: give --cluster-token, or --one-time-token for a first start")
            request_headers["X-Radix-Cluster-Token"] = self.token
        request_headers.update(headers or {})
        content = _encode_body(body)
        retryable = retry_on or (lambda exc: isinstance(exc, (ControlPlaneUnavailable, TokenRejected)))

        def once() -> Answer:
            return self._request_once(client, url, path, content, request_headers, timeout, budget)

        retrying = Retrying(
            retry=retry_if_exception(lambda exc: not isinstance(exc, RequestNotSendable) and retryable(exc)),
            wait=_BackoffWait(self._retry),
            stop=(stop_after_attempt(attempts) if attempts else stop_never) | _StopOn(cancel),
            sleep=lambda seconds: cancel.wait(seconds),
            before_sleep=lambda state: self._log_retry(path, state),
            reraise=True,
        )
        return retrying(once)

    def _request_once(
        self,
        client: httpx.Client,
        url: str,
        path: str,
        content: bytes,
        headers: dict[str, str],
        timeout: httpx.Timeout | None,
        budget: Budget,
    ) -> Answer:
        endpoint = path.rsplit("/", 1)[-1]
        try:
            request = client.build_request(
                "POST", url, content=content, headers=headers, timeout=timeout or httpx.USE_CLIENT_DEFAULT
            )
        except (httpx.InvalidURL, ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
            self._count_error(endpoint, "unsendable")
            raise RequestNotSendable(f"{path}: the request cannot be built ({type(exc).__name__}: {exc})") from None
        with request_deadline(budget.seconds):
            try:
                response = client.send(request, stream=True)
                try:
                    answer = self._read_answer(response, path, budget)
                finally:
                    response.close()
            except (httpx.LocalProtocolError, httpx.InvalidURL, httpx.UnsupportedProtocol, UnicodeError) as exc:
                # The request itself is refused (h11 rejects a header, the URL cannot be encoded): it never will be
                # taken, whatever the server does, so retrying would only loop.
                self._count_error(endpoint, "unsendable")
                raise RequestNotSendable(f"{path}: the request cannot be sent ({type(exc).__name__}: {exc})") from None
            except httpx.TransportError as exc:
                timed_out = isinstance(exc, httpx.TimeoutException)
                self._count_error(endpoint, "timeout" if timed_out else "network")
                if timed_out and deadline_passed():
                    raise ControlPlaneUnavailable(
                        f"{path}: no complete answer within the request's deadline of {budget.seconds:.0f} s"
                    ) from None
                if isinstance(exc, httpx.ConnectError):
                    self._say_unreachable_once()
                # str(exc) of httpx errors names the host, never headers; keep the type for diagnosis.
                raise ControlPlaneUnavailable(f"{path}: cannot reach the control plane ({type(exc).__name__}: {exc})") from None
        return self._accepted(answer, path, endpoint)

    def _accepted(self, answer: Answer, path: str, endpoint: str) -> Answer:
        """The answer if it is a 2xx; else the error its status means (retryable or not)."""
        status = answer.status
        if 200 <= status < 300:
            self._unreachable_said = False
            if self._metrics is not None:
                self._metrics.exchanged()
            return answer
        self._count_error(endpoint, "token_rejected" if status in (401, 403) else f"http_{status // 100}xx")
        detail = self.secrets.redact(answer.content.decode("utf-8", errors="replace"))[:200].replace("\n", " ")
        if status in (401, 403):
            raise TokenRejected(
                f"{path}: token rejected (HTTP {status}); check --cluster-token / the token file, the cluster id "
                "and the tenant id",
                status=status,
            )
        if status in RETRYABLE_STATUS:
            raise ControlPlaneUnavailable(
                f"{path}: control plane answered HTTP {status} {detail}".rstrip(),
                status=status,
                retry_after=_retry_after(answer.headers),
            )
        raise ControlPlaneError(f"{path}: control plane answered HTTP {status} {detail}".rstrip(), status=status)

    def _read_answer(self, response: httpx.Response, path: str, budget: Budget) -> Answer:
        """Status, headers and body of a streamed answer; the body read within its bound and the deadline.

        An error answer's body only names the error: a little of it is read, and failing to read it changes
        nothing. Where the status alone is the outcome (`body_optional`), a 2xx whose body cannot be read stands.
        """
        status = response.status_code
        if not 200 <= status < 300:
            try:
                content = _read_bounded(response, ERROR_DETAIL_LIMIT, path, truncate=True)
            except (httpx.TransportError, httpx.DecodingError, MalformedResponse):
                content = b""
            return Answer(status, response.headers, content)
        try:
            content = _read_bounded(response, budget.limit, path)
        except (httpx.TransportError, httpx.DecodingError, MalformedResponse) as exc:
            if not budget.body_optional:
                raise
            log.warning("%s: answered HTTP %d but its body could not be read (%s); the status stands", path, status, exc)
            content = b""
        return Answer(status, response.headers, content)

    def _say_unreachable_once(self) -> None:
        if not self._unreachable_said:
            self._unreachable_said = True
            log.error("%s", _unreachable_hint(self._base))

    def _count_error(self, endpoint: str, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.control_plane_errors.labels(endpoint=endpoint, kind=kind).inc()

    def json(self, answer: Answer, path: str, content: bytes | None = None) -> Any:
        """The answer's JSON (or `content`, a version of it); MalformedResponse quoting its start when it is not."""
        try:
            return json.loads(answer.content if content is None else content)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            text = self.secrets.redact(answer.content.decode("utf-8", errors="replace"))[:80]
            raise MalformedResponse(
                f"{path}: answer is not JSON (HTTP {answer.status}, {len(answer.content)} bytes: {text!r})"
            ) from None

    @staticmethod
    def _log_retry(path: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        level = logging.ERROR if isinstance(exc, TokenRejected) else logging.WARNING
        log.log(level, "%s failed (attempt %d): %s; retrying in %.1f s", path, state.attempt_number, exc, wait)


def _unreachable_hint(base: str) -> str:
    url = httpx.URL(base)
    host = (url.host or "").lower()
    hint = (f"nothing answers at {url.scheme}://{url.netloc.decode()}: check --api-base / RADIX_API_BASE (its host, port and scheme) and that the "
            "control plane runs; the agent keeps retrying")
    if host in ("127.0.0.1", "localhost", "::1") and os.path.exists("/.dockerenv"):
        # Whether this container shares the host's network is not known here (the start-up check knows).
        hint += ("; if this agent runs in a container without --network host, 127.0.0.1 is the container itself: "
                 "give it the host's address (README, 'Against a control plane on this host')")
    return hint


def _read_bounded(response: httpx.Response, limit: int, path: str, *, truncate: bool = False) -> bytes:
    """The body, read as a stream: at most `limit` bytes are ever held (decoded, as the caller sees them).

    Over the limit: MalformedResponse naming the bound, or with `truncate` the first `limit` bytes. The
    deadline is checked between chunks too, so a trickled body ends even on a transport without a deadline.
    A body that does not decode (a broken Content-Encoding) is MalformedResponse.
    """
    too_large = MalformedResponse(
        f"{path}: answer is larger than the {_mib(limit)} bound (HTTP {response.status_code}); not read",
        status=response.status_code,
    )
    announced = response.headers.get("Content-Length", "")
    if not truncate and announced.isdigit() and int(announced) > limit:
        raise too_large  # said so up front: not worth downloading
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > limit:
                if truncate:
                    chunks.append(chunk[: limit - (size - len(chunk))])
                    break
                raise too_large
            chunks.append(chunk)
            if deadline_passed() and not _downloaded_whole(response):
                raise httpx.ReadTimeout("the request's deadline passed while its answer was read", request=response.request)
    except httpx.DecodingError as exc:
        raise MalformedResponse(f"{path}: answer body cannot be decoded ({exc})", status=response.status_code) from None
    return b"".join(chunks)


def _downloaded_whole(response: httpx.Response) -> bool:
    """Whether every byte the answer announced has arrived (so a deadline passing now cuts nothing off)."""
    length = response.headers.get("Content-Length", "")
    return length.isdigit() and response.num_bytes_downloaded >= int(length)


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):g} MiB" if size >= 1024 * 1024 else f"{size} bytes"

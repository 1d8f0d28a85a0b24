"""The control-plane client: one method per endpoint of the Radix cluster-agent protocol.

Transport and retries live here once. Network errors, 5xx, 408 and 429 are retried with capped exponential
backoff and jitter, honouring Retry-After; 401/403 become TokenRejected; a 2xx body that breaks the contract
becomes MalformedResponse. Sleeping between retries waits on an event, so shutdown interrupts it.
The token travels only in a header: it is never part of a URL, a log line or an error.

The control plane is trusted but may be broken, so no answer is taken on faith: every request has an overall
deadline (a server that trickles its answer cannot hold a thread past it), every answer a size bound (read as a
stream, so a huge one never sits in memory whole), and each item of a poll answer is checked on its own (one bad
item is logged and skipped; the others proceed). A request that can never be built (an id no header or URL can
carry) is an error at once, never retried.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable
from urllib.parse import quote

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_never, wait_exponential_jitter
from tenacity.stop import stop_base

from . import __version__
from .errors import (
    ControlPlaneError,
    ControlPlaneUnavailable,
    ExtensionUnsupported,
    MalformedResponse,
    PollInterrupted,
    RequestNotSendable,
    TokenRejected,
)
from .http_transport import DeadlineTransport, InterruptibleTransport, deadline_passed, request_deadline
from .metrics import Metrics
from .models import JOB_ID_PATTERN, Capabilities, Completion, PollResult
from .redaction import Redactor

log = logging.getLogger(__name__)

LONG_POLL_HEADER = "X-Radix-Long-Poll"
RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
# A result the server answers with these no longer wanted: stop retrying it (contract: Delivery).
RESULT_NOT_WANTED = frozenset({404, 409, 410})

POLL_ANSWER_LIMIT = 64 * 1024 * 1024
"""Largest poll answer read. A poll answer carries whole job specs, input payloads inline, for every free slot:
64 MiB leaves room for large payloads while bounding what a broken server can make the agent hold."""
ANSWER_LIMIT = 1024 * 1024
"""Largest answer read from any other endpoint: those answers are acknowledgements of a few bytes."""
ERROR_DETAIL_LIMIT = 4096
"""Bytes of an error answer read for its log line: it only names the error, and the line shows 200 characters."""
IDEMPOTENCY_KEY_LIMIT = 200
"""Longest Idempotency-Key value sent; a longer percent-encoded id is sent as its SHA-256 (see idempotency_key)."""
MAX_ITEM_FAULTS_LOGGED = 5
"""Bad items of one answer logged one line each; the rest are counted, so a broken server cannot flood the log."""


def path_segment(job_id: str) -> str:
    """A job id as one URL path segment: percent-encoded (UTF-8), so any id, valid or not, can travel."""
    # surrogatepass: JSON can carry lone surrogates, which strict UTF-8 cannot encode; the server decodes what it sent.
    return quote(job_id, safe="", errors="surrogatepass")


def idempotency_key(job_id: str) -> str:
    """The Idempotency-Key of a job's result: a valid header value for any id, the same on every attempt.

    An id that follows the contract is sent as is (a core server knows only that); any other is percent-encoded,
    and one whose encoding is over IDEMPOTENCY_KEY_LIMIT characters is sent as "sha256:" + the hex digest of the
    UTF-8 id, so the header stays short and printable whatever the id.
    """
    if JOB_ID_PATTERN.match(job_id):
        return job_id
    encoded = path_segment(job_id)
    if len(encoded) <= IDEMPOTENCY_KEY_LIMIT:
        return encoded
    return "sha256:" + hashlib.sha256(job_id.encode("utf-8", errors="surrogatepass")).hexdigest()


@dataclass(frozen=True)
class RetryPolicy:
    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 1.0
    # Seconds between attempts after a 401/403: slow enough never to hammer a server that rejects us.
    token_rejected: float = 60.0


@dataclass(frozen=True)
class _Budget:
    """How long a request may take in all, and how large its answer may be."""

    seconds: float
    limit: int
    # True where the status alone is the outcome (heartbeat, start, logs, complete): a 2xx stands even when its
    # body is too large or too slow to read, so a delivered result is not sent again forever.
    body_optional: bool = False


@dataclass(frozen=True)
class _Answer:
    """A read answer: status, headers and the body, whole and within its bound."""

    status: int
    headers: httpx.Headers
    content: bytes


def _brief(value: Any) -> str:
    """A value for a log line: its repr (newlines and control characters escaped), cut short, and its type."""
    text = repr(value)
    return f"{text[:80]}{'...' if len(text) > 80 else ''} ({type(value).__name__})"


class _ItemFaults:
    """Logs the bad items of one answer: the first few a line each, then how many more."""

    def __init__(self, path: str) -> None:
        self._path = path
        self.count = 0

    def skip(self, what: str) -> None:
        self.count += 1
        if self.count <= MAX_ITEM_FAULTS_LOGGED:
            log.error("%s: %s: skipped, the rest of the answer is used", self._path, what)

    def summarize(self) -> None:
        if self.count > MAX_ITEM_FAULTS_LOGGED:
            log.error("%s: %d more malformed items skipped", self._path, self.count - MAX_ITEM_FAULTS_LOGGED)


def _list_field(data: dict[str, Any], name: str, faults: _ItemFaults) -> list[Any]:
    """The list under `name`; absent or null is empty, anything else that is not a list is skipped and logged."""
    value = data.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        faults.skip(f"{name} is {_brief(value)}, not a list")
        return []
    return value


def _poll_result(data: dict[str, Any], long_poll: bool) -> PollResult:
    """The usable items of a poll answer, each checked on its own so that one bad item cannot lose the others."""
    faults = _ItemFaults("jobs/poll")
    jobs: list[dict[str, Any]] = []
    for index, job in enumerate(_list_field(data, "jobs", faults)):
        # Only the shape is checked here: the job runner validates each job and reports a bad one as invalid_job.
        if isinstance(job, dict):
            jobs.append(job)
        else:
            faults.skip(f"jobs[{index}] is {_brief(job)}, not a job object")
    cancels: list[str] = []
    for index, job_id in enumerate(_list_field(data, "cancel_job_ids", faults)):
        if not isinstance(job_id, str) or not job_id:
            faults.skip(f"cancel_job_ids[{index}] is {_brief(job_id)}, not a non-empty job id string")
        elif not JOB_ID_PATTERN.match(job_id):
            # No job with such an id ever runs here (it fails as invalid_job), so there is nothing to cancel.
            faults.skip(f"cancel_job_ids[{index}] is {_brief(job_id)}, which does not match {JOB_ID_PATTERN.pattern}")
        else:
            cancels.append(job_id)
    faults.summarize()
    return PollResult(jobs=jobs, cancel_job_ids=cancels, long_poll=long_poll)


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


class Delivery(Enum):
    DELIVERED = "delivered"
    NOT_WANTED = "not_wanted"  # 404/409/410
    ABANDONED = "abandoned"  # gave up because the agent is exiting


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, ControlPlaneUnavailable)


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


class _AnyEvent:
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
    def __init__(self, event: threading.Event | _AnyEvent) -> None:
        self._event = event

    def __call__(self, state: RetryCallState) -> bool:
        return self._event.is_set()


class ControlPlaneClient:
    """Speaks the protocol for one cluster. Thread-safe: heartbeat, poll and deliveries run on their own threads."""

    def __init__(
        self,
        api_base: str,
        cluster_id: str,
        tenant_id: str,
        *,
        token: str | None = None,
        http: httpx.Client | None = None,
        retry: RetryPolicy = RetryPolicy(),
        request_timeout: float = 30.0,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._base = f"{api_base.rstrip('/')}/v1/clusters/{quote(cluster_id, safe='')}"
        self._tenant_id = tenant_id
        self._token = token
        # Quotes of answers are cut to a few hundred characters: the client's own secrets are redacted before the
        # cut, which would otherwise leave a prefix of an echoed token that no later redaction recognises.
        self._secrets = Redactor([token])
        self._retry = retry
        self._timeout = request_timeout
        headers = {"User-Agent": f"radix-cluster-agent/{__version__}"}
        # Both clients run on deadline transports: a request made inside request_deadline() ends by its deadline
        # whatever the server does (see http_transport.py).
        self._http = http or httpx.Client(
            timeout=httpx.Timeout(request_timeout),
            headers=headers,
            transport=DeadlineTransport(httpx.Limits(max_connections=64, max_keepalive_connections=16)),
        )
        # Polls get a client of their own, whose in-flight request can be broken off (see http_transport.py).
        self._poll_transport: InterruptibleTransport | None = None
        if http is None:
            self._poll_transport = InterruptibleTransport()
            self._poll_http = httpx.Client(timeout=httpx.Timeout(request_timeout), headers=headers, transport=self._poll_transport)
        else:
            self._poll_http = http
        self._unsupported: set[str] = set()
        self._unsupported_lock = threading.Lock()

    def close(self) -> None:
        self._http.close()
        if self._poll_http is not self._http:
            self._poll_http.close()

    def interrupt_poll(self) -> None:
        """Break off the poll in flight, if any; the poll raises PollInterrupted when its `interrupt` is set."""
        if self._poll_transport is not None:
            self._poll_transport.interrupt()

    def supports(self, extension: str) -> bool:
        with self._unsupported_lock:
            return extension not in self._unsupported

    def _mark_unsupported(self, extension: str) -> None:
        with self._unsupported_lock:
            if extension in self._unsupported:
                return
            self._unsupported.add(extension)
        log.warning("the control plane has no %s endpoint (HTTP 404): %s calls are off for this server", extension, extension)

    @property
    def token(self) -> str | None:
        return self._token

    def set_token(self, token: str) -> None:
        self._secrets.add(token)
        self._token = token

    # --- endpoints -----------------------------------------------------------------------------------------

    def exchange_token(self, one_time_token: str, *, cancel: threading.Event, attempts: int = 5) -> str:
        """`POST /auth/exchange`: trade a one-time token for the cluster token."""
        headers = {"X-Radix-One-Time-Token": one_time_token}
        self._secrets.add(one_time_token)
        answer = self._send(
            "auth/exchange", {}, headers=headers, cancel=cancel, attempts=attempts, auth=False, retry_on=_unavailable
        )
        body = self._json(answer, "auth/exchange")
        token = body.get("cluster_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise MalformedResponse("auth/exchange answered without a cluster_token string")
        return token

    def heartbeat(self, status: str, capabilities: Capabilities, *, cancel: threading.Event, attempts: int = 3) -> None:
        """`POST /heartbeat`. Few attempts: the next tick is the real retry."""
        body = {"status": status, "agent_version": __version__, "capabilities": capabilities.model_dump(mode="json")}
        self._send("heartbeat", body, cancel=cancel, attempts=attempts, retry_on=_unavailable, body_optional=True)
        if self._metrics is not None:
            self._metrics.heartbeat_sent()

    def poll(
        self,
        capacity: int,
        *,
        wait_seconds: float,
        running_job_ids: list[str],
        free_gpus: int,
        cancel: threading.Event,
        interrupt: threading.Event | None = None,
    ) -> PollResult:
        """`POST /jobs/poll` with the long-poll extension; retried until it works or `cancel` is set.

        With `interrupt` (only for `max_jobs: 0` polls, which cannot carry jobs), `interrupt_poll()` breaks the
        request off and this raises PollInterrupted. The answer's items are checked one by one: a bad one is
        logged and left out, the others are returned.
        """
        body = {
            "max_jobs": capacity,  # the contract's name for how many jobs the agent can take now
            "wait_seconds": wait_seconds,
            "running_job_ids": running_job_ids,
            "free_gpus": free_gpus,
        }
        # The read timeout must outlast the server's hold, or every idle long poll would end as an error; the
        # deadline is the same span for the whole request, so a trickled answer cannot hold the poller longer.
        timeout = httpx.Timeout(self._timeout, read=wait_seconds + self._timeout)
        budget = _Budget(wait_seconds + self._timeout, POLL_ANSWER_LIMIT)
        stop = cancel
        if interrupt is not None:
            if interrupt.is_set():
                raise PollInterrupted()
            stop = _AnyEvent(cancel, interrupt)
        asked = time.monotonic()
        try:
            answer = self._send("jobs/poll", body, cancel=stop, timeout=timeout, budget=budget, http=self._poll_http)
            if self._metrics is not None:
                self._metrics.poll_latency.observe(time.monotonic() - asked)
        except ControlPlaneError:
            if interrupt is not None and interrupt.is_set():
                raise PollInterrupted() from None
            raise
        data = self._json(answer, "jobs/poll")
        if not isinstance(data, dict):
            raise MalformedResponse(f"jobs/poll answered with a JSON {type(data).__name__}, expected an object")
        return _poll_result(data, long_poll=answer.headers.get(LONG_POLL_HEADER) == "1")

    def start(
        self, job_id: str, *, started_at: str, container_id: str, gpu_ids: list[str], cancel: threading.Event
    ) -> bool:
        """`POST /jobs/{id}/start` (extension). False when the server does not have it."""
        if not self.supports("start"):
            return False
        body = {"started_at": started_at, "container_id": container_id, "gpu_ids": gpu_ids}
        try:
            self._send(
                f"jobs/{path_segment(job_id)}/start", body, cancel=cancel, attempts=5, retry_on=_unavailable,
                body_optional=True,
            )
        except ControlPlaneError as exc:
            if exc.status == 404:
                self._mark_unsupported("start")
                return False
            raise
        return True

    def logs(self, job_id: str, *, offset: int, data: str, cancel: threading.Event) -> bool:
        """`POST /jobs/{id}/logs` (extension), retried until accepted or `cancel` is set.

        Returns True when the answer asks to cancel the job. Raises ExtensionUnsupported on a 404.
        """
        if not self.supports("logs"):
            raise ExtensionUnsupported("logs endpoint not supported", status=404)
        try:
            answer = self._send(
                f"jobs/{path_segment(job_id)}/logs", {"offset": offset, "data": data}, cancel=cancel,
                retry_on=lambda exc: isinstance(exc, ControlPlaneError) and exc.status not in (400, 404, 409, 410, 413, 422),
                body_optional=True,
            )
        except ControlPlaneError as exc:
            if exc.status == 404:
                self._mark_unsupported("logs")
                raise ExtensionUnsupported("logs endpoint not supported", status=404) from None
            raise
        try:
            reply = json.loads(answer.content) if answer.content else {}
        except (ValueError, RecursionError):
            return False
        return isinstance(reply, dict) and reply.get("cancel") is True

    def complete(self, job_id: str, completion: Completion, *, cancel: threading.Event) -> Delivery:
        """`POST /jobs/{id}/complete`, retried until a 2xx or a 404/409/410, or until `cancel` is set.

        Every attempt carries the same Idempotency-Key, so a retry after a lost answer is not a second result.
        Any other status is retried too (capped backoff): a result is never dropped on a guess.
        """
        path = f"jobs/{path_segment(job_id)}/complete"
        try:
            self._send(
                path,
                completion.to_wire(),
                headers={"Idempotency-Key": idempotency_key(job_id)},
                cancel=cancel,
                retry_on=lambda exc: isinstance(exc, ControlPlaneError) and exc.status not in RESULT_NOT_WANTED,
                body_optional=True,
            )
        except ControlPlaneError as exc:
            if exc.status in RESULT_NOT_WANTED:
                log.warning(
                    "control plane no longer wants the result of job %s (HTTP %s); dropping it",
                    job_id if JOB_ID_PATTERN.match(job_id) else repr(job_id)[:140], exc.status,
                )
                return Delivery.NOT_WANTED
            if cancel.is_set():
                return Delivery.ABANDONED
            raise
        return Delivery.DELIVERED

    # --- transport -----------------------------------------------------------------------------------------

    def _send(
        self,
        path: str,
        body: dict[str, Any],
        *,
        cancel: threading.Event | _AnyEvent,
        headers: dict[str, str] | None = None,
        attempts: int | None = None,
        timeout: httpx.Timeout | None = None,
        budget: _Budget | None = None,
        body_optional: bool = False,
        auth: bool = True,
        retry_on: Callable[[BaseException], bool] | None = None,
        http: httpx.Client | None = None,
    ) -> _Answer:
        url = f"{self._base}/{path}"
        client = http or self._http
        budget = budget or _Budget(self._timeout, ANSWER_LIMIT, body_optional)
        request_headers = {"X-Radix-Tenant-Id": self._tenant_id, "Content-Type": "application/json"}
        if auth:
            if not self._token:
                raise TokenRejected("no cluster token: give --cluster-token, or --one-time-token for a first start")
            request_headers["X-Radix-Cluster-Token"] = self._token
        request_headers.update(headers or {})
        content = _encode_body(body)
        retryable = retry_on or (lambda exc: isinstance(exc, (ControlPlaneUnavailable, TokenRejected)))

        def once() -> _Answer:
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
        budget: _Budget,
    ) -> _Answer:
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
                # str(exc) of httpx errors names the host, never headers; keep the type for diagnosis.
                raise ControlPlaneUnavailable(f"{path}: cannot reach the control plane ({type(exc).__name__}: {exc})") from None
        status = answer.status
        if 200 <= status < 300:
            if self._metrics is not None:
                self._metrics.exchanged()
            return answer
        self._count_error(endpoint, "token_rejected" if status in (401, 403) else f"http_{status // 100}xx")
        detail = self._secrets.redact(answer.content.decode("utf-8", errors="replace"))[:200].replace("\n", " ")
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

    def _read_answer(self, response: httpx.Response, path: str, budget: _Budget) -> _Answer:
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
            return _Answer(status, response.headers, content)
        try:
            content = _read_bounded(response, budget.limit, path)
        except (httpx.TransportError, httpx.DecodingError, MalformedResponse) as exc:
            if not budget.body_optional:
                raise
            log.warning("%s: answered HTTP %d but its body could not be read (%s); the status stands", path, status, exc)
            content = b""
        return _Answer(status, response.headers, content)

    def _count_error(self, endpoint: str, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.control_plane_errors.labels(endpoint=endpoint, kind=kind).inc()

    def _json(self, answer: _Answer, path: str) -> Any:
        try:
            return json.loads(answer.content)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser goes
            text = self._secrets.redact(answer.content.decode("utf-8", errors="replace"))[:80]
            raise MalformedResponse(
                f"{path}: answer is not JSON (HTTP {answer.status}, {len(answer.content)} bytes: {text!r})"
            ) from None

    @staticmethod
    def _log_retry(path: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        level = logging.ERROR if isinstance(exc, TokenRejected) else logging.WARNING
        log.log(level, "%s failed (attempt %d): %s; retrying in %.1f s", path, state.attempt_number, exc, wait)


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

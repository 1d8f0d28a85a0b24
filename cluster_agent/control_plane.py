"""The control-plane client: one method per endpoint of the Radix cluster-agent protocol.

Transport and retries live here once. Network errors, 5xx, 408 and 429 are retried with capped exponential
backoff and jitter, honouring Retry-After; 401/403 become TokenRejected; a 2xx body that breaks the contract
becomes MalformedResponse. Sleeping between retries waits on an event, so shutdown interrupts it.
The token travels only in a header: it is never part of a URL, a log line or an error.
"""

from __future__ import annotations

import email.utils
import logging
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable
from urllib.parse import quote

import httpx
from pydantic import ValidationError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_never, wait_exponential_jitter
from tenacity.stop import stop_base

from . import __version__
from .errors import ControlPlaneError, ControlPlaneUnavailable, MalformedResponse, TokenRejected
from .http_transport import InterruptibleTransport
from .metrics import Metrics
from .models import Capabilities, Completion, PollResult

log = logging.getLogger(__name__)

LONG_POLL_HEADER = "X-Radix-Long-Poll"
RETRYABLE_STATUS = frozenset({408, 429}) | frozenset(range(500, 600))
# A result the server answers with these no longer wanted: stop retrying it (contract: Delivery).
RESULT_NOT_WANTED = frozenset({404, 409, 410})


@dataclass(frozen=True)
class RetryPolicy:
    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = 1.0
    # Seconds between attempts after a 401/403: slow enough never to hammer a server that rejects us.
    token_rejected: float = 60.0


class PollInterrupted(Exception):
    """The agent broke off its own `max_jobs: 0` poll (a slot freed, or shutdown)."""


class ExtensionUnsupported(ControlPlaneError):
    """The server answered 404 on an extension endpoint: it does not have it."""


class Delivery(Enum):
    DELIVERED = "delivered"
    NOT_WANTED = "not_wanted"  # 404/409/410
    ABANDONED = "abandoned"  # gave up because the agent is exiting


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
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
        self._retry = retry
        self._timeout = request_timeout
        headers = {"User-Agent": f"radix-cluster-agent/{__version__}"}
        self._http = http or httpx.Client(
            timeout=httpx.Timeout(request_timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            headers=headers,
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
        self._token = token

    # --- endpoints -----------------------------------------------------------------------------------------

    def exchange_token(self, one_time_token: str, *, cancel: threading.Event, attempts: int = 5) -> str:
        """`POST /auth/exchange`: trade a one-time token for the cluster token."""
        headers = {"X-Radix-One-Time-Token": one_time_token}
        response = self._send(
            "auth/exchange", {}, headers=headers, cancel=cancel, attempts=attempts, auth=False, retry_on=_unavailable
        )
        body = self._json(response, "auth/exchange")
        token = body.get("cluster_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise MalformedResponse("auth/exchange answered without a cluster_token string")
        return token

    def heartbeat(self, status: str, capabilities: Capabilities, *, cancel: threading.Event, attempts: int = 3) -> None:
        """`POST /heartbeat`. Few attempts: the next tick is the real retry."""
        body = {"status": status, "agent_version": __version__, "capabilities": capabilities.model_dump(mode="json")}
        self._send("heartbeat", body, cancel=cancel, attempts=attempts, retry_on=_unavailable)
        if self._metrics is not None:
            self._metrics.heartbeat_sent()

    def poll(
        self,
        max_jobs: int,
        *,
        wait_seconds: float,
        running_job_ids: list[str],
        free_gpus: int,
        cancel: threading.Event,
        interrupt: threading.Event | None = None,
    ) -> PollResult:
        """`POST /jobs/poll` with the long-poll extension; retried until it works or `cancel` is set.

        With `interrupt` (only for `max_jobs: 0` polls, which cannot carry jobs), `interrupt_poll()` breaks the
        request off and this raises PollInterrupted.
        """
        body = {
            "max_jobs": max_jobs,
            "wait_seconds": wait_seconds,
            "running_job_ids": running_job_ids,
            "free_gpus": free_gpus,
        }
        # The read timeout must outlast the server's hold, or every idle long poll would end as an error.
        timeout = httpx.Timeout(self._timeout, read=wait_seconds + self._timeout)
        stop = cancel
        if interrupt is not None:
            if interrupt.is_set():
                raise PollInterrupted()
            stop = _AnyEvent(cancel, interrupt)
        asked = time.monotonic()
        try:
            response = self._send("jobs/poll", body, cancel=stop, timeout=timeout, http=self._poll_http)
            if self._metrics is not None:
                self._metrics.poll_latency.observe(time.monotonic() - asked)
        except ControlPlaneError:
            if interrupt is not None and interrupt.is_set():
                raise PollInterrupted() from None
            raise
        data = self._json(response, "jobs/poll")
        if not isinstance(data, dict):
            raise MalformedResponse(f"jobs/poll answered with a JSON {type(data).__name__}, expected an object")
        try:
            result = PollResult.model_validate(
                {"jobs": data.get("jobs") or [], "cancel_job_ids": data.get("cancel_job_ids") or []}
            )
        except ValidationError as exc:
            raise MalformedResponse(f"jobs/poll answer does not follow the contract: {exc.errors()[0]['msg']}") from None
        result.long_poll = response.headers.get(LONG_POLL_HEADER) == "1"
        return result

    def start(
        self, job_id: str, *, started_at: str, container_id: str, gpu_ids: list[str], cancel: threading.Event
    ) -> bool:
        """`POST /jobs/{id}/start` (extension). False when the server does not have it."""
        if not self.supports("start"):
            return False
        body = {"started_at": started_at, "container_id": container_id, "gpu_ids": gpu_ids}
        try:
            self._send(f"jobs/{quote(job_id, safe='')}/start", body, cancel=cancel, attempts=5, retry_on=_unavailable)
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
            response = self._send(
                f"jobs/{quote(job_id, safe='')}/logs", {"offset": offset, "data": data}, cancel=cancel,
                retry_on=lambda exc: isinstance(exc, ControlPlaneError) and exc.status not in (400, 404, 409, 410, 413, 422),
            )
        except ControlPlaneError as exc:
            if exc.status == 404:
                self._mark_unsupported("logs")
                raise ExtensionUnsupported("logs endpoint not supported", status=404) from None
            raise
        try:
            answer = response.json() if response.content else {}
        except ValueError:
            return False
        return isinstance(answer, dict) and answer.get("cancel") is True

    def complete(self, job_id: str, completion: Completion, *, cancel: threading.Event) -> Delivery:
        """`POST /jobs/{id}/complete`, retried until a 2xx or a 404/409/410, or until `cancel` is set.

        Every attempt carries the same Idempotency-Key, so a retry after a lost answer is not a second result.
        Any other status is retried too (capped backoff): a result is never dropped on a guess.
        """
        path = f"jobs/{quote(job_id, safe='')}/complete"
        try:
            self._send(
                path,
                completion.to_wire(),
                headers={"Idempotency-Key": job_id},
                cancel=cancel,
                retry_on=lambda exc: isinstance(exc, ControlPlaneError) and exc.status not in RESULT_NOT_WANTED,
            )
        except ControlPlaneError as exc:
            if exc.status in RESULT_NOT_WANTED:
                log.warning("control plane no longer wants the result of job %s (HTTP %s); dropping it", job_id, exc.status)
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
        auth: bool = True,
        retry_on: Callable[[BaseException], bool] | None = None,
        http: httpx.Client | None = None,
    ) -> httpx.Response:
        url = f"{self._base}/{path}"
        client = http or self._http
        request_headers = {"X-Radix-Tenant-Id": self._tenant_id, "Content-Type": "application/json"}
        if auth:
            if not self._token:
                raise TokenRejected("no cluster token: give --cluster-token, or --one-time-token for a first start")
            request_headers["X-Radix-Cluster-Token"] = self._token
        request_headers.update(headers or {})

        def once() -> httpx.Response:
            return self._request_once(client, url, path, body, request_headers, timeout)

        retrying = Retrying(
            retry=retry_if_exception(retry_on or (lambda exc: isinstance(exc, (ControlPlaneUnavailable, TokenRejected)))),
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
        body: dict[str, Any],
        headers: dict[str, str],
        timeout: httpx.Timeout | None,
    ) -> httpx.Response:
        endpoint = path.rsplit("/", 1)[-1]
        try:
            response = client.post(url, json=body, headers=headers, timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        except httpx.TransportError as exc:
            self._count_error(endpoint, "timeout" if isinstance(exc, httpx.TimeoutException) else "network")
            # str(exc) of httpx errors names the host, never headers; keep the type for diagnosis.
            raise ControlPlaneUnavailable(f"{path}: cannot reach the control plane ({type(exc).__name__}: {exc})") from None
        status = response.status_code
        if 200 <= status < 300:
            if self._metrics is not None:
                self._metrics.exchanged()
            return response
        self._count_error(endpoint, "token_rejected" if status in (401, 403) else f"http_{status // 100}xx")
        detail = response.text[:200].replace("\n", " ")
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
                retry_after=_retry_after(response),
            )
        raise ControlPlaneError(f"{path}: control plane answered HTTP {status} {detail}".rstrip(), status=status)

    def _count_error(self, endpoint: str, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.control_plane_errors.labels(endpoint=endpoint, kind=kind).inc()

    @staticmethod
    def _json(response: httpx.Response, path: str) -> Any:
        try:
            return response.json()
        except ValueError:
            raise MalformedResponse(
                f"{path}: answer is not JSON (HTTP {response.status_code}, {len(response.content)} bytes: "
                f"{response.text[:80]!r})"
            ) from None

    @staticmethod
    def _log_retry(path: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        level = logging.ERROR if isinstance(exc, TokenRejected) else logging.WARNING
        log.log(level, "%s failed (attempt %d): %s; retrying in %.1f s", path, state.attempt_number, exc, wait)

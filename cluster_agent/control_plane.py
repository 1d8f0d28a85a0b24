"""The control-plane client: one method per endpoint of the Radix cluster-agent protocol.

How requests travel (retries, deadlines, size bounds, errors) lives once, in _transport.py. A 2xx body that
breaks the contract becomes MalformedResponse. The token travels only in a header: it is never part of a URL, a
log line or an error.

The control plane is trusted but may be broken, so no answer is taken on faith: every request has an overall
deadline (a server that trickles its answer cannot hold a thread past it), every answer a size bound (read as a
stream, so a huge one never sits in memory whole), and each item of a poll answer is checked on its own (one bad
item is logged and skipped; the others proceed). A request that can never be built (an id no header or URL can
carry) is an error at once, never retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from enum import Enum
from typing import Any
from urllib.parse import quote

import httpx

from . import __version__
from ._transport import ANSWER_LIMIT, Answer, AnyEvent, Budget, RetryPolicy, Transport
from .errors import (
    ControlPlaneError,
    ControlPlaneUnavailable,
    ExtensionUnsupported,
    MalformedResponse,
    PollInterrupted,
    RequestNotSendable,
    TokenRejected,
)
from .metrics import Metrics
from .models import JOB_ID_PATTERN, REFUSED_KEY, Capabilities, Completion, PollResult
from .json_depth import cut_deep, holds_too_deep, nesting_depth
from .redaction import Redactor

__all__ = [
    "ANSWER_LIMIT", "ControlPlaneClient", "Delivery", "POLL_ANSWER_LIMIT", "PollInterrupted", "RequestNotSendable",
    "RetryPolicy", "TokenRejected", "idempotency_key", "path_segment",
]

log = logging.getLogger(__name__)

LONG_POLL_HEADER = "X-Radix-Long-Poll"
# A result the server answers with these no longer wanted: stop retrying it (contract: Delivery).
RESULT_NOT_WANTED = frozenset({404, 409, 410})

POLL_ANSWER_LIMIT = 64 * 1024 * 1024
"""Largest poll answer read. A poll answer carries whole job specs, input payloads inline, for every free slot:
64 MiB leaves room for large payloads while bounding what a broken server can make the agent hold."""
IDEMPOTENCY_KEY_LIMIT = 200
"""Longest Idempotency-Key value sent; a longer percent-encoded id is sent as its SHA-256 (see idempotency_key)."""
POLL_ITEM_MAX_DEPTH = 200
"""Nesting kept of a poll answer that Python's parser cannot take whole (it stops near 1000 levels); a job holding
anything deeper is refused as invalid_job. 200 also keeps every later encoding of the job (job.json, its result)
within pydantic's and json's limits."""
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
    if JOB_ID_PATTERN.fullmatch(job_id):
        return job_id
    encoded = path_segment(job_id)
    if len(encoded) <= IDEMPOTENCY_KEY_LIMIT:
        return encoded
    return "sha256:" + hashlib.sha256(job_id.encode("utf-8", errors="surrogatepass")).hexdigest()


def _brief(value: Any, secrets: Redactor) -> str:
    """A value for a log line: a scalar's repr (control characters escaped; the client's secrets redacted *before*
    it is cut, so no prefix of one is left), a container's type and size only (its repr could be huge, nested past
    any recursion limit, or carry a job's credentials)."""
    if isinstance(value, dict):
        return f"an object with {len(value)} key(s)"
    if isinstance(value, list):
        return f"a list of {len(value)} item(s)"
    text = secrets.redact(repr(value))
    return f"{text[:80]}{'...' if len(text) > 80 else ''} ({type(value).__name__})"


class _ItemFaults:
    """Logs the bad items of one answer: the first few a line each, then how many more."""

    def __init__(self, path: str, secrets: Redactor) -> None:
        self._path = path
        self.secrets = secrets
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
        faults.skip(f"{name} is {_brief(value, faults.secrets)}, not a list")
        return []
    return value


def _poll_result(data: dict[str, Any], long_poll: bool, secrets: Redactor, *, was_cut: bool = False) -> PollResult:
    """The usable items of a poll answer, each checked on its own so that one bad item cannot lose the others."""
    faults = _ItemFaults("jobs/poll", secrets)
    jobs: list[dict[str, Any]] = []
    for index, job in enumerate(_list_field(data, "jobs", faults)):
        # Only the shape is checked here: the job runner validates each job and reports a bad one as invalid_job.
        if isinstance(job, dict):
            # Deeper than POLL_ITEM_MAX_DEPTH: cut short by the fallback parse, or still parseable but near the
            # recursion limit, where writing the job's records would fail.
            if nesting_depth(job) > POLL_ITEM_MAX_DEPTH or (was_cut and holds_too_deep(job)):
                job[REFUSED_KEY] = f"the job nests deeper than {POLL_ITEM_MAX_DEPTH} levels, which the agent cannot read"
            jobs.append(job)
        else:
            faults.skip(f"jobs[{index}] is {_brief(job, secrets)}, not a job object")
    cancels: list[str] = []
    for index, job_id in enumerate(_list_field(data, "cancel_job_ids", faults)):
        if not isinstance(job_id, str) or not job_id:
            faults.skip(f"cancel_job_ids[{index}] is {_brief(job_id, secrets)}, not a non-empty job id string")
        elif not JOB_ID_PATTERN.fullmatch(job_id):
            # No job with such an id ever runs here (it fails as invalid_job), so there is nothing to cancel.
            faults.skip(
                f"cancel_job_ids[{index}] is {_brief(job_id, secrets)}, which does not match {JOB_ID_PATTERN.pattern}"
            )
        else:
            cancels.append(job_id)
    faults.summarize()
    return PollResult(jobs=jobs, cancel_job_ids=cancels, long_poll=long_poll)


class Delivery(Enum):
    DELIVERED = "delivered"
    NOT_WANTED = "not_wanted"  # 404/409/410
    TOO_LARGE = "too_large"  # 413: the server (or a proxy in front of it) refuses a body this large
    ABANDONED = "abandoned"  # gave up because the agent is exiting


def _unavailable(exc: BaseException) -> bool:
    return isinstance(exc, ControlPlaneUnavailable)


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
        self._transport = Transport(
            f"{api_base.rstrip('/')}/v1/clusters/{quote(cluster_id, safe='')}", tenant_id, token=token, http=http,
            retry=retry, request_timeout=request_timeout, metrics=metrics,
        )
        self._timeout = request_timeout
        self._unsupported: set[str] = set()
        self._unsupported_lock = threading.Lock()

    def close(self) -> None:
        self._transport.close()

    def interrupt_poll(self) -> None:
        """Break off the poll in flight, if any; the poll raises PollInterrupted when its `interrupt` is set."""
        self._transport.interrupt_poll()

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
        return self._transport.token

    def set_token(self, token: str) -> None:
        self._transport.set_token(token)

    # --- endpoints -----------------------------------------------------------------------------------------

    def exchange_token(self, one_time_token: str, *, cancel: threading.Event, attempts: int = 5) -> str:
        """`POST /auth/exchange`: trade a one-time token for the cluster token."""
        headers = {"X-Radix-One-Time-Token": one_time_token}
        self._transport.secrets.add(one_time_token)
        answer = self._transport.send(
            "auth/exchange", {}, headers=headers, cancel=cancel, attempts=attempts, auth=False, retry_on=_unavailable
        )
        body = self._transport.json(answer, "auth/exchange")
        token = body.get("cluster_token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise MalformedResponse("auth/exchange answered without a cluster_token string")
        return token

    def heartbeat(self, status: str, capabilities: Capabilities, *, cancel: threading.Event, attempts: int = 3) -> None:
        """`POST /heartbeat`. Few attempts: the next tick is the real retry."""
        body = {"status": status, "agent_version": __version__, "capabilities": capabilities.model_dump(mode="json")}
        self._transport.send("heartbeat", body, cancel=cancel, attempts=attempts, retry_on=_unavailable, body_optional=True)
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
        budget = Budget(wait_seconds + self._timeout, POLL_ANSWER_LIMIT)
        stop = cancel
        if interrupt is not None:
            if interrupt.is_set():
                raise PollInterrupted()
            stop = AnyEvent(cancel, interrupt)
        asked = time.monotonic()
        try:
            answer = self._transport.send("jobs/poll", body, cancel=stop, timeout=timeout, budget=budget, http=self._transport.poll_http)
            if self._metrics is not None:
                self._metrics.poll_latency.observe(time.monotonic() - asked)
        except ControlPlaneError:
            if interrupt is not None and interrupt.is_set():
                raise PollInterrupted() from None
            raise
        was_cut = False
        try:
            data = json.loads(answer.content)
        except RecursionError:
            # One item nested past the parser's depth must not lose the others: cut it short, refuse just it.
            data = self._transport.json(answer, "jobs/poll", content=cut_deep(answer.content, POLL_ITEM_MAX_DEPTH))
            was_cut = True
        except ValueError:
            data = self._transport.json(answer, "jobs/poll")  # raises MalformedResponse with a quote
        if not isinstance(data, dict):
            raise MalformedResponse(f"jobs/poll answered with a JSON {type(data).__name__}, expected an object")
        return _poll_result(data, long_poll=answer.headers.get(LONG_POLL_HEADER) == "1", secrets=self._transport.secrets,
                            was_cut=was_cut)

    def start(
        self, job_id: str, *, started_at: str, container_id: str, gpu_ids: list[str], cancel: threading.Event
    ) -> bool:
        """`POST /jobs/{id}/start` (extension). False when the server does not have it."""
        body = {"started_at": started_at, "container_id": container_id, "gpu_ids": gpu_ids}
        try:
            self._extension("start", job_id, body, cancel=cancel, attempts=5, retry_on=_unavailable,
                            body_optional=True)
        except ExtensionUnsupported:
            return False
        return True

    def _extension(self, name: str, job_id: str, body: dict[str, Any], **send: Any) -> Answer:
        """`POST /jobs/{id}/{name}` of an extension. Raises ExtensionUnsupported when the server has no such
        endpoint (a 404 turns the extension off for this server, said once in the log)."""
        if not self.supports(name):
            raise ExtensionUnsupported(f"{name} endpoint not supported", status=404)
        try:
            return self._transport.send(f"jobs/{path_segment(job_id)}/{name}", body, **send)
        except ControlPlaneError as exc:
            if exc.status == 404:
                self._mark_unsupported(name)
                raise ExtensionUnsupported(f"{name} endpoint not supported", status=404) from None
            raise

    def logs(self, job_id: str, *, offset: int, data: str, cancel: threading.Event) -> bool:
        """`POST /jobs/{id}/logs` (extension), retried until accepted or `cancel` is set.

        Returns True when the answer asks to cancel the job. Raises ExtensionUnsupported on a 404.
        """
        answer = self._extension(
            "logs", job_id, {"offset": offset, "data": data}, cancel=cancel,
            retry_on=lambda exc: isinstance(exc, ControlPlaneError) and exc.status not in (400, 404, 409, 410, 413, 422),
            body_optional=True,
        )
        try:
            reply = json.loads(answer.content) if answer.content else {}
        except (ValueError, RecursionError):
            return False
        return isinstance(reply, dict) and reply.get("cancel") is True

    def plan_artifacts(self, job_id: str, files: list[dict[str, Any]], *, cancel: threading.Event,
                       attempts: int = 6) -> list[dict[str, Any]]:
        """`POST /jobs/{id}/artifacts` (extension): where to upload each file. `files`: [{path, size_bytes, sha256,
        content_type}]. Returns the answer's `uploads` items that are objects (the caller checks each). Raises
        ExtensionUnsupported on a 404, ControlPlaneError when retries are used up or the server refuses."""
        answer = self._extension("artifacts", job_id, {"files": files}, cancel=cancel, attempts=attempts,
                                 retry_on=_unavailable)
        body = self._transport.json(answer, "artifacts")
        uploads = body.get("uploads") if isinstance(body, dict) else None
        if not isinstance(uploads, list):
            raise MalformedResponse("artifacts answered without an uploads list")
        return [item for item in uploads if isinstance(item, dict)]

    def complete(self, job_id: str, completion: Completion, *, cancel: threading.Event) -> Delivery:
        """`POST /jobs/{id}/complete`, retried until a 2xx or a 404/409/410, or until `cancel` is set.

        Every attempt carries the same Idempotency-Key, so a retry after a lost answer is not a second result.
        Any other status is retried too (capped backoff): a result is never dropped on a guess.
        """
        path = f"jobs/{path_segment(job_id)}/complete"
        try:
            self._transport.send(
                path,
                completion.to_wire(),
                headers={"Idempotency-Key": idempotency_key(job_id)},
                cancel=cancel,
                retry_on=lambda exc: isinstance(exc, ControlPlaneError) and exc.status not in (*RESULT_NOT_WANTED, 413),
                body_optional=True,
            )
        except ControlPlaneError as exc:
            if exc.status == 413:
                return Delivery.TOO_LARGE  # the same body would be refused forever: the caller sends a smaller one
            if exc.status in RESULT_NOT_WANTED:
                log.warning(
                    "control plane no longer wants the result of job %s (HTTP %s); dropping it",
                    job_id if JOB_ID_PATTERN.fullmatch(job_id) else self._transport.secrets.redact(repr(job_id))[:140],
                    exc.status,
                )
                return Delivery.NOT_WANTED
            if cancel.is_set():
                return Delivery.ABANDONED
            raise
        return Delivery.DELIVERED

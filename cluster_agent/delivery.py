"""Result delivery with a spool: a result is written into its job directory before the first attempt and stays
there until the control plane took it (2xx) or said it no longer wants it (404/409/410). An agent killed at any
instant therefore never loses a result: the next one finds result.json and delivers it, with the same
Idempotency-Key, so the control plane records it once.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Callable

from pydantic import ValidationError

from .clock import SYSTEM_CLOCK, Clock
from .control_plane import ControlPlaneClient, Delivery
from .errors import ControlPlaneError
from .job_dir import JobDirectory
from .metrics import Metrics
from .failure_class import classify
from .models import Completion
from .transfer import refused_result

__all__ = ["ResultDelivery"]

log = logging.getLogger(__name__)


# (job_id, the refused completion, its size in bytes, its directory) -> a smaller completion that says why
Shrink = Callable[[str, Completion, int, JobDirectory | None], Completion]


class ResultDelivery:
    def __init__(
        self, client: ControlPlaneClient, abandon: threading.Event, metrics: Metrics | None = None, *,
        clock: Clock = SYSTEM_CLOCK, refused_as_too_large: Shrink | None = None,
    ) -> None:
        self._client = client
        self._shrink = refused_as_too_large
        self._clock = clock
        self._metrics = metrics
        self._abandon = abandon
        self._in_flight = 0
        self._changed = threading.Condition()

    @staticmethod
    def spool(job_id: str, completion: Completion, directory: JobDirectory) -> bool:
        """Write the result into the job's directory (never its workspace) before the first delivery attempt."""
        if not directory.exists():
            return True  # nothing to spool into: the job never got a directory
        try:
            directory.write_result(completion.to_wire())
            return True
        except (OSError, ValueError, TypeError) as exc:
            log.error("job %s: result not spooled (%s): it is kept in memory only until delivered", job_id, exc)
            return False

    def deliver(
        self, job_id: str, completion: Completion, directory: JobDirectory | None, *, spooled: bool = False,
        exited_at: float | None = None,
    ) -> bool:
        """Spool, deliver, and say whether the job is done with (True: its directory and container may go).
        `exited_at` (wall-clock epoch seconds) is when the job's container exited, for
        radix_agent_result_after_exit_seconds."""
        if completion.metrics.failure_class is None:
            # Made outside a job's run (a vanished container, a job that arrived during shutdown): classed here.
            completion = classify(completion, memory_limited=False)
        if directory is not None and not spooled:
            self.spool(job_id, completion, directory)
        with self._changed:
            self._in_flight += 1
        started = self._clock.monotonic()
        if self._metrics is not None and exited_at is not None:
            self._metrics.result_after_exit.observe(max(0.0, self._clock.wall() - exited_at))
        try:
            outcome = self._client.complete(job_id, completion, cancel=self._abandon)
            if outcome is Delivery.TOO_LARGE:
                outcome = self._deliver_smaller(job_id, completion, directory)
            if self._metrics is not None and outcome is Delivery.DELIVERED:
                self._metrics.completion_latency.observe(self._clock.monotonic() - started)
        except ControlPlaneError as exc:
            log.error("job %s: result not delivered: %s", job_id, exc)
            return False
        finally:
            with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()
        if outcome is Delivery.ABANDONED:
            log.warning("job %s: result not delivered before exit; it stays spooled for the next agent", job_id)
            return False
        if outcome is Delivery.DELIVERED:
            log.info("job %s: result delivered", job_id, extra={
                "job_id": job_id, "event": "delivered", "duration_s": round(self._clock.monotonic() - started, 3)})
        return True

    def _deliver_smaller(self, job_id: str, completion: Completion, directory: JobDirectory | None) -> Delivery:
        """The control plane (or a proxy before it) refused the result as too large (413): the same body would be
        refused forever, and dropping it would leave the job without a result. A failed completion that says so
        replaces it (spooled in its place), and goes out instead."""
        size = len(json.dumps(completion.to_wire()).encode())
        log.error("job %s: the control plane refused its result as too large (HTTP 413, %d bytes); sending a failed "
                  "result that says so instead", job_id, size)
        if self._shrink is not None:
            smaller = self._shrink(job_id, completion, size, directory)
        else:
            smaller = refused_result(job_id, completion, size, None, None)
        if directory is not None:
            self.spool(job_id, smaller, directory)
        outcome = self._client.complete(job_id, smaller, cancel=self._abandon)
        if outcome is Delivery.TOO_LARGE:
            raise ControlPlaneError("the control plane refused even the short failed result as too large (HTTP 413); "
                                    "check its (or its proxy's) request body limit", status=413)
        return outcome

    def deliver_spooled(self, directory: JobDirectory, body: dict) -> bool:
        try:
            completion = Completion.model_validate(body)
        except ValidationError as exc:
            log.error("job %s: spooled result %s is unreadable (%s); left in place", directory.job_id, directory.path, exc)
            return False
        log.info("job %s: delivering the result a previous agent spooled", directory.job_id)
        return self.deliver(directory.job_id, completion, directory, spooled=True)

    def in_flight(self) -> int:
        """Results being delivered now (each retried until taken)."""
        with self._changed:
            return self._in_flight

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no delivery is in flight (shutdown flushes them)."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout=max(0.0, timeout))

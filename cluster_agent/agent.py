"""The agent loop: poll for work, hand each job to its own thread, shut down gracefully.

Threads, each with a name and an owner:
  main       waits for the stop event, then runs the shutdown sequence
  poller     long-polls the control plane and accepts jobs
  heartbeat  sends heartbeats on its own timer (heartbeat.py)
  job-<id>   runs one job (job_runner.py) and delivers its result
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from . import health
from .control_plane import ControlPlaneClient, Delivery
from .errors import ControlPlaneError, MalformedResponse
from .executors import Executor
from .gpu_pool import GpuPool
from .heartbeat import Heartbeat
from .job_runner import JobRun, job_id_of
from .models import Completion, FailureReason
from .settings import Settings

log = logging.getLogger(__name__)

# After an unmarked empty poll the agent waits poll_interval; after a malformed answer, this.
MALFORMED_BACKOFF_SECONDS = 5.0
# A long-poll server that answers "nothing" at once, again and again, must not become a tight loop.
MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS = 1.0


class Agent:
    def __init__(
        self,
        settings: Settings,
        client: ControlPlaneClient,
        executor: Executor,
        gpu_pool: GpuPool,
        heartbeat: Heartbeat,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._client = client
        self._executor = executor
        self._gpus = gpu_pool
        self._heartbeat = heartbeat
        self._clock = clock
        self.stopping = threading.Event()  # graceful: take no new work
        self._abandon = threading.Event()  # exit now: stop retrying deliveries
        self._slots = threading.BoundedSemaphore(settings.max_concurrent_jobs)
        self._runs: dict[str, JobRun] = {}
        self._runs_lock = threading.Lock()
        self._slot_freed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._poller: threading.Thread | None = None
        self.jobs_finished = 0

    # --- lifecycle -----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until `stopping` is set (by a signal handler), then shut down within the grace period."""
        log.info(
            "agent starting: cluster %s, control plane %s, up to %d job(s) at once, %d GPU(s)",
            self._settings.cluster_id, self._settings.api_base, self._settings.max_concurrent_jobs, self._gpus.total,
        )
        self._heartbeat.beat("active")  # one before the first poll (contract)
        self._heartbeat.start()
        self._poller = threading.Thread(target=self._poll_loop, name="poller", daemon=True)
        self._poller.start()
        while not self.stopping.is_set():
            # A dead poller stops the touches, so the image's HEALTHCHECK turns unhealthy.
            if self._poller.is_alive():
                health.touch(self._settings.health_file)
            self.stopping.wait(health.TOUCH_EVERY_SECONDS / 2)
        return self._shutdown()

    def _shutdown(self) -> int:
        grace = self._settings.shutdown_grace
        deadline = self._clock() + grace
        log.info("shutting down: no new jobs; %d running; exiting within %.0f s", len(self._active()), grace)
        self._heartbeat.stop()
        self._heartbeat.send_draining()
        # Jobs still running this long before the deadline are stopped, leaving time for their stop and result.
        stop_margin = min(grace / 2, 15.0)
        self._join_jobs(deadline - stop_margin)
        active = self._active()
        for run in active:
            run.stop(FailureReason.INTERRUPTED, "the agent was shut down before the job finished", grace=min(10.0, stop_margin / 2))
        if active:
            log.info("stopped %d job(s) still running at the end of the grace period", len(active))
        if self._poller is not None:
            self._poller.join(timeout=max(0.0, deadline - 1.0 - self._clock()))
        self._join_jobs(deadline - 0.5)
        self._abandon.set()
        leftover = self._active()
        if leftover:
            log.error("exiting with %d result(s) not delivered: %s", len(leftover), ", ".join(r.job_id or "?" for r in leftover))
        log.info("agent stopped")
        return 0

    def _join_jobs(self, until: float) -> None:
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, until - self._clock()))

    def _active(self) -> list[JobRun]:
        with self._runs_lock:
            return list(self._runs.values())

    # --- getting work --------------------------------------------------------------------------------------

    def _free_slots(self) -> int:
        with self._runs_lock:
            return self._settings.max_concurrent_jobs - len(self._runs)

    def _poll_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._poll_once()
            except Exception:  # a bug in one iteration must not end the loop
                log.exception("poll loop: unexpected error; polling again in %.0f s", MALFORMED_BACKOFF_SECONDS)
                self.stopping.wait(MALFORMED_BACKOFF_SECONDS)

    def _poll_once(self) -> None:
        """One iteration: wait for a free slot, poll, accept what came."""
        free = self._free_slots()
        if free <= 0:
            self._slot_freed.wait(1.0)
            self._slot_freed.clear()
            return
        asked = self._clock()
        try:
            result = self._client.poll(
                free,
                wait_seconds=self._settings.long_poll_seconds,
                running_job_ids=sorted(j.job_id for j in self._active() if j.job_id),
                free_gpus=self._gpus.free_count(),
                cancel=self.stopping,
            )
        except MalformedResponse as exc:
            log.error("poll: %s; polling again in %.0f s", exc, MALFORMED_BACKOFF_SECONDS)
            self.stopping.wait(MALFORMED_BACKOFF_SECONDS)
            return
        except ControlPlaneError as exc:
            if not self.stopping.is_set():
                log.error("poll: %s; polling again in %.0f s", exc, self._settings.poll_interval)
                self.stopping.wait(self._settings.poll_interval)
            return
        for raw in result.jobs:
            self._accept(raw)
        if result.jobs:
            return
        if not result.long_poll:
            self.stopping.wait(self._settings.poll_interval)
        elif self._clock() - asked < MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS and not result.cancel_job_ids:
            self.stopping.wait(MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS)

    def _accept(self, raw: Any) -> None:
        job_id = job_id_of(raw)
        if job_id is None:
            log.error("poll returned a job without a job_id (%s); it cannot be run or reported", str(raw)[:200])
            return
        run = JobRun(raw, settings=self._settings, executor=self._executor, gpu_pool=self._gpus, clock=self._clock)
        with self._runs_lock:
            if job_id in self._runs:
                log.warning("job %s: received again while it runs; ignoring the duplicate", job_id)
                return
            self._runs[job_id] = run
        log.info("job %s: received", job_id)
        if self.stopping.is_set():
            # Arrived with the last poll after shutdown began: report it rather than leave it assigned to nobody.
            run.stop(FailureReason.INTERRUPTED, "the agent was shutting down when the job arrived; resubmit it")
        thread = threading.Thread(target=self._work, args=(run,), name=f"job-{job_id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    # --- one job -------------------------------------------------------------------------------------------

    def _work(self, run: JobRun) -> None:
        job_id = run.job_id or "?"
        try:
            with self._slots:
                completion = run.execute()
            log.info(
                "job %s: finished: %s%s in %.1f s",
                job_id, completion.status.value,
                f" ({completion.failure_reason.value})" if completion.failure_reason else "",
                completion.metrics.runtime_seconds,
            )
            self._deliver(run, completion)
        finally:
            with self._runs_lock:
                self._runs.pop(job_id, None)
            self.jobs_finished += 1
            self._slot_freed.set()

    def _deliver(self, run: JobRun, completion: Completion) -> None:
        job_id = run.job_id or "?"
        try:
            outcome = self._client.complete(job_id, completion, cancel=self._abandon)
        except ControlPlaneError as exc:
            log.error("job %s: result not delivered: %s", job_id, exc)
            return
        if outcome is Delivery.ABANDONED:
            log.error("job %s: result not delivered before exit", job_id)
            return
        if outcome is Delivery.DELIVERED:
            log.info("job %s: result delivered", job_id)
        run.cleanup()


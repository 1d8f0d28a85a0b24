"""The agent loop: poll for work, hand each job to its own thread, shut down gracefully.

Threads, each with a name and an owner:
  main       waits for the stop event, then runs the shutdown sequence
  poller     long-polls the control plane and accepts jobs
  heartbeat  sends heartbeats on its own timer (heartbeat.py)
  job-<id>   runs one job (job_runner.py) and delivers its result
  logs-<id>  ships one job's live log (log_streamer.py); start-<id> sends its start acknowledgement
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from . import health
from .control_plane import ControlPlaneClient, Delivery, PollInterrupted
from .errors import ControlPlaneError, MalformedResponse
from .executors import Executor
from .gpu_pool import GpuPool
from .heartbeat import Heartbeat
from .job_runner import JobRun, job_id_of
from .live_job import LiveJob
from .models import Completion, FailureReason, PollResult
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
        self._live: dict[str, LiveJob] = {}
        self._runs_lock = threading.Lock()
        # Wakes the poller from a wait (a slot freed, or shutdown); `_interrupt` breaks off a max_jobs-0 poll.
        self._wake = threading.Event()
        self._interrupt = threading.Event()
        self._zero_poll_in_flight = False  # guarded by _runs_lock: only such a poll may be broken off
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
        self._wake_poller()
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
        with self._runs_lock:
            for live in self._live.values():
                live.abandon()
        leftover = [t.name.removeprefix("job-") for t in self._threads if t.is_alive()]
        if leftover:
            log.error("exiting with %d result(s) not delivered: %s", len(leftover), ", ".join(leftover))
        log.info("agent stopped")
        return 0

    def _join_jobs(self, until: float) -> None:
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, until - self._clock()))

    def _active(self) -> list[JobRun]:
        with self._runs_lock:
            return list(self._runs.values())

    # --- getting work --------------------------------------------------------------------------------------

    def _poll_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._poll_once()
            except Exception:  # a bug in one iteration must not end the loop
                log.exception("poll loop: unexpected error; polling again in %.0f s", MALFORMED_BACKOFF_SECONDS)
                self.stopping.wait(MALFORMED_BACKOFF_SECONDS)

    def _poll_once(self) -> None:
        """One iteration: poll for as many jobs as there are free slots, act on the answer."""
        asked = self._clock()
        result = self._poll()
        if result is None:
            return
        for job_id in result.cancel_job_ids:
            self.cancel(job_id)
        for raw in result.jobs:
            self._accept(raw)
        if result.jobs:
            return
        if not result.long_poll:
            self._sleep(self._settings.poll_interval)
        elif self._clock() - asked < MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS and not result.cancel_job_ids:
            self._sleep(MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS)

    def _poll(self) -> PollResult | None:
        """The poll itself; None when it failed (after logging and waiting) or was broken off."""
        # With every slot busy the poll still goes out, with max_jobs 0, so cancellations arrive at once. When a
        # slot frees, that poll -- and only such a poll, which cannot carry jobs -- is broken off and a new one
        # asks for work.
        with self._runs_lock:
            free = max(0, self._settings.max_concurrent_jobs - len(self._runs))
            self._zero_poll_in_flight = free == 0
            self._interrupt.clear()
            self._wake.clear()
        try:
            return self._client.poll(
                free,
                wait_seconds=self._settings.long_poll_seconds,
                running_job_ids=sorted(j.job_id for j in self._active() if j.job_id),
                free_gpus=self._gpus.free_count(),
                cancel=self.stopping,
                interrupt=self._interrupt if free == 0 else None,
            )
        except PollInterrupted:
            return None
        except MalformedResponse as exc:
            log.error("poll: %s; polling again in %.0f s", exc, MALFORMED_BACKOFF_SECONDS)
            self.stopping.wait(MALFORMED_BACKOFF_SECONDS)
            return None
        except ControlPlaneError as exc:
            if not self.stopping.is_set():
                log.error("poll: %s; polling again in %.0f s", exc, self._settings.poll_interval)
                self._sleep(self._settings.poll_interval)
            return None
        finally:
            with self._runs_lock:
                self._zero_poll_in_flight = False

    def _sleep(self, seconds: float) -> None:
        """Wait between polls; a freed slot or shutdown ends the wait (the next job should not wait for a timer)."""
        self._wake.wait(seconds)
        self._wake.clear()

    def _wake_poller(self) -> None:
        self._wake.set()
        with self._runs_lock:
            if not self._zero_poll_in_flight:
                return
            self._interrupt.set()
        self._client.interrupt_poll()

    def cancel(self, job_id: str) -> None:
        """Cancel a job the control plane asked to cancel; one this agent does not run is ignored."""
        with self._runs_lock:
            run = self._runs.get(job_id)
        if run is None:
            log.info("cancel for job %s, which this agent does not run: ignored", job_id)
            return
        log.info("job %s: cancel requested by the control plane", job_id)
        # Stopping takes up to the SIGKILL grace: never on the poller's or a streamer's thread.
        threading.Thread(
            target=run.stop, args=(FailureReason.CANCELED, "canceled by the control plane"),
            name=f"cancel-{job_id}", daemon=True,
        ).start()

    def _accept(self, raw: Any) -> None:
        job_id = job_id_of(raw)
        if job_id is None:
            log.error("poll returned a job without a job_id (%s); it cannot be run or reported", str(raw)[:200])
            return
        with self._runs_lock:
            if job_id in self._runs:
                log.warning("job %s: received again while it runs; ignoring the duplicate", job_id)
                return
            live = LiveJob(self._client, job_id, on_cancel=lambda: self.cancel(job_id))
            run = JobRun(
                raw, settings=self._settings, executor=self._executor, gpu_pool=self._gpus, clock=self._clock,
                observer=live,
            )
            self._runs[job_id] = run
            self._live[job_id] = live
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
        with self._runs_lock:
            live = self._live.get(job_id)
        try:
            with self._slots:
                completion = run.execute()
        finally:
            # The slot is free as soon as the container has ended: the next job need not wait for this
            # job's delivery and clean-up.
            with self._runs_lock:
                self._runs.pop(job_id, None)
                self._live.pop(job_id, None)
            self._wake_poller()
        log.info(
            "job %s: finished: %s%s in %.1f s",
            job_id, completion.status.value,
            f" ({completion.failure_reason.value})" if completion.failure_reason else "",
            completion.metrics.runtime_seconds,
        )
        if live is not None:
            live.finish()
        self._deliver(run, completion)
        self.jobs_finished += 1

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


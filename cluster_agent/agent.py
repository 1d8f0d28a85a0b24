"""The agent loop: recover what a previous agent left, poll for work, run each job on its own thread, shut down.

Threads, each with a name and an owner:
  main       recovers, then waits for the stop event and runs the shutdown sequence
  poller     long-polls the control plane and accepts jobs
  heartbeat  sends heartbeats on its own timer (heartbeat.py)
  job-<id>   runs or adopts one job (job_runner.py) and delivers its result (delivery.py)
  logs-<id>  ships one job's live log (log_streamer.py); start-<id> sends its start acknowledgement
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from . import healthcheck, recovery
from .control_plane import ControlPlaneClient
from .errors import ControlPlaneError, EngineUnavailable, MalformedResponse, PollInterrupted
from .engine_watch import EngineWatch
from .executors import ContainerState, Executor
from .delivery import ResultDelivery
from .gpu_pool import GpuAllocator
from .heartbeat import Heartbeat
from .job_dir import JobDirectory
from .job_runner import JobRun, job_id_of
from .disk import DiskGuard
from .live_job import LiveJob
from .metrics import Metrics
from .redaction import Redactor
from .slots import JobSlots
from .models import Completion, FailureReason, PollResult
from .settings import Settings

__all__ = ["Agent"]

log = logging.getLogger(__name__)

# After an unmarked empty poll the agent waits poll_interval; after a malformed answer, this.
MALFORMED_BACKOFF_SECONDS = 5.0
# A long-poll server that answers "nothing" at once, again and again, must not become a tight loop.
MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS = 1.0
# With --on-shutdown leave the agent exits within this (jobs keep running for the next agent).
LEAVE_EXIT_SECONDS = 9.0


class Agent:
    def __init__(
        self,
        settings: Settings,
        client: ControlPlaneClient,
        executor: Executor,
        gpu_pool: GpuAllocator,
        heartbeat: Heartbeat,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
        disk: DiskGuard | None = None,
        redactor: Redactor | None = None,
        jobs_dir_held: Callable[[], bool] | None = None,
    ) -> None:
        self._jobs_dir_held = jobs_dir_held  # the jobs directory's lock (jobs_lock.py) still this agent's
        self._settings = settings
        self._redactor = redactor or Redactor()  # the agent's secrets, kept out of every job's result too
        self._metrics = metrics
        self._disk = disk
        self._client = client
        self._executor = executor
        self._gpus = gpu_pool
        self._heartbeat = heartbeat
        self._clock = clock
        self.stopping = threading.Event()  # graceful: take no new work
        self._abandon = threading.Event()  # exit now: stop retrying deliveries
        self._delivery = ResultDelivery(client, self._abandon, metrics)
        self._slots = JobSlots(settings.max_concurrent_jobs)
        self._runs: dict[str, JobRun] = {}  # from accepted until its slot is released
        self._live: dict[str, LiveJob] = {}
        # Every job in this agent, from accepted until its result is delivered and cleaned up: a job id the
        # server sends again meanwhile is a duplicate, never a second run.
        self._in_agent: set[str] = set()
        self._runs_lock = threading.Lock()
        # Wakes the poller from a wait (a slot freed, or shutdown); `_interrupt` breaks off a max_jobs-0 poll.
        self._wake = threading.Event()
        self._interrupt = threading.Event()
        self._zero_poll_in_flight = False  # guarded by _runs_lock: only such a poll may be broken off
        self._threads: list[threading.Thread] = []
        self._poller: threading.Thread | None = None
        self._engine = EngineWatch(executor, clock=clock)
        self.jobs_accepted = 0
        self.jobs_finished = 0
        if metrics is not None:
            metrics.running_jobs.set_function(lambda: len(self._active()))
            metrics.free_slots.set_function(self._slots.free)

    def poller_alive(self) -> bool:
        return self._poller is not None and self._poller.is_alive()

    # --- lifecycle -----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until `stopping` is set (a signal, or --max-jobs reached), then shut down."""
        log.info(
            "agent starting: cluster %s, control plane %s, up to %d job(s) at once, %d GPU(s)",
            self._settings.cluster_id, self._settings.api_base, self._settings.max_concurrent_jobs, self._gpus.total,
        )
        self._heartbeat.beat("active")  # one before the first poll (contract)
        self._heartbeat.start()
        self._recover()
        self._poller = threading.Thread(target=self._poll_loop, name="poller", daemon=True)
        self._poller.start()
        while not self.stopping.is_set():
            # A dead poller stops the touches, so the image's HEALTHCHECK turns unhealthy.
            if self._poller.is_alive():
                healthcheck.touch(self._settings.health_file)
            if self._jobs_dir_held is not None and not self._jobs_dir_held():
                log.error("another agent took this jobs directory: taking no more jobs and shutting down "
                          "(--on-shutdown decides what becomes of the running ones)")
                self.stopping.set()
                break
            self.stopping.wait(healthcheck.TOUCH_EVERY_SECONDS / 2)
        return self._shutdown()

    def _shutdown(self) -> int:
        leave = self._settings.on_shutdown == "leave"
        grace = min(self._settings.shutdown_grace, LEAVE_EXIT_SECONDS) if leave else self._settings.shutdown_grace
        deadline = self._clock() + grace
        running = self._active()
        log.info(
            "shutting down: no new jobs; %d running, which %s; exiting within %.0f s",
            len(running), "are left to the next agent" if leave else "will be stopped if still running", grace,
        )
        self._wake_poller()
        self._heartbeat.drain()
        if leave:
            # Containers keep running; the next agent adopts them. Flush what is in flight.
            self._delivery.wait_idle(deadline - 1.0 - self._clock())
        else:
            # Jobs still running this long before the deadline are stopped, leaving time for their stop and result.
            stop_margin = min(grace / 2, 15.0)
            self._join_jobs(deadline - stop_margin)
            active = self._active()
            for run in active:
                run.stop(FailureReason.INTERRUPTED, "the agent was shut down before the job finished",
                         grace=min(10.0, stop_margin / 2))
            if active:
                log.info("stopped %d job(s) still running at the end of the grace period", len(active))
            self._join_jobs(deadline - 0.5)
        if self._poller is not None:
            self._poller.join(timeout=max(0.0, min(1.0, deadline - self._clock())))
        self._abandon.set()
        with self._runs_lock:
            for live in self._live.values():
                live.abandon()
        self._heartbeat.stop(timeout=1.0)
        left = [run.job_id or "?" for run in self._active()]
        if left:
            log.info("left %d running job(s) to the next agent: %s", len(left), ", ".join(left))
        log.info("agent stopped")
        return 0

    def _join_jobs(self, until: float) -> None:
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, until - self._clock()))

    def _active(self) -> list[JobRun]:
        with self._runs_lock:
            return list(self._runs.values())

    # --- after a restart -----------------------------------------------------------------------------------

    def _recover(self) -> None:
        try:
            found = recovery.scan(self._settings.jobs_workdir, self._settings.cluster_id or "local", self._executor,
                                  tenant_id=self._settings.tenant_id)
        except (EngineUnavailable, OSError) as exc:
            log.error("recovery skipped: %s", exc)
            return
        except Exception:  # noqa: BLE001 - nothing left on disk may keep the agent from starting
            log.exception("recovery skipped after an unexpected error")
            return
        for state in found.leftovers:
            try:
                self._executor.remove(state.id)
            except EngineUnavailable as exc:
                log.warning("recovery: leftover container %s not removed: %s", state.id[:12], exc)
        # Jobs whose result is on its way are this agent's until delivered: the server sending one again meanwhile
        # is a duplicate, never a second run.
        with self._runs_lock:
            self._in_agent.update(directory.job_id for directory, _, _ in found.spooled)
            self._in_agent.update(job_id_of(spec) or "" for spec, _ in found.vanished)
        for directory, body, container in found.spooled:
            self._spawn(f"deliver-{directory.job_id}", self._deliver_spooled, directory, body, container)
        for spec, container_id in found.vanished:
            self._spawn(f"job-{job_id_of(spec)}", self._report_vanished, spec, container_id)
        for spec in found.never_started:
            self._accept(spec)
        for spec, state in found.adopt:
            self._accept(spec, adopted=state)
        if any((found.spooled, found.vanished, found.never_started, found.adopt, found.leftovers)):
            log.info("recovery: %s", found.summary())

    def _deliver_spooled(self, directory: JobDirectory, body: dict[str, Any], container: ContainerState | None) -> None:
        try:
            self._finish_spooled(directory, body, container)
        finally:
            with self._runs_lock:
                self._in_agent.discard(directory.job_id)

    def _finish_spooled(self, directory: JobDirectory, body: dict[str, Any], container: ContainerState | None) -> None:
        if self._delivery.deliver_spooled(directory, body):
            problem = directory.remove()
            if problem is not None:
                log.warning("job %s: directory not fully removed: %s", directory.job_id, problem)
            if container is not None:
                try:
                    self._executor.remove(container.id)
                except EngineUnavailable as exc:
                    log.warning("job %s: container not removed: %s", directory.job_id, exc)

    def _report_vanished(self, spec: Any, container_id: str) -> None:
        job_id = job_id_of(spec) or "?"
        completion = Completion.not_run(
            self._settings.tenant_id, FailureReason.AGENT_ERROR,
            f"the job's container {container_id[:12]} vanished while no agent watched it (engine restarted or "
            "someone removed it); whether the job finished is unknown: resubmit it",
        )
        directory = JobDirectory(self._settings.jobs_workdir, job_id)
        try:
            if self._delivery.deliver(job_id, completion, directory):
                problem = directory.remove()
                if problem is not None:
                    log.warning("job %s: directory not fully removed: %s", job_id, problem)
        finally:
            with self._runs_lock:
                self._in_agent.discard(job_id)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

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
        if self._engine.down:
            self._sleep(self._engine.next_pause())
        elif not result.long_poll:
            self._sleep(self._settings.poll_interval)
        elif self._clock() - asked < MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS and not result.cancel_job_ids:
            self._sleep(MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS)

    def _disk_ok(self) -> bool:
        if self._disk is None:
            return True
        try:
            return not self._disk.check().low
        except Exception:  # a failing check must not stop the agent
            log.exception("disk check failed")
            return True

    def _free_slots(self) -> int:
        free = self._slots.free()
        if self._settings.max_jobs:
            free = min(free, max(0, self._settings.max_jobs - self.jobs_accepted))
        return free

    def _poll(self) -> PollResult | None:
        """The poll itself; None when it failed (after logging and waiting) or was broken off."""
        # With every slot busy the poll still goes out, with max_jobs 0, so cancellations arrive at once. When a
        # slot frees, that poll -- and only such a poll, which cannot carry jobs -- is broken off and a new one
        # asks for work.
        # Take no job while the engine is away (it would only fail) or the disk is low.
        free = self._free_slots() if self._engine.up() and self._disk_ok() else 0
        with self._runs_lock:
            self._zero_poll_in_flight = free == 0
            self._interrupt.clear()
            self._wake.clear()
        # While the engine is away, ask for no jobs and do not hold the poll long: it is checked again soon.
        wait = 0 if self._engine.down else self._settings.long_poll_seconds
        try:
            return self._client.poll(
                free,
                wait_seconds=wait,
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
        # Under the lock: the poller cannot start its next poll (which may carry jobs) until the sockets of the
        # max_jobs-0 poll are shut down, so a job-carrying answer is never cut off.
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

    def _accept(self, raw: Any, adopted: ContainerState | None = None) -> None:
        job_id = job_id_of(raw)
        if job_id is None:
            # Never the job itself: it may carry credentials (registry_auth) and anything a broken server put in it.
            what = (f"an object with {len(raw)} key(s), its job_id a JSON {type(raw.get('job_id')).__name__}"
                    if isinstance(raw, dict) else f"a JSON {type(raw).__name__}")
            log.error("poll returned a job without a string job_id (%s); it cannot be run or reported", what)
            return
        directory = JobDirectory(self._settings.jobs_workdir, job_id)
        with self._runs_lock:
            if job_id in self._in_agent:
                log.warning("job %s: received again while this agent still has it; ignoring the duplicate", job_id)
                return
            self._in_agent.add(job_id)
            live = LiveJob(
                self._client, job_id, on_cancel=lambda: self.cancel(job_id),
                resume_offset=directory.read_log_offset() if adopted else 0,
                on_log_acknowledged=directory.write_log_offset if directory.path.parent.is_dir() else None,
            )
            run = JobRun(
                raw, settings=self._settings, executor=self._executor, gpu_pool=self._gpus, clock=self._clock,
                observer=live, adopted=adopted, engine=self._engine, redactor=self._redactor,
            )
            self._runs[job_id] = run
            self._slots.enter(job_id, adopted=adopted is not None)
            self._live[job_id] = live
            self.jobs_accepted += 1
        if adopted is None:
            log.info("job %s: received", job_id, extra={"job_id": job_id, "event": "received"})
        if self.stopping.is_set() and adopted is None:
            # Arrived with the last poll after shutdown began: report it rather than leave it assigned to nobody.
            run.stop(FailureReason.INTERRUPTED, "the agent was shutting down when the job arrived; resubmit it")
        self._spawn(f"job-{job_id}", self._work, run)

    # --- one job -------------------------------------------------------------------------------------------

    def _work(self, run: JobRun) -> None:
        job_id = run.job_id or "?"
        with self._runs_lock:
            live = self._live.get(job_id)
        image = run.raw.get("image") if isinstance(run.raw, dict) else None
        self._slots.wait_turn(job_id)
        try:
            completion = run.execute()
            if self._disk is not None and isinstance(image, str) and completion.metrics.exit_code is not None:
                self._disk.image_used(image)
        except BaseException:
            self._free_slot(job_id)
            raise
        self._log_finished(job_id, completion, run)
        released = False
        try:
            # The slot frees once the job's workspace and container are gone (the next job needs their disk),
            # while the result is being delivered.
            release = threading.Thread(
                target=self._release, args=(run, job_id), name=f"release-{job_id}", daemon=True
            )
            if run.directory is not None and not self._delivery.spool(job_id, completion, run.directory):
                # Most often a job that filled the disk: its workspace goes first, then the spool is tried again.
                released = True
                self._release(run, job_id)
                if self._delivery.spool(job_id, completion, run.directory):
                    log.info("job %s: result spooled once its workspace was removed", job_id)
            else:
                release.start()
                released = True
            if live is not None:
                live.finish()  # the last of the live log goes before the result
            delivered = self._delivery.deliver(job_id, completion, run.directory, spooled=True)
            if release.ident is not None:
                release.join()
            if delivered:
                run.forget()
        finally:
            if not released:  # a bug above must never keep the slot, the workspace or the container
                self._release(run, job_id)
            with self._runs_lock:
                self._in_agent.discard(job_id)
        self.jobs_finished += 1
        if self._settings.max_jobs and self.jobs_finished >= self._settings.max_jobs:
            log.info("--max-jobs %d reached: stopping", self._settings.max_jobs)
            self.stopping.set()

    def _release(self, run: JobRun, job_id: str) -> None:
        try:
            run.release()
        finally:
            self._free_slot(job_id)

    def _free_slot(self, job_id: str) -> None:
        with self._runs_lock:
            self._runs.pop(job_id, None)
            self._live.pop(job_id, None)
        self._slots.release(job_id)
        self._wake_poller()

    def _log_finished(self, job_id: str, completion: Completion, run: JobRun) -> None:
        log.info(
            "job %s: finished: %s%s in %.1f s",
            job_id, completion.status.value,
            f" ({completion.failure_reason.value})" if completion.failure_reason else "",
            completion.metrics.runtime_seconds,
            extra={"job_id": job_id, "event": "finished", "status": completion.status.value,
                   "failure_reason": completion.failure_reason.value if completion.failure_reason else None,
                   "duration_s": completion.metrics.runtime_seconds},
        )
        if self._metrics is not None:
            reason = completion.failure_reason.value if completion.failure_reason else ""
            self._metrics.jobs.labels(status=completion.status.value, failure_reason=reason).inc()
            self._metrics.job_duration.observe(completion.metrics.runtime_seconds)
            if run.start_timing is not None:
                self._metrics.container_start.observe(run.start_timing[0])
                self._metrics.dispatch_overhead.observe(run.start_timing[1])

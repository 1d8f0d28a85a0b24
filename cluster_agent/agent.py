"""The agent loop: recover what a previous agent left, poll for work, run each job on its own thread, shut down.

Threads, each with a name and an owner:
  main       recovers, then waits for the stop event and runs the shutdown sequence
  poller     long-polls the control plane and hands over jobs and cancellations (poller.py)
  heartbeat  sends heartbeats on its own timer (heartbeat.py)
  job-<id>   runs or adopts one job (job_runner.py) and delivers its result (delivery.py)
  logs-<id>  ships one job's live log (log_streamer.py); start-<id> sends its start acknowledgement

Every job the agent holds is one `JobHandle` in one `JobTable` (job_table.py).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Callable

from . import healthcheck, recovery
from .control_plane import ControlPlaneClient
from .delivery import ResultDelivery
from .disk import DiskGuard
from .engine_watch import EngineWatch
from .errors import EngineUnavailable
from .executors import ContainerState, Executor
from .gpu_pool import GpuAllocator
from .heartbeat import Heartbeat
from .job_dir import JobDirectory
from .job_runner import JobRun
from .job_table import JobHandle, JobTable
from .live_job import LiveJob
from .metrics import Metrics
from .models import Completion, FailureReason
from .node_health import NodeHealth
from .poller import Poller
from .received_job import ReceivedJob
from .redaction import Redactor
from .settings import Settings
from .slots import JobSlots
from .transfer import JobData, refused_result

__all__ = ["Agent"]

log = logging.getLogger(__name__)

# With --on-shutdown leave the agent exits within this (jobs keep running for the next agent).
LEAVE_EXIT_SECONDS = 9.0
RECENTLY_FINISHED = 1024


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
        data: JobData | None = None,
        node: NodeHealth | None = None,
    ) -> None:
        self._node = node  # self-test and quarantine: a quarantined node asks for no jobs
        self._jobs_dir_held = jobs_dir_held  # the jobs directory's lock (jobs_lock.py) still this agent's
        self._data = data  # inputs, the input cache and artifact uploads, shared by all jobs
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
        self._delivery = ResultDelivery(client, self._abandon, metrics, refused_as_too_large=self._shrink)
        if data is not None:
            data.uploads.abandon = self._abandon  # an exiting agent leaves unfinished uploads to the next one
        self._slots = JobSlots(settings.max_concurrent_jobs)
        self._jobs = JobTable()
        self._threads: list[threading.Thread] = []
        self._engine = EngineWatch(executor, clock=clock)
        self._poller = Poller(
            settings, client, engine=self._engine, gpus=gpu_pool, stopping=self.stopping, capacity=self._capacity,
            running_job_ids=lambda: [handle.job_id for handle in self._jobs.running()],
            accept=self._accept, cancel=self.cancel, clock=clock, disk=disk,
        )
        self.jobs_accepted = 0
        self.jobs_finished = 0
        # The jobs that ended here lately, so that a repeated cancel for one is not reported as a stranger's.
        self._finished: collections.deque[str] = collections.deque(maxlen=RECENTLY_FINISHED)
        if metrics is not None:
            metrics.running_jobs.set_function(lambda: len(self._jobs.running()))
            metrics.free_slots.set_function(self._slots.free)
            metrics.results_pending.set_function(self._delivery.in_flight)
            if node is not None:
                metrics.quarantined.set_function(lambda: 1.0 if node.quarantined else 0.0)
            if disk is not None:
                metrics.disk_low.set_function(lambda: 1.0 if disk.state.low else 0.0)

    def _shrink(self, job_id: str, completion: Completion, size: int, directory: JobDirectory | None) -> Completion:
        return refused_result(job_id, completion, size, directory.path if directory else None,
                              self._data.uploads if self._data else None)

    def node_changed(self) -> None:
        """Quarantine began or ended: the poll in flight asked for the old capacity; ask again."""
        self._poller.wake()

    def poller_alive(self) -> bool:
        return self._poller.alive()

    # --- lifecycle -----------------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until `stopping` is set (a signal, or --max-jobs reached), then shut down."""
        log.info(
            "agent starting: cluster %s, control plane %s, up to %d job(s) at once, %d GPU(s), input cache %s",
            self._settings.cluster_id, self._settings.api_base, self._settings.max_concurrent_jobs, self._gpus.total,
            self._settings.cache_dir or "off (--cache-dir)",
        )
        self._heartbeat.beat("active")  # one before the first poll (contract)
        self._heartbeat.start()
        self._recover()
        if self._node is not None:
            self._node.self_test()  # before the first poll: a node that cannot run a job takes none
            self._node.start()
        self._poller.start()
        while not self.stopping.is_set():
            # A dead poller stops the touches, so the image's HEALTHCHECK turns unhealthy.
            if self._poller.alive():
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
        running = self._still_running()
        log.info(
            "shutting down: no new jobs; %d running, which %s; exiting within %.0f s",
            len(running), "are left to the next agent" if leave else "will be stopped if still running", grace,
        )
        self._poller.wake()
        if self._node is not None:
            self._node.stop()
        self._heartbeat.drain()
        if leave:
            # Containers keep running; the next agent adopts them. Flush what is in flight.
            self._delivery.wait_idle(deadline - 1.0 - self._clock())
        else:
            self._stop_the_rest(grace, deadline)
        self._poller.join(timeout=max(0.0, min(1.0, deadline - self._clock())))
        self._abandon.set()
        for handle in self._jobs.all():
            if handle.live is not None:
                handle.live.abandon()
        self._heartbeat.stop(timeout=1.0)
        left = [run.job_id or "?" for run in self._still_running()]
        if left:
            log.info("left %d running job(s) to the next agent: %s", len(left), ", ".join(left))
        log.info("agent stopped")
        return 0

    def _stop_the_rest(self, grace: float, deadline: float) -> None:
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

    def _join_jobs(self, until: float) -> None:
        for thread in list(self._threads):
            thread.join(timeout=max(0.0, until - self._clock()))

    def _active(self) -> list[JobRun]:
        return [handle.run for handle in self._jobs.running() if handle.run is not None]

    def _still_running(self) -> list[JobRun]:
        """Jobs whose result is not known yet (a finished job holds its slot a moment longer, while its container
        is removed: it is not 'running' in what the agent says at shutdown)."""
        return [handle.run for handle in self._jobs.running() if handle.run is not None and not handle.finished]

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
        for directory, body, container in found.spooled:
            handle = JobHandle(directory.job_id, directory)
            if self._jobs.add(handle):
                handle.thread = self._spawn(f"deliver-{directory.job_id}", self._deliver_spooled, directory, body,
                                            container)
        for spec, container_id in found.vanished:
            job = ReceivedJob.parse(spec, self._redactor)
            if job.job_id is not None:
                handle = JobHandle(job.job_id, JobDirectory(self._settings.jobs_workdir, job.job_id))
                if self._jobs.add(handle):
                    handle.thread = self._spawn(f"job-{job.job_id}", self._report_vanished, handle.directory,
                                                container_id)
        for spec in found.never_started:
            self._accept(spec)
        for spec, state in found.adopt:
            self._accept(spec, adopted=state)
        if any((found.spooled, found.vanished, found.never_started, found.adopt, found.leftovers)):
            log.info("recovery: %s", found.summary())

    def _deliver_spooled(self, directory: JobDirectory, body: dict[str, Any], container: ContainerState | None) -> None:
        try:
            if self._delivery.deliver_spooled(directory, body):
                _remove_directory(directory)
                if container is not None:
                    try:
                        self._executor.remove(container.id)
                    except EngineUnavailable as exc:
                        log.warning("job %s: container not removed: %s", directory.job_id, exc)
        finally:
            self._jobs.remove(directory.job_id)

    def _report_vanished(self, directory: JobDirectory, container_id: str) -> None:
        completion = Completion.not_run(
            self._settings.tenant_id, FailureReason.AGENT_ERROR,
            f"the job's container {container_id[:12]} vanished while no agent watched it (engine restarted or "
            "someone removed it); whether the job finished is unknown: resubmit it",
        )
        try:
            if self._delivery.deliver(directory.job_id, completion, directory):
                _remove_directory(directory)
        finally:
            self._jobs.remove(directory.job_id)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    # --- taking work ---------------------------------------------------------------------------------------

    def _capacity(self) -> int:
        if self._node is not None and self._node.quarantined:
            return 0
        free = self._slots.free()
        if self._settings.max_jobs:
            free = min(free, max(0, self._settings.max_jobs - self.jobs_accepted))
        return free

    def cancel(self, job_id: str) -> None:
        """Cancel a job the control plane asked to cancel; one this agent does not run is ignored."""
        handle = self._jobs.get(job_id)
        if handle is None or handle.run is None or not handle.running:
            if handle is not None or job_id in self._finished:
                # A control plane repeats a cancel until it sees the result: the job already ended here.
                log.debug("cancel for job %s, which already finished here: nothing to do", job_id)
            else:
                log.info("cancel for job %s, which this agent does not run: ignored", job_id)
            return
        log.info("job %s: cancel requested by the control plane", job_id)
        # Stopping takes up to the SIGKILL grace: never on the poller's or a streamer's thread.
        threading.Thread(
            target=handle.run.stop, args=(FailureReason.CANCELED, "canceled by the control plane"),
            name=f"cancel-{job_id}", daemon=True,
        ).start()

    def _accept(self, raw: Any, adopted: ContainerState | None = None) -> None:
        job = ReceivedJob.parse(raw, self._redactor)
        if job.job_id is None:
            # Never the job itself: it may carry credentials (registry_auth) and anything a broken server put in it.
            log.error("poll returned a job without a string job_id (%s); it cannot be run or reported", job.describe())
            return
        job_id = job.job_id
        directory = JobDirectory(self._settings.jobs_workdir, job_id)
        handle = JobHandle(job_id, directory, running=True)
        if not self._jobs.add(handle):
            log.warning("job %s: received again while this agent still has it; ignoring the duplicate", job_id)
            return
        handle.live = LiveJob(
            self._client, job_id, on_cancel=lambda: self.cancel(job_id),
            resume_offset=directory.read_log_offset() if adopted else 0,
            on_log_acknowledged=directory.write_log_offset if directory.path.parent.is_dir() else None,
        )
        handle.run = JobRun(
            job, settings=self._settings, executor=self._executor, gpu_pool=self._gpus, clock=self._clock,
            observer=handle.live, adopted=adopted, engine=self._engine, redactor=self._redactor, data=self._data,
        )
        self._slots.enter(job_id, adopted=adopted is not None)
        self.jobs_accepted += 1
        if adopted is None:
            log.info("job %s: received", job_id, extra={"job_id": job_id, "event": "received"})
        if self.stopping.is_set() and adopted is None:
            # Arrived with the last poll after shutdown began: report it rather than leave it assigned to nobody.
            handle.run.stop(FailureReason.INTERRUPTED, "the agent was shutting down when the job arrived; resubmit it")
        handle.thread = self._spawn(f"job-{job_id}", self._work, handle)

    # --- one job -------------------------------------------------------------------------------------------

    def _work(self, handle: JobHandle) -> None:
        run = handle.run
        assert run is not None
        self._slots.wait_turn(handle.job_id)
        try:
            completion = run.execute()
        except BaseException:
            self._free_slot(handle)
            raise
        handle.finished = True
        self._record_finished(handle, completion)
        try:
            self._deliver(handle, completion)
        finally:
            self._finished.append(handle.job_id)
            self._jobs.remove(handle.job_id)
        self.jobs_finished += 1
        if self._settings.max_jobs and self.jobs_finished >= self._settings.max_jobs:
            log.info("--max-jobs %d reached: stopping", self._settings.max_jobs)
            self.stopping.set()

    def _deliver(self, handle: JobHandle, completion: Completion) -> None:
        """Spool the result, free the slot (workspace and container removed) while the result is delivered, then
        remove the job's directory."""
        run, job_id = handle.run, handle.job_id
        assert run is not None
        released = False
        try:
            # The slot frees once the job's workspace and container are gone (the next job needs their disk),
            # while the result is being delivered.
            release = threading.Thread(target=self._release, args=(handle,), name=f"release-{job_id}", daemon=True)
            if run.directory is not None and not self._delivery.spool(job_id, completion, run.directory):
                # Most often a job that filled the disk: its workspace goes first, then the spool is tried again.
                released = True
                self._release(handle)
                if self._delivery.spool(job_id, completion, run.directory):
                    log.info("job %s: result spooled once its workspace was removed", job_id)
            else:
                release.start()
                released = True
            if handle.live is not None:
                handle.live.finish()  # the last of the live log goes before the result
            delivered = self._delivery.deliver(job_id, completion, run.directory, spooled=True, exited_at=run.exited_at)
            if release.ident is not None:
                release.join()
            if delivered:
                run.forget()
        finally:
            if not released:  # a bug above must never keep the slot, the workspace or the container
                self._release(handle)

    def _release(self, handle: JobHandle) -> None:
        try:
            if handle.run is not None:
                handle.run.release()
        finally:
            self._free_slot(handle)

    def _free_slot(self, handle: JobHandle) -> None:
        self._jobs.done_running(handle.job_id)
        self._slots.release(handle.job_id)
        self._poller.wake()

    def _record_finished(self, handle: JobHandle, completion: Completion) -> None:
        """The one place a finished job is logged and counted (log line, /metrics, the disk guard's image use)."""
        job_id, run = handle.job_id, handle.run
        reason = completion.failure_reason.value if completion.failure_reason else None
        log.info(
            "job %s: finished: %s%s in %.1f s",
            job_id, completion.status.value, f" ({reason})" if reason else "", completion.metrics.runtime_seconds,
            extra={"job_id": job_id, "event": "finished", "status": completion.status.value,
                   "failure_reason": reason, "duration_s": completion.metrics.runtime_seconds},
        )
        spec = run.job.spec if run is not None else None
        if self._disk is not None and spec is not None and completion.metrics.exit_code is not None:
            self._disk.image_used(spec.image)
        if self._node is not None:
            self._node.job_finished(job_id, completion, spec.image if spec is not None else None)
        if self._metrics is not None:
            self._metrics.jobs.labels(status=completion.status.value, failure_reason=reason or "",
                                      failure_class=completion.metrics.failure_class or "").inc()
            self._metrics.job_duration.observe(completion.metrics.runtime_seconds)
            if run is not None and run.start_timing is not None:
                self._metrics.container_start.observe(run.start_timing[0])
                self._metrics.dispatch_overhead.observe(run.start_timing[1])


def _remove_directory(directory: JobDirectory) -> None:
    problem = directory.remove()
    if problem is not None:
        log.warning("job %s: directory not fully removed: %s", directory.job_id, problem)

"""One job, from accepted to a Completion: validate, prepare its directory, run (or adopt) its container, judge it.

The runner never knows HTTP: the agent spools and delivers the Completion, then calls `cleanup()`. Everything the
runner knows about a job can be rebuilt from the container's labels and the job directory (job_dir.py), which is
how a restarted agent adopts a job (`adopted=`).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from datetime import datetime, timezone
from typing import Callable, Protocol

from .container_config import container_spec, gpus_for
from .clock import Clock
from .container_watch import ContainerWatch, StopRequest
from .errors import EngineUnavailable, ImageGone, JobFailed, TransferFailed
from .engine_watch import EngineWatch
from .failure_class import classify
from .executors import LABEL_GPU_IDS, LABEL_TIMEOUT, STOP_GRACE_SECONDS, ContainerSpec, ContainerState, Executor
from .gpu_pool import GpuAllocator
from .job_dir import JobDirectory
from .models import JOB_ID_PATTERN, Completion, FailureReason, GpuInfo, JobMetrics, JobSpec, JobStatus
from .output import MAX_OUTPUT_DEPTH, OutputCollector
from .received_job import ReceivedJob
from .redaction import RedactingOutput, Redactor
from .settings import Settings
from .transfer import JobData, StagedInputs, stage_inputs
from .verdict import judge

__all__ = ["JobObserver", "JobRun"]

log = logging.getLogger(__name__)

# A recorded stop is set aside only for a container that ended this long before it by the engine's clock: the stop
# time is the agent's clock, and an engine in a VM (Docker Desktop, a Podman machine) may run a little behind, which
# would make a container killed by the stop look ended before it.
STOP_CLOCK_MARGIN_SECONDS = 2.0


class JobObserver(Protocol):
    """What the agent hears of a running job (start acknowledgement, live logs). Must never block."""

    def started(self, container_id: str, started_at: str, gpu_ids: list[str]) -> None: ...

    def output(self, data: bytes) -> None: ...


class _Unobserved:
    def started(self, container_id: str, started_at: str, gpu_ids: list[str]) -> None:
        pass

    def output(self, data: bytes) -> None:
        pass


class JobRun:
    """One job's run. `execute()` is called once, on the job's own thread; `stop()` may come from any thread."""

    def __init__(
        self,
        job: ReceivedJob,
        *,
        settings: Settings,
        executor: Executor,
        gpu_pool: GpuAllocator,
        received_at: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        observer: JobObserver | None = None,
        adopted: ContainerState | None = None,
        engine: EngineWatch | None = None,
        redactor: Redactor | None = None,
        data: JobData | None = None,
    ) -> None:
        self._redactor = redactor or Redactor()  # the agent's: its secrets, and the log formatter's scopes
        # This job's secret_env values, for its output, streamed log and result: built in execute(), on the job's
        # thread (a pattern build takes time in the secrets' length: never on the poller's).
        self._job_secrets = Redactor()
        # Inputs and artifacts; run-job and tests that move no data get their own, without a control plane.
        self._data = data
        self.job = job
        self.job_id = job.job_id
        self._settings = settings
        self._executor = executor
        self._engine = engine or EngineWatch(executor, clock=clock)
        self._gpus = gpu_pool
        self._clock = clock
        self._wall = wall_clock
        self._received = received_at if received_at is not None else clock()
        self._observer: JobObserver = observer or _Unobserved()
        self._adopted = adopted
        self._stop = StopRequest()
        self._container_id: str | None = adopted.id if adopted else None  # guarded by _stop.lock
        self.directory: JobDirectory | None = None
        self._given_gpus: list[GpuInfo] = []
        self._gpu_count = 0
        self._staged: StagedInputs | None = None
        self._retryable: bool | None = None  # what the failure's own code knew of it (failure_class.py)
        # (engine create+start, the agent's own share) of the time from the poll answer to a running container
        self.start_timing: tuple[float, float] | None = None
        # When its container exited (wall clock, the engine's word): the start of the agent's dead time.
        self.exited_at: float | None = None

    @property
    def gpu_ids(self) -> list[str]:
        return [gpu.uuid for gpu in self._given_gpus]

    # --- control from other threads ------------------------------------------------------------------------

    def stop(self, reason: FailureReason, message: str, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop the job (interrupted by shutdown, canceled): it completes with `reason`."""
        with self._stop.lock:
            first = self._stop.reason is None
            self._stop.request(reason, message)
            container_id = self._container_id
        directory = self.directory
        # Recorded while the job can still be stopped (its container not yet created, or not yet ended): a job
        # stopped after its container ended (a cancel during its artifact upload) keeps the verdict of its exit.
        if first and self.exited_at is None and directory is not None and directory.exists():
            try:
                directory.write_stop(reason.value, message, self._wall())
            except OSError as exc:
                log.warning("job %s: why it is being stopped was not recorded in %s (a restart in the next %.0f s "
                            "would judge it by its exit code): %s", self.job_id, directory.path, grace, exc)
        if container_id:
            try:
                self._executor.stop(container_id, grace)
            except EngineUnavailable as exc:
                log.warning("job %s: could not stop its container: %s", self.job_id, exc)

    # --- the run -------------------------------------------------------------------------------------------

    def execute(self) -> Completion:
        """Run the job and judge it. Always returns a Completion: every job gets exactly one result."""
        self._job_secrets = Redactor(self.job.spec.secret_env.values() if self.job.spec is not None else ())
        self._redactor.attach(self._job_secrets)  # the agent's log lines hide them while the job runs
        try:
            return self._judged()
        finally:
            self._redactor.detach(self._job_secrets)

    def _judged(self) -> Completion:
        completion = self._execute()
        try:
            completion = self._without_job_secrets(completion)
        except Exception as exc:  # noqa: BLE001 - a redaction bug must cost neither the result nor a secret
            # The job's verdict stands (a rerun would repeat its side effects); only what could not be redacted
            # is withheld.
            log.exception("job %s: its result could not be redacted", self.job_id)
            completion = completion.model_copy(update={
                "output_payload": {},
                "error_message": f"the agent could not redact the job's output and message ({type(exc).__name__}): "
                                 "both are withheld",
            })
        try:
            completion.to_wire()
        except Exception as exc:  # noqa: BLE001 - a result that cannot be encoded is no result
            log.error("job %s: its result cannot be encoded (%s); reporting that instead", self.job_id, exc)
            completion = self._without_job_secrets(self._result(
                JobStatus.FAILED, FailureReason.INVALID_OUTPUT,
                f"the job's output cannot be sent as a result ({type(exc).__name__}: {exc}); write plain JSON, at most "
                f"{MAX_OUTPUT_DEPTH} levels deep",
            ))
        spec = self.job.spec
        return classify(completion, memory_limited=bool(spec and spec.resources.memory_mb), retryable=self._retryable)

    def _without_job_secrets(self, completion: Completion) -> Completion:
        """Neither the agent's secrets, the job's secret_env values, nor its registry password (a registry may
        echo it into an error) reach the job's result: its output (the wrapped stdout/stderr tails included) and
        its message."""
        if len(self._job_secrets):
            completion = completion.model_copy(
                update={"output_payload": self._job_secrets.redact_json(completion.output_payload)})
        if not completion.error_message:
            return completion
        message = self._redactor.redact_own(completion.error_message)  # never other jobs' secrets (see Redactor)
        auth = self.job.raw.get("registry_auth") if isinstance(self.job.raw, dict) else None
        password = auth.get("password") if isinstance(auth, dict) else None
        if isinstance(password, str):
            message = Redactor([password]).redact(message)
        return completion.model_copy(update={"error_message": self._job_secrets.redact(message)})

    def _execute(self) -> Completion:
        started = self._clock()
        try:
            spec = self._validate()
            return self._run(spec)
        except JobFailed as exc:
            self._retryable = exc.retryable
            return self._result(JobStatus.FAILED, exc.reason, str(exc), started=started)
        except EngineUnavailable as exc:
            return self._result(JobStatus.FAILED, FailureReason.AGENT_ERROR, f"container engine error: {exc}", started=started)
        except Exception as exc:  # a bug must still give the job its one result
            log.exception("job %s: unexpected error", self.job_id)
            return self._result(
                JobStatus.FAILED, FailureReason.AGENT_ERROR, f"unexpected agent error: {type(exc).__name__}: {exc}",
                started=started,
            )

    def _validate(self) -> JobSpec:
        if self._adopted is not None and self.job_id is not None and JOB_ID_PATTERN.fullmatch(self.job_id):
            # Its directory and container exist whatever the spec says: they go with its one result.
            self.directory = JobDirectory(self._settings.jobs_workdir, self.job_id)
        spec = self.job.spec
        if spec is None:
            raise JobFailed(FailureReason.INVALID_JOB, self.job.problem or "invalid job")
        for name, guess in spec.unknown_fields():
            if guess:
                log.warning("job %s: %r is not a field this agent knows: ignored (did you mean %s?)", spec.job_id, name, guess)
            else:
                log.info("job %s: %r is not a field this agent knows: ignored", spec.job_id, name)
        if spec.orchestration.nodes > self._executor.max_nodes:
            raise JobFailed(
                FailureReason.INVALID_JOB,
                f"the job asks for {spec.orchestration.nodes} nodes (orchestration.nodes) but this agent runs jobs on "
                f"one host (--execution-mode {self._settings.execution_mode}); send it to an agent in "
                "--execution-mode slurm, or ask for 1 node",
            )
        self._gpu_count = gpus_for(spec, self._gpus.host_gpus, self._settings.max_concurrent_jobs)
        if self._adopted is None:  # an adopted container runs already, with the GPUs it was given
            self._gpus.check_request(spec.job_id, self._gpu_count, spec.resources.gpu_profile)
        return spec

    def _run(self, spec: JobSpec) -> Completion:
        self.directory = JobDirectory(self._settings.jobs_workdir, spec.job_id)
        if self._adopted is not None:
            return self._resume(spec, self._adopted)
        recorded = self._recorded_stop(None)
        if recorded is not None:  # stopped by the last agent before its container was created
            with self._stop.lock:
                self._stop.request(*recorded)
            return self._stopped_before_start()
        try:
            # job.json is the agent's (0600, never mounted): it keeps the registry credentials a re-run needs.
            self.directory.prepare(self.job.raw, spec.input_payload)
        except OSError as exc:
            raise JobFailed(
                FailureReason.AGENT_ERROR,
                f"cannot write the job directory {self.directory.path}: {exc.strerror or exc}; check free space and "
                "permissions of --jobs-workdir",
            ) from None
        self._check_image_allowed(spec.image)
        auth = spec.registry_auth.to_engine() if spec.registry_auth else None
        self._executor.prepare_image(spec.image, self._settings.pull_policy, auth)
        try:
            if spec.inputs:
                self._stage_inputs(spec)
                if self._stop.event.is_set():
                    return self._stopped_before_start()
            gpus = self._gpus.acquire(spec.job_id, self._gpu_count, self._stop.event, spec.resources.gpu_profile)
            if gpus is None:
                return self._stopped_before_start()
            return self._run_container(spec, gpus, auth)
        finally:
            if self._data is not None:
                self._data.release(spec.job_id)

    def _stage_inputs(self, spec: JobSpec) -> None:
        """Download the job's inputs (or find them in the cache) before its container exists: their time is not
        the job's. Raises JobFailed(input_unavailable) naming the input and its URL without the query string."""
        assert self.directory is not None
        data = self._job_data()
        try:
            self._staged = stage_inputs(
                spec.job_id, spec.inputs, self.directory.workspace, downloader=data.downloader, cache=data.cache,
                limit=data.max_input_bytes, cancel=self._stop.event, clock=Clock(monotonic=self._clock),
            )
        except TransferFailed as exc:
            if self._stop.event.is_set():
                return  # canceled while downloading: the caller reports the stop
            raise JobFailed(FailureReason.INPUT_UNAVAILABLE, str(exc), retryable=not exc.permanent) from None
        except OSError as exc:
            raise JobFailed(FailureReason.AGENT_ERROR, f"cannot place the job's inputs in its workspace: "
                            f"{exc.strerror or exc}; check free space of --jobs-workdir") from None
        log.info("job %s: inputs ready: %d bytes downloaded, %d from the cache, in %.2f s", spec.job_id,
                 self._staged.downloaded_bytes, self._staged.cached_bytes, self._staged.seconds,
                 extra={"job_id": spec.job_id, "event": "inputs"})

    def _job_data(self) -> JobData:
        if self._data is None:
            self._data = JobData.from_settings(self._settings, planner=None)
        return self._data

    def _run_container(self, spec: JobSpec, gpus: list[GpuInfo], auth: dict[str, str] | None) -> Completion:
        try:
            self._given_gpus = gpus
            container_id = self._start_container(spec, auth)
            if container_id is None:
                return self._stopped_before_start()
            # The start call goes out before container.json, which only serves a restart (the labels say as much).
            started_wall = self._announce_start(container_id)
            self._record_container(container_id)
            log.info("job %s: started container %s (%s)", spec.job_id, container_id[:12], spec.image,
                     extra={"job_id": spec.job_id, "event": "started", "container_id": container_id})
            completion = self._watch(spec, container_id, started_wall=started_wall or self._wall(), replay=False)
            return self._with_gpu_faults(completion)
        finally:
            self._gpus.release(spec.job_id)

    def _with_gpu_faults(self, completion: Completion) -> Completion:
        """A job whose GPU faulted while it ran failed whatever it exited with: its results may be wrong, and
        another node can run it (docs/gpu.md lists the faults). A canceled job stays canceled."""
        faults = self._gpus.faults_of(self.job_id or "")
        if not faults or completion.status is JobStatus.CANCELED:
            return completion
        named = "; ".join(f"GPU {uuid}: {', '.join(reasons)}" for uuid, reasons in faults.items())
        log.error("job %s: its GPU faulted while it ran (%s): failed as gpu_error", self.job_id, named)
        return completion.model_copy(update={
            "status": JobStatus.FAILED, "failure_reason": FailureReason.GPU_ERROR,
            "error_message": f"a GPU of the job faulted while it ran ({named}); the GPU takes no new job until it is "
                             "healthy: run the job again (another node, or this one once the GPU recovers)",
        })

    def _start_container(self, spec: JobSpec, auth: dict[str, str] | None) -> str | None:
        """Start the job's container under the stop lock (a stop never misses it); None: stopped before it started.
        An image gone since it was checked is made present again outside the lock (a cancel never waits for a
        pull), and the start is tried once more."""
        for attempt in (1, 2):
            with self._stop.lock:
                if self._stop.event.is_set():
                    return None
                engine_began = self._clock()
                try:
                    container_id = self._executor.start(self._container_spec(spec))
                except ImageGone:
                    if attempt == 2:
                        raise
                else:
                    self._container_id = container_id
                    self.start_timing = (self._clock() - engine_began, max(0.0, engine_began - self._received))
                    return container_id
            log.info("job %s: image %s went away since it was checked; making it present again", spec.job_id,
                     spec.image)
            self._executor.prepare_image(spec.image, self._settings.pull_policy, auth)
        return None

    def _resume(self, spec: JobSpec, state: ContainerState) -> Completion:
        """A container a previous agent started: wait for it with its real start time, then judge it."""
        uuids = [u for u in state.labels.get(LABEL_GPU_IDS, "").split(",") if u]
        self._given_gpus = self._gpus.claim(spec.job_id, uuids)
        if self._data is not None and self._data.cache is not None:
            # Its container mounts these: a restarted agent must not evict them while it runs.
            self._data.cache.pin(spec.job_id, [item.sha256 for item in spec.inputs if item.sha256])
        try:
            recorded = self._recorded_stop(state)
            if recorded is not None:
                log.info("job %s: the last agent was stopping it (%s); stopping it and reporting it so",
                         spec.job_id, recorded[0].value)
                self.stop(*recorded)
            if state.status == "created":
                with self._stop.lock:  # as a fresh start: a stop coming now finds the container started, or none
                    if self._stop.event.is_set():
                        return self._stopped_before_start()
                    # The previous agent died between create and start: the job never ran, so start it now.
                    self._executor.start_created(state.id)
                log.info("job %s: started its created container %s", spec.job_id, state.id[:12])
                self._observer.started(state.id, datetime.fromtimestamp(self._wall(), timezone.utc).isoformat(),
                                       self.gpu_ids)
                return self._watch(spec, state.id, started_wall=self._wall(), replay=False)
            log.info("job %s: adopted container %s (%s)", spec.job_id, state.id[:12], state.status,
                     extra={"job_id": spec.job_id, "event": "adopted", "container_id": state.id})
            if state.status == "pending":
                # Still queued by a scheduler: no start call went out yet, and its timeout has not begun.
                started_wall = self._announce_start(state.id)
                return self._watch(spec, state.id, started_wall=started_wall or self._wall(), replay=True)
            return self._with_gpu_faults(
                self._watch(spec, state.id, started_wall=state.started_at or self._wall(), replay=True))
        finally:
            self._gpus.release(spec.job_id)
            if self._data is not None:
                self._data.release(spec.job_id)

    def _recorded_stop(self, state: ContainerState | None) -> tuple[FailureReason, str] | None:
        """Why the last agent was stopping this job, if it was, and the job had not ended by itself before
        (`state`: its container, by the engine's clock)."""
        recorded = self.directory.read_stop() if self.directory is not None else None
        if recorded is None:
            return None
        reason, message, at = recorded
        if state is not None and state.finished_at is not None and state.finished_at < at - STOP_CLOCK_MARGIN_SECONDS:
            return None  # it had ended already when the stop came: its exit is its verdict
        try:
            return FailureReason(reason), message
        except ValueError:
            return None

    def _announce_start(self, container_id: str) -> float | None:
        """Send the start call once the job really runs (a scheduler may queue it first; an engine runs it at once).
        Returns when it started, or None if it ended without running (canceled while queued)."""
        started_wall = self._executor.wait_started(container_id, self._stop.event)
        if started_wall is not None:
            self._observer.started(
                container_id, datetime.fromtimestamp(started_wall, timezone.utc).isoformat(), self.gpu_ids
            )
        return started_wall

    def _check_image_allowed(self, image: str) -> None:
        patterns = [p.strip() for p in self._settings.allowed_images.split(",") if p.strip()]
        if not any(fnmatch.fnmatchcase(image, pattern) for pattern in patterns):
            raise JobFailed(
                FailureReason.INVALID_JOB,
                f"image {image} is not allowed on this cluster (--allowed-images {self._settings.allowed_images}); "
                "use an allowed image or ask the operator to allow it",
            )

    def _record_container(self, container_id: str) -> None:
        assert self.directory is not None
        try:
            self.directory.write_container(container_id)
        except OSError as exc:
            # Only a restart needs it (to tell a vanished container from a never-started one); the labels remain.
            log.warning("job %s: container id not recorded in %s: %s", self.job_id, self.directory.path, exc)

    def _container_spec(self, spec: JobSpec) -> ContainerSpec:
        assert self.directory is not None
        return container_spec(
            spec, self._settings, workspace=self.directory.workspace, gpus=self._given_gpus,
            gpu_count=self._gpu_count, host_has_gpus=bool(self._gpus.total), timeout=self._timeout(spec),
            read_only_files=self._staged.mounts if self._staged else None,
        )

    def _timeout(self, spec: JobSpec) -> float:
        if self._adopted is not None:
            try:
                return float(self._adopted.labels[LABEL_TIMEOUT])  # what the starting agent promised
            except (KeyError, ValueError):
                pass
        return spec.timeout_seconds or self._settings.job_timeout

    # --- watching the container ----------------------------------------------------------------------------

    def _watch(self, spec: JobSpec, container_id: str, *, started_wall: float, replay: bool) -> Completion:
        assert self.directory is not None
        timeout = self._timeout(spec)
        # Measured from the container's real start: an adopted job keeps the deadline it had.
        deadline = self._clock() + timeout - max(0.0, self._wall() - started_wall)
        queue_seconds = max(0.0, started_wall - (self._wall() - (self._clock() - self._received)))
        collected = OutputCollector(self._settings.max_output_bytes, self._job_secrets)
        output = RedactingOutput(self._observer.output, self._job_secrets)
        watch = ContainerWatch(self._executor, self._engine, job_id=spec.job_id, stop=self._stop,
                               output=output, clock=self._clock)
        try:
            ending = watch.watch(container_id, deadline=deadline, timeout=timeout, collected=collected, replay=replay)
        finally:
            output.flush()  # what the redaction held back goes out however the watch ended
        self.exited_at = ending.finished_at
        metrics = JobMetrics(
            runtime_seconds=round(max(0.0, self._wall() - started_wall), 3),
            exit_code=ending.exit_code,
            queue_seconds=None if replay else round(queue_seconds, 3),
            gpu_ids=self.gpu_ids or None,
        )
        if self._staged is not None:
            metrics.input_seconds = round(self._staged.seconds, 3)
            metrics.input_bytes = self._staged.total_bytes
            metrics.input_cached_bytes = self._staged.cached_bytes
        completion = judge(
            self._settings.tenant_id, spec, ending, self.directory.workspace, collected, metrics,
            self._settings.max_output_bytes,
        )
        if spec.artifacts:
            # Whatever the status: a failed or stopped job's checkpoints are often what its user needs most.
            completion = self._job_data().uploads.finish(
                spec.job_id, spec.artifacts, self.directory.workspace, self.directory.path, completion,
                exclude=frozenset(target for _, target in (self._staged.mounts if self._staged else [])),
                secrets=self._job_secrets,
            )
        return completion

    # --- results -------------------------------------------------------------------------------------------

    def _stopped_before_start(self) -> Completion:
        with self._stop.lock:
            reason, message = self._stop.reason or FailureReason.INTERRUPTED, self._stop.message
        status = JobStatus.CANCELED if reason is FailureReason.CANCELED else JobStatus.FAILED
        return self._result(status, reason, message or "stopped before its container started")

    def _result(
        self, status: JobStatus, reason: FailureReason, message: str, *, started: float | None = None
    ) -> Completion:
        runtime = self._clock() - started if started is not None else 0.0
        return Completion.not_run(self._settings.tenant_id, reason, message, runtime_seconds=runtime)

    def release(self) -> None:
        """Once the result is spooled: remove the job's workspace and its container, which free the disk and the
        engine's resources the next job needs. Never raises; what cannot be removed is reported once."""
        if self.directory is not None:
            problem = self.directory.remove_workspace()
            if problem is not None:
                log.warning("job %s: workspace not fully removed: %s", self.job_id, problem)
        with self._stop.lock:
            container_id = self._container_id
        if container_id:
            try:
                self._executor.remove(container_id)
            except EngineUnavailable as exc:
                log.warning("job %s: container not removed: %s", self.job_id, exc)
            except Exception:  # noqa: BLE001 - clean-up must never take the agent down
                log.exception("job %s: container not removed", self.job_id)

    def cleanup(self) -> None:
        """After delivery: the workspace, the container and the directory (run-job; the agent calls release()
        before delivery and forget() after it)."""
        self.release()
        self.forget()

    def forget(self) -> None:
        """After delivery: the job's directory, the last trace of it. Never raises."""
        if self.directory is not None:
            problem = self.directory.remove()
            if problem is not None:
                log.warning("job %s: directory not fully removed: %s", self.job_id, problem)

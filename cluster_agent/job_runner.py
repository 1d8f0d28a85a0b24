"""One job, from accepted to a Completion: validate, prepare its directory, run (or adopt) its container, judge it.

The runner never knows HTTP: the agent spools and delivers the Completion, then calls `cleanup()`. Everything the
runner knows about a job can be rebuilt from the container's labels and the job directory (job_dir.py), which is
how a restarted agent adopts a job (`adopted=`).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Protocol

from pydantic import ValidationError

from . import __version__
from .errors import EngineUnavailable, JobFailed
from .engine_watch import EngineWatch
from .executors import (
    LABEL_AGENT_VERSION,
    LABEL_CLUSTER_ID,
    LABEL_GPU_IDS,
    LABEL_JOB_ID,
    LABEL_TIMEOUT,
    STOP_GRACE_SECONDS,
    ContainerSpec,
    ContainerState,
    Executor,
    container_name,
)
from .gpu_pool import GpuAllocator
from .job_dir import JobDirectory
from .models import JOB_ID_PATTERN, REFUSED_KEY, Completion, FailureReason, GpuInfo, JobMetrics, JobSpec, JobStatus
from .output import MAX_OUTPUT_DEPTH, OutputCollector
from .redaction import Redactor
from .settings import Settings
from .verdict import Ending, judge

__all__ = ["JobObserver", "JobRun", "gpus_for", "job_id_of", "torchrun_command"]

log = logging.getLogger(__name__)

# A container that dies of a signal the agent did not send may have been stopped by an engine shutting down
# (dockerd stops its containers first, then exits): watch the engine this long before judging the job.
ENGINE_PROBE_SECONDS = 3.0
# An adopted container that ended by itself within this much of its timeout (by the engine's own clock) ended in
# time: the engine's start and finish stamps are taken a little apart from the process's real run.
TIMEOUT_SLACK_SECONDS = 1.0


class JobObserver(Protocol):
    """What the agent hears of a running job (start acknowledgement, live logs). Must never block."""

    def started(self, container_id: str, started_at: str, gpu_ids: list[str]) -> None: ...

    def output(self, data: bytes) -> None: ...


class _Unobserved:
    def started(self, container_id: str, started_at: str, gpu_ids: list[str]) -> None:
        pass

    def output(self, data: bytes) -> None:
        pass


def gpus_for(spec: JobSpec, host_gpus: int, max_concurrent_jobs: int) -> int:
    """How many GPUs a job gets.

    A job that names a count gets exactly that many. One that names none gets every GPU of the host when the
    agent runs one job at a time (Radix behaviour: nothing else could use them), and none when jobs run in
    parallel, so that GPUs stay bookable by the jobs that ask for them.
    """
    request = spec.gpu_request
    if request is not None:
        return request
    return host_gpus if max_concurrent_jobs == 1 else 0


def job_id_of(raw: Any) -> str | None:
    """The job id a raw job carries, if it carries a string one (valid or not)."""
    if isinstance(raw, dict) and isinstance(raw.get("job_id"), str) and raw["job_id"]:
        return raw["job_id"]
    return None


def torchrun_command(spec: JobSpec, gpus: int) -> list[str]:
    """`command + args`, wrapped in torchrun when the job asks for it (num_gpus > 1, launcher torchrun)."""
    command = [*spec.command, *spec.args]
    if spec.orchestration.launcher != "torchrun" or gpus <= 1 or not command:
        return command
    if command[0] == "torchrun":
        return command  # already wrapped by the submitter
    if os.path.basename(command[0]).startswith("python"):
        command = command[1:]  # torchrun runs the script with its own interpreter
    return ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={gpus}", *command]


class JobRun:
    """One job's run. `execute()` is called once, on the job's own thread; `stop()` may come from any thread."""

    def __init__(
        self,
        raw: Any,
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
    ) -> None:
        self._redactor = redactor or Redactor()
        self.raw = raw
        self.job_id = job_id_of(raw)
        self._settings = settings
        self._executor = executor
        self._engine = engine or EngineWatch(executor, clock=clock)
        self._gpus = gpu_pool
        self._clock = clock
        self._wall = wall_clock
        self._received = received_at if received_at is not None else clock()
        self._observer: JobObserver = observer or _Unobserved()
        self._adopted = adopted
        self._lock = threading.Lock()
        self._stop_reason: FailureReason | None = None
        self._stop_message = ""
        self._stop_requested = threading.Event()
        self._container_id: str | None = adopted.id if adopted else None
        self.directory: JobDirectory | None = None
        self._given_gpus: list[GpuInfo] = []
        self._gpu_count = 0
        # (engine create+start, the agent's own share) of the time from the poll answer to a running container
        self.start_timing: tuple[float, float] | None = None

    @property
    def gpu_ids(self) -> list[str]:
        return [gpu.uuid for gpu in self._given_gpus]

    # --- control from other threads ------------------------------------------------------------------------

    def stop(self, reason: FailureReason, message: str, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop the job (interrupted by shutdown, canceled): it completes with `reason`."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason, self._stop_message = reason, message
            self._stop_requested.set()
            container_id = self._container_id
        if container_id:
            try:
                self._executor.stop(container_id, grace)
            except EngineUnavailable as exc:
                log.warning("job %s: could not stop its container: %s", self.job_id, exc)

    # --- the run -------------------------------------------------------------------------------------------

    def execute(self) -> Completion:
        """Run the job and judge it. Always returns a Completion: every job gets exactly one result."""
        completion = self._without_job_secrets(self._execute())
        try:
            completion.to_wire()
        except Exception as exc:  # noqa: BLE001 - a result that cannot be encoded is no result
            log.error("job %s: its result cannot be encoded (%s); reporting that instead", self.job_id, exc)
            completion = self._result(
                JobStatus.FAILED, FailureReason.INVALID_OUTPUT,
                f"the job's output cannot be sent as a result ({type(exc).__name__}: {exc}); write plain JSON, at most "
                f"{MAX_OUTPUT_DEPTH} levels deep",
            )
        return completion

    def _without_job_secrets(self, completion: Completion) -> Completion:
        """Neither the agent's secrets nor the job's registry password (a registry may echo it into an error)
        reach the job's result."""
        if not completion.error_message:
            return completion
        message = self._redactor.redact(completion.error_message)
        auth = self.raw.get("registry_auth") if isinstance(self.raw, dict) else None
        password = auth.get("password") if isinstance(auth, dict) else None
        if isinstance(password, str):
            message = Redactor([password]).redact(message)
        return completion.model_copy(update={"error_message": message})

    def _execute(self) -> Completion:
        started = self._clock()
        try:
            spec = self._validate()
            return self._run(spec)
        except JobFailed as exc:
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
        if not isinstance(self.raw, dict):
            raise JobFailed(FailureReason.INVALID_JOB, f"job is a JSON {type(self.raw).__name__}, not an object")
        refused = self.raw.get(REFUSED_KEY)
        if isinstance(refused, str):
            raise JobFailed(FailureReason.INVALID_JOB, refused)
        if self.job_id is None or not JOB_ID_PATTERN.fullmatch(self.job_id):
            raise JobFailed(
                FailureReason.INVALID_JOB,
                # Redacted before it is cut: a cut secret would leave a prefix no redaction recognises.
                f"job_id {self._redactor.redact(str(self.raw.get('job_id')))[:140]!r} does not match "
                f"{JOB_ID_PATTERN.pattern}",
            )
        if self._adopted is not None:
            # Its directory and container exist whatever the spec says: they go with its one result.
            self.directory = JobDirectory(self._settings.jobs_workdir, self.job_id)
        try:
            spec = JobSpec.model_validate(self.raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()[:5]
            )
            raise JobFailed(FailureReason.INVALID_JOB, f"invalid job spec: {problems}") from None
        self._gpu_count = gpus_for(spec, self._gpus.host_gpus, self._settings.max_concurrent_jobs)
        if self._adopted is None:  # an adopted container runs already, with the GPUs it was given
            self._gpus.check_request(spec.job_id, self._gpu_count)
        return spec

    def _run(self, spec: JobSpec) -> Completion:
        self.directory = JobDirectory(self._settings.jobs_workdir, spec.job_id)
        if self._adopted is not None:
            return self._resume(spec, self._adopted)
        try:
            # job.json is the agent's (0600, never mounted): it keeps the registry credentials a re-run needs.
            self.directory.prepare(self.raw, spec.input_payload)
        except OSError as exc:
            raise JobFailed(
                FailureReason.AGENT_ERROR,
                f"cannot write the job directory {self.directory.path}: {exc.strerror or exc}; check free space and "
                "permissions of --jobs-workdir",
            ) from None
        self._check_image_allowed(spec.image)
        auth = spec.registry_auth.to_engine() if spec.registry_auth else None
        self._executor.prepare_image(spec.image, self._settings.pull_policy, auth)
        gpus = self._gpus.acquire(spec.job_id, self._gpu_count, self._stop_requested)
        if gpus is None:
            return self._stopped_before_start()
        try:
            self._given_gpus = gpus
            with self._lock:
                if self._stop_requested.is_set():
                    return self._stopped_before_start()
                engine_began = self._clock()
                container_id = self._executor.start(self._container_spec(spec))
                running = self._clock()
                self._container_id = container_id
            self.start_timing = (running - engine_began, max(0.0, engine_began - self._received))
            # The start call goes out before container.json, which only serves a restart (the labels say as much).
            started_wall = self._announce_start(container_id)
            self._record_container(container_id)
            log.info("job %s: started container %s (%s)", spec.job_id, container_id[:12], spec.image,
                     extra={"job_id": spec.job_id, "event": "started", "container_id": container_id})
            return self._watch(spec, container_id, started_wall=started_wall or self._wall(), replay=False)
        finally:
            self._gpus.release(spec.job_id)

    def _resume(self, spec: JobSpec, state: ContainerState) -> Completion:
        """A container a previous agent started: wait for it with its real start time, then judge it."""
        uuids = [u for u in state.labels.get(LABEL_GPU_IDS, "").split(",") if u]
        self._given_gpus = self._gpus.claim(spec.job_id, uuids)
        try:
            if state.status == "created":
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
            return self._watch(spec, state.id, started_wall=state.started_at or self._wall(), replay=True)
        finally:
            self._gpus.release(spec.job_id)

    def _announce_start(self, container_id: str) -> float | None:
        """Send the start call once the job really runs (a scheduler may queue it first; an engine runs it at once).
        Returns when it started, or None if it ended without running (canceled while queued)."""
        started_wall = self._executor.wait_started(container_id, self._stop_requested)
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
        env = dict(spec.env)
        env["RADIX_JOB_ID"] = spec.job_id
        if self._given_gpus:
            # Pinned by UUID; overrides an image's NVIDIA_VISIBLE_DEVICES=all (CUDA images set it).
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(self.gpu_ids)
        elif self._gpus.total and not self._gpu_count:
            # On a GPU host, a job without GPUs must not get them through its image's env and the NVIDIA hook.
            env["NVIDIA_VISIBLE_DEVICES"] = "void"
        resources = spec.resources
        return ContainerSpec(
            name=container_name(self._settings.cluster_id or "local", spec.job_id),
            image=spec.image,
            command=torchrun_command(spec, self._gpu_count),
            env=env,
            workspace=self.directory.workspace,
            labels={
                LABEL_JOB_ID: spec.job_id,
                LABEL_CLUSTER_ID: self._settings.cluster_id or "local",
                LABEL_AGENT_VERSION: __version__,
                LABEL_TIMEOUT: f"{self._timeout(spec):g}",
                LABEL_GPU_IDS: ",".join(self.gpu_ids),
            },
            gpus=list(self._given_gpus),
            cpus=resources.cpus,
            memory_mb=resources.memory_mb,
            shm_mb=resources.shm_mb,
            pids_limit=self._settings.pids_limit or None,
            cap_drop=[c.strip().upper() for c in self._settings.cap_drop.split(",") if c.strip()],
            read_only_rootfs=self._settings.read_only_rootfs,
            network=self._settings.job_network,
            gpu_count=self._gpu_count,
            timeout_seconds=self._timeout(spec),
            pull_policy=self._settings.pull_policy,
            registry_auth=spec.registry_auth.to_engine() if spec.registry_auth else None,
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
        collected = OutputCollector(self._settings.max_output_bytes)
        reader = self._read_output(container_id, collected, replay=replay)
        ending = self._wait_until_done(container_id, deadline, timeout, collected, reader)
        reader.join(timeout=30)
        if ending.exit_code is None and not ending.timed_out:
            info = self._executor.exit_info(container_id)
            ending.exit_code, ending.oom_killed = info.exit_code, info.oom_killed
            if info.failure_reason is not None:
                ending.failure, ending.failure_message = info.failure_reason, info.error
            if ending.engine_lost and info.exit_code == 0:
                ending.engine_lost = False  # it finished by itself before the engine went away
            elif ending.failure is None and self._killed_by_a_departing_engine(ending):
                log.warning("job %s: its container died with %s; waiting for it to come back", self.job_id,
                            self._engine.name)
                ending.engine_lost = True
                self._await_engine(container_id)
        metrics = JobMetrics(
            runtime_seconds=round(max(0.0, self._wall() - started_wall), 3),
            exit_code=ending.exit_code,
            queue_seconds=None if replay else round(queue_seconds, 3),
            gpu_ids=self.gpu_ids or None,
        )
        return judge(
            self._settings.tenant_id, spec, ending, self.directory.workspace, collected, metrics,
            self._settings.max_output_bytes,
        )

    def _read_output(self, container_id: str, collected: OutputCollector, *, replay: bool) -> threading.Thread:
        observer = self._observer

        def on_stdout(data: bytes) -> None:
            collected.feed_stdout(data)
            observer.output(data)

        def on_stderr(data: bytes) -> None:
            collected.feed_stderr(data)
            observer.output(data)

        if replay:
            target: Callable[[], None] = lambda: self._executor.replay_output(  # noqa: E731
                container_id, on_stdout, on_stderr, skip_stdout=collected.stdout_bytes, skip_stderr=collected.stderr_bytes
            )
        else:
            target = lambda: self._executor.stream_output(container_id, on_stdout, on_stderr)  # noqa: E731
        reader = threading.Thread(target=target, name=f"output-{self.job_id}", daemon=True)
        reader.start()
        return reader

    def _wait_until_done(
        self, container_id: str, deadline: float, timeout: float, collected: OutputCollector, reader: threading.Thread
    ) -> Ending:
        """Wait for the container until its deadline, riding out an engine that goes away."""
        ending = Ending(exit_code=None, timeout=timeout, engine_name=self._executor.engine_name)
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            try:
                if self._executor.wait(container_id, min(remaining, 60.0)):
                    return self._with_stop(ending)
            except EngineUnavailable as exc:
                log.warning("job %s: %s; waiting for the engine to come back", self.job_id, exc)
                state = self._await_engine(container_id)
                if state is None:
                    raise JobFailed(
                        FailureReason.AGENT_ERROR,
                        f"the job's container {container_id[:12]} vanished while {self._executor.engine_name} was "
                        "away; the job may or may not have run to completion: resubmit it",
                    ) from None
                reader.join(timeout=5)  # its stream broke with the engine
                if state.running:
                    log.info("job %s: its container survived the engine restart; still watching it", self.job_id)
                    reader = self._read_output(container_id, collected, replay=True)
                    continue
                ending.engine_lost = True
                self._read_output(container_id, collected, replay=True).join(timeout=30)  # what it printed meanwhile
                return self._with_stop(ending)
        with self._lock:
            if self._stop_reason is not None:  # already being stopped for another reason
                self._executor.wait(container_id, STOP_GRACE_SECONDS + 30)
                return self._with_stop(ending)
        state = self._executor.inspect(container_id)
        if state is not None and state.status not in ("created", "pending") and not state.running:
            # It ended while no agent watched (an adopted job whose deadline passed meanwhile): its own times say
            # whether it ran past its timeout; it was not stopped.
            if state.started_at is None or state.finished_at is None or \
                    state.finished_at - state.started_at <= timeout + TIMEOUT_SLACK_SECONDS:
                return self._with_stop(ending)
            log.info("job %s: ran past its timeout of %.0f s while no agent watched it", self.job_id, timeout)
            ending.timed_out = True
            ending.exit_code = self._executor.exit_info(container_id).exit_code
            return ending
        log.info("job %s: timed out after %.0f s; stopping it", self.job_id, timeout)
        self._executor.stop(container_id, STOP_GRACE_SECONDS)
        ending.timed_out = True
        ending.exit_code = self._executor.exit_info(container_id).exit_code
        return ending

    def _with_stop(self, ending: Ending) -> Ending:
        ending.stop_reason, ending.stop_message = self._stop_reason, self._stop_message
        return ending

    def _killed_by_a_departing_engine(self, ending: Ending) -> bool:
        if ending.stop_reason is not None or ending.oom_killed or (ending.exit_code or 0) <= 128:
            return False
        return self._engine.took_its_jobs_along(ENGINE_PROBE_SECONDS)

    def _await_engine(self, container_id: str) -> ContainerState | None:
        """Wait until the engine answers, then return the container's state (None: it is gone)."""
        while True:
            self._engine.wait_until_up(self._stop_requested)
            try:
                state = self._executor.inspect(container_id)
            except EngineUnavailable:
                continue  # gone again at once
            log.info("job %s: %s is back", self.job_id, self._executor.engine_name)
            return state

    # --- results -------------------------------------------------------------------------------------------

    def _stopped_before_start(self) -> Completion:
        reason = self._stop_reason or FailureReason.INTERRUPTED
        status = JobStatus.CANCELED if reason is FailureReason.CANCELED else JobStatus.FAILED
        return self._result(status, reason, self._stop_message or "stopped before its container started")

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
        if self._container_id:
            try:
                self._executor.remove(self._container_id)
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

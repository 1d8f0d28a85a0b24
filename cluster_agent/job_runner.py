"""One job, from accepted to a Completion: validate, prepare its directory, run its container, judge the result.

The runner never knows HTTP: the agent delivers the Completion and then calls `cleanup()`. Everything the
runner knows about a job can be rebuilt from the container's labels and the job directory (job.json).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from pydantic import ValidationError

from . import __version__
from .errors import EngineUnavailable, JobFailed
from .executors import ContainerSpec, Executor
from .gpu_pool import GpuPool
from .models import (
    JOB_ID_PATTERN,
    Completion,
    FailureReason,
    GpuInfo,
    JobMetrics,
    JobSpec,
    JobStatus,
    OutputSource,
)
from .output import OutputCollector, resolve_output, wrapped_output
from .settings import Settings

log = logging.getLogger(__name__)

# Grace between SIGTERM and SIGKILL when the agent stops a container (timeout, shutdown, cancel).
STOP_GRACE_SECONDS = 10.0
LABEL_JOB_ID = "radix.job_id"
LABEL_CLUSTER_ID = "radix.cluster_id"
STDERR_IN_MESSAGE = 2000
EXIT_CODE_HINTS = {
    126: " (the command is not executable in the image)",
    127: " (the command was not found in the image; check command and the image's PATH)",
}


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


def container_name(cluster_id: str, job_id: str) -> str:
    # Names are unique per engine: a second container for the same job cannot be created by accident.
    return f"radix-{cluster_id}-{job_id}"[:200]


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
        gpu_pool: GpuPool,
        received_at: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: JobObserver | None = None,
    ) -> None:
        self.raw = raw
        self.job_id = job_id_of(raw)
        self._settings = settings
        self._executor = executor
        self._gpus = gpu_pool
        self._clock = clock
        self._received = received_at if received_at is not None else clock()
        self._lock = threading.Lock()
        self._stop_reason: FailureReason | None = None
        self._stop_message = ""
        self._stop_requested = threading.Event()
        self._container_id: str | None = None
        self._job_dir: Path | None = None
        self._gpu_ids: list[str] = []
        self._given_gpus: list[GpuInfo] = []
        self._gpu_count = 0
        self._observer: JobObserver = observer or _Unobserved()

    @property
    def job_dir(self) -> Path | None:
        return self._job_dir

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
        if self.job_id is None or not JOB_ID_PATTERN.match(self.job_id):
            raise JobFailed(
                FailureReason.INVALID_JOB,
                f"job_id {str(self.raw.get('job_id'))[:140]!r} does not match {JOB_ID_PATTERN.pattern}",
            )
        try:
            spec = JobSpec.model_validate(self.raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'job'}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()[:5]
            )
            raise JobFailed(FailureReason.INVALID_JOB, f"invalid job spec: {problems}") from None
        self._gpu_count = gpus_for(spec, self._gpus.total, self._settings.max_concurrent_jobs)
        self._gpus.check_request(spec.job_id, self._gpu_count)
        return spec

    def _run(self, spec: JobSpec) -> Completion:
        self._job_dir = self._prepare_directory(spec)
        self._executor.prepare_image(spec.image)
        gpus = self._gpus.acquire(spec.job_id, self._gpu_count, self._stop_requested)
        if gpus is None:
            return self._stopped_before_start()
        try:
            self._given_gpus = gpus
            self._gpu_ids = [gpu.uuid for gpu in gpus]
            return self._run_container(spec)
        finally:
            self._gpus.release(spec.job_id)

    def _prepare_directory(self, spec: JobSpec) -> Path:
        job_dir = self._settings.jobs_workdir / spec.job_id
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            # The container may run as any user: it must be able to write output.json into its workspace.
            job_dir.chmod(0o777)
            (job_dir / "output.json").unlink(missing_ok=True)
            _write_json(job_dir / "input.json", spec.input_payload)
            # What the agent knows of the job, kept beside it so a restarted agent can rebuild it.
            _write_json(job_dir / "job.json", {"spec": self.raw, "agent_version": __version__})
        except OSError as exc:
            raise JobFailed(
                FailureReason.AGENT_ERROR,
                f"cannot write the job directory {job_dir}: {exc.strerror or exc}; check free space and permissions "
                "of --jobs-workdir",
            ) from None
        return job_dir

    def _container_spec(self, spec: JobSpec, job_dir: Path) -> ContainerSpec:
        env = dict(spec.env)
        env["RADIX_JOB_ID"] = spec.job_id
        if self._gpu_ids:
            # Pinned by UUID; overrides an image's NVIDIA_VISIBLE_DEVICES=all (CUDA images set it).
            env["NVIDIA_VISIBLE_DEVICES"] = ",".join(self._gpu_ids)
        elif self._gpus.total:
            # On a GPU host, a job without GPUs must not get them through its image's env and the NVIDIA hook.
            env["NVIDIA_VISIBLE_DEVICES"] = "void"
        resources = spec.resources
        return ContainerSpec(
            name=container_name(self._settings.cluster_id or "local", spec.job_id),
            image=spec.image,
            command=torchrun_command(spec, self._gpu_count),
            env=env,
            workspace=job_dir,
            labels={
                LABEL_JOB_ID: spec.job_id,
                LABEL_CLUSTER_ID: self._settings.cluster_id or "local",
                "radix.agent_version": __version__,
                "radix.timeout_seconds": str(self._timeout(spec)),
                "radix.gpu_ids": ",".join(self._gpu_ids),
            },
            gpus=list(self._given_gpus),
            cpus=resources.cpus,
            memory_mb=resources.memory_mb,
            shm_mb=resources.shm_mb,
            pids_limit=self._settings.pids_limit or None,
        )

    def _timeout(self, spec: JobSpec) -> float:
        return spec.timeout_seconds or self._settings.job_timeout

    def _run_container(self, spec: JobSpec) -> Completion:
        assert self._job_dir is not None
        container_spec = self._container_spec(spec, self._job_dir)
        with self._lock:
            if self._stop_requested.is_set():
                return self._stopped_before_start()
            container_id = self._executor.start(container_spec)
            self._container_id = container_id
        started = self._clock()
        queue_seconds = started - self._received
        log.info("job %s: started container %s (%s)", spec.job_id, container_id[:12], spec.image)
        self._observer.started(container_id, datetime.now(timezone.utc).isoformat(), list(self._gpu_ids))

        collected = OutputCollector(self._settings.max_output_bytes)
        observer = self._observer

        def on_stdout(data: bytes) -> None:
            collected.feed_stdout(data)
            observer.output(data)

        def on_stderr(data: bytes) -> None:
            collected.feed_stderr(data)
            observer.output(data)

        reader = threading.Thread(
            target=self._executor.stream_output,
            args=(container_id, on_stdout, on_stderr),
            name=f"output-{spec.job_id}",
            daemon=True,
        )
        reader.start()
        timed_out = self._wait(container_id, self._timeout(spec))
        runtime = self._clock() - started
        reader.join(timeout=30)
        info = self._executor.exit_info(container_id)
        metrics = JobMetrics(
            runtime_seconds=round(runtime, 3),
            exit_code=info.exit_code,
            queue_seconds=round(queue_seconds, 3),
            gpu_ids=self._gpu_ids or None,
        )
        return self._judge(spec, info.exit_code, info.oom_killed, timed_out, collected, metrics)

    def _wait(self, container_id: str, timeout: float) -> bool:
        """Wait for the container until its deadline; on expiry stop it. True when it timed out."""
        deadline = self._clock() + timeout
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            if self._executor.wait(container_id, min(remaining, 60.0)):
                return False
        with self._lock:
            if self._stop_reason is not None:  # already being stopped for another reason
                self._executor.wait(container_id, STOP_GRACE_SECONDS + 30)
                return False
        log.info("job %s: timed out after %.0f s; stopping it", self.job_id, timeout)
        self._executor.stop(container_id, STOP_GRACE_SECONDS)
        return True

    def _judge(
        self,
        spec: JobSpec,
        exit_code: int | None,
        oom_killed: bool,
        timed_out: bool,
        collected: OutputCollector,
        metrics: JobMetrics,
    ) -> Completion:
        assert self._job_dir is not None
        stderr_tail = collected.stderr_tail(STDERR_IN_MESSAGE).strip()

        def with_stderr(message: str) -> str:
            return f"{message}; stderr tail: {stderr_tail}" if stderr_tail else message

        try:
            payload, source = resolve_output(self._job_dir, collected, self._settings.max_output_bytes)
            output_error = None
        except JobFailed as exc:
            payload, source, output_error = wrapped_output(collected), OutputSource.WRAPPED, str(exc)
        metrics.output_source = source

        stop_reason = self._stop_reason
        if stop_reason is FailureReason.CANCELED:
            return self._completion(JobStatus.CANCELED, payload, metrics, FailureReason.CANCELED, self._stop_message)
        if stop_reason is not None:
            return self._completion(JobStatus.FAILED, payload, metrics, stop_reason, self._stop_message)
        if timed_out:
            timeout = self._timeout(spec)
            return self._completion(
                JobStatus.FAILED, payload, metrics, FailureReason.TIMEOUT,
                f"job ran past its timeout of {timeout:g} s and was stopped; raise timeout_seconds if it needs longer",
            )
        # Exit 137 that the agent did not cause is an OOM kill the engine failed to flag (cgroup v2 engines).
        if oom_killed or exit_code == 137:
            limit = f" of {spec.resources.memory_mb} MiB" if spec.resources.memory_mb else ""
            return self._completion(
                JobStatus.FAILED, payload, metrics, FailureReason.OOM,
                with_stderr(f"container was killed for running out of memory (limit{limit}); raise resources.memory_mb "
                            "or use less memory"),
            )
        if exit_code != 0:
            hint = EXIT_CODE_HINTS.get(exit_code or 0, "")
            return self._completion(
                JobStatus.FAILED, payload, metrics, FailureReason.EXIT_CODE,
                with_stderr(f"job exited with code {exit_code}{hint}"),
            )
        if output_error is not None:
            return self._completion(JobStatus.FAILED, payload, metrics, FailureReason.INVALID_OUTPUT, output_error)
        return self._completion(JobStatus.SUCCEEDED, payload, metrics, None, None)

    # --- results -------------------------------------------------------------------------------------------

    def _stopped_before_start(self) -> Completion:
        reason = self._stop_reason or FailureReason.INTERRUPTED
        status = JobStatus.CANCELED if reason is FailureReason.CANCELED else JobStatus.FAILED
        return self._result(status, reason, self._stop_message or "stopped before its container started")

    def _result(
        self, status: JobStatus, reason: FailureReason, message: str, *, started: float | None = None
    ) -> Completion:
        runtime = self._clock() - started if started is not None else 0.0
        metrics = JobMetrics(runtime_seconds=round(runtime, 3), exit_code=None)
        return self._completion(status, {}, metrics, reason, message)

    def _completion(
        self, status: JobStatus, payload: Any, metrics: JobMetrics, reason: FailureReason | None, message: str | None
    ) -> Completion:
        return Completion(
            tenant_id=self._settings.tenant_id,
            status=status,
            output_payload=payload,
            metrics=metrics,
            error_message=message,
            failure_reason=reason,
        )

    def cleanup(self) -> None:
        """Remove the container and the job directory, once the result is delivered."""
        if self._container_id:
            try:
                self._executor.remove(self._container_id)
            except EngineUnavailable as exc:
                log.warning("job %s: container not removed: %s", self.job_id, exc)
        if self._job_dir is not None:
            shutil.rmtree(self._job_dir, ignore_errors=True)
            if self._job_dir.exists():
                log.warning("job %s: could not remove %s (files owned by another user?)", self.job_id, self._job_dir)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)

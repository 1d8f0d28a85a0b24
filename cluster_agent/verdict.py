"""How a finished container becomes a Completion: status, failure reason, message, output payload.

The first condition that applies wins: stopped by the agent (canceled / interrupted), the engine lost mid-job,
past the deadline, the executor's own verdict (a scheduler's failure states), OOM-killed, non-zero exit, invalid output, success.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import JobFailed
from .models import Completion, FailureReason, JobMetrics, JobSpec, JobStatus, OutputSource
from .output import OutputCollector, resolve_output, wrapped_output

__all__ = ["Ending", "judge"]

STDERR_IN_MESSAGE = 2000
EXIT_CODE_HINTS = {
    126: " (the command is not executable in the image)",
    127: " (the command was not found in the image; check command and the image's PATH)",
}

# Podman's init (catatonit) exits 1 when it cannot exec the job's command, where Docker's (tini) exits 127 as a
# shell does: read as 127, so that one job gets one verdict whichever engine runs it.
# Only when that line is all the job wrote to stderr: a job that printed it among others ran, and exited 1 itself.
INIT_EXEC_FAILED = re.compile(r"\AERROR \(catatonit:\d+\): failed to exec pid1: [^\n]*\n?\Z")


@dataclass
class Ending:
    """How the container's run ended, as the runner saw it."""

    exit_code: int | None
    oom_killed: bool = False
    timed_out: bool = False
    timeout: float = 0.0
    stop_reason: FailureReason | None = None  # the agent stopped it (canceled, interrupted)
    stop_message: str = ""
    engine_lost: bool = False  # the engine went away while it ran and the container did not survive
    engine_name: str = "the container engine"  # for messages: the executor's engine_name
    failure: FailureReason | None = None  # the executor's own verdict (Slurm's TIMEOUT, NODE_FAIL, ...)
    failure_message: str = ""
    finished_at: float | None = None  # wall-clock epoch seconds of the exit, by the engine's clock, when it says


def judge(
    tenant_id: str, spec: JobSpec, ending: Ending, workspace: Path, collected: OutputCollector, metrics: JobMetrics,
    max_output_bytes: int,
) -> Completion:
    stderr_tail = collected.stderr_tail(STDERR_IN_MESSAGE).strip()

    def with_stderr(message: str) -> str:
        return f"{message}; stderr tail: {stderr_tail}" if stderr_tail else message

    try:
        payload, source = resolve_output(workspace, collected, max_output_bytes)
        output_error = None
    except JobFailed as exc:
        payload, source, output_error = wrapped_output(collected), OutputSource.WRAPPED, str(exc)
    metrics.output_source = source

    def done(status: JobStatus, reason: FailureReason | None = None, message: str | None = None) -> Completion:
        return Completion(
            tenant_id=tenant_id, status=status, output_payload=payload, metrics=metrics,
            error_message=message, failure_reason=reason,
        )

    exit_code = ending.exit_code
    hint = EXIT_CODE_HINTS.get(exit_code or 0, "")
    if exit_code == 1 and INIT_EXEC_FAILED.match(stderr_tail.strip() + "\n"):
        exit_code = metrics.exit_code = 127
        program = (spec.command or spec.args or ["the image's entrypoint"])[0]
        # catatonit does not name the program it could not run
        hint = f" (the command {program} was not found in the image; check command and the image's PATH)"
    if ending.stop_reason is FailureReason.CANCELED:
        return done(JobStatus.CANCELED, FailureReason.CANCELED, ending.stop_message)
    if ending.stop_reason is not None:
        return done(JobStatus.FAILED, ending.stop_reason, ending.stop_message)
    if ending.engine_lost:
        return done(
            JobStatus.FAILED, FailureReason.AGENT_ERROR,
            f"{ending.engine_name} went away while the job ran and its container ended with exit code {exit_code}; "
            f"the job did not fail by itself: resubmit it (and see why {ending.engine_name} restarted)",
        )
    if ending.timed_out:
        return done(
            JobStatus.FAILED, FailureReason.TIMEOUT,
            f"job ran past its timeout of {ending.timeout:g} s and was stopped; raise timeout_seconds if it needs longer",
        )
    if ending.failure is not None:
        status = JobStatus.CANCELED if ending.failure is FailureReason.CANCELED else JobStatus.FAILED
        return done(status, ending.failure, with_stderr(ending.failure_message) if ending.failure is not FailureReason.CANCELED else ending.failure_message)
    # Exit 137 that the agent did not cause is an OOM kill the engine failed to flag (cgroup v2 engines).
    if ending.oom_killed or exit_code == 137:
        if spec.resources.memory_mb:
            what = (f"container was killed for running out of memory (limit of {spec.resources.memory_mb} MiB); raise "
                    "resources.memory_mb or use less memory")
        else:
            what = ("container was killed (exit 137, SIGKILL: the host's OOM killer, as the engine did not say "
                    "otherwise); give the job a memory limit (resources.memory_mb) or use less memory")
        return done(JobStatus.FAILED, FailureReason.OOM, with_stderr(what))
    if exit_code != 0:
        return done(JobStatus.FAILED, FailureReason.EXIT_CODE, with_stderr(f"job exited with code {exit_code}{hint}"))
    if output_error is not None:
        return done(JobStatus.FAILED, FailureReason.INVALID_OUTPUT, output_error)
    return done(JobStatus.SUCCEEDED)

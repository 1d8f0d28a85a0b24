"""Whether trying a failed job again elsewhere can help: `metrics.failure_class` and `metrics.retryable`.

A control plane that cannot tell a node's fault from the job's own bug keeps sending jobs to a broken node, or keeps
re-running a job that will fail everywhere (the "black hole" node every peer's users report). The table, first
match wins (docs/protocol.md "Failure classes"):

    job             exit_code, invalid_output, timeout, invalid_job; oom within the job's own memory limit; an image
                    whose name, tag or login is wrong (the registry says not found / denied); an input that answered
                    4xx, failed its checksum or size, or is over the limit               -> retryable: false
    infrastructure  agent_error, interrupted, gpu_error, artifact_upload_failed; image_unavailable from the network,
                    the registry's 5xx or a missing image under --pull-policy never (another node may have it); an
                    input unreachable after retries; oom without a memory limit (the host ran out) -> retryable: true

Canceled jobs are neither: the control plane asked for the end.
"""

from __future__ import annotations

import re
from typing import Literal

from .models import Completion, FailureReason, JobStatus

__all__ = ["FailureClass", "classify"]

FailureClass = Literal["job", "infrastructure"]

# Registry answers that mean the reference or its credentials are wrong (Docker distribution's error codes
# MANIFEST_UNKNOWN, NAME_UNKNOWN, DENIED, UNAUTHORIZED and the engine's wording of them).
_WRONG_IMAGE = re.compile(
    r"manifest unknown|name unknown|not found|repository does not exist|pull access denied|unauthorized|"
    r"invalid reference format|authentication required|denied:",
    re.IGNORECASE,
)
_JOB_REASONS = {FailureReason.EXIT_CODE, FailureReason.INVALID_OUTPUT, FailureReason.TIMEOUT, FailureReason.INVALID_JOB}


def classify(completion: Completion, *, memory_limited: bool, retryable: bool | None = None) -> Completion:
    """`completion` with failure_class and retryable set when it failed. `memory_limited`: the job had its own
    memory limit; `retryable`: what the code that failed the job knew (an input's 404 vs a network error)."""
    if completion.status is not JobStatus.FAILED or completion.failure_reason is None:
        return completion
    kind = _class(completion.failure_reason, completion.error_message or "", memory_limited, retryable)
    metrics = completion.metrics.model_copy(update={"failure_class": kind, "retryable": kind == "infrastructure"})
    return completion.model_copy(update={"metrics": metrics})


def _class(reason: FailureReason, message: str, memory_limited: bool, retryable: bool | None) -> FailureClass:
    if reason in _JOB_REASONS:
        return "job"
    if reason is FailureReason.GPU_ERROR:
        return "infrastructure"
    if reason is FailureReason.OOM:
        return "job" if memory_limited else "infrastructure"
    if reason is FailureReason.IMAGE_UNAVAILABLE:
        if "--pull-policy is never" in message:
            return "infrastructure"
        return "job" if _WRONG_IMAGE.search(message) else "infrastructure"
    if retryable is not None:
        return "infrastructure" if retryable else "job"
    return "infrastructure"

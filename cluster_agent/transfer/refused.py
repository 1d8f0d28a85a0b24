"""A result the control plane refused as too large (HTTP 413), turned into one it can take.

Peers' users report the failure this prevents: a result over the server's body limit seen by the client as an
empty success, or retried forever. The replacement is failed (a job that failed keeps its own reason), says how large
the refused result was, and carries no output; when the job declared artifacts, its full output goes up as the
artifact `output.json` (written into the job's directory, the agent's, never the workspace) and is listed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..models import ArtifactError, Completion, FailureReason, JobStatus
from .artifacts import ArtifactUpload

__all__ = ["OUTPUT_ARTIFACT", "refused_result"]

log = logging.getLogger(__name__)

OUTPUT_ARTIFACT = "output.json"


def refused_result(job_id: str, completion: Completion, size: int, job_dir: Path | None,
                   uploads: ArtifactUpload | None) -> Completion:
    note = f"the job's result ({size} bytes) is larger than the control plane accepts (HTTP 413)"
    artifacts = list(completion.artifacts or [])
    errors = list(completion.artifact_errors or [])
    already = next((a for a in artifacts if a.path == OUTPUT_ARTIFACT), None)
    if already is not None:
        # The job's own output.json matched its artifact globs and went up already: it is the full output.
        note += f"; its full output is the artifact {OUTPUT_ARTIFACT}"
    elif completion.artifacts is not None and completion.output_payload not in ({}, None):
        outcome = _upload_output(job_id, completion, job_dir, uploads)
        if isinstance(outcome, ArtifactError):
            errors.append(outcome)
            note += f"; its output could not be uploaded as the artifact {OUTPUT_ARTIFACT}: {outcome.error}"
        else:
            artifacts = [a for a in artifacts if a.path != OUTPUT_ARTIFACT] + [outcome]
            note += f"; its full output was uploaded as the artifact {OUTPUT_ARTIFACT}"
    else:
        note += "; keep output.json small, or declare artifacts and write large results as files"
    failed = completion.status is not JobStatus.SUCCEEDED
    message = f"{completion.error_message}; {note}" if failed and completion.error_message else note
    metrics = completion.metrics if failed else completion.metrics.model_copy(
        update={"failure_class": "job", "retryable": False})  # its output is too large wherever it runs
    return completion.model_copy(update={
        "metrics": metrics,
        "status": completion.status if failed else JobStatus.FAILED,
        "failure_reason": completion.failure_reason if failed else FailureReason.INVALID_OUTPUT,
        "error_message": message[:4096],
        "output_payload": {},
        "artifacts": artifacts if completion.artifacts is not None else None,
        "artifact_errors": errors or None,
    })


def _upload_output(job_id: str, completion: Completion, job_dir: Path | None, uploads: ArtifactUpload | None):  # type: ignore[no-untyped-def]
    if job_dir is None or uploads is None or not job_dir.is_dir():
        return ArtifactError(path=OUTPUT_ARTIFACT, error="the job's directory is gone (a result spooled by an older agent)")
    target = job_dir / "refused-output"
    try:
        target.mkdir(mode=0o700, exist_ok=True)
        (target / OUTPUT_ARTIFACT).write_bytes(json.dumps(completion.output_payload).encode())
    except (OSError, ValueError, TypeError) as exc:
        return ArtifactError(path=OUTPUT_ARTIFACT, error=f"cannot be written for upload: {exc}")
    return uploads.upload_one(job_id, target, OUTPUT_ARTIFACT, job_dir)

"""Job data in and out: input files by URL (with a content-addressed cache) and artifacts to object storage.

Dependencies point one way: `urls` (redaction) <- `download` (one streamed, resumable GET) <- `cache`
(content-addressed store) <- `inputs` (a job's inputs staged before its container starts); `artifacts` (collect a
finished job's files, upload them where the control plane says) stands beside them. None of it knows the job
runner; the job runner calls `stage_inputs` and `ArtifactUpload.finish` through the agent's one `JobData`.
"""

from .artifacts import ArtifactUpload, collect_artifacts
from .cache import InputCache
from .download import Downloader
from .inputs import StagedInputs, stage_inputs
from .job_data import JobData
from .refused import refused_result
from .urls import redact_url

__all__ = [
    "ArtifactUpload", "Downloader", "InputCache", "JobData", "StagedInputs", "collect_artifacts", "redact_url",
    "refused_result", "stage_inputs",
]

"""The agent's exceptions, one hierarchy so callers catch by meaning.

    AgentError
     ├── ConfigError            a setting is missing or wrong; start-up prints it and exits 2
     ├── EngineUnavailable      the container engine cannot be reached or refused an operation
     ├── SlurmRefused           Slurm answered and said no (an invalid request): the caller decides what it means
     ├── GpuLost                a GPU stopped answering NVML (telemetry marks it lost)
     ├── PollInterrupted        the agent broke off its own max_jobs-0 poll (a slot freed, or shutdown)
     ├── ProbeImageMissing      the self-test's image is not on the engine's host
     ├── ControlPlaneError      the control plane did not give a usable answer
     │    ├── ControlPlaneUnavailable   network error, 5xx, 408 or 429 (retryable)
     │    ├── TokenRejected             401 / 403
     │    ├── MalformedResponse         2xx whose body does not follow the contract
     │    ├── ExtensionUnsupported      404 on an extension endpoint: the server does not have it
     │    └── RequestNotSendable        a request no HTTP library can send (never retried)
     └── JobFailed              a job cannot succeed; carries the failure_reason reported for it

Every message names the cause and, where there is one, the fix.
"""

from __future__ import annotations

from .models import FailureReason

__all__ = [
    "AgentError",
    "ConfigError",
    "ControlPlaneError",
    "ControlPlaneUnavailable",
    "EngineUnavailable",
    "ExtensionUnsupported",
    "GpuLost",
    "ImageGone",
    "JobFailed",
    "MalformedResponse",
    "PollInterrupted",
    "ProbeImageMissing",
    "RequestNotSendable",
    "SlurmRefused",
    "TokenRejected",
    "TransferFailed",
]


class AgentError(Exception):
    """Base of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A setting is missing, malformed or points at something unusable."""


class EngineUnavailable(AgentError):
    """The container engine cannot be reached, or failed an operation for reasons not the job's."""


class ProbeImageMissing(AgentError):
    """The image the self-test was to create a container from is not on the engine's host."""


class ControlPlaneError(AgentError):
    """The control plane did not give a usable answer."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ControlPlaneUnavailable(ControlPlaneError):
    """Network error or a status worth retrying (5xx, 408, 429)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, status=status)
        self.retry_after = retry_after


class TokenRejected(ControlPlaneError):
    """401/403: the cluster token is wrong, revoked, or for another cluster."""


class MalformedResponse(ControlPlaneError):
    """A 2xx answer whose body does not follow the contract."""


class JobFailed(AgentError):
    """A job cannot succeed; `reason` is the failure_reason reported to the control plane."""

    def __init__(self, reason: FailureReason, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.retryable = retryable  # known at the failure (an input's 404 vs a network error); None: by the reason


class ImageGone(JobFailed):
    """The image was found present moments before and is gone at the container's create (pruned, removed by hand):
    the job runner makes it present again, outside the job's stop lock, and tries once more."""


class SlurmRefused(AgentError):
    """Slurm answered and said no (an invalid request); the message is Slurm's own, on one line."""

    def __str__(self) -> str:
        return "; ".join(line.strip() for line in super().__str__().splitlines() if line.strip())


class GpuLost(AgentError):
    """A GPU stopped answering NVML (fell off the bus, driver reset): its telemetry marks it lost."""


class ExtensionUnsupported(ControlPlaneError):
    """The server answered 404 on an extension endpoint: it does not have it."""


class RequestNotSendable(ControlPlaneError):
    """The request cannot be built or sent whatever the server does (say, a header no HTTP library accepts).

    Never retried: every attempt would fail the same way, and retrying forever would hide the fault.
    """


class PollInterrupted(AgentError):
    """The agent broke off its own `max_jobs: 0` poll (a slot freed, or shutdown)."""


class TransferFailed(AgentError):
    """An input download or an artifact upload failed for good: retries used up, or an answer no retry changes
    (a 404, a checksum mismatch, a file over its limit: `permanent`, which no other node would change either).
    The message names the file and the URL without its query string (transfer/urls.py), and says what to check."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent

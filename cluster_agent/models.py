"""Typed models at the agent's boundaries: the job spec that comes in, the completion and heartbeat that go out.

Unknown fields from a newer control plane are kept, never fatal: the contract grows by extensions.
"""

from __future__ import annotations

import difflib
import json
import re
from enum import StrEnum
from typing import Any, Literal

import httpx
from pydantic import (
    BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator, model_serializer, model_validator,
)

__all__ = [
    "ArtifactError",
    "ArtifactRecord",
    "Capabilities",
    "Completion",
    "FailureReason",
    "GpuInfo",
    "InputFile",
    "JobMetrics",
    "JobSpec",
    "JobStatus",
    "Orchestration",
    "OutputSource",
    "PollResult",
    "RegistryAuth",
    "Resources",
]

# Use with fullmatch(): `$` alone would also accept an id that ends in a newline.
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Set by the control-plane client on a job it could read only in part (nested past the parser's depth): the job
# runner fails that job as invalid_job with this key's text, so the job still gets its one result.
REFUSED_KEY = "x-radix-refused"
# Names the agent sets itself; a job spec may not override them.
RESERVED_ENV = frozenset({"RADIX_JOB_ID"})
# The shortest secret_env value the agent accepts: shorter ones cannot be redacted without masking ordinary output.
MIN_SECRET_CHARS = 6
# The most it accepts. Every form of every secret is one regular expression, built in time linear in their total
# length (about 15 ms per KiB here) and matched against a stream held back by 12 times the longest: a PEM key or a
# service-account JSON fits; larger secrets belong in a file the job downloads (inputs), not in its environment.
MAX_SECRETS = 100
MAX_SECRET_CHARS = 16 * 1024
MAX_SECRETS_TOTAL_CHARS = 64 * 1024


class JobStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class FailureReason(StrEnum):
    EXIT_CODE = "exit_code"
    TIMEOUT = "timeout"
    OOM = "oom"
    CANCELED = "canceled"
    IMAGE_UNAVAILABLE = "image_unavailable"
    INVALID_JOB = "invalid_job"
    INVALID_OUTPUT = "invalid_output"
    AGENT_ERROR = "agent_error"
    INTERRUPTED = "interrupted"
    # Extensions (docs/protocol.md "Inputs and artifacts"): only jobs that carry inputs or artifacts can get them.
    INPUT_UNAVAILABLE = "input_unavailable"
    ARTIFACT_UPLOAD_FAILED = "artifact_upload_failed"
    # Extension (docs/gpu.md): a GPU of the job faulted while it ran (critical XID, fell off the bus, health limit).
    GPU_ERROR = "gpu_error"


class OutputSource(StrEnum):
    OUTPUT_JSON = "output_json"
    STDOUT_JSON = "stdout_json"
    WRAPPED = "wrapped"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


KNOWN_LAUNCHERS = ("torchrun", "none")
# NVIDIA's MIG profile names: slices and memory of the GPU instance ("3g.40gb"), optionally the compute instance's
# slices first ("1c.3g.40gb") and options after ("1g.10gb+me", and on Blackwell "1g.23gb+me.all", "1g.23gb-me",
# "1g.23gb+gfx"); NVIDIA MIG User Guide, "Supported MIG Profiles".
MIG_PROFILE_PATTERN = re.compile(r"^(?:[1-9]c\.)?[1-9]g\.[1-9][0-9]{0,3}gb(?:[+-][a-z]{1,8}(?:\.[a-z]{1,8})?){0,4}$")


MAX_NODES = 1024


class Orchestration(_Lenient):
    num_gpus: int | None = Field(default=None, ge=0, le=1024)
    launcher: str | None = None
    # Nodes the job runs on, one container each (docs/protocol.md "Multi-node jobs"); more than one needs Slurm mode.
    nodes: int = Field(default=1, ge=1, le=MAX_NODES, strict=True)  # a JSON integer: "2", 2.0 and true are refused

    @field_validator("nodes", mode="before")
    @classmethod
    def _nodes(cls, value: Any) -> Any:
        return 1 if value is None else value

    @field_validator("launcher")
    @classmethod
    def _launcher(cls, value: str | None) -> str | None:
        if value is not None and value not in KNOWN_LAUNCHERS:
            raise ValueError(f"launcher {value[:40]!r} is not one this agent knows ({', '.join(KNOWN_LAUNCHERS)}, or "
                             "none given)")
        return value


# 1 PiB: far beyond any host, and far inside the engine's int64 byte counts (a larger value was an engine error,
# "cannot unmarshal number", counted against the node as an infrastructure failure).
MAX_MEMORY_MB = 1024**3
MAX_TIMEOUT_SECONDS = 366 * 24 * 3600


class Resources(_Lenient):
    gpus: int | None = Field(default=None, ge=0, le=1024)
    # Docker turns cpus into a CFS quota of cpus x 100 ms per 100 ms period, and the kernel refuses a quota under
    # 1 ms (Documentation/scheduler/sched-bwc.rst): below 0.01 the engine failed the job as its own error, and
    # below 1e-9 the limit rounded to none at all.
    cpus: float | None = Field(default=None, ge=0.01, le=4096)
    # Docker refuses memory limits under 6 MiB.
    memory_mb: int | None = Field(default=None, ge=6, le=MAX_MEMORY_MB)
    shm_mb: int | None = Field(default=None, ge=1, le=MAX_MEMORY_MB)
    # A MIG profile (e.g. "1g.10gb"): the job gets MIG instances of it instead of full GPUs (docs/gpu.md).
    gpu_profile: str | None = None

    @field_validator("gpu_profile")
    @classmethod
    def _gpu_profile(cls, value: str | None) -> str | None:
        if value is not None and not MIG_PROFILE_PATTERN.match(value):
            raise ValueError(f"gpu_profile {value[:40]!r} is not a MIG profile name; give one as nvidia-smi lists them "
                             "(`nvidia-smi mig -lgip`), e.g. '1g.10gb' or '3g.40gb'")
        return value


class RegistryAuth(BaseModel):
    """Credentials for the job's image registry. The password is a secret: never logged, echoed or written."""

    username: str = Field(min_length=1)
    password: SecretStr
    serveraddress: str | None = None

    def to_engine(self) -> dict[str, str]:
        auth = {"username": self.username, "password": self.password.get_secret_value()}
        if self.serveraddress:
            auth["serveraddress"] = self.serveraddress
        return auth


SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# The files the agent itself reads and writes in a workspace: an input may not land on (or under) them.
WORKSPACE_RESERVED = ("input.json", "output.json")
MAX_INPUTS = 1000
MAX_ARTIFACT_PATTERNS = 100


def workspace_relative(value: str, what: str) -> str:
    """A path (or glob) inside /workspace: relative, no `..` or `.` segment, no empty segment, no NUL; returned
    normalized (no trailing slash). Raises ValueError naming `what`."""
    if not isinstance(value, str) or not value or len(value) > 1024 or "\x00" in value:
        raise ValueError(f"{what} must be a non-empty relative path of at most 1024 characters")
    if value.startswith("/"):
        raise ValueError(f"{what} {value[:140]!r} is absolute; give it relative to /workspace, e.g. 'data/model.bin'")
    parts = value.rstrip("/").split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{what} {value[:140]!r} has an empty, '.' or '..' segment; give a plain path under /workspace")
    return "/".join(parts)


class InputFile(BaseModel):
    """One input file: downloaded from `url` to /workspace/`path` before the container starts."""

    model_config = ConfigDict(extra="allow")

    url: str = Field(min_length=1, max_length=8192)
    path: str
    sha256: str | None = None
    size_bytes: int | None = Field(default=None, ge=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value)
        except ValueError:
            raise ValueError("url is not a URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in value):
            # Only the scheme and host are shown: the rest may carry a presigned signature.
            raise ValueError(f"url must be an http(s) URL, not {parts.scheme or 'no scheme'}://{parts.hostname or ''}")
        if any(ord(c) < 0x20 or c == "\x7f" for c in value):
            raise ValueError("url holds a control character; percent-encode it")
        try:
            httpx.URL(value)
            _ = parts.port  # raises on a port that is not a number
        except (httpx.InvalidURL, ValueError, UnicodeError):
            raise ValueError(f"url is not a valid URL (host {parts.hostname!r}); check its host and port") from None
        return value

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        value = workspace_relative(value, "inputs[].path")
        top = value.split("/")[0]
        if top in WORKSPACE_RESERVED:
            raise ValueError(f"inputs[].path {value!r} overlaps {top}, which the agent and the job use; choose another "
                             "path")
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.lower()
        if not SHA256_PATTERN.fullmatch(value):
            raise ValueError("inputs[].sha256 must be 64 hexadecimal digits (the file's SHA-256)")
        return value


# execve(2): one argument or environment string may hold at most MAX_ARG_STRLEN (32 pages, 131072 bytes with its
# NUL); all of them together at most a quarter of the stack limit (8 MiB by default, so 2 MiB), less what the
# runtime adds (docker-init, PATH, HOSTNAME, NVIDIA variables): a margin of 64 KiB.
MAX_EXEC_STRING_BYTES = 131072 - 1
MAX_EXEC_BYTES = 2 * 1024 * 1024 - 64 * 1024


def _check_exec_string(field: str, value: str) -> None:
    """Strings that reach execve(2): the engine would start the container and fail it with exit code 1
    (`exec /sbin/docker-init: invalid argument`), as if the job had run and failed."""
    if "\x00" in value:
        raise ValueError(f"{field} contains a NUL byte, which no program can be given; remove it")
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > MAX_EXEC_STRING_BYTES:
        raise ValueError(
            f"{field} is {size} bytes, over the {MAX_EXEC_STRING_BYTES} bytes one argument or variable may hold "
            "(execve(2)); pass large data in input_payload instead"
        )


def _none_as_empty(value: Any, empty: Any) -> Any:
    return empty if value is None else value


class JobSpec(_Lenient):
    """A job as the control plane sends it (core fields plus the timeout/resources extensions)."""

    job_id: str
    job_kind: str | None = None
    image: str = Field(min_length=1, max_length=512)
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    input_payload: Any = None
    orchestration: Orchestration = Field(default_factory=Orchestration)
    # At most a year: 1e400 parsed as infinity and ran without a timeout (Docker mode) or broke sbatch's --time.
    timeout_seconds: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_SECONDS)
    resources: Resources = Field(default_factory=Resources)
    registry_auth: RegistryAuth | None = None
    # Secrets: env values redacted from everything the job prints or returns (docs/protocol.md "Job secrets").
    secret_env: dict[str, str] = Field(default_factory=dict)
    inputs: list[InputFile] = Field(default_factory=list, max_length=MAX_INPUTS)
    artifacts: list[str] = Field(default_factory=list, max_length=MAX_ARTIFACT_PATTERNS)

    @field_validator("input_payload")
    @classmethod
    def _finite_input(cls, value: Any) -> Any:
        # A number past a double's range (1e400) parses as infinity, which input.json could only carry as the
        # non-JSON `Infinity` every strict parser refuses.
        try:
            json.dumps(value, allow_nan=False)
        except ValueError:
            raise ValueError("input_payload holds a number JSON cannot carry (NaN or beyond ±1.8e308, read as "
                             "infinity); send it as a string") from None
        return value

    @field_validator("secret_env", mode="before")
    @classmethod
    def _secret_env(cls, value: Any) -> Any:
        value = _none_as_empty(value, {})
        if not isinstance(value, dict):
            return value  # pydantic reports the type error
        if len(value) > MAX_SECRETS:
            raise ValueError(f"secret_env has {len(value)} values: at most {MAX_SECRETS}")
        for name, item in value.items():
            if not isinstance(name, str) or not ENV_NAME_PATTERN.fullmatch(name) or name in RESERVED_ENV:
                raise ValueError(f"secret_env name {str(name)[:60]!r} is not a variable name a job may set")
            if not isinstance(item, str):
                raise ValueError(f"secret_env {name}: the value must be a string")
            if len(item) > MAX_SECRET_CHARS:
                raise ValueError(f"secret_env {name}: {len(item)} characters, at most {MAX_SECRET_CHARS}; give a larger "
                                 "secret to the job as a file (inputs) instead")
            if len(item) < MIN_SECRET_CHARS:
                # As GitLab and Buildkite do: a short value cannot be masked without masking ordinary output.
                raise ValueError(f"secret_env {name}: a secret of fewer than {MIN_SECRET_CHARS} characters cannot be "
                                 "masked in the job's output; use a longer one")
            _check_exec_string(f"secret_env {name}", item)
        total = sum(len(item) for item in value.values())
        if total > MAX_SECRETS_TOTAL_CHARS:
            raise ValueError(f"secret_env values have {total} characters in all, at most {MAX_SECRETS_TOTAL_CHARS}; "
                             "give large secrets to the job as files (inputs) instead")
        return value

    @model_validator(mode="after")
    def _profile_needs_gpus(self) -> JobSpec:
        if self.resources.gpu_profile is not None and self.gpu_request == 0:
            raise ValueError(f"resources.gpu_profile {self.resources.gpu_profile!r} with no GPUs asked for; ask for one "
                             "or more (resources.gpus), or leave gpu_profile out")
        return self

    @model_validator(mode="after")
    def _secrets_apart(self) -> JobSpec:
        both = sorted(set(self.env) & set(self.secret_env))
        if both:
            raise ValueError(f"{', '.join(both)} in both env and secret_env; give each variable once")
        return self

    @field_validator("inputs", "artifacts", mode="before")
    @classmethod
    def _optional_lists(cls, value: Any) -> Any:
        return _none_as_empty(value, [])

    @field_validator("inputs")
    @classmethod
    def _inputs_apart(cls, value: list[InputFile]) -> list[InputFile]:
        paths = sorted(item.path for item in value)
        for first, second in zip(paths, paths[1:]):
            if second == first or second.startswith(first + "/"):
                raise ValueError(f"inputs {first!r} and {second!r} overlap; give each input its own path")
        return value

    @field_validator("artifacts")
    @classmethod
    def _artifact_patterns(cls, value: list[str]) -> list[str]:
        return [workspace_relative(pattern, "artifacts[]") for pattern in value]

    @field_validator("job_id")
    @classmethod
    def _job_id(cls, value: str) -> str:
        if not JOB_ID_PATTERN.fullmatch(value):
            raise ValueError(f"job_id {value[:140]!r} does not match {JOB_ID_PATTERN.pattern}")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if value != value.strip() or any(c.isspace() or not c.isprintable() for c in value):
            raise ValueError("image must be an image reference without spaces, e.g. 'python:3.11-slim'")
        return value

    @field_validator("command", "args", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _none_as_empty(value, [])

    @field_validator("command", "args")
    @classmethod
    def _exec_strings(cls, value: list[str], info: ValidationInfo) -> list[str]:
        for index, item in enumerate(value):
            _check_exec_string(f"{info.field_name}[{index}]", item)
        return value

    @model_validator(mode="after")
    def _exec_size(self) -> JobSpec:
        total = sum(len(item.encode()) + 1 for item in (*self.command, *self.args))
        total += sum(len(name.encode()) + len(value.encode()) + 2
                     for name, value in (*self.env.items(), *self.secret_env.items()))
        if total > MAX_EXEC_BYTES:
            raise ValueError(
                f"command, args and env add up to {total} bytes, over the {MAX_EXEC_BYTES} bytes a program can be "
                "started with (execve(2)); pass large data in input_payload, which the job reads from /workspace/input.json"
            )
        return self

    @field_validator("orchestration", "resources", mode="before")
    @classmethod
    def _objects(cls, value: Any) -> Any:
        return _none_as_empty(value, {})

    @field_validator("env", mode="before")
    @classmethod
    def _env(cls, value: Any) -> Any:
        value = _none_as_empty(value, {})
        if not isinstance(value, dict):
            return value  # pydantic reports the type error
        out: dict[str, Any] = {}
        for name, item in value.items():
            if not isinstance(name, str) or not ENV_NAME_PATTERN.fullmatch(name):
                raise ValueError(f"env name {name!r} is not a valid variable name (letters, digits, _; not starting with a digit)")
            if name in RESERVED_ENV:
                raise ValueError(f"env name {name} is set by the agent and cannot be overridden")
            # Numbers and booleans are common in hand-written specs; the container sees strings either way.
            if isinstance(item, bool):
                item = "true" if item else "false"
            elif isinstance(item, (int, float)):
                item = str(item)
            if isinstance(item, str):
                _check_exec_string(f"env {name}", item)
            out[name] = item
        return out

    def unknown_fields(self) -> list[tuple[str, str | None]]:
        """Keys of `resources` and `orchestration` this agent does not know (ignored, for forward compatibility),
        each with the known key it most likely misspells, if any: [("resources.mig_profile",
        "resources.gpu_profile")]. At most 5, names cut to 40 characters."""
        found: list[tuple[str, str | None]] = []
        for section, model in (("resources", self.resources), ("orchestration", self.orchestration)):
            known = list(type(model).model_fields)
            for key in (model.model_extra or {}):
                guess = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                found.append((f"{section}.{key[:40]}", f"{section}.{guess[0]}" if guess else None))
        return found[:5]

    @property
    def gpu_request(self) -> int | None:
        """GPUs the job asks for: `resources.gpus` when given, else `orchestration.num_gpus`; None if neither."""
        if self.resources.gpus is not None:
            return self.resources.gpus
        return self.orchestration.num_gpus


class JobMetrics(BaseModel):
    runtime_seconds: float
    exit_code: int | None = None
    queue_seconds: float | None = None
    gpu_ids: list[str] | None = None
    output_source: OutputSource | None = None
    # Inputs: moved before the container started, not part of runtime_seconds or the job's timeout.
    input_seconds: float | None = None
    input_bytes: int | None = None
    input_cached_bytes: int | None = None
    # Failed jobs: whether another try elsewhere can help (failure_class.py has the table).
    failure_class: Literal["job", "infrastructure"] | None = None
    retryable: bool | None = None
    # Artifacts: collected, hashed and uploaded after the container ended (uploaded bytes only).
    artifact_seconds: float | None = None
    artifact_bytes: int | None = None

    def to_wire(self) -> dict[str, Any]:
        data = self.model_dump(mode="json", exclude_none=True)
        data.setdefault("exit_code", None)  # core field: always present
        return data


class ArtifactRecord(BaseModel):
    """One uploaded artifact, as the completion lists it."""

    path: str
    size_bytes: int
    sha256: str


class ArtifactError(BaseModel):
    """An artifact that was not uploaded, and why (never the upload URL: it may carry a signature)."""

    path: str
    error: str


class Completion(BaseModel):
    """The body of `POST /jobs/{job_id}/complete`. `artifacts`/`artifact_errors` are extensions, sent only for a
    job that asked for artifacts."""

    tenant_id: str
    status: JobStatus
    output_payload: Any = Field(default_factory=dict)
    metrics: JobMetrics
    error_message: str | None = None
    failure_reason: FailureReason | None = None
    artifacts: list[ArtifactRecord] | None = None
    artifact_errors: list[ArtifactError] | None = None

    @classmethod
    def not_run(
        cls, tenant_id: str, reason: FailureReason, message: str, *, runtime_seconds: float = 0.0
    ) -> Completion:
        """A job that ended without a container result to judge: `canceled` for a cancel, else `failed`; no
        output, no exit code, the message naming the cause and the fix."""
        return cls(
            tenant_id=tenant_id,
            status=JobStatus.CANCELED if reason is FailureReason.CANCELED else JobStatus.FAILED,
            output_payload={},
            metrics=JobMetrics(runtime_seconds=round(runtime_seconds, 3), exit_code=None),
            error_message=message,
            failure_reason=reason,
        )

    def to_wire(self) -> dict[str, Any]:
        body = self.model_dump(mode="json")
        body["metrics"] = self.metrics.to_wire()
        for extension in ("artifacts", "artifact_errors"):
            if body[extension] is None:
                del body[extension]  # a core control plane sees the core body
        return body


class GpuInfo(BaseModel):
    # Heartbeats add telemetry and health fields to these four.
    model_config = ConfigDict(extra="allow")

    index: int  # NVML's index of the (parent) GPU
    uuid: str  # "GPU-..." for a full GPU, "MIG-..." for a MIG instance
    name: str
    memory_total_mb: int
    # Extensions (docs/gpu.md), absent where unknown. The device node is /dev/nvidia<minor_number>, which need not
    # be /dev/nvidia<index>. A MIG instance names its profile, its parent GPU and its index on that parent.
    minor_number: int | None = None
    mig_profile: str | None = None
    parent_uuid: str | None = None
    mig_index: int | None = None

    @model_serializer(mode="wrap")
    def _leave_out_unknown(self, handler: Any) -> Any:
        # The core's four fields always; an extension only when known (a control plane sees no nulls it never asked for).
        data = handler(self)
        if isinstance(data, dict):
            for key in ("minor_number", "mig_profile", "parent_uuid", "mig_index"):
                if data.get(key) is None:
                    data.pop(key, None)
        return data

    @property
    def device_node(self) -> str:
        """The character device of the (parent) GPU on the host, e.g. /dev/nvidia0."""
        return f"/dev/nvidia{self.index if self.minor_number is None else self.minor_number}"

    @property
    def physical_uuid(self) -> str:
        """The GPU whose health this unit shares: its parent for a MIG instance, else itself."""
        return self.parent_uuid or self.uuid


class Capabilities(_Lenient):
    cpu_count: int
    memory_gb: float
    gpu_count: int
    gpus: list[GpuInfo] = Field(default_factory=list)


class PollResult(BaseModel):
    """The usable part of a poll answer. The client checks each item on its own and leaves out (and logs) the bad
    ones, so one bad item cannot lose the others. Jobs stay raw objects: the job runner validates each and
    reports a bad one as invalid_job."""

    jobs: list[dict[str, Any]] = Field(default_factory=list)
    cancel_job_ids: list[str] = Field(default_factory=list)
    long_poll: bool = False

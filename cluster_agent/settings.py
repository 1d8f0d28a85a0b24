"""Every setting of the agent, in one pydantic-settings model: its flag, its env var, its default and its help.

The env var is `RADIX_` + the flag in upper snake case, except the three names the Radix contract fixed
(`RADIX_POLL_INTERVAL_SECONDS`, `RADIX_HEARTBEAT_INTERVAL_SECONDS`, `RADIX_JOB_TIMEOUT_SECONDS`).
The command line (see `cli.py`) is generated from this model; CLI values win over env vars.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .models import JOB_ID_PATTERN

__all__ = ["Settings", "env_name", "flag_name", "is_loopback"]

DEFAULT_MAX_OUTPUT_BYTES = 10 * 1024 * 1024
# capabilities(7), Linux 6.x: what --cap-drop may name (with or without CAP_).
LINUX_CAPABILITIES = frozenset("""
    CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE
    NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT
    SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP
    MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE
""".split())


def _env(name: str) -> dict[str, str]:
    """An env var name that differs from `RADIX_<FIELD>` (fixed by the Radix contract)."""
    return {"validation_alias": name}


def env_name(field: str) -> str:
    """The env var that sets `field`."""
    info = Settings.model_fields[field]
    alias = info.validation_alias
    return alias if isinstance(alias, str) else f"RADIX_{field.upper()}"


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


MAX_SECONDS = 366 * 24 * 3600
SECONDS_SETTINGS = (
    "poll_interval", "heartbeat_interval", "long_poll_seconds", "shutdown_grace", "jobs_lock_wait", "job_timeout",
    "gpu_health_interval", "pull_timeout", "pull_stall_seconds", "self_test_interval", "transfer_timeout",
    "health_stale_seconds", "slurm_poll_interval", "slurm_storage_probe_seconds",
)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RADIX_",
        populate_by_name=True,
        extra="ignore",
        case_sensitive=False,
        allow_inf_nan=False,  # `inf` seconds overflowed the threads' waits: the heartbeat or self-test thread died
    )

    # Control plane
    api_base: str | None = Field(
        default=None, description="Control-plane base URL, e.g. https://radix.example.com/api (required)."
    )
    cluster_id: str | None = Field(default=None, description="This cluster's id at the control plane (required).")
    cluster_token: SecretStr | None = Field(
        default=None, description="Cluster token. Without it, the token file or a one-time token is used."
    )
    one_time_token: SecretStr | None = Field(
        default=None, description="One-time token, exchanged once for a cluster token that is saved in the token file."
    )
    token_file: Path = Field(
        default=Path("/var/lib/radix/cluster_token"), description="Where the exchanged cluster token is kept (mode 0600)."
    )
    tenant_id: str = Field(default="demo-tenant", description="Tenant id sent with every request.")
    allow_insecure_http: bool = Field(
        default=False, description="Allow a plain http:// api base on a non-loopback host (sends the token in clear)."
    )

    # Timing
    poll_interval: float = Field(
        default=30.0, gt=0, description="Seconds to wait after an empty answer from a server without long polling.",
        **_env("RADIX_POLL_INTERVAL_SECONDS"),
    )
    heartbeat_interval: float = Field(
        default=300.0, gt=0, description="Seconds between heartbeats.", **_env("RADIX_HEARTBEAT_INTERVAL_SECONDS")
    )
    long_poll_seconds: float = Field(
        default=25.0, ge=0, le=300, description="How long a long-poll server may hold a poll (wait_seconds)."
    )
    shutdown_grace: float = Field(
        default=30.0, gt=0,
        description="With --on-shutdown cancel: seconds from SIGTERM to exit; jobs still running then are stopped as "
        "interrupted. With leave, the agent exits within min(this, 10 s).",
    )
    on_shutdown: Literal["leave", "cancel"] = Field(
        default="leave",
        description="On SIGTERM, leave running jobs to the next agent (which adopts them), or cancel them "
        "(completed as failed/interrupted).",
    )
    max_jobs: int = Field(default=0, ge=0, description="Exit after this many jobs (ephemeral hosts); 0: no limit.")

    # Jobs
    jobs_workdir: Path = Field(
        default=Path("/tmp/radix-jobs"),
        description="Host directory holding one directory per job (mounted at /workspace). In a container, mount it at the same path.",
    )
    jobs_lock_wait: float = Field(
        default=60.0, ge=0,
        description="One agent per jobs directory: when another agent holds it (still draining after SIGTERM, or "
        "started twice by mistake), wait this many seconds for it to exit, then give up.",
    )
    execution_mode: Literal["docker", "slurm"] = Field(
        default="docker",
        description="How jobs run: docker (containers on this host's engine) or slurm (one sbatch job each on a Slurm "
        "cluster; the agent runs on a login node and --jobs-workdir must be shared with the nodes; docs/slurm.md).",
    )
    job_timeout: float = Field(
        default=3600.0, gt=0, description="Default per-job timeout in seconds (a job's timeout_seconds wins).",
        **_env("RADIX_JOB_TIMEOUT_SECONDS"),
    )
    max_concurrent_jobs: int = Field(default=1, ge=1, le=256, description="Jobs run at the same time.")
    max_output_bytes: ByteSize = Field(
        default=DEFAULT_MAX_OUTPUT_BYTES, ge=1, description="Largest output.json (and JSON stdout) accepted (bytes, or 10MiB)."
    )
    pids_limit: int = Field(
        default=4096, ge=0, description="Most processes a job's container may run (0: no limit). Stops fork bombs."
    )
    gpu_mode: Literal["auto", "nvidia", "cdi", "none"] = Field(
        default="auto",
        description="How GPUs reach job containers: nvidia (the engine's NVIDIA runtime), cdi (a CDI spec translated "
        "into devices and mounts), none, or auto (nvidia if the engine has it, else cdi if a spec is found).",
    )
    gpu_shm_mb: int = Field(
        default=16384, ge=64,
        description="/dev/shm of a GPU job that names no shm_mb and no memory limit, in MiB (with a memory limit: "
        "half of it).",
    )
    gpu_max_temperature: float = Field(
        default=90.0, gt=0, description="A GPU hotter than this (Celsius) takes no new job until it cools down."
    )
    gpu_health_interval: float = Field(default=10.0, gt=0, description="Seconds between GPU health samples.")
    cdi_spec_dirs: str = Field(
        default="/etc/cdi,/var/run/cdi", description="Comma-separated directories searched for CDI specs."
    )
    allowed_images: str = Field(
        default="*",
        description="Comma-separated glob patterns of images jobs may use (e.g. 'registry.example.com/ml/*'); "
        "others fail as invalid_job.",
    )
    pull_policy: Literal["always", "if-not-present", "never"] = Field(
        default="if-not-present", description="When job images are pulled."
    )
    cap_drop: str = Field(
        default="NET_RAW,MKNOD,AUDIT_WRITE",
        description="Comma-separated capabilities dropped from job containers ('ALL': the job keeps no capability; '' "
        "drops none beyond what the engine's default set leaves out).",
    )
    read_only_rootfs: bool = Field(
        default=False, description="Job containers get a read-only root filesystem (/workspace and /tmp stay writable)."
    )
    job_network: Literal["bridge", "none"] = Field(
        default="bridge", description="Network of job containers: bridge, or none to cut jobs off the network."
    )
    min_free_disk_gb: float = Field(
        default=5.0, ge=0,
        description="Take no job while the jobs directory or the engine's data root has less free space (GiB).",
    )
    prune_to_free_gb: float = Field(
        default=0.0, ge=0,
        description="When under --min-free-disk-gb, prune images jobs used and no container uses, least recently "
        "used first, until this much is free (GiB); 0 turns pruning off.",
    )
    pull_timeout: float = Field(default=1800.0, gt=0, description="Longest an image pull may take, in seconds.")
    pull_stall_seconds: float = Field(
        default=120.0, gt=0, description="A pull that reports no progress for this long fails as image_unavailable."
    )
    # Node health (docs/operations.md "Self-test and quarantine")
    self_test_interval: float = Field(
        default=300.0, ge=0, description="Seconds between self-tests (engine, jobs directory, GPUs, token); 0: only at start, on SIGUSR1 and while quarantined.",
    )
    quarantine_after: int = Field(
        default=3, ge=0,
        description="Quarantine the node (take no jobs) after this many infrastructure failures in a row; 0: never.",
    )
    self_test_image: str | None = Field(
        default=None,
        description="A trusted image with sh on this host (busybox will do) that the self-test starts GPU containers "
        "from and creates its engine-check container from; unset: the agent's own image when it runs in a "
        "container, else GPUs are looked at on the host only and the engine check uses the last image a job ran.",
    )
    # Data in and out (docs/protocol.md "Inputs and artifacts")
    cache_dir: Path | None = Field(
        default=None,
        description="Content-addressed cache of job inputs that carry a sha256 (shared by jobs, read-only to them); "
        "unset: no cache, each job downloads its own inputs.",
    )
    cache_max_bytes: ByteSize = Field(
        default=100 * 1024**3, ge=0, description="Size the input cache is kept under, least recently used evicted first (bytes, or 100GiB, 500GB)."
    )
    max_input_bytes: ByteSize = Field(
        default=50 * 1024**3, ge=0, description="Most bytes of input files one job may ask for (bytes, or 50GiB)."
    )
    max_artifact_bytes: ByteSize = Field(
        default=20 * 1024**3, ge=0, description="Most bytes of artifacts one job may upload (bytes, or 20GiB)."
    )
    max_artifact_file_bytes: ByteSize = Field(
        # S3's limit for one PUT (presigned URLs are single PUTs): a larger file would be refused after the upload.
        default=5 * 1024**3, ge=0, description="Largest single artifact file (bytes, or 5GiB: S3's limit for one PUT).",
    )
    max_artifact_files: int = Field(default=1000, ge=0, description="Most artifact files one job may upload.")
    transfer_timeout: float = Field(
        default=3600.0, gt=0,
        description="Longest one download or upload attempt may take, in seconds, whatever the server trickles (a "
        "stalled one, under 64 KiB in 60 s, is cut sooner); raise it for files that take longer.",
    )
    transfer_retries: int = Field(
        default=5, ge=0, le=100, description="Retries of one input download or artifact upload after a network error or a 5xx.",
    )
    docker_host: str | None = Field(
        default=None, description="Docker engine address; default: DOCKER_HOST, else unix:///var/run/docker.sock."
    )

    metrics_port: int = Field(
        default=9464, ge=0, le=65535,
        description="Port of the HTTP endpoint serving /metrics (Prometheus) and /healthz; 0 turns it off.",
    )
    metrics_host: str = Field(default="0.0.0.0", description="Address the metrics/health endpoint listens on.")
    health_stale_seconds: float = Field(
        default=0, ge=0,
        description="/healthz fails when the control plane has not answered for this long; 0: twice the longer of "
        "--long-poll-seconds and --poll-interval, plus 60.",
    )
    health_file: Path = Field(
        default=Path("/tmp/radix-agent.alive"),
        description="File the agent touches every few seconds while its poll loop runs (the image's HEALTHCHECK reads it).",
    )

    # Slurm (--execution-mode slurm)
    slurm_partition: str = Field(default="", description="Slurm partition for jobs (sbatch --partition); empty: the cluster's default.")
    slurm_account: str = Field(default="", description="Slurm account jobs are charged to (sbatch --account).")
    slurm_qos: str = Field(default="", description="Slurm QoS for jobs (sbatch --qos).")
    slurm_gpu_flag: Literal["gres", "gpus"] = Field(
        default="gres", description="How a job's GPU count is asked of Slurm: gres (--gres=gpu:N) or gpus (--gpus=N)."
    )
    slurm_gpu_type: str = Field(
        default="",
        description="GPU type for the request, e.g. h100 (--gres=gpu:h100:N); empty: any.",
    )
    slurm_container_engine: Literal["docker", "podman"] = Field(
        default="docker", description="Container engine the batch script runs the job's container with on the node."
    )
    slurm_sbatch_args: str = Field(
        default="", description="Extra sbatch arguments for every job, shell-quoted, e.g. '--constraint=a100 --exclusive'."
    )
    slurm_poll_interval: float = Field(
        default=1.0, gt=0, le=60, description="Seconds between squeue calls (one call covers every job of this agent)."
    )
    slurm_storage_probe_seconds: float = Field(
        default=120.0, ge=0,
        description="At start-up, a tiny Slurm job checks that the nodes see --jobs-workdir; how long to wait for it "
        "(0: skip the probe and rely on the filesystem type).",
    )

    # Logging
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="Log level.")
    log_format: Literal["text", "json"] = Field(
        default="text", description="text lines, or JSON lines with job_id, event and duration_s fields."
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("api_base")
    @classmethod
    def _api_base(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().rstrip("/")
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL; give e.g. https://radix.example.com/api")
        if parts.username or parts.password:
            raise ValueError("put no credentials in the URL; the token goes in --cluster-token")
        if parts.query or parts.fragment:
            raise ValueError("the URL must have no query string or fragment")
        return value

    @field_validator("jobs_workdir")
    @classmethod
    def _jobs_workdir(cls, value: Path) -> Path:
        text = str(value)
        if "\x00" in text:
            raise ValueError("the path contains a NUL byte")
        if not value.is_absolute():
            # The engine mounts a job's workspace by its host path, and a relative one names nothing there.
            raise ValueError(f"{text!r} is a relative path; give an absolute one, e.g. {Path.cwd() / value}")
        return value

    @field_validator(*SECONDS_SETTINGS)
    @classmethod
    def _at_most_a_year(cls, value: float) -> float:
        # A thread's wait takes at most threading.TIMEOUT_MAX (about 9.2e9 s here): past it the wait raises and
        # the thread dies while the agent looks healthy. A year is past any sensible interval or timeout.
        if value > MAX_SECONDS:
            raise ValueError(f"at most {MAX_SECONDS} seconds (a year)")
        return value

    @field_validator("cache_dir")
    @classmethod
    def _cache_dir(cls, value: Path | None) -> Path | None:
        if value is None or str(value) == "":
            return None
        if "\x00" in str(value) or not value.is_absolute():
            # Cached inputs are mounted into containers by their host path.
            raise ValueError(f"{str(value)!r} is not an absolute path; give one, e.g. /var/cache/radix-inputs")
        return value

    @field_validator("allowed_images")
    @classmethod
    def _allowed_images(cls, value: str) -> str:
        if not [p for p in value.split(",") if p.strip()]:
            raise ValueError("no image pattern given, so every job would fail; give '*' to allow any image")
        return value

    @field_validator("cap_drop")
    @classmethod
    def _cap_drop(cls, value: str) -> str:
        for name in (c.strip().upper() for c in value.split(",") if c.strip()):
            if name != "ALL" and name.removeprefix("CAP_") not in LINUX_CAPABILITIES:
                raise ValueError(
                    f"{name} is not a Linux capability (capabilities(7)), so every job's container would be refused; "
                    "give names such as NET_RAW,MKNOD, or ALL"
                )
        return value

    @field_validator("docker_host")
    @classmethod
    def _docker_host(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("unix", "tcp", "ssh", "http", "https", "npipe"):
            raise ValueError(f"{value!r} is not an engine address; give e.g. unix:///var/run/docker.sock or tcp://host:2376")
        return value

    @field_validator("slurm_gpu_type")
    @classmethod
    def _gpu_type(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]*", value):
            raise ValueError(f"{value!r} is not a GPU type name: give the type alone (h100), the count comes from each job")
        return value

    @field_validator("slurm_sbatch_args")
    @classmethod
    def _sbatch_args(cls, value: str) -> str:
        try:
            args = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is not shell-quoted arguments ({exc})") from None
        owned = ("--output", "--error", "--export", "--job-name", "--parsable", "--chdir", "-o", "-e", "-J", "-D")
        for arg in args:
            if arg.split("=", 1)[0] in owned:
                raise ValueError(f"{arg} is set by the agent for every job; leave it out")
        return value

    @field_validator("cluster_id")
    @classmethod
    def _cluster_id(cls, value: str | None) -> str | None:
        if value is not None and not JOB_ID_PATTERN.fullmatch(value):
            raise ValueError(f"{value!r} is not a valid cluster id (letters, digits, '.', '_', '-'; up to 128)")
        return value

    @model_validator(mode="after")
    def _tls_only(self) -> Settings:
        if self.api_base:
            parts = urlsplit(self.api_base)
            if parts.scheme == "http" and not is_loopback(parts.hostname or "") and not self.allow_insecure_http:
                raise ValueError(
                    f"--api-base / RADIX_API_BASE: {self.api_base} is plain http to a non-loopback host, which would send the cluster "
                    "token in clear; use https, or pass --allow-insecure-http (RADIX_ALLOW_INSECURE_HTTP=true) if you really mean it"
                )
        return self

    @model_validator(mode="after")
    def _cache_apart(self) -> Settings:
        cache, jobs = self.cache_dir, self.jobs_workdir
        if cache is not None and (cache == jobs or cache.is_relative_to(jobs) or jobs.is_relative_to(cache)):
            # The agent removes job directories it does not know in --jobs-workdir, and the cache evicts entries.
            raise ValueError(
                f"--cache-dir {cache} and --jobs-workdir {jobs} overlap; give the cache a directory of its own, "
                "e.g. /var/cache/radix-inputs"
            )
        return self

    def require_agent_settings(self) -> None:
        """The agent (not `run-job`) needs a control plane to talk to."""
        from .errors import ConfigError

        missing = [f for f in ("api_base", "cluster_id") if getattr(self, f) in (None, "")]
        if missing:
            raise ConfigError(
                "; ".join(f"{flag_name(f)} / {env_name(f)} is required" for f in missing)
                + ": give it on the command line or in the environment"
            )

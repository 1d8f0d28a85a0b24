"""The interface between the job runner and whatever runs containers."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from ..models import FailureReason, GpuInfo

__all__ = ["ContainerSpec", "ContainerState", "Executor", "ExitInfo", "container_name"]


WORKSPACE = "/workspace"  # where every executor mounts the job's workspace, and the job's working directory

# What every executor writes on a job's container (or scheduler job) and a restarted agent reads back.
LABEL_JOB_ID = "radix.job_id"
LABEL_CLUSTER_ID = "radix.cluster_id"
LABEL_AGENT_VERSION = "radix.agent_version"
LABEL_TIMEOUT = "radix.timeout_seconds"  # the deadline the starting agent promised
LABEL_GPU_IDS = "radix.gpu_ids"
# Grace between SIGTERM and SIGKILL when the agent stops a job (timeout, shutdown, cancel).
STOP_GRACE_SECONDS = 10.0


def container_name(cluster_id: str, job_id: str) -> str:
    """`radix-<cluster>-<job>`: unique per engine, so a second container for one job cannot be made by accident."""
    return f"radix-{cluster_id}-{job_id}"[:200]


@dataclass(frozen=True)
class ContainerSpec:
    """Everything needed to start one job's container, already validated and resolved by the runner."""

    name: str
    image: str
    command: list[str]
    env: dict[str, str]
    workspace: Path  # host path, mounted read-write at /workspace and used as working directory
    labels: dict[str, str]
    # Read-only file mounts: (host path, path relative to /workspace); the job's cached inputs.
    read_only_files: list[tuple[Path, str]] = field(default_factory=list)
    gpus: list[GpuInfo] = field(default_factory=list)  # given to this job only; how is the executor's business
    cpus: float | None = None
    memory_mb: int | None = None
    shm_mb: int | None = None
    gpu_job: bool = False  # gets GPUs (here or from a scheduler): unlimited memlock, a 64 MiB stack (hardening.py)
    pids_limit: int | None = None
    cap_drop: list[str] = field(default_factory=list)
    read_only_rootfs: bool = False
    network: str = "bridge"
    # For executors that hand the whole job to a scheduler (Slurm): it picks the GPUs (`gpus` stays empty), pulls
    # the image on the node, and enforces a time limit of its own.
    gpu_count: int = 0
    timeout_seconds: float = 0.0
    pull_policy: str = "if-not-present"
    registry_auth: dict[str, str] | None = None
    # Nodes the job spans, one container each (only an executor backed by a scheduler takes more than one). Each
    # node's container gets NODE_RANK, RANK (no launcher), MASTER_ADDR and MASTER_PORT from the executor.
    nodes: int = 1


@dataclass(frozen=True)
class ContainerState:
    """A job container as the engine reports it (what a restarted agent rebuilds from)."""

    id: str
    status: str  # created, running, exited, ...
    labels: dict[str, str]
    started_at: float | None  # wall-clock epoch seconds; None if it never started
    image: str = ""  # the image it was created from, as the engine reports it
    finished_at: float | None = None  # wall-clock epoch seconds; None while it runs, or when the engine cannot say

    @property
    def running(self) -> bool:
        # "pending": queued by a scheduler; it will run without the agent's help.
        return self.status in ("running", "paused", "restarting", "pending")

    @property
    def job_id(self) -> str | None:
        return self.labels.get(LABEL_JOB_ID)


@dataclass(frozen=True)
class ExitInfo:
    exit_code: int | None
    oom_killed: bool
    error: str = ""
    # The executor's own verdict, when it knows better than the exit code (Slurm: TIMEOUT, NODE_FAIL, PREEMPTED,
    # an image the node could not pull); `error` then says what happened and what to do.
    failure_reason: FailureReason | None = None
    finished_at: float | None = None  # wall-clock epoch seconds of the exit, by the engine's clock, when it says


OutputSink = Callable[[bytes], None]


class Executor(Protocol):
    # Whether a job's container dies when the engine does (dockerd, not a Slurm controller): only then is an
    # unexplained kill signal worth blaming on an engine restart.
    jobs_die_with_engine: bool
    engine_name: str  # for messages: "the Docker engine", "the Slurm controller"
    max_nodes: int  # nodes one job may span (orchestration.nodes): 1 on one host, a scheduler's many

    def ping(self) -> None:
        """Raise EngineUnavailable unless the engine answers."""

    def probe(self, image: str | None, start: bool = False) -> str:
        """The self-test's engine check (node_health.py): raise unless the engine can run a job's container here;
        returns what was checked, for the check's detail."""

    def probe_gpus(self, image: str | None, gpus: list[GpuInfo]) -> dict[str, str]:
        """The self-test's GPU check: each of `gpus` reaches a container from `image` as it would reach a job's.
        Returns uuid -> why for each that does not (node_health.py)."""

    def prepare_image(self, image: str, policy: str = "if-not-present", auth: dict[str, str] | None = None) -> None:
        """Make `image` available locally; JobFailed(image_unavailable) with the engine's reason if it cannot."""

    def start(self, spec: ContainerSpec) -> str:
        """Create and start the container; return its id. Output is captured from the very first byte."""

    def wait_started(self, container_id: str, stop: threading.Event) -> float | None:
        """Block while a scheduler keeps the job queued; return when it started (epoch seconds), or None if it
        ended without running. `stop` set: return at once (the caller is stopping the job)."""

    def stream_output(self, container_id: str, on_stdout: OutputSink, on_stderr: OutputSink) -> None:
        """Feed the container's output, in order, until it ends. Runs on its own thread."""

    def wait(self, container_id: str, timeout: float) -> bool:
        """Wait for the container to exit: True if it did, False if `timeout` seconds passed first."""

    def stop(self, container_id: str, grace: float) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. A container already gone is not an error."""

    def exit_info(self, container_id: str) -> ExitInfo: ...

    def remove(self, container_id: str) -> None:
        """Remove the container; one already gone is not an error."""

    def list_jobs(self, cluster_id: str) -> list[ContainerState]:
        """Every container labelled with this cluster id, in any state. Never others: engines are shared."""

    def inspect(self, container_id: str) -> ContainerState | None:
        """The container's state, None if it does not exist."""

    def start_created(self, container_id: str) -> None:
        """Start a container that was created but never started (the agent died in between)."""

    def replay_output(
        self, container_id: str, on_stdout: OutputSink, on_stderr: OutputSink, *, skip_stdout: int = 0, skip_stderr: int = 0
    ) -> None:
        """Feed the output of a container the agent did not start (or lost): what it printed so far, then, while
        it runs, what it prints next; the first `skip_*` bytes of each stream were seen already."""

"""The one hardening and resource policy of a job's container. Each executor renders it in its engine's terms (the
Docker executor as the SDK's host config, the Slurm batch script as `docker|podman run` flags), so both start the
same container for the same job.

Sources: Docker's "Docker security" and `docker run` reference (no-new-privileges, --init, --read-only, memory
and swap), and the peers' defaults in ../shared/field-notes.md (GitLab Runner's docker executor drops no
capabilities by default; this agent drops what --cap-drop names).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .base import ContainerSpec

__all__ = ["Hardening", "hardening"]

# What NVIDIA's container guidance asks of GPU containers (NGC: `--ulimit memlock=-1 --ulimit stack=67108864`):
# pinned memory and RDMA need unlimited memlock; some CUDA libraries need a 64 MiB stack.
GPU_ULIMITS = (("memlock", -1, -1), ("stack", 67108864, 67108864))
# Programs expect a writable /tmp; with a read-only root filesystem it is a tmpfs of this size.
# noexec said, not left to the engine's default: Docker's is noexec, Podman's is not.
READ_ONLY_TMPFS = {"/tmp": "rw,noexec,nosuid,nodev,size=1g"}


@dataclass(frozen=True)
class Hardening:
    """What every job's container gets. Sizes in MiB, `cpus` in cores; None: no limit."""

    init: bool = True  # reaps the job's zombies and forwards SIGTERM to its main process
    security_opt: tuple[str, ...] = ("no-new-privileges",)
    network: str = "bridge"
    cpus: float | None = None
    memory_mb: int | None = None  # memory and memory+swap alike: no swap, the limit is the limit
    shm_mb: int | None = None
    pids_limit: int | None = None
    cap_drop: tuple[str, ...] = ()
    read_only_rootfs: bool = False
    tmpfs: dict[str, str] = field(default_factory=dict)
    ipc_mode: str = "private"  # never the host's or another container's
    # (name, soft, hard); -1 is unlimited
    ulimits: tuple[tuple[str, int, int], ...] = ()


def hardening(spec: ContainerSpec) -> Hardening:
    return Hardening(
        network=spec.network,
        cpus=spec.cpus or None,
        memory_mb=spec.memory_mb or None,
        shm_mb=spec.shm_mb or None,
        pids_limit=spec.pids_limit or None,
        cap_drop=tuple(spec.cap_drop),
        read_only_rootfs=spec.read_only_rootfs,
        tmpfs=dict(READ_ONLY_TMPFS) if spec.read_only_rootfs else {},
        ulimits=GPU_ULIMITS if spec.gpu_job else (),
    )

"""What a job's container is: its command, environment, labels, limits and GPUs, from the job and the settings.

One function per decision, so that every execution mode starts the same container for the same job (the Docker
executor renders the ContainerSpec through the SDK, the Slurm executor through its batch script).
"""

from __future__ import annotations

import os
from pathlib import Path

from . import __version__
from .executors import (
    LABEL_AGENT_VERSION,
    LABEL_CLUSTER_ID,
    LABEL_GPU_IDS,
    LABEL_JOB_ID,
    LABEL_TIMEOUT,
    ContainerSpec,
    container_name,
)
from .models import GpuInfo, JobSpec
from .settings import Settings

__all__ = ["container_spec", "gpus_for", "torchrun_command"]


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


def container_spec(
    spec: JobSpec,
    settings: Settings,
    *,
    workspace: Path,
    gpus: list[GpuInfo],
    gpu_count: int,
    host_has_gpus: bool,
    timeout: float,
    read_only_files: list[tuple[Path, str]] | None = None,
) -> ContainerSpec:
    """The container for `spec`, given `gpus` (pinned by UUID), with `timeout` seconds (the job's own, or for an
    adopted job the one its labels promise) and `workspace` mounted at /workspace."""
    gpu_ids = [gpu.uuid for gpu in gpus]
    env = dict(spec.env)
    env["RADIX_JOB_ID"] = spec.job_id
    if gpu_ids:
        # Pinned by UUID; overrides an image's NVIDIA_VISIBLE_DEVICES=all (CUDA images set it).
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
    elif host_has_gpus and not gpu_count:
        # On a GPU host, a job without GPUs must not get them through its image's env and the NVIDIA hook.
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
    cluster_id = settings.cluster_id or "local"
    auth = spec.registry_auth.to_engine() if spec.registry_auth else None
    return ContainerSpec(
        name=container_name(cluster_id, spec.job_id),
        image=spec.image,
        command=torchrun_command(spec, gpu_count),
        env=env,
        workspace=workspace,
        read_only_files=list(read_only_files or []),
        labels={
            LABEL_JOB_ID: spec.job_id,
            LABEL_CLUSTER_ID: cluster_id,
            LABEL_AGENT_VERSION: __version__,
            LABEL_TIMEOUT: f"{timeout:g}",
            LABEL_GPU_IDS: ",".join(gpu_ids),
        },
        gpus=list(gpus),
        cpus=spec.resources.cpus,
        memory_mb=spec.resources.memory_mb,
        shm_mb=spec.resources.shm_mb,
        pids_limit=settings.pids_limit or None,
        cap_drop=[c.strip().upper() for c in settings.cap_drop.split(",") if c.strip()],
        read_only_rootfs=settings.read_only_rootfs,
        network=settings.job_network,
        gpu_count=gpu_count,
        timeout_seconds=timeout,
        pull_policy=settings.pull_policy,
        registry_auth=auth,
    )

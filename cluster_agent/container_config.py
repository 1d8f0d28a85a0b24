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

__all__ = ["container_spec", "distributed_env", "gpus_for", "shm_mb_for", "torchrun_command"]


def gpus_for(spec: JobSpec, host_gpus: int, max_concurrent_jobs: int) -> int:
    """How many GPUs a job gets.

    A job that names a count gets exactly that many. One that names none gets every GPU of the host when the
    agent runs one job at a time (Radix behaviour: nothing else could use them), and none when jobs run in
    parallel, so that GPUs stay bookable by the jobs that ask for them. A job that names a MIG profile and no
    count gets one instance of it. `host_gpus` counts full GPUs only: MIG instances go to the jobs that ask for them.
    """
    request = spec.gpu_request
    if request is not None:
        return request
    if spec.resources.gpu_profile is not None:
        return 1
    return host_gpus if max_concurrent_jobs == 1 else 0


# The rendezvous of a single-node job, inside its own network namespace (PyTorch's default port).
MASTER_ADDR = "127.0.0.1"
MASTER_PORT = 29500


def torchrun_command(spec: JobSpec, gpus: int) -> list[str]:
    """`command + args`, wrapped in torchrun when the job asks for it (launcher torchrun): on one node
    `torchrun --standalone --nproc_per_node=<the GPUs it got>` (more than one GPU only); on N nodes one torchrun per
    node, `torchrun --nnodes=N --node_rank=$NODE_RANK --nproc_per_node=<GPUs per node, at least 1>
    --rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT`, through `sh -c` because only the node knows its rank and the first
    node's address (the executor sets them as env). A job that calls torchrun itself (`torchrun ...`,
    `python -m torch.distributed.run ...`) keeps its own flags."""
    command = [*spec.command, *spec.args]
    nodes = spec.orchestration.nodes
    if spec.orchestration.launcher != "torchrun" or (gpus <= 1 and nodes == 1) or not command:
        return command
    if _calls_torchrun(command):
        return command
    if os.path.basename(command[0]).startswith("python"):
        command = command[1:]  # torchrun runs the script with its own interpreter
    if nodes == 1:
        return ["torchrun", "--standalone", "--nnodes=1", f"--nproc_per_node={gpus}", *command]
    # The static rendezvous: node_rank 0 hosts the store at the endpoint (c10d's would pick its host by hostname,
    # which nodes sharing one machine, or one name, cannot tell apart).
    flags = (f'--nnodes={nodes} --node_rank="$NODE_RANK" --nproc_per_node={max(gpus, 1)} --rdzv-backend=static '
             '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"')
    return ["sh", "-c", f'exec torchrun {flags} "$@"', "torchrun", *command]


def _calls_torchrun(command: list[str]) -> bool:
    if os.path.basename(command[0]) == "torchrun":
        return True
    return (os.path.basename(command[0]).startswith("python") and len(command) >= 3 and command[1] == "-m"
            and command[2] in ("torch.distributed.run", "torch.distributed.launch"))


# On the node's network (a multi-node job's), raw sockets and ports below 1024 would be the node's own.
HOST_NETWORK_CAP_DROP = ("NET_RAW", "NET_BIND_SERVICE")


def _cap_drop(settings: Settings, nodes: int) -> list[str]:
    caps = [c.strip().upper() for c in settings.cap_drop.split(",") if c.strip()]
    if nodes > 1:
        caps += [c for c in HOST_NETWORK_CAP_DROP if c not in caps]
    return caps


def distributed_env(spec: JobSpec, gpus: int) -> dict[str, str]:
    """The rendezvous a PyTorch job reads (torch.distributed's env:// init). One node: rank 0, its GPUs as the
    local world. N nodes: the sizes only (NNODES, WORLD_SIZE, LOCAL_WORLD_SIZE; one process per node without a
    launcher, one per GPU with torchrun); NODE_RANK, RANK, MASTER_ADDR and MASTER_PORT differ per node and are
    set there by the executor. torchrun sets RANK/LOCAL_RANK per worker itself; these say where the group meets."""
    nodes = spec.orchestration.nodes
    if nodes > 1:
        per_node = max(gpus, 1) if spec.orchestration.launcher == "torchrun" else 1
        return {"NNODES": str(nodes), "WORLD_SIZE": str(nodes * per_node), "LOCAL_WORLD_SIZE": str(per_node)}
    if gpus < 1:
        return {}
    return {"MASTER_ADDR": MASTER_ADDR, "MASTER_PORT": str(MASTER_PORT), "NNODES": "1", "NODE_RANK": "0",
            "LOCAL_WORLD_SIZE": str(gpus), "WORLD_SIZE": str(gpus if spec.orchestration.launcher == "torchrun" else 1)}


def shm_mb_for(spec: JobSpec, gpus: int, settings: Settings) -> int | None:
    """/dev/shm for the job: its own `resources.shm_mb`; for a GPU job without one, half its memory limit (shm is
    counted in it), else --gpu-shm-mb. Docker's 64 MB default breaks NCCL and DataLoader workers (NVIDIA's
    container guidance and the PyTorch docs ask for a large /dev/shm or --ipc=host; a private IPC namespace keeps
    jobs apart)."""
    if spec.resources.shm_mb:
        return spec.resources.shm_mb
    if gpus < 1:
        return None
    if spec.resources.memory_mb:
        return max(64, spec.resources.memory_mb // 2)
    return settings.gpu_shm_mb


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
    env = {**spec.env, **spec.secret_env}
    env["RADIX_JOB_ID"] = spec.job_id
    if gpu_ids:
        # Pinned by UUID; overrides an image's NVIDIA_VISIBLE_DEVICES=all (CUDA images set it).
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        for name, value in distributed_env(spec, gpu_count).items():
            env.setdefault(name, value)  # a job's own env wins
    elif host_has_gpus and not gpu_count:
        # On a GPU host, a job without GPUs must not get them through its image's env and the NVIDIA hook.
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
    nodes = spec.orchestration.nodes
    if nodes > 1:
        # The agent's own: a job's env must not give the nodes different ideas of the group's size.
        env.update(distributed_env(spec, gpu_count))
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
        shm_mb=shm_mb_for(spec, gpu_count, settings),
        gpu_job=bool(gpu_count),
        pids_limit=settings.pids_limit or None,
        cap_drop=_cap_drop(settings, nodes),
        read_only_rootfs=settings.read_only_rootfs,
        # The ranks meet at the first node's address (and NCCL/Gloo exchange the nodes' own addresses): a bridge's
        # NAT or --job-network none would cut them apart, so a multi-node job's containers use the node's network.
        network="host" if nodes > 1 else settings.job_network,
        nodes=nodes,
        gpu_count=gpu_count,
        timeout_seconds=timeout,
        pull_policy=settings.pull_policy,
        registry_auth=auth,
    )

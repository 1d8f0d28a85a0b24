"""One job as one Slurm batch job: the sbatch arguments and the batch script that runs its container on the node.

The script is plain POSIX sh and runs on whichever node Slurm picks. It pulls the image there (per the pull
policy, with the job's registry credentials in a throw-away config), gives the container only the GPUs Slurm
allocated (SLURM_JOB_GPUS / CUDA_VISIBLE_DEVICES), mounts the job directory at /workspace, and writes
`exit.json` (exit code, OOM flag, or the node-side reason it could not run) into the job's state directory, which
is on the same shared storage as the job directories. On SIGTERM (scancel, the time limit, preemption) it stops
the container with the same grace as the Docker executor, well inside Slurm's KillWait.

A multi-node job (spec.nodes > 1) is one Slurm job of N nodes, one task each: its batch script is launch.sh, which
runs that same per-node script (node.sh in the state directory) on every node with srun. Each node's container gets
NODE_RANK (the task's rank), MASTER_ADDR (the first node's NodeAddr) and MASTER_PORT, prefixes its output lines
with `[node <rank> <name>] `, and writes its own node-<rank>/exit.json; launch.sh stops every node when one fails
and writes the job's exit.json (rank 0's, or the failed node's with its rank).
"""

from __future__ import annotations

import csv
import io
import math
import secrets
import shlex
import string
from pathlib import Path

from ...settings import Settings
from ..base import LABEL_CLUSTER_ID, LABEL_JOB_ID, WORKSPACE, ContainerSpec
from ..hardening import hardening

__all__ = ["batch_script", "cluster_args", "engine_run_args", "node_script", "sbatch_args"]

# A multi-node job's rendezvous port (MASTER_PORT), drawn per job below Linux's ephemeral range (32768-60999).
MASTER_PORT_FIRST = 20000
MASTER_PORT_COUNT = 12000

# Slurm's --time is in minutes: the agent's own timeout (to the second) acts first, Slurm's limit is the backstop
# for when no agent is watching.
TIME_LIMIT_SLACK_SECONDS = 120


def cluster_args(settings: Settings) -> list[str]:
    """Where every job of this agent goes and who pays: the same for jobs, the storage probe and the start-up check."""
    args = [f"{flag}={value}" for flag, value in (("--partition", settings.slurm_partition),
                                                  ("--account", settings.slurm_account), ("--qos", settings.slurm_qos))
            if value]
    return args + shlex.split(settings.slurm_sbatch_args)


def sbatch_args(spec: ContainerSpec, settings: Settings, state_dir: Path) -> list[str]:
    job_id = spec.labels.get(LABEL_JOB_ID, "")
    args = [
        f"--job-name={spec.name}",
        f"--comment=radix job {job_id} of cluster {spec.labels.get(LABEL_CLUSTER_ID, '')}",
        f"--output={state_dir}/stdout.log",
        f"--error={state_dir}/stderr.log",
        f"--chdir={state_dir}",
        "--export=NONE",  # the agent's environment (its token) stays on the login node
        "--no-requeue",  # a node failure ends the job (NODE_FAIL) instead of running it twice
        f"--nodes={spec.nodes}",
        f"--ntasks={spec.nodes}",
    ]
    if spec.nodes > 1:
        # Whole nodes: the ranks' containers use the node's network, where another job on the node could reach
        # (or squat) their rendezvous port.
        args += ["--ntasks-per-node=1", "--exclusive"]
    if spec.timeout_seconds:
        args.append(f"--time={math.ceil((spec.timeout_seconds + TIME_LIMIT_SLACK_SECONDS) / 60)}")
    if spec.gpu_count:
        kind = f"{settings.slurm_gpu_type}:" if settings.slurm_gpu_type else ""
        # A job's GPU count is per node: --gres is; --gpus would be the whole job's.
        if settings.slurm_gpu_flag == "gres":
            args.append(f"--gres=gpu:{kind}{spec.gpu_count}")
        elif spec.nodes > 1:
            args.append(f"--gpus-per-node={kind}{spec.gpu_count}")
        else:
            args.append(f"--gpus={kind}{spec.gpu_count}")
    if spec.cpus:
        args.append(f"--cpus-per-task={math.ceil(spec.cpus)}")
    if spec.memory_mb:
        args.append(f"--mem={spec.memory_mb}M")
    return args + cluster_args(settings)


def engine_run_args(spec: ContainerSpec) -> list[str]:
    """`<engine> run` arguments after --name, the same container the Docker executor would create."""
    policy = hardening(spec)
    args = ["--workdir", WORKSPACE, "--network", policy.network,
            # --mount, not --volume: a missing source is an error, never a directory the engine creates as root.
            "--mount", _mount(spec.workspace, WORKSPACE)]
    for source, target in spec.read_only_files:
        args += ["--mount", _mount(source, f"{WORKSPACE}/{target}", "readonly")]
    if policy.init:
        args.append("--init")
    args += ["--ipc", policy.ipc_mode]
    for name, soft, hard in policy.ulimits:
        args += ["--ulimit", f"{name}={soft}:{hard}"]
    for option in policy.security_opt:
        args += ["--security-opt", option]
    for key, value in sorted(spec.labels.items()):
        args += ["--label", f"{key}={value}"]
    if policy.cpus:
        args += ["--cpus", f"{policy.cpus:g}"]
    if policy.memory_mb:
        args += ["--memory", f"{policy.memory_mb}m", "--memory-swap", f"{policy.memory_mb}m"]
    if policy.shm_mb:
        args += ["--shm-size", f"{policy.shm_mb}m"]
    if policy.pids_limit:
        args += ["--pids-limit", str(policy.pids_limit)]
    for cap in policy.cap_drop:
        args += ["--cap-drop", cap]
    if policy.read_only_rootfs:
        args.append("--read-only")
    for path, options in sorted(policy.tmpfs.items()):
        args += ["--tmpfs", f"{path}:{options}"]
    for name, value in sorted(spec.env.items()):
        args += ["--env", f"{name}={value}"]
    return args


def _mount(source: Path, target: str, *flags: str) -> str:
    """A `--mount` value. The engines parse it as one CSV record, so a field holding a comma or a quote is
    quoted the CSV way (docker's opts/mount.go reads it with encoding/csv)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow(["type=bind", f"source={source}", f"target={target}", *flags])
    return out.getvalue()


class _Template(string.Template):
    # Shell is full of `$`: the template's own placeholders are `@@{name}`.
    delimiter = "@@"


BATCH_TEMPLATE = _Template((Path(__file__).with_name("batch.sh")).read_text())
LAUNCH_TEMPLATE = _Template((Path(__file__).with_name("launch.sh")).read_text())


def batch_script(spec: ContainerSpec, settings: Settings, state_dir: Path, *, grace: float, version: str) -> str:
    """The script sbatch gets: for one node the container's own (batch.sh beside this module); for several,
    launch.sh, which runs `node_script` (written to `state_dir`/node.sh) on each node. Every value shell-quoted."""
    if spec.nodes > 1:
        return LAUNCH_TEMPLATE.substitute(job_id=spec.labels.get(LABEL_JOB_ID, ""), version=version,
                                          state=shlex.quote(str(state_dir)), nodes=spec.nodes,
                                          engine=shlex.quote(settings.slurm_container_engine),
                                          name=shlex.quote(spec.name),
                                          master_port=MASTER_PORT_FIRST + secrets.randbelow(MASTER_PORT_COUNT))
    return node_script(spec, settings, state_dir, grace=grace, version=version)


def node_script(spec: ContainerSpec, settings: Settings, state_dir: Path, *, grace: float, version: str) -> str:
    """The script that runs the job's container on one node (batch.sh), every value shell-quoted."""
    engine = settings.slurm_container_engine
    gpu_mode = settings.gpu_mode if settings.gpu_mode in ("nvidia", "cdi") else ("cdi" if engine == "podman" else "nvidia")
    q = shlex.quote
    return BATCH_TEMPLATE.substitute(
        job_id=spec.labels.get(LABEL_JOB_ID, ""),
        version=version,
        state=q(str(state_dir)),
        engine=q(engine),
        image=q(spec.image),
        policy=q(spec.pull_policy),
        gpus_wanted=spec.gpu_count,
        gpu_mode=gpu_mode,
        name=q(spec.name),
        grace=f"{grace:g}",
        grace_seconds=math.ceil(grace),
        run_args=" ".join(q(a) for a in engine_run_args(spec)),
        image_and_command=" ".join(q(a) for a in [spec.image, *spec.command]),
        nodes=spec.nodes,
        # One process per node (no launcher, or torchrun on one GPU): its global rank is the node's. torchrun
        # gives each of several workers its own.
        rank_env="yes" if spec.env.get("LOCAL_WORLD_SIZE") == "1" else "no",
    )

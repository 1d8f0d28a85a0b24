"""The Slurm cluster as the agent reports and checks it: capabilities for the heartbeat (nodes, GPUs per partition,
idle GPUs), the GPU "pool" the job runner sees in Slurm mode (Slurm hands GPUs out, not the agent), and the
start-up check that the jobs directory is shared with the nodes.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...clock import SYSTEM_CLOCK, Clock
from ...errors import ConfigError, EngineUnavailable, JobFailed, SlurmRefused
from ...models import Capabilities, FailureReason, GpuInfo
from .cli import SlurmCli

__all__ = [
    "ClusterView",
    "PartitionView",
    "SlurmCluster",
    "SlurmGpus",
    "check_shared_storage",
    "describe",
    "filesystem_type",
    "gpu_count",
]

log = logging.getLogger(__name__)

# Filesystems that are one machine's own: a jobs directory on one of them is not seen by other nodes.
LOCAL_FILESYSTEMS = {"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "ramfs", "vfat"}
PROBE_FILE = ".radix-storage-probe"
VERIFIED_FILE = ".radix-slurm/storage-verified"  # delete it after moving the jobs directory


def gpu_count(gres: str) -> int:
    """GPUs in a Slurm gres string: "gpu:4", "gpu:h100:8(S:0-1)", "gpu:a100:2,gpu:h100:4", "gpu:0(IDX:N/A)"."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


@dataclass
class PartitionView:
    name: str
    nodes: int = 0
    cpus: int = 0
    gpus: int = 0
    idle_gpus: int = 0
    max_gpus_per_node: int = 0

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "nodes": self.nodes, "cpus": self.cpus, "gpus": self.gpus,
                "idle_gpus": self.idle_gpus, "max_gpus_per_node": self.max_gpus_per_node}


@dataclass
class ClusterView:
    name: str
    nodes: int
    nodes_up: int
    cpus: int
    memory_gb: float
    gpus: int
    idle_gpus: int
    partitions: list[PartitionView]
    node_hosts: list[str]


def describe(cli: SlurmCli) -> ClusterView:
    records = cli.nodes()
    partitions: dict[str, PartitionView] = {}
    cpus = gpus = idle = up = 0
    memory_mb = 0.0
    hosts = []
    for node in records:
        state = node.get("State", "").upper()
        usable = not any(bad in state for bad in ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "POWERED_DOWN", "UNKNOWN"))
        node_gpus = gpu_count(node.get("Gres", ""))
        node_idle = max(0, node_gpus - gpu_count(node.get("GresUsed", ""))) if usable else 0
        node_cpus = int(node.get("CPUTot", "0") or 0)
        cpus += node_cpus
        memory_mb += float(node.get("RealMemory", "0") or 0)
        gpus += node_gpus
        idle += node_idle
        up += usable
        hosts.append(node.get("NodeHostName") or node.get("NodeName", ""))
        for name in filter(None, node.get("Partitions", "").split(",")):
            part = partitions.setdefault(name, PartitionView(name))
            part.nodes += 1
            part.cpus += node_cpus
            part.gpus += node_gpus
            part.idle_gpus += node_idle
            part.max_gpus_per_node = max(part.max_gpus_per_node, node_gpus)
    return ClusterView(name=cli.cluster_name(), nodes=len(records), nodes_up=up, cpus=cpus,
                       memory_gb=round(memory_mb / 1024, 1), gpus=gpus, idle_gpus=idle,
                       partitions=sorted(partitions.values(), key=lambda p: p.name), node_hosts=hosts)


class SlurmCluster:
    """The cluster's description, refreshed at most every `max_age` seconds (heartbeats and polls both ask)."""

    def __init__(self, cli: SlurmCli, partition: str = "", max_age: float = 10.0, clock: Clock = SYSTEM_CLOCK) -> None:
        self._cli = cli
        self._clock = clock
        self._partition = partition
        self._max_age = max_age
        self._view: ClusterView | None = None
        self._at = 0.0
        self._lock = threading.Lock()

    def view(self) -> ClusterView | None:
        with self._lock:
            if self._view is None or self._clock.monotonic() - self._at >= self._max_age:
                try:
                    self._view = describe(self._cli)
                    self._at = self._clock.monotonic()
                except (EngineUnavailable, SlurmRefused) as exc:
                    log.warning("cannot describe the Slurm cluster: %s", exc)
            return self._view

    def _scope(self, view: ClusterView) -> list[PartitionView]:
        if self._partition:
            return [p for p in view.partitions if p.name == self._partition]
        return view.partitions

    def capabilities(self, **extra: object) -> Capabilities:
        view = self.view()
        if view is None:
            return Capabilities(cpu_count=0, memory_gb=0.0, gpu_count=0, gpus=[], **extra)
        return Capabilities(
            cpu_count=view.cpus, memory_gb=view.memory_gb, gpu_count=view.gpus, gpus=[],
            slurm={"cluster": view.name, "nodes": view.nodes, "nodes_up": view.nodes_up, "idle_gpus": view.idle_gpus,
                   "partition": self._partition or None, "partitions": [p.to_wire() for p in view.partitions]},
            **extra,
        )

    def gpus(self) -> "SlurmGpus":
        return SlurmGpus(self)

    # A node may sit in several partitions: without --slurm-partition the cluster-wide counts, which count each
    # node once, are the answer, never a sum over partitions.
    def total_gpus(self) -> int:
        view = self.view()
        if view is None:
            return 0
        return sum(p.gpus for p in self._scope(view)) if self._partition else view.gpus

    def idle_gpus(self) -> int:
        view = self.view()
        if view is None:
            return 0
        return sum(p.idle_gpus for p in self._scope(view)) if self._partition else view.idle_gpus


class SlurmGpus:
    """What the job runner and agent ask of a GPU pool, answered for a cluster whose GPUs Slurm allocates: the
    agent pins nothing (acquire gives an empty list at once, Slurm queues the job until its GPUs are free)."""

    def __init__(self, cluster: SlurmCluster) -> None:
        self._cluster = cluster

    @property
    def total(self) -> int:
        return self._cluster.total_gpus()

    @property
    def host_gpus(self) -> int:
        return 0  # Slurm allocates them: a job that names no count gets none

    def free_count(self) -> int:
        return self._cluster.idle_gpus()

    def check_request(self, job_id: str, count: int, profile: str | None = None) -> None:
        # sbatch refuses a request no node can meet, with Slurm's own words.
        if profile is not None:
            raise JobFailed(
                FailureReason.INVALID_JOB,
                f"job {job_id} asks for MIG profile {profile}: in Slurm mode Slurm allocates MIG instances as GPU "
                "types (gres.conf AutoDetect=nvml); send the job to a partition of MIG nodes, or set "
                "--slurm-sbatch-args '--gres=gpu:<type>:<count>', and leave gpu_profile out",
            )

    def acquire(self, job_id: str, count: int, cancel: threading.Event,
                profile: str | None = None) -> list[GpuInfo] | None:
        return []

    def claim(self, job_id: str, uuids: list[str]) -> list[GpuInfo]:
        return []

    def release(self, job_id: str) -> None:
        pass

    def usable_gpus(self) -> list[GpuInfo]:
        return []  # on the nodes, Slurm's

    def set_check_failure(self, uuid: str, why: str | None) -> None:
        pass  # never asked: no GPU of this host is handed out

    def lend(self, uuid: str, borrower: str) -> bool:
        return False

    def faults_of(self, job_id: str) -> dict[str, list[str]]:
        return {}  # Slurm's nodes watch their own GPUs (its health check program drains a bad node)


# --- is the jobs directory shared with the nodes? ------------------------------------------------------------


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding `path`, from /proc/self/mountinfo (longest matching mount point)."""
    path = path.resolve()
    best, fstype = "", "unknown"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return fstype
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = fields[4].replace("\\040", " ")
        if (str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")) and len(mount_point) >= len(best):
            best, fstype = mount_point, right.split()[0]
    return fstype


def _is_this_host(name: str) -> bool:
    if name in ("localhost", "127.0.0.1", "::1"):
        return True
    mine = {socket.gethostname(), socket.getfqdn(), socket.gethostname().split(".")[0]}
    return name in mine or name.split(".")[0] in mine


def check_shared_storage(cli: SlurmCli, jobs_workdir: Path, probe_seconds: float, sbatch_args: list[str] = (),
                         clock: Clock = SYSTEM_CLOCK) -> None:
    """Start-up check: nodes must see --jobs-workdir at the same path. A probe job proves it; without one (or when
    the queue is too busy to run it in time) the filesystem type decides. ConfigError names the fix."""
    fstype = filesystem_type(jobs_workdir)
    fix = (f"put --jobs-workdir on storage the nodes mount at the same path (NFS, Lustre, GPFS, CephFS, ...); "
           f"{jobs_workdir} is on {fstype}")
    verified = jobs_workdir / VERIFIED_FILE
    # The proof holds for the cluster whose nodes read it: a directory reused with another (or a rebuilt) cluster
    # is probed again.
    proof = f"cluster={cli.cluster_name()}\n" if probe_seconds > 0 else ""
    if probe_seconds > 0 and _first_line(verified) == proof:
        # A probe proved it before: a restart (which must adopt running jobs promptly) does not queue another one.
        log.info("jobs directory %s was shown shared with the Slurm nodes earlier (%s)", jobs_workdir, verified)
        return
    if probe_seconds > 0:
        verdict = _probe(cli, jobs_workdir, probe_seconds, list(sbatch_args), clock)
        if verdict is True:
            log.info("jobs directory %s is shared with the Slurm nodes (probe job read it)", jobs_workdir)
            verified.parent.mkdir(parents=True, exist_ok=True)
            verified.write_text(f"{proof}probe job read {jobs_workdir} at {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")
            return
        if verdict is False:
            raise ConfigError(f"--jobs-workdir {jobs_workdir}: a probe job on the Slurm nodes could not see it: {fix}")
    remote = [h for h in describe(cli).node_hosts if not _is_this_host(h)]
    if remote and fstype in LOCAL_FILESYSTEMS:
        raise ConfigError(
            f"--jobs-workdir {jobs_workdir} is on a local {fstype} filesystem but Slurm nodes "
            f"({', '.join(remote[:5])}) are other machines: {fix}"
        )
    log.warning("could not prove that the Slurm nodes see %s (filesystem %s); jobs fail with a clear error if not",
                jobs_workdir, fstype)


def _first_line(path: Path) -> str:
    try:
        with path.open() as file:
            return file.readline(256)
    except OSError:
        return ""


def _probe(cli: SlurmCli, jobs_workdir: Path, seconds: float, sbatch_args: list[str], clock: Clock) -> bool | None:
    """True: a job on a node read the token and wrote the answer; False: it ran and could not; None: no answer."""
    token = uuid.uuid4().hex
    probe = jobs_workdir / f"{PROBE_FILE}-{token[:8]}"
    probe.write_text(token)
    answer = probe.with_name(probe.name + ".seen")
    args = ["--job-name=radix-storage-probe", "--export=NONE", "--time=1", "--nodes=1", "--ntasks=1",
            "--output=/dev/null", "--error=/dev/null", "--chdir=/"]
    args += sbatch_args  # the jobs' partition, account and QoS: the probe must land where the jobs will
    script = f"#!/bin/sh\ntoken=$(cat '{probe}') && echo \"$token\" > '{answer}'\n"  # nothing left where it fails
    try:
        slurm_id = cli.submit(args, script)
    except (SlurmRefused, EngineUnavailable) as exc:
        log.warning("storage probe job not submitted: %s", exc)
        probe.unlink(missing_ok=True)
        return None
    try:
        deadline = clock.monotonic() + seconds
        while clock.monotonic() < deadline:
            if answer.exists() and answer.read_text().strip() == token:
                return True
            job = cli.show_job(slurm_id)
            if job is not None and job.terminal:
                clock.sleep(1.0)  # the answer may trail the job's end on network storage
                return answer.exists() and answer.read_text().strip() == token
            clock.sleep(0.5)
        log.warning("storage probe job %s did not run within %.0f s (busy queue?)", slurm_id, seconds)
        return None
    finally:
        try:
            cli.cancel(slurm_id)
        except (SlurmRefused, EngineUnavailable):
            pass
        probe.unlink(missing_ok=True)
        answer.unlink(missing_ok=True)


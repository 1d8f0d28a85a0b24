"""The Slurm mode's factory: check that Slurm answers and would take the agent's jobs, that the nodes see the jobs
directory, and describe the cluster (capabilities, GPUs, disk)."""

from __future__ import annotations

import logging

from ...disk import DiskGuard
from ...errors import ConfigError, EngineUnavailable, SlurmRefused
from ...metrics import Metrics
from ...models import Capabilities
from ...settings import Settings
from ..mode import ExecutionMode
from .cli import SlurmCli
from .cluster import SlurmCluster, check_shared_storage
from .executor import SlurmExecutor
from .script import cluster_args

__all__ = ["connect_slurm", "open_mode"]

log = logging.getLogger(__name__)


def connect_slurm(settings: Settings) -> SlurmExecutor:
    """--execution-mode slurm: the Slurm commands answer, the controller is up, the nodes see the jobs directory."""
    cli = SlurmCli()
    missing = cli.available()
    if missing:
        raise ConfigError(
            f"--execution-mode slurm: {', '.join(missing)} not found on PATH; run the agent on a Slurm login node "
            "(apt-get install slurm-client, with the cluster's slurm.conf and munge key), or use --execution-mode docker"
        )
    args = cluster_args(settings)
    try:
        cli.ping()
        try:
            # Nothing is submitted: Slurm only says whether it would take a job with these settings.
            cli.run("sbatch", "--test-only", "--export=NONE", "--output=/dev/null", *args, "--wrap", "true")
        except SlurmRefused as exc:
            raise ConfigError(
                f"--slurm-partition / --slurm-account / --slurm-qos / --slurm-sbatch-args: Slurm would refuse every job "
                f"({exc}); fix these settings (sinfo and sacctmgr show assoc list what this user may use)"
            ) from None
        check_shared_storage(cli, settings.jobs_workdir, settings.slurm_storage_probe_seconds, args)
    except (EngineUnavailable, SlurmRefused) as exc:
        raise ConfigError(
            f"--execution-mode slurm: {exc}; check that slurmctld runs and that this host's slurm.conf and munge "
            "key match the cluster's (try: scontrol ping)"
        ) from None
    return SlurmExecutor(settings, cli)



def open_mode(settings: Settings, metrics: Metrics | None = None) -> ExecutionMode:
    """Everything the agent or run-job needs in Slurm mode: no engine and no GPUs here, Slurm owns both, and the
    heartbeat describes the cluster instead of this host. Raises ConfigError."""
    executor = connect_slurm(settings)
    cluster = SlurmCluster(executor.cli, settings.slurm_partition)
    disk = DiskGuard(settings.jobs_workdir, None, min_free_gb=settings.min_free_disk_gb, prune_to_free_gb=0,
                     engine_api=None)
    view = cluster.view()
    if view is not None:
        log.info("Slurm cluster %s: %d node(s), %d GPU(s) (%d idle)", view.name or "?", view.nodes, view.gpus,
                 view.idle_gpus)
    extra = {"execution_mode": "slurm", "max_concurrent_jobs": settings.max_concurrent_jobs}

    def report() -> Capabilities:
        return cluster.capabilities(disk=disk.state.to_wire(), **extra)

    return ExecutionMode(executor=executor, gpus=cluster.gpus(), disk=disk, capabilities=report, close=lambda: None)

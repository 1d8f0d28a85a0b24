"""The Slurm execution mode: one sbatch job per Radix job, its container run on the node Slurm picks.

    executor.py   the Executor: submit, watch (squeue/scontrol/sacct), logs from Slurm's output files, scancel
    script.py     the sbatch arguments, and batch.sh (a template) rendered for one job
    cli.py        the Slurm commands as typed calls
    cluster.py    the cluster's capabilities, its GPU accounting, the shared-storage check
    runtime.py    the mode's factory: everything the agent loop needs (see cluster_agent/runtime.py)
"""

from ...errors import SlurmRefused
from .cli import SlurmCli
from .cluster import SlurmCluster
from .executor import SlurmExecutor

__all__ = ["SlurmCli", "SlurmCluster", "SlurmExecutor", "SlurmRefused"]

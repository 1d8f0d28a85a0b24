"""Ways to run a job's container. The job runner talks to `Executor`; each way is one module (docker.py, slurm.py)."""

from .base import ContainerSpec, Executor, ExitInfo

__all__ = ["ContainerSpec", "Executor", "ExitInfo"]

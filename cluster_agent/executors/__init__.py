"""Ways to run a job's container. The job runner talks to `Executor` (base.py); each way is one package
(docker/, slurm/) with a factory that gives the agent loop everything it needs (cluster_agent/runtime.py)."""

from .base import ContainerSpec, ContainerState, Executor, ExitInfo, OutputSink

__all__ = ["ContainerSpec", "ContainerState", "Executor", "ExitInfo", "OutputSink"]

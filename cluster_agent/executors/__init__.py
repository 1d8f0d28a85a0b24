"""Ways to run a job's container. The job runner talks to `Executor` (base.py); each way is one package
(docker/, slurm/) with a factory that gives the agent loop everything it needs (cluster_agent/modes.py)."""

from .base import (
    LABEL_AGENT_VERSION,
    LABEL_CLUSTER_ID,
    LABEL_GPU_IDS,
    LABEL_JOB_ID,
    LABEL_TIMEOUT,
    STOP_GRACE_SECONDS,
    WORKSPACE,
    ContainerSpec,
    ContainerState,
    Executor,
    ExitInfo,
    OutputSink,
    container_name,
)
from .mode import ExecutionMode

__all__ = [
    "LABEL_AGENT_VERSION", "LABEL_CLUSTER_ID", "LABEL_GPU_IDS", "LABEL_JOB_ID", "LABEL_TIMEOUT", "STOP_GRACE_SECONDS",
    "WORKSPACE", "ContainerSpec", "ContainerState", "ExecutionMode", "Executor", "ExitInfo", "OutputSink",
    "container_name",
]

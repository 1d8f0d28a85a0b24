"""What an execution mode gives the agent loop and `run-job`: one object, made by the mode's factory
(`executors/<mode>/mode.py: open_mode`), so neither ever branches on the mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..disk import DiskGuard
from ..gpu_pool import GpuAllocator
from ..models import Capabilities
from .base import Executor

__all__ = ["ExecutionMode"]


@dataclass
class ExecutionMode:
    executor: Executor
    gpus: GpuAllocator  # this host's GPUs, or a scheduler's view of its cluster's
    disk: DiskGuard  # free space of the jobs directory (and the engine's data root, where there is one)
    capabilities: Callable[[], Capabilities]  # what each heartbeat reports
    close: Callable[[], None]  # stop what the mode started (GPU health sampling)
    # The image the self-test may start containers from (node_health.py): one the operator trusts, never a job's.
    self_test_image: str | None = None

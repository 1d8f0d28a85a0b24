"""What this host offers, as the heartbeat reports it."""

from __future__ import annotations

import os

from .models import Capabilities, GpuInfo

__all__ = ["cpu_count", "host_capabilities", "memory_gb"]


def cpu_count() -> int:
    # The CPUs this process may use (cgroup/cpuset aware), not the machine's total.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def memory_gb() -> float:
    return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)


def host_capabilities(gpus: list[GpuInfo], **extra: object) -> Capabilities:
    return Capabilities(cpu_count=cpu_count(), memory_gb=memory_gb(), gpu_count=len(gpus), gpus=gpus, **extra)

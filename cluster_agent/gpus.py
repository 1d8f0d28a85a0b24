"""GPU discovery: NVML first, then `nvidia-smi`, then none. Never raises on a host without NVIDIA parts.

NVML is reached through a module-like object (pynvml itself in production, a fake in tests) so every code path
can be exercised without a GPU. Error classes come from pynvml, which imports fine without a driver.
"""

from __future__ import annotations

import logging
import subprocess
from types import ModuleType
from typing import Any, Callable

import pynvml

from .models import GpuInfo

__all__ = ["detect_gpus", "detect_with_nvidia_smi", "detect_with_nvml"]

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def detect_with_nvml(nvml: ModuleType | Any = pynvml) -> list[GpuInfo]:
    """Raises pynvml.NVMLError when NVML cannot be initialised (no driver, no library)."""
    nvml.nvmlInit()
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                    name=_text(nvml.nvmlDeviceGetName(handle)),
                    memory_total_mb=int(memory.total) // (1024 * 1024),
                )
            )
        return gpus
    finally:
        try:
            nvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def detect_with_nvidia_smi(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> list[GpuInfo]:
    """Raises OSError / CalledProcessError / ValueError when nvidia-smi is missing or says something unexpected."""
    result = run(
        ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    gpus = []
    for line in result.stdout.splitlines():
        if not line.strip():
            continue
        index, uuid, name, memory = (part.strip() for part in line.split(",", 3))
        gpus.append(GpuInfo(index=int(index), uuid=uuid, name=name, memory_total_mb=int(float(memory))))
    return gpus


def detect_gpus(
    nvml: ModuleType | Any = pynvml,
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run,
) -> list[GpuInfo]:
    try:
        gpus = detect_with_nvml(nvml)
        log.info("GPUs through NVML: %d", len(gpus))
        return gpus
    except pynvml.NVMLError as exc:
        log.debug("NVML unavailable (%s); trying nvidia-smi", exc)
    try:
        gpus = detect_with_nvidia_smi(run)
        log.info("GPUs through nvidia-smi: %d", len(gpus))
        return gpus
    except FileNotFoundError:
        log.info("no NVIDIA driver found (no NVML, no nvidia-smi): this host offers no GPUs")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("nvidia-smi did not list GPUs (%s): this host offers no GPUs", exc)
    return []

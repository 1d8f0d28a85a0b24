"""GPU discovery: NVML first, then `nvidia-smi`, then none. Never raises on a host without NVIDIA parts.

NVML is reached through a module-like object (pynvml itself in production, a fake in tests) so every code path
can be exercised without a GPU. Error classes come from pynvml, which imports fine without a driver.
"""

from __future__ import annotations

import logging
import re
import subprocess
from types import ModuleType
from typing import Any, Callable

import pynvml

from .models import GpuInfo

__all__ = ["detect_gpus", "detect_with_nvidia_smi", "detect_with_nvml"]

log = logging.getLogger(__name__)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def detect_with_nvml(nvml: ModuleType | Any = pynvml) -> list[GpuInfo]:
    """The schedulable GPUs: each full GPU, and in place of a GPU in MIG mode its MIG instances (each one a unit of
    its own, `MIG-...` UUID). A GPU NVML cannot read is left out with a warning, never the others with it.
    Raises pynvml.NVMLError when NVML cannot be initialised (no driver, no library) or count its GPUs."""
    nvml.nvmlInit()
    try:
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                gpus.extend(_units_of(nvml, index))
            except pynvml.NVMLError as exc:
                log.warning("GPU %d cannot be read through NVML (%s): left out; `nvidia-smi -q -i %d` says more",
                            index, exc, index)
        return gpus
    finally:
        try:
            nvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass


def _units_of(nvml: Any, index: int) -> list[GpuInfo]:
    """GPU `index` whole, or its MIG instances. Raises pynvml.NVMLError when it cannot be read."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    gpu = GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_mb=int(memory.total) // (1024 * 1024),
        minor_number=_optional(nvml, "nvmlDeviceGetMinorNumber", handle),
    )
    instances = _mig_instances(nvml, handle, gpu)
    if instances is None:
        return [gpu]
    if not instances:
        log.warning("GPU %d (%s) is in MIG mode but has no MIG instances: it offers nothing to jobs; create "
                    "them (`nvidia-smi mig -cgi <profiles> -C`) or turn MIG mode off (`nvidia-smi -i %d -mig 0`)",
                    index, gpu.uuid, index)
    return instances


def _optional(nvml: Any, fn: str, *args: Any) -> Any:
    """A getter that older drivers or bindings may lack: None then."""
    try:
        return getattr(nvml, fn)(*args)
    except (pynvml.NVMLError, AttributeError):
        return None


# NVML names a MIG device after its parent and profile: "NVIDIA A100-SXM4-40GB MIG 1g.5gb".
_MIG_NAME = re.compile(r" MIG (\S+)$")


def _mig_instances(nvml: Any, handle: Any, parent: GpuInfo) -> list[GpuInfo] | None:
    """The MIG instances of a GPU in MIG mode; None when MIG is off or not supported (the GPU is used whole).

    MIG device i is `nvmlDeviceGetMigDeviceHandleByIndex(parent, i)` for i below nvmlDeviceGetMaxMigDeviceCount;
    an empty slot raises NotFound (NVML API reference, "MIG Management")."""
    try:
        mode = nvml.nvmlDeviceGetMigMode(handle)
    except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_FunctionNotFound, AttributeError):
        return None  # a GPU (or driver) without MIG: used whole
    # Any other error propagates: a GPU whose MIG mode is unknown is left out, never handed out whole by mistake.
    if not mode or mode[0] != pynvml.NVML_DEVICE_MIG_ENABLE:
        return None
    instances = []
    for slot in range(int(_optional(nvml, "nvmlDeviceGetMaxMigDeviceCount", handle) or 0)):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError_NotFound:
            continue
        except pynvml.NVMLError as exc:
            log.warning("GPU %d: MIG device %d cannot be read (%s): left out", parent.index, slot, exc)
            continue
        try:
            name = _text(nvml.nvmlDeviceGetName(mig))
            memory_mb = int(nvml.nvmlDeviceGetMemoryInfo(mig).total) // (1024 * 1024)
            uuid = _text(nvml.nvmlDeviceGetUUID(mig))
        except pynvml.NVMLError as exc:
            log.warning("GPU %d: MIG device %d cannot be read (%s): left out", parent.index, slot, exc)
            continue
        instances.append(GpuInfo(
            index=parent.index, uuid=uuid, name=name, memory_total_mb=memory_mb, minor_number=parent.minor_number,
            mig_profile=_mig_profile(nvml, mig, name, memory_mb), parent_uuid=parent.uuid, mig_index=slot,
        ))
    return instances


def _mig_profile(nvml: Any, mig: Any, name: str, memory_mb: int) -> str:
    """The profile as nvidia-smi names it ("1g.10gb"): from the device name, else from its attributes (slices,
    memory rounded up to whole GB, as NVIDIA's go-nvlib derives it)."""
    match = _MIG_NAME.search(name)
    if match:
        return match.group(1)
    attributes = _optional(nvml, "nvmlDeviceGetAttributes", mig)
    slices = getattr(attributes, "gpuInstanceSliceCount", None) if attributes is not None else None
    memory = getattr(attributes, "memorySizeMB", None) if attributes is not None else None
    return f"{slices or '?'}g.{-(-int(memory or memory_mb) // 1024)}gb"


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

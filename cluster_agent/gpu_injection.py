"""How a job's GPUs reach its container. Chosen once at start-up (`--gpu-mode`):

- nvidia: the engine's NVIDIA runtime, through `device_requests` with the GPUs' UUIDs.
- cdi: a CDI spec (`/etc/cdi`, `/var/run/cdi`, as `nvidia-ctk cdi generate` writes it) translated into device
  nodes, bind mounts and environment, which works on engines without CDI support. CDI hooks (ldcache updates,
  symlinks) need a CDI-aware runtime and are not run; LD_LIBRARY_PATH points at the mounted libraries instead.
- none: GPU jobs fail with a message that names the fix.

`auto` picks nvidia when the engine lists that runtime, else cdi when a spec for nvidia.com/gpu is found,
else none.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import yaml

from .errors import ConfigError, JobFailed
from .models import FailureReason, GpuInfo

__all__ = [
    "CdiInjection",
    "GpuAccess",
    "GpuInjection",
    "NoInjection",
    "NvidiaRuntimeInjection",
    "choose_injection",
    "find_cdi_specs",
]

log = logging.getLogger(__name__)

CDI_KIND = "nvidia.com/gpu"
NO_INJECTION_FIX = (
    "this host cannot give GPUs to containers: install the NVIDIA Container Toolkit and run "
    "`nvidia-ctk runtime configure --runtime=docker` (then restart dockerd), or write a CDI spec with "
    "`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`; then restart the agent"
)


@dataclass
class GpuAccess:
    """What a container needs to see its GPUs, in engine-neutral terms."""

    runtime_uuids: list[str] = field(default_factory=list)  # for the NVIDIA runtime (device_requests)
    devices: list[tuple[str, str, str]] = field(default_factory=list)  # (host path, container path, permissions)
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)  # (host path, container path, read-only)
    env: dict[str, str] = field(default_factory=dict)


class GpuInjection(Protocol):
    name: str

    def access(self, gpus: list[GpuInfo]) -> GpuAccess: ...

    def device_nodes(self, gpu: GpuInfo) -> list[str]:
        """The device nodes a container given `gpu` must see (the self-test looks for them): JobFailed when this
        injection cannot give it at all."""


class NvidiaRuntimeInjection:
    name = "nvidia"

    def access(self, gpus: list[GpuInfo]) -> GpuAccess:
        return GpuAccess(runtime_uuids=[gpu.uuid for gpu in gpus])

    def device_nodes(self, gpu: GpuInfo) -> list[str]:
        # The NVIDIA runtime keeps the host's node names; a MIG instance gets its parent's node (and its caps).
        return [gpu.device_node]


class NoInjection:
    name = "none"

    def access(self, gpus: list[GpuInfo]) -> GpuAccess:
        raise JobFailed(FailureReason.AGENT_ERROR, NO_INJECTION_FIX)

    def device_nodes(self, gpu: GpuInfo) -> list[str]:
        raise JobFailed(FailureReason.AGENT_ERROR, NO_INJECTION_FIX)


def _load_spec(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        log.warning("CDI spec %s cannot be read: %s", path, exc)
        return None
    return data if isinstance(data, dict) else None


def find_cdi_specs(dirs: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    specs = []
    for directory in dirs:
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.suffix in (".yaml", ".yml", ".json"):
                spec = _load_spec(path)
                if spec and spec.get("kind") == CDI_KIND:
                    specs.append((path, spec))
    return specs


class CdiInjection:
    name = "cdi"

    def __init__(self, specs: list[tuple[Path, dict[str, Any]]]) -> None:
        if not specs:
            raise ConfigError(f"--gpu-mode cdi: no CDI spec of kind {CDI_KIND} found; {NO_INJECTION_FIX}")
        self._common: list[dict[str, Any]] = []
        self._devices: dict[str, dict[str, Any]] = {}
        for path, spec in specs:
            if isinstance(spec.get("containerEdits"), dict):
                self._common.append(spec["containerEdits"])
            for device in spec.get("devices") or []:
                if isinstance(device, dict) and isinstance(device.get("name"), str):
                    self._devices.setdefault(device["name"], device.get("containerEdits") or {})
        self.sources = [str(path) for path, _ in specs]

    def device_edits(self, gpu: GpuInfo) -> dict[str, Any]:
        # nvidia-ctk names devices by index ("0"; a MIG instance "0:1", GPU:MIG device) or by UUID, depending on
        # --device-name-strategy. A MIG instance never falls back to its parent's name: that is the whole GPU.
        index_name = str(gpu.index) if gpu.mig_index is None else f"{gpu.index}:{gpu.mig_index}"
        for name in (gpu.uuid, index_name):
            if name in self._devices:
                return self._devices[name]
        raise JobFailed(
            FailureReason.AGENT_ERROR,
            f"no CDI device for GPU {gpu.index} ({gpu.uuid}) in {', '.join(self.sources)}; regenerate the spec with "
            "`nvidia-ctk cdi generate` after a driver or hardware change",
        )

    def device_nodes(self, gpu: GpuInfo) -> list[str]:
        # What the spec promises for this GPU; a spec that gives no node at all still owes the GPU's own.
        nodes = [n["path"] for n in self.device_edits(gpu).get("deviceNodes") or [] if isinstance(n, dict) and n.get("path")]
        return nodes or [gpu.device_node]

    def access(self, gpus: list[GpuInfo]) -> GpuAccess:
        access = GpuAccess()
        edits = [self.device_edits(gpu) for gpu in gpus] + self._common
        library_dirs: list[str] = []
        for edit in edits:
            for node in edit.get("deviceNodes") or []:
                path = node.get("path")
                if not path:
                    continue
                host = node.get("hostPath") or path
                entry = (host, path, node.get("permissions") or "rwm")
                if entry not in access.devices:
                    access.devices.append(entry)
            for mount in edit.get("mounts") or []:
                host, target = mount.get("hostPath"), mount.get("containerPath")
                if not host or not target:
                    continue
                options = mount.get("options") or []
                entry = (host, target, "rw" not in options)
                if entry not in access.mounts:
                    access.mounts.append(entry)
                if ".so" in os.path.basename(target):
                    directory = os.path.dirname(target)
                    if directory not in library_dirs:
                        library_dirs.append(directory)
            for item in edit.get("env") or []:
                if isinstance(item, str) and "=" in item:
                    name, value = item.split("=", 1)
                    access.env[name] = value
        if library_dirs:
            existing = access.env.get("LD_LIBRARY_PATH", "")
            access.env["LD_LIBRARY_PATH"] = ":".join([p for p in existing.split(":") if p] + library_dirs)
        access.env["NVIDIA_VISIBLE_DEVICES"] = ",".join(gpu.uuid for gpu in gpus)
        return access


def choose_injection(mode: str, engine_runtimes: dict[str, Any] | list[str], cdi_dirs: list[Path]) -> GpuInjection:
    if mode == "none":
        return NoInjection()
    if mode == "nvidia":
        if "nvidia" not in engine_runtimes:
            log.warning("--gpu-mode nvidia, but the engine lists no nvidia runtime: GPU jobs will fail")
        return NvidiaRuntimeInjection()
    if mode == "cdi":
        return CdiInjection(find_cdi_specs(cdi_dirs))
    if "nvidia" in engine_runtimes:
        return NvidiaRuntimeInjection()
    specs = find_cdi_specs(cdi_dirs)
    if specs:
        return CdiInjection(specs)
    return NoInjection()

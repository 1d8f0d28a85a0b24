"""GPU telemetry and health through NVML, kept open for the agent's life.

Static fields (name, UUID, memory total, power limit, MIG mode, PCI bus) are read once; a sample reads the
changing ones (about a dozen calls of a few microseconds each per GPU). Every getter is wrapped: NotSupported
leaves the field out; GpuIsLost (or any failure to reach the GPU) marks it lost. Current NVML names are tried
first (clock-event reasons, TemperatureV), the older ones where the driver lacks them. Critical XID events are
listened to on a background thread.

Telemetry, health and XID events are per physical GPU. A MIG instance (gpus.py) reports its parent's, and a fault of
the parent holds out every instance on it (NVML answers most getters only for the parent: NVML API reference,
"MIG Management": "the following APIs are not supported on MIG device handles"); only the compute processes are
read per instance, to drain it.
"""

from __future__ import annotations

import logging
import threading
import time
from types import ModuleType
from typing import Any, Callable

import pynvml

from . import gpu_health
from .errors import GpuLost
from .gpu_pool import GpuPool
from .models import GpuInfo

__all__ = ["GpuTelemetry"]

log = logging.getLogger(__name__)

CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
    0x10: "sync_boost", 0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
RECOVERY_ACTIONS = {0: "none", 1: "gpu_reset", 2: "node_reboot", 3: "drain_p2p", 4: "drain_and_reset", 5: "gpu_reset_bus"}


class GpuTelemetry:
    """Samples every GPU; `health` and the GpuPool learn which GPUs must not take new jobs."""

    def __init__(
        self,
        gpus: list[GpuInfo],
        pool: GpuPool,
        *,
        max_temperature: float = 90.0,
        nvml: ModuleType | Any = pynvml,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._gpus = gpus
        self._physical = list(dict.fromkeys(gpu.physical_uuid for gpu in gpus))
        self._pool = pool
        self._nvml = nvml
        self._max_temperature = max_temperature
        self._clock = clock
        self._lock = threading.Lock()
        self._handles: dict[str, Any] = {}  # physical GPU's uuid -> handle
        self._mig_handles: dict[str, Any] = {}  # MIG instance's uuid -> handle
        self._static: dict[str, dict[str, Any]] = {}
        self._xids: dict[str, list[int]] = {uuid: [] for uuid in self._physical}
        self._latest: dict[str, dict[str, Any]] = {}
        self.last_sample_seconds = 0.0
        self._open = False
        self._stop = threading.Event()
        self._xid_thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------------------

    def open(self) -> bool:
        if not self._gpus:
            return False
        try:
            self._nvml.nvmlInit()
        except pynvml.NVMLError as exc:
            log.warning("NVML unavailable (%s): no GPU telemetry or health", exc)
            return False
        self._open = True
        for uuid in self._physical:
            try:
                handle = self._nvml.nvmlDeviceGetHandleByUUID(uuid)
            except pynvml.NVMLError:
                continue  # judged lost at the first sample
            self._handles[uuid] = handle
            self._static[uuid] = self._read_static(handle)
        for gpu in self._gpus:
            if gpu.mig_index is not None and gpu.physical_uuid in self._handles:
                try:
                    self._mig_handles[gpu.uuid] = self._nvml.nvmlDeviceGetMigDeviceHandleByIndex(
                        self._handles[gpu.physical_uuid], gpu.mig_index)
                except pynvml.NVMLError:
                    pass  # drained by its parent's health alone
        return True

    def start(self, interval: float) -> None:
        """Listen to XID events, and sample every `interval` seconds so health reaches the GPU pool promptly."""
        if not self._open:
            return
        if self._handles:
            self._xid_thread = threading.Thread(target=self._listen_xids, name="gpu-xid", daemon=True)
            self._xid_thread.start()
        threading.Thread(target=self._sample_loop, args=(interval,), name="gpu-health", daemon=True).start()

    def _sample_loop(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
                self._pool.check_draining()
            except Exception:  # telemetry must never take the agent down
                log.exception("GPU sample failed")
            # Draining GPUs are looked at every second: the next job waits for them.
            self._stop.wait(min(interval, 1.0) if self._pool.draining() else interval)

    def compute_pids(self, uuid: str) -> list[int] | None:
        """PIDs of the compute processes NVML sees on a GPU or MIG instance; None when it cannot tell (no handle,
        lost)."""
        handle = self._mig_handles.get(uuid) or self._handles.get(uuid)
        if handle is None or not self._open:
            return None
        try:
            processes = self._get("nvmlDeviceGetComputeRunningProcesses", handle)
        except GpuLost:
            return None
        return None if processes is None else [int(p.pid) for p in processes]

    def report(self) -> list[dict[str, Any]]:
        """The heartbeat's `gpus`: static identity plus the latest telemetry and health of each GPU; a MIG instance
        carries its parent's telemetry and health, its own identity, job and hold."""
        latest = self.sample() if self._open else {}
        units = []
        for gpu in self._gpus:
            if gpu.mig_profile is None:
                units.append({**gpu.model_dump(), **latest.get(gpu.uuid, {})})
                continue
            # The parent's telemetry but its own memory: a parent's "used" next to an instance's "total" would mislead.
            parent = {k: v for k, v in latest.get(gpu.physical_uuid, {}).items()
                      if k not in ("processes", "job_id", "memory_used_mb", "memory_reserved_mb")}
            own = self._instance_memory(gpu.uuid)
            if own is not None:
                parent["memory_used_mb"] = int(own.used) // 2**20
            units.append({**parent, **gpu.model_dump(), **self._unit_state(gpu, latest)})
        return units

    def units(self) -> dict[str, dict[str, Any]]:
        """Per unit (full GPU or MIG instance), from the latest sample: `health` and `job_id` (for /metrics)."""
        latest = self.latest()
        return {gpu.uuid: self._unit_state(gpu, latest) for gpu in self._gpus}

    def _unit_state(self, gpu: GpuInfo, latest: dict[str, dict[str, Any]]) -> dict[str, Any]:
        health = dict(latest.get(gpu.physical_uuid, {}).get("health") or {"healthy": True, "reasons": []})
        held = self._pool.held().get(gpu.uuid)
        if held and held not in health.get("reasons", []):
            health = {"healthy": False, "reasons": [*health.get("reasons", []), held]}
        return {"health": health, "job_id": self._pool.owner(gpu.uuid)}

    def _instance_memory(self, uuid: str) -> Any:
        handle = self._mig_handles.get(uuid)
        if handle is None:
            return None
        try:
            return self._get("nvmlDeviceGetMemoryInfo", handle)
        except GpuLost:
            return None

    def close(self) -> None:
        self._stop.set()
        if self._xid_thread is not None:
            self._xid_thread.join(3)
        if self._open:
            try:
                self._nvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass

    # --- reading -------------------------------------------------------------------------------------------

    def _get(self, fn: str, *args: Any) -> Any:
        """One getter; None when not supported. Raises GpuLost when the GPU cannot be reached."""
        try:
            return getattr(self._nvml, fn)(*args)
        except pynvml.NVMLError_NotSupported:
            return None
        except pynvml.NVMLError_GpuIsLost as exc:
            raise GpuLost(str(exc)) from None
        except (pynvml.NVMLError_FunctionNotFound, AttributeError):
            return None
        except pynvml.NVMLError as exc:
            log.debug("NVML %s failed: %s", fn, exc)
            return None

    def _get_first(self, names: list[str], *args: Any) -> Any:
        # Newer name first; the older one where the driver (or binding) lacks it.
        for name in names:
            try:
                return getattr(self._nvml, name)(*args)
            except (pynvml.NVMLError_FunctionNotFound, AttributeError):
                continue
            except pynvml.NVMLError_NotSupported:
                return None
            except pynvml.NVMLError_GpuIsLost as exc:
                raise GpuLost(str(exc)) from None
            except pynvml.NVMLError:
                return None
        return None

    def _read_static(self, handle: Any) -> dict[str, Any]:
        static: dict[str, Any] = {}
        try:
            limit = self._get("nvmlDeviceGetEnforcedPowerLimit", handle)
            if limit is not None:
                static["power_limit_w"] = round(limit / 1000, 1)
            mig = self._get("nvmlDeviceGetMigMode", handle)
            if mig is not None:
                static["mig_mode"] = "enabled" if mig[0] else "disabled"
            pci = self._get("nvmlDeviceGetPciInfo", handle)
            if pci is not None:
                bus = pci.busId
                static["pci_bus_id"] = bus.decode() if isinstance(bus, bytes) else str(bus)
        except GpuLost:
            pass
        return static

    def sample(self) -> dict[str, dict[str, Any]]:
        """Telemetry and health of every GPU, keyed by UUID; updates the pool's view of healthy GPUs."""
        started = self._clock()
        result = {}
        for uuid in self._physical:
            data = self._sample_one(uuid)
            with self._lock:
                xids = list(self._xids.get(uuid, []))
            found = gpu_health.reasons(data, xids, self._max_temperature)
            self._pool.set_unhealthy(uuid, found)
            held = self._pool.held().get(uuid)
            if held:
                found = [*found, held]  # reported, though the pool holds it out for its own reason
            data["health"] = {"healthy": not found, "reasons": found}
            data["job_id"] = self._pool.owner(uuid)
            result[uuid] = data
        self.last_sample_seconds = self._clock() - started
        with self._lock:
            self._latest = result
        return result

    def latest(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._latest)

    def _sample_one(self, uuid: str) -> dict[str, Any]:
        handle = self._handles.get(uuid)
        data: dict[str, Any] = dict(self._static.get(uuid, {}))
        if handle is None or not self._open:
            if self._open:
                data.update(lost=True, lost_detail="no NVML handle for this UUID")
            return data
        try:
            util = self._get("nvmlDeviceGetUtilizationRates", handle)
            if util is not None:
                data["utilization_gpu_pct"], data["utilization_memory_pct"] = util.gpu, util.memory
            memory = self._memory(handle)
            if memory is not None:
                data["memory_used_mb"] = int(memory.used) // 2**20
                data["memory_total_mb"] = int(memory.total) // 2**20
                if getattr(memory, "reserved", None) is not None:
                    data["memory_reserved_mb"] = int(memory.reserved) // 2**20
            temperature = self._get_first(
                ["nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"], handle, pynvml.NVML_TEMPERATURE_GPU
            )
            if temperature is not None:
                data["temperature_c"] = temperature
            power = self._get("nvmlDeviceGetPowerUsage", handle)
            if power is not None:
                data["power_w"] = round(power / 1000, 1)
            ecc = self._get(
                "nvmlDeviceGetTotalEccErrors", handle, pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC
            )
            if ecc is not None:
                data["ecc_volatile_uncorrected"] = int(ecc)
            rows = self._get("nvmlDeviceGetRemappedRows", handle)
            if rows is not None:
                data["remapped_rows_pending"], data["remapped_rows_failed"] = bool(rows[2]), bool(rows[3])
            reasons = self._get_first(
                ["nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"], handle
            )
            if reasons is not None:
                data["clock_event_reasons"] = [name for bit, name in CLOCK_EVENT_REASONS.items() if reasons & bit]
            action = self._recovery_action(handle)
            if action is not None:
                data["recovery_action"] = action
            processes = self._get("nvmlDeviceGetComputeRunningProcesses", handle)
            if processes is not None:
                data["processes"] = [
                    {"pid": p.pid, "used_memory_mb": (p.usedGpuMemory or 0) // 2**20} for p in processes
                ]
        except GpuLost as exc:
            data.update(lost=True, lost_detail=str(exc))
        return data

    def _memory(self, handle: Any) -> Any:
        # v2 keeps the driver's reserved memory out of "used" (as nvidia-smi shows it); v1 counts it as used.
        version = getattr(pynvml, "nvmlMemory_v2", None)
        if version is not None:
            try:
                return self._nvml.nvmlDeviceGetMemoryInfo(handle, version=version)
            except pynvml.NVMLError_GpuIsLost as exc:
                raise GpuLost(str(exc)) from None
            except (pynvml.NVMLError, TypeError):
                pass
        return self._get("nvmlDeviceGetMemoryInfo", handle)

    def _recovery_action(self, handle: Any) -> str | None:
        field = getattr(pynvml, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None)
        if field is None:
            return None
        values = self._get("nvmlDeviceGetFieldValues", handle, [field])
        if not values or values[0].nvmlReturn != pynvml.NVML_SUCCESS:
            return None
        return RECOVERY_ACTIONS.get(int(values[0].value.uiVal), f"unknown({int(values[0].value.uiVal)})")

    # --- XID events ----------------------------------------------------------------------------------------

    def record_xid(self, uuid: str, xid: int) -> None:
        if xid in gpu_health.APPLICATION_XIDS:
            log.info("GPU %s: XID %d (caused by an application; the GPU stays in service)", uuid, xid)
            return
        log.error("GPU %s: critical XID %d: no new job goes to this GPU", uuid, xid)
        with self._lock:
            self._xids.setdefault(uuid, []).append(xid)

    def _listen_xids(self) -> None:
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except pynvml.NVMLError as exc:
            log.info("XID events unavailable: %s", exc)
            return
        by_handle = {}
        for uuid, handle in self._handles.items():
            try:
                nvml.nvmlDeviceRegisterEvents(handle, pynvml.nvmlEventTypeXidCriticalError, event_set)
                by_handle[uuid] = handle
            except pynvml.NVMLError as exc:
                log.info("GPU %s: XID events not supported (%s)", uuid, exc)
        try:
            while by_handle and not self._stop.is_set():
                try:
                    event = nvml.nvmlEventSetWait_v2(event_set, 1000)
                except pynvml.NVMLError_Timeout:
                    continue
                except pynvml.NVMLError as exc:
                    log.warning("XID listener stopped: %s", exc)
                    return
                uuid = self._get("nvmlDeviceGetUUID", event.device)
                uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
                self.record_xid(uuid or "?", int(event.eventData))
        finally:
            try:
                nvml.nvmlEventSetFree(event_set)
            except pynvml.NVMLError:
                pass

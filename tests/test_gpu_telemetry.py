"""Telemetry and health with a fake NVML raising the real pynvml error classes."""

import threading
from types import SimpleNamespace

import pynvml
import pytest

from cluster_agent.gpu_pool import GpuPool
from cluster_agent.gpu_telemetry import GpuTelemetry
from cluster_agent.models import GpuInfo

NOT_SUPPORTED = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
FUNCTION_NOT_FOUND = pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
GPU_IS_LOST = pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)


class FakeNvml:
    """Per-GPU values; a value that is an exception is raised instead."""

    def __init__(self, **gpus):
        self.gpus = gpus  # uuid -> dict of overrides
        self.inits = 0

    def _v(self, handle, key, default):
        value = self.gpus[handle].get(key, default)
        if isinstance(value, Exception):
            raise value
        return value

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if uuid not in self.gpus:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return uuid

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return self._v(h, "power_limit", 700_000)

    def nvmlDeviceGetMigMode(self, h):
        return self._v(h, "mig", (0, 0))

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=b"00000000:1B:00.0")

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._v(h, "util", SimpleNamespace(gpu=42, memory=7))

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        if version is not None:
            if self.gpus[h].get("no_memory_v2"):
                raise FUNCTION_NOT_FOUND
            return SimpleNamespace(used=1024 * 2**20, total=81559 * 2**20, reserved=480 * 2**20)
        return SimpleNamespace(used=1504 * 2**20, total=81559 * 2**20)  # v1 counts reserved as used

    def nvmlDeviceGetTemperatureV(self, h, sensor):
        return self._v(h, "temperature_v", 40)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._v(h, "temperature", 41)

    def nvmlDeviceGetPowerUsage(self, h):
        return self._v(h, "power", 123_400)

    def nvmlDeviceGetTotalEccErrors(self, h, error_type, counter):
        return self._v(h, "ecc", 0)

    def nvmlDeviceGetRemappedRows(self, h):
        return self._v(h, "rows", (0, 0, 0, 0))

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return self._v(h, "clock_events", 0x1 | 0x4)

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, h):
        return self._v(h, "throttle", 0x40)

    def nvmlDeviceGetFieldValues(self, h, fields):
        action = self._v(h, "recovery", 0)
        return [SimpleNamespace(nvmlReturn=pynvml.NVML_SUCCESS, value=SimpleNamespace(uiVal=action))]

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return self._v(h, "processes", [SimpleNamespace(pid=4242, usedGpuMemory=512 * 2**20)])


def gpu(i):
    return GpuInfo(index=i, uuid=f"GPU-{i}", name="fake H100", memory_total_mb=81559)


def telemetry(fake, n=1, max_temperature=90.0):
    gpus = [gpu(i) for i in range(n)]
    pool = GpuPool(gpus)
    t = GpuTelemetry(gpus, pool, max_temperature=max_temperature, nvml=fake)
    assert t.open()
    return t, pool


def test_sample_reports_every_field_and_reads_static_ones_once():
    fake = FakeNvml(**{"GPU-0": {}})
    t, pool = telemetry(fake)
    pool.acquire("job-7", 1, threading.Event())
    s = t.sample()["GPU-0"]
    assert s["utilization_gpu_pct"] == 42 and s["utilization_memory_pct"] == 7
    assert s["memory_used_mb"] == 1024 and s["memory_total_mb"] == 81559 and s["memory_reserved_mb"] == 480
    assert s["temperature_c"] == 40  # TemperatureV first
    assert s["power_w"] == 123.4 and s["power_limit_w"] == 700.0
    assert s["ecc_volatile_uncorrected"] == 0
    assert s["remapped_rows_pending"] is False and s["remapped_rows_failed"] is False
    assert s["clock_event_reasons"] == ["gpu_idle", "sw_power_cap"]
    assert s["recovery_action"] == "none"
    assert s["processes"] == [{"pid": 4242, "used_memory_mb": 512}]
    assert s["mig_mode"] == "disabled" and s["pci_bus_id"] == "00000000:1B:00.0"
    assert s["job_id"] == "job-7"
    assert s["health"] == {"healthy": True, "reasons": []}
    t.sample()
    assert fake.inits == 1  # NVML initialised once and kept open


def test_unsupported_fields_are_left_out_never_a_verdict():
    fake = FakeNvml(**{"GPU-0": {"ecc": NOT_SUPPORTED, "rows": NOT_SUPPORTED, "power": NOT_SUPPORTED,
                                 "recovery": NOT_SUPPORTED, "processes": NOT_SUPPORTED}})
    t, _ = telemetry(fake)
    s = t.sample()["GPU-0"]
    for field in ("ecc_volatile_uncorrected", "remapped_rows_pending", "power_w", "processes"):
        assert field not in s
    assert s["health"]["healthy"] is True


def test_older_drivers_fall_back_to_the_deprecated_names():
    fake = FakeNvml(**{"GPU-0": {"temperature_v": FUNCTION_NOT_FOUND, "clock_events": FUNCTION_NOT_FOUND, "no_memory_v2": True}})
    t, _ = telemetry(fake)
    s = t.sample()["GPU-0"]
    assert s["memory_used_mb"] == 1504
    assert s["temperature_c"] == 41
    assert s["clock_event_reasons"] == ["hw_thermal_slowdown"]


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"util": GPU_IS_LOST}, "lost"),
        ({"recovery": 1}, "recovery action: gpu_reset"),
        ({"recovery": 2}, "recovery action: node_reboot"),
        ({"recovery": 4}, "recovery action: drain_and_reset"),
        ({"ecc": 3}, "3 volatile uncorrected ECC"),
        ({"rows": (0, 0, 0, 1)}, "row remapping failed"),
        ({"rows": (0, 0, 1, 0)}, "row remapping pending"),
        ({"temperature_v": 95}, "temperature 95 C over the limit of 90 C"),
    ],
)
def test_each_health_rule_takes_the_gpu_out_of_scheduling(overrides, reason):
    t, pool = telemetry(FakeNvml(**{"GPU-0": overrides}))
    health = t.sample()["GPU-0"]["health"]
    assert health["healthy"] is False
    assert any(reason in r for r in health["reasons"]), health
    assert pool.free_count() == 0
    cancel = threading.Event()
    cancel.set()
    assert pool.acquire("new-job", 1, cancel) is None  # never given to a new job


def test_a_gpu_whose_handle_cannot_be_had_is_lost():
    gpus = [gpu(0), gpu(1)]
    pool = GpuPool(gpus)
    t = GpuTelemetry(gpus, pool, nvml=FakeNvml(**{"GPU-0": {}}))
    t.open()
    assert t.sample()["GPU-1"]["health"]["healthy"] is False
    assert pool.free_count() == 1


def test_application_xids_are_not_the_gpus_fault_but_critical_ones_are():
    t, pool = telemetry(FakeNvml(**{"GPU-0": {}}))
    for xid in (13, 31, 43, 45, 68, 109):
        t.record_xid("GPU-0", xid)
    assert t.sample()["GPU-0"]["health"]["healthy"] is True
    t.record_xid("GPU-0", 79)  # fallen off the bus
    health = t.sample()["GPU-0"]["health"]
    assert health["healthy"] is False and "critical XID event(s): 79" in health["reasons"][0]
    assert pool.free_count() == 0


def test_a_hot_gpu_comes_back_when_it_cools_down_and_a_waiting_job_gets_it():
    fake = FakeNvml(**{"GPU-0": {"temperature_v": 97}})
    t, pool = telemetry(fake)
    t.sample()
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire("job", 1, threading.Event())))
    waiter.start()
    waiter.join(0.7)
    assert got == []
    fake.gpus["GPU-0"]["temperature_v"] = 60
    t.sample()
    waiter.join(5)
    assert [g.uuid for g in got[0]] == ["GPU-0"]


def test_a_gpu_that_turns_unhealthy_keeps_its_running_job():
    fake = FakeNvml(**{"GPU-0": {}})
    t, pool = telemetry(fake)
    pool.acquire("running", 1, threading.Event())
    fake.gpus["GPU-0"]["ecc"] = 1
    assert t.sample()["GPU-0"]["job_id"] == "running"


def test_no_nvml_means_no_telemetry_and_no_crash():
    class Missing(FakeNvml):
        def nvmlInit(self):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    gpus = [gpu(0)]
    t = GpuTelemetry(gpus, GpuPool(gpus), nvml=Missing(**{"GPU-0": {}}))
    assert t.open() is False
    assert t.report() == [gpu(0).model_dump()]


def test_the_xid_listener_records_critical_events_from_nvml():
    timeout = pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    class Events(FakeNvml):
        def __init__(self, **gpus):
            super().__init__(**gpus)
            self.events = [SimpleNamespace(device="GPU-0", eventData=48), SimpleNamespace(device="GPU-0", eventData=13)]
            self.registered = []

        def nvmlEventSetCreate(self):
            return "set"

        def nvmlDeviceRegisterEvents(self, handle, types, event_set):
            self.registered.append((handle, types))

        def nvmlEventSetWait_v2(self, event_set, timeout_ms):
            if self.events:
                return self.events.pop(0)
            raise timeout

        def nvmlEventSetFree(self, event_set):
            pass

        def nvmlDeviceGetUUID(self, handle):
            return handle

    fake = Events(**{"GPU-0": {}})
    t, pool = telemetry(fake)
    t.start(interval=0.05)
    try:
        health = None
        for _ in range(100):
            health = t.latest().get("GPU-0", {}).get("health")
            if health and not health["healthy"]:
                break
            threading.Event().wait(0.05)
        assert fake.registered == [("GPU-0", pynvml.nvmlEventTypeXidCriticalError)]
        assert health["reasons"] == ["critical XID event(s): 48"]  # 13 is an application's, not the GPU's
        assert pool.free_count() == 0
    finally:
        t.close()


def test_a_leftover_compute_process_holds_the_gpu_out_and_shows_in_its_health():
    from types import SimpleNamespace

    now = [0.0]
    fake = FakeNvml(**{"GPU-0": {"processes": [SimpleNamespace(pid=999, usedGpuMemory=0)]}})
    gpus = [gpu(0)]
    pool = GpuPool(gpus, drain_grace=30, clock=lambda: now[0])
    t = GpuTelemetry(gpus, pool, nvml=fake)
    t.open()
    pool.watch_processes(t.compute_pids)
    assert t.compute_pids("GPU-0") == [999]
    pool.acquire("job-a", 1, threading.Event())
    pool.release("job-a")
    now[0] = 31.0
    pool.check_draining()
    health = t.sample()["GPU-0"]["health"]
    assert health["healthy"] is False and "999" in health["reasons"][0]
    fake.gpus["GPU-0"]["processes"] = []
    pool.check_draining()
    assert t.sample()["GPU-0"]["health"] == {"healthy": True, "reasons": []} and pool.free_count() == 1


def test_compute_pids_of_a_lost_gpu_is_unknown():
    fake = FakeNvml(**{"GPU-0": {"processes": GPU_IS_LOST}})
    gpus = [gpu(0)]
    t = GpuTelemetry(gpus, GpuPool(gpus), nvml=fake)
    t.open()
    assert t.compute_pids("GPU-0") is None

"""MIG (issue 18 part 3) with a fake NVML: instances found and reported, handed out by profile and never shared,
pinned like a full GPU, health from the parent GPU, drained per instance."""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pynvml
import pytest

from cluster_agent.gpu_injection import CdiInjection, NvidiaRuntimeInjection
from cluster_agent.gpu_pool import GpuPool
from cluster_agent.gpu_telemetry import GpuTelemetry
from cluster_agent.gpus import detect_gpus
from cluster_agent.models import FailureReason, GpuInfo, JobStatus
from cluster_agent.received_job import ReceivedJob
from cluster_agent.settings import Settings

from .test_gpu_telemetry import FakeNvml as TelemetryNvml
from .test_job_runner import FakeExecutor, run

NOT_FOUND = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
NOT_SUPPORTED = pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)


class MigNvml:
    """A host as NVML shows it: GPU 0 an A100 in MIG mode with instances in slots 0, 2 and 3 (slot 1 empty);
    GPU 1 an H100 that does not support MIG (a driver that says NotSupported)."""

    def __init__(self, *, instances=None, mig_on=True):
        self.a100 = {"uuid": "GPU-a100", "name": "NVIDIA A100-SXM4-80GB", "mem_mb": 81920, "minor": 4,
                     "mig": (1, 1) if mig_on else (0, 0)}
        self.h100 = {"uuid": "GPU-h100", "name": "NVIDIA H100 80GB HBM3", "mem_mb": 81559, "minor": 0,
                     "mig": NOT_SUPPORTED}
        self.instances = instances if instances is not None else {
            0: {"uuid": "MIG-aaaa-0", "name": "NVIDIA A100-SXM4-80GB MIG 3g.40gb", "mem_mb": 40192},
            2: {"uuid": "MIG-aaaa-2", "name": "NVIDIA A100-SXM4-80GB MIG 1g.10gb", "mem_mb": 9728},
            # An older driver's name without the profile: the attributes say it.
            3: {"uuid": "MIG-aaaa-3", "name": "NVIDIA A100-SXM4-80GB", "mem_mb": 9728,
                "attributes": SimpleNamespace(gpuInstanceSliceCount=1, memorySizeMB=9728)},
        }

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return [self.a100, self.h100][index]

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"].encode()

    def nvmlDeviceGetName(self, h):
        return h["name"]

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=h["mem_mb"] * 2**20)

    def nvmlDeviceGetMinorNumber(self, h):
        return h["minor"]

    def nvmlDeviceGetMigMode(self, h):
        if isinstance(h["mig"], Exception):
            raise h["mig"]
        return h["mig"]

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, slot):
        if slot not in self.instances:
            raise NOT_FOUND
        return self.instances[slot]

    def nvmlDeviceGetAttributes(self, h):
        return h["attributes"]


def _no_smi(*args, **kwargs):
    raise FileNotFoundError("nvidia-smi")


def test_each_mig_instance_is_a_unit_with_its_profile_memory_and_parent():
    units = detect_gpus(MigNvml(), run=_no_smi)
    assert [(u.uuid, u.mig_profile, u.memory_total_mb, u.parent_uuid, u.mig_index, u.index) for u in units] == [
        ("MIG-aaaa-0", "3g.40gb", 40192, "GPU-a100", 0, 0),
        ("MIG-aaaa-2", "1g.10gb", 9728, "GPU-a100", 2, 0),
        ("MIG-aaaa-3", "1g.10gb", 9728, "GPU-a100", 3, 0),
        ("GPU-h100", None, 81559, None, None, 1),  # no MIG: the whole GPU
    ]
    assert all(u.device_node == "/dev/nvidia4" for u in units[:3])  # the parent's node, by its minor number
    assert units[3].device_node == "/dev/nvidia0"
    # The heartbeat's capabilities: MIG fields for instances, none (not null) for a full GPU.
    assert units[1].model_dump() == {"index": 0, "uuid": "MIG-aaaa-2", "name": "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
                                     "memory_total_mb": 9728, "minor_number": 4, "mig_profile": "1g.10gb",
                                     "parent_uuid": "GPU-a100", "mig_index": 2}
    assert set(units[3].model_dump()) == {"index", "uuid", "name", "memory_total_mb", "minor_number"}


def test_a_gpu_with_mig_off_is_one_full_gpu():
    units = detect_gpus(MigNvml(mig_on=False), run=_no_smi)
    assert [(u.uuid, u.mig_profile) for u in units] == [("GPU-a100", None), ("GPU-h100", None)]


def test_mig_mode_with_no_instances_offers_nothing_and_says_how_to_fix_it(caplog):
    with caplog.at_level(logging.WARNING):
        units = detect_gpus(MigNvml(instances={}), run=_no_smi)
    assert [u.uuid for u in units] == ["GPU-h100"]
    assert "MIG mode but has no MIG instances" in caplog.text and "nvidia-smi mig -cgi" in caplog.text


def _units():
    return detect_gpus(MigNvml(), run=_no_smi)


def test_a_job_naming_a_profile_gets_an_instance_of_it_and_never_a_full_gpu():
    pool = GpuPool(_units())
    first = pool.acquire("a", 1, threading.Event(), "1g.10gb")
    second = pool.acquire("b", 1, threading.Event(), "1g.10gb")
    assert {first[0].uuid, second[0].uuid} == {"MIG-aaaa-2", "MIG-aaaa-3"}  # never the same instance twice
    cancel = threading.Event()
    cancel.set()
    assert pool.acquire("c", 1, cancel, "1g.10gb") is None  # both taken: a third waits (here: gives up)
    assert [g.uuid for g in pool.acquire("d", 1, threading.Event())] == ["GPU-h100"]  # full GPUs only
    assert pool.host_gpus == 1  # what a job naming no count may get: the full GPU, not the instances
    pool.release("a")
    assert [g.uuid for g in pool.acquire("e", 1, threading.Event(), "1g.10gb")] == [first[0].uuid]


@pytest.mark.parametrize("count, profile, words", [
    (1, "2g.20gb", "1 MIG instance(s) of profile 2g.20gb but this host has 0"),
    (3, "1g.10gb", "3 MIG instance(s) of profile 1g.10gb but this host has 2"),
    (2, None, "2 GPU(s) but this host has 1"),
])
def test_a_request_the_host_can_never_meet_is_invalid_and_lists_what_it_offers(count, profile, words):
    pool = GpuPool(_units())
    with pytest.raises(Exception) as caught:
        pool.check_request("j", count, profile)
    assert caught.value.reason is FailureReason.INVALID_JOB
    assert words in str(caught.value) and "1 x 3g.40gb, 2 x 1g.10gb, 1 x full" in str(caught.value)


def test_a_fault_of_the_parent_gpu_holds_out_every_instance_on_it():
    pool = GpuPool(_units())
    pool.set_unhealthy("GPU-a100", ["critical XID 79 (fell off the bus)"])
    cancel = threading.Event()
    cancel.set()
    assert pool.acquire("a", 1, cancel, "3g.40gb") is None
    assert [g.uuid for g in pool.acquire("b", 1, threading.Event())] == ["GPU-h100"]  # the other GPU works on
    pool.set_unhealthy("GPU-a100", [])
    assert pool.acquire("c", 1, threading.Event(), "3g.40gb")[0].uuid == "MIG-aaaa-0"


def test_an_instance_that_faults_under_its_job_fails_it_as_gpu_error(tmp_path):
    pool = GpuPool(_units())
    executor = FakeExecutor(run_seconds=0.3)
    threading.Timer(0.1, lambda: pool.set_unhealthy("GPU-a100", ["critical XID 48 (double-bit ECC)"])).start()
    completion = run(Settings(jobs_workdir=tmp_path, cluster_id="c1", max_concurrent_jobs=2), executor, pool,
                     resources={"gpu_profile": "3g.40gb"})
    assert completion.status is JobStatus.FAILED and completion.failure_reason is FailureReason.GPU_ERROR
    assert "MIG-aaaa-0" in completion.error_message


def test_a_job_with_a_profile_is_pinned_to_its_instance_by_uuid(tmp_path):
    executor = FakeExecutor()
    completion = run(Settings(jobs_workdir=tmp_path, cluster_id="c1", max_concurrent_jobs=2), executor,
                     GpuPool(_units()), resources={"gpu_profile": "3g.40gb"})
    assert completion.status is JobStatus.SUCCEEDED, completion.error_message
    spec = executor.specs[0]
    assert [g.uuid for g in spec.gpus] == ["MIG-aaaa-0"]
    assert spec.env["NVIDIA_VISIBLE_DEVICES"] == "MIG-aaaa-0"  # as the NVIDIA runtime takes a MIG device
    assert spec.labels["radix.gpu_ids"] == "MIG-aaaa-0"  # what a restarted agent claims back
    assert completion.metrics.gpu_ids == ["MIG-aaaa-0"]


@pytest.mark.parametrize("profile", ["1g.10gb", "3g.40gb", "1c.3g.40gb", "1g.10gb+me", "7g.80gb"])
def test_profile_names_as_nvidia_smi_lists_them_are_accepted(profile):
    assert ReceivedJob.parse({"job_id": "j", "image": "i", "resources": {"gpu_profile": profile}}).spec is not None


@pytest.mark.parametrize("profile", ["10gb", "1g", "A100-1g.10gb", "1g.10gb; rm -rf /", ""])
def test_a_profile_that_is_not_one_is_an_invalid_job_that_says_what_one_looks_like(profile):
    job = ReceivedJob.parse({"job_id": "j", "image": "i", "resources": {"gpu_profile": profile}})
    assert job.spec is None and "nvidia-smi mig -lgip" in job.problem


def test_the_runtime_and_cdi_pin_an_instance_by_its_own_name_never_its_parent(tmp_path):
    mig = _units()[1]  # MIG-aaaa-2 on GPU 0, slot 2
    assert NvidiaRuntimeInjection().access([mig]).runtime_uuids == ["MIG-aaaa-2"]
    assert NvidiaRuntimeInjection().device_nodes(mig) == ["/dev/nvidia4"]
    spec = {"kind": "nvidia.com/gpu", "devices": [
        {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia4"}]}},
        {"name": "0:2", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia4"},
                                                           {"path": "/dev/nvidia-caps/nvidia-cap30"}]}},
    ]}
    cdi = CdiInjection([(tmp_path / "nvidia.yaml", spec)])
    access = cdi.access([mig])
    assert [target for _, target, _ in access.devices] == ["/dev/nvidia4", "/dev/nvidia-caps/nvidia-cap30"]
    assert access.env["NVIDIA_VISIBLE_DEVICES"] == "MIG-aaaa-2"
    assert cdi.device_nodes(mig) == ["/dev/nvidia4", "/dev/nvidia-caps/nvidia-cap30"]
    # A spec without the instance must not hand out the whole parent GPU ("0") in its place.
    other = _units()[2]  # slot 3: no device "0:3" in the spec
    with pytest.raises(Exception) as caught:
        cdi.access([other])
    assert caught.value.reason is FailureReason.AGENT_ERROR and "nvidia-ctk cdi generate" in str(caught.value)


class MigTelemetryNvml(TelemetryNvml):
    """The telemetry's fake NVML with MIG device handles: an instance answers only for its compute processes."""

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle, slot):
        return f"{handle}/mig{slot}"

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        if "/mig" in h:
            return self.gpus[h.split("/")[0]].get(h, [])
        return super().nvmlDeviceGetComputeRunningProcesses(h)


def test_instances_report_their_parents_health_and_drain_by_their_own_processes():
    units = [GpuInfo(index=0, uuid=f"MIG-{slot}", name="A100 MIG 1g.10gb", memory_total_mb=9728, mig_profile="1g.10gb",
                     parent_uuid="GPU-0", mig_index=slot) for slot in (1, 2)]
    fake = MigTelemetryNvml(**{"GPU-0": {"temperature_v": 95, "GPU-0/mig1": [SimpleNamespace(pid=77, usedGpuMemory=0)]}})
    pool = GpuPool(units)
    t = GpuTelemetry(units, pool, max_temperature=90.0, nvml=fake)
    assert t.open()
    pool.acquire("job-1", 1, threading.Event(), "1g.10gb")
    report = {g["uuid"]: g for g in t.report()}
    assert set(report) == {"MIG-1", "MIG-2"}  # the units, not the parent
    for uuid in ("MIG-1", "MIG-2"):
        assert report[uuid]["health"]["healthy"] is False and "temperature" in report[uuid]["health"]["reasons"][0]
        assert report[uuid]["memory_total_mb"] == 9728 and report[uuid]["parent_uuid"] == "GPU-0"
    assert report["MIG-1"]["job_id"] == "job-1" and report["MIG-2"]["job_id"] is None
    assert set(t.sample()) == {"GPU-0"}  # sampled once, as the physical GPU it is
    assert t.compute_pids("MIG-1") == [77] and t.compute_pids("MIG-2") == []


def test_one_gpu_nvml_cannot_read_is_left_out_and_the_others_keep_their_mig_instances(caplog):
    nvml = MigNvml()
    nvml.h100["mem_mb"] = None  # reading its memory raises below

    original = nvml.nvmlDeviceGetMemoryInfo

    def memory(h):
        if h is nvml.h100:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        return original(h)

    nvml.nvmlDeviceGetMemoryInfo = memory
    with caplog.at_level(logging.WARNING):
        units = detect_gpus(nvml, run=_no_smi)
    assert [u.uuid for u in units] == ["MIG-aaaa-0", "MIG-aaaa-2", "MIG-aaaa-3"]  # not nvidia-smi's view without MIG
    assert "GPU 1 cannot be read through NVML" in caplog.text


def test_a_gpu_whose_mig_mode_cannot_be_read_is_never_handed_out_whole():
    nvml = MigNvml()
    nvml.a100["mig"] = pynvml.NVMLError(pynvml.NVML_ERROR_UNKNOWN)
    assert [u.uuid for u in detect_gpus(nvml, run=_no_smi)] == ["GPU-h100"]


def test_names_that_are_not_utf8_do_not_stop_detection():
    nvml = MigNvml()
    nvml.instances[0]["name"] = b"NVIDIA A100 \xff\xfe MIG 3g.40gb"
    units = detect_gpus(nvml, run=_no_smi)
    assert units[0].mig_profile == "3g.40gb" and "\ufffd" in units[0].name


def test_a_profile_with_no_gpus_asked_for_is_invalid():
    job = ReceivedJob.parse({"job_id": "j", "image": "i", "resources": {"gpu_profile": "1g.10gb", "gpus": 0}})
    assert job.spec is None and "no GPUs asked for" in job.problem


@pytest.mark.parametrize("profile", ["1g.23gb+me.all", "1g.23gb-me", "1g.23gb+gfx", "2g.45gb+gfx"])
def test_blackwell_profile_names_are_accepted(profile):
    assert ReceivedJob.parse({"job_id": "j", "image": "i", "resources": {"gpu_profile": profile}}).spec is not None


def test_metrics_have_a_series_per_mig_instance_and_its_own_memory_in_the_heartbeat():
    from prometheus_client import generate_latest

    from cluster_agent.metrics import Metrics

    units = [GpuInfo(index=0, uuid=f"MIG-{slot}", name="A100 MIG 1g.10gb", memory_total_mb=9728, mig_profile="1g.10gb",
                     parent_uuid="GPU-0", mig_index=slot) for slot in (1, 2)]

    class Fake(MigTelemetryNvml):
        def nvmlDeviceGetMemoryInfo(self, h, version=None):
            if "/mig" in h:
                return SimpleNamespace(used=100 * 2**20, total=9728 * 2**20)
            return super().nvmlDeviceGetMemoryInfo(h, version)

    pool = GpuPool(units)
    t = GpuTelemetry(units, pool, nvml=Fake(**{"GPU-0": {}}))
    assert t.open()
    pool.acquire("job-1", 1, threading.Event(), "1g.10gb")
    pool.set_check_failure("MIG-2", "a container given it through the cdi injection has no /dev/nvidia0")
    t.sample()
    metrics = Metrics()
    metrics.add_gpu_source(t.latest, t.units)
    text = generate_latest(metrics.registry).decode()
    assert 'radix_agent_gpu_in_use{uuid="MIG-1"} 1.0' in text and 'radix_agent_gpu_in_use{uuid="MIG-2"} 0.0' in text
    assert 'radix_agent_gpu_healthy{uuid="MIG-1"} 1.0' in text and 'radix_agent_gpu_healthy{uuid="MIG-2"} 0.0' in text
    assert 'radix_agent_gpu_temperature_celsius{uuid="GPU-0"}' in text  # telemetry stays the physical GPU's
    report = {g["uuid"]: g for g in t.report()}
    assert report["MIG-1"]["memory_used_mb"] == 100 and report["MIG-1"]["memory_total_mb"] == 9728

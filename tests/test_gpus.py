import subprocess
import threading
import time
from types import SimpleNamespace

import pynvml
import pytest

from cluster_agent.errors import JobFailed
from cluster_agent.gpu_pool import GpuPool
from cluster_agent.gpus import detect_gpus
from cluster_agent.models import FailureReason, GpuInfo


class FakeNvml:
    """Stands in for pynvml: same function names, raises the real pynvml error classes."""

    def __init__(self, gpus, init_error=None):
        self._gpus = gpus
        self._init_error = init_error
        self.shutdowns = 0

    def nvmlInit(self):
        if self._init_error:
            raise self._init_error

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return len(self._gpus)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self._gpus[index]

    def nvmlDeviceGetUUID(self, handle):
        return handle["uuid"]

    def nvmlDeviceGetName(self, handle):
        return handle["name"].encode()  # older bindings return bytes

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=handle["mem_mb"] * 1024 * 1024)


H100 = {"uuid": "GPU-aaaa", "name": "NVIDIA H100 80GB HBM3", "mem_mb": 81559}


def _no_smi(*args, **kwargs):
    raise FileNotFoundError("nvidia-smi")


def test_gpus_through_nvml():
    nvml = FakeNvml([H100, {**H100, "uuid": "GPU-bbbb"}])
    gpus = detect_gpus(nvml, run=_no_smi)
    assert [g.uuid for g in gpus] == ["GPU-aaaa", "GPU-bbbb"]
    assert gpus[0] == GpuInfo(index=0, uuid="GPU-aaaa", name="NVIDIA H100 80GB HBM3", memory_total_mb=81559)
    assert nvml.shutdowns == 1


def test_falls_back_to_nvidia_smi_when_nvml_is_missing():
    def smi(cmd, **kwargs):
        assert cmd[0] == "nvidia-smi"
        return subprocess.CompletedProcess(cmd, 0, stdout="0, GPU-cccc, NVIDIA A100-SXM4-40GB, 40960\n", stderr="")

    nvml = FakeNvml([], init_error=pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND))
    assert detect_gpus(nvml, run=smi) == [GpuInfo(index=0, uuid="GPU-cccc", name="NVIDIA A100-SXM4-40GB", memory_total_mb=40960)]


@pytest.mark.parametrize(
    "smi_error",
    [FileNotFoundError("nvidia-smi"), subprocess.CalledProcessError(9, "nvidia-smi"), subprocess.TimeoutExpired("nvidia-smi", 20)],
)
def test_no_gpus_when_neither_answers(smi_error):
    def smi(*args, **kwargs):
        raise smi_error

    nvml = FakeNvml([], init_error=pynvml.NVMLError(pynvml.NVML_ERROR_DRIVER_NOT_LOADED))
    assert detect_gpus(nvml, run=smi) == []


def test_real_pynvml_on_this_host_never_raises():
    assert isinstance(detect_gpus(), list)


def _gpus(n):
    return [GpuInfo(index=i, uuid=f"GPU-{i}", name="fake", memory_total_mb=1000) for i in range(n)]


def test_pool_gives_each_job_its_own_gpus():
    pool = GpuPool(_gpus(4))
    never = threading.Event()
    a = pool.acquire("a", 2, never)
    b = pool.acquire("b", 2, never)
    assert {g.uuid for g in a}.isdisjoint({g.uuid for g in b})
    assert pool.free_count() == 0
    pool.release("a")
    assert pool.free_count() == 2


def test_pool_refuses_more_gpus_than_the_host_has():
    with pytest.raises(JobFailed) as caught:
        GpuPool(_gpus(1)).acquire("a", 2, threading.Event())
    assert caught.value.reason is FailureReason.INVALID_JOB and "has 1" in str(caught.value)


def test_pool_makes_a_job_wait_until_gpus_free_up():
    pool = GpuPool(_gpus(1))
    pool.acquire("a", 1, threading.Event())
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire("b", 1, threading.Event())))
    waiter.start()
    time.sleep(0.2)
    assert got == []  # still waiting: never oversubscribed
    pool.release("a")
    waiter.join(5)
    assert [g.uuid for g in got[0]] == ["GPU-0"]


def test_pool_wait_ends_when_cancelled():
    pool = GpuPool(_gpus(1))
    pool.acquire("a", 1, threading.Event())
    cancel = threading.Event()
    cancel.set()
    assert pool.acquire("b", 1, cancel) is None

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


class Processes:
    """What NVML would list per GPU; a test changes it as processes come and go."""

    def __init__(self):
        self.pids: dict[str, list[int]] = {}

    def __call__(self, uuid):
        return self.pids.get(uuid, [])


def test_a_released_gpu_drains_until_no_compute_process_is_left_on_it():
    now = [0.0]
    processes = Processes()
    pool = GpuPool(_gpus(1), compute_pids=processes, drain_grace=30, clock=lambda: now[0])
    (gpu,) = pool.acquire("job-a", 1, threading.Event())
    processes.pids[gpu.uuid] = [4242]  # a torchrun grandchild outlived its container
    pool.release("job-a")
    assert pool.free_count() == 0 and pool.held() == {}
    now[0] = 31.0
    pool.check_draining()
    assert "4242" in pool.held()[gpu.uuid] and "job-a" in pool.held()[gpu.uuid]
    assert pool.acquire("job-b", 1, _SetEvent()) is None  # never handed out while busy
    processes.pids[gpu.uuid] = []
    pool.check_draining()
    assert pool.held() == {} and pool.free_count() == 1


def test_a_job_waiting_for_a_draining_gpu_gets_it_once_it_is_free():
    processes = Processes()
    pool = GpuPool(_gpus(1), compute_pids=processes)
    (gpu,) = pool.acquire("job-a", 1, threading.Event())
    processes.pids[gpu.uuid] = [7]
    pool.release("job-a")
    got: list = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire("job-b", 1, threading.Event())))
    waiter.start()
    waiter.join(1.0)
    assert waiter.is_alive() and not got
    processes.pids[gpu.uuid] = []
    waiter.join(3.0)
    assert got and got[0][0].uuid == gpu.uuid


def test_without_nvml_a_released_gpu_is_free_at_once():
    pool = GpuPool(_gpus(1))
    pool.acquire("a", 1, threading.Event())
    pool.release("a")
    assert pool.free_count() == 1


class _SetEvent(threading.Event):
    def __init__(self):
        super().__init__()
        self.set()

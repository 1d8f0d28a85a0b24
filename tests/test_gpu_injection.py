import json

import pytest
import yaml

from cluster_agent.errors import ConfigError, JobFailed
from cluster_agent.gpu_injection import CdiInjection, NoInjection, NvidiaRuntimeInjection, choose_injection, find_cdi_specs
from cluster_agent.models import FailureReason, GpuInfo

GPU0 = GpuInfo(index=0, uuid="GPU-aaaa", name="H100", memory_total_mb=81559)
GPU1 = GpuInfo(index=1, uuid="GPU-bbbb", name="H100", memory_total_mb=81559)

# The shape `nvidia-ctk cdi generate` writes (index names), trimmed.
SPEC = {
    "cdiVersion": "0.5.0",
    "kind": "nvidia.com/gpu",
    "devices": [
        {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}},
        {"name": "1", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia1"}]}},
        {"name": "all", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}, {"path": "/dev/nvidia1"}]}},
    ],
    "containerEdits": {
        "env": ["NVIDIA_VISIBLE_DEVICES=void"],
        "deviceNodes": [{"path": "/dev/nvidiactl"}, {"path": "/dev/nvidia-uvm", "hostPath": "/dev/nvidia-uvm"}],
        "hooks": [{"hookName": "createContainer", "path": "/usr/bin/nvidia-cdi-hook", "args": ["update-ldcache"]}],
        "mounts": [
            {"hostPath": "/usr/lib/x86_64-linux-gnu/libcuda.so.580.1", "containerPath": "/usr/lib/x86_64-linux-gnu/libcuda.so.580.1", "options": ["ro", "nosuid", "nodev", "bind"]},
            {"hostPath": "/usr/bin/nvidia-smi", "containerPath": "/usr/bin/nvidia-smi", "options": ["ro", "nosuid", "nodev", "bind"]},
        ],
    },
}


@pytest.fixture
def cdi_dir(tmp_path):
    (tmp_path / "nvidia.yaml").write_text(yaml.safe_dump(SPEC))
    (tmp_path / "other.json").write_text(json.dumps({"kind": "vendor.com/fpga", "devices": []}))
    (tmp_path / "broken.yaml").write_text(":\n  - [unclosed")
    return tmp_path


def test_only_gpu_specs_are_found(cdi_dir):
    specs = find_cdi_specs([cdi_dir, cdi_dir / "missing"])
    assert [p.name for p, _ in specs] == ["nvidia.yaml"]


def test_cdi_translates_one_gpu_into_devices_mounts_and_env(cdi_dir):
    access = CdiInjection(find_cdi_specs([cdi_dir])).access([GPU1])
    assert access.runtime_uuids == []
    assert ("/dev/nvidia1", "/dev/nvidia1", "rwm") in access.devices
    assert ("/dev/nvidia0", "/dev/nvidia0", "rwm") not in access.devices  # only the job's GPU
    assert ("/dev/nvidiactl", "/dev/nvidiactl", "rwm") in access.devices
    assert ("/usr/bin/nvidia-smi", "/usr/bin/nvidia-smi", True) in access.mounts
    assert access.env["LD_LIBRARY_PATH"] == "/usr/lib/x86_64-linux-gnu"
    # The spec's common env says void; the job's pinning wins.
    assert access.env["NVIDIA_VISIBLE_DEVICES"] == "GPU-bbbb"


def test_cdi_devices_named_by_uuid(tmp_path):
    spec = {**SPEC, "devices": [{"name": "GPU-aaaa", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}]}
    (tmp_path / "uuid.json").write_text(json.dumps(spec))
    access = CdiInjection(find_cdi_specs([tmp_path])).access([GPU0])
    assert ("/dev/nvidia0", "/dev/nvidia0", "rwm") in access.devices


def test_cdi_without_a_device_for_the_gpu_names_the_fix(cdi_dir):
    gpu = GpuInfo(index=7, uuid="GPU-zzzz", name="H100", memory_total_mb=1)
    with pytest.raises(JobFailed, match="nvidia-ctk cdi generate"):
        CdiInjection(find_cdi_specs([cdi_dir])).access([gpu])


def test_no_injection_fails_gpu_jobs_with_the_fix():
    with pytest.raises(JobFailed) as caught:
        NoInjection().access([GPU0])
    assert caught.value.reason is FailureReason.AGENT_ERROR
    assert "nvidia-ctk runtime configure" in str(caught.value) and "cdi generate" in str(caught.value)


def test_auto_prefers_the_nvidia_runtime(cdi_dir):
    assert isinstance(choose_injection("auto", {"nvidia": {}, "runc": {}}, [cdi_dir]), NvidiaRuntimeInjection)
    assert isinstance(choose_injection("auto", {"runc": {}}, [cdi_dir]), CdiInjection)
    assert isinstance(choose_injection("auto", {"runc": {}}, [cdi_dir / "none"]), NoInjection)
    assert isinstance(choose_injection("none", {"nvidia": {}}, [cdi_dir]), NoInjection)


def test_cdi_mode_without_a_spec_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="--gpu-mode cdi"):
        choose_injection("cdi", {}, [tmp_path])

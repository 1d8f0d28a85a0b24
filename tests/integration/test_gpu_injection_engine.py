"""The CDI translation against the real engine, with ordinary device nodes standing in for GPUs."""


import yaml

from cluster_agent.executors import ContainerSpec
from cluster_agent.executors.docker import DockerExecutor
from cluster_agent.gpu_injection import CdiInjection, NoInjection, find_cdi_specs
from cluster_agent.models import GpuInfo
from devplane.images import BUSYBOX_IMAGE


GPU0 = GpuInfo(index=0, uuid="GPU-fake-0", name="fake", memory_total_mb=1)


def _run(executor, spec):
    out, err = [], []
    container_id = executor.start(spec)
    try:
        executor.stream_output(container_id, out.append, err.append)
        assert executor.wait(container_id, 30)
        return b"".join(out).decode(), b"".join(err).decode(), executor.exit_info(container_id)
    finally:
        executor.remove(container_id)


def test_cdi_spec_becomes_devices_mounts_and_env_in_a_real_container(docker_client, busybox, tmp_path, cluster_id):
    driver = tmp_path / "driver"
    driver.mkdir()
    (driver / "libcuda.so.1").write_text("fake driver library\n")
    spec = {
        "cdiVersion": "0.5.0",
        "kind": "nvidia.com/gpu",
        "devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": "/dev/zero"}]}}],
        "containerEdits": {
            "deviceNodes": [{"path": "/dev/nvidiactl", "hostPath": "/dev/null"}],
            "mounts": [{"hostPath": str(driver / "libcuda.so.1"), "containerPath": "/usr/lib/nvidia/libcuda.so.1", "options": ["ro", "bind"]}],
            "env": ["CUDA_HOME=/usr/local/cuda"],
        },
    }
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text(yaml.safe_dump(spec))
    executor = DockerExecutor(docker_client, gpu_injection=CdiInjection(find_cdi_specs([cdi])))
    workspace = tmp_path / "ws"
    workspace.mkdir()
    script = (
        "head -c 4 /dev/nvidia0 | od -An -tx1; ls -l /dev/nvidiactl; cat /usr/lib/nvidia/libcuda.so.1; "
        "echo \"$LD_LIBRARY_PATH|$NVIDIA_VISIBLE_DEVICES|$CUDA_HOME\"; echo x > /usr/lib/nvidia/libcuda.so.1 || echo read-only"
    )
    out, err, info = _run(executor, ContainerSpec(
        name=f"radix-{cluster_id}-cdi", image=BUSYBOX_IMAGE, command=["sh", "-c", script],
        env={"NVIDIA_VISIBLE_DEVICES": "GPU-fake-0"}, workspace=workspace,
        labels={"radix.cluster_id": cluster_id, "radix.job_id": "cdi"}, gpus=[GPU0],
    ))
    assert info.exit_code == 0, err
    assert "00 00 00 00" in out  # /dev/zero behind /dev/nvidia0
    assert "/dev/nvidiactl" in out and out.split("/dev/nvidiactl")[0].strip().splitlines()[-1].startswith("c")
    assert "fake driver library" in out
    assert "/usr/lib/nvidia|GPU-fake-0|/usr/local/cuda" in out
    assert "read-only" in out


def test_no_injection_refuses_a_gpu_container(docker_client, busybox, tmp_path, cluster_id):
    executor = DockerExecutor(docker_client, gpu_injection=NoInjection())
    try:
        executor.start(ContainerSpec(
            name=f"radix-{cluster_id}-none", image=BUSYBOX_IMAGE, command=["true"], env={}, workspace=tmp_path,
            labels={"radix.cluster_id": cluster_id}, gpus=[GPU0],
        ))
    except Exception as exc:  # noqa: BLE001
        assert "nvidia-ctk" in str(exc)
    else:
        raise AssertionError("a GPU container started without any way to inject GPUs")
    assert docker_client.containers.list(all=True, filters={"label": f"radix.cluster_id={cluster_id}"}) == []


def test_nvidia_runtime_strategy_on_an_engine_without_it_names_the_fix(docker_client, busybox, tmp_path, cluster_id):
    from cluster_agent.errors import JobFailed
    from cluster_agent.gpu_injection import NvidiaRuntimeInjection
    from cluster_agent.models import FailureReason

    executor = DockerExecutor(docker_client, gpu_injection=NvidiaRuntimeInjection())
    assert "nvidia" not in (docker_client.info().get("Runtimes") or {}), "this test needs an engine without the NVIDIA runtime"
    try:
        executor.start(ContainerSpec(
            name=f"radix-{cluster_id}-nv", image=BUSYBOX_IMAGE, command=["true"], env={}, workspace=tmp_path,
            labels={"radix.cluster_id": cluster_id}, gpus=[GPU0],
        ))
    except JobFailed as exc:
        assert exc.reason is FailureReason.AGENT_ERROR
        assert "could not select device driver" in str(exc) and "nvidia-ctk runtime configure" in str(exc)
    else:
        raise AssertionError("device_requests should fail on an engine without the NVIDIA runtime")
    assert docker_client.containers.list(all=True, filters={"label": f"radix.cluster_id={cluster_id}"}) == []

"""The CDI translation against the real engine, with ordinary device nodes standing in for GPUs."""


import os

import pytest
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


@pytest.mark.engine
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
    executor.identify()  # as the mode does: Docker or Podman
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


@pytest.mark.engine
def test_no_injection_refuses_a_gpu_container(docker_client, busybox, tmp_path, cluster_id):
    executor = DockerExecutor(docker_client, gpu_injection=NoInjection())
    executor.identify()  # as the mode does: Docker or Podman
    try:
        executor.start(ContainerSpec(
            name=f"radix-{cluster_id}-none", image=BUSYBOX_IMAGE, command=["true"], env={}, workspace=tmp_path,
            labels={"radix.cluster_id": cluster_id}, gpus=[GPU0],
        ))
    except Exception as exc:  # noqa: BLE001
        assert "nvidia-ctk" in str(exc)
    else:
        raise AssertionError("a GPU container started without any way to inject GPUs")
    assert docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.cluster_id={cluster_id}"}) == []


def test_nvidia_runtime_strategy_on_an_engine_without_it_names_the_fix(docker_client, busybox, tmp_path, cluster_id):
    from cluster_agent.errors import JobFailed
    from cluster_agent.gpu_injection import NvidiaRuntimeInjection
    from cluster_agent.models import FailureReason

    executor = DockerExecutor(docker_client, gpu_injection=NvidiaRuntimeInjection())

    executor.identify()  # as the mode does: Docker or Podman
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
    assert docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.cluster_id={cluster_id}"}) == []


def test_a_gpu_job_gets_a_large_shm_unlimited_memlock_a_64_mib_stack_and_private_ipc(docker_client, busybox,
                                                                                         tmp_path, cluster_id):
    # The job's container as the job runner makes it (container_config.py), on a fake GPU from a CDI spec.
    from cluster_agent.container_config import container_spec
    from cluster_agent.models import JobSpec
    from cluster_agent.settings import Settings

    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text(yaml.safe_dump({
        "cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
        "devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": "/dev/zero"}]}}],
    }))
    executor = DockerExecutor(docker_client, gpu_injection=CdiInjection(find_cdi_specs([cdi])))
    executor.identify()  # as the mode does: Docker or Podman
    workspace = tmp_path / "ws"
    workspace.mkdir()
    script = ("grep -E 'Max locked memory|Max stack size' /proc/self/limits; df -k /dev/shm | tail -1; "
              "readlink /proc/self/ns/ipc; echo \"$MASTER_ADDR:$MASTER_PORT $LOCAL_WORLD_SIZE\"")
    job = JobSpec.model_validate({"job_id": "limits", "image": BUSYBOX_IMAGE, "command": ["sh", "-c", script],
                                  "resources": {"gpus": 1, "memory_mb": 2048}})
    spec = container_spec(job, Settings(cluster_id=cluster_id), workspace=workspace, gpus=[GPU0], gpu_count=1,
                          host_has_gpus=True, timeout=60)
    out, err, info = _run(executor, spec)
    assert info.exit_code == 0, err
    limits = {line.split("  ")[0]: line.split()[-3:-1] for line in out.splitlines() if line.startswith("Max")}
    assert limits["Max stack size"] == ["67108864", "67108864"]
    if _has_cap_sys_resource():
        assert limits["Max locked memory"] == ["unlimited", "unlimited"]
    else:  # an engine without CAP_SYS_RESOURCE (these sandboxes) cannot raise it: the container still runs
        assert limits["Max locked memory"] != ["unlimited", "unlimited"]
    shm_kb = int(next(line for line in out.splitlines() if "/dev/shm" in line).split()[1])
    assert shm_kb == 1024 * 1024  # half of its 2048 MiB memory limit, not Docker's 64 MB
    assert os.readlink("/proc/self/ns/ipc") not in out  # its own IPC namespace, not the host's
    assert "127.0.0.1:29500 1" in out


def _has_cap_sys_resource() -> bool:
    """Whether this process (root, as the engine) may raise hard limits: CAP_SYS_RESOURCE is capability 24."""
    effective = next(line for line in open("/proc/self/status") if line.startswith("CapEff:"))
    return bool(int(effective.split()[1], 16) >> 24 & 1)


def _cdi(tmp_path, devices):
    cdi = tmp_path / "cdi"
    cdi.mkdir(exist_ok=True)
    (cdi / "nvidia.yaml").write_text(yaml.safe_dump({"cdiVersion": "0.5.0", "kind": "nvidia.com/gpu", "devices": devices}))
    return CdiInjection(find_cdi_specs([cdi]))


GPU1 = GpuInfo(index=1, uuid="GPU-fake-1", name="fake", memory_total_mb=1)


def test_the_self_test_finds_a_gpu_whose_injection_gives_the_container_no_device_node(docker_client, busybox, tmp_path,
                                                                                    monkeypatch):
    # GPU 0's CDI device gives its node; GPU 1's gives none (a stale spec, a broken hook): the self-test's container,
    # made the way a job's is, sees that, and the node holds GPU 1 out alone.
    from cluster_agent.gpu_pool import GpuPool
    from cluster_agent.node_health import NodeHealth
    from cluster_agent.settings import Settings

    executor = DockerExecutor(docker_client, gpu_injection=_cdi(tmp_path, [
        {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": "/dev/zero"}]}},
        {"name": "1", "containerEdits": {"env": ["SOMETHING=1"]}},
    ]))
    assert executor.probe_gpus(BUSYBOX_IMAGE, [GPU0, GPU1]) == {
        "GPU-fake-1": "a container given it through the cdi injection has no /dev/nvidia1"}
    assert executor.probe_gpus(None, [GPU0, GPU1]) == {}  # no image on this host yet: nothing to run

    monkeypatch.setattr("cluster_agent.node_health.device_present", lambda path: True)  # the host's side is fine
    pool = GpuPool([GPU0, GPU1])
    node = NodeHealth(Settings(jobs_workdir=tmp_path), probe_image=BUSYBOX_IMAGE, engine_probe=executor.probe,
                      gpus=pool, token_rejected=lambda: False, gpu_probe=executor.probe_gpus,
                     )
    checks = {c.name: c for c in node.self_test()}
    assert all(c.ok for c in checks.values()), checks
    assert not node.quarantined and list(pool.held()) == ["GPU-fake-1"]
    assert [g.uuid for g in pool.acquire("j", 1, __import__("threading").Event())] == ["GPU-fake-0"]
    left = docker_client.containers.list(all=True, sparse=True, filters={"label": "radix.self_test=1"})
    assert left == []  # every probe container removed


def test_the_gpu_self_test_names_the_injection_that_cannot_work(docker_client, busybox, tmp_path):
    # Neither the NVIDIA runtime (absent from this engine) nor no injection at all can give a container a GPU.
    from cluster_agent.gpu_injection import NvidiaRuntimeInjection

    failures = DockerExecutor(docker_client, gpu_injection=NvidiaRuntimeInjection()).probe_gpus(BUSYBOX_IMAGE, [GPU0])
    assert "did not start" in failures["GPU-fake-0"] or "could not be made" in failures["GPU-fake-0"]
    assert "could not select device driver" in failures["GPU-fake-0"]
    failures = DockerExecutor(docker_client, gpu_injection=NoInjection()).probe_gpus(BUSYBOX_IMAGE, [GPU0])
    assert "nvidia-ctk" in failures["GPU-fake-0"]


def test_an_image_without_a_shell_cannot_look_and_holds_nothing_out(docker_client, busybox, tmp_path, caplog):
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    image = "radix-test/no-shell:1"
    docker_client.api.import_image_from_data(buffer.getvalue(), repository="radix-test/no-shell", tag="1")
    executor = DockerExecutor(docker_client, gpu_injection=_cdi(tmp_path, [
        {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": "/dev/zero"}]}}]))
    DockerExecutor._said_no_shell = False
    with caplog.at_level("WARNING"):
        assert executor.probe_gpus(image, [GPU0]) == {}
    assert "has no sh" in caplog.text and "--self-test-image" in caplog.text


def test_a_mig_instance_reaches_its_container_by_its_own_cdi_device(docker_client, busybox, tmp_path, cluster_id):
    # nvidia-ctk names MIG devices "<gpu>:<mig>" and gives the parent's node plus the instance's capability nodes.
    mig = GpuInfo(index=0, uuid="MIG-fake-0-2", name="fake MIG 1g.10gb", memory_total_mb=1, minor_number=0,
                  mig_profile="1g.10gb", parent_uuid="GPU-fake-0", mig_index=2)
    executor = DockerExecutor(docker_client, gpu_injection=_cdi(tmp_path, [
        {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": "/dev/zero"}]}},
        {"name": "0:2", "containerEdits": {"deviceNodes": [
            {"path": "/dev/nvidia0", "hostPath": "/dev/zero"},
            {"path": "/dev/nvidia-caps/nvidia-cap21", "hostPath": "/dev/null"}]}},
    ]))
    assert executor.probe_gpus(BUSYBOX_IMAGE, [mig]) == {}
    workspace = tmp_path / "ws"
    workspace.mkdir()
    out, err, info = _run(executor, ContainerSpec(
        name=f"radix-{cluster_id}-mig", image=BUSYBOX_IMAGE,
        command=["sh", "-c", "ls /dev/nvidia-caps; echo \"$NVIDIA_VISIBLE_DEVICES\""], env={}, workspace=workspace,
        labels={"radix.cluster_id": cluster_id, "radix.job_id": "mig"}, gpus=[mig],
    ))
    assert info.exit_code == 0, err
    assert "nvidia-cap21" in out and "MIG-fake-0-2" in out


def test_self_test_containers_left_by_a_killed_agent_are_swept(docker_client, busybox, tmp_path):
    import time

    from cluster_agent.clock import Clock

    import uuid

    from cluster_agent.executors.docker.executor import SELF_TEST_LABELS

    left = docker_client.api.create_container(BUSYBOX_IMAGE, command=["sleep", "600"], labels=SELF_TEST_LABELS,
                                              name=f"radix-self-test-{uuid.uuid4().hex[:12]}")
    docker_client.api.start(left["Id"])  # a probe that was running when its agent was killed
    fresh = DockerExecutor(docker_client, gpu_injection=NoInjection())
    fresh.probe(BUSYBOX_IMAGE)
    assert docker_client.api.inspect_container(left["Id"])  # minutes old at most: maybe another agent's, kept
    later = DockerExecutor(docker_client, gpu_injection=NoInjection(), clock=Clock(wall=lambda: time.time() + 700))
    later.probe_gpus(BUSYBOX_IMAGE, [GPU0])
    assert docker_client.containers.list(all=True, sparse=True, filters={"label": "radix.self_test=1"}) == []


def _image_from_busybox(docker_client, tag, lines):
    import io

    dockerfile = f"FROM {BUSYBOX_IMAGE}\n" + "\n".join(lines) + "\n"
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True, forcerm=True)
    return tag


def test_labels_and_volumes_of_a_hostile_image_do_not_reach_the_agents_books(docker_client, busybox, tmp_path, cluster_id):
    # An image that names itself a self-test container and another cluster's job, with a VOLUME.
    image = _image_from_busybox(docker_client, "radix-test/label-forger:1", [
        'LABEL radix.self_test="1" radix.cluster_id="' + cluster_id + '" radix.job_id="victim" radix.gpu_ids="GPU-fake-0"',
        "VOLUME /data",
    ])
    volumes_before = {v.id for v in docker_client.volumes.list()}
    executor = DockerExecutor(docker_client, gpu_injection=_cdi(tmp_path, [
        {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "hostPath": "/dev/zero"}]}}]))
    executor.probe(image)
    assert executor.probe_gpus(image, [GPU0]) == {}
    assert {v.id for v in docker_client.volumes.list()} == volumes_before  # the probes' volumes went with them
    # A job container from it is a job (its labels are the agent's), never taken for a self-test's, and swept by none.
    workspace = tmp_path / "ws"
    workspace.mkdir()
    job = executor.start(ContainerSpec(
        name=f"radix-{cluster_id}-forger", image=image, command=["sleep", "30"], env={}, workspace=workspace,
        labels={"radix.cluster_id": cluster_id, "radix.job_id": "real-job"},
    ))
    try:
        labels = docker_client.api.inspect_container(job)["Config"]["Labels"]
        assert labels["radix.self_test"] == "" and labels["radix.job_id"] == "real-job"
        assert [s.job_id for s in executor.list_jobs(cluster_id)] == ["real-job"]
        import time

        from cluster_agent.clock import Clock
        later = DockerExecutor(docker_client, gpu_injection=NoInjection(), clock=Clock(wall=lambda: time.time() + 700))
        later.probe(image)
        assert docker_client.api.inspect_container(job)["State"]["Running"]  # the sweep spared the job
    finally:
        executor.stop(job, 1)
        executor.remove(job)


def test_a_self_test_image_that_is_not_on_the_host_names_the_setting(docker_client, busybox):
    from cluster_agent.errors import ProbeImageMissing

    for start in (True, False):  # the trusted image, or the last job's (which node_health then forgets)
        try:
            DockerExecutor(docker_client, gpu_injection=NoInjection()).probe("radix-test/no-such-image:1", start)
        except ProbeImageMissing as exc:
            assert "not on this host" in str(exc)
            assert ("--self-test-image" in str(exc)) == start
        else:
            raise AssertionError("a missing self-test image passed the engine check")


def test_the_engine_check_creates_no_container_from_a_jobs_image_that_declares_volumes(docker_client, busybox):
    """Creating one copies each VOLUME's data into a new volume: a job's image would set the idle node's disk I/O."""
    image = _image_from_busybox(docker_client, "radix-test/volume-heavy:1", ["VOLUME /data"])
    created = []
    real_create = docker_client.api.create_container
    docker_client.api.create_container = lambda *a, **k: created.append(a) or real_create(*a, **k)
    try:
        detail = DockerExecutor(docker_client, gpu_injection=NoInjection()).probe(image)
        assert created == [] and detail == f"answers (no container created from {image}: it declares a VOLUME)"
        detail = DockerExecutor(docker_client, gpu_injection=NoInjection()).probe(BUSYBOX_IMAGE)  # no VOLUME: created
        assert len(created) == 1 and detail == f"created and removed a container from {BUSYBOX_IMAGE}"
    finally:
        docker_client.api.create_container = real_create


def test_the_engine_check_runs_a_container_from_a_trusted_image_and_only_creates_from_others(docker_client, busybox):
    from cluster_agent.errors import AgentError

    executor = DockerExecutor(docker_client, gpu_injection=NoInjection())
    started = []
    real_start = docker_client.api.start
    docker_client.api.start = lambda container, *a, **k: started.append(container) or real_start(container, *a, **k)
    try:
        executor.probe(BUSYBOX_IMAGE, start=True)  # runs `exit 0`
        assert len(started) == 1
        executor.probe(BUSYBOX_IMAGE)  # a job's image: created and removed, never started
        assert len(started) == 1
        # A runtime that cannot start containers fails the check with the engine's words.
        docker_client.api.start = lambda container, *a, **k: (_ for _ in ()).throw(
            __import__("docker").errors.APIError("500", explanation="crun: setrlimit `RLIMIT_NOFILE`: Operation not permitted"))
        try:
            executor.probe(BUSYBOX_IMAGE, start=True)
        except AgentError as exc:
            assert "cannot start it" in str(exc) and "RLIMIT_NOFILE" in str(exc)
        else:
            raise AssertionError("an engine that cannot start a container passed the engine check")
    finally:
        docker_client.api.start = real_start
    assert docker_client.containers.list(all=True, sparse=True, filters={"label": "radix.self_test=1"}) == []

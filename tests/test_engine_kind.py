"""Docker or Podman, told from the engine's /version answer (recorded from Docker 28.2 and Debian's Podman 4.3.1)."""

from cluster_agent.executors.docker.engine_kind import identify

DOCKER_VERSION = {
    "Platform": {"Name": "Docker Engine - Community"},
    "Components": [{"Name": "Engine", "Version": "28.2.2", "Details": {"ApiVersion": "1.50"}},
                   {"Name": "containerd", "Version": "1.7.24"}, {"Name": "runc", "Version": "1.1.5"}],
    "Version": "28.2.2", "ApiVersion": "1.50",
}
PODMAN_VERSION = {
    "Platform": {"Name": "linux/amd64/debian-12"},
    "Components": [{"Name": "Podman Engine", "Version": "4.3.1", "Details": {"APIVersion": "4.3.1"}},
                   {"Name": "Conmon", "Version": "conmon version 2.1.6"}, {"Name": "OCI Runtime (crun)"}],
    "Version": "4.3.1", "ApiVersion": "1.41",
}


def test_docker_is_docker_and_keeps_its_event_filters():
    engine = identify(DOCKER_VERSION)
    assert not engine.podman and engine.name == "Docker" and engine.version == "28.2.2"
    assert engine.engine_name == "the Docker engine"
    assert engine.exit_event_filters() == {"type": "container", "event": ["die", "oom"], "label": ["radix.job_id"]}
    assert "differences" not in engine.describe()


def test_podman_is_told_by_its_component_not_its_version_number():
    engine = identify(PODMAN_VERSION)
    assert engine.podman and engine.version == "4.3.1" and engine.api_version == "1.41"
    assert engine.engine_name == "the Podman engine"
    assert "died" in engine.exit_event_filters()["event"]
    described = engine.describe()
    assert described.startswith("Podman 4.3.1, Docker API 1.41; differences from Docker:") and "CDI" in described


def test_an_answer_without_components_is_docker():
    assert identify({"Version": "20.10.24", "ApiVersion": "1.41"}).name == "Docker"
    assert identify({}).name == "Docker"


def test_the_agents_own_container_is_found_under_podman_too(tmp_path):
    from cluster_agent.executors.docker.mode import _own_container_id

    container_id = "a" * 64
    containerenv = tmp_path / ".containerenv"
    containerenv.write_text(f'engine="podman-4.3.1"\nname="radix-agent"\nid="{container_id}"\nimage="x"\nrootless=0\n')
    assert _own_container_id(tmp_path / "no-dockerenv", containerenv) == container_id
    assert _own_container_id(tmp_path / "no-dockerenv", tmp_path / "none") is None


def test_the_executor_adapts_to_podman_once_identified():
    from unittest.mock import MagicMock

    from cluster_agent.executors.docker import DockerExecutor

    client = MagicMock()
    executor = DockerExecutor(client)
    assert executor.engine_name == "the Docker engine" and executor.jobs_die_with_engine
    client.api.version.return_value = PODMAN_VERSION
    assert executor.identify().podman
    assert executor.engine_name == "the Podman engine"
    assert not executor.jobs_die_with_engine  # conmon keeps a job running while the API service restarts
    assert "died" in executor._exits.filters["event"]


def test_podman_without_catatonit_names_the_package():
    from docker.errors import APIError

    from cluster_agent.executors.docker.executor import DockerExecutor

    error = APIError("500", explanation="container create: container-init binary not found on the host: stat "
                                        "/usr/libexec/podman/catatonit: no such file or directory")
    failed = DockerExecutor._classify(error, "create the container")
    assert failed.reason.value == "agent_error" and "install catatonit" in str(failed)


def test_a_container_podman_removed_while_it_was_read_is_gone_not_an_error():
    from unittest.mock import MagicMock

    from docker.errors import APIError

    from cluster_agent.executors.docker import DockerExecutor

    client = MagicMock()
    client.api.inspect_container.side_effect = APIError(
        "500", explanation="container ee8c does not exist in database: no such container")
    assert DockerExecutor(client).inspect("ee8c") is None
    client.api.inspect_container.side_effect = APIError("500", explanation="something else broke")
    try:
        DockerExecutor(client).inspect("ee8c")
    except APIError:
        pass
    else:
        raise AssertionError("other engine errors must not read as a removed container")


def test_a_rootless_engine_on_cgroup_v1_is_known_to_ignore_limits():
    from cluster_agent.executors.docker.engine_kind import limits_ignored

    assert limits_ignored({"SecurityOptions": ["name=seccomp,profile=default", "name=rootless"], "CgroupVersion": "1"})
    assert not limits_ignored({"SecurityOptions": ["name=rootless"], "CgroupVersion": "2"})
    assert not limits_ignored({"SecurityOptions": ["name=seccomp,profile=default"], "CgroupVersion": "1"})
    assert not limits_ignored({})


def test_a_podman_container_whose_containerenv_is_empty_is_found_by_its_mounts_or_cgroup(tmp_path):
    # Rootful, unprivileged Podman leaves /run/.containerenv empty; with --network host the hostname is the host's.
    from cluster_agent.executors.docker.mode import _id_from_proc

    container_id = "ab" * 32
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"812 790 0:52 /overlay-containers/{container_id}/userdata/hosts /etc/hosts rw - tmpfs x rw\n")
    cgroup = tmp_path / "cgroup"
    cgroup.write_text(f"0::/libpod_parent/libpod-{container_id}\n")
    assert _id_from_proc(mountinfo, tmp_path / "none") == container_id
    assert _id_from_proc(tmp_path / "none", cgroup) == container_id
    docker_mounts = tmp_path / "docker"
    docker_mounts.write_text(f"1 2 0:1 /var/lib/docker/containers/{container_id}/hostname /etc/hostname rw - x y rw\n")
    assert _id_from_proc(docker_mounts, tmp_path / "none") == container_id
    assert _id_from_proc(tmp_path / "none", tmp_path / "none") is None
    # On a host, other containers' storage mounts are in the table: never taken for this process's own.
    host = tmp_path / "host"
    host.write_text(f"900 28 0:60 / /var/lib/containers/storage/overlay-containers/{container_id}/userdata/shm rw - tmpfs shm rw\n")
    assert _id_from_proc(host, tmp_path / "none") is None

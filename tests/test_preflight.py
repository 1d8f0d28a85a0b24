from types import SimpleNamespace

import pytest

from cluster_agent.executors.docker import mode as preflight
from cluster_agent.errors import ConfigError


def executor_with_mounts(mounts):
    api = SimpleNamespace(inspect_container=lambda cid: {"Mounts": mounts})
    return SimpleNamespace(client=SimpleNamespace(api=api))


@pytest.fixture
def in_container(monkeypatch):
    monkeypatch.setattr(preflight, "_own_container_id", lambda: "abc")


def test_same_path_mount_is_accepted(in_container, tmp_path):
    jobs = str(tmp_path)
    preflight.check_jobs_mount(executor_with_mounts([{"Source": jobs, "Destination": jobs}]), tmp_path)


def test_parent_mount_at_the_same_path_is_accepted(in_container, tmp_path):
    jobs = tmp_path / "jobs"
    preflight.check_jobs_mount(executor_with_mounts([{"Source": str(tmp_path), "Destination": str(tmp_path)}]), jobs)


def test_mount_from_another_host_path_is_explained(in_container, tmp_path):
    with pytest.raises(ConfigError) as caught:
        preflight.check_jobs_mount(executor_with_mounts([{"Source": "/srv/radix", "Destination": str(tmp_path)}]), tmp_path)
    message = str(caught.value)
    # The fix keeps the user's own host directory, at the same path inside.
    assert "-v /srv/radix:/srv/radix" in message and "--jobs-workdir /srv/radix" in message
    assert f"-v {tmp_path}:{tmp_path}" not in message


def test_unmounted_jobs_dir_is_explained(in_container, tmp_path):
    with pytest.raises(ConfigError, match="not mounted from the host"):
        preflight.check_jobs_mount(executor_with_mounts([{"Source": "/var/run/docker.sock", "Destination": "/var/run/docker.sock"}]), tmp_path)


def test_outside_a_container_nothing_is_checked(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight, "_own_container_id", lambda: None)
    preflight.check_jobs_mount(executor_with_mounts([]), tmp_path)


def test_a_socket_the_user_may_not_use_names_the_group_not_dockerd(monkeypatch):
    from cluster_agent.errors import EngineUnavailable
    from cluster_agent.settings import Settings

    def refused(*args, **kwargs):
        raise EngineUnavailable("cannot reach the Docker engine: Error while fetching server API version: "
                                "('Connection aborted.', PermissionError(13, 'Permission denied'))")

    monkeypatch.setattr(preflight, "connect", refused)
    with pytest.raises(ConfigError) as caught:
        preflight.connect_engine(Settings())
    assert "socket's group" in str(caught.value) and "start dockerd" not in str(caught.value)
    assert "start dockerd" in preflight.engine_fix("Connection refused")


@pytest.mark.parametrize("network, api_base, warned", [
    ("bridge", "http://127.0.0.1:8080", True), ("default", "http://localhost:8080", True),
    ("host", "http://127.0.0.1:8080", False), ("bridge", "http://10.0.0.5:8080", False),
])
def test_a_loopback_api_base_in_a_bridged_container_is_warned_about(in_container, caplog, network, api_base, warned):
    api = SimpleNamespace(inspect_container=lambda cid: {"HostConfig": {"NetworkMode": network}})
    with caplog.at_level("WARNING"):
        preflight.warn_loopback_api_base(SimpleNamespace(client=SimpleNamespace(api=api)), api_base)
    assert ("is a loopback address" in caplog.text) == warned

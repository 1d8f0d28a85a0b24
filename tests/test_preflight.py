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
    assert "/srv/radix" in message and f"-v {tmp_path}:{tmp_path}" in message


def test_unmounted_jobs_dir_is_explained(in_container, tmp_path):
    with pytest.raises(ConfigError, match="not mounted from the host"):
        preflight.check_jobs_mount(executor_with_mounts([{"Source": "/var/run/docker.sock", "Destination": "/var/run/docker.sock"}]), tmp_path)


def test_outside_a_container_nothing_is_checked(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight, "_own_container_id", lambda: None)
    preflight.check_jobs_mount(executor_with_mounts([]), tmp_path)

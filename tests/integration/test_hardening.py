"""Hardening options, each checked at the engine and by its effect inside the container."""

import time

import pytest

from tests.integration.conftest import eventually

CAP_NET_RAW = 13


def inspect_while_running(cp, docker_client, **job):
    job_id = cp.submit(**job)
    container = eventually(
        lambda: docker_client.containers.list(filters={"label": f"radix.job_id={job_id}"}), what="container running"
    )[0]
    attrs = container.attrs
    return job_id, attrs, cp.result(job_id)["result"]


def capability_bounding_set(stdout: str) -> int:
    line = next(l for l in stdout.splitlines() if l.startswith("CapBnd:"))
    return int(line.split()[1], 16)


@pytest.mark.engine
def test_default_cap_drop_removes_raw_sockets(cp, start_agent, docker_client):
    start_agent()
    _, attrs, result = inspect_while_running(cp, docker_client, command=["sh", "-c", "grep CapBnd /proc/self/status; sleep 1"])
    assert set(attrs["HostConfig"]["CapDrop"]) == {"NET_RAW", "MKNOD", "AUDIT_WRITE"}
    assert not capability_bounding_set(result["output_payload"]["stdout"]) & (1 << CAP_NET_RAW)


@pytest.mark.engine
def test_cap_drop_all(cp, start_agent):
    start_agent("--cap-drop", "ALL")
    result = cp.run(command=["sh", "-c", "grep CapBnd /proc/self/status"])
    assert capability_bounding_set(result["output_payload"]["stdout"]) == 0


@pytest.mark.engine
def test_read_only_root_filesystem_keeps_the_workspace_and_tmp_writable(cp, start_agent):
    start_agent("--read-only-rootfs")
    script = "touch /etc/x 2>/dev/null && echo root-writable || echo root-read-only; touch /tmp/y && echo tmp-ok; touch ws-ok"
    result = cp.run(command=["sh", "-c", script + "; ls ws-ok"])
    assert result["output_payload"]["stdout"] == "root-read-only\ntmp-ok\nws-ok\n"


@pytest.mark.engine
def test_job_network_none_cuts_the_job_off(cp, start_agent, docker_client):
    start_agent("--job-network", "none")
    _, attrs, result = inspect_while_running(cp, docker_client, command=["sh", "-c", "ls /sys/class/net; sleep 1"])
    assert attrs["HostConfig"]["NetworkMode"] == "none"
    assert result["output_payload"]["stdout"].split() == ["lo"]


def test_allowed_images_refuse_other_images(cp, start_agent, docker_client, cluster_id):
    start_agent("--allowed-images", "registry.example.com/ml/*,radix-test/busy*")
    assert cp.run(command=["true"])["status"] == "succeeded"  # radix-test/busybox matches
    refused = cp.run(image="python:3.11-slim", command=["true"])
    assert refused["failure_reason"] == "invalid_job"
    assert "not allowed" in refused["error_message"] and "--allowed-images" in refused["error_message"]


@pytest.mark.engine
def test_pull_policy_never_does_not_pull(cp, start_agent):
    start_agent("--pull-policy", "never")
    assert cp.run(command=["true"])["status"] == "succeeded"  # present locally
    missing = cp.run(image="radix-test/not-here:1", command=["true"])
    assert missing["failure_reason"] == "image_unavailable"
    assert "--pull-policy is never" in missing["error_message"]
    assert missing["metrics"]["retryable"] is True  # a node that has the image can run it


@pytest.mark.engine
def test_pull_policy_always_pulls_even_a_present_image(cp, start_agent):
    start_agent("--pull-policy", "always")
    started = time.monotonic()
    result = cp.run(command=["true"])  # the local test image has no registry: a pull must be tried, and fails
    assert result["failure_reason"] == "image_unavailable", result
    assert time.monotonic() - started < 60


@pytest.mark.engine
def test_a_job_spec_cannot_ask_for_host_access(cp, start_agent, docker_client):
    start_agent()
    _, attrs, result = inspect_while_running(
        cp, docker_client, command=["sleep", "1"],
        privileged=True, network_mode="host", volumes={"/": {"bind": "/host", "mode": "rw"}},
        cap_add=["SYS_ADMIN"], security_opt=["seccomp=unconfined"], user="root", pid_mode="host", devices=["/dev/sda"],
    )
    host = attrs["HostConfig"]
    assert host["Privileged"] is False
    assert host["NetworkMode"] == "bridge" and host["PidMode"] in ("", "private")  # Podman names the default
    assert not host.get("CapAdd") and not host.get("Devices")
    assert host["SecurityOpt"] == ["no-new-privileges"]
    assert [m["Destination"] for m in attrs["Mounts"]] == ["/workspace"]
    assert result["status"] == "succeeded"

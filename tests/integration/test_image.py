"""The agent's own image: built from the real Dockerfile, run the way the README says."""

import os
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import ROOT, TOKEN, eventually

IMAGE = "radix-cluster-agent:test"


@pytest.fixture(scope="module")
def agent_image(docker_client):
    # CI cannot pull python:3.11-slim: it passes a debootstrap-built base (see .ci/run).
    command = [sys.executable, str(ROOT / "scripts" / "build_image.py"), "--tag", IMAGE]
    if os.environ.get("AGENT_TEST_BASE_IMAGE"):
        command += ["--base-image", os.environ["AGENT_TEST_BASE_IMAGE"]]
    if os.environ.get("AGENT_TEST_CA_BUNDLE"):
        command += ["--ca-bundle", os.environ["AGENT_TEST_CA_BUNDLE"]]
    build = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return IMAGE


def _run_agent_container(docker_client, plane, cluster_id, jobs_dir, mount_target=None, extra=()):
    mount_target = mount_target or str(jobs_dir)
    return docker_client.containers.run(
        IMAGE,
        command=[
            "--api-base", plane.url, "--cluster-id", cluster_id, "--jobs-workdir", mount_target,
            "--long-poll-seconds", "5", "--shutdown-grace", "10", *extra,
        ],
        environment={"RADIX_CLUSTER_TOKEN": TOKEN},
        volumes={
            "/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
            str(jobs_dir): {"bind": mount_target, "mode": "rw"},
        },
        network_mode="host",  # the dev control plane listens on the host's loopback
        detach=True,
        labels={"radix.test": "agent-image"},
    )


def test_agent_runs_in_its_image_with_the_documented_docker_run(agent_image, docker_client, plane, cp, cluster_id, tmp_path):
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    container = _run_agent_container(docker_client, plane, cluster_id, jobs_dir)
    try:
        result = cp.run(command=["sh", "-c", "cat input.json > output.json"], input_payload={"from": "image"}, wait=120)
        assert result["status"] == "succeeded", container.logs().decode()[-3000:]
        assert result["output_payload"] == {"from": "image"}
        health = container.exec_run(["python3", "-m", "cluster_agent.healthcheck"])
        assert health.exit_code == 0, health.output
        started = time.monotonic()
        container.stop(timeout=30)  # SIGTERM reaches the agent (PID 1)
        assert time.monotonic() - started < 15
        container.reload()
        assert container.attrs["State"]["ExitCode"] == 0, container.logs().decode()[-3000:]
        assert [h["status"] for h in cp.heartbeats()][-1] == "draining"
        assert "HEALTHCHECK" not in container.logs().decode()
        assert docker_client.images.get(agent_image).attrs["Config"]["Healthcheck"]["Test"][-1] == "cluster_agent.healthcheck"
    finally:
        container.remove(force=True)


@pytest.mark.parametrize("flags", [("--metrics-port", "0"), ("--metrics-port", "19477", "--metrics-host", "127.0.0.1")])
def test_the_healthcheck_asks_this_agent_however_its_flags_configured_it(agent_image, docker_client, plane, cluster_id,
                                                                          tmp_path, flags):
    """Settings given only as flags: the image's HEALTHCHECK command must still find this agent (before, it probed
    127.0.0.1:9464 and reported a working agent unhealthy)."""
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    container = _run_agent_container(docker_client, plane, cluster_id, jobs_dir, extra=flags)
    try:
        test = docker_client.images.get(agent_image).attrs["Config"]["Healthcheck"]["Test"]
        assert test[0] == "CMD"
        health = eventually(lambda: (r := container.exec_run(test[1:])).exit_code == 0 and r, timeout=60,
                            what="the HEALTHCHECK command to pass")
        said = health.output.decode()
        assert ("poll_loop_alive" in said) == (flags[1] != "0"), said  # /healthz when on, the liveness file when off
    finally:
        container.remove(force=True)


def test_a_loopback_api_base_on_a_bridge_network_is_explained(agent_image, docker_client, cluster_id, tmp_path):
    """The README's first `docker run` against a local control plane: 127.0.0.1 is the container itself."""
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    container = docker_client.containers.run(
        IMAGE, command=["--api-base", "http://127.0.0.1:8080", "--cluster-id", cluster_id, "--jobs-workdir",
                        str(jobs_dir)],
        environment={"RADIX_CLUSTER_TOKEN": TOKEN},
        volumes={"/var/run/docker.sock": {"bind": "/var/run/docker.sock", "mode": "rw"},
                 str(jobs_dir): {"bind": str(jobs_dir), "mode": "rw"}},
        network_mode="bridge", detach=True, labels={"radix.test": "agent-image"},
    )
    try:
        logs = eventually(lambda: (text := container.logs().decode()) and "nothing answers" in text and text,
                          timeout=60, what="the unreachable hint")
        assert "is a loopback address, but this agent runs in a container on the default bridge network" in logs
        assert "--network host" in logs
        assert logs.count("nothing answers at http://127.0.0.1:8080") == 1  # said once, then retried quietly
        assert TOKEN not in logs
    finally:
        container.remove(force=True)


def test_jobs_dir_mounted_at_another_path_is_refused_with_the_fix(agent_image, docker_client, plane, cluster_id, tmp_path):
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    container = _run_agent_container(docker_client, plane, cluster_id, jobs_dir, mount_target="/jobs")
    try:
        status = container.wait(timeout=60)
        logs = container.logs().decode()
        assert status["StatusCode"] == 2, logs
        assert f"mounted from host path {jobs_dir}" in logs
        assert f"-v {jobs_dir}:{jobs_dir}" in logs and f"--jobs-workdir {jobs_dir}" in logs  # the user's own path
        assert "Traceback" not in logs
    finally:
        container.remove(force=True)


def test_an_input_cache_not_mounted_from_the_host_is_refused_with_the_fix(agent_image, docker_client, plane,
                                                                           cluster_id, tmp_path):
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    cache = tmp_path / "cache"  # not mounted: jobs could not mount their cached inputs from the host
    container = _run_agent_container(docker_client, plane, cluster_id, jobs_dir, extra=("--cache-dir", str(cache)))
    try:
        status = container.wait(timeout=60)
        logs = container.logs().decode()
        assert status["StatusCode"] == 2, logs
        assert f"--cache-dir / RADIX_CACHE_DIR: {cache} is not mounted from the host" in logs
        assert f"-v {cache}:{cache}" in logs and "Traceback" not in logs
    finally:
        container.remove(force=True)

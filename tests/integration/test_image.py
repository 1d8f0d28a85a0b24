"""The agent's own image: built from the real Dockerfile, run the way the README says."""

import os
import subprocess
import sys
import time

import pytest

from tests.integration.conftest import ROOT, TOKEN

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


def test_jobs_dir_mounted_at_another_path_is_refused_with_the_fix(agent_image, docker_client, plane, cluster_id, tmp_path):
    jobs_dir = tmp_path / "jobs"
    jobs_dir.mkdir()
    container = _run_agent_container(docker_client, plane, cluster_id, jobs_dir, mount_target="/jobs")
    try:
        status = container.wait(timeout=60)
        logs = container.logs().decode()
        assert status["StatusCode"] == 2, logs
        assert f"mounted from host path {jobs_dir}" in logs
        assert "-v /jobs:/jobs" in logs
        assert "Traceback" not in logs
    finally:
        container.remove(force=True)

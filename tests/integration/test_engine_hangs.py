"""An engine that holds a call past the client's timeout and performs it later (a `start` answered late): the
job gets one true result naming the step that failed, and the container the agent gave up on never runs on
unsupervised, nor brings its workspace back. The real engine performs the late call; only the client's view of
it (a read timeout) is injected at the Docker SDK boundary."""

import threading
import time

import docker
import pytest
import requests

from cluster_agent.executors.docker import DockerExecutor
from cluster_agent.gpu_pool import GpuPool
from cluster_agent.job_runner import JobRun
from cluster_agent.received_job import ReceivedJob
from cluster_agent.settings import Settings
from tests.integration.conftest import eventually


@pytest.mark.parametrize("late_start_after", [0.5, 2.5], ids=["before-clean-up", "after-clean-up"])
def test_a_start_performed_after_the_client_gave_up_is_undone(docker_client, busybox, cluster_id, tmp_path, late_start_after):
    client = docker.from_env(timeout=10)
    executor = DockerExecutor(client)
    api = client.api
    real_start, real_remove = api.start, api.remove_container
    late: list[str] = []
    engine_answers_removals_at = time.monotonic() + 4.0

    def start_answered_late(container_id, *args, **kwargs):
        def perform():
            try:
                real_start(container_id, *args, **kwargs)
                late.append("started")
            except docker.errors.APIError as exc:
                late.append(f"refused: {exc.explanation}")
        threading.Timer(late_start_after, perform).start()
        raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=10)")

    def remove_while_engine_hangs(*args, **kwargs):
        if time.monotonic() < engine_answers_removals_at:
            raise requests.exceptions.ReadTimeout("Read timed out. (read timeout=10)")
        return real_remove(*args, **kwargs)

    api.start = start_answered_late
    api.remove_container = remove_while_engine_hangs
    settings = Settings(jobs_workdir=tmp_path / "jobs", cluster_id=cluster_id)
    job = {"job_id": "late-start", "image": busybox, "command": ["sleep", "60"]}
    run = JobRun(ReceivedJob.parse(job), settings=settings, executor=executor, gpu_pool=GpuPool([]))
    try:
        completion = run.execute()
        assert completion.status.value == "failed" and completion.failure_reason.value == "agent_error"
        assert "start the container" in completion.error_message, completion.error_message
        assert "create" not in completion.error_message
        time.sleep(1.0)
        run.cleanup()
        label = f"radix.cluster_id={cluster_id}"
        eventually(lambda: late, timeout=10, what="the engine performs the late start")
        eventually(lambda: not docker_client.containers.list(all=True, sparse=True, filters={"label": label}), timeout=40,
                   what="the container the agent gave up on removed")
        assert not (tmp_path / "jobs" / "late-start").exists()  # not re-created by the engine for its mount
        if late_start_after > 1.0:
            assert late[0].startswith("refused"), late  # its workspace was gone: the engine cannot mount it
    finally:
        client.close()

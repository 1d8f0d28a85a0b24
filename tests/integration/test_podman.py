"""What only Podman does: its API service (`podman system service`, socket-activated by systemd, exiting when idle)
may stop and start again under running jobs, whose containers are held by conmon, not by the service."""

import pytest

from tests.integration.conftest import eventually


@pytest.mark.engine
@pytest.mark.podman_only
def test_a_podman_service_restart_mid_job_ends_nothing_and_loses_no_output(cp, start_agent, container_engine, docker_client):
    agent = start_agent()
    job_id = cp.submit(command=["sh", "-c", "echo before; sleep 6; echo after; echo late >&2; exit 3"])
    agent.wait_for_log(f"job {job_id}: started")
    eventually(lambda: "before" in cp.result_now(job_id)["log"], what="first line streamed")
    container_engine.restart(down_for=1.0)
    record = cp.result(job_id, wait=60)
    result = record["result"]
    # Judged by its own exit, not as a job the engine took along.
    assert result["failure_reason"] == "exit_code" and result["metrics"]["exit_code"] == 3, result
    assert result["output_payload"] == {"stdout": "before\nafter\n", "stderr": "late\n"}, result
    assert record["log"] == "before\nafter\nlate\n"
    assert record["deliveries"] == 1
    eventually(lambda: not docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.job_id={job_id}"}),
               what="container removed")

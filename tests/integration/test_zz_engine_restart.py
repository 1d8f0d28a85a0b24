"""The Docker engine restarting mid-job. Named to run last: it restarts the engine every other test uses."""

import subprocess
import time
from pathlib import Path

from tests.integration.conftest import eventually

ROOT = Path(__file__).resolve().parents[2]


def _restart_dockerd() -> None:
    pids = subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True, text=True).stdout.split()
    assert pids, "no dockerd process to restart (the engine must be the local dockerd for this test)"
    subprocess.run(["kill", "-TERM", *pids], check=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode == 0:
        time.sleep(0.2)
    time.sleep(3)  # the engine is away for a while
    subprocess.run([str(ROOT / "scripts" / "ensure-docker.sh")], check=True, capture_output=True, timeout=120)


def test_engine_restart_mid_job_is_survived_and_reported_truthfully(cp, start_agent, docker_client):
    agent = start_agent("--heartbeat-interval", "1")
    job_id = cp.submit(command=["sh", "-c", "echo working; sleep 60"])
    agent.wait_for_log(f"job {job_id}: started")
    restarted_at = time.time()
    _restart_dockerd()
    record = cp.result(job_id, wait=120)
    result = record["result"]
    # The container died with the engine (no live-restore): a failed job, reported as the agent's problem.
    assert result["status"] == "failed"
    assert result["failure_reason"] == "agent_error", result
    assert "engine" in result["error_message"]
    assert record["deliveries"] == 1
    # Heartbeats went on while the engine was away, and the agent takes jobs again once it is back.
    beats = [h for h in cp.heartbeats() if h["at"] >= restarted_at]
    assert len(beats) >= 3
    assert cp.run(command=["echo", '{"after": "restart"}'], wait=120)["output_payload"] == {"after": "restart"}
    assert agent.proc.poll() is None
    eventually(lambda: not docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.job_id={job_id}"}), what="container removed")

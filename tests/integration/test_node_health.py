"""Bad nodes take no work (issue 17), end to end through the dev control plane: infrastructure failures in a row
quarantine the node (the job's own failures never do), a failing self-test quarantines it, and it takes work again
when the self-test passes or the operator clears it (SIGUSR1)."""

from __future__ import annotations

import signal
import subprocess
import time

from .conftest import eventually, small_disk

UNREACHABLE_IMAGE = "registry.invalid/nothing:1"  # a pull fails on the network: the node's fault, not the job's


def asking_for_none(cp) -> bool:
    """The poll in flight asks for no job. (One that went out before the quarantine still carries a job if one comes:
    a poll that may be answering is never cut, or the job in its answer would be lost.)"""
    polls = cp.stats()["last_polls"]
    return bool(polls) and polls[-1]["max_jobs"] == 0


def node_state(cp) -> dict:
    beats = [b for b in cp.heartbeats() if "health" in b["capabilities"]]
    return beats[-1]["capabilities"]["health"] if beats else {}


def test_infrastructure_failures_quarantine_the_node_until_the_operator_clears_it(cp, start_agent, busybox):
    agent = start_agent("--heartbeat-interval", "1", "--self-test-interval", "600")
    for _ in range(3):
        assert cp.run(command=["sh", "-c", "exit 1"])["metrics"]["failure_class"] == "job"
    time.sleep(1.5)
    assert node_state(cp)["state"] == "healthy"  # the jobs' own failures
    for _ in range(3):
        result = cp.run(image=UNREACHABLE_IMAGE, command=["true"])
        assert result["failure_reason"] == "image_unavailable" and result["metrics"]["retryable"] is True, result
    health = eventually(lambda: node_state(cp).get("state") == "quarantined" and node_state(cp), timeout=10,
                        what="quarantine in the heartbeat")
    assert "3 infrastructure failures in a row" in health["reason"] and health["since"]
    assert agent.log.count("node quarantined") == 1
    eventually(lambda: asking_for_none(cp), timeout=15, what="a poll for no jobs")
    waiting = cp.submit(command=["sh", "-c", "echo '{\"ran\": true}'"])
    time.sleep(3)
    assert cp.result_now(waiting)["state"] == "queued"
    assert asking_for_none(cp)
    agent.proc.send_signal(signal.SIGUSR1)
    assert cp.result(waiting, wait=30)["result"]["output_payload"] == {"ran": True}
    assert "quarantine cleared by the operator (SIGUSR1)" in agent.log


def test_a_failing_self_test_quarantines_and_a_passing_one_resumes(cp, start_agent, busybox, tmp_path):
    # The jobs directory turned immutable (chattr +i: not even root can create a file in it) stands for any fault
    # that leaves it unwritable (a full or read-only filesystem, a lost mount).
    with small_disk(tmp_path / "jobs", "16m") as jobs:
        agent = start_agent("--jobs-workdir", str(jobs), "--min-free-disk-gb", "0", "--self-test-interval", "2",
                            "--heartbeat-interval", "1")
        assert cp.run(command=["true"])["status"] == "succeeded"
        subprocess.run(["chattr", "+i", str(jobs)], check=True)
        try:
            health = eventually(lambda: node_state(cp).get("state") == "quarantined" and node_state(cp),
                                timeout=15, what="quarantine after the self-test")
            assert [c["name"] for c in health["failing_checks"]] == ["jobs_dir"]
            assert "Operation not permitted" in health["failing_checks"][0]["detail"]
            eventually(lambda: asking_for_none(cp), timeout=15, what="a poll for no jobs")
            waiting = cp.submit(command=["sh", "-c", "echo '{\"ran\": true}'"])
            time.sleep(3)
            assert cp.result_now(waiting)["state"] == "queued"
        finally:
            subprocess.run(["chattr", "-i", str(jobs)], check=True)
        assert cp.result(waiting, wait=30)["result"]["output_payload"] == {"ran": True}
        assert "self-test passed: quarantine over" in agent.log
        agent.terminate()

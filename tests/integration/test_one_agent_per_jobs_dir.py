"""One jobs directory belongs to one running agent (cluster_agent/jobs_lock.py), on the real engine."""

import signal
import subprocess
import time

from tests.integration.conftest import TOKEN, agent_command


def _runs(record):
    return record["result"]["output_payload"]["runs"]


COUNTED = 'echo run >> runs; sleep {sleep}; echo "{{\\"runs\\": $(wc -l < runs)}}" > output.json'


def test_a_second_agent_is_refused_and_the_first_goes_on_undisturbed(plane, cp, cluster_id, start_agent, tmp_path):
    first = start_agent()
    job_id = cp.submit(command=["sh", "-c", COUNTED.format(sleep=6)])
    first.wait_for_log(f"job {job_id}: started container")
    began = time.monotonic()
    second = subprocess.run(
        agent_command("--api-base", plane.url, "--cluster-id", cluster_id, "--cluster-token", TOKEN,
                      "--jobs-workdir", str(first.jobs_dir), "--metrics-port", "0", "--jobs-lock-wait", "1"),
        capture_output=True, text=True, timeout=60,
    )
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1, second.stderr
    assert str(first.jobs_dir) in lines[0] and f"pid {first.proc.pid}" in lines[0] and "host " in lines[0]
    assert time.monotonic() - began < 30
    record = cp.result(job_id, wait=60)
    assert record["result"]["status"] == "succeeded" and _runs(record) == 1 and record["deliveries"] == 1
    assert first.proc.poll() is None
    assert "adopted" not in first.log


def test_the_successor_of_a_sigkilled_agent_starts_at_once(cp, start_agent):
    first = start_agent()
    job_id = cp.submit(command=["sh", "-c", COUNTED.format(sleep=4)])
    first.wait_for_log(f"job {job_id}: started container")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    began = time.monotonic()
    second = start_agent("--jobs-lock-wait", "60")
    assert time.monotonic() - began < 20
    assert "is in use by" not in second.log
    record = cp.result(job_id, wait=60)
    assert _runs(record) == 1 and record["deliveries"] == 1


def test_a_successor_started_during_the_drain_takes_over_once_the_old_agent_exits(cp, start_agent):
    first = start_agent()
    cp.fault("complete", delay=5)  # the first job's result is still on its way when SIGTERM comes: a long drain
    quick = cp.submit(command=["echo", '{"quick": 1}'])
    first.wait_for_log(f"job {quick}: finished")
    long_job = cp.submit(command=["sh", "-c", COUNTED.format(sleep=8)])
    first.wait_for_log(f"job {long_job}: started container")
    first.proc.send_signal(signal.SIGTERM)  # --on-shutdown leave: the container keeps running
    second = start_agent("--jobs-lock-wait", "60", wait_ready=False)
    second.wait_for_log("waiting up to 60 s", timeout=30)
    assert first.proc.wait(60) == 0
    second.wait_for_log("taking it over", timeout=30)
    second.wait_for_log("agent starting", timeout=30)
    cp.fault("complete", clear=True)
    assert cp.result(quick, wait=60)["result"]["output_payload"] == {"quick": 1}
    record = cp.result(long_job, wait=60)
    assert _runs(record) == 1 and record["deliveries"] == 1
    assert f"job {long_job}: adopted container" in second.log


def test_a_lock_file_removed_under_a_running_agent_is_locked_again(plane, cp, cluster_id, start_agent):
    first = start_agent()
    (first.jobs_dir / ".radix-agent.lock").unlink()  # a /tmp cleaner, or a hand
    first.wait_for_log("locked the jobs directory again", timeout=15)
    second = subprocess.run(
        agent_command("--api-base", plane.url, "--cluster-id", cluster_id, "--cluster-token", TOKEN,
                      "--jobs-workdir", str(first.jobs_dir), "--metrics-port", "0", "--jobs-lock-wait", "0"),
        capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 2 and "is in use by" in second.stderr
    assert cp.run(command=["true"])["status"] == "succeeded"
    assert first.proc.poll() is None

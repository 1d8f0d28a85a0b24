"""Live jobs on the real engine: start calls, log streaming, cancellation, parallel jobs, limits."""

import os
import threading
import time

import pytest


from tests.integration.conftest import eventually

# ~1.9 MB of UTF-8 lines (so more than one 1 MiB request), some multi-byte characters.
LINES = 60_000
EXPECTED_STDOUT = "".join(f"{i} ünïcødé\n" for i in range(1, LINES + 1))
PRINT_LINES = f"seq 1 {LINES} | sed 's/$/ ünïcødé/'"


def wait_running(docker_client, job_id, timeout=30):
    return eventually(
        lambda: docker_client.containers.list(filters={"label": f"radix.job_id={job_id}", "status": "running"}),
        timeout, f"container of {job_id} running",
    )[0]


def cancel_and_wait(cp, docker_client, job_id):
    """Cancel a running job; its record and how long the cancellation took."""
    wait_running(docker_client, job_id)
    asked = time.monotonic()
    cp.cancel(job_id)
    record = cp.result(job_id, wait=30)
    return record, time.monotonic() - asked


@pytest.mark.engine
def test_start_call_names_the_container(cp, start_agent, docker_client):
    start_agent()
    job_id = cp.submit(command=["sleep", "2"])
    container = wait_running(docker_client, job_id)
    record = cp.result(job_id)
    started = record["started"]
    assert started["container_id"] == container.id
    assert started["gpu_ids"] == []
    assert started["started_at"].endswith("+00:00") and "T" in started["started_at"]
    assert started["at"] <= record["completed_at"]


@pytest.mark.engine
def test_log_stream_equals_the_output_byte_for_byte(cp, start_agent):
    start_agent()
    script = f"{PRINT_LINES}; sleep 0.5; echo 'to stderr ✓' >&2; sleep 0.5; echo tail-line"
    record = cp.result(cp.submit(command=["sh", "-c", script]), wait=120)
    expected = EXPECTED_STDOUT + "to stderr ✓\n" + "tail-line\n"
    assert record["log_bytes"] == len(expected.encode())
    assert record["log"] == expected
    assert record["log_gaps"] == 0
    requests = record["log_requests"]
    assert len(requests) >= 2 and all(r["bytes"] <= 1024 * 1024 for r in requests)
    # The last chunk arrived before the completion.
    assert max(r["at"] for r in requests) <= record["completed_at"]


@pytest.mark.engine
def test_logs_arrive_while_the_job_runs(cp, start_agent):
    start_agent()
    job_id = cp.submit(command=["sh", "-c", "echo first; sleep 6; echo second"])
    seen = eventually(lambda: "first" in cp.result_now(job_id)["log"] and cp.result_now(job_id), timeout=5, what="first line streamed")
    assert seen["result"] is None, "the log should arrive while the job still runs"
    assert "second" not in seen["log"]
    assert cp.result(job_id)["log"] == "first\nsecond\n"


def test_log_chunks_are_retried_without_duplicates_or_gaps(cp, start_agent):
    cp.fault("logs", [503, 0, 500, 429])
    start_agent()
    record = cp.result(cp.submit(command=["sh", "-c", PRINT_LINES]), wait=120)
    assert record["log"] == EXPECTED_STDOUT
    assert record["log_gaps"] == 0
    assert cp.stats()["faults_logs"] == 4


def test_a_slow_control_plane_never_stalls_the_job_or_grows_the_agent(cp, start_agent):
    cp.fault("logs", delay=1.0)  # every logs call takes a second
    agent = start_agent()
    baseline = agent.peak_rss_mb()
    script = "echo BEGINNING; yes 'a line of job output that goes on and on' | head -c 200000000; echo; echo THE-END"
    record = cp.result(cp.submit(command=["sh", "-c", script]), wait=300)
    assert record["result"]["status"] == "succeeded"
    assert record["result"]["metrics"]["runtime_seconds"] < 30, "the job was held back by the log stream"
    log = record["log"]
    assert log.startswith("BEGINNING\n")
    assert "bytes of output dropped here" in log
    assert log.endswith("THE-END\n")
    assert record["log_gaps"] == 0
    assert agent.peak_rss_mb() - baseline < 60


@pytest.mark.engine
def test_cancel_from_a_poll_answer(cp, start_agent, docker_client):
    start_agent()
    job_id = cp.submit(command=["sleep", "300"])
    record, took = cancel_and_wait(cp, docker_client, job_id)
    assert took < 15
    assert record["result"]["status"] == "canceled"
    assert record["result"]["failure_reason"] == "canceled"
    eventually(lambda: not docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.job_id={job_id}"}), what="container gone")


@pytest.mark.engine
def test_cancel_of_a_job_that_ignores_sigterm_kills_it_after_10_s(cp, start_agent, docker_client):
    start_agent()
    job_id = cp.submit(command=["sh", "-c", "trap '' TERM; while true; do sleep 1; done"])
    record, took = cancel_and_wait(cp, docker_client, job_id)
    assert record["result"]["status"] == "canceled"
    assert 9 <= took < 15, f"canceled after {took:.1f} s"


def test_cancel_from_a_logs_answer(cp, start_agent, docker_client):
    cp.config(cancel_via="logs")
    start_agent()
    job_id = cp.submit(command=["sh", "-c", "while true; do echo tick; sleep 0.5; done"])
    record, took = cancel_and_wait(cp, docker_client, job_id)
    assert took < 15
    assert record["result"]["status"] == "canceled"


def test_cancel_for_a_job_the_agent_does_not_run_is_ignored(cp, start_agent):
    agent = start_agent()
    job_id = cp.submit(command=["sh", "-c", "sleep 2; echo '{\"fine\": true}'"])
    agent.wait_for_log(f"job {job_id}: started")
    cp.cancel("some-other-job")
    record = cp.result(job_id)
    assert record["result"]["status"] == "succeeded"
    assert "some-other-job, which this agent does not run" in agent.log


def test_a_cancel_repeated_after_the_job_ended_is_not_reported_as_a_strangers(cp, start_agent):
    """A control plane repeats a cancel until it sees the result; one arriving after the job ended here is not a
    job this agent 'does not run'."""
    agent = start_agent("--long-poll-seconds", "2")
    job_id = cp.submit(command=["true"])
    assert cp.result(job_id)["result"]["status"] == "succeeded"
    cp._call("/admin/raw_poll", {"body": {"jobs": [], "cancel_job_ids": [job_id]}})  # the next poll's answer
    cp.cancel("never-seen-job")  # a later poll's: once it is logged, the repeated cancel above was handled
    agent.wait_for_log("never-seen-job, which this agent does not run")
    assert f"{job_id}, which this agent does not run" not in agent.log


def test_busy_agent_keeps_a_max_jobs_0_poll_open_for_cancellations(cp, start_agent, docker_client):
    start_agent("--long-poll-seconds", "25")
    job_id = cp.submit(command=["sleep", "300"])
    wait_running(docker_client, job_id)
    busy_poll = eventually(
        lambda: [p for p in cp.stats()["last_polls"] if p["max_jobs"] == 0], what="a max_jobs 0 poll"
    )[-1]
    assert busy_poll["running_job_ids"] == [job_id]
    time.sleep(1)  # that poll is now held by the server
    asked = time.monotonic()
    cp.cancel(job_id)
    cp.result(job_id, wait=30)
    assert time.monotonic() - asked < 5, "the held poll should carry the cancellation at once"


def test_a_freed_slot_takes_the_next_job_at_once(cp, start_agent):
    start_agent("--long-poll-seconds", "25")
    first = cp.submit(command=["sleep", "2"])
    second = cp.submit(command=["true"])
    a, b = cp.result(first), cp.result(second)
    # The second job waited behind a held max_jobs-0 poll; the first job's end broke it off.
    assert b["assigned_at"] - a["started"]["at"] < 4, "the second job waited for the long poll to time out"


def test_three_slots_run_three_jobs_at_once_and_never_more(cp, start_agent, docker_client, cluster_id):
    start_agent("--max-concurrent-jobs", "3")
    running_max = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            # The low-level list does not inspect each container, which races their removal.
            running = docker_client.api.containers(filters={"label": f"radix.cluster_id={cluster_id}", "status": "running"})
            running_max[0] = max(running_max[0], len(running))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        ids = [cp.submit(command=["sleep", "3"]) for _ in range(7)]
        records = [cp.result(job_id, wait=120) for job_id in ids]
    finally:
        stop.set()
        watcher.join()
    assert all(r["result"]["status"] == "succeeded" for r in records)
    assert running_max[0] == 3
    polls = cp.stats()["last_polls"]
    assert max(p["max_jobs"] for p in polls) <= 3
    assert any(len(p["running_job_ids"]) == 3 for p in polls)
    first_three = sorted(records[:3], key=lambda r: r["started"]["at"])
    assert first_three[-1]["started"]["at"] - first_three[0]["started"]["at"] < 2, "the first three should overlap"


def test_core_only_server_gets_core_behaviour(cp, start_agent):
    cp.config(extensions=False)
    agent = start_agent()
    for _ in range(2):
        result = cp.run(command=["sh", "-c", "echo hi; echo '{\"ok\": true}' > output.json"])
        assert result["status"] == "succeeded"
    assert agent.log.count("no start endpoint") == 1
    assert agent.log.count("no logs endpoint") == 1


@pytest.mark.engine
def test_limits_are_visible_in_the_container(cp, start_agent):
    start_agent("--pids-limit", "64")
    script = (
        "cat /sys/fs/cgroup/pids/pids.max /sys/fs/cgroup/pids.max 2>/dev/null; "
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us /sys/fs/cgroup/cpu.max 2>/dev/null; "
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null"
    )
    result = cp.run(command=["sh", "-c", script], resources={"cpus": 0.5, "memory_mb": 96})
    out = result["output_payload"]["stdout"].split()
    assert "64" in out
    assert "50000" in out
    assert str(96 * 1024 * 1024) in out


@pytest.mark.engine
def test_pids_limit_stops_a_fork_bomb(cp, start_agent):
    start_agent("--pids-limit", "32")
    result = cp.run(command=["sh", "-c", "i=0; while [ $i -lt 100 ]; do sleep 5 & i=$((i+1)); done; wait"], timeout_seconds=30)
    assert result["status"] == "failed" or "can't fork" in result["output_payload"].get("stderr", "")
    assert "fork" in (result["error_message"] or "") + result["output_payload"].get("stderr", "")


@pytest.mark.engine
@pytest.mark.parametrize("end", ["cancel", "timeout"])
def test_no_process_of_a_stopped_job_survives_it(cp, start_agent, docker_client, end):
    # PID 1 and its children all ignore SIGTERM, and the children keep running in the background: the grace ends
    # in SIGKILL for all of them and the container is removed, so nothing of the job is left on the host.
    marker = f"{31000 + (end == 'timeout')}"
    script = (f"trap '' TERM; (trap '' TERM; sleep {marker}) & (trap '' TERM; while true; do sleep 1; done) & "
              f"sleep {marker}")
    start_agent()
    job_id = cp.submit(command=["sh", "-c", script], timeout_seconds=3 if end == "timeout" else 60)
    wait_running(docker_client, job_id)
    eventually(lambda: _host_processes(marker), what="the job's processes seen from the host")
    if end == "cancel":
        cp.cancel(job_id)
    result = cp.result(job_id, wait=40)["result"]
    assert result["failure_reason"] == ("canceled" if end == "cancel" else "timeout"), result
    eventually(lambda: not docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.job_id={job_id}"}),
               what="container gone")
    assert _host_processes(marker) == []


def _host_processes(marker: str) -> list[str]:
    found = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                cmdline = open(f"/proc/{proc}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if cmdline[:2] == [b"sleep", marker.encode()]:
                found.append(proc)
    return found

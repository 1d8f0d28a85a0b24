"""Delivery guarantees under injected faults: the agent SIGKILLed at each stage, the control plane down, failing,
dropping connections or slow. Every test asserts one result per job and one container run per job.

The job scripts count their own runs in their workspace (`runs`), which survives an agent restart.
"""

import json
import signal
import time

import pytest

from tests.integration.conftest import eventually, small_disk

# Counts its runs, prints a line, takes a while, then writes output.json with the run count.
COUNTED_JOB = 'echo run >> runs; echo started; sleep {sleep}; echo "{{\\"runs\\": $(wc -l < runs)}}" > output.json'


def counted(sleep: float) -> list[str]:
    return ["sh", "-c", COUNTED_JOB.format(sleep=sleep)]


def containers(docker_client, label):
    # sparse: a full list inspects each container, which fails for one removed meanwhile (Podman: a 500)
    return docker_client.containers.list(all=True, sparse=True, filters={"label": label})


def kill(agent):
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)


@pytest.mark.engine
def test_agent_killed_mid_job_the_next_one_adopts_it(cp, start_agent, docker_client, cluster_id):
    first = start_agent()
    job_id = cp.submit(command=counted(5))
    first.wait_for_log(f"job {job_id}: started")
    eventually(lambda: "started" in cp.result_now(job_id)["log"], what="first log line streamed")
    kill(first)
    second = start_agent()
    record = cp.result(job_id, wait=60)
    assert f"job {job_id}: adopted container" in second.log
    assert record["result"]["status"] == "succeeded", record["result"]
    assert record["result"]["output_payload"] == {"runs": 1}
    assert record["deliveries"] == 1
    assert record["log"] == "started\n"  # resumed where it was: nothing repeated, nothing lost
    eventually(lambda: not containers(docker_client, f"radix.job_id={job_id}"), what="container removed")


@pytest.mark.engine
def test_a_job_that_ended_while_no_agent_ran_is_collected_from_the_engine(cp, start_agent, docker_client):
    first = start_agent()
    script = 'echo run >> runs; echo "to stderr" >&2; sleep 2; echo "{\\"runs\\": $(wc -l < runs)}"'
    job_id = cp.submit(command=["sh", "-c", script])
    first.wait_for_log(f"job {job_id}: started")
    kill(first)
    eventually(lambda: docker_client.containers.list(all=True, filters={"label": f"radix.job_id={job_id}", "status": "exited"}),
               what="the container exited with no agent watching")
    second = start_agent()
    record = cp.result(job_id, wait=60)
    assert f"job {job_id}: adopted container" in second.log and "(exited)" in second.log
    # Its stdout JSON and its stderr come back from the engine's logs.
    assert record["result"]["status"] == "succeeded"
    assert record["result"]["output_payload"] == {"runs": 1}
    assert record["result"]["metrics"]["output_source"] == "stdout_json"
    assert "to stderr" in record["log"]
    assert record["deliveries"] == 1


@pytest.mark.engine
def test_an_adopted_job_keeps_its_deadline_and_can_be_canceled(cp, start_agent, docker_client):
    first = start_agent()
    timed = cp.submit(command=["sleep", "300"], timeout_seconds=6)
    first.wait_for_log(f"job {timed}: started")
    started = time.monotonic()
    time.sleep(2)
    kill(first)
    second = start_agent("--max-concurrent-jobs", "2")
    record = cp.result(timed, wait=60)
    assert record["result"]["failure_reason"] == "timeout"
    assert time.monotonic() - started < 12, "the deadline must count from the container's real start"
    canceled = cp.submit(command=["sleep", "300"])
    second.wait_for_log(f"job {canceled}: started")
    kill(second)
    start_agent()
    time.sleep(1)
    cp.cancel(canceled)
    assert cp.result(canceled, wait=30)["result"]["status"] == "canceled"


@pytest.mark.engine
@pytest.mark.parametrize("on_term", [
    # Ends cleanly, with output, a while after SIGTERM: judged by its exit alone it "succeeded".
    "trap 'sleep 3; echo {} > output.json; exit 0' TERM",
    # Ignores SIGTERM: the engine kills it when the grace ends, exit 137, read alone as the host's OOM killer.
    "trap '' TERM",
])
def test_a_job_canceled_just_before_the_agent_died_is_reported_canceled(cp, start_agent, on_term):
    first = start_agent()
    job_id = cp.submit(command=["sh", "-c", f"{on_term}; echo started; while true; do sleep 0.2; done"])
    eventually(lambda: "started" in cp.result_now(job_id)["log"], what="the job running")
    cp.cancel(job_id)
    first.wait_for_log(f"job {job_id}: cancel requested")
    time.sleep(1)
    kill(first)  # within the stop grace: the container has not ended yet
    second = start_agent()
    record = cp.result(job_id, wait=60)
    assert record["result"]["status"] == "canceled", record["result"]
    assert record["deliveries"] == 1
    assert "the last agent was stopping it (canceled)" in second.log


@pytest.mark.engine
def test_a_job_canceled_before_its_container_existed_stays_canceled_after_a_restart(cp, start_agent, docker_client):
    """A cancel while the job's input downloads (from a server that never answers): the next agent must not run it."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)  # accepts, never answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}/weights.bin"
        first = start_agent()
        job_id = cp.submit(command=["sh", "-c", "echo ran-after-cancel"], inputs=[{"url": url, "path": "w.bin"}])
        first.wait_for_log(f"job {job_id}: received")
        time.sleep(1)
        cp.cancel(job_id)
        first.wait_for_log(f"job {job_id}: cancel requested")
        kill(first)
        second = start_agent()
        record = cp.result(job_id, wait=60)
    assert record["result"]["status"] == "canceled", record["result"]
    assert "ran-after-cancel" not in record["log"] and record["deliveries"] == 1
    assert not containers(docker_client, f"radix.job_id={job_id}")


@pytest.mark.engine
def test_a_job_canceled_after_it_ended_keeps_its_own_verdict_after_a_restart(cp, start_agent):
    """The cancel comes while its artifact uploads, after its container exited 0: it succeeded, restart or not."""
    cp.fault("objects", delay=20)
    first = start_agent()
    job_id = cp.submit(command=["sh", "-c", "echo data > out.txt"], artifacts=["out.txt"])
    first.wait_for_log(f"job {job_id}: started")
    eventually(lambda: cp.result_now(job_id)["artifacts"], what="the upload planned")
    cp.cancel(job_id)
    first.wait_for_log(f"job {job_id}: cancel requested")
    kill(first)
    cp.fault("objects", clear=True)
    start_agent()
    record = cp.result(job_id, wait=90)
    assert record["result"]["status"] == "succeeded", record["result"]
    assert record["deliveries"] == 1


def test_agent_killed_after_the_job_ended_before_delivery(cp, start_agent, docker_client, tmp_path):
    cp.fault("complete", [503] * 1000)
    first = start_agent()
    job_id = cp.submit(command=counted(0))
    first.wait_for_log(f"job {job_id}: finished")
    spool = tmp_path / "jobs" / job_id / "result.json"
    eventually(spool.exists, what="result spooled")
    assert json.loads(spool.read_text())["status"] == "succeeded"
    kill(first)
    cp.fault("complete", clear=True)
    second = start_agent()
    record = cp.result(job_id, wait=60)
    assert "delivering the result a previous agent spooled" in second.log
    assert record["result"]["output_payload"] == {"runs": 1}
    assert record["deliveries"] == 1
    eventually(lambda: not (tmp_path / "jobs" / job_id).exists(), what="job directory removed")
    eventually(lambda: not containers(docker_client, f"radix.job_id={job_id}"), what="container removed")


def test_agent_killed_during_delivery(cp, start_agent, tmp_path):
    cp.fault("complete", delay=4)  # the server takes 4 s to answer
    first = start_agent()
    job_id = cp.submit(command=counted(0))
    first.wait_for_log(f"job {job_id}: finished")
    time.sleep(1)  # the complete call is in flight
    kill(first)
    cp.fault("complete", clear=True)
    start_agent()
    eventually(lambda: not (tmp_path / "jobs" / job_id).exists(), timeout=30, what="job directory removed")
    # The first delivery reached the server (it answers late), the second repeated it with the same key: one
    # result, recorded once, whichever landed first.
    record = eventually(lambda: (r := cp.result(job_id)) and r["deliveries"] == 2 and r, timeout=15, what="both deliveries")
    assert record["result"]["output_payload"] == {"runs": 1}
    assert record["idempotency_keys"] == [job_id, job_id]


def _left_by_a_killed_agent(cp, tmp_path, command):
    """A job the control plane handed out and whose directory an agent prepared before it was killed."""
    from cluster_agent.job_dir import JobDirectory, mark_layout

    job_id = cp.submit(command=command)
    spec = cp.result_now(job_id)["spec"]
    (tmp_path / "jobs").mkdir(exist_ok=True)
    mark_layout(tmp_path / "jobs")  # as the agent that was killed had
    JobDirectory(tmp_path / "jobs", job_id).prepare(spec, spec.get("input_payload"))
    return job_id, spec


def test_a_job_accepted_but_never_started_runs_once(cp, start_agent, tmp_path):
    job_id, _ = _left_by_a_killed_agent(cp, tmp_path, counted(0))
    agent = start_agent()
    record = cp.result(job_id, wait=60)
    assert "1 never started" in agent.log
    assert record["result"]["output_payload"] == {"runs": 1}
    assert record["deliveries"] == 1


@pytest.mark.engine
def test_a_container_created_but_never_started_is_started_once(cp, start_agent, docker_client, busybox, cluster_id, tmp_path):
    job_id, _ = _left_by_a_killed_agent(cp, tmp_path, counted(0))
    workspace = tmp_path / "jobs" / job_id / "workspace"
    docker_client.containers.create(
        busybox, counted(0), name=f"radix-{cluster_id}-{job_id}", working_dir="/workspace",
        volumes={str(workspace): {"bind": "/workspace", "mode": "rw"}},
        labels={"radix.cluster_id": cluster_id, "radix.job_id": job_id, "radix.timeout_seconds": "60", "radix.gpu_ids": ""},
    )
    agent = start_agent()
    record = cp.result(job_id, wait=60)
    assert f"job {job_id}: started its created container" in agent.log
    assert record["result"]["status"] == "succeeded"
    assert record["result"]["output_payload"] == {"runs": 1}
    assert record["deliveries"] == 1


def test_a_container_that_vanished_while_no_agent_watched_is_reported(cp, start_agent, tmp_path):
    from cluster_agent.job_dir import JobDirectory

    job_id, _ = _left_by_a_killed_agent(cp, tmp_path, counted(0))
    JobDirectory(tmp_path / "jobs", job_id).write_container("f" * 64)
    start_agent()
    result = cp.result(job_id, wait=60)["result"]
    assert result["failure_reason"] == "agent_error"
    assert "vanished" in result["error_message"]


def test_control_plane_down_for_a_while(plane, cp, start_agent):
    agent = start_agent("--heartbeat-interval", "1")
    job_id = cp.submit(command=counted(2))
    agent.wait_for_log(f"job {job_id}: started")
    plane.pause()
    down_at = time.time()
    time.sleep(10)  # the job ends while the control plane is away
    plane.resume()
    record = cp.result(job_id, wait=90)
    assert record["result"]["output_payload"] == {"runs": 1}
    assert record["deliveries"] == 1
    eventually(lambda: [h for h in cp.heartbeats() if h["at"] > down_at + 10], timeout=30, what="heartbeats resumed")
    outage_lines = [line for line in agent.log.splitlines() if "retrying in" in line]
    assert len(outage_lines) < 40, f"{len(outage_lines)} retries in 10 s: backoff is too tight"
    assert agent.proc.poll() is None


def test_503_storms_dropped_connections_and_slow_answers(cp, start_agent):
    cp.fault("poll", [503, 0, 503, 429, 0])
    cp.fault("complete", [503, 0, 502, 0, 504])
    cp.fault("heartbeat", [503, 0])
    cp.fault("logs", [0, 503])
    cp.fault("start", [0])
    agent = start_agent("--max-concurrent-jobs", "2")
    ids = [cp.submit(command=counted(0.5)) for _ in range(4)]
    records = [cp.result(job_id, wait=120) for job_id in ids]
    assert all(r["result"]["output_payload"] == {"runs": 1} for r in records)
    assert [r["deliveries"] for r in records] == [1, 1, 1, 1]
    cp.fault("poll", delay=3)
    cp.fault("complete", delay=2)
    slow = cp.result(cp.submit(command=counted(0)), wait=60)
    assert slow["result"]["output_payload"] == {"runs": 1} and slow["deliveries"] == 1
    assert agent.proc.poll() is None


def test_on_shutdown_leave_exits_fast_and_the_next_agent_finishes_the_job(cp, start_agent, docker_client):
    first = start_agent()
    job_id = cp.submit(command=counted(6))
    first.wait_for_log(f"job {job_id}: started")
    stopped = time.monotonic()
    assert first.terminate(timeout=20) == 0
    assert time.monotonic() - stopped < 10
    assert docker_client.containers.list(filters={"label": f"radix.job_id={job_id}", "status": "running"})
    assert [h["status"] for h in cp.heartbeats()][-1] == "draining"
    start_agent()
    record = cp.result(job_id, wait=60)
    assert record["result"]["status"] == "succeeded"
    assert record["result"]["output_payload"] == {"runs": 1}
    assert record["deliveries"] == 1


def test_max_jobs_exits_after_n_jobs(cp, start_agent):
    agent = start_agent("--max-jobs", "2", "--max-concurrent-jobs", "2")
    ids = [cp.submit(command=["true"]) for _ in range(3)]
    assert agent.proc.wait(60) == 0
    records = [cp.result_now(job_id) for job_id in ids]
    # Two jobs ran, once each, and the third was never handed out. (It once showed "assigned": the dev plane read
    # a capacity-0 poll the agent broke off mid-request as an empty body, max_jobs 1; fixed in the dev plane.)
    assert sorted(r["state"] for r in records) == ["done", "done", "queued"]
    assert sum(1 for r in records if r["result"] is not None) == 2
    assert agent.log.count(": received") == 2
    assert "--max-jobs 2 reached" in agent.log


def test_start_up_cleans_leftovers_and_leaves_what_it_cannot_explain(cp, start_agent, docker_client, cluster_id, busybox, tmp_path):
    jobs = tmp_path / "jobs"
    (jobs / "not a job").mkdir(parents=True)
    (jobs / "stray-dir").mkdir()
    leftover = docker_client.containers.create(busybox, ["true"], labels={"radix.cluster_id": cluster_id, "radix.job_id": "delivered-1"})
    stranger = docker_client.containers.create(busybox, ["true"], labels={"radix.cluster_id": "another-cluster", "radix.job_id": "x"})
    try:
        agent = start_agent()
        eventually(lambda: "leftover(s) removed" in agent.log, what="recovery summary")
        assert not containers(docker_client, "radix.job_id=delivered-1")
        assert docker_client.containers.get(stranger.id)  # another agent's: never touched
        assert (jobs / "not a job").exists() and (jobs / "stray-dir").exists()
        assert "not a job directory" in agent.log and "stray-dir has no readable job.json" in agent.log
    finally:
        stranger.remove(force=True)


def test_full_jobs_disk_fails_the_job_clearly_and_the_agent_keeps_going(cp, start_agent, tmp_path):
    with small_disk(tmp_path / "small-disk", "2m") as jobs:
        agent = start_agent("--min-free-disk-gb", "0", jobs_dir=jobs)
        big = cp.run(command=["true"], input_payload={"blob": "x" * 3_000_000})
        assert big["failure_reason"] == "agent_error"
        assert "No space left on device" in big["error_message"] and "--jobs-workdir" in big["error_message"]
        # A job that fills the disk itself: its result cannot be spooled, and is delivered all the same.
        filler = cp.run(command=["sh", "-c", "head -c 3000000 /dev/zero > fill; echo '{\"ok\": 1}'"])
        assert filler["output_payload"] == {"ok": 1}
        assert "not spooled" in agent.log
        eventually(lambda: not [p for p in jobs.iterdir() if not p.name.startswith(".")], what="the filler cleaned up")
        assert cp.run(command=["echo", '{"after": true}'])["output_payload"] == {"after": True}
        assert agent.proc.poll() is None


@pytest.mark.engine
def test_an_adopted_jobs_live_log_resumes_where_it_stopped_with_nothing_lost_or_repeated(cp, start_agent):
    first = start_agent()
    job_id = cp.submit(command=["sh", "-c", "i=1; while [ $i -le 12 ]; do echo tick $i; i=$((i+1)); sleep 1; done"])
    eventually(lambda: "tick 4" in cp.result_now(job_id)["log"], timeout=30, what="four ticks streamed")
    kill(first)
    start_agent()
    record = cp.result(job_id, wait=60)
    assert record["log"] == "".join(f"tick {i}\n" for i in range(1, 13)), record["log"]
    assert record["log_gaps"] == 0

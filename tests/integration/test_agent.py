"""The agent loop against the dev control plane: heartbeats, polling, faults, tokens, shutdown."""

import signal
import stat
import time

from tests.integration.conftest import TOKEN, eventually


def test_first_heartbeat_comes_before_the_first_poll(cp, start_agent):
    start_agent()
    eventually(lambda: cp.stats()["polls"] >= 1, what="first poll")
    first_heartbeat = cp.heartbeats()[0]
    first_poll = cp.stats()["last_polls"][0]
    assert first_heartbeat["at"] <= first_poll["at"]
    assert first_heartbeat["status"] == "active"
    caps = first_heartbeat["capabilities"]
    assert caps["cpu_count"] >= 1 and caps["memory_gb"] > 0
    assert caps["gpu_count"] == len(caps["gpus"])
    assert first_heartbeat["agent_version"]


def test_heartbeats_keep_their_timer_while_a_job_runs_and_a_poll_hangs(cp, start_agent):
    agent = start_agent("--heartbeat-interval", "1", "--max-concurrent-jobs", "2")
    cp.fault("poll", delay=8)  # every poll from now on hangs for 8 s before it is served
    job_id = cp.submit(command=["sleep", "12"])
    agent.wait_for_log(f"job {job_id}: started", timeout=30)
    window_start = time.time()
    time.sleep(5)  # a job runs and the next poll hangs all this time
    beats = [h for h in cp.heartbeats() if window_start <= h["at"] <= window_start + 5]
    assert len(beats) >= 4, f"only {len(beats)} heartbeats in 5 s with a 1 s interval"


def test_long_poll_picks_up_a_job_at_once(cp, start_agent):
    agent = start_agent("--poll-interval", "120")
    eventually(lambda: cp.stats()["polls"] >= 1, what="first poll")
    time.sleep(0.5)  # the agent is now parked in a long poll
    submitted = time.time()
    record = cp.result(cp.submit(command=["true"]))
    assert record["assigned_at"] - submitted < 1.0, "a long-polling agent should take a job within a second"
    assert agent.proc.poll() is None


def test_poll_body_carries_the_long_poll_extension(cp, start_agent):
    start_agent()
    poll = eventually(lambda: cp.stats()["last_polls"], what="a poll")[0]
    assert poll["max_jobs"] == 1 and poll["wait_seconds"] == 5 and poll["running_job_ids"] == [] and "free_gpus" in poll


def test_core_server_without_long_poll_is_polled_at_the_interval(plane, cp, start_agent):
    plane.state.long_poll = False
    start_agent("--poll-interval", "1")
    time.sleep(4.5)
    polls = cp.stats()["polls"]
    assert 3 <= polls <= 6, f"{polls} polls in 4.5 s with a 1 s interval"
    assert cp.run(command=["echo", "{}"])["status"] == "succeeded"


def test_poll_errors_are_retried_and_the_job_still_runs(cp, start_agent):
    cp.fault("poll", [503, 500, 502, 429, 0, 408])
    agent = start_agent()
    result = cp.run(command=["echo", '{"ok": 1}'], wait=90)
    assert result["output_payload"] == {"ok": 1}
    assert "retrying in" in agent.log
    assert agent.proc.poll() is None


def test_malformed_poll_answers_are_survived(cp, start_agent):
    cp.fault("poll", [1, 1])
    agent = start_agent()
    result = cp.run(command=["echo", '{"ok": 2}'], wait=90)
    assert result["output_payload"] == {"ok": 2}
    assert "not JSON" in agent.log


def test_completion_is_retried_and_delivered_exactly_once(cp, start_agent):
    cp.fault("complete", [500, 503, 0])
    start_agent()
    record = cp.result(cp.submit(command=["echo", '{"ok": 3}']), wait=90)
    assert record["result"]["output_payload"] == {"ok": 3}
    # The three failed attempts never reached the job record; one delivery landed, with the job id as key.
    assert record["deliveries"] == 1
    assert record["idempotency_keys"] == [record["job_id"]]
    assert cp.stats()["faults_complete"] == 3


def test_a_wrong_token_is_reported_and_polled_slowly(cp, start_agent):
    agent = start_agent(token="wrong-token-value")
    time.sleep(4)
    assert cp.stats()["polls"] <= 2, "a rejected token must not become a tight loop"
    assert "token rejected" in agent.log
    assert agent.proc.poll() is None
    assert "wrong-token-value" not in agent.log


def test_one_time_token_is_exchanged_and_saved(cp, start_agent, tmp_path):
    agent = start_agent("--one-time-token", "ott-good", token=None)
    eventually(lambda: cp.stats()["polls"] >= 1, what="a poll with the exchanged token")
    token_file = tmp_path / "token"
    assert token_file.read_text().strip() == TOKEN
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert agent.terminate() == 0
    # The one-time token is spent; a restart uses the saved token and does not exchange again.
    second = start_agent("--one-time-token", "ott-good", token=None)
    before = cp.stats()["polls"]
    eventually(lambda: cp.stats()["polls"] > before, what="a poll after restart")
    assert cp.stats()["exchanges"] == 1
    assert TOKEN not in agent.log + second.log and "ott-good" not in agent.log + second.log


def test_a_spent_one_time_token_is_a_clear_start_up_error(cp, start_agent):
    agent = start_agent("--one-time-token", "ott-unknown", token=None, wait_ready=False)
    assert agent.proc.wait(30) == 2
    assert "one-time-token" in agent.log and "rejected" in agent.log
    assert "Traceback" not in agent.log


def test_sigterm_with_on_shutdown_cancel_interrupts_the_running_job_and_exits_0(cp, start_agent, docker_client, cluster_id):
    agent = start_agent("--shutdown-grace", "8", "--on-shutdown", "cancel")
    job_id = cp.submit(command=["sleep", "300"])
    agent.wait_for_log(f"job {job_id}: started")
    started = time.monotonic()
    code = agent.terminate(timeout=30)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 8, f"exited after {elapsed:.1f} s, over the 8 s grace"
    record = cp.result(job_id, wait=1)
    assert record["result"]["status"] == "failed"
    assert record["result"]["failure_reason"] == "interrupted"
    assert record["deliveries"] == 1
    assert [h["status"] for h in cp.heartbeats()][-1] == "draining"
    assert docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.cluster_id={cluster_id}"}) == []


def test_sigterm_when_idle_exits_promptly(cp, start_agent):
    agent = start_agent("--long-poll-seconds", "25")
    eventually(lambda: cp.stats()["polls"] >= 1, what="first poll")
    time.sleep(0.5)
    started = time.monotonic()
    assert agent.terminate(timeout=40) == 0
    # The draining heartbeat releases the held poll on a server that knows it; well within the grace anyway.
    assert time.monotonic() - started < 10


def test_a_second_signal_exits_at_once(cp, start_agent):
    agent = start_agent("--shutdown-grace", "60", "--on-shutdown", "cancel")
    job_id = cp.submit(command=["sleep", "300"])
    agent.wait_for_log(f"job {job_id}: started")
    agent.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    agent.proc.send_signal(signal.SIGINT)
    assert agent.proc.wait(10) != 0


def test_the_token_never_appears_in_logs(cp, start_agent):
    cp.fault("heartbeat", [500])
    cp.fault("complete", [503])
    agent = start_agent("--log-level", "DEBUG")
    cp.run(command=["sh", "-c", "exit 1"])
    agent.terminate()
    assert TOKEN not in agent.log
    assert "heartbeat" in agent.log  # DEBUG did log the exchanges

"""What an operator sees: /metrics, /healthz, JSON logs."""

import json
import socket
import urllib.error
import urllib.request

from tests.integration.conftest import TOKEN, eventually


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starting with {line_start!r}")


def test_metrics_count_jobs_latencies_and_errors(cp, start_agent):
    port = free_port()
    cp.fault("poll", [503])
    start_agent("--metrics-port", str(port), "--metrics-host", "127.0.0.1")
    assert cp.run(command=["echo", "{}"])["status"] == "succeeded"
    assert cp.run(command=["sh", "-c", "exit 4"])["failure_reason"] == "exit_code"
    status, text = eventually(lambda: (r := get(port, "/metrics")) and 'status="failed"' in r[1] and r, what="job metrics")
    assert status == 200
    assert metric(text, 'radix_agent_jobs_total{failure_class="",failure_reason="",status="succeeded"}') == 1
    assert metric(text, 'radix_agent_jobs_total{failure_class="job",failure_reason="exit_code",status="failed"}') == 1
    assert metric(text, "radix_agent_job_duration_seconds_count") == 2
    assert metric(text, "radix_agent_poll_seconds_count") >= 2
    assert metric(text, "radix_agent_completion_seconds_count") >= 1
    # Both jobs' containers exited by the engine's clock, and each result went out after that (never negative):
    # the agent's own dead time after a job, measured by itself.
    assert metric(text, "radix_agent_result_after_exit_seconds_count") == 2
    assert 0 <= metric(text, "radix_agent_result_after_exit_seconds_sum") < 60
    assert metric(text, 'radix_agent_control_plane_errors_total{endpoint="poll",kind="http_5xx"}') == 1
    assert 0 <= metric(text, "radix_agent_heartbeat_age_seconds") < 60
    # A job holds its slot until its workspace and container are removed, which may end just after its delivery.
    eventually(lambda: metric(get(port, "/metrics")[1], "radix_agent_running_jobs") == 0, what="slots freed")
    assert metric(get(port, "/metrics")[1], "radix_agent_free_slots") == 1
    text = get(port, "/metrics")[1]
    assert metric(text, "radix_agent_quarantined") == 0 and metric(text, "radix_agent_disk_low") == 0
    assert metric(text, "radix_agent_results_pending") == 0


def test_healthz_follows_the_control_plane(plane, cp, start_agent):
    port = free_port()
    start_agent("--metrics-port", str(port), "--health-stale-seconds", "3", "--long-poll-seconds", "1")
    status, body = eventually(lambda: (r := get(port, "/healthz")) and r[0] == 200 and r, what="healthy")
    assert json.loads(body)["poll_loop_alive"] is True
    plane.pause()
    try:
        status, body = eventually(lambda: (r := get(port, "/healthz")) and r[0] == 503 and r, timeout=20, what="unhealthy")
        assert json.loads(body)["healthy"] is False and json.loads(body)["last_control_plane_exchange_seconds_ago"] >= 3
    finally:
        plane.resume()
    eventually(lambda: get(port, "/healthz")[0] == 200, timeout=30, what="healthy again")


def test_a_busy_metrics_port_is_a_clear_start_up_error(start_agent):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agent = start_agent("--metrics-port", str(taken.getsockname()[1]), "--metrics-host", "127.0.0.1", wait_ready=False)
        assert agent.proc.wait(30) == 2
    assert "--metrics-port / RADIX_METRICS_PORT" in agent.log and "Traceback" not in agent.log


def test_json_logs_carry_job_fields_and_never_the_token(cp, start_agent):
    agent = start_agent("--log-format", "json")
    job_id = cp.submit(command=["echo", "{}"])
    cp.result(job_id)
    eventually(lambda: '"event": "delivered"' in agent.log, what="delivered event")
    agent.terminate()
    lines = [json.loads(line) for line in agent.log.splitlines() if line.strip()]
    events = {line["event"]: line for line in lines if line.get("job_id") == job_id}
    assert {"received", "started", "finished", "delivered"} <= set(events)
    assert events["finished"]["status"] == "succeeded" and events["finished"]["duration_s"] >= 0
    assert TOKEN not in agent.log

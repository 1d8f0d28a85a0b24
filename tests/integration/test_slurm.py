"""--execution-mode slurm against a REAL Slurm cluster: Debian's slurmctld + slurmd + munge, one controller and one
node (this machine), started by scripts/slurm_lab.py, running job containers on the real Docker engine.

The node has two count-only GPUs backed by fake device files: Slurm schedules `--gres=gpu:N` and sets
SLURM_JOB_GPUS, the Docker engine here has no NVIDIA runtime, so a GPU job reaches the node and fails there with
the engine's own words (the GPU arguments themselves are checked in tests/test_slurm.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, eventually

sys.path.insert(0, str(ROOT / "scripts"))
import slurm_lab  # noqa: E402


@pytest.fixture(scope="module")
def slurm():
    slurm_lab.start()
    yield
    # Leave no job of these tests behind; the daemons stay for the next module run only if they were already up.
    subprocess.run(["scancel", "--user=root", "--name=radix-storage-probe"], check=False)
    slurm_lab.stop()


def slurm_jobs(name_prefix: str) -> list[dict]:
    out = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i|%T|%j"], capture_output=True, text=True, check=True).stdout
    jobs = []
    for line in out.splitlines():
        job_id, state, name = line.split("|", 2)
        if name.startswith(name_prefix):
            jobs.append({"id": job_id, "state": state, "name": name})
    return jobs


def node_containers(docker_client, cluster_id: str) -> list:
    return docker_client.containers.list(all=True, filters={"label": f"radix.cluster_id={cluster_id}"})


@pytest.fixture
def slurm_agent(slurm, start_agent, busybox):
    def start(*extra: str, **kwargs):
        return start_agent("--execution-mode", "slurm", "--slurm-poll-interval", "0.5", *extra, **kwargs)

    return start


def test_a_job_runs_through_slurm_and_delivers_output_and_logs(slurm_agent, cp, plane, cluster_id, docker_client):
    agent = slurm_agent()
    agent.wait_for_log("shared with the Slurm nodes")
    job_id = cp.submit(
        command=["sh", "-c", 'echo "hello from $(cat /workspace/input.json)"; echo warn >&2; '
                 'echo "{\\"slurm_job\\": \\"$RADIX_JOB_ID\\"}" > output.json'],
        input_payload={"x": 1},
    )
    record = cp.result(job_id, wait=90)
    result = record["result"]
    assert result["status"] == "succeeded", result
    assert result["output_payload"] == {"slurm_job": job_id}
    assert 'hello from {"x": 1}' in record["log"] and "warn" in record["log"]
    slurm_id = record["started"]["container_id"]
    assert slurm_id.isdigit()
    [job] = [j for j in slurm_jobs(f"radix-{cluster_id}-") if j["id"] == slurm_id]
    assert job["name"] == f"radix-{cluster_id}-{job_id}" and job["state"] == "COMPLETED"
    # Delivered: the job directory, its Slurm state directory and the node's container are gone.
    eventually(lambda: not (agent.jobs_dir / job_id).exists() and not (agent.jobs_dir / ".radix-slurm" / job_id).exists(),
               what="job and state directories removed")
    assert node_containers(docker_client, cluster_id) == []
    # The heartbeat describes the cluster, not the login node.
    beat = eventually(lambda: [h for h in cp.heartbeats() if "slurm" in h["capabilities"]], what="a heartbeat")[-1]
    caps = beat["capabilities"]
    assert caps["execution_mode"] == "slurm" and caps["gpu_count"] == 2
    assert caps["slurm"]["partitions"][0]["name"] == "debug" and caps["slurm"]["partitions"][0]["gpus"] == 2


def test_timeout_cancel_and_exit_code_map_to_the_contract(slurm_agent, cp, cluster_id, docker_client):
    slurm_agent("--max-concurrent-jobs", "3")
    timed = cp.submit(command=["sleep", "60"], timeout_seconds=4)
    failing = cp.submit(command=["sh", "-c", "echo broken >&2; exit 3"])
    canceled = cp.submit(command=["sleep", "60"])
    eventually(lambda: cp.result_now(canceled)["started"], timeout=60, what="the job to be running in Slurm")
    cp.cancel(canceled)

    result = cp.result(timed, wait=90)["result"]
    assert result["status"] == "failed" and result["failure_reason"] == "timeout", result
    assert result["metrics"]["runtime_seconds"] < 30

    result = cp.result(failing, wait=90)["result"]
    assert result["failure_reason"] == "exit_code" and result["metrics"]["exit_code"] == 3
    assert "broken" in result["error_message"]

    result = cp.result(canceled, wait=90)["result"]
    assert result["status"] == "canceled" and result["failure_reason"] == "canceled", result
    states = {j["name"].rsplit("-", 1)[-1]: j["state"] for j in slurm_jobs(f"radix-{cluster_id}-")}
    assert states[canceled.rsplit("-", 1)[-1]] == "CANCELLED"
    eventually(lambda: node_containers(docker_client, cluster_id) == [], what="containers on the node removed")


def test_node_side_failures_map_to_the_right_reasons(slurm_agent, cp, cluster_id):
    slurm_agent("--max-concurrent-jobs", "2")
    # The node cannot pull the image: image_unavailable, with the engine's reason.
    result = cp.run(wait=90, image="127.0.0.1:9/radix-test/missing:1", command=["true"])
    assert result["failure_reason"] == "image_unavailable", result
    assert "cannot pull 127.0.0.1:9/radix-test/missing:1 on Slurm node" in result["error_message"]

    # The node fails under a running job: Slurm ends it NODE_FAIL; the job did not fail by itself.
    job_id = cp.submit(command=["sleep", "120"])
    eventually(lambda: cp.result_now(job_id)["started"], timeout=60, what="the job to run")
    try:
        subprocess.run(["scontrol", "update", "NodeName=localhost", "State=DOWN", "Reason=radix-test-node-failure"],
                       check=True)
        result = cp.result(job_id, wait=90)["result"]
    finally:
        subprocess.run(["scontrol", "update", "NodeName=localhost", "State=RESUME"], check=False)
    assert result["status"] == "failed" and result["failure_reason"] == "agent_error", result
    assert "node" in result["error_message"] and "resubmit" in result["error_message"]

    # A GPU job reaches the node with the GPUs Slurm allocated; this engine cannot inject them, and says so.
    eventually(lambda: subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip() == "idle",
               timeout=60, what="the node back")
    record = cp.result(cp.submit(command=["true"], resources={"gpus": 1}), wait=90)
    assert record["result"]["failure_reason"] == "agent_error", record["result"]
    assert "GPUs 0 on node localhost" in record["log"] or "GPUs 1 on node localhost" in record["log"]
    assert "could not start" in record["result"]["error_message"]

    # More GPUs than any node has: Slurm refuses at submission, in its own words.
    result = cp.run(wait=60, command=["true"], resources={"gpus": 3})
    assert result["failure_reason"] == "invalid_job", result
    assert "Slurm refused the job" in result["error_message"]


def test_a_restarted_agent_adopts_its_slurm_job(slurm_agent, cp, cluster_id, tmp_path):
    first = slurm_agent()
    job_id = cp.submit(command=["sh", "-c", "echo started >&2; sleep 20; echo '{\"done\": true}'"])
    eventually(lambda: cp.result_now(job_id)["started"], timeout=60, what="the job to run")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    second = slurm_agent(jobs_dir=first.jobs_dir)
    record = cp.result(job_id, wait=90)
    assert record["result"]["status"] == "succeeded", record["result"]
    assert record["result"]["output_payload"] == {"done": True}
    assert record["result"]["metrics"]["runtime_seconds"] >= 19
    assert record["deliveries"] == 1
    assert "(running)" in second.log.split("adopted", 1)[1].splitlines()[0]  # it was still running when adopted
    assert record["log"].count("started") == 1
    assert len(slurm_jobs(f"radix-{cluster_id}-{job_id}")) == 1  # adopted, not submitted again


def test_without_slurm_commands_the_agent_says_what_to_do(slurm, cp, plane, cluster_id, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIX_")}
    env["PATH"] = str(Path(sys.executable).parent)  # python, but no sbatch
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--api-base", plane.url, "--cluster-id", cluster_id,
         "--cluster-token", "x", "--jobs-workdir", str(tmp_path / "jobs"), "--execution-mode", "slurm"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 2
    assert "sbatch" in done.stderr and "login node" in done.stderr


def test_a_job_never_sees_the_agents_token(slurm_agent, cp):
    slurm_agent(env={"RADIX_CLUSTER_TOKEN": "integration-cluster-token"}, token=None)
    result = cp.run(wait=90, command=["sh", "-c", "env"])
    assert "integration-cluster-token" not in json.dumps(result)
    assert "RADIX_CLUSTER_TOKEN" not in json.dumps(result)


def test_queued_jobs_can_be_canceled_and_are_adopted_before_they_start(slurm_agent, cp, cluster_id):
    first = slurm_agent("--max-concurrent-jobs", "2")
    first.wait_for_log("agent starting")
    prefix = f"radix-{cluster_id}-"
    subprocess.run(["scontrol", "update", "PartitionName=debug", "State=DOWN"], check=True)
    try:
        doomed = cp.submit(command=["true"])
        later = cp.submit(command=["sh", "-c", "echo '{\"ran\": true}'"])
        eventually(lambda: len([j for j in slurm_jobs(prefix) if j["state"] == "PENDING"]) == 2, timeout=30,
                   what="both jobs queued in Slurm")

        cp.cancel(doomed)
        record = cp.result(doomed, wait=60)
        assert record["result"]["status"] == "canceled", record["result"]
        assert record["started"] is None  # it never ran: no start call

        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = slurm_agent("--max-concurrent-jobs", "2", jobs_dir=first.jobs_dir)
        second.wait_for_log("(pending)")
        assert cp.result_now(later)["started"] is None
    finally:
        subprocess.run(["scontrol", "update", "PartitionName=debug", "State=UP"], check=False)
    record = cp.result(later, wait=90)
    assert record["result"]["status"] == "succeeded" and record["result"]["output_payload"] == {"ran": True}
    assert record["started"]["container_id"].isdigit()  # the adopting agent sent the start call when Slurm ran it
    assert len(slurm_jobs(f"{prefix}{later}")) == 1


def test_a_jobs_directory_the_nodes_do_not_see_is_refused_at_start_up(slurm, plane, cluster_id, tmp_path):
    # The agent gets a private tmpfs over its jobs directory (its own mount namespace); slurmd, like a node
    # without the shared mount, sees only the empty directory underneath. The probe job finds no token there.
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIX_")}
    agent = [sys.executable, str(ROOT / "main.py"), "--api-base", plane.url, "--cluster-id", cluster_id,
             "--cluster-token", "x", "--token-file", str(tmp_path / "token"), "--jobs-workdir", str(jobs),
             "--execution-mode", "slurm", "--slurm-storage-probe-seconds", "60", "--metrics-port", "0"]
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                           f'mount -t tmpfs radix-private "{jobs}" && exec "$@"', "sh", *agent],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert "a probe job on the Slurm nodes could not see it" in done.stderr
    assert "put --jobs-workdir on storage the nodes mount at the same path" in done.stderr


def test_a_slurm_controller_restart_mid_job_loses_nothing(slurm_agent, cp, cluster_id):
    agent = slurm_agent()
    job_id = cp.submit(command=["sh", "-c", "echo one >&2; sleep 12; echo two >&2; echo '{\"survived\": true}'"])
    eventually(lambda: cp.result_now(job_id)["started"], timeout=60, what="the job to run")
    slurm_lab.stop_controller()
    try:
        agent.wait_for_log("taking no jobs until it answers again", timeout=60)
        time.sleep(3)
    finally:
        slurm_lab.start()
    record = cp.result(job_id, wait=120)
    assert record["result"]["status"] == "succeeded", record["result"]
    assert record["result"]["output_payload"] == {"survived": True}
    assert record["deliveries"] == 1 and len(slurm_jobs(f"radix-{cluster_id}-{job_id}")) == 1
    assert record["log"].count("one") == 1 and record["log"].count("two") == 1
    agent.wait_for_log("the Slurm controller answers again", timeout=60)


def test_settings_slurm_would_refuse_stop_the_agent_at_start_up(slurm, plane, cluster_id, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADIX_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "main.py"), "--api-base", plane.url, "--cluster-id", cluster_id,
         "--cluster-token", "x", "--token-file", str(tmp_path / "token"), "--jobs-workdir", str(tmp_path / "jobs"),
         "--execution-mode", "slurm", "--slurm-partition", "no-such-partition", "--metrics-port", "0"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert done.returncode == 2
    assert "Slurm would refuse every job" in done.stderr and "invalid partition specified" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1

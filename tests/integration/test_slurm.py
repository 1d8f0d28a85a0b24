"""--execution-mode slurm against a REAL Slurm cluster: Debian's slurmctld + slurmd + munge, one controller and two
nodes (two slurmds on this machine, node1 at 127.0.0.2 and node2 at 127.0.0.3), started by scripts/slurm_lab.py,
running job containers on the real Docker engine. Single-node jobs go to partition `debug` (node1 alone); the
multi-node jobs to partition `multi` (both).

Each node has two count-only GPUs backed by fake device files: Slurm schedules `--gres=gpu:N` and sets
SLURM_JOB_GPUS, the Docker engine here has no NVIDIA runtime, so a GPU job reaches the node and fails there with
the engine's own words (the GPU arguments themselves are checked in tests/test_slurm.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from devplane.images import ensure_busybox_image

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
    assert caps["execution_mode"] == "slurm" and caps["gpu_count"] == 4  # two nodes, two GPUs each
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
        subprocess.run(["scontrol", "update", "NodeName=node1", "State=DOWN", "Reason=radix-test-node-failure"],
                       check=True)
        result = cp.result(job_id, wait=90)["result"]
    finally:
        subprocess.run(["scontrol", "update", "NodeName=node1", "State=RESUME"], check=False)
    assert result["status"] == "failed" and result["failure_reason"] == "agent_error", result
    assert "node" in result["error_message"] and "resubmit" in result["error_message"]

    # A GPU job reaches the node with the GPUs Slurm allocated; this engine cannot inject them, and says so.
    eventually(lambda: subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%t"], capture_output=True,
                                      text=True).stdout.strip() == "idle", timeout=60, what="the node back")
    record = cp.result(cp.submit(command=["true"], resources={"gpus": 1}), wait=90)
    assert record["result"]["failure_reason"] == "agent_error", record["result"]
    assert "GPUs 0 on node node1" in record["log"] or "GPUs 1 on node node1" in record["log"]
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


# --- multi-node jobs (partition multi: node1 and node2) ---------------------------------------------------------

# Rank 0 listens at MASTER_PORT; every other rank connects to MASTER_ADDR:MASTER_PORT (retrying until rank 0
# listens) and sends its rank and node; rank 0 writes what it received into output.json. Each says what it got.
RENDEZVOUS = r"""
echo "rank $NODE_RANK (RANK $RANK) of NNODES $NNODES WORLD_SIZE $WORLD_SIZE on $RADIX_SLURM_NODE, master $MASTER_ADDR:$MASTER_PORT"
echo "interfaces: $(cut -d: -f1 /proc/net/dev | tail -n +3 | tr -d ' ' | sort | tr '\n' ' ')"
if [ "$NODE_RANK" = 0 ]; then
  set -- $(nc -l -p "$MASTER_PORT")
  printf '{"ranks": [%s, %s], "nodes": ["%s", "%s"], "world_size": %s, "master": "%s:%s"}' \
    "$NODE_RANK" "$1" "$RADIX_SLURM_NODE" "$2" "$WORLD_SIZE" "$MASTER_ADDR" "$MASTER_PORT" > /workspace/output.json
else
  until echo "$NODE_RANK $RADIX_SLURM_NODE" | nc "$MASTER_ADDR" "$MASTER_PORT" 2>/dev/null; do sleep 0.2; done
  echo "rank $NODE_RANK reached rank 0" >&2
fi
"""


@pytest.fixture
def multi_agent(slurm_agent):
    def start(*extra: str, **kwargs):
        return slurm_agent("--slurm-partition", "multi", *extra, **kwargs)

    return start


def test_a_two_node_job_meets_at_master_addr_and_rank_0_reports_every_rank(multi_agent, cp, cluster_id, docker_client):
    # --job-network none for single-node jobs; the two-node job still gets the network between its nodes.
    multi_agent("--job-network", "none")
    job_id = cp.submit(command=["sh", "-c", RENDEZVOUS], orchestration={"nodes": 2}, timeout_seconds=60)
    record = cp.result(job_id, wait=90)
    result = record["result"]
    assert result["status"] == "succeeded", (result, record["log"])
    payload = result["output_payload"]
    # Rank 0 heard rank 1 over TCP; MASTER_ADDR is node1's address as Slurm knows it (NodeAddr), the port the one
    # the agent drew for the job (launch.sh says it).
    port = _master_port(record["log"])
    assert payload == {"ranks": [0, 1], "nodes": ["node1", "node2"], "world_size": 2, "master": f"127.0.0.2:{port}"}
    log = record["log"]
    assert "[node 0 node1] rank 0 (RANK 0) of NNODES 2 WORLD_SIZE 2 on node1" in log, log
    assert "[node 1 node2] rank 1 (RANK 1) of NNODES 2 WORLD_SIZE 2 on node2" in log, log
    assert "[node 1 node2] rank 1 reached rank 0" in log
    assert "interfaces: lo \n" not in log and "interfaces: " in log  # the node's network, not just a loopback
    [job] = [j for j in slurm_jobs(f"radix-{cluster_id}-{job_id}")]
    assert job["state"] == "COMPLETED"
    nodes = subprocess.run(["squeue", "-h", "-t", "all", "-j", job["id"], "-o", "%N"], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert nodes == "node[1-2]"  # one Slurm job of two nodes
    eventually(lambda: node_containers(docker_client, cluster_id) == [], what="every node's container removed")

    # A single-node job of the same agent has no network but its loopback; the two-node job's had the node's.
    record = cp.result(cp.submit(command=["sh", "-c", "cut -d: -f1 /proc/net/dev | tail -n +3"]), wait=90)
    assert record["result"]["status"] == "succeeded" and record["log"].split() == ["lo"], record


def test_a_node_that_fails_fails_the_job_and_every_other_node_is_stopped(multi_agent, cp, cluster_id, docker_client):
    multi_agent()
    started = time.monotonic()
    result = cp.run(wait=90, orchestration={"nodes": 2}, timeout_seconds=120, command=[
        "sh", "-c", 'if [ "$NODE_RANK" = 1 ]; then echo "rank 1 gives up" >&2; exit 3; fi; sleep 100'])
    assert result["status"] == "failed" and result["failure_reason"] == "exit_code", result
    assert result["metrics"]["exit_code"] == 3
    assert "node node2 (rank 1 of 2 nodes) exited with code 3" in result["error_message"]
    assert "rank 1 gives up" in result["error_message"]  # the stderr tail, prefixed by its node
    assert time.monotonic() - started < 60  # rank 0 was stopped, not left to sleep
    eventually(lambda: node_containers(docker_client, cluster_id) == [], what="every node's container removed")


def test_canceling_a_two_node_job_stops_every_node(multi_agent, cp, cluster_id, docker_client):
    multi_agent()
    job_id = cp.submit(orchestration={"nodes": 2}, command=["sh", "-c", "echo up; sleep 100"])
    eventually(lambda: len([c for c in node_containers(docker_client, cluster_id) if c.status == "running"]) == 2,
               timeout=60, what="a running container on each node")
    ranks = sorted(c.labels["radix.node_rank"] for c in node_containers(docker_client, cluster_id))
    assert ranks == ["0", "1"]
    cp.cancel(job_id)
    result = cp.result(job_id, wait=90)["result"]
    assert result["status"] == "canceled", result
    assert [j["state"] for j in slurm_jobs(f"radix-{cluster_id}-{job_id}")] == ["CANCELLED"]
    eventually(lambda: node_containers(docker_client, cluster_id) == [], what="every node's container removed")


# A stand-in for torchrun (no PyTorch in the test image): it says how it was called, then meets the other nodes the
# way torchrun's static rendezvous does, by --node_rank at --rdzv-endpoint; rank 0 writes who came.
FAKE_TORCHRUN = r"""#!/bin/sh
echo "torchrun $*"
for arg; do
  case "$arg" in
    --node_rank=*) rank=${arg#*=} ;;
    --rdzv-endpoint=*) endpoint=${arg#*=} ;;
    --*) ;;
    *) break ;;
  esac
  shift
done
if [ "$rank" = 0 ]; then
  peer=$(nc -l -p "${endpoint#*:}")
  printf '{"ranks": [0, %s], "endpoint": "%s", "script": "%s"}' "$peer" "$endpoint" "$*" > /workspace/output.json
else
  until echo "$rank" | nc "${endpoint%:*}" "${endpoint#*:}" 2>/dev/null; do sleep 0.2; done
fi
"""


def test_a_two_node_torchrun_job_runs_torchrun_on_each_node_with_its_rank_and_the_rendezvous(
        multi_agent, cp, docker_client, tmp_path):
    script = tmp_path / "torchrun"
    script.write_text(FAKE_TORCHRUN)
    image = ensure_busybox_image(docker_client, "radix-test/fake-torchrun:1", {"bin/torchrun": str(script)})
    multi_agent()
    record = cp.result(cp.submit(image=image, command=["python", "train.py"], args=["--epochs", "1"],
                                 orchestration={"nodes": 2, "launcher": "torchrun"}, timeout_seconds=60), wait=90)
    assert record["result"]["status"] == "succeeded", (record["result"], record["log"])
    port = _master_port(record["log"])
    assert record["result"]["output_payload"] == {"ranks": [0, 1], "endpoint": f"127.0.0.2:{port}",
                                                  "script": "train.py --epochs 1"}
    for rank, node in ((0, "node1"), (1, "node2")):
        assert (f"[node {rank} {node}] torchrun --nnodes=2 --node_rank={rank} --nproc_per_node=1 "
                f"--rdzv-backend=static --rdzv-endpoint=127.0.0.2:{port} train.py --epochs 1") in record["log"]


def test_a_two_node_gpu_job_gets_the_gpus_slurm_gave_each_node(multi_agent, cp):
    multi_agent()
    record = cp.result(cp.submit(command=["true"], orchestration={"nodes": 2}, resources={"gpus": 1}), wait=90)
    # Each node takes its own GPU from Slurm; this engine has no NVIDIA runtime, and the node that says so is named.
    assert re.search(r"GPUs [01] on node node1", record["log"]) and re.search(r"GPUs [01] on node node2", record["log"])
    result = record["result"]
    assert result["failure_reason"] == "agent_error", result
    assert re.search(r"on Slurm node node[12] (created the container but )?could not", result["error_message"]), result


def test_a_restarted_agent_adopts_a_running_two_node_job(multi_agent, cp, cluster_id):
    first = multi_agent()
    job_id = cp.submit(orchestration={"nodes": 2}, command=[
        "sh", "-c", 'echo "started $NODE_RANK"; sleep 8; [ "$NODE_RANK" = 0 ] && echo "{\\"done\\": true}" > output.json; true'])
    eventually(lambda: cp.result_now(job_id)["started"], timeout=60, what="the job to run")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)

    multi_agent(jobs_dir=first.jobs_dir)
    record = cp.result(job_id, wait=90)
    assert record["result"]["status"] == "succeeded", record["result"]
    assert record["result"]["output_payload"] == {"done": True}
    assert record["deliveries"] == 1 and len(slurm_jobs(f"radix-{cluster_id}-{job_id}")) == 1
    # The successor resumed the log where the control plane had it: each node's line once.
    assert record["log"].count("[node 0 node1] started 0") == 1 and record["log"].count("[node 1 node2] started 1") == 1


def test_docker_mode_refuses_a_multi_node_job_naming_slurm_mode(start_agent, cp, busybox):
    start_agent()
    result = cp.run(wait=60, command=["true"], orchestration={"nodes": 2})
    assert result["status"] == "failed" and result["failure_reason"] == "invalid_job", result
    assert "asks for 2 nodes" in result["error_message"] and "--execution-mode slurm" in result["error_message"]


def _master_port(log: str) -> int:
    import re

    port = int(re.search(r"MASTER_PORT=(\d+)", log).group(1))
    assert 20000 <= port < 32000, port
    return port


def test_more_nodes_than_the_partition_has_is_invalid_not_queued_forever(multi_agent, cp):
    # The lab's partition `multi` has two nodes; slurm.conf's default EnforcePartLimits=NO lets sbatch accept three
    # (pending PartitionConfig or PartitionNodeLimit, as the Slurm version words it).
    multi_agent()
    record = cp.result(cp.submit(command=["true"], orchestration={"nodes": 3}, timeout_seconds=60), wait=60)
    result = record["result"]
    assert result["status"] == "failed" and result["failure_reason"] == "invalid_job", result
    assert "pending: Partition" in result["error_message"] and "fewer nodes" in result["error_message"]

"""The Slurm mode's pure parts: Slurm output parsing, the sbatch arguments, the batch script (run with a fake
container engine to see the exact arguments it gets), and how Slurm's ends map to the contract. The real cluster
is in tests/integration/test_slurm.py."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster_agent.errors import ConfigError
from cluster_agent.executors import ContainerSpec
from cluster_agent.executors.slurm.executor import SlurmExecutor
from cluster_agent.executors.slurm.script import batch_script, node_script, sbatch_args
from cluster_agent.models import FailureReason
from cluster_agent.received_job import ReceivedJob
from cluster_agent.settings import Settings
from cluster_agent.executors.slurm.cli import SlurmJob, parse_scontrol_record, parse_squeue
from cluster_agent.executors.slurm.cluster import check_shared_storage, gpu_count


def spec(tmp_path: Path, **overrides) -> ContainerSpec:
    values = dict(
        name="radix-c1-job-1", image="registry.example.com/team/train:2", command=["python", "-c", "print('hi')"],
        env={"RADIX_JOB_ID": "job-1", "TRICKY": "it's \"quoted\" $HOME `x`\nsecond line"},
        workspace=tmp_path / "jobs" / "job-1",
        labels={"radix.job_id": "job-1", "radix.cluster_id": "c1", "radix.timeout": "600"},
        cpus=3.5, memory_mb=2048, shm_mb=512, pids_limit=100, cap_drop=["NET_RAW"], gpu_count=2, timeout_seconds=600,
    )
    values.update(overrides)
    return ContainerSpec(**values)


def settings(tmp_path: Path, **values) -> Settings:
    return Settings(jobs_workdir=tmp_path / "jobs", cluster_id="c1", execution_mode="slurm", **values)


# --- parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gres, count", [
    ("gpu:4", 4), ("gpu:h100:8(S:0-1)", 8), ("gpu:a100:2,gpu:h100:4", 6), ("gpu:0(IDX:N/A)", 0),
    ("(null)", 0), ("", 0), ("gpu:h100:2(IDX:0-1),mps:100", 2),
])
def test_gpu_count_reads_slurm_gres_strings(gres, count):
    assert gpu_count(gres) == count


def test_squeue_lines_parse_and_names_may_hold_the_separator():
    jobs = parse_squeue("12|RUNNING|2026-11-23T06:41:32|node7|None|radix-c1-a|b\n13|PENDING|N/A||Resources|radix-c1-x\n")
    assert jobs[0] == SlurmJob(job_id="12", state="RUNNING", name="radix-c1-a|b", nodes="node7", reason="None",
                               start_time=jobs[0].start_time)
    assert jobs[0].start_time is not None and not jobs[0].terminal and not jobs[0].queued
    assert jobs[1].queued and jobs[1].start_time is None


def test_scontrol_records_keep_values_with_spaces():
    fields = parse_scontrol_record("JobId=5 JobName=radix-c1-j JobState=NODE_FAIL Reason=Node failure here "
                                   "ExitCode=0:9 NodeList=node3")
    assert fields["JobState"] == "NODE_FAIL" and fields["Reason"] == "Node failure here"
    assert fields["ExitCode"] == "0:9" and fields["NodeList"] == "node3"


def test_completing_is_not_the_end():
    # The batch script may still be stopping its container: the job's files are not final yet.
    assert not SlurmJob(job_id="1", state="COMPLETING", name="").terminal
    assert SlurmJob(job_id="1", state="CANCELLED", name="").terminal


# --- sbatch arguments ----------------------------------------------------------------------------------------


def test_sbatch_arguments_carry_the_job_the_settings_and_its_resources(tmp_path):
    args = sbatch_args(spec(tmp_path), settings(tmp_path, slurm_partition="gpu", slurm_account="ml", slurm_qos="high",
                                                 slurm_gpu_type="h100", slurm_sbatch_args="--constraint=ib --exclusive"),
                       tmp_path / "state")
    assert "--job-name=radix-c1-job-1" in args  # how a restarted agent finds it
    assert "--export=NONE" in args and "--no-requeue" in args
    assert {"--partition=gpu", "--account=ml", "--qos=high", "--gres=gpu:h100:2", "--cpus-per-task=4",
            "--mem=2048M", "--constraint=ib", "--exclusive"} <= set(args)
    assert "--time=12" in args  # 600 s + slack, in minutes: the agent's own timeout acts first
    assert f"--output={tmp_path}/state/stdout.log" in args


def test_gpus_flag_and_gpu_less_jobs(tmp_path):
    args = sbatch_args(spec(tmp_path), settings(tmp_path, slurm_gpu_flag="gpus"), tmp_path / "s")
    assert "--gpus=2" in args and not any(a.startswith("--gres") for a in args)
    args = sbatch_args(spec(tmp_path, gpu_count=0), settings(tmp_path), tmp_path / "s")
    assert not any(a.startswith(("--gres", "--gpus")) for a in args)
    assert not any(a.startswith("--partition") for a in args)  # the cluster's default partition


def test_sbatch_args_setting_refuses_what_the_agent_sets():
    with pytest.raises(ValidationError, match="set by the agent"):
        Settings(slurm_sbatch_args="--output=/tmp/x")
    with pytest.raises(ValidationError, match="shell-quoted"):
        Settings(slurm_sbatch_args="--comment='unterminated")


# --- the batch script, run with a fake engine -----------------------------------------------------------------


FAKE_ENGINE = """#!/bin/sh
python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@" >> "$CALLS"
case "$1" in
  image) exit "${IMAGE_PRESENT:-0}" ;;
  pull) echo "pull denied: no such host" >&2; exit 1 ;;
  inspect) echo "${EXIT_CODE:-0} ${OOM:-false} 2026-11-23T06:00:00Z" ;;
  run) echo "container output" ;;
esac
exit 0
"""


def run_script(tmp_path: Path, container: ContainerSpec, agent_settings: Settings, env: dict[str, str]) -> tuple[list[list[str]], Path]:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for engine in ("docker", "podman"):
        (bin_dir / engine).write_text(FAKE_ENGINE)
        (bin_dir / engine).chmod(stat.S_IRWXU)
    script = batch_script(container, agent_settings, state, grace=10, version="test")
    # The script puts the system directories first on PATH (nodes' login PATHs vary); the fake engine goes first here.
    script = script.replace('export PATH="', f'export PATH="{bin_dir}:', 1)
    calls = tmp_path / "calls.jsonl"
    calls.unlink(missing_ok=True)
    done = subprocess.run(["sh", "-c", script], env={"PATH": os.environ["PATH"], "CALLS": str(calls),
                                                     "SLURM_JOB_ID": "77", **env}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode in (0, 3, int(env.get("EXIT_CODE", 0))), done.stderr
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [json.loads(line) for line in lines], state


def test_the_batch_script_runs_the_container_with_exactly_the_allocated_gpus(tmp_path):
    container = spec(tmp_path)
    calls, state = run_script(tmp_path, container, settings(tmp_path), {"SLURM_JOB_GPUS": "2,3"})
    run = next(c for c in calls if c[0] == "run")
    assert run[run.index("--gpus") + 1] == '"device=2,3"'  # docker's CSV syntax for a device list
    assert run[run.index("--name") + 1] == "radix-c1-job-1-77"
    assert f"type=bind,source={container.workspace},target=/workspace" in run
    assert "TRICKY=it's \"quoted\" $HOME `x`\nsecond line" in run  # passed through untouched by the shell
    assert "radix.slurm_job_id=77" in run and "radix.job_id=job-1" in run
    assert "RADIX_SLURM_JOB_ID=77" in run and "RADIX_SLURM_NODE=" + os.uname().nodename in run
    assert {"--init", "no-new-privileges", "--read-only"} & set(run) == {"--init", "no-new-privileges"}
    assert run[-4:] == ["registry.example.com/team/train:2", "python", "-c", "print('hi')"]
    assert json.loads((state / "exit.json").read_text()) == {"exit_code": 0, "oom_killed": False, "reason": None,
                                                             "signalled": False, "node": os.uname().nodename}


def test_podman_gets_cdi_devices(tmp_path):
    calls, _ = run_script(tmp_path, spec(tmp_path), settings(tmp_path, slurm_container_engine="podman"),
                          {"CUDA_VISIBLE_DEVICES": "0,1"})
    run = next(c for c in calls if c[0] == "run")
    assert [run[i + 1] for i, a in enumerate(run) if a == "--device"] == ["nvidia.com/gpu=0", "nvidia.com/gpu=1"]


def test_a_gpu_job_that_slurm_gave_no_gpus_does_not_run(tmp_path):
    calls, state = run_script(tmp_path, spec(tmp_path), settings(tmp_path), {})
    assert not any(c[0] == "run" for c in calls)
    assert json.loads((state / "exit.json").read_text())["reason"] == "agent_error"
    assert "asked for 2 GPU(s) but Slurm gave it 0" in (state / "node_error.txt").read_text()


def test_exit_code_and_oom_come_back_from_the_node(tmp_path):
    _, state = run_script(tmp_path, spec(tmp_path, gpu_count=0), settings(tmp_path), {"EXIT_CODE": "137", "OOM": "true"})
    assert json.loads((state / "exit.json").read_text()) == {"exit_code": 137, "oom_killed": True, "reason": None,
                                                             "signalled": False, "node": os.uname().nodename}


def test_an_image_the_node_cannot_pull_is_image_unavailable(tmp_path):
    calls, state = run_script(tmp_path, spec(tmp_path, gpu_count=0, registry_auth={"username": "u", "password": "p"}),
                              settings(tmp_path), {"IMAGE_PRESENT": "1"})
    assert [c[0] for c in calls] == ["image", "pull"]
    assert json.loads((state / "exit.json").read_text())["reason"] == "image_unavailable"
    assert "pull denied: no such host" in (state / "node_error.txt").read_text()


# --- how Slurm's ends map to the contract ----------------------------------------------------------------------


class FakeCli:
    def __init__(self, job: SlurmJob | None) -> None:
        self.job = job

    def show_job(self, job_id):
        return self.job

    def queue(self, user):
        return [self.job] if self.job else []


@pytest.mark.parametrize("state, reason", [
    ("TIMEOUT", FailureReason.TIMEOUT), ("OUT_OF_MEMORY", FailureReason.OOM), ("CANCELLED", FailureReason.CANCELED),
    ("PREEMPTED", FailureReason.INTERRUPTED), ("NODE_FAIL", FailureReason.AGENT_ERROR),
])
def test_slurm_failure_states_map_to_failure_reasons(tmp_path, state, reason):
    executor = SlurmExecutor(settings(tmp_path), FakeCli(SlurmJob(job_id="9", state=state, name="radix-c1-j", nodes="gpu3")), user="u")
    info = executor.exit_info("9")
    assert info.failure_reason is reason and info.error
    if state == "NODE_FAIL":
        assert "gpu3" in info.error and "resubmit" in info.error


def test_a_finished_job_slurm_forgot_is_read_from_its_state_directory(tmp_path):
    executor = SlurmExecutor(settings(tmp_path), FakeCli(None), user="u")
    state = executor.state_dir("job-1")
    state.mkdir(parents=True)
    (state / "slurm_job_id").write_text("41")
    (state / "labels.json").write_text(json.dumps({"radix.job_id": "job-1", "radix.cluster_id": "c1"}))
    (state / "exit.json").write_text('{"exit_code": 4, "oom_killed": false, "reason": null}')
    [found] = executor.list_jobs("c1")
    assert (found.id, found.status, found.job_id) == ("41", "exited", "job-1")
    assert executor.exit_info("41").exit_code == 4
    assert executor.list_jobs("another-cluster") == []


# --- shared storage -----------------------------------------------------------------------------------------------


class NodesCli:
    def nodes(self):
        return [{"NodeName": "gpu1", "NodeHostName": "gpu1.cluster", "CPUTot": "64", "Gres": "gpu:8", "State": "IDLE",
                 "Partitions": "gpu"}]

    def cluster_name(self):
        return "c"


def test_a_local_jobs_directory_with_remote_nodes_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("cluster_agent.executors.slurm.cluster.filesystem_type", lambda path: "ext4")
    with pytest.raises(ConfigError, match="local ext4 filesystem but Slurm nodes \\(gpu1.cluster\\)"):
        check_shared_storage(NodesCli(), tmp_path, probe_seconds=0)
    monkeypatch.setattr("cluster_agent.executors.slurm.cluster.filesystem_type", lambda path: "nfs4")
    check_shared_storage(NodesCli(), tmp_path, probe_seconds=0)  # network storage: believed


class ProbingCli(NodesCli):
    """A cluster whose nodes see the jobs directory: the probe job answers at once."""

    def __init__(self, name: str) -> None:
        self.name, self.submitted = name, 0

    def cluster_name(self):
        return self.name

    def submit(self, args, script):
        self.submitted += 1
        subprocess.run(["sh", "-c", script], check=True)
        return str(self.submitted)

    def show_job(self, job_id):
        return None

    def cancel(self, job_id):
        pass


def test_a_storage_proof_holds_for_the_cluster_that_gave_it_only(tmp_path, monkeypatch):
    monkeypatch.setattr("cluster_agent.executors.slurm.cluster.filesystem_type", lambda path: "nfs4")
    first = ProbingCli("east")
    check_shared_storage(first, tmp_path, probe_seconds=5)
    check_shared_storage(first, tmp_path, probe_seconds=5)  # a restart: no second probe job
    assert first.submitted == 1
    rebuilt = ProbingCli("west")  # the directory reused with another cluster: its nodes must show it again
    check_shared_storage(rebuilt, tmp_path, probe_seconds=5)
    assert rebuilt.submitted == 1


class ClusterCli:
    def nodes(self):
        return [
            {"NodeName": "a1", "CPUTot": "64", "RealMemory": "512000", "Gres": "gpu:h100:8", "GresUsed": "gpu:h100:3(IDX:0-2)",
             "State": "MIXED", "Partitions": "gpu,all"},
            {"NodeName": "a2", "CPUTot": "64", "RealMemory": "512000", "Gres": "gpu:h100:8", "GresUsed": "gpu:h100:0",
             "State": "DOWN+NOT_RESPONDING", "Partitions": "gpu,all"},
            {"NodeName": "c1", "CPUTot": "32", "RealMemory": "128000", "Gres": "(null)", "GresUsed": "gpu:0",
             "State": "IDLE", "Partitions": "cpu,all"},
        ]

    def cluster_name(self):
        return "big"


def test_capabilities_describe_the_cluster_gpus_per_partition_and_idle_gpus():
    from cluster_agent.executors.slurm.cluster import SlurmCluster

    caps = SlurmCluster(ClusterCli()).capabilities(execution_mode="slurm").model_dump()
    assert (caps["cpu_count"], caps["gpu_count"]) == (160, 16)
    slurm = caps["slurm"]
    assert (slurm["cluster"], slurm["nodes"], slurm["nodes_up"], slurm["idle_gpus"]) == ("big", 3, 2, 5)  # a2 is down
    parts = {p["name"]: p for p in slurm["partitions"]}
    assert (parts["gpu"]["gpus"], parts["gpu"]["idle_gpus"], parts["gpu"]["max_gpus_per_node"]) == (16, 5, 8)
    assert parts["cpu"]["gpus"] == 0 and parts["all"]["nodes"] == 3
    # An agent bound to one partition offers that partition's idle GPUs in its polls.
    assert SlurmCluster(ClusterCli(), partition="cpu").gpus().free_count() == 0
    assert SlurmCluster(ClusterCli(), partition="gpu").gpus().free_count() == 5
    # Without a partition, a node in two partitions (a1 in gpu and all) counts once: 16 GPUs, 5 idle, not 32 and 10.
    unbound = SlurmCluster(ClusterCli()).gpus()
    assert (unbound.total, unbound.free_count()) == (16, 5)


def test_sacct_gives_the_jobs_own_line_not_its_steps():
    from cluster_agent.executors.slurm.cli import parse_sacct

    text = ("12|NODE_FAIL|0:0|2026-11-23T06:59:05|gpu7|radix-c1-job-1\n"
            "12.batch|CANCELLED|0:15|2026-11-23T06:59:05|gpu7|batch\n")
    job = parse_sacct(text, "12")
    assert (job.state, job.nodes, job.name, job.exit_code) == ("NODE_FAIL", "gpu7", "radix-c1-job-1", 0)
    assert job.terminal and parse_sacct(text, "13") is None


def test_without_accounting_sacct_is_no_answer_not_an_error():
    from cluster_agent.executors.slurm.cli import SlurmCli, SlurmRefused

    class NoAccounting(SlurmCli):
        def run(self, *args, input_text=None):
            if args[0] == "sacct":
                raise SlurmRefused("Slurm accounting storage is disabled")
            raise SlurmRefused("slurm_load_jobs error: Invalid job id specified")

    assert NoAccounting().show_job("99") is None


def test_an_sbatch_that_timed_out_after_slurm_took_the_job_is_not_a_lost_job(tmp_path):
    from cluster_agent.errors import EngineUnavailable

    class SlowController(FakeCli):
        def submit(self, args, script):
            self.job = SlurmJob(job_id="55", state="PENDING", name="radix-c1-job-1")
            raise EngineUnavailable("sbatch did not answer within 30 s")

    executor = SlurmExecutor(settings(tmp_path), SlowController(None), user="u")
    assert executor.start(spec(tmp_path, gpu_count=0)) == "55"  # found by its name, not reported failed


def test_a_controller_that_is_down_is_unavailable_not_a_refusal():
    from cluster_agent.errors import EngineUnavailable
    from cluster_agent.executors.slurm.cli import SlurmCli, SlurmRefused

    class Down(SlurmCli):
        def run(self, *args, input_text=None):
            raise SlurmRefused("Slurmctld(primary) at vm is DOWN\n*****\n** RESTORE SLURMCTLD DAEMON TO SERVICE **")

    with pytest.raises(EngineUnavailable, match="not up: Slurmctld\\(primary\\) at vm is DOWN$"):
        Down().ping()


def test_the_nodes_exit_file_ends_the_wait_unless_slurm_signalled_the_job(tmp_path):
    # A container that ended by itself is done at once, even before slurmctld hears; one that Slurm stopped
    # (time limit, scancel, preemption) waits for Slurm's final state, which names the reason.
    executor = SlurmExecutor(settings(tmp_path, slurm_poll_interval=0.05),
                             FakeCli(SlurmJob(job_id="8", state="RUNNING", name="radix-c1-job-1")), user="u")
    state = executor.state_dir("job-1")
    state.mkdir(parents=True)
    (state / "slurm_job_id").write_text("8")
    assert executor.wait("8", 0.1) is False
    (state / "exit.json").write_text('{"exit_code": 143, "oom_killed": false, "reason": null, "signalled": true}')
    assert executor.wait("8", 0.1) is False
    (state / "exit.json").write_text('{"exit_code": 0, "oom_killed": false, "reason": null, "signalled": false}')
    assert executor.wait("8", 0.1) is True


def test_a_job_slurm_does_not_list_is_only_gone_after_a_grace(tmp_path, monkeypatch):
    # Right after a restart slurmctld may answer before it has reloaded its jobs: that is not the job's end.
    executor = SlurmExecutor(settings(tmp_path, slurm_poll_interval=0.05), FakeCli(None), user="u")
    assert executor.wait("12", 0.2) is False
    assert executor.inspect("12").running
    monkeypatch.setattr("cluster_agent.executors.slurm.executor.MISSING_GRACE_SECONDS", 0.0)
    assert executor.wait("12", 0.2) is True
    assert executor.inspect("12") is None


@pytest.mark.parametrize("image, registry", [
    ("registry.example.com/team/train:2", "registry.example.com"), ("localhost:5000/x", "localhost:5000"),
    ("team/train:2", "https://index.docker.io/v1/"), ("python:3.12", "https://index.docker.io/v1/"),
])
def test_registry_credentials_are_keyed_by_the_images_registry(tmp_path, image, registry):
    state = tmp_path / "s"
    state.mkdir()
    SlurmExecutor._write_auth(state, image, {"username": "u", "password": "p"})
    config = json.loads((state / "auth" / "config.json").read_text())
    assert list(config["auths"]) == [registry]
    assert (state / "auth" / "config.json").stat().st_mode & 0o777 == 0o600


def test_a_gpu_type_is_a_name_not_a_count():
    with pytest.raises(ValidationError, match="not a GPU type name"):
        Settings(slurm_gpu_type="h100:2")
    assert Settings(slurm_gpu_type="a100-80gb").slurm_gpu_type == "a100-80gb"


def test_jobs_the_probe_and_the_start_up_check_share_where_jobs_go(tmp_path):
    from cluster_agent.executors.slurm.script import cluster_args

    agent = settings(tmp_path, slurm_partition="gpu", slurm_account="ml", slurm_sbatch_args="--reservation=r1")
    assert cluster_args(agent) == ["--partition=gpu", "--account=ml", "--reservation=r1"]
    assert set(cluster_args(agent)) <= set(sbatch_args(spec(tmp_path), agent, tmp_path / "s"))


def test_cached_inputs_reach_the_node_s_container_read_only_even_with_commas_in_the_path(tmp_path):
    from cluster_agent.executors.slurm.script import engine_run_args

    args = engine_run_args(spec(tmp_path, read_only_files=[(Path("/cache/sha256/ab"), "in/a,b.bin")]))
    mounts = [args[i + 1] for i, arg in enumerate(args) if arg == "--mount"]
    assert mounts[1] == 'type=bind,source=/cache/sha256/ab,"target=/workspace/in/a,b.bin",readonly'


# --- multi-node jobs --------------------------------------------------------------------------------------------


def test_a_multi_node_job_is_one_slurm_job_of_n_nodes_one_task_each_with_gpus_per_node(tmp_path):
    args = sbatch_args(spec(tmp_path, nodes=3), settings(tmp_path), tmp_path / "s")
    assert {"--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--gres=gpu:2", "--cpus-per-task=4", "--mem=2048M"} <= set(args)
    args = sbatch_args(spec(tmp_path, nodes=3), settings(tmp_path, slurm_gpu_flag="gpus"), tmp_path / "s")
    assert "--gpus-per-node=2" in args and not any(a.startswith("--gpus=") for a in args)  # --gpus is the job's total
    single = sbatch_args(spec(tmp_path), settings(tmp_path), tmp_path / "s")
    assert {"--nodes=1", "--ntasks=1"} <= set(single) and "--ntasks-per-node=1" not in single


def run_node(tmp_path: Path, container: ContainerSpec, env: dict[str, str]) -> tuple[list[list[str]], Path, str]:
    """node.sh of a multi-node job, as srun runs it on one node (fake engine, the task's Slurm env)."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(FAKE_ENGINE)
    (bin_dir / "docker").chmod(stat.S_IRWXU)
    script = node_script(container, settings(tmp_path), state, grace=10, version="test")
    script = script.replace('export PATH="', f'export PATH="{bin_dir}:', 1)
    calls = tmp_path / "calls.jsonl"
    done = subprocess.run(["sh", "-c", script], env={"PATH": os.environ["PATH"], "CALLS": str(calls), "SLURM_JOB_ID": "77",
                                                     **env}, capture_output=True, text=True, timeout=30)
    assert done.returncode == int(env.get("EXIT_CODE", 0)), done.stderr
    return [json.loads(line) for line in calls.read_text().splitlines()], state, done.stdout


def test_each_node_runs_its_container_with_its_rank_the_rendezvous_and_its_own_gpus(tmp_path):
    container = spec(tmp_path, nodes=2, network="host", env={"RADIX_JOB_ID": "job-1", "NODE_RANK": "9",
                                                              "LOCAL_WORLD_SIZE": "1", "WORLD_SIZE": "2", "NNODES": "2"})
    # An srun task inherits the batch step's SLURM_JOB_GPUS (the first node's); its own are the step's.
    calls, state, stdout = run_node(tmp_path, container, {
        "SLURM_PROCID": "1", "SLURMD_NODENAME": "node2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "20077",
        "SLURM_JOB_GPUS": "0,1", "SLURM_STEP_GPUS": "2,3"})
    run = next(c for c in calls if c[0] == "run")
    assert run[run.index("--name") + 1] == "radix-c1-job-1-77-1"
    assert run[run.index("--gpus") + 1] == '"device=2,3"'
    assert run[run.index("--network") + 1] == "host"
    envs = [run[i + 1] for i, a in enumerate(run) if a == "--env"]
    # The node's own values come after the job's env: the engine keeps the last one.
    assert envs.index("NODE_RANK=1") > envs.index("NODE_RANK=9")
    assert {"MASTER_ADDR=10.0.0.1", "MASTER_PORT=20077", "RANK=1", "RADIX_SLURM_NODE=node2"} <= set(envs)
    assert "radix.node_rank=1" in run
    assert stdout == "[node 1 node2] container output\n"  # every line says which node printed it
    assert json.loads((state / "node-1" / "exit.json").read_text()) == {
        "exit_code": 0, "oom_killed": False, "reason": None, "signalled": False, "node": "node2"}
    assert not (state / "exit.json").exists()  # the job's own is launch.sh's


def test_torchrun_nodes_get_no_rank_of_their_own(tmp_path):
    # torchrun gives each of its workers a RANK; the container's would be the node's, not a worker's.
    container = spec(tmp_path, nodes=2, gpu_count=0, env={"LOCAL_WORLD_SIZE": "4"})
    calls, _, _ = run_node(tmp_path, container, {"SLURM_PROCID": "0", "MASTER_ADDR": "a", "MASTER_PORT": "1"})
    envs = [c for c in next(c for c in calls if c[0] == "run") if c.startswith("RANK=")]
    assert envs == []


FAKE_SLURM = {
    "scontrol": """#!/bin/sh
case "$1 $2" in
  "show hostnames") echo node1; echo node2 ;;
  "show node") echo "NodeName=$4 Arch=x86_64 CoresPerSocket=1 NodeAddr=10.0.0.$(echo "$4" | tr -dc 0-9) NodeHostName=$4" ;;
esac
""",
    "scancel": '#!/bin/sh\necho "$@" >> "$STATE/scancel.calls"\n',
    # Each node's result as the scenario says; a node that "runs" waits (up to 5 s) until the step is signalled.
    "srun": """#!/bin/sh
echo "$@" > "$STATE/srun.args"; echo "$MASTER_ADDR:$MASTER_PORT" > "$STATE/srun.env"
for rank in 0 1; do
  eval "result=\\$NODE$rank"
  [ "$result" = missing ] && continue
  [ "$result" = running ] && continue
  mkdir -p "$STATE/node-$rank"
  echo "$result" > "$STATE/node-$rank/exit.json"
  case "$result" in *'"reason": "'*) echo "rank $rank could not run" > "$STATE/node-$rank/node_error.txt" ;; esac
done
for rank in 0 1; do
  eval "result=\\$NODE$rank"
  if [ "$result" = running ]; then
    i=0; while [ ! -f "$STATE/scancel.calls" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    mkdir -p "$STATE/node-$rank"
    echo '{"exit_code": 143, "oom_killed": false, "reason": null, "signalled": true, "node": "node1"}' > "$STATE/node-$rank/exit.json"
  fi
done
""",
}


def run_launch(tmp_path: Path, node0: str, node1: str) -> tuple[int, Path]:
    state = tmp_path / "state"
    state.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    script = batch_script(spec(tmp_path, nodes=2), settings(tmp_path), state, grace=10, version="test")
    script = script.replace('export PATH="', f'export PATH="{bin_dir}:', 1)
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30, env={
        "PATH": os.environ["PATH"], "STATE": str(state), "SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "node[1-2]",
        "NODE0": node0, "NODE1": node1})
    return done.returncode, state


def exit_of(code, node, signalled=False, reason=None):
    return json.dumps({"exit_code": code, "oom_killed": False, "reason": reason, "signalled": signalled, "node": node})


def test_the_launch_script_runs_every_node_and_rank_0_is_the_jobs_result(tmp_path):
    code, state = run_launch(tmp_path, exit_of(0, "node1"), exit_of(0, "node2"))
    assert code == 0
    srun_args = (state / "srun.args").read_text().split()
    assert srun_args[:6] == ["--export=ALL", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "sh", "-c"]
    assert srun_args[-4:] == ["node-task", str(state), "docker", spec(tmp_path, nodes=2).name]  # node.sh, watched
    address, port = (state / "srun.env").read_text().strip().split(":")
    assert address == "10.0.0.1"  # node1's NodeAddr
    assert 20000 <= int(port) < 32000  # drawn by the agent per job, below the ephemeral range
    assert json.loads((state / "exit.json").read_text()) == {
        "exit_code": 0, "oom_killed": False, "reason": None, "signalled": False, "node": "node1", "rank": 0, "nodes": 2}


def test_a_node_failing_stops_the_others_and_is_the_jobs_result(tmp_path):
    code, state = run_launch(tmp_path, "running", exit_of(3, "node2"))
    assert code == 1
    assert (state / "scancel.calls").read_text().split() == ["--signal=TERM", "77.0"]  # the step's tasks, not srun
    assert json.loads((state / "exit.json").read_text()) == {
        "exit_code": 3, "oom_killed": False, "reason": None, "signalled": False, "node": "node2", "rank": 1,
        "nodes": 2, "failed": True}


def test_a_node_that_could_not_pull_fails_the_job_with_its_reason(tmp_path):
    code, state = run_launch(tmp_path, exit_of(0, "node1"), exit_of(None, "node2", reason="image_unavailable"))
    written = json.loads((state / "exit.json").read_text())
    assert code == 1 and (written["reason"], written["rank"]) == ("image_unavailable", 1)
    assert (state / "node_error.txt").read_text() == "rank 1 could not run\n"  # the node's own message


def test_a_node_that_wrote_no_exit_status_is_an_agent_error(tmp_path):
    code, state = run_launch(tmp_path, exit_of(0, "node1"), "missing")
    assert code == 3
    assert json.loads((state / "exit.json").read_text())["reason"] == "agent_error"
    assert "node rank(s) 1 of the job wrote no exit status" in (state / "node_error.txt").read_text()


def test_a_failed_node_is_named_in_the_jobs_failure(tmp_path):
    executor = SlurmExecutor(settings(tmp_path), FakeCli(SlurmJob(job_id="41", state="FAILED", name="x")), user="u")
    state = executor.state_dir("job-1")
    state.mkdir(parents=True)
    (state / "slurm_job_id").write_text("41")
    (state / "exit.json").write_text(json.dumps({"exit_code": 3, "oom_killed": False, "reason": None, "signalled": False,
                                                 "node": "node2", "rank": 1, "nodes": 2, "failed": True}))
    info = executor.exit_info("41")
    assert info.exit_code == 3 and info.failure_reason is FailureReason.EXIT_CODE
    assert "node node2 (rank 1 of 2 nodes) exited with code 3" in info.error
    (state / "exit.json").write_text(json.dumps({"exit_code": 137, "oom_killed": True, "node": "node1", "rank": 0,
                                                 "nodes": 2, "failed": True}))
    info = executor.exit_info("41")
    assert info.failure_reason is FailureReason.OOM and "node node1 (rank 0 of 2 nodes) was killed for running out of memory" in info.error


def test_a_node_whose_script_dies_without_an_exit_status_fails_the_job_and_its_container_is_removed(tmp_path):
    # The OOM killer (or Slurm's KillWait) kills rank 1's node.sh: its watcher removes rank 1's container and writes
    # the failure, so the launch script stops rank 0 and the job fails naming the node.
    state = tmp_path / "state"
    state.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fakes = {
        **FAKE_SLURM,
        "srun": '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\n'
                'for rank in 0 1; do SLURM_PROCID=$rank SLURMD_NODENAME=node$((rank + 1)) "$@" & done\nwait\n',
        "docker": '#!/bin/sh\necho "$@" >> "$STATE/engine.calls"\n',
    }
    for name, text in fakes.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    (state / "node.sh").write_text(
        'if [ "$SLURM_PROCID" = 1 ]; then kill -9 $$; fi\n'
        'i=0; while [ ! -f "$STATE/scancel.calls" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done\n'
        'mkdir -p "$STATE/node-0"\n'
        'echo \'{"exit_code": 143, "oom_killed": false, "reason": null, "signalled": true, "node": "node1"}\' '
        '> "$STATE/node-0/exit.json"\n')
    job = spec(tmp_path, nodes=2)
    script = batch_script(job, settings(tmp_path), state, grace=10, version="test")
    script = script.replace('export PATH="', f'export PATH="{bin_dir}:', 1)
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=30, env={
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "STATE": str(state), "SLURM_JOB_ID": "77",
        "SLURM_JOB_NODELIST": "node[1-2]"})
    assert done.returncode == 1, done.stderr
    assert f"rm --force {job.name}-77-1" in (state / "engine.calls").read_text()
    assert "77.0" in (state / "scancel.calls").read_text()  # rank 0 was stopped
    written = json.loads((state / "exit.json").read_text())
    assert written["reason"] == "agent_error" and written["rank"] == 1 and written["failed"] is True
    assert "node2 (rank 1) died" in (state / "node_error.txt").read_text()
    executor = SlurmExecutor(settings(tmp_path), FakeCli(None), user="u")
    executor._state_for = lambda slurm_id: state  # noqa: SLF001 - the job's state directory, as recorded at submit
    info = executor.exit_info("77")
    assert info.failure_reason is FailureReason.AGENT_ERROR and "node2 (rank 1) died" in info.error


def test_a_job_slurm_keeps_pending_for_a_reason_it_never_leaves_is_cancelled_as_invalid(tmp_path):
    class Pending(FakeCli):
        cancelled: list[str] = []

        def cancel(self, job_id):
            self.cancelled.append(job_id)

    cli = Pending(SlurmJob(job_id="51", state="PENDING", name="radix-c1-j", reason="PartitionNodeLimit"))
    executor = SlurmExecutor(settings(tmp_path, slurm_poll_interval=0.05), cli, user="u")
    state = executor.state_dir("job-1")
    state.mkdir(parents=True)
    (state / "slurm_job_id").write_text("51")
    executor._state_for = lambda slurm_id: state  # noqa: SLF001
    assert executor.wait_started("51", threading.Event()) is None
    assert cli.cancelled == ["51"]
    info = executor.exit_info("51")
    assert info.failure_reason is FailureReason.INVALID_JOB
    assert "PartitionNodeLimit" in info.error and "fewer nodes" in info.error


@pytest.mark.parametrize("value", ["2", 2.0, True, "2.0"])
def test_nodes_is_a_json_integer(value):
    job = ReceivedJob.parse({"job_id": "j", "image": "i", "orchestration": {"nodes": value}})
    assert job.spec is None and "orchestration.nodes" in job.problem


def test_a_multi_node_jobs_containers_take_whole_nodes_and_no_low_ports(tmp_path):
    args = sbatch_args(spec(tmp_path, nodes=2), settings(tmp_path), tmp_path / "s")
    assert "--exclusive" in args
    assert "--exclusive" not in sbatch_args(spec(tmp_path), settings(tmp_path), tmp_path / "s")


def test_a_multi_node_jobs_containers_on_the_node_network_cannot_bind_low_ports_or_use_raw_sockets(tmp_path):
    from cluster_agent.container_config import container_spec
    from cluster_agent.models import JobSpec

    job = JobSpec.model_validate({"job_id": "mn", "image": "i", "orchestration": {"nodes": 2}})
    container = container_spec(job, Settings(cluster_id="c1", cap_drop=""), workspace=tmp_path, gpus=[], gpu_count=0,
                               host_has_gpus=False, timeout=60)
    assert container.network == "host" and {"NET_RAW", "NET_BIND_SERVICE"} <= set(container.cap_drop)
    single = container_spec(job.model_copy(update={"orchestration": job.orchestration.model_copy(update={"nodes": 1})}),
                            Settings(cluster_id="c1", cap_drop=""), workspace=tmp_path, gpus=[], gpu_count=0,
                            host_has_gpus=False, timeout=60)
    assert single.cap_drop == []

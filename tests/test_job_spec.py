import pytest
from pydantic import ValidationError

from cluster_agent.executors import container_name
from cluster_agent.container_config import gpus_for, torchrun_command
from cluster_agent.models import JobSpec


def spec(**fields):
    return JobSpec.model_validate({"job_id": "job-1", "image": "busybox:1", **fields})


@pytest.mark.parametrize("job_id", ["a", "Job_1.2-x", "9" * 128])
def test_valid_job_ids(job_id):
    assert spec(job_id=job_id).job_id == job_id


@pytest.mark.parametrize("job_id", ["", "-lead", ".hidden", "has space", "a/b", "../etc", "x" * 129, "ünï"])
def test_invalid_job_ids(job_id):
    with pytest.raises(ValidationError):
        spec(job_id=job_id)


def test_null_lists_and_objects_are_empty():
    s = spec(command=None, args=None, env=None, orchestration=None, resources=None)
    assert s.command == [] and s.args == [] and s.env == {} and s.orchestration.num_gpus is None


@pytest.mark.parametrize(
    "fields",
    [
        {"command": "echo hi"},
        {"args": [1, 2]},
        {"image": ""},
        {"image": "bad image"},
        {"env": {"1BAD": "x"}},
        {"env": {"A=B": "x"}},
        {"env": {"RADIX_JOB_ID": "spoof"}},
        {"env": ["A=B"]},
        {"timeout_seconds": 0},
        {"timeout_seconds": "soon"},
        {"orchestration": {"num_gpus": -1}},
        {"resources": {"memory_mb": 1}},
        {"resources": {"cpus": 0}},
        {"resources": {"cpus": 0.001}},  # a CFS quota under the kernel's 1 ms minimum
        {"resources": {"cpus": 1e-12}},  # rounds to no limit at all
        {"timeout_seconds": float("inf")},  # 1e400 from a control plane
        {"timeout_seconds": 1e300},
    ],
)
def test_invalid_fields_are_rejected(fields):
    with pytest.raises(ValidationError):
        spec(**fields)


def test_env_numbers_and_booleans_become_strings():
    assert spec(env={"N": 3, "F": 1.5, "B": True}).env == {"N": "3", "F": "1.5", "B": "true"}


def test_unknown_fields_from_a_newer_server_are_kept():
    assert spec(priority=5).model_extra == {"priority": 5}


def test_gpu_request_prefers_resources_gpus():
    assert spec(orchestration={"num_gpus": 2}).gpu_request == 2
    assert spec(orchestration={"num_gpus": 2}, resources={"gpus": 1}).gpu_request == 1
    assert spec(orchestration={"num_gpus": 0}).gpu_request == 0
    assert spec().gpu_request is None


def test_gpu_rule_for_jobs_that_name_no_count():
    assert gpus_for(spec(), host_gpus=8, max_concurrent_jobs=1) == 8  # Radix behaviour: the whole host
    assert gpus_for(spec(), host_gpus=8, max_concurrent_jobs=4) == 0  # parallel: GPUs only on request
    assert gpus_for(spec(resources={"gpus": 2}), host_gpus=8, max_concurrent_jobs=4) == 2
    assert gpus_for(spec(orchestration={"num_gpus": 0}), host_gpus=8, max_concurrent_jobs=1) == 0


def test_torchrun_wraps_multi_gpu_jobs_that_ask_for_it():
    s = spec(command=["python", "train.py"], args=["--epochs", "1"], orchestration={"num_gpus": 4, "launcher": "torchrun"})
    assert torchrun_command(s, 4) == [
        "torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=4", "train.py", "--epochs", "1",
    ]


@pytest.mark.parametrize(
    "orchestration",
    [{"num_gpus": 1, "launcher": "torchrun"}, {"num_gpus": 4}, {"num_gpus": 4, "launcher": "none"}],
)
def test_torchrun_is_not_applied_otherwise(orchestration):
    s = spec(command=["python", "train.py"], orchestration=orchestration)
    assert torchrun_command(s, orchestration["num_gpus"]) == ["python", "train.py"]


def test_an_unknown_launcher_is_invalid_and_names_the_known_ones():
    with pytest.raises(ValidationError, match="torchrun, none"):
        spec(command=["x"], orchestration={"launcher": "mpirun"})


@pytest.mark.parametrize("command", [
    ["torchrun", "--nproc_per_node=2", "--max-restarts=3", "train.py"],
    ["python3", "-m", "torch.distributed.run", "--nproc_per_node=2", "train.py"],
])
def test_a_job_that_calls_torchrun_itself_keeps_its_flags(command):
    assert torchrun_command(spec(command=command, orchestration={"launcher": "torchrun"}), 4) == command


def test_gpu_jobs_get_the_rendezvous_env_a_large_shm_and_their_own_values_win():
    from cluster_agent.container_config import distributed_env, shm_mb_for
    from cluster_agent.settings import Settings

    job = spec(command=["x"], orchestration={"launcher": "torchrun"})
    assert distributed_env(job, 4) == {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "NNODES": "1",
                                       "NODE_RANK": "0", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "4"}
    assert distributed_env(job, 0) == {}
    settings = Settings(gpu_shm_mb=8192)
    assert shm_mb_for(job, 2, settings) == 8192
    assert shm_mb_for(spec(command=["x"], resources={"memory_mb": 10000}), 1, settings) == 5000
    assert shm_mb_for(spec(command=["x"], resources={"shm_mb": 100}), 1, settings) == 100
    assert shm_mb_for(spec(command=["x"]), 0, settings) is None  # a CPU job keeps the engine's default


def test_container_names_are_per_cluster_and_job():
    assert container_name("c1", "job-1") == "radix-c1-job-1"


def test_registry_auth_password_is_a_secret():
    s = spec(registry_auth={"username": "ci", "password": "hunter2", "serveraddress": "reg.example.com"})
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
    assert s.registry_auth.to_engine() == {"username": "ci", "password": "hunter2", "serveraddress": "reg.example.com"}


def test_registry_auth_needs_a_username():
    with pytest.raises(ValidationError):
        spec(registry_auth={"username": "", "password": "x"})


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"args": ["ok", "a\x00b"]}, "args[1] contains a NUL byte"),
        ({"command": ["sh", "-c", "x\x00"]}, "command[2] contains a NUL byte"),
        ({"env": {"A": "1\x002"}}, "env A contains a NUL byte"),
        ({"args": ["x" * 131072]}, "args[0] is 131072 bytes"),
        ({"args": ["x" * 100_000] * 25}, "over the 2031616 bytes a program can be started with"),
        ({"image": "busybox\x00:1"}, "image must be an image reference"),
    ],
)
def test_specs_no_program_could_be_started_with_name_the_field(fields, named):
    """execve(2) would refuse them after the engine started the container: the job would look like exit code 1."""
    with pytest.raises(ValidationError) as caught:
        spec(**fields)
    assert named in str(caught.value)


def test_common_but_large_specs_are_fine():
    assert spec(args=["x" * 131071], env={"B": "y" * 100_000}).args


@pytest.mark.parametrize("job_id", ["nl1\n", "ok\r\n", "a\nb"])
def test_an_id_ending_in_a_newline_is_not_a_valid_id(job_id):
    from cluster_agent.control_plane import idempotency_key

    with pytest.raises(ValidationError):
        spec(job_id=job_id)
    assert "\n" not in idempotency_key(job_id)


def test_secret_env_is_checked():
    assert spec(command=["x"], secret_env={"TOKEN": "abcdef123"}).secret_env == {"TOKEN": "abcdef123"}
    with pytest.raises(ValidationError, match="fewer than 6 characters cannot be masked"):
        spec(command=["x"], secret_env={"TOKEN": "abc"})
    with pytest.raises(ValidationError, match="in both env and secret_env"):
        spec(command=["x"], env={"TOKEN": "x"}, secret_env={"TOKEN": "abcdef123"})
    with pytest.raises(ValidationError, match="not a variable name"):
        spec(command=["x"], secret_env={"RADIX_JOB_ID": "abcdef123"})
    # Bounded: every form of every secret is one pattern, and a stream is held back by 12 times the longest.
    with pytest.raises(ValidationError, match="secret_env has 101 values: at most 100"):
        spec(command=["x"], secret_env={f"S{n}": f"secret-{n:04d}" for n in range(101)})
    with pytest.raises(ValidationError, match="16385 characters, at most 16384"):
        spec(command=["x"], secret_env={"KEY": "k" * 16385})
    with pytest.raises(ValidationError, match="65540 characters in all, at most 65536"):
        spec(command=["x"], secret_env={f"K{n}": "k" * 13108 for n in range(5)})
    assert len(spec(command=["x"], secret_env={"PEM": "k" * 16384}).secret_env["PEM"]) == 16384


@pytest.mark.parametrize("resources", [{"memory_mb": 10**25}, {"shm_mb": 10**25}, {"memory_mb": 2**40}])
def test_memory_beyond_any_host_is_the_jobs_error_not_the_engines(resources):
    # Past int64 bytes the engine refused it ("cannot unmarshal number"), an infrastructure failure that counted
    # towards quarantine on every node the control plane retried it on.
    with pytest.raises(ValidationError, match="less than or equal to 1073741824"):
        spec(command=["x"], resources=resources)


def test_an_input_payload_json_cannot_carry_is_refused():
    with pytest.raises(ValidationError, match="input_payload holds a number JSON cannot carry"):
        spec(command=["x"], input_payload={"v": [1, float("inf")]})
    assert spec(command=["x"], input_payload={"v": 1e308}).input_payload == {"v": 1e308}


# --- multi-node jobs (orchestration.nodes; Slurm mode runs them, docs/slurm.md) ----------------------------------


def test_nodes_default_to_one_and_must_be_a_positive_count():
    assert spec(command=["x"]).orchestration.nodes == 1
    assert spec(command=["x"], orchestration={"nodes": None}).orchestration.nodes == 1
    assert spec(command=["x"], orchestration={"nodes": 4}).orchestration.nodes == 4
    for bad in (0, -1, 1025, "two"):
        with pytest.raises(ValidationError, match="nodes"):
            spec(command=["x"], orchestration={"nodes": bad})


def test_a_multi_node_torchrun_job_runs_one_torchrun_per_node_with_the_nodes_rank_and_rendezvous():
    s = spec(command=["python", "train.py"], args=["--epochs", "1"],
             orchestration={"nodes": 2, "launcher": "torchrun"})
    command = torchrun_command(s, 4)
    assert command[0:2] == ["sh", "-c"] and command[3:] == ["torchrun", "train.py", "--epochs", "1"]
    assert command[2] == ('exec torchrun --nnodes=2 --node_rank="$NODE_RANK" --nproc_per_node=4 --rdzv-backend=static '
                          '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" "$@"')
    # CPU-only nodes: one worker each. Without the launcher the command is the job's own.
    assert "--nproc_per_node=1" in torchrun_command(s, 0)[2]
    assert torchrun_command(spec(command=["python", "t.py"], orchestration={"nodes": 2}), 4) == ["python", "t.py"]


def test_the_torchrun_wrapper_really_passes_the_nodes_values_and_the_jobs_arguments(tmp_path):
    import subprocess

    fake = tmp_path / "torchrun"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "[$a]"; done\n')
    fake.chmod(0o755)
    s = spec(command=["python", "train.py"], args=["a b", "$HOME"], orchestration={"nodes": 3, "launcher": "torchrun"})
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "NODE_RANK": "2", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "20042"}
    out = subprocess.run(torchrun_command(s, 2), env=env, capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ["[--nnodes=3]", "[--node_rank=2]", "[--nproc_per_node=2]", "[--rdzv-backend=static]",
                                "[--rdzv-endpoint=10.0.0.7:20042]", "[train.py]", "[a b]", "[$HOME]"]


def test_multi_node_jobs_get_the_group_sizes_and_the_nodes_network(tmp_path):
    from cluster_agent.container_config import container_spec, distributed_env
    from cluster_agent.settings import Settings

    torch_job = spec(command=["x"], orchestration={"nodes": 2, "launcher": "torchrun"})
    assert distributed_env(torch_job, 4) == {"NNODES": "2", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    plain = spec(command=["x"], env={"WORLD_SIZE": "99"}, orchestration={"nodes": 3})
    assert distributed_env(plain, 4) == {"NNODES": "3", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "1"}
    settings = Settings(jobs_workdir=tmp_path, cluster_id="c1", execution_mode="slurm", job_network="none")
    made = container_spec(plain, settings, workspace=tmp_path, gpus=[], gpu_count=4, host_has_gpus=False, timeout=60)
    assert made.nodes == 3 and made.network == "host"  # the ranks meet over the nodes' network
    assert made.env["WORLD_SIZE"] == "3"  # the agent's: every node must agree on the group
    single = container_spec(spec(command=["x"]), settings, workspace=tmp_path, gpus=[], gpu_count=0,
                            host_has_gpus=False, timeout=60)
    assert single.nodes == 1 and single.network == "none" and "NNODES" not in single.env

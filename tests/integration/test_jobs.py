"""A job's whole path through the agent: the real engine, the dev control plane, real HTTP."""

import json
import time

import pytest

from tests.integration.conftest import eventually
from devplane.images import BUSYBOX_IMAGE


def no_containers(docker_client, label):
    return lambda: docker_client.containers.list(all=True, sparse=True, filters={"label": label}) == []


@pytest.fixture
def agent(start_agent):
    return start_agent()


@pytest.mark.engine
def test_happy_path_output_json(cp, agent):
    result = cp.run(
        command=["sh", "-c"],
        args=['cat input.json > seen.json; printf \'{"input": %s, "job": "%s", "pwd": "%s"}\' "$(cat input.json)" "$RADIX_JOB_ID" "$(pwd)" > output.json; echo done'],
        input_payload={"x": 1, "s": "ü"},
        env={"GREETING": "hi"},
        job_id="happy-1",
    )
    assert result["status"] == "succeeded", result
    assert result["failure_reason"] is None and result["error_message"] is None
    assert result["output_payload"] == {"input": {"x": 1, "s": "ü"}, "job": "happy-1", "pwd": "/workspace"}
    assert result["metrics"]["exit_code"] == 0
    assert result["metrics"]["output_source"] == "output_json"
    assert result["metrics"]["runtime_seconds"] >= 0
    assert result["tenant_id"] == "demo-tenant"


@pytest.mark.engine
def test_stdout_json(cp, agent):
    result = cp.run(command=["echo", '{"n": 1, "list": [1, 2]}'])
    assert result["status"] == "succeeded"
    assert result["output_payload"] == {"n": 1, "list": [1, 2]}
    assert result["metrics"]["output_source"] == "stdout_json"


@pytest.mark.engine
def test_plain_output_is_wrapped(cp, agent):
    result = cp.run(command=["sh", "-c", "echo hello; echo oops >&2"])
    assert result["status"] == "succeeded"
    assert result["output_payload"] == {"stdout": "hello\n", "stderr": "oops\n"}
    assert result["metrics"]["output_source"] == "wrapped"


@pytest.mark.engine
def test_env_command_and_args_reach_the_container(cp, agent):
    result = cp.run(command=["sh", "-c", 'echo "$A-$B-$1"', "arg0"], args=["third"], env={"A": "one", "B": 2})
    assert result["output_payload"]["stdout"] == "one-2-third\n"


@pytest.mark.engine
def test_non_zero_exit(cp, agent):
    result = cp.run(command=["sh", "-c", "echo partial; echo 'it broke' >&2; exit 3"])
    assert result["status"] == "failed"
    assert result["failure_reason"] == "exit_code"
    assert result["metrics"]["exit_code"] == 3
    assert "exited with code 3" in result["error_message"] and "it broke" in result["error_message"]
    assert result["output_payload"] == {"stdout": "partial\n", "stderr": "it broke\n"}
    assert result["metrics"]["failure_class"] == "job" and result["metrics"]["retryable"] is False


def test_invalid_output_json(cp, agent):
    result = cp.run(command=["sh", "-c", "echo '{broken' > output.json"])
    assert result["status"] == "failed"
    assert result["failure_reason"] == "invalid_output"
    assert "output.json is not valid JSON" in result["error_message"]


def test_oversized_output_json(cp, start_agent):
    start_agent("--max-output-bytes", "1000")
    result = cp.run(command=["sh", "-c", "head -c 5000 /dev/zero | tr '\\0' x | sed 's/.*/{\"x\": \"&\"}/' > output.json"])
    assert result["failure_reason"] == "invalid_output"
    assert "over the output limit of 1000 bytes" in result["error_message"]


def test_output_json_symlink_to_a_host_path_is_refused(cp, agent):
    result = cp.run(command=["sh", "-c", "ln -s /etc/hostname output.json"])
    assert result["failure_reason"] == "invalid_output"
    assert "symbolic link" in result["error_message"]


@pytest.mark.engine
def test_missing_image(cp, agent):
    result = cp.run(image="radix-test/does-not-exist:1", command=["true"])
    assert result["status"] == "failed"
    assert result["failure_reason"] == "image_unavailable"
    assert "radix-test/does-not-exist" in result["error_message"]
    # The engine's own reason is passed on.
    assert "denied" in result["error_message"] or "not found" in result["error_message"] or "lookup" in result["error_message"] or "dial" in result["error_message"]
    # Unreachable registry (these machines): another node may reach it. A registry that says "not found": the name.
    unreachable = "lookup" in result["error_message"] or "dial" in result["error_message"]
    assert result["metrics"]["failure_class"] == ("infrastructure" if unreachable else "job"), result


@pytest.mark.engine
def test_command_missing_from_the_image(cp, agent):
    result = cp.run(command=["/no/such/program"])
    assert result["status"] == "failed"
    # As in a shell: the init process reports the missing program as exit code 127.
    assert result["failure_reason"] == "exit_code"
    assert result["metrics"]["exit_code"] == 127
    assert "not found in the image" in result["error_message"]
    assert "/no/such/program" in result["error_message"]


@pytest.mark.parametrize("job_id", ["bad id", "../escape", "-x", "a" * 129])
def test_bad_job_ids_are_invalid_and_nothing_is_written(cp, agent, docker_client, cluster_id, job_id):
    result = cp.run(job_id=job_id, command=["true"])
    assert result["status"] == "failed"
    assert result["failure_reason"] == "invalid_job"
    assert "does not match" in result["error_message"]
    # Only the agent's own files (layout marker, lock): no job directory, nothing written for the job.
    assert not agent.jobs_dir.exists() or not [p.name for p in agent.jobs_dir.iterdir() if not p.name.startswith(".")]
    assert not [p for p in agent.jobs_dir.iterdir() if p.name.startswith(".trash-")]
    assert not (agent.jobs_dir.parent / "escape").exists()
    assert docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.cluster_id={cluster_id}"}) == []


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"command": "echo not-a-list"}, "command"),
        ({"env": {"BAD NAME": "x"}}, "env"),
        ({"timeout_seconds": -5}, "timeout_seconds"),
        ({"image": ""}, "image"),
    ],
)
def test_invalid_job_specs(cp, agent, fields, fragment):
    result = cp.run(**fields)
    assert result["failure_reason"] == "invalid_job"
    assert fragment in result["error_message"]


@pytest.mark.engine
def test_timeout_stops_the_container(cp, agent, docker_client, cluster_id):
    started = time.monotonic()
    result = cp.run(command=["sleep", "120"], timeout_seconds=2)
    assert time.monotonic() - started < 30
    assert result["status"] == "failed"
    assert result["failure_reason"] == "timeout"
    assert "timeout of 2 s" in result["error_message"]
    eventually(no_containers(docker_client, f"radix.cluster_id={cluster_id}"), what="container removed")


def test_default_timeout_comes_from_the_setting(cp, start_agent):
    start_agent("--job-timeout", "1")
    result = cp.run(command=["sleep", "60"])
    assert result["failure_reason"] == "timeout"


@pytest.mark.engine
def test_oom_under_a_small_memory_limit(cp, agent):
    # tail keeps a whole "line" of /dev/zero (no newline) in memory: far past 32 MiB.
    result = cp.run(command=["sh", "-c", "head -c 400m /dev/zero | tail > /dev/null"], resources={"memory_mb": 32})
    assert result["status"] == "failed"
    assert result["failure_reason"] == "oom", result
    assert result["metrics"]["failure_class"] == "job"  # within its own limit: no other node would do better
    assert "out of memory" in result["error_message"] and "32 MiB" in result["error_message"]


@pytest.mark.parametrize("code", [0, 1])
def test_a_child_killed_for_memory_fails_the_job_as_oom_whatever_the_parent_exits_with(cp, agent, code):
    """A worker killed for memory while its parent carries on and exits by itself (a shell, make, a worker pool):
    the container's exit code says nothing of it, the engine's OOM flag does."""
    result = cp.run(command=["sh", "-c", f"head -c 400m /dev/zero | tail > /dev/null; exit {code}"],
                    resources={"memory_mb": 32})
    assert result["status"] == "failed" and result["failure_reason"] == "oom", result


@pytest.mark.engine
def test_container_is_hardened_and_sees_only_its_workspace(cp, agent, docker_client, cluster_id):
    job_id = cp.submit(command=["sh", "-c", "grep NoNewPrivs /proc/self/status; cat /proc/mounts; sleep 3"])
    deadline = time.monotonic() + 20
    containers = []
    while time.monotonic() < deadline and not containers:
        containers = docker_client.containers.list(filters={"label": f"radix.job_id={job_id}"})
        time.sleep(0.1)
    assert containers, "the job's container never showed up"
    attrs = containers[0].attrs
    assert attrs["Config"]["Labels"]["radix.cluster_id"] == cluster_id
    assert attrs["HostConfig"]["Privileged"] is False
    assert "no-new-privileges" in attrs["HostConfig"]["SecurityOpt"]
    assert attrs["HostConfig"]["PidsLimit"] == 4096
    binds = [m for m in attrs["Mounts"] if m["Type"] == "bind"]
    assert [(m["Destination"], m["RW"]) for m in binds] == [("/workspace", True)]
    result = cp.result(job_id)["result"]
    stdout = result["output_payload"]["stdout"]
    assert "NoNewPrivs:\t1" in stdout
    assert " /workspace " in stdout
    # After delivery, the container and the job directory are gone.
    eventually(no_containers(docker_client, f"radix.job_id={job_id}"), what="container removed")
    eventually(lambda: not (agent.jobs_dir / job_id).exists(), what="job directory removed")


@pytest.mark.engine
def test_resources_are_applied(cp, agent):
    result = cp.run(
        command=["sh", "-c", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max 2>/dev/null; df -m /dev/shm | tail -1"],
        resources={"memory_mb": 64, "shm_mb": 16, "cpus": 0.5},
    )
    stdout = result["output_payload"]["stdout"]
    assert str(64 * 1024 * 1024) in stdout
    assert " 16 " in stdout.splitlines()[-1]


def test_a_job_printing_hundreds_of_mb_does_not_grow_the_agent(cp, agent):
    baseline = agent.peak_rss_mb()
    result = cp.run(
        wait=300,
        command=["sh", "-c", "yes 'a line of job output that goes on and on' | head -c 300000000; echo; echo THE-END"],
    )
    assert result["status"] == "succeeded"
    assert result["output_payload"]["stdout"].endswith("THE-END\n")
    assert len(result["output_payload"]["stdout"]) == 10_000
    peak = agent.peak_rss_mb()
    assert peak - baseline < 60, f"agent grew from {baseline:.0f} MB to {peak:.0f} MB while a job printed 300 MB"


@pytest.mark.engine
def test_jobs_run_one_after_another_and_all_get_results(cp, agent):
    ids = [cp.submit(command=["sh", "-c", f"echo '{{\"i\": {i}}}'"]) for i in range(5)]
    results = [cp.result(job_id) for job_id in ids]
    assert [r["result"]["output_payload"] for r in results] == [{"i": i} for i in range(5)]
    assert all(r["deliveries"] == 1 for r in results)
    assert all(r["idempotency_keys"] == [r["job_id"]] for r in results)


@pytest.mark.engine
def test_run_job_prints_the_completion(tmp_path, busybox):
    import subprocess
    import sys

    from tests.integration.conftest import ROOT

    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "local-1", "image": BUSYBOX_IMAGE, "command": ["echo", '{"local": true}']}))
    out = subprocess.run(
        [sys.executable, "main.py", "run-job", str(job), "--jobs-workdir", str(tmp_path / "jobs")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    completion = json.loads(out.stdout)
    assert completion["status"] == "succeeded" and completion["output_payload"] == {"local": True}
    assert not (tmp_path / "jobs" / "local-1").exists()  # run-job cleans up before it prints

    job.write_text(json.dumps({"job_id": "local-2", "image": BUSYBOX_IMAGE, "command": ["false"]}))
    out = subprocess.run(
        [sys.executable, "main.py", "run-job", str(job), "--jobs-workdir", str(tmp_path / "jobs")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    assert json.loads(out.stdout)["failure_reason"] == "exit_code"

    # A job file that names no job (as the dev control plane allows) runs under an id of its own.
    job.write_text(json.dumps({"image": BUSYBOX_IMAGE, "command": ["sh", "-c", 'echo "{\\"id\\": \\"$RADIX_JOB_ID\\"}"']}))
    out = subprocess.run(
        [sys.executable, "main.py", "run-job", str(job), "--jobs-workdir", str(tmp_path / "jobs")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    given = json.loads(out.stdout)["output_payload"]["id"]
    assert given.startswith("job-") and f"running it as {given}" in out.stderr


@pytest.mark.engine
def test_an_image_removed_between_two_jobs_is_found_missing_at_create(cp, start_agent, docker_client, busybox):
    """The agent takes an image it found present moments ago as present (no engine round trip per job); one removed
    in between is found by the container's create, made present again (here: it cannot be pulled), and the job
    gets the true reason."""
    tag = str(time.monotonic_ns())
    name = f"radix-test/removed-between:{tag}"
    docker_client.images.get(busybox).tag("radix-test/removed-between", tag)  # Podman refuses a tag in the repository
    start_agent()
    first = cp.submit(image=name, command=["echo", "{}"])
    assert cp.result(first)["result"]["status"] == "succeeded"
    # By its label: "ancestor" matches by image id, so any busybox container on the engine would match too.
    eventually(lambda: not docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.job_id={first}"}),
               what="container gone")
    docker_client.images.remove(name)
    result = cp.run(image=name, command=["echo", "{}"])
    assert result["status"] == "failed" and result["failure_reason"] == "image_unavailable", result
    assert "cannot pull image" in result["error_message"] and "--pull-policy never" in result["error_message"]

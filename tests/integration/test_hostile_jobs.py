"""Hostile jobs on the real engine: whatever a job does to its /workspace never reaches the agent's own records,
the host, or the next job, and never crashes the agent (docs/reliability.md, "Threat model").

Every test here is one fault a job can cause on purpose, and asserts the one true result it must still get.
"""

import json
import os
import signal
import stat
import subprocess
import time
import urllib.request

from tests.integration.conftest import TOKEN, eventually, small_disk

# The agent's records and the temporary files it renames into place, today and in the layout before it.
AGENT_FILE_NAMES = [
    "job.json", "container.json", "result.json", "log_offset", "input.json.tmp",
    ".job.json.tmp", ".container.json.tmp", ".result.json.tmp", ".log_offset.tmp", ".input.json.tmp",
]
FORGED = {
    "tenant_id": "another-tenant", "status": "succeeded", "output_payload": {"forged": True},
    "metrics": {"runtime_seconds": 1.0, "exit_code": 0},
}


def containers(docker_client, label):
    return docker_client.containers.list(all=True, filters={"label": label})


def take_jobs(plane, cluster_id, count):
    """Take queued jobs from the dev control plane the way an agent's poll does (they become assigned)."""
    request = urllib.request.Request(
        f"{plane.url}/v1/clusters/{cluster_id}/jobs/poll",
        data=json.dumps({"max_jobs": count, "wait_seconds": 0, "running_job_ids": [], "free_gpus": 0}).encode(),
        headers={"Content-Type": "application/json", "X-Radix-Cluster-Token": TOKEN, "X-Radix-Tenant-Id": "demo-tenant"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["jobs"]


def test_links_planted_on_every_agent_file_name_never_redirect_a_write(cp, start_agent, tmp_path):
    host_file = tmp_path / "host-file"
    host_file.write_text("host data")
    host_file.chmod(0o644)
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "keep").write_text("keep")
    agent = start_agent()
    plant = "; ".join(f"ln -s {host_file} {name}" for name in AGENT_FILE_NAMES)
    result = cp.run(command=["sh", "-c", f"{plant}; ln -s {host_dir} workspace; echo '{{\"ok\": 1}}'"])
    assert result["status"] == "succeeded", result
    assert result["output_payload"] == {"ok": 1}
    assert host_file.read_text() == "host data"
    assert stat.S_IMODE(host_file.stat().st_mode) == 0o644
    assert (host_dir / "keep").read_text() == "keep"  # removing the workspace removed the link, not its target
    eventually(lambda: not [p for p in agent.jobs_dir.iterdir() if not p.name.startswith(".")], what="clean-up")
    assert cp.run(command=["echo", '{"next": 1}'])["output_payload"] == {"next": 1}


def test_a_job_cannot_see_or_touch_the_agents_records(cp, start_agent):
    start_agent()
    listing = cp.run(command=["sh", "-c", "ls -a /workspace; ls -a /workspace/.. | grep -c job.json || true"])
    stdout = listing["output_payload"]["stdout"]
    assert "input.json" in stdout
    assert "job.json" not in stdout.split("\n")[:-2] and "result.json" not in stdout and "container.json" not in stdout


def test_a_result_forged_in_the_workspace_is_never_delivered_after_a_restart(cp, start_agent, docker_client):
    forged = json.dumps(FORGED)
    script = (
        f"echo '{forged}' > result.json; echo '{forged}' > ../result.json 2>/dev/null; "
        "echo '{\"spec\": {\"job_id\": \"other\"}}' > job.json; echo forged; sleep 8; exit 7"
    )
    first = start_agent()
    job_id = cp.submit(command=["sh", "-c", script])
    first.wait_for_log(f"job {job_id}: started container")
    time.sleep(1.5)  # the forgeries are written
    assert first.terminate() == 0  # the documented upgrade: stop the agent (jobs keep running), start the new one
    assert containers(docker_client, f"radix.job_id={job_id}")[0].status == "running"
    second = start_agent()
    record = cp.result(job_id, wait=60)
    result = record["result"]
    assert result["status"] == "failed" and result["failure_reason"] == "exit_code", result
    assert result["metrics"]["exit_code"] == 7 and result["tenant_id"] == "demo-tenant"
    assert "forged" not in json.dumps(result["output_payload"]).replace('"stdout": "forged', "")
    assert record["deliveries"] == 1
    assert f"job {job_id}: adopted container" in second.log


def test_an_older_agents_leftovers_are_recovered_without_trusting_the_workspace(
    plane, cp, start_agent, docker_client, busybox, cluster_id, tmp_path
):
    """Layout 1 (before the agent kept its records out of reach): the whole job directory was /workspace."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    ids = {
        "running": cp.submit(command=["true"]),
        "never_started": cp.submit(command=["sh", "-c", "echo run >> runs; echo '{\"fresh\": 1}' > output.json"]),
        "spooled_gone": cp.submit(command=["true"]),
        "created": cp.submit(command=["sh", "-c", "echo run >> runs; echo \"{\\\"runs\\\": $(wc -l < runs)}\" > output.json"]),
    }
    specs = {job["job_id"]: job for job in take_jobs(plane, cluster_id, len(ids))}
    assert set(specs) == set(ids.values())
    labels = {"radix.cluster_id": cluster_id, "radix.timeout_seconds": "60", "radix.gpu_ids": ""}

    def legacy_dir(job_id):
        directory = jobs / job_id
        directory.mkdir()
        directory.chmod(0o777)
        (directory / "job.json").write_text(json.dumps({"spec": specs[job_id], "agent_version": "0.1.0"}))
        (directory / "input.json").write_text("{}")
        return directory

    def legacy_container(job_id, command, start):
        directory = jobs / job_id
        make = docker_client.containers.run if start else docker_client.containers.create
        extra = {"detach": True} if start else {}
        container = make(
            busybox, command, name=f"radix-{cluster_id}-{job_id}", working_dir="/workspace",
            volumes={str(directory): {"bind": "/workspace", "mode": "rw"}},
            labels={**labels, "radix.job_id": job_id}, **extra,
        )
        (directory / "container.json").write_text(json.dumps({"container_id": container.id}))
        return container

    # A running job of the older agent that has forged its result in its workspace.
    running = legacy_dir(ids["running"])
    legacy_container(ids["running"], ["sh", "-c", "sleep 4; echo '{\"real\": 1}' > output.json"], start=True)
    (running / "result.json").write_text(json.dumps(FORGED))
    # Accepted, never started.
    legacy_dir(ids["never_started"])
    # A spooled result whose container is gone: it cannot be told from a forgery.
    (legacy_dir(ids["spooled_gone"]) / "result.json").write_text(json.dumps(FORGED))
    # Created by the older agent, never started: starting it would mount what is now the agent's own directory.
    legacy_dir(ids["created"])
    legacy_container(ids["created"], specs[ids["created"]]["command"], start=False)

    agent = start_agent()
    results = {name: cp.result(job_id, wait=60) for name, job_id in ids.items()}
    assert results["running"]["result"]["status"] == "succeeded"
    assert results["running"]["result"]["output_payload"] == {"real": 1}
    assert results["never_started"]["result"]["output_payload"] == {"fresh": 1}
    spooled = results["spooled_gone"]["result"]
    assert spooled["status"] == "failed" and spooled["failure_reason"] == "agent_error"
    assert "cannot be told" in spooled["error_message"]
    assert results["created"]["result"]["output_payload"] == {"runs": 1}
    for record in results.values():
        assert record["deliveries"] == 1
        assert "forged" not in json.dumps(record["result"])
    assert "ignoring the result.json an older agent left" in agent.log
    assert (jobs / ".radix-layout").exists()
    eventually(lambda: not [p for p in jobs.iterdir() if not p.name.startswith(".")], timeout=30, what="all cleaned up")
    assert not [p for p in jobs.iterdir() if p.name.startswith(".radix-legacy-")]


def test_a_3000_deep_tree_and_odd_entries_are_removed_and_never_crash_the_agent(cp, start_agent, tmp_path):
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (host_dir / "keep").write_text("keep")
    script = (
        # Nested one level per round with short paths only (a shell's cd stops at PATH_MAX).
        "mkdir c; i=0; while [ $i -lt 3000 ]; do mkdir n && mv c n/c && mv n c || exit 9; i=$((i+1)); done; "
        "mkfifo fifo; mkdir locked; touch locked/f; chmod 000 locked; "
        "touch \"$(printf 'new\\nline')\" \"$(printf 'bad\\377byte')\"; "
        f"ln -s {host_dir} hostlink; mkdir -p many && cd many && seq 1 2000 | xargs touch; "
        "echo '{\"built\": true}'"
    )
    agent = start_agent()
    job_id = cp.submit(command=["sh", "-c", script])
    assert cp.result(job_id, wait=120)["result"]["output_payload"] == {"built": True}
    eventually(lambda: not (agent.jobs_dir / job_id).exists(), timeout=30, what="the deep tree removed")
    assert (host_dir / "keep").read_text() == "keep"
    assert agent.proc.poll() is None
    assert cp.run(command=["echo", '{"next": 1}'])["output_payload"] == {"next": 1}
    assert "RecursionError" not in agent.log


def test_recovery_never_crashes_on_a_jobs_leftovers(cp, start_agent, tmp_path):
    """What a killed agent left half-removed (a deep tree in a trash directory, a job directory whose records are
    damaged) is cleaned up or reported at the next start, and the agent starts."""
    from cluster_agent.job_dir import mark_layout

    jobs = tmp_path / "jobs"
    trash = jobs / ".trash-old-1-2"
    trash.mkdir(parents=True)
    mark_layout(jobs)
    here = os.getcwd()
    os.chdir(trash)
    try:
        for _ in range(3000):  # deeper than PATH_MAX allows to name at once
            os.mkdir("d")
            os.chdir("d")
    finally:
        os.chdir(here)
    (jobs / "damaged").mkdir()
    (jobs / "damaged" / "job.json").write_text("{not json")
    (jobs / "linked").symlink_to(tmp_path)
    agent = start_agent()
    assert cp.run(command=["echo", '{"ok": 1}'])["output_payload"] == {"ok": 1}
    assert not trash.exists()
    assert "damaged has no readable job.json" in agent.log and "linked is not a job directory" in agent.log
    assert tmp_path.exists() and agent.proc.poll() is None


def test_a_slot_frees_only_once_the_previous_jobs_disk_is_free(cp, start_agent, tmp_path):
    with small_disk(tmp_path / "small-disk", "4m") as jobs:
        start_agent("--min-free-disk-gb", "0", jobs_dir=jobs)  # the watermark is off: only the slot protects
        filler = cp.submit(command=["sh", "-c", "head -c 8000000 /dev/zero > fill; echo '{\"filled\": 1}'"])
        following = [cp.submit(command=["echo", '{"after": %d}' % i], input_payload={"blob": "x" * 500_000})
                     for i in range(3)]
        assert cp.result(filler, wait=60)["result"]["output_payload"] == {"filled": 1}
        for i, job_id in enumerate(following):
            result = cp.result(job_id, wait=60)["result"]
            assert result["status"] == "succeeded", result
            assert result["output_payload"] == {"after": i}


def test_a_spec_the_engine_cannot_start_is_invalid_job_naming_the_field(cp, start_agent):
    start_agent()
    result = cp.run(command=["echo"], args=["fine", "bad\u0000arg"])
    assert result["status"] == "failed" and result["failure_reason"] == "invalid_job", result
    assert "args[1]" in result["error_message"] and "NUL" in result["error_message"]
    too_long = cp.run(command=["echo", "x" * 200_000])
    assert too_long["failure_reason"] == "invalid_job" and "command[1]" in too_long["error_message"]


def test_a_relative_jobs_workdir_is_refused_at_start_up(plane, cluster_id, tmp_path):
    from tests.integration.conftest import agent_command

    proc = subprocess.run(
        agent_command("--api-base", plane.url, "--cluster-id", cluster_id, "--cluster-token", TOKEN,
                      "--jobs-workdir", "relative/jobs", "--metrics-port", "0"),
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "--jobs-workdir" in proc.stderr and "absolute" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_heartbeats_go_on_while_the_agent_drains(cp, start_agent):
    agent = start_agent("--on-shutdown", "cancel", "--heartbeat-interval", "1", "--shutdown-grace", "12")
    job_id = cp.submit(command=["sleep", "60"])
    agent.wait_for_log(f"job {job_id}: started container")
    signalled = time.time()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(60) == 0
    exited = time.time()
    draining = [h for h in cp.heartbeats() if h["status"] == "draining"]
    assert len(draining) >= 4, draining  # about one a second for the whole drain, not one at its start
    last = max(h["at"] for h in draining)
    assert last > signalled + (exited - signalled) / 2
    assert cp.result(job_id, wait=30)["result"]["failure_reason"] == "interrupted"


def test_outputs_nested_too_deep_or_not_json_get_one_true_result_and_free_the_slot(cp, start_agent):
    start_agent()  # one slot: a job that kept it would stop every later job
    deep_file = cp.run(command=["sh", "-c", "i=0; s=; e=; while [ $i -lt 300 ]; do s=\"$s[\"; e=\"$e]\"; "
                                            "i=$((i+1)); done; echo \"$s$e\" > output.json"])
    assert deep_file["failure_reason"] == "invalid_output" and "300 levels deep" in deep_file["error_message"]
    very_deep = cp.run(command=["sh", "-c", "i=0; while [ $i -lt 3000 ]; do printf '['; i=$((i+1)); done"])
    assert very_deep["status"] == "succeeded" and very_deep["output_payload"]["stdout"].startswith("[[[")
    nan = cp.run(command=["sh", "-c", "echo '{\"loss\": NaN}' > output.json"])
    assert nan["failure_reason"] == "invalid_output" and "NaN is not JSON" in nan["error_message"]
    assert cp.run(command=["echo", '{"after": 1}'])["output_payload"] == {"after": 1}


def test_a_job_that_ended_in_time_while_no_agent_ran_is_not_a_timeout(cp, start_agent):
    first = start_agent()
    job_id = cp.submit(command=["sh", "-c", "sleep 3; echo '{\"ok\": true}'"], timeout_seconds=6)
    first.wait_for_log(f"job {job_id}: started container")
    assert first.terminate() == 0  # --on-shutdown leave: the container runs on
    time.sleep(9)  # it ends at 3 s; its deadline passes at 6 s, before any agent looks again
    start_agent()
    result = cp.result(job_id, wait=60)["result"]
    assert result["status"] == "succeeded", result
    assert result["output_payload"] == {"ok": True}


def test_an_image_label_named_like_an_event_attribute_cannot_forge_the_jobs_exit(cp, start_agent, docker_client, busybox):
    # Docker copies a container's labels into its die event after its own attributes: `LABEL exitCode=0` once made
    # a failing (or killed) job's event read exit 0, and the job "succeeded".
    import io

    image = "radix-test/forged-exit:1"
    docker_client.images.build(fileobj=io.BytesIO(f"FROM {busybox}\nLABEL exitCode=0\n".encode()), tag=image,
                               rm=True, forcerm=True)
    start_agent()
    failed = cp.run(image=image, command=["sh", "-c", "exit 7"])
    assert failed["status"] == "failed" and failed["failure_reason"] == "exit_code", failed
    assert failed["metrics"]["exit_code"] == 7
    killed = cp.run(image=image, command=["sh", "-c", "kill -9 $$"])
    assert killed["status"] == "failed" and killed["metrics"]["exit_code"] == 137, killed

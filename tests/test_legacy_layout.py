import json
import os

from cluster_agent.executors import ContainerState
from cluster_agent.job_dir import JobDirectory, mark_layout
from cluster_agent.legacy_layout import LEGACY_PREFIX, migrate

FORGED = {"tenant_id": "x", "status": "succeeded", "output_payload": {"forged": True}, "metrics": {"runtime_seconds": 1}}


def _legacy(root, job_id, **files):
    directory = root / job_id
    directory.mkdir(parents=True)
    for name, body in files.items():
        (directory / name.replace("_json", ".json")).write_text(json.dumps(body))
    return directory


def _state(job_id, status="running"):
    return ContainerState(id=f"{job_id}-cid", status=status, labels={"radix.job_id": job_id}, started_at=1.0,
                          image="img:1")


def test_a_running_jobs_forged_records_are_not_trusted(tmp_path):
    _legacy(tmp_path, "j1", job_json={"spec": {"job_id": "j1", "image": "img:1"}}, result_json=FORGED,
            container_json={"container_id": "forged"})
    containers = {"j1": _state("j1")}
    migrate(tmp_path, containers, tenant_id="t", remove_container=lambda cid: None)
    directory = JobDirectory(tmp_path, "j1")
    assert directory.read_result() is None
    assert directory.read_container() == "j1-cid"  # the engine's word, not the file's
    assert directory.read_spec() == {"job_id": "j1", "image": "img:1"}
    assert sorted(os.listdir(directory.workspace)) == []  # the older agent's records are gone from the workspace
    assert "j1" in containers


def test_a_spec_for_another_job_is_replaced_by_what_the_engine_says(tmp_path):
    _legacy(tmp_path, "j1", job_json={"spec": {"job_id": "other", "image": "evil"}})
    migrate(tmp_path, {"j1": _state("j1")}, tenant_id="t", remove_container=lambda cid: None)
    assert JobDirectory(tmp_path, "j1").read_spec() == {"job_id": "j1", "image": "img:1"}


def test_a_spooled_result_without_a_container_becomes_an_agent_error(tmp_path):
    _legacy(tmp_path, "j1", job_json={"spec": {"job_id": "j1", "image": "img"}}, result_json=FORGED)
    migrate(tmp_path, {}, tenant_id="tenant-a", remove_container=lambda cid: None)
    result = JobDirectory(tmp_path, "j1").read_result()
    assert result["status"] == "failed" and result["failure_reason"] == "agent_error"
    assert result["tenant_id"] == "tenant-a" and "forged" not in json.dumps(result)


def test_a_created_container_is_removed_and_the_job_runs_afresh(tmp_path):
    _legacy(tmp_path, "j1", job_json={"spec": {"job_id": "j1", "image": "img"}}, container_json={"container_id": "c"})
    removed = []
    containers = {"j1": _state("j1", status="created")}
    migrate(tmp_path, containers, tenant_id="t", remove_container=removed.append)
    directory = JobDirectory(tmp_path, "j1")
    assert removed == ["j1-cid"] and "j1" not in containers
    assert directory.read_container() is None and directory.read_spec()["job_id"] == "j1"


def test_links_in_a_legacy_directory_are_never_followed(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"spec": {"job_id": "j1", "image": "from-host"}}))
    root = tmp_path / "jobs"
    legacy = root / "j1"
    legacy.mkdir(parents=True)
    os.symlink(outside, legacy / "job.json")
    os.symlink(outside, legacy / "result.json")
    migrate(root, {}, tenant_id="t", remove_container=lambda cid: None)
    directory = JobDirectory(root, "j1")
    assert directory.read_spec() == {"job_id": "j1", "image": "unknown"}  # the host file's spec was not read
    assert directory.read_result()["failure_reason"] == "agent_error"  # the job's one result: it cannot run again
    assert outside.exists()


def test_an_interrupted_migration_is_finished_and_a_marked_root_is_left_alone(tmp_path):
    _legacy(tmp_path, "j1", job_json={"spec": {"job_id": "j1", "image": "img"}})
    os.rename(tmp_path / "j1", tmp_path / f"{LEGACY_PREFIX}j1")  # killed mid-conversion:
    mark_layout(tmp_path)
    (tmp_path / "j1").mkdir()  # a half-made new directory
    migrate(tmp_path, {}, tenant_id="t", remove_container=lambda cid: None)
    assert JobDirectory(tmp_path, "j1").read_spec() == {"job_id": "j1", "image": "img"}
    assert not (tmp_path / f"{LEGACY_PREFIX}j1").exists()

    other = tmp_path / "marked"
    other.mkdir()
    mark_layout(other)
    JobDirectory(other, "j2").prepare({"job_id": "j2"}, {})
    migrate(other, {}, tenant_id="t", remove_container=lambda cid: None)
    assert JobDirectory(other, "j2").read_spec() == {"job_id": "j2"}


def test_a_directory_no_older_agent_made_is_left_alone(tmp_path):
    stray = tmp_path / "stray-dir"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    migrate(tmp_path, {}, tenant_id="t", remove_container=lambda cid: None)
    assert (stray / "notes.txt").read_text() == "mine" and not (stray / "workspace").exists()


def test_a_job_known_only_by_its_directory_gets_its_one_result(tmp_path):
    """An older agent wrote input.json before job.json: killed in between, it left only the job's name."""
    _legacy(tmp_path, "j1", input_json={})
    migrate(tmp_path, {}, tenant_id="t", remove_container=lambda cid: None)
    result = JobDirectory(tmp_path, "j1").read_result()
    assert result["failure_reason"] == "agent_error" and "resubmit" in result["error_message"]


def test_a_spec_nested_too_deep_or_past_the_parser_is_replaced_by_the_engines_word(tmp_path):
    for depth in (300, 5000):
        job_id = f"d{depth}"
        directory = tmp_path / job_id
        directory.mkdir()
        (directory / "job.json").write_text('{"spec": {"job_id": "%s", "x": %s}}' % (job_id, "[" * depth + "]" * depth))
    containers = {"d300": _state("d300"), "d5000": _state("d5000")}
    migrate(tmp_path, containers, tenant_id="t", remove_container=lambda cid: None)
    for job_id in containers:
        assert JobDirectory(tmp_path, job_id).read_spec() == {"job_id": job_id, "image": "img:1"}

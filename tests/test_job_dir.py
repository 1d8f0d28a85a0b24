import json
import os
import stat

from cluster_agent.files import write_json_atomic
from cluster_agent.job_dir import JobDirectory, layout_marked, mark_layout


def test_records_live_beside_the_workspace_never_in_it(tmp_path):
    directory = JobDirectory(tmp_path, "j1")
    directory.prepare({"job_id": "j1", "image": "x", "registry_auth": {"username": "u", "password": "p"}}, {"a": 1})
    directory.write_container("c" * 64)
    directory.write_result({"status": "succeeded"})
    directory.write_log_offset(12)
    assert sorted(os.listdir(directory.workspace)) == ["input.json"]
    assert json.loads((directory.workspace / "input.json").read_text()) == {"a": 1}
    assert stat.S_IMODE(directory.path.stat().st_mode) == 0o700
    assert stat.S_IMODE(directory.workspace.stat().st_mode) == 0o777
    assert stat.S_IMODE((directory.path / "job.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory.path / "result.json").stat().st_mode) == 0o600
    assert directory.read_spec()["registry_auth"]["password"] == "p"  # a re-run after a restart can still pull
    assert directory.read_container() == "c" * 64 and directory.read_log_offset() == 12


def test_a_re_run_gets_a_fresh_workspace(tmp_path):
    directory = JobDirectory(tmp_path, "j1")
    directory.prepare({"job_id": "j1"}, {})
    outside = tmp_path / "outside"
    outside.write_text("host")
    (directory.workspace / "input.json").unlink()
    os.symlink(outside, directory.workspace / "input.json")
    (directory.workspace / "left-over").write_text("x")
    directory.prepare({"job_id": "j1"}, {"b": 2})
    assert sorted(os.listdir(directory.workspace)) == ["input.json"]
    assert outside.read_text() == "host"


def test_atomic_writes_never_follow_a_stray_temporary_link(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("host")
    os.symlink(outside, tmp_path / ".result.json.tmp")
    write_json_atomic(tmp_path / "result.json", {"ok": 1}, mode=0o600)
    assert outside.read_text() == "host"
    assert json.loads((tmp_path / "result.json").read_text()) == {"ok": 1}


def test_remove_reports_and_never_raises(tmp_path):
    directory = JobDirectory(tmp_path, "j1")
    directory.prepare({"job_id": "j1"}, {})
    assert directory.remove() is None and not directory.path.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".trash-")]
    assert directory.remove() is None


def test_layout_marker(tmp_path):
    assert not layout_marked(tmp_path)
    mark_layout(tmp_path)
    assert layout_marked(tmp_path)

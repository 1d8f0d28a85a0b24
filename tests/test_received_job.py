"""A received job is parsed once: its id, its spec or why it cannot run; parsing never raises."""

import pytest

from cluster_agent.job_table import JobHandle, JobTable
from cluster_agent.job_dir import JobDirectory
from cluster_agent.received_job import ReceivedJob
from cluster_agent.redaction import Redactor


def test_a_valid_job_has_its_spec_and_no_problem():
    job = ReceivedJob.parse({"job_id": "j1", "image": "img:1", "input_payload": {"n": 1}})
    assert job.job_id == "j1" and job.problem is None
    assert job.spec is not None and job.spec.image == "img:1" and job.spec.input_payload == {"n": 1}


@pytest.mark.parametrize(
    "raw, job_id, words",
    [
        ([1, 2], None, "JSON list, not an object"),
        ("job", None, "JSON str, not an object"),
        ({"image": "img:1"}, None, "does not match"),
        ({"job_id": 7, "image": "img:1"}, None, "job_id '7' does not match"),
        ({"job_id": "../etc", "image": "img:1"}, "../etc", "does not match"),
        ({"job_id": "j1", "image": "img:1", "x-radix-refused": "nests deeper than 200"}, "j1", "deeper than 200"),
        ({"job_id": "j1"}, "j1", "image"),
        ({"job_id": "j1", "image": "img:1", "timeout_seconds": "soon"}, "j1", "timeout_seconds"),
    ],
)
def test_a_job_that_cannot_run_says_why_and_keeps_its_id(raw, job_id, words):
    job = ReceivedJob.parse(raw)
    assert job.spec is None and job.job_id == job_id
    assert words in job.problem


def test_a_secret_in_a_bad_id_is_redacted_before_the_id_is_cut():
    secret = "tok-" + "s" * 200
    job = ReceivedJob.parse({"job_id": "x" * 100 + secret, "image": "img:1"}, Redactor([secret]))
    assert "sss" not in job.problem and "[REDACTED]" in job.problem


def test_describe_never_shows_the_content():
    job = ReceivedJob.parse({"job_id": 5, "registry_auth": {"password": "hunter22"}})
    assert "hunter22" not in job.describe() and "2 key(s)" in job.describe()


def test_the_job_table_holds_one_handle_per_job(tmp_path):
    table = JobTable()
    first = JobHandle("j1", JobDirectory(tmp_path, "j1"), running=True)
    assert table.add(first)
    assert not table.add(JobHandle("j1", JobDirectory(tmp_path, "j1")))  # a duplicate, never a second run
    assert table.get("j1") is first
    assert table.running() == []  # no runner yet: nothing to report as running
    table.done_running("j1")
    assert table.get("j1").running is False
    table.remove("j1")
    assert table.get("j1") is None and table.all() == []

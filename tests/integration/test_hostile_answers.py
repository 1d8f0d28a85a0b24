"""The real agent against a control plane whose answers are broken: one bad item, ids that break the contract, an
answer that trickles. Each job still gets exactly one result, and the agent keeps working.

The dev control plane's `POST /admin/raw_poll` makes the next poll answer exactly a given body (optionally
trickled), whatever it holds.
"""

import hashlib
import re
import time
import uuid

from devplane.images import BUSYBOX_IMAGE
from tests.integration.conftest import ControlPlane

# The agent's long poll (conftest: --long-poll-seconds 5) plus its request timeout (30 s): a poll's deadline.
POLL_DEADLINE_SECONDS = 5 + 30


def raw_poll(cp: ControlPlane, body: object, **options: object) -> None:
    cp._call("/admin/raw_poll", {"body": body, **options})


def job_spec(job_id: str, **fields: object) -> dict:
    """A job as the dev plane would send it."""
    spec = {"job_id": job_id, "image": BUSYBOX_IMAGE, "command": ["echo", '{"ok": 1}'], "args": [], "env": {},
            "input_payload": {}, "orchestration": {"num_gpus": 0}, "job_kind": "dev"}
    spec.update(fields)
    return spec


def test_a_bad_cancel_id_does_not_lose_the_job_beside_it(cp, start_agent, busybox):
    job_id = f"hostile-{uuid.uuid4().hex[:8]}"
    raw_poll(cp, {"jobs": [job_spec(job_id)], "cancel_job_ids": [42]})
    agent = start_agent()
    record = cp.result(job_id, wait=90)
    assert record["result"]["status"] == "succeeded", record["result"]
    assert record["result"]["output_payload"] == {"ok": 1}
    assert cp.run(command=["true"])["status"] == "succeeded"  # later jobs too; and time for a duplicate to show
    assert cp.result_now(job_id)["deliveries"] == 1
    assert "cancel_job_ids[0] is 42 (int)" in agent.log
    assert agent.proc.poll() is None


def test_ids_that_break_the_contract_get_one_invalid_job_result_each(cp, start_agent, busybox):
    forged = "bad\n2026-01-01 INFO cluster_agent: forged"
    long_id = "x" * 300  # longer than the contract allows, and than a percent-encoded key may be
    for job_id in (forged, long_id):
        cp.submit(job_id=job_id, command=["echo", "{}"])
    agent = start_agent()
    expected_keys = {
        forged: "bad%0A2026-01-01%20INFO%20cluster_agent%3A%20forged",
        long_id: "sha256:" + hashlib.sha256(long_id.encode()).hexdigest(),
    }
    for job_id, key in expected_keys.items():
        record = cp.result(job_id, wait=60)
        assert record["result"]["status"] == "failed", record["result"]
        assert record["result"]["failure_reason"] == "invalid_job"
        assert record["idempotency_keys"] == [key]
    # The agent keeps working, and no result comes twice.
    assert cp.run(command=["echo", '{"after": true}'])["output_payload"] == {"after": True}
    for job_id in expected_keys:
        assert cp.result_now(job_id)["deliveries"] == 1
    # The id's newline does not start a forged record in the agent's log.
    assert not re.search(r"(?m)^2026-01-01 INFO cluster_agent: forged", agent.log)
    assert agent.proc.poll() is None


def test_a_trickling_poll_answer_does_not_hold_the_agent(cp, start_agent, busybox):
    # One byte every 5 s of a 150-byte answer: 750 s, each byte well inside the read timeout. Only the request's
    # deadline ends it; then the next poll takes the job that waited meanwhile.
    raw_poll(cp, {"jobs": [], "pad": "x" * 130}, trickle_seconds=5)
    asked = time.time()
    agent = start_agent()
    job_id = cp.submit(command=["echo", '{"ok": "after the trickle"}'])
    record = cp.result(job_id, wait=POLL_DEADLINE_SECONDS + 60)
    assert record["result"]["output_payload"] == {"ok": "after the trickle"}
    waited = record["assigned_at"] - asked
    assert waited < POLL_DEADLINE_SECONDS + 20, f"the job was taken {waited:.0f} s after the trickle began"
    assert "deadline" in agent.log
    assert agent.proc.poll() is None


def test_a_job_nested_past_the_parsers_depth_loses_only_itself(cp, start_agent, busybox):
    """One job whose input nests 3000 levels deep (the whole answer is beyond Python's JSON parser): it gets its
    invalid_job, and the good job beside it runs."""
    import json

    good, deep = f"beside-{uuid.uuid4().hex[:8]}", f"deep-{uuid.uuid4().hex[:8]}"
    deep_job = json.dumps(job_spec(deep, input_payload=None)).replace('"input_payload": null',
                                                                       '"input_payload": ' + "[" * 3000 + "]" * 3000)
    text = '{"jobs": [' + json.dumps(job_spec(good)) + ", " + deep_job + "]}"
    cp._call("/admin/raw_poll", {"body_text": text, "job_ids": [good, deep]})
    start_agent()
    assert cp.result(good, wait=90)["result"]["output_payload"] == {"ok": 1}
    result = cp.result(deep, wait=30)["result"]
    assert result["failure_reason"] == "invalid_job" and "deeper than 200 levels" in result["error_message"]


def test_an_id_ending_in_a_newline_gets_its_one_result(cp, start_agent, busybox):
    job_id = f"nl-{uuid.uuid4().hex[:8]}\n"
    raw_poll(cp, {"jobs": [job_spec(job_id)]})
    agent = start_agent()
    record = cp.result(job_id, wait=90)
    assert record["result"]["failure_reason"] == "invalid_job" and record["deliveries"] == 1
    assert record["idempotency_keys"] == [job_id.replace("\n", "%0A")]
    assert cp.run(command=["true"])["status"] == "succeeded"
    assert agent.proc.poll() is None


def test_a_token_echoed_into_bad_items_and_ids_leaves_no_prefix_in_the_log_or_a_result(cp, start_agent, busybox):
    from tests.integration.conftest import TOKEN

    password = "Reg1stryPassw0rd-XYZ"
    echoed_id = "x" * 113 + TOKEN + "!!"
    raw_poll(cp, {
        "jobs": ["A" * 53 + TOKEN, {"job_id": 12345, "image": BUSYBOX_IMAGE,
                                    "registry_auth": {"username": "bob", "password": password}},
                 job_spec(echoed_id)],
        "cancel_job_ids": ["C" * 53 + TOKEN + "!"],
    })
    agent = start_agent()
    result = cp.result(echoed_id, wait=90)["result"]
    assert result["failure_reason"] == "invalid_job"
    assert TOKEN[:8] not in result["error_message"] and "[REDACTED]" in result["error_message"]
    assert cp.run(command=["true"])["status"] == "succeeded"
    assert TOKEN[:8] not in agent.log and password not in agent.log


def test_jobs_in_an_answer_under_way_are_never_dropped_when_a_slot_frees(cp, start_agent, busybox):
    """A broken server answers a max_jobs-0 poll with a job, slowly; meanwhile a slot frees, which breaks off
    such polls. An answer under way is read to its end: the job runs and gets its one result."""
    first, second = f"x-{uuid.uuid4().hex[:8]}", f"y-{uuid.uuid4().hex[:8]}"
    raw_poll(cp, {"jobs": [job_spec(first, command=["sleep", "3"])]})
    # The next poll asks for nothing (the one slot is busy): this answer trickles past the first job's end.
    raw_poll(cp, {"jobs": [job_spec(second)]}, trickle_seconds=0.03)
    start_agent("--max-concurrent-jobs", "1")
    assert cp.result(first, wait=60)["result"]["status"] == "succeeded"
    record = cp.result(second, wait=90)
    assert record["result"]["output_payload"] == {"ok": 1} and record["deliveries"] == 1

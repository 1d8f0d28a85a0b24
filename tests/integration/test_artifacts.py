"""Artifacts on the real engine: globs, links and escapes refused, a failed job's checkpoint uploaded, a file the
store refuses (413 from Debian's nginx), an agent SIGKILLed mid-upload and restarted (each file stored once, one
completion), and a result the control plane refuses as too large (413 on complete)."""

from __future__ import annotations

import hashlib
import json
import signal
import time
import urllib.request

import pytest

from tests.object_store import NginxObjectStore

from .conftest import eventually

SECRET_SIG = "test-signature"  # the nginx store's /signed/ location wants ?sig=<this>


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def admin(cp, path: str):
    with urllib.request.urlopen(cp.url + path, timeout=30) as response:
        return response.read()


@pytest.fixture
def store(tmp_path):
    with NginxObjectStore(tmp_path / "store", max_body_size="1m") as store:
        yield store


def test_globs_take_regular_files_only_and_a_failed_jobs_checkpoint_goes_up(cp, start_agent, busybox, store):
    cp.config(artifact_store=store.url("signed") + f"?sig={SECRET_SIG}")
    agent = start_agent()
    script = ("mkdir -p out ckpt/e1 && printf png > out/a.png && printf txt > out/notes.txt "
              "&& printf weights > ckpt/e1/model.pt && ln -s /etc/shadow out/leak.png && ln -s / out/root.png "
              "&& mkfifo out/pipe.png && exit 3")
    job_id = cp.submit(command=["sh", "-c", script], artifacts=["out/*.png", "ckpt/**"], timeout_seconds=30)
    result = cp.result(job_id)["result"]
    assert result["status"] == "failed" and result["failure_reason"] == "exit_code", result
    uploaded = {a["path"]: a for a in result["artifacts"]}
    assert set(uploaded) == {"out/a.png", "ckpt/e1/model.pt"}
    assert uploaded["ckpt/e1/model.pt"] == {"path": "ckpt/e1/model.pt", "size_bytes": 7, "sha256": sha(b"weights")}
    assert store.read(f"{job_id}/ckpt/e1/model.pt") == b"weights"
    assert store.read(f"{job_id}/out/a.png") == b"png"
    skipped = {e["path"]: e["error"] for e in result["artifact_errors"]}
    assert set(skipped) == {"out/leak.png", "out/root.png", "out/pipe.png"}
    assert all("skipped" in reason for reason in skipped.values())
    assert not store.exists(f"{job_id}/out/leak.png")
    assert SECRET_SIG not in agent.log and SECRET_SIG not in json.dumps(result)


def test_a_file_the_store_refuses_is_reported_once_and_fails_a_successful_job(cp, start_agent, busybox, store):
    cp.config(artifact_store=store.url("signed") + f"?sig={SECRET_SIG}")
    agent = start_agent()
    script = "mkdir out && head -c 2097152 /dev/zero > out/big.bin && printf ok > out/small.bin"
    job_id = cp.submit(command=["sh", "-c", script], artifacts=["out/*"], timeout_seconds=30)
    result = cp.result(job_id)["result"]
    assert result["status"] == "failed" and result["failure_reason"] == "artifact_upload_failed", result
    assert [a["path"] for a in result["artifacts"]] == ["out/small.bin"]
    (error,) = result["artifact_errors"]
    assert error["path"] == "out/big.bin" and "413" in error["error"] and "not retried" in error["error"]
    assert "[REDACTED]" in error["error"] and SECRET_SIG not in error["error"]
    assert len(store.requests(f"/signed/{job_id}/out/big.bin", "PUT")) == 1
    assert "out/big.bin" in result["error_message"] and SECRET_SIG not in agent.log


def test_an_agent_killed_mid_upload_resumes_without_uploading_a_file_twice(cp, plane, start_agent, busybox):
    files = [f"f{n}.bin" for n in range(6)]
    cp.fault("objects", delay=2.0)  # each PUT waits 2 s before the store reads it: 4 at once, then 2 more
    first = start_agent()
    script = " && ".join(f"printf {name} > out/{name}" for name in files)
    job_id = cp.submit(command=["sh", "-c", "mkdir out && " + script], artifacts=["out/*.bin"], timeout_seconds=30)

    def stored() -> dict:
        return {k: v for k, v in cp.stats()["artifact_puts"].items() if k.startswith(job_id)}

    def attempts() -> dict:
        return {k: v for k, v in cp.stats()["artifact_put_attempts"].items() if k.startswith(job_id)}

    eventually(lambda: len(stored()) == 4 and len(attempts()) == 6, timeout=30, what="4 stored, 2 in flight")
    time.sleep(0.5)  # the agent records the 4 it was answered for
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    recorded = set(stored())  # answered before the kill: recorded by the agent as uploaded
    cp.fault("objects", clear=True)
    # The 2 in flight: their few bytes were in the socket, so the store keeps them although no agent saw the answer.
    # The next agent must not send them again either: the plan answers {"exists": true} for them.
    time.sleep(2.5)
    second = start_agent()
    result = cp.result(job_id, wait=60)["result"]
    assert result["status"] == "succeeded", result
    assert sorted(a["path"] for a in result["artifacts"]) == [f"out/{name}" for name in files]
    assert stored() == {f"{job_id}/out/{name}": 1 for name in files}
    assert all(attempts()[key] == 1 for key in recorded)
    # The spooled progress: what the first agent recorded is not even offered to the plan again.
    assert f"job {job_id}: {len(recorded)} artifact(s) were uploaded by an earlier agent" in second.log
    record = cp.result_now(job_id)
    assert record["deliveries"] == 1
    for name in files:
        assert admin(cp, f"/admin/jobs/{job_id}/artifacts/out/{name}") == name.encode()


def test_a_result_refused_as_too_large_becomes_a_failure_and_its_output_an_artifact(cp, start_agent, busybox):
    cp.config(max_complete_bytes=4000)
    start_agent()
    big = "python" * 2000  # 12 KB of output.json
    write = f"printf '{{\"text\":\"{big}\"}}' > output.json"
    plain = cp.run(command=["sh", "-c", write], timeout_seconds=30)
    assert plain["status"] == "failed" and plain["failure_reason"] == "invalid_output", plain
    assert "413" in plain["error_message"] and plain["output_payload"] == {}
    job_id = cp.submit(command=["sh", "-c", write], artifacts=["nothing/*"], timeout_seconds=30)
    declared = cp.result(job_id)["result"]
    assert declared["status"] == "failed" and "uploaded as the artifact output.json" in declared["error_message"]
    (artifact,) = declared["artifacts"]
    assert artifact["path"] == "output.json"
    assert json.loads(admin(cp, f"/admin/jobs/{job_id}/artifacts/output.json")) == {"text": big}
    assert cp.stats()["completes_refused"] >= 2

"""Job inputs by URL, on the real engine, from a real HTTP server the project did not write (Debian's nginx):
downloads with and without checksums, a resumed download, the failures (404, mismatch, over the limit) and the
content-addressed cache (one download for concurrent jobs, read-only to jobs, eviction, a corrupt entry)."""

from __future__ import annotations

import hashlib
import json
import os
import threading

import pytest

from tests.object_store import CuttingProxy, NginxObjectStore

from .conftest import eventually

SCRIPT = "sha256sum {path} | cut -d' ' -f1 > /tmp/h; printf '{{\"sha\":\"%s\"}}' $(cat /tmp/h) > /workspace/output.json"


@pytest.fixture
def store(tmp_path):
    with NginxObjectStore(tmp_path / "store") as store:
        yield store


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hashing_job(path: str, **fields) -> dict:
    return {"command": ["sh", "-c", SCRIPT.format(path=path)], **fields}


def test_inputs_are_downloaded_before_the_job_with_and_without_checksums(cp, start_agent, busybox, store):
    weights, config = os.urandom(3 * 1024 * 1024), b'{"layers": 2}'
    store.put("m/weights.bin", weights)
    store.put("m/config.json", config)
    start_agent()
    result = cp.run(
        **hashing_job("models/weights.bin", timeout_seconds=20),
        inputs=[{"url": store.url("m/weights.bin", {"X-Amz-Signature": "s3cr3tsig"}), "path": "models/weights.bin",
                 "sha256": sha(weights), "size_bytes": len(weights)},
                {"url": store.url("m/config.json"), "path": "models/config.json"}],
    )
    assert result["status"] == "succeeded", result
    assert result["output_payload"] == {"sha": sha(weights)}
    metrics = result["metrics"]
    assert metrics["input_bytes"] == len(weights) + len(config)
    assert metrics["input_seconds"] >= 0 and metrics["input_cached_bytes"] == 0
    assert len(store.requests("/m/weights.bin", "GET")) == 1


def test_a_broken_download_resumes_with_a_range_request(cp, start_agent, busybox, store):
    data = os.urandom(4 * 1024 * 1024)
    store.put("big.bin", data)
    with CuttingProxy(("127.0.0.1", store.port), cut_after_bytes=1_000_000, cut_times=1) as proxy:
        start_agent()
        result = cp.run(**hashing_job("big.bin"), inputs=[{"url": proxy.url(store.url("big.bin")), "path": "big.bin",
                                                           "sha256": sha(data)}])
        assert result["status"] == "succeeded", result
        assert result["output_payload"] == {"sha": sha(data)}
        ranges = [request.range for request in proxy.requests]
        assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


@pytest.mark.parametrize("case", ["404", "mismatch", "over_limit", "size_mismatch", "server_error"])
def test_an_input_that_cannot_be_had_fails_the_job_without_leaking_the_url(cp, start_agent, busybox, store, case):
    store.put("f.bin", b"x" * 5000)
    secret = "sig=t0ps3cr3tvalue"
    url = store.url("f.bin", secret)
    item = {"url": url, "path": "f.bin"}
    extra: list[str] = ["--transfer-retries", "1"]
    if case == "404":
        item["url"] = store.url("missing.bin", secret)
    elif case == "mismatch":
        item["sha256"] = "0" * 64
    elif case == "over_limit":
        extra += ["--max-input-bytes", "1000"]
    elif case == "size_mismatch":
        item["size_bytes"] = 4000
    else:
        item["url"] = store.status_url(503) + "?" + secret
    agent = start_agent(*extra)
    result = cp.run(command=["sh", "-c", "echo should-not-run"], inputs=[item], timeout_seconds=20)
    assert result["status"] == "failed" and result["failure_reason"] == "input_unavailable", result
    message = result["error_message"]
    assert "f.bin" in message and "[REDACTED]" in message
    expected = {"404": "HTTP 404", "mismatch": "SHA-256", "over_limit": "--max-input-bytes",
                "size_mismatch": "size", "server_error": "HTTP 503"}[case]
    assert expected in message, message
    assert "t0ps3cr3tvalue" not in message and "t0ps3cr3tvalue" not in agent.log
    # A server error might pass on another node; a 404, a wrong checksum or size, a limit would not.
    retryable = case == "server_error"
    assert result["metrics"]["retryable"] is retryable
    assert result["metrics"]["failure_class"] == ("infrastructure" if retryable else "job")
    assert "should-not-run" not in json.dumps(result)


def test_concurrent_jobs_share_one_cached_download_that_they_cannot_change(cp, start_agent, busybox, store, tmp_path):
    data = os.urandom(2 * 1024 * 1024)
    store.put("shared.bin", data)
    item = {"url": store.url("shared.bin"), "path": "in/shared.bin", "sha256": sha(data)}
    cache = tmp_path / "cache"
    start_agent("--cache-dir", str(cache), "--max-concurrent-jobs", "3", "--heartbeat-interval", "1")
    tamper = ("echo evil > in/shared.bin 2>/dev/null; rm -f in/shared.bin 2>/dev/null; chmod 666 in/shared.bin 2>/dev/null; "
              + SCRIPT.format(path="in/shared.bin"))
    ids = [cp.submit(command=["sh", "-c", tamper], inputs=[item], timeout_seconds=30) for _ in range(3)]
    results = [cp.result(job_id)["result"] for job_id in ids]
    for result in results:
        assert result["status"] == "succeeded", result
        assert result["output_payload"] == {"sha": sha(data)}
    assert len(store.requests("/shared.bin", "GET")) == 1
    assert sum(r["metrics"]["input_cached_bytes"] for r in results) == 2 * len(data)
    entry = cache / "sha256" / sha(data)
    assert entry.read_bytes() == data and entry.stat().st_mode & 0o777 == 0o444
    beats = eventually(lambda: [b for b in cp.heartbeats() if b["capabilities"].get("input_cache", {}).get("entries")],
                       what="a heartbeat with the cache")
    reported = beats[-1]["capabilities"]["input_cache"]
    assert reported["entries"] == 1 and reported["size_bytes"] == len(data) and reported["free_bytes"] > 0


def test_the_cache_evicts_least_recently_used_and_refetches_a_corrupt_entry(cp, start_agent, busybox, store, tmp_path):
    blobs = [os.urandom(600_000) for _ in range(3)]
    for n, blob in enumerate(blobs):
        store.put(f"b{n}.bin", blob)
    cache = tmp_path / "cache"
    start_agent("--cache-dir", str(cache), "--cache-max-bytes", "1300000")

    def run(n: int) -> dict:
        result = cp.run(**hashing_job("b.bin"), inputs=[{"url": store.url(f"b{n}.bin"), "path": "b.bin",
                                                         "sha256": sha(blobs[n])}])
        assert result["status"] == "succeeded" and result["output_payload"] == {"sha": sha(blobs[n])}, result
        return result

    for n in range(3):
        run(n)
    entries = {p.name for p in (cache / "sha256").iterdir() if p.suffix != ".json"}
    assert entries == {sha(blobs[1]), sha(blobs[2])}  # b0, least recently used, went for b2
    corrupt = cache / "sha256" / sha(blobs[2])
    os.chmod(corrupt, 0o644)
    corrupt.write_bytes(b"bit rot" + blobs[2][7:])
    run(2)
    assert len(store.requests("/b2.bin", "GET")) == 2
    assert (cache / "sha256" / sha(blobs[2])).read_bytes() == blobs[2]


def test_a_job_canceled_while_its_input_downloads_ends_canceled(cp, start_agent, busybox, store):
    store.put("slow.bin", b"s" * 2_000_000)  # 30 s at the store's slow rate
    agent = start_agent()
    job_id = cp.submit(command=["true"], inputs=[{"url": store.slow_url("slow.bin"), "path": "slow.bin"}])
    agent.wait_for_log(f"job {job_id}: received")
    threading.Event().wait(1)  # well into the 30 s download
    cp.cancel(job_id)
    result = cp.result(job_id, wait=30)["result"]
    assert result["status"] == "canceled", result


def test_a_full_jobs_disk_during_a_download_is_the_node_s_fault(cp, start_agent, busybox, store, tmp_path):
    from .conftest import small_disk

    store.put("big.bin", os.urandom(3 * 1024 * 1024))
    with small_disk(tmp_path / "jobs", "2m") as jobs:
        start_agent("--jobs-workdir", str(jobs), "--min-free-disk-gb", "0", "--quarantine-after", "0")
        result = cp.run(command=["true"], inputs=[{"url": store.url("big.bin"), "path": "big.bin"}])
    assert result["failure_reason"] == "agent_error" and "No space left on device" in result["error_message"], result
    assert result["metrics"]["failure_class"] == "infrastructure"

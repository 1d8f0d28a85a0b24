"""Unit tests of job data transfer that need no server: the spec's new fields, URL redaction, the input cache,
artifact collection from a hostile workspace, and the result that replaces one refused as too large."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from cluster_agent.errors import ConfigError
from cluster_agent.models import ArtifactRecord, Completion, FailureReason, JobMetrics, JobSpec, JobStatus
from cluster_agent.transfer import InputCache, collect_artifacts, redact_url, refused_result
from cluster_agent.transfer.urls import url_secrets

DIGEST_A = hashlib.sha256(b"a" * 100).hexdigest()


def spec(**fields):
    return JobSpec.model_validate({"job_id": "j", "image": "busybox", **fields})


# --- the job spec --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path, words", [
    ("../etc/passwd", "'..'"), ("/etc/passwd", "absolute"), ("a//b", "empty"), ("./a", "'.'"), ("", "non-empty"),
    ("input.json", "overlaps input.json"), ("output.json/x", "overlaps output.json"), ("a\x00b", "non-empty"),
])
def test_an_input_path_must_stay_inside_the_workspace(path, words):
    with pytest.raises(ValidationError) as info:
        spec(inputs=[{"url": "http://h/x", "path": path}])
    assert words in str(info.value)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://h/x", "http:///nohost", "gopher://h/", "http://h/a b"])
def test_an_input_url_must_be_http(url):
    with pytest.raises(ValidationError, match="http"):
        spec(inputs=[{"url": url, "path": "x"}])


def test_a_refused_url_is_never_quoted_with_its_query():
    with pytest.raises(ValidationError) as info:
        spec(inputs=[{"url": "ftp://h/x?X-Amz-Signature=topsecretvalue", "path": "x"}])
    message = "; ".join(e["msg"] for e in info.value.errors())
    assert "topsecretvalue" not in message


def test_inputs_may_not_overlap_each_other():
    with pytest.raises(ValidationError, match="overlap"):
        spec(inputs=[{"url": "http://h/1", "path": "data"}, {"url": "http://h/2", "path": "data/x"}])
    with pytest.raises(ValidationError, match="overlap"):
        spec(inputs=[{"url": "http://h/1", "path": "x"}, {"url": "http://h/2", "path": "x"}])


def test_sha256_is_checked_and_normalized():
    assert spec(inputs=[{"url": "http://h/1", "path": "x", "sha256": DIGEST_A.upper()}]).inputs[0].sha256 == DIGEST_A
    with pytest.raises(ValidationError, match="64 hexadecimal"):
        spec(inputs=[{"url": "http://h/1", "path": "x", "sha256": "abc"}])


@pytest.mark.parametrize("pattern", ["../x", "/abs/*", "a/../b", ""])
def test_artifact_globs_stay_inside_the_workspace(pattern):
    with pytest.raises(ValidationError):
        spec(artifacts=[pattern])


def test_a_core_job_is_unchanged_and_null_lists_are_empty():
    job = spec(inputs=None, artifacts=None)
    assert job.inputs == [] and job.artifacts == []


# --- URLs ------------------------------------------------------------------------------------------------------


def test_redact_url_drops_query_and_credentials():
    url = "https://user:pa55word@store.example:9000/bucket/key.bin?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA1"
    shown = redact_url(url)
    assert shown == "https://store.example:9000/bucket/key.bin?[REDACTED]"
    for secret in ("pa55word", "abcdef", "AKIA1", "user"):
        assert secret not in shown
    assert {"abcdef", "AKIA1", "pa55word", "user"} <= set(url_secrets(url))


# --- the input cache ---------------------------------------------------------------------------------------------


def writer(content: bytes, calls: list[str], delay: float = 0.0):
    def fetch(tmp: Path) -> None:
        calls.append(threading.current_thread().name)
        time.sleep(delay)
        tmp.write_bytes(content)
    return fetch


def digest(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_concurrent_jobs_asking_for_one_digest_fetch_it_once(tmp_path):
    cache = InputCache(tmp_path / "cache", 10_000)
    cache.open()
    calls: list[str] = []
    content = b"weights" * 100
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda i=i: paths.append(cache.acquire(f"job{i}", digest(content),
                                                                             writer(content, calls, 0.2))))
               for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1
    assert len(set(paths)) == 1 and paths[0].read_bytes() == content
    assert paths[0].stat().st_mode & 0o777 == 0o444


def test_eviction_is_least_recently_used_and_spares_pinned_entries(tmp_path):
    cache = InputCache(tmp_path / "cache", 250)
    cache.open()
    blobs = [bytes([n]) * 100 for n in range(4)]
    for n, blob in enumerate(blobs[:2]):
        cache.acquire(f"job{n}", digest(blob), writer(blob, []))
    cache.release("job0")  # job1 still runs with blob 1
    time.sleep(0.01)
    cache.acquire("job2", digest(blobs[2]), writer(blobs[2], []))  # 300 > 250: evict the LRU unpinned (blob 0)
    present = {p.name for p in (tmp_path / "cache" / "sha256").iterdir() if p.suffix != ".json"}
    assert present == {digest(blobs[1]), digest(blobs[2])}
    cache.acquire("job3", digest(blobs[3]), writer(blobs[3], []))  # everything but job1's/job2's is gone; pinned stay
    assert digest(blobs[1]) in {p.name for p in (tmp_path / "cache" / "sha256").iterdir()}
    for job in ("job1", "job2", "job3"):
        cache.release(job)
    assert cache.stats()["size_bytes"] <= 250


def test_a_corrupt_entry_is_dropped_and_fetched_again(tmp_path):
    cache = InputCache(tmp_path / "cache", 10_000)
    cache.open()
    content = b"model" * 50
    calls: list[str] = []
    path = cache.acquire("a", digest(content), writer(content, calls))
    cache.release("a")
    os.chmod(path, 0o644)
    path.write_bytes(b"bit rot" * 10)
    again = cache.acquire("b", digest(content), writer(content, calls))
    assert len(calls) == 2 and again.read_bytes() == content


def test_a_touched_but_intact_entry_is_kept(tmp_path):
    cache = InputCache(tmp_path / "cache", 10_000)
    cache.open()
    content = b"x" * 10
    calls: list[str] = []
    path = cache.acquire("a", digest(content), writer(content, calls))
    os.chmod(path, 0o444)  # ctime changes, content does not
    cache.acquire("b", digest(content), writer(content, calls))
    assert len(calls) == 1


def test_a_restarted_agent_finds_its_cache_and_a_second_agent_is_refused(tmp_path):
    content = b"data" * 10
    first = InputCache(tmp_path / "cache", 10_000)
    first.open()
    first.acquire("a", digest(content), writer(content, []))
    with pytest.raises(ConfigError, match="in use by another agent"):
        InputCache(tmp_path / "cache", 10_000).open()
    first.close()
    second = InputCache(tmp_path / "cache", 10_000)
    second.open()
    calls: list[str] = []
    second.acquire("b", digest(content), writer(content, calls))
    assert calls == [] and second.stats()["entries"] == 1


@pytest.mark.parametrize("cached_first", [False, True])
def test_a_directory_an_engine_made_at_an_entrys_path_is_replaced_not_a_lasting_failure(tmp_path, cached_first):
    # Podman creates a missing bind-mount source as a directory: a container started late, after its input was
    # evicted, leaves one where the entry was (or is).
    cache = InputCache(tmp_path / "cache", 10_000)
    cache.open()
    content = b"y" * 10
    calls: list[str] = []
    if cached_first:
        path = cache.acquire("a", digest(content), writer(content, calls))
        path.unlink()
    path = tmp_path / "cache" / "sha256" / digest(content)
    path.mkdir(parents=True, exist_ok=True)
    (path / "left-by-a-container").write_text("x")
    got = cache.acquire("b", digest(content), writer(content, calls))
    assert got.is_file() and got.read_bytes() == content
    assert cache.acquire("c", digest(content), writer(content, calls)).read_bytes() == content


def test_a_failed_fetch_caches_nothing(tmp_path):
    cache = InputCache(tmp_path / "cache", 10_000)
    cache.open()

    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise RuntimeError("404")

    with pytest.raises(RuntimeError):
        cache.acquire("a", DIGEST_A, fail)
    assert cache.stats()["entries"] == 0
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


# --- collecting artifacts ----------------------------------------------------------------------------------------


def collect(workspace: Path, patterns: list[str], **limits):
    options = {"max_files": 100, "max_bytes": 10**9, "max_file_bytes": 10**9} | limits
    found, errors, skipped = collect_artifacts(workspace, patterns, **options)
    return found, errors + skipped


def test_globs_match_files_at_any_depth_with_double_star(tmp_path):
    (tmp_path / "out" / "sub").mkdir(parents=True)
    (tmp_path / "out" / "a.png").write_bytes(b"png")
    (tmp_path / "out" / "sub" / "b.png").write_bytes(b"png2")
    (tmp_path / "out" / "c.txt").write_text("no")
    (tmp_path / "ckpt" / "e1").mkdir(parents=True)
    (tmp_path / "ckpt" / "e1" / "model.pt").write_bytes(b"w" * 10)
    found, errors = collect(tmp_path, ["out/*.png", "ckpt/**"])
    assert sorted(f.path for f in found) == ["ckpt/e1/model.pt", "out/a.png"]
    assert errors == []
    found, _ = collect(tmp_path, ["out/**/*.png"])
    assert sorted(f.path for f in found) == ["out/a.png", "out/sub/b.png"]
    png = next(f for f in found if f.path == "out/a.png")
    assert png.sha256 == digest(b"png") and png.size_bytes == 3 and png.content_type == "image/png"


def test_links_fifos_and_escapes_are_never_followed(tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("root's secret")
    workspace = tmp_path / "ws"
    (workspace / "out").mkdir(parents=True)
    (workspace / "out" / "leak.txt").symlink_to(secret)
    (workspace / "out" / "dir-link").symlink_to(tmp_path)
    os.mkfifo(workspace / "out" / "pipe.txt")
    (workspace / "out" / "ok.txt").write_text("fine")
    found, errors = collect(workspace, ["out/**", "**/host-secret"])
    assert [f.path for f in found] == ["out/ok.txt"]
    reasons = {e.path: e.error for e in errors}
    assert "symbolic link" in reasons["out/leak.txt"] and "symbolic link" in reasons["out/dir-link"]
    assert "not a regular file" in reasons["out/pipe.txt"]


def test_limits_are_reported_per_file(tmp_path):
    for n in range(5):
        (tmp_path / f"f{n}.bin").write_bytes(b"x" * 100)
    (tmp_path / "big.bin").write_bytes(b"x" * 1000)
    found, errors = collect(tmp_path, ["*.bin"], max_file_bytes=500, max_files=3, max_bytes=250)
    assert len(found) == 2
    reasons = " ".join(e.error for e in errors)
    assert "--max-artifact-file-bytes" in reasons and "--max-artifact-bytes" in reasons


def test_a_deep_tree_is_bounded(tmp_path):
    current = tmp_path
    for _ in range(80):
        current = current / "d"
        current.mkdir()
    (current / "deep.txt").write_text("x")
    found, errors = collect(tmp_path, ["**"])
    assert found == [] and any("deeper than" in e.error for e in errors)


# --- a result refused as too large ------------------------------------------------------------------------------


def completion(**fields) -> Completion:
    base = {"tenant_id": "t", "status": JobStatus.SUCCEEDED, "output_payload": {"big": "x" * 100},
            "metrics": JobMetrics(runtime_seconds=1.0, exit_code=0)}
    return Completion(**(base | fields))


def test_a_refused_success_becomes_a_failure_naming_the_size():
    smaller = refused_result("j", completion(), 123456, None, None)
    assert smaller.status is JobStatus.FAILED and smaller.failure_reason is FailureReason.INVALID_OUTPUT
    assert "123456 bytes" in smaller.error_message and "413" in smaller.error_message
    assert smaller.output_payload == {} and smaller.metrics.exit_code == 0
    assert "artifacts" not in smaller.to_wire()


def test_a_refused_failure_keeps_its_reason():
    failed = completion(status=JobStatus.FAILED, failure_reason=FailureReason.EXIT_CODE, error_message="exit 3")
    smaller = refused_result("j", failed, 99, None, None)
    assert smaller.failure_reason is FailureReason.EXIT_CODE and smaller.error_message.startswith("exit 3; ")


def test_with_artifacts_but_no_directory_the_upload_error_is_listed():
    declared = completion(artifacts=[ArtifactRecord(path="a", size_bytes=1, sha256=DIGEST_A)])
    smaller = refused_result("j", declared, 99, None, None)
    assert [a.path for a in smaller.artifacts] == ["a"]
    assert smaller.artifact_errors and smaller.artifact_errors[0].path == "output.json"

"""Data transfer against hostile or broken servers and workspaces (the attack on issue 16): bounded memory,
descriptors and time, one bad item never sinking the others, secrets never quoted."""

from __future__ import annotations

import os
import resource
import socket
import threading
import time
from pathlib import Path

import pytest

from cluster_agent.errors import TransferFailed
from cluster_agent.models import Completion, JobMetrics, JobStatus
from cluster_agent.transfer import ArtifactUpload, Downloader, collect_artifacts
from cluster_agent.transfer import artifacts as artifacts_module
from cluster_agent.transfer import download as download_module


class RawServer:
    """Answers every connection with `respond(conn)`: the test writes exactly the bytes it wants."""

    def __init__(self, respond):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.connections = 0
        self._respond = respond
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, path="/f"):
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            conn.settimeout(10)
            conn.recv(65536)
            self._respond(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self._sock.close()


def collect(workspace, patterns, **extra):
    return collect_artifacts(workspace, patterns, max_files=100, max_bytes=10**9, max_file_bytes=10**9, **extra)


def test_a_wide_tree_never_holds_a_descriptor_per_directory(tmp_path):
    for n in range(600):
        (tmp_path / f"d{n:04d}").mkdir()
    (tmp_path / "d0599" / "important.bin").write_text("precious")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))  # far fewer than the directories
    try:
        found, errors, skipped = collect(tmp_path, ["**/important.bin"])
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert [f.path for f in found] == ["d0599/important.bin"] and errors == [] and skipped == []


def test_names_that_are_not_utf8_and_cached_inputs_are_skipped_not_fatal(tmp_path):
    os.close(os.open(os.path.join(os.fsencode(tmp_path), b"bad\xffname.txt"), os.O_CREAT | os.O_WRONLY))
    (tmp_path / "good.txt").write_text("ok")
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "weights.bin").write_bytes(b"")  # a mount target
    found, errors, skipped = collect(tmp_path, ["**"], exclude=frozenset({"in/weights.bin"}))
    assert [f.path for f in found] == ["good.txt"] and errors == []
    reasons = {s.path: s.error for s in skipped}
    assert "not UTF-8" in reasons["bad\\xffname.txt"] and "cached input" in reasons["in/weights.bin"]


def test_error_lists_are_capped(tmp_path):
    for n in range(150):
        (tmp_path / f"l{n}").symlink_to("/etc/passwd")
    _, _, skipped = collect(tmp_path, ["*"])
    assert len(skipped) == 101 and skipped[-1].error == "and 50 more"


class Planner:
    def __init__(self, plan):
        self.calls = []
        self._plan = plan

    def plan_artifacts(self, job_id, files, *, cancel):
        self.calls.append(len(files))
        return [self._plan(f["path"]) for f in files]


def completion():
    return Completion(tenant_id="t", status=JobStatus.SUCCEEDED, metrics=JobMetrics(runtime_seconds=1, exit_code=0))


def test_an_upload_answer_body_is_never_read(tmp_path):
    def huge(conn):
        conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: 8589934592\r\n\r\n")
        for _ in range(2000):  # 2 GB would follow; the agent must hang up long before
            conn.sendall(b"\0" * 1024 * 1024)

    server = RawServer(huge)
    (tmp_path / "a.bin").write_bytes(b"data")
    upload = ArtifactUpload(Planner(lambda path: {"path": path, "url": server.url()}), retries=1, backoff_max=0.1)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    done = upload.finish("j", ["*.bin"], tmp_path, tmp_path / "jobdir", completion())
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert done.failure_reason.value == "artifact_upload_failed" and "HTTP 500" in done.artifact_errors[0].error
    assert grown_mb < 100
    server.close()


def test_a_bad_plan_item_fails_its_file_only_and_its_header_values_are_never_quoted(tmp_path):
    for name in ("a.bin", "b.bin", "c.bin"):
        (tmp_path / name).write_bytes(name.encode())
    received = []

    def ok(conn):
        received.append(1)
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    server = RawServer(ok)
    plans = {
        "a.bin": {"path": "a.bin", "url": server.url("/a"), "headers": {"X-Amz-Security-Token": "tok\r\nX-Evil: 1"}},
        "b.bin": {"path": "b.bin", "url": server.url("/b"), "headers": {"X-A": "é中"}},
        "c.bin": {"path": "c.bin", "url": server.url("/c"), "headers": {"Content-Length": "1", "Host": "evil"}},
    }
    upload = ArtifactUpload(Planner(lambda path: plans[path]), retries=2, backoff_max=0.1)
    done = upload.finish("j", ["*.bin"], tmp_path, tmp_path, completion())
    assert [a.path for a in done.artifacts] == ["c.bin"]  # its framing headers dropped, the rest sent
    errors = {e.path: e.error for e in done.artifact_errors}
    assert "cannot be sent" in errors["a.bin"] and "tok" not in errors["a.bin"]
    assert "ASCII" in errors["b.bin"]
    server.close()


def test_plans_are_asked_for_in_batches(tmp_path):
    for n in range(250):
        (tmp_path / f"f{n}.bin").write_bytes(b"x")
    planner = Planner(lambda path: {"path": path, "exists": True})
    upload = ArtifactUpload(planner, max_files=1000)
    done = upload.finish("j", ["*.bin"], tmp_path, tmp_path, completion())
    assert planner.calls == [100, 100, 50] and len(done.artifacts) == 250


def test_a_store_that_stops_reading_is_cut_off(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts_module, "STALL_SECONDS", 1.0)

    def never_reads(conn):
        time.sleep(30)

    server = RawServer(never_reads)
    (tmp_path / "big.bin").write_bytes(os.urandom(64 * 1024 * 1024))  # more than the socket buffers hold
    upload = ArtifactUpload(Planner(lambda path: {"path": path, "url": server.url()}), retries=0)
    began = time.monotonic()
    done = upload.finish("j", ["*.bin"], tmp_path, tmp_path / "jd", completion())
    assert time.monotonic() - began < 20
    assert "under 65536 bytes" in done.artifact_errors[0].error or "Timeout" in done.artifact_errors[0].error
    server.close()


def test_downloads_from_broken_servers_fail_as_the_input_s_fault(tmp_path, monkeypatch):
    def redirect_loop(conn):
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: /f?sig=s3cr3tsig\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    def longer_range(conn):  # says 10 bytes, sends 50,000 (no Content-Length: read to the close)
        conn.sendall(b"HTTP/1.1 206 Partial\r\nContent-Range: bytes 0-9/10\r\nConnection: close\r\n\r\n" + b"x" * 50000)

    loop = RawServer(redirect_loop)
    with pytest.raises(TransferFailed) as info:
        Downloader(retries=0).fetch(loop.url("/f?sig=s3cr3tsig"), tmp_path / "a", limit=10**6)
    assert info.value.permanent and "TooManyRedirects" in str(info.value) and "s3cr3tsig" not in str(info.value)
    liar = RawServer(longer_range)
    with pytest.raises(TransferFailed, match="more than the 10 bytes it announced"):
        Downloader(retries=0).fetch(liar.url(), tmp_path / "b", limit=10**6)


def test_a_trickling_download_is_cut_off(tmp_path, monkeypatch):
    monkeypatch.setattr(download_module, "STALL_SECONDS", 1.0)

    def trickle(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        for _ in range(100):
            conn.sendall(b"x")
            time.sleep(0.3)

    server = RawServer(trickle)
    began = time.monotonic()
    with pytest.raises(TransferFailed) as info:
        Downloader(retries=1, backoff_max=0.1).fetch(server.url(), tmp_path / "a", limit=10**6)
    assert "under 65536 bytes" in str(info.value) and not info.value.permanent
    assert time.monotonic() - began < 10

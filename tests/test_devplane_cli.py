"""The development control plane's CLI: every mistake is one line with the cause and a non-zero exit."""

import hashlib
import json
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from devplane import DevControlPlane

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "devplane", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def one_line_error(run: subprocess.CompletedProcess, *words: str) -> None:
    assert run.returncode != 0, run
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def plane():
    plane = DevControlPlane().start()
    yield plane
    plane.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_duplicate_job_id_is_the_servers_own_words(plane, tmp_path):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "dup-1", "image": "busybox"}))
    first = cli("submit", "--url", plane.url, str(job))
    assert first.returncode == 0 and first.stdout.strip() == "dup-1"
    one_line_error(cli("submit", "--url", plane.url, str(job)), "409", "job dup-1 already exists")


def test_an_unknown_job_id(plane):
    one_line_error(cli("result", "--url", plane.url, "--wait", "0", "no-such-job"), "404", "unknown job no-such-job")


def test_a_job_file_that_is_missing_or_not_json_submits_nothing(plane, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"image": "busybox",}')
    good = tmp_path / "good.json"
    good.write_text('{"image": "busybox"}')
    one_line_error(cli("submit", "--url", plane.url, str(good), str(bad)), "not valid JSON", "bad.json")
    one_line_error(cli("submit", "--url", plane.url, str(tmp_path / "missing.json")), "cannot read job file",
                   "missing.json")
    assert plane.state.jobs == {}  # the good file was not submitted either


def test_a_server_that_is_not_running():
    one_line_error(cli("jobs", "--url", f"http://127.0.0.1:{free_port()}"), "cannot reach the dev control plane",
                   "python -m devplane serve")


def test_a_port_in_use(plane):
    port = plane.url.rsplit(":", 1)[1]
    one_line_error(cli("serve", "--port", port), f"port {port}", "in use", "--port")


def test_jobs_lists_what_it_has(plane):
    plane.state.submit({"job_id": "listed-1", "image": "busybox"})
    plane.state.submit({"job_id": "started-1", "image": "busybox"})
    plane.state.jobs["started-1"].state, plane.state.jobs["started-1"].started = "assigned", {"at": 1.0}
    run = cli("jobs", "--url", plane.url)
    assert run.returncode == 0
    assert [line.split() for line in run.stdout.splitlines()] == [
        ["JOB_ID", "STATE", "STATUS"], ["listed-1", "queued"], ["started-1", "running"]]


def test_result_says_early_that_no_agent_took_the_job_and_brief_shows_only_the_outcome(plane, monkeypatch, capsys):
    import devplane.__main__ as devplane_cli

    monkeypatch.setattr(devplane_cli, "QUEUED_HINT_SECONDS", 0.2)
    plane.state.submit({"job_id": "waiting-1", "image": "busybox"})
    assert devplane_cli.main(["result", "--url", plane.url, "--wait", "0.5", "--brief", "waiting-1"]) == 1
    out, err = capsys.readouterr()
    hint, end = err.strip().splitlines()
    assert "job waiting-1 is still queued after 0.2 s: no agent has taken it" in hint
    assert "no result for waiting-1 within 0.5 s" in end
    plane.state.jobs["waiting-1"].result, plane.state.jobs["waiting-1"].state = {"status": "succeeded"}, "done"
    assert devplane_cli.main(["result", "--url", plane.url, "--brief", "waiting-1"]) == 0
    out, err = capsys.readouterr()
    assert set(json.loads(out)) == {"job_id", "state", "result", "log"} and err == ""


def test_serve_shows_no_traceback_when_a_client_resets_its_connection():
    serve = subprocess.Popen([sys.executable, "-m", "devplane", "serve", "--port", str(free_port())], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        host, port = serve.stdout.readline().split()[4].removeprefix("http://").split(":")
        for _ in range(3):  # an agent killed mid-request: its kernel resets the connection
            sock = socket.create_connection((host, int(port)))
            sock.sendall(b"POST /v1/clusters/dev-cluster/jobs/poll HTTP/1.1\r\nHost: x\r\n")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        assert httpx.get(f"http://{host}:{port}/admin/jobs").status_code == 200  # still serving
    finally:
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(10) == 0
    assert "Traceback" not in serve.stderr.read()


def test_cancel_of_an_unknown_or_finished_job_says_so_and_adds_nothing(plane):
    one_line_error(cli("cancel", "--url", plane.url, "no-such-job"), "404", "unknown job no-such-job")
    assert "no-such-job" not in plane.state.jobs
    plane.state.submit({"job_id": "ended-1", "image": "busybox"})
    plane.state.jobs["ended-1"].result = {"status": "succeeded"}
    one_line_error(cli("cancel", "--url", plane.url, "ended-1"), "already finished (succeeded)")
    plane.state.submit({"job_id": "queued-1", "image": "busybox"})
    run = cli("cancel", "--url", plane.url, "queued-1")
    assert run.returncode == 0 and "cancel requested for job queued-1" in run.stdout
    assert plane.state.jobs["queued-1"].cancel_requested


def test_a_request_cut_short_takes_no_job(plane):
    """An agent breaking off a poll between its headers and its body: the dev plane must not read the missing body
    as `{}` (max_jobs defaulting to 1) and hand a job to a connection nobody reads any more."""
    plane.state.submit({"job_id": "kept-1", "image": "busybox"})
    host, port = plane.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/clusters/dev-cluster/jobs/poll HTTP/1.1\r\nHost: x\r\n"
                     b"X-Radix-Cluster-Token: dev-cluster-token\r\nX-Radix-Tenant-Id: t\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 80\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)  # no body will come
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    assert b"HTTP/1.1 400" in answer and b"body cut short" in answer, answer[:300]
    assert plane.state.jobs["kept-1"].state == "queued"


def stored_artifact(plane, job_id: str, path: str, data: bytes) -> None:
    """An assigned job with one uploaded artifact, the way an agent makes one: plan, then PUT."""
    agent = {"X-Radix-Cluster-Token": "dev-cluster-token", "X-Radix-Tenant-Id": "t"}
    with httpx.Client(base_url=plane.url, timeout=30) as client:
        if job_id not in plane.state.jobs:
            client.post("/admin/jobs", json={"job_id": job_id, "image": "busybox"})
            client.post("/v1/clusters/dev-cluster/jobs/poll", headers=agent, json={"max_jobs": 1, "wait_seconds": 0})
        files = [{"path": path, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
        [upload] = client.post(f"/v1/clusters/dev-cluster/jobs/{job_id}/artifacts", headers=agent,
                               json={"files": files}).json()["uploads"]
        assert client.put(upload["url"], content=data, headers=upload["headers"]).status_code == 200


def test_artifacts_lists_a_jobs_uploads_and_artifact_downloads_one(plane, tmp_path):
    stored_artifact(plane, "art-1", "out/a.txt", b"alpha\n")
    stored_artifact(plane, "art-1", "out/b b.bin", bytes(range(256)))
    listing = cli("artifacts", "--url", plane.url, "art-1")
    assert listing.returncode == 0, listing.stderr
    lines = [line.split("\t") for line in listing.stdout.splitlines()]
    assert [line[:2] for line in lines] == [["out/a.txt", "6"], ["out/b b.bin", "256"]]
    assert all(len(line) == 3 and len(line[2]) == 64 for line in lines)
    to_stdout = subprocess.run([sys.executable, "-m", "devplane", "artifact", "--url", plane.url, "art-1",
                                "out/b b.bin"], cwd=ROOT, capture_output=True, timeout=60)
    assert to_stdout.returncode == 0 and to_stdout.stdout == bytes(range(256)), to_stdout.stderr
    target = tmp_path / "a.txt"
    to_file = cli("artifact", "--url", plane.url, "art-1", "out/a.txt", "-o", str(target))
    assert to_file.returncode == 0 and to_file.stdout == "", to_file.stderr
    assert target.read_bytes() == b"alpha\n" and not (tmp_path / "a.txt.part").exists()


def test_artifact_mistakes_are_one_line(plane, tmp_path):
    stored_artifact(plane, "art-1", "a.txt", b"a")
    one_line_error(cli("artifacts", "--url", plane.url, "no-such-job"), "404", "unknown job no-such-job")
    one_line_error(cli("artifact", "--url", plane.url, "no-such-job", "a.txt"), "404", "unknown job no-such-job")
    target = tmp_path / "out.txt"
    one_line_error(cli("artifact", "--url", plane.url, "art-1", "nope.txt", "-o", str(target)), "404",
                   "no stored artifact 'nope.txt'", "python -m devplane artifacts art-1")
    assert not target.exists()  # nothing written for a refusal
    one_line_error(cli("artifact", "--url", plane.url, "art-1", "a.txt", "-o", str(tmp_path / "no" / "dir.txt")),
                   "cannot write", "dir.txt")
    url = f"http://127.0.0.1:{free_port()}"
    one_line_error(cli("artifacts", "--url", url, "art-1"), "cannot reach the dev control plane")
    one_line_error(cli("artifact", "--url", url, "art-1", "a.txt"), "cannot reach the dev control plane")


def test_result_shows_the_completions_artifacts(plane):
    stored_artifact(plane, "art-1", "a.txt", b"a")
    completion = {"status": "succeeded", "artifacts": [{"path": "a.txt", "size_bytes": 1}]}
    plane.state.jobs["art-1"].result, plane.state.jobs["art-1"].state = completion, "done"
    run = cli("result", "--url", plane.url, "--wait", "0", "art-1")
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert record["result"]["artifacts"] == completion["artifacts"]
    assert [(a["path"], a["stored"]) for a in record["artifacts"]] == [("a.txt", True)]


def test_serve_removes_its_object_store_when_stopped():
    """Uploaded artifacts live in a temporary directory of the server's: Ctrl-C or `kill` takes it away."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        serve = subprocess.Popen([sys.executable, "-m", "devplane", "serve", "--port", str(free_port())], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            url = serve.stdout.readline().split()[4]
            job = httpx.post(f"{url}/admin/jobs", json={"image": "busybox"}).json()["job_id"]
            agent = {"X-Radix-Cluster-Token": "dev-cluster-token", "X-Radix-Tenant-Id": "t"}
            httpx.post(f"{url}/v1/clusters/dev-cluster/jobs/poll", headers=agent, json={"max_jobs": 1})
            files = [{"path": "a.txt", "size_bytes": 1, "sha256": hashlib.sha256(b"a").hexdigest()}]
            [upload] = httpx.post(f"{url}/v1/clusters/dev-cluster/jobs/{job}/artifacts", headers=agent,
                                  json={"files": files}).json()["uploads"]
            assert httpx.put(upload["url"], content=b"a", headers=upload["headers"]).status_code == 200
            store = Path(serve.stdout.readline().split(" kept in ")[1].split()[0])
            assert len(list(store.iterdir())) == 1
        finally:
            serve.send_signal(stop)
            assert serve.wait(10) == 0, serve.stderr.read()
        assert not store.exists()


def test_a_reader_that_leaves_early_gets_no_traceback(plane):
    for n in range(3000):  # more than a pipe holds: writes go on after the reader left
        plane.state.submit({"job_id": f"many-{n:05d}", "image": "busybox"})
    jobs = subprocess.Popen([sys.executable, "-m", "devplane", "jobs", "--url", plane.url], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert jobs.stdout.readline().split() == [b"JOB_ID", b"STATE", b"STATUS"]
    jobs.stdout.close()  # `| head -1`
    assert jobs.wait(60) == 0
    assert b"Traceback" not in jobs.stderr.read()


@pytest.mark.parametrize("wait", ["nan", "-5", "1e400", "soon"])
def test_result_refuses_a_wait_that_is_no_number_of_seconds(wait):
    run = cli("result", "--wait", wait, "some-job")
    assert run.returncode == 2 and "is not a number of seconds from 0 to 86400" in run.stderr

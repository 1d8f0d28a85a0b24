"""Fixtures for tests against a REAL Docker engine and the dev control plane over real HTTP.

No engine is a failure, not a skip: `scripts/ensure-docker.sh` (run by `make test` and .ci/run) starts one.
Each test gets its own cluster id; teardown force-removes every container labelled with it.

`AGENT_TEST_ENGINE=podman` runs the tests marked `engine` against Podman instead: a `podman system service` the
session starts (tests/podman_service.py), which the tests' Docker client and every agent they start reach through
DOCKER_HOST; the other tests are deselected (`make test` runs that subset after the Docker run).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import docker
import pytest

from devplane import DevControlPlane
from devplane.images import BUSYBOX_IMAGE, ensure_busybox_image
from tests.podman_service import PodmanService

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "integration-cluster-token"
ENGINE = os.environ.get("AGENT_TEST_ENGINE", "docker")
ENGINES = ("docker", "podman")


def pytest_collection_modifyitems(config, items):
    if ENGINE == "docker":
        # What only Podman does (its API service restarting under running jobs) has no Docker counterpart here:
        # dockerd's restart is test_zz_engine_restart.py.
        wanted = lambda item: not item.get_closest_marker("podman_only")  # noqa: E731
    else:
        # The Podman run is the engine suite only: the rest (Slurm, the agent's image, dockerd restarts) is Docker's.
        wanted = lambda item: item.get_closest_marker("engine") or item.get_closest_marker("podman_only")  # noqa: E731
    config.hook.pytest_deselected(items=[item for item in items if not wanted(item)])
    items[:] = [item for item in items if wanted(item)]


@pytest.fixture(scope="session", autouse=True)
def container_engine():
    """The engine the session tests against: "docker" (DOCKER_HOST or the local socket), or a PodmanService whose
    socket DOCKER_HOST names for the session (the agents the tests start inherit it)."""
    if ENGINE not in ENGINES:
        pytest.fail(f"AGENT_TEST_ENGINE={ENGINE!r}: give one of {', '.join(ENGINES)}")
    if ENGINE == "docker":
        yield "docker"
        return
    try:
        service = PodmanService().start()
    except RuntimeError as exc:
        pytest.fail(f"AGENT_TEST_ENGINE=podman, but Podman cannot run here: {exc}")
    previous = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = service.docker_host
    try:
        # A fresh engine: the job image `make test-deps` builds for Docker is made here (an import, no registry).
        with contextlib.closing(docker.DockerClient(base_url=service.docker_host)) as client:
            ensure_busybox_image(client)
        yield service
    finally:
        if previous is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = previous
        service.stop()


@pytest.fixture(scope="session")
def docker_client(container_engine):
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:  # noqa: BLE001 - any failure here means the same thing
        if ENGINE == "podman":
            pytest.fail(f"the Podman service does not answer ({exc}); its log: {container_engine.log_path}")
        pytest.fail(f"no Docker engine answers ({exc}); run scripts/ensure-docker.sh (make test does)")
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox(docker_client):
    return ensure_busybox_image(docker_client)


@pytest.fixture
def cluster_id():
    return f"it-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def plane(cluster_id, docker_client):
    server = DevControlPlane(cluster_id=cluster_id, cluster_token=TOKEN, one_time_tokens=["ott-good"]).start()
    yield server
    server.stop()
    for container in docker_client.containers.list(all=True, sparse=True, filters={"label": f"radix.cluster_id={cluster_id}"}):
        try:
            container.remove(force=True)
        except docker.errors.APIError:
            pass  # already being removed by the agent


class ControlPlane:
    """Test-side client of the dev control plane's admin API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _call(self, path: str, body: object = None, method: str | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method or ("POST" if data else "GET"),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)

    def submit(self, **job) -> str:
        job.setdefault("image", BUSYBOX_IMAGE)
        return self._call("/admin/jobs", job)["job_id"]

    def result(self, job_id: str, wait: float = 60) -> dict:
        record = self._call(f"/admin/jobs/{urllib.request.quote(job_id, safe='')}?wait={wait}")
        assert record["result"] is not None, f"job {job_id} got no result within {wait} s: {record}"
        return record

    def result_now(self, job_id: str) -> dict:
        return self._call(f"/admin/jobs/{urllib.request.quote(job_id, safe='')}")

    def cancel(self, job_id: str) -> None:
        self._call(f"/admin/jobs/{urllib.request.quote(job_id, safe='')}/cancel", {})

    def config(self, **values) -> None:
        self._call("/admin/config", values)

    def run(self, wait: float = 60, **job) -> dict:
        """Submit a job and return its completion body."""
        return self.result(self.submit(**job), wait)["result"]

    def heartbeats(self) -> list[dict]:
        return self._call("/admin/heartbeats")["heartbeats"]

    def stats(self) -> dict:
        return self._call("/admin/stats")

    def fault(self, endpoint: str, responses: list[int] | None = None, delay: float | None = None, clear: bool = False) -> None:
        body: dict = {"endpoint": endpoint, "responses": responses or [], "clear": clear}
        if delay is not None:
            body["delay"] = delay
        self._call("/admin/faults", body)


@pytest.fixture
def cp(plane):
    return ControlPlane(plane.url)


class AgentProcess:
    def __init__(self, proc: subprocess.Popen, log_path: Path, jobs_dir: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.jobs_dir = jobs_dir

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            time.sleep(0.1)
        raise AssertionError(f"{text!r} not logged within {timeout} s:\n{self.log[-3000:]}")


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """A tmpfs of `size` (e.g. "2m") mounted at `path` for the block: a jobs filesystem a job can fill."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    assert mounted.returncode == 0, f"the test needs root to mount a small tmpfs: {mounted.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def eventually(check, timeout: float = 15, what: str = "condition"):
    """Poll `check` until it is truthy; cleanup happens after delivery, so tests wait for it (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.1)


def agent_command(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


@pytest.fixture
def start_agent(plane, cluster_id, tmp_path):
    started: list[AgentProcess] = []

    def start(
        *extra: str, token: str | None = TOKEN, env: dict[str, str] | None = None, wait_ready: bool = True,
        jobs_dir: Path | None = None,
    ) -> AgentProcess:
        jobs_dir = jobs_dir or tmp_path / "jobs"
        log_path = tmp_path / f"agent-{len(started)}.log"
        args = [
            "--api-base", plane.url, "--cluster-id", cluster_id, "--jobs-workdir", str(jobs_dir),
            "--token-file", str(tmp_path / "token"), "--long-poll-seconds", "5", "--heartbeat-interval", "60",
            "--shutdown-grace", "10",
        ]
        if "--metrics-port" not in extra:
            args += ["--metrics-port", "0"]  # tests that want the endpoint pick a free port
        if token:
            args += ["--cluster-token", token]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("RADIX_")}
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(agent_command(*args, *extra), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env)
        agent = AgentProcess(proc, log_path, jobs_dir)
        started.append(agent)
        if wait_ready:
            agent.wait_for_log("agent starting")
        return agent

    yield start
    for agent in started:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait(10)

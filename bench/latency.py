"""Per-job latency at the engine's limit (issue 14), measured side by side in one run.

- The trivial-job loop: each job pushed once the previous result arrived, over a long-poll control plane, through
  the agent and through a bare Docker SDK loop (long poll, create with the engine's default config, start, wait,
  logs, remove, complete); rounds interleaved. The same with 4 slots and 4 jobs in flight.
- Where the agent's time goes, from the engine's own events: poll answered -> container running (beside the
  engine's create+start of the same container config), container exit -> complete request received.
- Cost of concurrency: RSS, threads and CPU of the agent at 0, 32 and 128 running jobs.
- Parallel jobs asking for one image that is not present: pulls counted from the engine's events.

Used by bench/run.py (`make bench`); the functions return plain dicts of figures.
"""

from __future__ import annotations

import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import docker
import httpx

from devplane import DevControlPlane
from devplane.images import BUSYBOX_IMAGE

TRIVIAL = ["sh", "-c", "echo '{\"n\":1}'"]


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def wait_result(plane: DevControlPlane, job_id: str, timeout: float = 30) -> Any:
    """Wake at the result itself (the control plane's condition), so the measurement adds no polling tick."""
    state = plane.state
    with state.lock:
        if not state.lock.wait_for(lambda: state.jobs[job_id].result is not None, timeout=timeout):
            raise SystemExit(f"benchmark job {job_id} got no result within {timeout} s")
        return state.jobs[job_id]


class BareWorker:
    """The physical limit: a long-polling worker that runs each job with the bare Docker SDK and the engine's
    default container config, then removes it, then reports."""

    def __init__(self, plane: DevControlPlane, token: str, workers: int = 1) -> None:
        self._plane = plane
        self._token = token
        self._stop = threading.Event()
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(workers)]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        api = docker.from_env().api
        base = f"{self._plane.url}/v1/clusters/{self._plane.state.cluster_id}"
        headers = {"X-Radix-Cluster-Token": self._token, "X-Radix-Tenant-Id": "bench"}
        with httpx.Client(timeout=60, headers=headers) as http:
            while not self._stop.is_set():
                try:
                    answer = http.post(f"{base}/jobs/poll", json={"max_jobs": 1, "wait_seconds": 2})
                    answer.raise_for_status()
                    for job in answer.json().get("jobs", []):
                        self._run(api, http, base, job)
                except Exception as exc:  # noqa: BLE001 - counted, and the worker goes on like the agent would
                    self.errors.append(repr(exc))

    @staticmethod
    def _run(api: Any, http: httpx.Client, base: str, job: dict[str, Any]) -> None:
        cid = api.create_container(job["image"], command=job["command"], host_config=api.create_host_config())["Id"]
        api.start(cid)
        code = api.wait(cid)["StatusCode"]
        out = api.logs(cid, stdout=True, stderr=False)
        api.remove_container(cid, force=True)
        http.post(f"{base}/jobs/{job['job_id']}/complete", headers={"Idempotency-Key": job["job_id"]},
                  json={"tenant_id": "bench", "status": "succeeded" if code == 0 else "failed",
                        "output_payload": json.loads(out), "metrics": {"exit_code": code}})

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


def serial_round(plane: DevControlPlane, n: int, in_flight: int = 1) -> dict[str, Any]:
    """`n` trivial jobs, `in_flight` at a time, each pushed when a result arrives. Per job: push -> complete
    received (the control plane's clock)."""
    per_job: list[float] = []
    lock = threading.Lock()
    remaining = [n]

    failures: list[BaseException] = []

    def lane() -> None:
        try:
            while True:
                with lock:
                    if remaining[0] == 0:
                        return
                    remaining[0] -= 1
                job_id = plane.state.submit({"image": BUSYBOX_IMAGE, "command": TRIVIAL})
                record = wait_result(plane, job_id)
                per_job.append(record.completed_at - record.submitted_at)
        except BaseException as exc:  # noqa: BLE001 - said by the round, not lost with the thread
            failures.append(exc)

    started = time.perf_counter()
    lanes = [threading.Thread(target=lane) for _ in range(in_flight)]
    for thread in lanes:
        thread.start()
    for thread in lanes:
        thread.join()
    if failures:
        raise SystemExit(f"a benchmark lane failed: {failures[0]!r}")
    return {"total_s": time.perf_counter() - started, "median_s": statistics.median(per_job), "per_job": per_job}


def engine_events(client: docker.DockerClient, since: float, until: float, **filters: Any) -> list[dict[str, Any]]:
    return list(client.api.events(since=since, until=until, decode=True, filters=filters))


def agent_timeline(
    client: docker.DockerClient, plane: DevControlPlane, job_ids: list[str], since: float, until: float
) -> dict[str, list[float]]:
    """From the engine's events: each job's container start and exit (die), beside the control plane's times."""
    events: dict[str, dict[str, float]] = {}
    for event in engine_events(client, since, until, type="container"):
        job_id = (event.get("Actor") or {}).get("Attributes", {}).get("radix.job_id")
        if job_id and event.get("status") in ("start", "die"):
            events.setdefault(job_id, {})[event["status"]] = event["timeNano"] / 1e9
    to_running, exit_to_complete = [], []
    for job_id in job_ids:
        record, seen = plane.state.jobs[job_id], events.get(job_id, {})
        if "start" in seen and record.assigned_at:
            to_running.append(seen["start"] - record.assigned_at)
        else:
            to_running.append(float("nan"))  # kept in step with job_ids
        if "die" in seen and record.completed_at:
            exit_to_complete.append(record.completed_at - seen["die"])
    return {"to_running": to_running, "exit_to_complete": exit_to_complete}  # to_running: one per job, in order


def trivial_loop(start_agent: Callable[..., Any], token: str, *, n: int, rounds: int,
                 client: docker.DockerClient) -> dict[str, Any]:
    """Agent vs bare loop, one job in flight, then four; with each job's container exit -> complete received,
    from the engine's die events. (Poll answered -> running is measured with the agent idle between jobs, in
    bench/run.py section 2: here the engine is still cleaning up the previous container when the next arrives.)"""
    out: dict[str, Any] = {}
    for in_flight in (1, 4):
        agent_plane = DevControlPlane(cluster_id="bench-loop", cluster_token=token).start()
        bare_plane = DevControlPlane(cluster_id="bench-bare", cluster_token=token).start()
        agent = start_agent(agent_plane, "--max-concurrent-jobs", str(in_flight))
        bare = BareWorker(bare_plane, token, workers=in_flight)
        agent_rounds, bare_rounds, timeline = [], [], {"to_running": [], "exit_to_complete": []}
        try:
            serial_round(agent_plane, 2, in_flight)  # warm both: first-job costs are not per-job costs
            serial_round(bare_plane, 2, in_flight)
            for _ in range(rounds):
                since = time.time()
                before = set(agent_plane.state.jobs)
                agent_rounds.append(serial_round(agent_plane, n, in_flight))
                until = time.time() + 0.5
                time.sleep(0.6)
                fresh = [j for j in agent_plane.state.jobs if j not in before]
                for key, values in agent_timeline(client, agent_plane, fresh, since - 1, until).items():
                    timeline[key].extend(values)
                bare_rounds.append(serial_round(bare_plane, n, in_flight))
        except SystemExit as exc:
            raise SystemExit(f"{exc} (bare loop errors: {bare.errors[:3]})") from None
        finally:
            bare.stop()
            agent.stop()
            agent_plane.stop()
            bare_plane.stop()
        key = "serial" if in_flight == 1 else "four"
        ratios = [a["total_s"] / b["total_s"] for a, b in zip(agent_rounds, bare_rounds)]
        out[key] = {
            "n": n, "rounds": rounds, "ratio": statistics.median(ratios),
            "agent_median_ms": 1000 * statistics.median(r["median_s"] for r in agent_rounds),
            "bare_median_ms": 1000 * statistics.median(r["median_s"] for r in bare_rounds),
        }
        if in_flight == 1:
            out["timeline"] = {
                "exit_to_complete_p50_ms": 1000 * pct(timeline["exit_to_complete"], 50),
                "exit_to_complete_p95_ms": 1000 * pct(timeline["exit_to_complete"], 95),
                "samples": len(timeline["exit_to_complete"]),
            }
    return out


def concurrency_cost(start_agent: Callable[..., Any], token: str, client: docker.DockerClient,
                     levels: tuple[int, ...] = (0, 32, 128), settle: float = 10.0) -> list[dict[str, float]]:
    """RSS, threads and CPU of one agent with 0, 32, 128 running (sleeping) jobs."""
    plane = DevControlPlane(cluster_id="bench-conc", cluster_token=token).start()
    agent = start_agent(plane, "--max-concurrent-jobs", str(max(levels)))
    rows, submitted = [], 0
    try:
        for level in levels:
            while submitted < level:
                plane.state.submit({"image": BUSYBOX_IMAGE, "command": ["sleep", "3600"]})
                submitted += 1
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and _running(client, "bench-conc") < level:
                time.sleep(0.5)
            time.sleep(2)  # start calls and log streams settle
            cpu0, t0 = agent.cpu_seconds(), time.monotonic()
            time.sleep(settle)
            rows.append({"jobs": level, "running": _running(client, "bench-conc"),
                         "rss_mb": agent.status("VmRSS") / 1024, "threads": agent.status("Threads"),
                         "cpu_pct": 100 * (agent.cpu_seconds() - cpu0) / (time.monotonic() - t0)})
    finally:
        for container in client.containers.list(all=True, filters={"label": "radix.cluster_id=bench-conc"}):
            try:
                container.remove(force=True)
            except docker.errors.APIError:
                pass
        agent.stop()
        plane.stop()
    return rows


def _running(client: docker.DockerClient, cluster_id: str) -> int:
    return len(client.api.containers(filters={"label": f"radix.cluster_id={cluster_id}", "status": "running"}))


def pulls_of_one_image(start_agent: Callable[..., Any], token: str, client: docker.DockerClient,
                       jobs: int = 4) -> dict[str, Any]:
    """`jobs` parallel jobs on an image that is not present (served by Debian's docker-registry on loopback):
    how many pulls the engine saw."""
    if not shutil.which("docker-registry"):
        return {"jobs": jobs, "pulls": None, "why": "docker-registry is not installed"}
    root = Path(tempfile.mkdtemp(prefix="radix-bench-registry-"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (root / "config.yml").write_text(json.dumps({
        "version": 0.1, "storage": {"filesystem": {"rootdirectory": str(root / "data")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }))
    server = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plane = DevControlPlane(cluster_id="bench-pull", cluster_token=token).start()
    agent = None
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        image = f"127.0.0.1:{port}/bench/busybox:pull"  # loopback registries are insecure-allowed by dockerd
        client.images.get(BUSYBOX_IMAGE).tag(image)
        for item in client.api.push(image, stream=True, decode=True):
            if "error" in item:
                return {"jobs": jobs, "pulls": None, "why": item["error"]}
        client.images.remove(image, force=True)
        agent = start_agent(plane, "--max-concurrent-jobs", str(jobs))
        since = time.time()
        ids = [plane.state.submit({"image": image, "command": TRIVIAL}) for _ in range(jobs)]
        records = [wait_result(plane, job_id) for job_id in ids]
        until = time.time() + 0.5
        time.sleep(0.6)
        pulls = [e for e in engine_events(client, since - 1, until, type="image", event="pull")
                 if e.get("id", "").startswith(f"127.0.0.1:{port}/bench/busybox")]
        return {"jobs": jobs, "pulls": len(pulls),
                "succeeded": sum(1 for r in records if r.result.get("status") == "succeeded")}
    finally:
        if agent is not None:
            agent.stop()
        plane.stop()
        server.terminate()
        server.wait(10)
        shutil.rmtree(root, ignore_errors=True)

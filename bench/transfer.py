"""Job data through the agent against curl, side by side on one loopback nginx (issue 16).

- Download of one file: a job's input (no checksum) against `curl -o`, and with its sha256 checked against
  `curl -o` followed by hashing the file (what a user would do to verify it); throughput ratios.
- Upload of one file: a job's artifact (the PUT as nginx timed it, `request_time`) against `curl -T` of the same
  file, into a location that reads the body and drops it (the store's own disk or memory writes are not the
  sender's cost); and the agent's whole artifact step (walk, hash, plan, PUT) against hashing plus `curl -T`.
- Everything lives on a tmpfs (when the bench runs as root): this VM's disk writeback swings a 1 GiB write between
  1 and 4 s, which would drown the ratios.
- The agent's peak RSS over all of it.
- A cached input: a second job asking for a digest already in --cache-dir, from poll answered to its start call.

Rounds interleave agent and curl so the machine's drift cancels; the median round is reported.
Used by bench/run.py (`make bench`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from devplane import DevControlPlane
from devplane.images import BUSYBOX_IMAGE
from tests.object_store import NginxObjectStore

BLOCK = 64 * 1024 * 1024


def _job(plane: DevControlPlane, timeout: float = 600, on_started: Callable[[], None] | None = None,
         **fields: Any) -> tuple[dict[str, Any], Any]:
    job_id = plane.state.submit({"image": BUSYBOX_IMAGE, "timeout_seconds": 300, **fields})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = plane.state.jobs[job_id]
        if on_started is not None and record.started is not None:
            on_started()
            on_started = None
        if record.result is not None:
            assert record.result["status"] == "succeeded", record.result
            return record.result, record
        time.sleep(0.05)
    raise AssertionError(f"job {job_id}: no result within {timeout} s")


def _timed(command: list[str]) -> float:
    began = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - began


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(4 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def _memory_disk(size: str):
    """A tmpfs for the store, the agent's jobs and curl's files, so that both sides move bytes and neither waits on
    the disk's writeback (which here swings one 1 GiB write between 1 and 4 s). Without root: a plain directory."""
    path = Path(tempfile.mkdtemp(prefix="radix-bench-data-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True).returncode == 0
    try:
        yield path, mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def data_transfer(start_agent: Callable[..., Any], token: str, *, tiny: bool) -> dict[str, Any]:
    size = (16 if tiny else 1024) * 1024 * 1024
    rounds = 1 if tiny else 4
    # /sink/ reads an upload's body and answers 204, storing nothing: the upload rows measure the sender (the agent
    # or curl) and the path, not the store's own writing, which in this VM swings with fresh-memory costs.
    sink = "location /sink/ { return 204; }"
    with _memory_disk("6g") as (disk, in_memory), NginxObjectStore(disk / "store", max_body_size=0,
                                                                  extra_server_config=sink) as store:
        big = store.path("big.bin")
        big.parent.mkdir(parents=True, exist_ok=True)
        block = os.urandom(min(BLOCK, size))
        with open(big, "wb") as file:
            for _ in range(size // len(block)):
                file.write(block)
        digest = _sha256_of(big)
        scratch = disk / "scratch"
        scratch.mkdir(exist_ok=True)
        plane = DevControlPlane(cluster_id="bench-data", cluster_token=token).start()
        agent = start_agent(plane, "--jobs-workdir", str(disk / "jobs"))
        rows: dict[str, list[float]] = {k: [] for k in (
            "curl_get", "agent_get", "curl_get_sha", "agent_get_sha", "curl_put", "agent_put", "curl_put_e2e",
            "agent_put_e2e")}
        url = store.url("big.bin")
        plane.state.artifact_store = store.url("sink")  # nginx reads each upload and drops it (below)
        fresh = iter(range(10**6))

        def curl_get(check: bool = False) -> float:
            # Into a new file each time, as the agent's job gets: both sides pay the same for fresh memory.
            copy = scratch / f"curl-{next(fresh)}.bin"
            began = time.perf_counter()
            subprocess.run(["curl", "-sf", "-o", str(copy), url], check=True)
            if check:
                assert _sha256_of(copy) == digest
            elapsed = time.perf_counter() - began
            copy.unlink()
            return elapsed

        def agent_get(**extra: Any) -> float:
            result, _ = _job(plane, command=["true"], inputs=[{"url": url, "path": "big.bin", **extra}])
            return result["metrics"]["input_seconds"]

        def curl_put(n: int) -> tuple[float, str]:
            began = time.perf_counter()
            assert _sha256_of(big) == digest  # what a user must compute to give the store a checksum
            subprocess.run(["curl", "-sf", "-H", "Expect:", "-T", str(big), store.url(f"sink/curl-{n}.bin")],
                           check=True, stdout=subprocess.DEVNULL)
            return time.perf_counter() - began, f"/sink/curl-{n}.bin"

        def agent_put(n: int) -> tuple[float, str]:
            # The artifact is the job's own copy of the input.
            result, record = _job(plane, command=["true"], inputs=[{"url": url, "path": "big.bin"}],
                                  artifacts=["big.bin"])
            assert result["artifacts"][0]["sha256"] == digest, result
            return result["metrics"]["artifact_seconds"], f"/sink/{record.job_id}/big.bin"

        def both(first: Callable[[], Any], second: Callable[[], Any], n: int) -> tuple[Any, Any]:
            # The order alternates: in this VM, whoever writes a gigabyte into memory first touched since the
            # last one was freed pays for it (guest pages faulted in by the host), so each side pays half the time.
            if n % 2:
                b = second()
                return first(), b
            a = first()
            return a, second()

        try:
            for n in range(rounds):
                a, b = both(curl_get, agent_get, n)
                rows["curl_get"].append(a)
                rows["agent_get"].append(b)
                a, b = both(lambda: curl_get(check=True), lambda: agent_get(sha256=digest), n)
                rows["curl_get_sha"].append(a)
                rows["agent_get_sha"].append(b)
                store.mark()
                (curl_e2e, curl_uri), (agent_e2e, agent_uri) = both(lambda: curl_put(n), lambda: agent_put(n), n)
                timings = {entry["uri"]: float(entry["request_time"]) for entry in store.requests(method="PUT")}
                rows["curl_put"].append(timings[curl_uri])
                rows["agent_put"].append(timings[agent_uri])
                rows["curl_put_e2e"].append(curl_e2e)
                rows["agent_put_e2e"].append(agent_e2e)
            peak_rss = _peak_rss_mb(agent.proc.pid)
        finally:
            agent.stop()
        cached = _cached_start(start_agent, plane, store.url("big.bin"), digest, scratch, rounds)
        plane.stop()
    print({k: [round(x, 2) for x in v] for k, v in rows.items()}, flush=True)
    median = {key: statistics.median(values) for key, values in rows.items()}
    mib = size / 2**20
    return {"size_mib": mib, "rounds": rounds, "peak_rss_mb": peak_rss, "cached_start_s": cached, **median,
            "where": "tmpfs" if in_memory else "disk",
            "get_ratio": median["curl_get"] / median["agent_get"],
            "get_sha_ratio": median["curl_get_sha"] / median["agent_get_sha"],
            "put_ratio": median["curl_put"] / median["agent_put"],
            "put_e2e_ratio": median["curl_put_e2e"] / median["agent_put_e2e"]}


def _cached_start(start_agent: Callable[..., Any], plane: DevControlPlane, url: str, digest: str, scratch: Path,
                  rounds: int) -> float:
    """Poll answered -> start call of a job whose input is in the cache (the first job put it there)."""
    agent = start_agent(plane, "--cache-dir", str(scratch / "cache"), "--jobs-workdir", str(scratch / "jobs"))
    try:
        item = {"url": url, "path": "big.bin", "sha256": digest}
        _job(plane, command=["true"], inputs=[item])
        starts = []
        for _ in range(rounds):
            time.sleep(0.2)
            result, record = _job(plane, command=["true"], inputs=[item])
            assert result["metrics"]["input_cached_bytes"] > 0, result
            starts.append(record.started["at"] - record.assigned_at)
        return statistics.median(starts)
    finally:
        agent.stop()


def transfer_rows(r: dict[str, Any], ok: Callable[[bool], str]) -> list[str]:
    size = f"{r['size_mib']:.0f} MiB"
    return [
        f"| download of a {size} input (no checksum), agent vs `curl -o` from the same nginx (files on "
        f"{r['where']}), median of {r['rounds']} | {r['get_ratio']:.2f} of curl's throughput ({r['agent_get']:.2f} s vs {r['curl_get']:.2f} s) "
        f"| >= 0.9 | {ok(r['get_ratio'] >= 0.9)} |",
        f"| the same with its sha256 checked, vs `curl -o` then hashing the file | {r['get_sha_ratio']:.2f} "
        f"({r['agent_get_sha']:.2f} s vs {r['curl_get_sha']:.2f} s) | >= 0.9 | {ok(r['get_sha_ratio'] >= 0.9)} |",
        f"| upload of a {size} artifact: the PUT as nginx timed it (into a location that reads and drops it), agent vs "
        f"`curl -T` | {r['put_ratio']:.2f} of "
        f"curl's throughput ({r['agent_put']:.2f} s vs {r['curl_put']:.2f} s) | >= 0.9 | {ok(r['put_ratio'] >= 0.9)} |",
        f"| the agent's whole artifact step (walk, sha256, plan, PUT) vs hashing then `curl -T` | "
        f"{r['put_e2e_ratio']:.2f} ({r['agent_put_e2e']:.2f} s vs {r['curl_put_e2e']:.2f} s) | | |",
        f"| the agent's peak RSS while moving them | {r['peak_rss_mb']:.0f} MB | <= 100 MB | "
        f"{ok(r['peak_rss_mb'] <= 100)} |",
        f"| a job whose {size} input is in the cache: poll answered -> start call, median | "
        f"{r['cached_start_s'] * 1000:.0f} ms | < 1 s | {ok(r['cached_start_s'] < 1)} |",
    ]

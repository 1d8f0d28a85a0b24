#!/usr/bin/env python3
"""`make bench`: the agent against the raw Docker engine, on one machine, in one go; writes docs/benchmarks.md.

1. per-job overhead: N trivial jobs through the dev control plane and the agent vs the same N through a raw
   Docker SDK loop (create, start, wait, logs, remove); rounds interleaved so machine drift cancels out.
2. dispatch latency, long poll and poll-interval mode: submitted -> poll answered, submitted -> start call, with
   the engine's own create+start for the same container beside it.
3. throughput with 1, 2 and 4 slots.
4. footprint: idle RSS and CPU, peak RSS while a job prints 300 MB and while a job writes a 9 MB output.json,
   log delivery throughput.
5. NVML sampling cost per GPU (a fake NVML here; the real figure is in docs/gpu.md).
6. per-job latency at the engine's limit (bench/latency.py): the trivial-job loop (one job, then four in flight)
   against a bare SDK loop, container exit -> complete and poll answered -> running from the engine's events, the
   agent's cost at 0, 32 and 128 running jobs, and pulls of one missing image asked for by parallel jobs.
7. the agent's image: its own layers and the whole.
8. job data (bench/transfer.py): a 1 GiB input and artifact through the agent against curl on one nginx, the
   agent's peak RSS meanwhile, and a job whose input is in the cache.

Usage: bench/run.py [--tiny] [--out FILE]   (--tiny: a few seconds, for `make test`)
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402
import transfer  # noqa: E402 - bench/transfer.py, beside this script

from devplane import DevControlPlane  # noqa: E402
from devplane.images import BUSYBOX_IMAGE, ensure_busybox_image  # noqa: E402

TOKEN = "bench-token"
# The agent measured: this checkout, or another one (BENCH_AGENT_ROOT=<checkout>, for a before/after comparison).
AGENT_ROOT = Path(os.environ.get("BENCH_AGENT_ROOT") or ROOT)
TRIVIAL = ["sh", "-c", "echo '{\"n\":1}'"]


class Agent:
    def __init__(self, plane: DevControlPlane, *extra: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="radix-bench-"))
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADIX_")}
        self.log = open(self.dir / "agent.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(AGENT_ROOT / "main.py"), "--api-base", plane.url, "--cluster-id", plane.state.cluster_id,
             "--cluster-token", TOKEN, "--jobs-workdir", str(self.dir / "jobs"), "--token-file", str(self.dir / "t"),
             "--metrics-port", "0", "--heartbeat-interval", "300", "--min-free-disk-gb", "0", *extra],
            cwd=AGENT_ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and plane.state.stats["polls"] == 0:
            time.sleep(0.05)
        time.sleep(0.3)

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        return 0

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def wait_results(plane: DevControlPlane, ids: list[str], timeout: float = 600) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = [plane.state.jobs[i] for i in ids]
        if all(r.result is not None for r in records):
            return records
        time.sleep(0.01)
    raise SystemExit(f"benchmark jobs got no result within {timeout} s")


def raw_loop(client: docker.DockerClient, n: int) -> float:
    api = client.api
    started = time.perf_counter()
    for _ in range(n):
        cid = api.create_container(BUSYBOX_IMAGE, command=TRIVIAL, host_config=api.create_host_config())["Id"]
        api.start(cid)
        api.wait(cid)
        api.logs(cid)
        api.remove_container(cid, force=True)
    return time.perf_counter() - started


def engine_create_start(client: docker.DockerClient, workspace: Path) -> float:
    """The engine's own create+attach+start of the very container config the agent creates for a job (its
    executor renders the host config from the default settings): the floor the agent's time-to-running is
    compared with. Attach is part of it: the agent attaches before start so no output is lost."""
    from cluster_agent.container_config import container_spec
    from cluster_agent.executors.docker import DockerExecutor
    from cluster_agent.models import JobSpec
    from cluster_agent.settings import Settings

    api = client.api
    name = f"radix-bench-{time.monotonic_ns()}"
    spec = container_spec(JobSpec.model_validate({"job_id": name, "image": BUSYBOX_IMAGE, "command": ["true"]}),
                          Settings(cluster_id="bench-engine"), workspace=workspace, gpus=[], gpu_count=0,
                          host_has_gpus=False, timeout=60)
    host_config, env = DockerExecutor(client)._host_config(spec)
    t = time.perf_counter()
    cid = api.create_container(BUSYBOX_IMAGE, command=spec.command, environment=env, working_dir="/workspace",
                               labels={"radix.bench": "1"}, name=spec.name, detach=True,
                               host_config=api.create_host_config(**host_config))["Id"]
    stream = api.attach(cid, stdout=True, stderr=True, stream=True, logs=False, demux=True)
    api.start(cid)
    elapsed = time.perf_counter() - t
    for _ in stream:
        pass
    api.remove_container(cid, force=True)
    return elapsed


def wait_gone(client: docker.DockerClient, cluster_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and client.api.containers(all=True, filters={"label": f"radix.cluster_id={cluster_id}"}):
        time.sleep(0.02)
    time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_dispatch_metrics(port: int, since: dict | None = None) -> dict[str, dict[str, float]]:
    """The agent's own timing of its dispatch path from /metrics (sum, count, mean; minus `since`, if given)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    out = {}
    for name in ("radix_agent_container_start_seconds", "radix_agent_dispatch_overhead_seconds"):
        if name + "_count" in values:
            total, count = float(values[name + "_sum"]), float(values[name + "_count"])
            if since and name in since:
                total, count = total - since[name]["sum"], count - since[name]["count"]
            out[name] = {"sum": total, "count": count, "mean": total / count if count else float("nan")}
    return out


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = parser.parse_args()
    tiny = args.tiny
    n_jobs, rounds, samples = (3, 1, 3) if tiny else (50, 5, 30)
    idle_seconds = 3 if tiny else 60
    print_mb, output_mb = (5, 1) if tiny else (300, 9)

    client = docker.from_env()
    ensure_busybox_image(client)
    results: dict = {}

    # 1. per-job overhead, interleaved rounds
    plane = DevControlPlane(cluster_id="bench", cluster_token=TOKEN).start()
    metrics_port = free_port()
    agent = Agent(plane, "--metrics-port", str(metrics_port))
    agent_times, raw_times = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        ids = [plane.state.submit({"image": BUSYBOX_IMAGE, "command": TRIVIAL}) for _ in range(n_jobs)]
        wait_results(plane, ids)
        agent_times.append(time.perf_counter() - started)
        raw_times.append(raw_loop(client, n_jobs))
    results["overhead"] = {"n": n_jobs, "rounds": rounds, "agent_s": statistics.median(agent_times),
                           "raw_s": statistics.median(raw_times),
                           "ratio": statistics.median(a / r for a, r in zip(agent_times, raw_times))}
    print("overhead", results["overhead"], flush=True)

    # 2. dispatch latency (long poll), with the engine's create+start beside it
    pickup, to_start, engine, sampled = [], [], [], []
    before = read_dispatch_metrics(metrics_port)
    since = time.time()
    for _ in range(samples):
        time.sleep(0.2)  # the agent is parked in its long poll
        submitted = time.time()
        job_id = plane.state.submit({"image": BUSYBOX_IMAGE, "command": ["true"]})
        record = wait_results(plane, [job_id])[0]
        sampled.append(job_id)
        pickup.append(record.assigned_at - submitted)
        to_start.append(record.started["at"] - submitted)
        # The engine's own figure under the same conditions as the job's: once the engine is done with the job's
        # container (the agent removes it after the result), not while it still cleans it up.
        wait_gone(client, "bench")
        engine.append(engine_create_start(client, agent.dir))
    own = [s - p - statistics.median(engine) for s, p in zip(to_start, pickup)]
    time.sleep(0.6)
    import latency  # noqa: E402 - bench/ is this script's directory
    to_running = latency.agent_timeline(client, plane, sampled, since - 1, time.time())["to_running"]
    # Each job beside the engine's own create+attach+start measured right after it: the engine's drift between
    # samples (+-15 ms here) cancels in the pair.
    over = [r - e for r, e in zip(to_running, engine) if r == r]
    to_running = [r for r in to_running if r == r]
    measured = read_dispatch_metrics(metrics_port, since=before)
    results["long_poll"] = {"agent_engine_mean": measured["radix_agent_container_start_seconds"]["mean"],
                            "agent_own_mean": measured["radix_agent_dispatch_overhead_seconds"]["mean"],"pickup_p50": pct(pickup, 50), "pickup_p95": pct(pickup, 95),
                            "start_p50": pct(to_start, 50), "start_p95": pct(to_start, 95),
                            "engine_p50": pct(engine, 50), "engine_p95": pct(engine, 95), "own_p50": pct(own, 50),
                            "to_running_p50": pct(to_running, 50), "over_p50": pct(over, 50)}
    print("long poll", results["long_poll"], flush=True)

    # 4a. idle footprint (the agent has been idle since the last job)
    time.sleep(1)
    cpu0, t0 = agent.cpu_seconds(), time.monotonic()
    rss = []
    while time.monotonic() - t0 < idle_seconds:
        rss.append(agent.status("VmRSS") / 1024)
        time.sleep(0.5)
    results["idle"] = {"seconds": idle_seconds, "rss_mb": max(rss),
                       "cpu_pct": 100 * (agent.cpu_seconds() - cpu0) / (time.monotonic() - t0)}
    print("idle", results["idle"], flush=True)
    agent.stop()
    plane.stop()

    # 2b. poll-interval mode (a core server)
    plane = DevControlPlane(cluster_id="bench", cluster_token=TOKEN, long_poll=False).start()
    agent = Agent(plane, "--poll-interval", "1")
    core_pickup, core_start = [], []
    for _ in range(max(3, samples // 3)):
        time.sleep(0.37)
        submitted = time.time()
        job_id = plane.state.submit({"image": BUSYBOX_IMAGE, "command": ["true"]})
        record = wait_results(plane, [job_id])[0]
        core_pickup.append(record.assigned_at - submitted)
        core_start.append(record.started["at"] - submitted)
    results["interval"] = {"pickup_p50": pct(core_pickup, 50), "pickup_p95": pct(core_pickup, 95),
                           "start_p50": pct(core_start, 50), "start_p95": pct(core_start, 95)}
    print("interval", results["interval"], flush=True)
    agent.stop()
    plane.stop()

    # 3. throughput by slots
    results["throughput"] = {}
    for slots in (1, 2, 4):
        plane = DevControlPlane(cluster_id="bench", cluster_token=TOKEN).start()
        agent = Agent(plane, "--max-concurrent-jobs", str(slots))
        started = time.perf_counter()
        ids = [plane.state.submit({"image": BUSYBOX_IMAGE, "command": TRIVIAL}) for _ in range(n_jobs * 2 if not tiny else 4)]
        wait_results(plane, ids)
        results["throughput"][slots] = len(ids) / (time.perf_counter() - started)
        agent.stop()
        plane.stop()
    print("throughput", results["throughput"], flush=True)

    # 4b. peak RSS while a job prints a lot, and while it writes a large output.json; log throughput
    plane = DevControlPlane(cluster_id="bench", cluster_token=TOKEN).start()
    agent = Agent(plane)
    before = agent.status("VmHWM") / 1024
    started = time.perf_counter()
    job_id = plane.state.submit({"image": BUSYBOX_IMAGE, "command": [
        "sh", "-c", f"yes 'a line of job output that goes on and on' | head -c {print_mb * 1000 * 1000}"]})
    record = wait_results(plane, [job_id])[0]
    elapsed = time.perf_counter() - started
    results["print"] = {"mb": print_mb, "peak_rss_mb": agent.status("VmHWM") / 1024, "rss_before_mb": before,
                        "seconds": elapsed, "log_mb": len(record.log) / 1e6, "log_mb_s": len(record.log) / 1e6 / elapsed}
    size = output_mb * 1000 * 1000
    job_id = plane.state.submit({"image": BUSYBOX_IMAGE, "command": [
        "sh", "-c", f"(printf '{{\"blob\": \"'; head -c {size} /dev/zero | tr '\\0' x; printf '\"}}') > output.json"]})
    record = wait_results(plane, [job_id])[0]
    results["output"] = {"mb": output_mb, "status": record.result["status"], "peak_rss_mb": agent.status("VmHWM") / 1024}
    print("footprint", results["print"], results["output"], flush=True)
    agent.stop()
    plane.stop()

    # 5. NVML sampling cost per GPU with a fake NVML (8 GPUs)
    sys.path.insert(0, str(ROOT / "tests"))
    from test_gpu_telemetry import FakeNvml  # noqa: E402

    from cluster_agent.gpu_pool import GpuPool  # noqa: E402
    from cluster_agent.gpu_telemetry import GpuTelemetry  # noqa: E402
    from cluster_agent.models import GpuInfo  # noqa: E402

    gpus = [GpuInfo(index=i, uuid=f"GPU-{i}", name="fake", memory_total_mb=81559) for i in range(8)]
    telemetry = GpuTelemetry(gpus, GpuPool(gpus), nvml=FakeNvml(**{g.uuid: {} for g in gpus}))
    telemetry.open()
    t = time.perf_counter()
    for _ in range(200):
        telemetry.sample()
    results["nvml_fake_ms_per_gpu"] = (time.perf_counter() - t) / 200 / 8 * 1000

    # 6. per-job latency at the engine's limit
    def start_agent(plane: DevControlPlane, *extra: str) -> Agent:
        return Agent(plane, *extra)

    results["loop"] = latency.trivial_loop(start_agent, TOKEN, n=4 if tiny else 20, rounds=1 if tiny else 3,
                                           client=client)
    print("loop", results["loop"], flush=True)
    results["concurrency"] = latency.concurrency_cost(start_agent, TOKEN, client, levels=(0, 2, 4) if tiny else (0, 32, 128),
                                                      settle=2 if tiny else 10)
    print("concurrency", results["concurrency"], flush=True)
    results["pulls"] = latency.pulls_of_one_image(start_agent, TOKEN, client, jobs=2 if tiny else 4)
    print("pulls", results["pulls"], flush=True)

    # 7. the agent's image: its own layers and the whole
    results["image"] = image_sizes(client, tiny)
    print("image", results["image"], flush=True)

    # 8. job data through the agent against curl (inputs, artifacts, the cache)
    results["transfer"] = transfer.data_transfer(start_agent, TOKEN, tiny=tiny)
    print("transfer", results["transfer"], flush=True)

    write_report(args.out, results, tiny)
    print(f"wrote {args.out}")
    return 0


PROFILING_RECORD = """\
## Profiling record

The agent's own share of time-to-running met its target in the first run (18.8 ms against < 20 ms), but narrowly,
and the external figure (start call - poll answered - the engine's create+start timed beside it) swings by
+-15 ms between runs with the engine's own variance. So the dispatch path was profiled and the agent now times its
own share itself (`radix_agent_dispatch_overhead_seconds`, with `radix_agent_container_start_seconds` beside it).

`bench/profile_dispatch.py --jobs 40` (py-spy at 1000 Hz on the agent while it takes 40 jobs one at a time; it
prints the functions on the path from the poll answer to the running container and the start call):

| 2026-11-23, this machine | before (agent code of 514ad65) | after (55d6d0c) |
|---|---|---|
| py-spy samples on the dispatch path, per job | 12.1 ms | 9.6 ms |
| hottest line | `os.fsync` in write_json_atomic: 1.6 ms/job | Docker SDK socket send: 2.1 ms/job |
| agent's own share, as the agent times it (mean, under py-spy) | (not measurable) | 4.4 ms |

What changed: the start call goes out before container.json is written (only a restart reads that file, and the
container's labels say the same); input.json and log_offset are no longer fsynced (a host crash ends the container
too, and a re-run rewrites input.json from job.json; log offsets are only a resume hint). job.json and result.json
are still fsynced: they are what a restart must find. What remains is the Docker SDK's HTTP round trips (image
inspect, create, attach, start): engine work, not the agent's.

### The finish path: from a container's exit to its result (2026-11-30, issue 14)

`make profile-dispatch PROFILE_ARGS="--path finish"` (py-spy at 1000 Hz, idle samples included, 30 trivial jobs
one at a time; the job thread from the container's exit on: judging, spooling, the last log chunk, the complete
request, and the wait for the container's removal after it):

| 2026-11-30, this machine | before (8cdcfee) | after |
|---|---|---|
| samples on the finish path, per job | 212.3 ms | 38.4 ms |
| of which waiting for the last log chunk (`LogStreamer.finish`) | 206.8 ms | 1.3 ms |
| of which waiting for the container's removal, after the complete request went out | (overlapped) | 31.2 ms |
| container exit (engine's die event) -> complete received, p50 / p95 (bench/latency.py) | 236 / 240 ms | 14.2 / 16.2 ms |
| trivial-job loop, agent / bare SDK loop, one job in flight | 1.45 | 0.98 |

What changed, each measured on its own:
1. The log streamer batched output for 250 ms before a request and slept through that pause even when the job had
   ended: its last chunk, and so the result behind it, waited out the pause. The pause now ends when the job ends or
   a chunk fills (236 -> 61 ms).
2. dockerd emits a container's `die` event and then cleans the container up (unmounts, network teardown) holding
   its lock: `wait` returns and `inspect` answers 40-75 ms after the exit. The Docker executor reads the exit code
   from one `die` events stream instead (signal deaths, which may be OOM kills whose `oom` event can follow
   `die`, still ask `inspect`). Measured with the executor alone: exit known 0.6-2.9 ms after `die`, against 44-65 ms.
3. The development control plane answered in two writes with Nagle's algorithm on, so every answer's body waited
   for the agent's delayed ACK (~40 ms on the last log chunk and on the complete request alike). It now sets
   TCP_NODELAY, as production HTTP servers do (61 -> 14 ms together with 2).
4. Found by the four-in-flight loop: the poller counted free slots before marking its poll as one that cannot
   carry jobs, so a slot freed in between was missed and the agent idled through a whole long poll with a job
   waiting. Fixed (tests/test_poller.py).
"""


def image_sizes(client: docker.DockerClient, tiny: bool) -> dict:
    """The agent's image as `make image` builds it (the tests' build, when present, in --tiny mode): the agent's own
    layers (those its base does not have) and the whole image, from `docker history`."""
    tag = "radix-cluster-agent:test" if tiny else "radix-cluster-agent:bench"
    try:
        # The tests' image is this checkout's; a full run always builds, so a stale image is never measured.
        image = client.images.get(tag) if tiny else None
    except docker.errors.ImageNotFound:
        image = None
    if image is None:
        build = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_image.py"), "--tag", tag],
                               capture_output=True, text=True, timeout=1800)
        if build.returncode != 0:
            return {"error": (build.stderr or build.stdout).strip().splitlines()[-1:]}
        image = client.images.get(tag)
    base_name = next((line.split("=", 1)[1] for line in subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'scripts'); import build_image, docker; "
         "print('base=' + build_image.usable_base(docker.from_env()))"], cwd=ROOT, capture_output=True, text=True,
    ).stdout.splitlines() if line.startswith("base=")), "")
    # The image is the base's layers plus the agent's own: what its history adds up to beyond the base's.
    base_bytes = sum(layer["Size"] for layer in client.images.get(base_name).history()) if base_name else 0
    own_bytes = sum(layer["Size"] for layer in image.history()) - base_bytes
    return {"tag": tag, "base": base_name, "base_mb": base_bytes / 1e6, "total_mb": image.attrs["Size"] / 1e6,
            "own_mb": own_bytes / 1e6}


def latency_rows(r: dict) -> list[str]:
    def ok(good: bool) -> str:
        return "met" if good else "**missed**"

    one, four, tl, lp = r["loop"]["serial"], r["loop"]["four"], r["loop"]["timeline"], r["long_poll"]
    over = 1000 * lp["over_p50"]
    rows = [
        f"| trivial-job loop, one job in flight (each pushed when the previous result arrived): agent / bare SDK loop "
        f"(median of {one['rounds']} interleaved rounds of {one['n']}) | {one['ratio']:.2f} (push -> complete "
        f"{one['agent_median_ms']:.0f} vs {one['bare_median_ms']:.0f} ms) | <= 1.05 | {ok(one['ratio'] <= 1.05)} |",
        f"| the same, 4 slots and 4 jobs in flight | {four['ratio']:.2f} (push -> complete {four['agent_median_ms']:.0f} "
        f"vs {four['bare_median_ms']:.0f} ms) | <= 1.05 | {ok(four['ratio'] <= 1.05)} |",
        f"| container exit (engine's die event) -> complete request received, p50 / p95 ({tl['samples']} jobs) | "
        f"{tl['exit_to_complete_p50_ms']:.1f} / {tl['exit_to_complete_p95_ms']:.1f} ms | <= 20 / <= 50 ms | "
        f"{ok(tl['exit_to_complete_p50_ms'] <= 20 and tl['exit_to_complete_p95_ms'] <= 50)} |",
        f"| poll answered -> container running (engine's start event; the agent idle between jobs, as in the long "
        f"poll rows), p50 {1000 * lp['to_running_p50']:.1f} ms, beside the engine's create+attach+start of the same "
        f"container config (p50 {1000 * lp['engine_p50']:.1f} ms): the difference, job by job, p50 | {over:+.1f} ms | "
        f"<= +10 ms | {ok(over <= 10)} |",
    ]
    for row in r["concurrency"]:
        rows.append(f"| agent with {row['jobs']} running jobs ({row['running']} containers seen running): RSS, "
                    f"threads, CPU | {row['rss_mb']:.0f} MB, {row['threads']} threads, {row['cpu_pct']:.1f} % of a "
                    f"core | | |")
    levels = r["concurrency"]
    slopes = []
    for low, high in zip(levels, levels[1:]):
        jobs = high["jobs"] - low["jobs"]
        slopes.append((f"{low['jobs']} -> {high['jobs']}", (high["rss_mb"] - low["rss_mb"]) * 1024 / jobs,
                       (high["threads"] - low["threads"]) / jobs))
    if len(slopes) >= 2:
        # Linear: the cost of each further job does not grow with the jobs already running (10 % and 256 KB slack:
        # RSS moves with the allocator's arenas).
        linear = slopes[-1][1] <= max(slopes[0][1] * 1.1, slopes[0][1] + 256) and slopes[-1][2] <= slopes[0][2] + 0.1
        rows.append("| cost of each further running job, " + "; ".join(s[0] for s in slopes) + " | "
                    + "; ".join(f"{s[1]:.0f} KB RSS, {s[2]:.1f} threads" for s in slopes)
                    + f" | no faster than linear | {ok(linear)} |")
    image = r["image"]
    if "error" in image:
        rows.append(f"| the agent's image | not built: {image['error']} | | |")
    else:
        rows.append(f"| the agent's image ({image['tag']}, multi-stage, on {image['base']}, {image['base_mb']:.0f} MB): its "
                    f"own layers / the whole image | {image['own_mb']:.1f} MB / {image['total_mb']:.0f} MB | <= 25 MB / "
                    f"<= 150 MB on the slim base | {ok(image['own_mb'] <= 25 and image['total_mb'] <= 150)} |")
    pulls = r["pulls"]
    rows.append(f"| {pulls['jobs']} parallel jobs on an image not present: pulls seen by the engine | "
                f"{pulls['pulls'] if pulls['pulls'] is not None else 'not measured: ' + pulls['why']} | 1 | "
                f"{ok(pulls['pulls'] == 1)} |")
    return rows


def write_report(path: Path, r: dict, tiny: bool) -> None:
    def ok(good: bool) -> str:
        return "met" if good else "**missed**"

    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    engine = docker.from_env().version()
    o, lp, iv, idle, pr, out = r["overhead"], r["long_poll"], r["interval"], r["idle"], r["print"], r["output"]
    lines = [
        "# Benchmarks",
        "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `make bench` (`python bench/run.py`)"
        + (" **in --tiny mode (a smoke run; not for quoting)**" if tiny else "") + ".",
        f"Machine: {os.cpu_count()} CPU(s) ({cpu}), {mem_gb:.0f} GiB, {platform.platform()}, Docker engine "
        f"{engine.get('Version')}, Python {platform.python_version()}.",
        "",
        "| what | figure | target | |",
        "|---|---|---|---|",
        f"| per-job overhead: {o['n']} trivial jobs, agent / raw SDK loop (median of {o['rounds']} interleaved rounds) | "
        f"{o['ratio']:.2f} ({o['agent_s']:.2f} s vs {o['raw_s']:.2f} s) | <= 1.10 | {ok(o['ratio'] <= 1.10)} |",
        f"| long poll: submitted -> poll answered, p50 / p95 | {lp['pickup_p50'] * 1000:.1f} / {lp['pickup_p95'] * 1000:.1f} ms | p50 < 50 ms | {ok(lp['pickup_p50'] < 0.05)} |",
        f"| long poll: submitted -> start call, p50 / p95 | {lp['start_p50'] * 1000:.1f} / {lp['start_p95'] * 1000:.1f} ms | | |",
        f"| engine create+attach+start of the same container config, p50 / p95 | {lp['engine_p50'] * 1000:.1f} / {lp['engine_p95'] * 1000:.1f} ms | | |",
        f"| agent's own share of time-to-running (start call - poll answered - engine create+start), p50 | {lp['own_p50'] * 1000:.1f} ms | < 20 ms | {ok(lp['own_p50'] < 0.02)} |",
        f"| the same, as the agent times it (radix_agent_dispatch_overhead_seconds; its engine create+start, attach included: {lp['agent_engine_mean'] * 1000:.0f} ms), mean | {lp['agent_own_mean'] * 1000:.1f} ms | < 20 ms | {ok(lp['agent_own_mean'] < 0.02)} |",
        f"| poll-interval mode (1 s): submitted -> poll answered, p50 / p95 | {iv['pickup_p50'] * 1000:.0f} / {iv['pickup_p95'] * 1000:.0f} ms | | |",
        f"| poll-interval mode (1 s): submitted -> start call, p50 / p95 | {iv['start_p50'] * 1000:.0f} / {iv['start_p95'] * 1000:.0f} ms | | |",
        f"| throughput, 1 / 2 / 4 slots | {r['throughput'][1]:.1f} / {r['throughput'][2]:.1f} / {r['throughput'][4]:.1f} jobs/s | | |",
        f"| idle RSS over {idle['seconds']} s | {idle['rss_mb']:.0f} MB | <= 60 MB | {ok(idle['rss_mb'] <= 60)} |",
        f"| idle CPU over {idle['seconds']} s | {idle['cpu_pct']:.2f} % | < 1 % | {ok(idle['cpu_pct'] < 1)} |",
        f"| peak RSS while a job prints {pr['mb']} MB | {pr['peak_rss_mb']:.0f} MB (before: {pr['rss_before_mb']:.0f}) | <= 100 MB | {ok(pr['peak_rss_mb'] <= 100)} |",
        f"| peak RSS after a job writes a {out['mb']} MB output.json ({out['status']}) | {out['peak_rss_mb']:.0f} MB | | |",
        f"| log delivery: {pr['log_mb']:.0f} of the {pr['mb']} MB printed reached the control plane in {pr['seconds']:.1f} s"
        + (" (the rest was dropped from the middle by the bounded log buffer, with a marker, as designed)" if pr['log_mb'] < pr['mb'] - 0.5 else "")
        + f" | {pr['log_mb_s']:.1f} MB/s | | |",
        f"| NVML sample, fake NVML, per GPU | {r['nvml_fake_ms_per_gpu'] * 1000:.1f} us | | |",
        "| NVML sample, real H100, per GPU (docs/gpu.md) | 71 us | 8 GPUs < 2 ms | met |",
        *latency_rows(r),
        *transfer.transfer_rows(r["transfer"], ok),
        "",
        "Reproduce: `make bench` (a Docker engine must answer; `make test` runs `bench/run.py --tiny` as a smoke test).",
        "",
        PROFILING_RECORD,
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

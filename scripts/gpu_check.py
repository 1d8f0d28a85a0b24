#!/usr/bin/env python3
"""GPU check for any host with NVIDIA GPUs and a Docker engine: the agent, for real, on its GPUs.

Starts the dev control plane and the agent, then runs GPU-pinned jobs in the local busybox image: with two or more
GPUs, two concurrent jobs of one GPU each; with one, a single job. Each job lists the GPUs it can see
(nvidia-smi -L from the injected driver), and the check compares that with the agent's NVML inventory, the
start call's gpu_ids and NVIDIA_VISIBLE_DEVICES. Then, as the self-test does, it gives each GPU alone to a
container and looks for its device nodes; and it runs a job that keeps a CUDA context open, checking that NVML
sees its compute process while it runs and none once it ended (the drain before a GPU is handed out again). It
records each GPU's MIG mode and the MIG instances the agent would hand out. Prints a report; exit 0 when every
check holds.

Usage: gpu_check.py [--gpu-mode auto|nvidia|cdi] [--cdi-spec-dirs DIRS] [--report FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402

from cluster_agent.gpus import detect_gpus  # noqa: E402
from devplane import DevControlPlane  # noqa: E402
from devplane.images import ensure_busybox_image  # noqa: E402

TOKEN = "gpu-check-token"
PROBE_IMAGE = "radix-test/cuda-probe:latest"
JOB_SCRIPT = 'echo "visible=$NVIDIA_VISIBLE_DEVICES"; ls /dev | grep nvidia; nvidia-smi -L; cuda_probe; sleep 3'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu-mode", default="auto")
    parser.add_argument("--cdi-spec-dirs", default="/etc/cdi,/var/run/cdi")
    parser.add_argument("--report", type=Path)
    args = parser.parse_args()

    checks: list[tuple[str, bool, str]] = []

    def check(name: str, ok: bool, detail: str = "") -> None:
        checks.append((name, bool(ok), detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)

    gpus = detect_gpus()
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60).stdout
    except OSError as exc:
        smi = f"nvidia-smi unavailable: {exc}"
    smi_uuids = re.findall(r"UUID: (GPU-[0-9a-f-]+)", smi)
    smi_migs = re.findall(r"UUID: (MIG-[0-9a-f-]+)", smi)
    physical = sorted({g.physical_uuid for g in gpus})
    check("NVML lists the GPUs nvidia-smi lists", bool(gpus) and physical == sorted(smi_uuids),
          f"NVML {physical}; nvidia-smi {smi.strip()!r}")
    check("the agent's MIG instances are the ones nvidia-smi lists",
          sorted(g.uuid for g in gpus if g.mig_profile) == sorted(smi_migs), f"nvidia-smi MIG devices {smi_migs}")
    if not gpus:
        return _finish(checks, args.report, {})

    details_extra = {"mig": _mig_modes(), **_telemetry_checks(check, [g for g in gpus if not g.mig_profile])}
    probe = Path(tempfile.mkdtemp(prefix="radix-probe-")) / "cuda_probe"
    built = subprocess.run(["cc", "-O2", "-o", str(probe), str(ROOT / "scripts" / "cuda_probe.c"), "-ldl"], capture_output=True, text=True)
    check("CUDA probe compiled", built.returncode == 0, built.stderr[-300:])
    client = docker.from_env()
    try:
        client.images.remove(PROBE_IMAGE, force=True)
    except docker.errors.ImageNotFound:
        pass
    image = ensure_busybox_image(client, PROBE_IMAGE, {"bin/cuda_probe": str(probe)})
    plane = DevControlPlane(cluster_id="gpu-check", cluster_token=TOKEN).start()
    workdir = Path(tempfile.mkdtemp(prefix="radix-gpu-check-"))
    jobs = 2 if len(gpus) >= 2 else 1
    log_path = workdir / "agent.log"
    with open(log_path, "wb") as log:
        agent = subprocess.Popen(
            [sys.executable, str(ROOT / "main.py"), "--api-base", plane.url, "--cluster-id", "gpu-check",
             "--cluster-token", TOKEN, "--jobs-workdir", str(workdir / "jobs"), "--token-file", str(workdir / "token"),
             "--max-concurrent-jobs", str(jobs), "--gpu-mode", args.gpu_mode, "--cdi-spec-dirs", args.cdi_spec_dirs,
             "--heartbeat-interval", "5"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )
    details: dict = {"gpus": [g.model_dump() for g in gpus], "jobs": [], **details_extra}
    try:
        ids = [plane.state.submit({"image": image, "command": ["sh", "-c", JOB_SCRIPT], "resources": {"gpus": 1}}) for _ in range(jobs)]
        records = []
        for job_id in ids:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and plane.state.jobs[job_id].result is None:
                time.sleep(0.2)
            records.append(plane.state.jobs[job_id].view())
        heartbeat = plane.state.heartbeats[0] if plane.state.heartbeats else {}
        caps = heartbeat.get("capabilities", {})
        check("heartbeat capabilities match NVML", [g["uuid"] for g in caps.get("gpus", [])] == [g.uuid for g in gpus],
              f"gpu_count={caps.get('gpu_count')}, injection={caps.get('gpu_injection')}")
        reported = (caps.get("gpus") or [{}])[0]
        check("heartbeat carries per-GPU telemetry and health",
              all(k in reported for k in ("temperature_c", "memory_used_mb", "power_w", "health")),
              json.dumps({k: reported.get(k) for k in ("temperature_c", "memory_used_mb", "power_w", "power_limit_w", "health")}))
        seen_uuids = []
        for record in records:
            result = record["result"] or {}
            stdout = (result.get("output_payload") or {}).get("stdout", "")
            listed = re.findall(r"UUID: (GPU-[0-9a-f-]+)", stdout)
            given = (record.get("started") or {}).get("gpu_ids", [])
            details["jobs"].append({"job_id": record["job_id"], "status": result.get("status"), "gpu_ids": given,
                                    "stdout": stdout, "error": result.get("error_message")})
            check(f"job {record['job_id']} succeeded", result.get("status") == "succeeded", result.get("error_message") or "")
            check(f"job {record['job_id']} sees exactly its one GPU", len(listed) == 1 and listed == given,
                  f"listed {listed}, given {given}")
            check(f"job {record['job_id']} NVIDIA_VISIBLE_DEVICES matches", f"visible={','.join(given)}" in stdout)
            probe_line = next((line for line in stdout.splitlines() if line.startswith('{"cuda_device_count"')), "")
            cuda = json.loads(probe_line) if probe_line else {}
            check(f"job {record['job_id']} ran CUDA on exactly its GPU",
                  cuda.get("device_memory_roundtrip") == "ok" and [d["uuid"] for d in cuda.get("devices", [])] == given,
                  probe_line or stdout[-300:])
            seen_uuids += listed
        if jobs > 1:
            check("concurrent jobs got different GPUs", len(set(seen_uuids)) == len(seen_uuids), str(seen_uuids))
            starts = sorted(r["started"]["at"] for r in records if r.get("started"))
            check("the jobs overlapped in time", len(starts) == jobs and starts[-1] - starts[0] < 3)
        details["self_test"] = _self_test_checks(check, gpus, image, args)
        details["drain"] = _drain_checks(check, plane, image, gpus)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        plane.stop()
        details["agent_log_tail"] = log_path.read_text(errors="replace")[-4000:]
    return _finish(checks, args.report, details)


def _telemetry_checks(check, gpus) -> dict:
    """The agent's telemetry against nvidia-smi, and what one sample costs."""
    from cluster_agent.gpu_pool import GpuPool
    from cluster_agent.gpu_telemetry import GpuTelemetry

    telemetry = GpuTelemetry(gpus, GpuPool(gpus))
    telemetry.open()
    try:
        sample = telemetry.sample()
        rounds = 200
        started = time.perf_counter()
        for _ in range(rounds):
            telemetry.sample()
        per_gpu_ms = (time.perf_counter() - started) / rounds / len(gpus) * 1000
    finally:
        telemetry.close()
    query = "uuid,temperature.gpu,memory.total,memory.used,power.limit,power.draw"
    smi = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"], capture_output=True, text=True)
    rows = {line.split(",")[0].strip(): [v.strip() for v in line.split(",")[1:]] for line in smi.stdout.splitlines() if line.strip()}
    for gpu in gpus:
        ours, theirs = sample[gpu.uuid], rows.get(gpu.uuid)
        if theirs is None:
            check(f"nvidia-smi reports {gpu.uuid}", False)
            continue
        temp, total, used, limit, draw = (float(v) if v.replace(".", "").isdigit() else None for v in theirs)
        check(f"{gpu.uuid} temperature matches nvidia-smi (within 3 C)", abs(ours.get("temperature_c", -99) - (temp or 0)) <= 3,
              f"agent {ours.get('temperature_c')}, nvidia-smi {temp}")
        check(f"{gpu.uuid} memory total matches nvidia-smi", ours.get("memory_total_mb") == total, f"agent {ours.get('memory_total_mb')}, nvidia-smi {total}")
        check(f"{gpu.uuid} memory used matches nvidia-smi (within 64 MiB)", abs(ours.get("memory_used_mb", -999) - (used or 0)) <= 64,
              f"agent {ours.get('memory_used_mb')}, nvidia-smi {used}")
        check(f"{gpu.uuid} power limit matches nvidia-smi (within 1 W)", abs(ours.get("power_limit_w", -99) - (limit or 0)) <= 1,
              f"agent {ours.get('power_limit_w')}, nvidia-smi {limit}")
        check(f"{gpu.uuid} healthy", ours["health"]["healthy"], "; ".join(ours["health"]["reasons"]))
    check("one sample costs under 0.25 ms per GPU (2 ms for 8)", per_gpu_ms < 0.25, f"{per_gpu_ms:.3f} ms per GPU")
    return {"telemetry_sample": sample, "sample_ms_per_gpu": round(per_gpu_ms, 4)}


def _mig_modes() -> list[dict]:
    """What NVML reports for MIG mode on each GPU (current, pending), as docs/gpu.md records it."""
    import pynvml

    modes = []
    pynvml.nvmlInit()
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            try:
                current, pending = pynvml.nvmlDeviceGetMigMode(handle)
                mode = {"current": "enabled" if current else "disabled", "pending": "enabled" if pending else "disabled"}
            except pynvml.NVMLError as exc:
                mode = {"current": f"unavailable: {exc}"}
            modes.append({"index": index, **mode})
    finally:
        pynvml.nvmlShutdown()
    print(f"MIG mode: {modes}", flush=True)
    return modes


def _self_test_checks(check, gpus, image: str, args) -> dict:
    """The self-test's GPU check on the real GPUs: each GPU alone in a container, its device nodes looked for."""
    from cluster_agent.executors.docker.mode import connect_engine
    from cluster_agent.settings import Settings

    executor = connect_engine(Settings(gpu_mode=args.gpu_mode, cdi_spec_dirs=args.cdi_spec_dirs))
    nodes = {g.uuid: executor.gpu_injection.device_nodes(g) for g in gpus}
    failures = executor.probe_gpus(image, gpus)
    check("the self-test's container sees each GPU's device nodes", not failures,
          json.dumps(failures) if failures else json.dumps(nodes))
    return {"device_nodes": nodes, "failures": failures}


def _drain_checks(check, plane, image: str, gpus) -> dict:
    """A job keeps a CUDA context for 15 s: NVML (here, as the agent reads it) must list its process on the GPU
    while it runs, across the container's PID namespace, and none once the job ended."""
    from cluster_agent.gpu_pool import GpuPool
    from cluster_agent.gpu_telemetry import GpuTelemetry

    telemetry = GpuTelemetry(gpus, GpuPool(gpus))
    telemetry.open()
    try:
        job_id = plane.state.submit({"image": image, "command": ["sh", "-c", "cuda_probe"],
                                     "env": {"CUDA_PROBE_HOLD_SECONDS": "15"}, "resources": {"gpus": 1}})
        seen: list[int] = []
        given: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and plane.state.jobs[job_id].result is None:
            given = (plane.state.jobs[job_id].view().get("started") or {}).get("gpu_ids") or []
            if given and not seen:
                seen = telemetry.compute_pids(given[0]) or []
            time.sleep(0.5)
        result = plane.state.jobs[job_id].result or {}
        time.sleep(2)
        after = {uuid: telemetry.compute_pids(uuid) for uuid in given}
    finally:
        telemetry.close()
    check("the holding job succeeded", result.get("status") == "succeeded", result.get("error_message") or "")
    check("NVML lists a running job's compute process on its GPU", bool(seen), f"pids {seen} on {given}")
    check("no compute process is left on the job's GPU once it ended", all(p == [] for p in after.values()), str(after))
    return {"job_id": job_id, "pids_while_running": seen, "pids_after": after}


def _finish(checks, report: Path | None, details: dict) -> int:
    ok = all(passed for _, passed, _ in checks)
    summary = {
        "date": datetime.now(timezone.utc).isoformat(),
        "host": platform.node(),
        "passed": ok,
        "checks": [{"name": n, "passed": p, "detail": d} for n, p, d in checks],
        **details,
    }
    if report:
        report.write_text(json.dumps(summary, indent=2))
    print(f"{sum(p for _, p, _ in checks)} passed, {sum(not p for _, p, _ in checks)} failed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

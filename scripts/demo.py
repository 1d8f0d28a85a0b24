#!/usr/bin/env python3
"""`make demo`: the whole thing on one machine, then everything stopped.

Builds the local job image, starts the dev control plane and the agent, submits every job in examples/jobs/,
prints each result, and shuts the agent down with SIGTERM. Needs a Docker engine (make demo starts one).
An agent that dies (at start-up or later) ends the demo at once, with its own last words; exit 1.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import docker  # noqa: E402

from devplane import DevControlPlane  # noqa: E402
from devplane.images import ensure_busybox_image  # noqa: E402

TOKEN = "demo-cluster-token"


def main(extra_agent_args: list[str] | None = None, jobs: list[dict] | None = None) -> int:
    """Run `jobs` (default: every file in examples/jobs) through the dev control plane and an agent."""
    if jobs is None:
        print("== job image:", ensure_busybox_image(docker.from_env()))
    plane = DevControlPlane(cluster_id="demo-cluster", cluster_token=TOKEN).start()
    print("== dev control plane:", plane.url)
    workdir = Path(tempfile.mkdtemp(prefix="radix-demo-"))
    agent = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), "--api-base", plane.url, "--cluster-id", "demo-cluster",
         "--cluster-token", TOKEN, "--jobs-workdir", str(workdir / "jobs"), "--token-file", str(workdir / "token"),
         "--heartbeat-interval", "10", "--shutdown-grace", "10",
         # No fixed port: a demo must not fail because something else (another agent) has 9464.
         "--metrics-port", "0", "--health-file", str(workdir / "alive"), *(extra_agent_args or [])],
        cwd=ROOT, stderr=subprocess.PIPE, text=True,
    )
    said: list[str] = []
    threading.Thread(target=_relay, args=(agent, said), daemon=True).start()
    ok = True
    try:
        if jobs is None:
            jobs = [json.loads(path.read_text()) for path in sorted((ROOT / "examples" / "jobs").glob("*.json"))]
        ids = [plane.state.submit(job) for job in jobs]
        print(f"== submitted {len(ids)} jobs: {', '.join(ids)}")
        for job_id in ids:
            record = _wait(plane, job_id, 120, agent)
            if agent.poll() is not None and record is None:
                print(f"== the agent exited with {agent.returncode} before the jobs were done; its last words:")
                print("   " + "\n   ".join(said[-5:] or ["(nothing)"]))
                return 1
            if record is None:
                print(f"-- {job_id}: NO RESULT within 120 s")
                ok = False
                continue
            result = record.result
            line = f"-- {job_id}: {result['status']}"
            if result.get("failure_reason"):
                line += f" ({result['failure_reason']}: {result['error_message']})"
            print(line)
            print("   output:", json.dumps(result["output_payload"]))
            print("   metrics:", json.dumps(result["metrics"]))
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
        code = agent.wait(60)
        plane.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"== agent exited with {code}; control plane stopped")
    return 0 if ok and code == 0 else 1


def _relay(agent: subprocess.Popen, said: list[str]) -> None:
    """The agent's log, shown as it comes and kept for when it dies."""
    assert agent.stderr is not None
    for line in agent.stderr:
        sys.stderr.write(line)
        said.append(line.rstrip())
        del said[:-50]


def _wait(plane: DevControlPlane, job_id: str, timeout: float, agent: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and agent.poll() is None:
        record = plane.state.jobs.get(job_id)
        if record is not None and record.result is not None:
            return record
        time.sleep(0.1)
    record = plane.state.jobs.get(job_id)
    return record if record is not None and record.result is not None else None


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`make demo`, as a newcomer runs it: every example job gets its result; an agent that cannot start ends the demo
at once with its own error, not after minutes of waiting."""

import socket
import subprocess
import sys
import time

from tests.integration.conftest import ROOT


def demo(*agent_args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "demo.py"), *agent_args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_the_demo_runs_every_example_job(busybox):
    run = demo()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "NO RESULT" not in run.stdout
    assert "== agent exited with 0" in run.stdout


def test_a_demo_whose_agent_cannot_start_says_why_at_once(busybox):
    with socket.socket() as busy:  # what happened to a newcomer: another process on the agent's port
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        run = demo("--metrics-port", str(port), timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert time.monotonic() - started < 60  # not 120 s per job
    assert "the agent exited with 2 before the jobs were done" in run.stdout
    assert f"cannot listen on 0.0.0.0:{port}" in run.stdout  # its own last words, shown
    assert "NO RESULT" not in run.stdout


def test_the_ml_example_runs_a_real_model_through_the_agent(busybox):
    """`make example-ml`: VADER sentiment in an image built here, run through the dev control plane and the agent."""
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "example_ml.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    import json

    output = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("   output: "))[11:])
    assert [p["label"] for p in output["predictions"]] == ["positive", "negative", "neutral"]
    assert output["predictions"][0]["compound"] > 0.5 and output["predictions"][1]["compound"] < -0.2
    assert output["model"].startswith("VADER") and output["device"] == "cpu" and output["gpus_given"] == []
    assert output["timing_ms"]["predict"] >= 0

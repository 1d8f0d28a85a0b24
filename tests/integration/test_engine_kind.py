"""The agent knows which engine serves the Docker API (Docker or Podman) and adapts; the same tests run on both
(AGENT_TEST_ENGINE=podman, see conftest.py)."""

import json
import subprocess
import sys

import pytest

from devplane.images import BUSYBOX_IMAGE
from tests.integration.conftest import ENGINE, ROOT


@pytest.mark.engine
def test_the_agent_names_its_engine_and_what_differs(cp, start_agent):
    agent = start_agent()
    agent.wait_for_log("engine: ")
    line = next(line for line in agent.log.splitlines() if "engine: " in line)
    if ENGINE == "podman":
        assert "engine: Podman " in line and "differences from Docker:" in line and "CDI" in line
    else:
        assert "engine: Docker " in line and "differences" not in line
    # Exits come from the engine's events on either engine: a job's result comes in well under the 30 s the
    # state check would take.
    result = cp.run(command=["sh", "-c", "exit 4"], wait=20)
    assert result["metrics"]["exit_code"] == 4


@pytest.mark.engine
def test_gpu_mode_nvidia_is_refused_on_podman_only(tmp_path, busybox):
    """Podman's compatible API ignores device requests: a GPU job would run without its GPUs. The agent refuses
    the mode at start-up there; on Docker the mode is fine for a job without GPUs."""
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"job_id": "local-1", "image": BUSYBOX_IMAGE, "command": ["echo", "{}"]}))
    out = subprocess.run(
        [sys.executable, "main.py", "run-job", str(job), "--jobs-workdir", str(tmp_path / "jobs"), "--gpu-mode", "nvidia"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    if ENGINE == "podman":
        assert out.returncode == 2, out.stderr
        assert "--gpu-mode" in out.stderr and "Podman" in out.stderr and "--gpu-mode cdi" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["status"] == "succeeded"

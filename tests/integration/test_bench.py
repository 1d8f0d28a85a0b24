"""`make bench` runs: a tiny run of the real benchmark (figures are not checked here: they live in benchmarks)."""

import subprocess
import sys

from tests.integration.conftest import ROOT


def test_bench_runs_and_writes_its_report(tmp_path, busybox):
    out = tmp_path / "benchmarks.md"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--tiny", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = out.read_text()
    for section in ("per-job overhead", "long poll: submitted -> poll answered", "agent's own share", "poll-interval mode",
                    "throughput, 1 / 2 / 4 slots", "idle RSS", "idle CPU", "peak RSS while a job prints",
                    "log delivery", "NVML sample", "--tiny mode"):
        assert section in report, section

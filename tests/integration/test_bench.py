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
                    "log delivery", "NVML sample", "--tiny mode", "trivial-job loop, one job in flight",
                    "4 slots and 4 jobs in flight", "container exit (engine's die event) -> complete",
                    "poll answered -> container running", "running jobs", "cost of each further running job",
                    "parallel jobs on an image not present: pulls seen by the engine | 1 |", "the agent's image (",
                    "download of a 16 MiB input", "upload of a 16 MiB artifact", "peak RSS while moving them",
                    "input is in the cache: poll answered -> start call"):
        assert section in report, section


def test_the_dispatch_profiler_runs_and_reads_the_agents_own_timing(busybox):
    # Without py-spy (--no-profile): the latency figures, and the agent's own histograms read from /metrics.
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "profile_dispatch.py"), "--jobs", "2", "--no-profile"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "agent's own share p50" in run.stdout
    assert "radix_agent_dispatch_overhead_seconds" in run.stdout and "radix_agent_container_start_seconds" in run.stdout

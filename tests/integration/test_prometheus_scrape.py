"""Debian's Prometheus scrapes a running agent, with the shipped rules loaded, and its job counter moves after a job."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from .conftest import eventually

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def query(port: int, expr: str) -> list[dict]:
    """The instant vector of `expr`; empty while Prometheus is still starting."""
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)["data"]["result"]
    except OSError:
        return []


def test_prometheus_scrapes_the_agent_and_sees_a_job(cp, start_agent, busybox, tmp_path):
    metrics_port, prom_port = free_port(), free_port()
    start_agent("--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1")
    shutil.copy(DEPLOY / "radix-agent-rules.yml", tmp_path / "radix-agent-rules.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [radix-agent-rules.yml]\n"
        "scrape_configs:\n"
        "  - job_name: radix-agent\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    prometheus = subprocess.Popen(
        [shutil.which("prometheus") or "/usr/bin/prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"),
    )
    try:
        eventually(lambda: query(prom_port, 'up{job="radix-agent"}') and
                   query(prom_port, 'up{job="radix-agent"}')[0]["value"][1] == "1", timeout=30, what="a scrape")
        before = query(prom_port, "sum(radix_agent_jobs_total)")
        assert before == [] or before[0]["value"][1] == "0"
        assert cp.run(command=["true"])["status"] == "succeeded"
        eventually(lambda: (r := query(prom_port, 'sum(radix_agent_jobs_total{status="succeeded"})')) and
                   r[0]["value"][1] == "1", timeout=30, what="the job counter in Prometheus")
        # The shipped rules load and evaluate against the real series (none firing on a healthy agent).
        with urllib.request.urlopen(f"http://127.0.0.1:{prom_port}/api/v1/rules", timeout=10) as response:
            groups = json.load(response)["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        assert len(rules) >= 10 and all(r["health"] == "ok" for r in rules), rules
        assert not [r for r in rules if r["type"] == "alerting" and r["state"] == "firing"]
    finally:
        prometheus.terminate()
        prometheus.wait(10)


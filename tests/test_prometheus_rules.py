"""deploy/prometheus: the rules pass promtool's check and unit tests (each alert fires when it should and not when
it should not), and the rules and the Grafana dashboard use only metrics the agent really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from cluster_agent.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
METRIC = re.compile(r"\bradix_agent_[a-z_]+")


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is missing: install Debian's prometheus (make test-deps does)"
    return found


def test_promtool_checks_the_rules():
    run = subprocess.run([promtool(), "check", "rules", str(DEPLOY / "radix-agent-rules.yml")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_unit_tests_of_every_alert_pass():
    run = subprocess.run([promtool(), "test", "rules", str(DEPLOY / "rules-tests.yml")], capture_output=True,
                         text=True, cwd=DEPLOY)
    assert run.returncode == 0, run.stdout + run.stderr
    rules = yaml.safe_load((DEPLOY / "radix-agent-rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((DEPLOY / "rules-tests.yml").read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert alerts == tested  # every alert is shown to fire in some test


def exported_names() -> set[str]:
    metrics = Metrics()
    metrics.add_gpu_source(lambda: {"GPU-0": {"temperature_c": 40, "utilization_gpu_pct": 1, "memory_used_mb": 1,
                                              "power_w": 1.0, "health": {"healthy": True}, "job_id": None}})
    metrics.jobs.labels(status="failed", failure_reason="exit_code", failure_class="job").inc()
    metrics.control_plane_errors.labels(endpoint="poll", kind="http_5xx").inc()
    text = generate_latest(metrics.registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


@pytest.mark.parametrize("source", ["radix-agent-rules.yml", "grafana-dashboard.json"])
def test_every_metric_used_is_one_the_agent_exports(source):
    text = (DEPLOY / source).read_text()
    if source.endswith(".json"):
        exprs = [t["expr"] for p in json.loads(text)["panels"] for t in p["targets"]]
    else:
        exprs = [r["expr"] for g in yaml.safe_load(text)["groups"] for r in g["rules"]]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used, source
    missing = used - exported_names()
    assert not missing, f"{source} uses metrics the agent does not export: {sorted(missing)}"

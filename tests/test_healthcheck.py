"""The image's HEALTHCHECK finds this agent through its beacon, however its flags configured it."""

import json
import os
import time

from cluster_agent import healthcheck
from cluster_agent.metrics import Metrics
from cluster_agent.ops_server import OpsServer

health = healthcheck


def test_without_a_beacon_variable_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(healthcheck.BEACON_ENV, raising=False)
    healthcheck.write_beacon("http://127.0.0.1:1/healthz", tmp_path / "alive")
    assert list(tmp_path.iterdir()) == []


def test_endpoint_off_the_check_reads_the_liveness_file_the_agent_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(healthcheck.BEACON_ENV, str(tmp_path / "beacon.json"))
    monkeypatch.setenv("RADIX_METRICS_PORT", "1")  # the check's own environment says otherwise: the beacon wins
    alive = tmp_path / "somewhere-else.alive"
    healthcheck.write_beacon(None, alive)
    assert json.loads((tmp_path / "beacon.json").read_text())["pid"] == os.getpid()
    assert healthcheck.main() == 1  # never touched
    healthcheck.touch(alive)
    assert healthcheck.main() == 0
    stale = time.time() - healthcheck.STALE_AFTER_SECONDS - 5
    os.utime(alive, (stale, stale))
    assert healthcheck.main() == 1
    assert "not touched" in capsys.readouterr().out


def test_endpoint_on_the_check_asks_the_port_the_agent_really_listens_on(tmp_path, monkeypatch):
    monkeypatch.setenv(healthcheck.BEACON_ENV, str(tmp_path / "beacon.json"))
    monkeypatch.delenv("RADIX_METRICS_PORT", raising=False)
    metrics = Metrics()
    ops = OpsServer("127.0.0.1", 0, metrics, loop_alive=lambda: True, stale_after=60)
    ops.start()
    try:
        healthcheck.write_beacon(ops.healthz_url, tmp_path / "unused")
        metrics.exchanged()
        assert healthcheck.main() == 0
    finally:
        ops.stop()
    assert healthcheck.main() == 1  # the agent is gone: nothing answers there



def test_fresh_file_is_healthy(tmp_path):
    path = tmp_path / "alive"
    health.touch(path)
    assert health.is_fresh(path)


def test_stale_or_missing_file_is_unhealthy(tmp_path):
    path = tmp_path / "alive"
    assert not health.is_fresh(path)
    health.touch(path)
    old = time.time() - health.STALE_AFTER_SECONDS - 1
    os.utime(path, (old, old))
    assert not health.is_fresh(path)

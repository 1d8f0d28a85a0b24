import os
import time

from cluster_agent import healthcheck as health


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

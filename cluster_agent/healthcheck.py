"""Liveness for the image's HEALTHCHECK: `python -m cluster_agent.healthcheck` asks the agent of this container
its /healthz, or (endpoint off) checks the file its main thread touches while the poll loop runs; exit 0 healthy,
1 not.

The check must ask *this* agent however it was configured, flags included, which the check's own process never
sees. So the agent writes a beacon at start-up (where, comes from the environment variable RADIX_HEALTHCHECK_BEACON,
which the image sets and which is deliberately not a setting: a flag would hide it from the check again) saying
where its /healthz listens and which liveness file it touches. Without a beacon the check falls back to the
settings of its own environment.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["BEACON_ENV", "is_fresh", "main", "touch", "write_beacon"]

TOUCH_EVERY_SECONDS = 5.0
STALE_AFTER_SECONDS = 30.0
BEACON_ENV = "RADIX_HEALTHCHECK_BEACON"


def touch(path: Path) -> None:
    try:
        path.touch()
    except OSError:
        pass  # liveness is advisory; never let it break the agent


def is_fresh(path: Path, now: float | None = None) -> bool:
    try:
        age = (now or time.time()) - path.stat().st_mtime
    except OSError:
        return False
    return age < STALE_AFTER_SECONDS


def write_beacon(healthz_url: str | None, health_file: Path) -> None:
    """Where this agent answers /healthz (None: the endpoint is off) and which file it touches; a no-op unless
    RADIX_HEALTHCHECK_BEACON names a path. Never raises: liveness is advisory."""
    path = os.environ.get(BEACON_ENV)
    if not path:
        return
    from .files import write_json_atomic

    try:
        write_json_atomic(Path(path), {"pid": os.getpid(), "healthz": healthz_url, "health_file": str(health_file)})
    except OSError:
        pass


def _read_beacon() -> dict[str, Any] | None:
    path = os.environ.get(BEACON_ENV)
    if not path:
        return None
    try:
        beacon = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return beacon if isinstance(beacon, dict) else None


def main() -> int:
    """The image's HEALTHCHECK: /healthz when the endpoint is on, else the liveness file."""
    import urllib.error
    import urllib.request

    beacon = _read_beacon()
    if beacon is not None:
        url = beacon.get("healthz") if isinstance(beacon.get("healthz"), str) else None
        path = Path(str(beacon.get("health_file") or ""))
    else:
        from .settings import Settings

        settings = Settings()
        url = f"http://127.0.0.1:{settings.metrics_port}/healthz" if settings.metrics_port else None
        path = settings.health_file
    if url:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                print(response.read().decode())
                return 0
        except urllib.error.HTTPError as exc:
            print(f"unhealthy: {exc.read().decode()}")
            return 1
        except OSError as exc:
            print(f"unhealthy: {url}: {exc}")
            return 1
    fresh = is_fresh(path)
    print("healthy" if fresh else f"unhealthy: {path} not touched in {STALE_AFTER_SECONDS:.0f} s")
    return 0 if fresh else 1


if __name__ == "__main__":
    sys.exit(main())

"""Liveness for the image's HEALTHCHECK: the agent's main thread touches a file while its poll loop runs.

`python -m cluster_agent.healthcheck` exits 0 when the file was touched recently, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

__all__ = ["is_fresh", "main", "touch"]

TOUCH_EVERY_SECONDS = 5.0
STALE_AFTER_SECONDS = 30.0


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


def main() -> int:
    """The image's HEALTHCHECK: /healthz when the endpoint is on, else the liveness file."""
    import urllib.error
    import urllib.request

    from .settings import Settings

    settings = Settings()
    if settings.metrics_port:
        url = f"http://127.0.0.1:{settings.metrics_port}/healthz"
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
    path = settings.health_file
    fresh = is_fresh(path)
    print("healthy" if fresh else f"unhealthy: {path} not touched in {STALE_AFTER_SECONDS:.0f} s")
    return 0 if fresh else 1


if __name__ == "__main__":
    sys.exit(main())

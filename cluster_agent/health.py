"""Liveness for the image's HEALTHCHECK: the agent's main thread touches a file while its poll loop runs.

`python -m cluster_agent.health` exits 0 when the file was touched recently, 1 otherwise.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

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
    from .settings import Settings

    path = Settings().health_file
    fresh = is_fresh(path)
    print("healthy" if fresh else f"unhealthy: {path} not touched in {STALE_AFTER_SECONDS:.0f} s")
    return 0 if fresh else 1


if __name__ == "__main__":
    sys.exit(main())

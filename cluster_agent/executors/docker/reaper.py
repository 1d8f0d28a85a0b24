"""Containers the agent gave up on, removed for sure: now if the engine answers, else as soon as it does.

An engine that holds a call past the client's timeout may still perform it afterwards: a `start` the agent saw
fail can run the container minutes later, unsupervised. Removing (force) the container the agent gave up on ends
that, and a removal that cannot reach the engine is retried on the reaper's thread with capped backoff until the
engine says the container is gone.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from ...errors import EngineUnavailable

__all__ = ["ContainerReaper"]

log = logging.getLogger(__name__)

RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


class ContainerReaper:
    def __init__(self, remove: Callable[[str], None], *, wait: Callable[[float], object] | None = None) -> None:
        self._remove = remove
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._wait = wait or self._wake.wait
        self._thread: threading.Thread | None = None

    def remove(self, container_id: str) -> None:
        """Remove `container_id` now if the engine answers; otherwise keep trying on the reaper's thread."""
        try:
            self._remove(container_id)
            return
        except EngineUnavailable as exc:
            log.warning("container %s that the agent gave up on could not be removed yet (%s); retrying until it is",
                        container_id[:12], exc)
        with self._lock:
            self._pending.add(container_id)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="container-reaper", daemon=True)
                self._thread.start()

    def pending(self) -> list[str]:
        with self._lock:
            return sorted(self._pending)

    def _loop(self) -> None:
        delay = RETRY_FIRST_SECONDS
        while True:
            self._wait(delay)
            with self._lock:
                todo = sorted(self._pending)
            if not todo:
                return
            for container_id in todo:
                try:
                    self._remove(container_id)
                except EngineUnavailable:
                    continue
                with self._lock:
                    self._pending.discard(container_id)
                log.info("removed container %s that the agent had given up on", container_id[:12])
            with self._lock:
                if not self._pending:
                    self._thread = None
                    return
            delay = min(delay * 2, RETRY_MAX_SECONDS)

"""Whether the container engine (or scheduler) answers: one watch, one backoff policy, for the poller and every job.

While the engine is away the poller asks for no work and checks again with a growing pause; a job whose engine
went away mid-run waits for it with the same policy, then looks at its container again. A container killed by a
signal the agent did not send may have been stopped by an engine on its way out (dockerd stops its containers
before it exits): `took_its_jobs_along` tells that from a job that died by itself.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from .errors import EngineUnavailable
from .executors import Executor

log = logging.getLogger(__name__)

__all__ = ["EngineWatch", "BACKOFF_FIRST_SECONDS", "BACKOFF_MAX_SECONDS"]

BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 30.0
# How often `took_its_jobs_along` asks the engine.
PROBE_EVERY_SECONDS = 0.25


class EngineWatch:
    """Thread-safe. `clock` is the agent's monotonic clock; waits go through `threading.Event.wait`."""

    def __init__(self, executor: Executor, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._executor = executor
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._backoff = BACKOFF_FIRST_SECONDS

    @property
    def name(self) -> str:
        return self._executor.engine_name

    @property
    def down(self) -> bool:
        """As of the last check."""
        with self._lock:
            return self._down_since is not None

    def up(self) -> bool:
        """Ask the engine now. Its going and its coming back are logged once each."""
        try:
            self._executor.ping()
        except EngineUnavailable as exc:
            with self._lock:
                first = self._down_since is None
                if first:
                    self._down_since = self._clock()
            if first:
                log.error("%s: taking no jobs until it answers again", exc)
            return False
        with self._lock:
            since, self._down_since, self._backoff = self._down_since, None, BACKOFF_FIRST_SECONDS
        if since is not None:
            log.info("%s answers again after %.0f s: taking jobs", self.name, self._clock() - since)
        return True

    def next_pause(self) -> float:
        """The pause before the poller's next check while the engine is away (doubling, capped)."""
        with self._lock:
            pause = self._backoff
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_SECONDS)
        return pause

    def wait_until_up(self, nudge: threading.Event) -> None:
        """Block until the engine answers, asking with a doubling pause (capped); `nudge` set asks again at once.
        Never gives up: a job whose engine is away has nothing better to do than wait for it."""
        pause = BACKOFF_FIRST_SECONDS
        while not self.up():
            nudge.wait(pause)
            pause = min(pause * 2, BACKOFF_MAX_SECONDS)

    def took_its_jobs_along(self, seconds: float, stop: threading.Event | None = None) -> bool:
        """Whether the engine stops answering within `seconds` (it is shutting down, and its containers die with
        it); always False for an engine whose jobs outlive it (a Slurm controller's restart ends no job)."""
        if not self._executor.jobs_die_with_engine:
            return False
        stop = stop or threading.Event()
        deadline = self._clock() + seconds
        while self._clock() < deadline:
            try:
                self._executor.ping()
            except EngineUnavailable:
                return True
            if stop.wait(PROBE_EVERY_SECONDS):
                return False
        return False

"""Getting work: the poller thread long-polls the control plane for as many jobs as there are free slots, and hands
each job and each cancellation to the agent.

With every slot busy the poll still goes out, with capacity 0, so cancellations arrive at once. When a slot frees,
that poll -- and only such a poll, which cannot carry jobs -- is broken off and a new one asks for work. No job is
asked for while the engine is away (it would only fail) or the disk is low.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from .control_plane import ControlPlaneClient
from .disk import DiskGuard
from .engine_watch import EngineWatch
from .errors import ControlPlaneError, MalformedResponse, PollInterrupted
from .gpu_pool import GpuAllocator
from .models import PollResult
from .settings import Settings

__all__ = ["Poller", "MALFORMED_BACKOFF_SECONDS"]

log = logging.getLogger(__name__)

# After an unmarked empty poll the poller waits poll_interval; after a malformed answer, this.
MALFORMED_BACKOFF_SECONDS = 5.0
# A long-poll server that answers "nothing" at once, again and again, must not become a tight loop.
MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS = 1.0


class Poller:
    """Owns the poller thread. `capacity()` is how many jobs the agent can take now; `running_job_ids()` what it
    runs (sent with each poll); `accept(raw)` and `cancel(job_id)` must not block."""

    def __init__(
        self,
        settings: Settings,
        client: ControlPlaneClient,
        *,
        engine: EngineWatch,
        gpus: GpuAllocator,
        stopping: threading.Event,
        capacity: Callable[[], int],
        running_job_ids: Callable[[], list[str]],
        accept: Callable[[Any], None],
        cancel: Callable[[str], None],
        clock: Callable[[], float],
        disk: DiskGuard | None = None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._engine = engine
        self._gpus = gpus
        self._stopping = stopping
        self._capacity = capacity
        self._running_job_ids = running_job_ids
        self._accept = accept
        self._cancel = cancel
        self._clock = clock
        self._disk = disk
        self._lock = threading.Lock()
        # Wakes the poller from a wait (a slot freed, or shutdown); `_interrupt` breaks off a capacity-0 poll.
        self._wake = threading.Event()
        self._interrupt = threading.Event()
        self._zero_poll_in_flight = False  # guarded by _lock: only such a poll may be broken off
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="poller", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def wake(self) -> None:
        """A slot freed or shutdown began: end the poller's wait, and break off a poll that cannot carry jobs."""
        self._wake.set()
        # Under the lock: the poller cannot start its next poll (which may carry jobs) until the sockets of the
        # capacity-0 poll are shut down, so a job-carrying answer is never cut off.
        with self._lock:
            if not self._zero_poll_in_flight:
                return
            self._interrupt.set()
            self._client.interrupt_poll()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._poll_once()
            except Exception:  # a bug in one iteration must not end the loop
                log.exception("poll loop: unexpected error; polling again in %.0f s", MALFORMED_BACKOFF_SECONDS)
                self._stopping.wait(MALFORMED_BACKOFF_SECONDS)

    def _poll_once(self) -> None:
        """One iteration: poll for as many jobs as there are free slots, act on the answer."""
        asked = self._clock()
        result = self._poll()
        if result is None:
            return
        for job_id in result.cancel_job_ids:
            self._cancel(job_id)
        for raw in result.jobs:
            self._accept(raw)
        if result.jobs:
            return
        if self._engine.down:
            self._sleep(self._engine.next_pause())
        elif not result.long_poll:
            self._sleep(self._settings.poll_interval)
        elif self._clock() - asked < MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS and not result.cancel_job_ids:
            self._sleep(MIN_SECONDS_BETWEEN_EMPTY_LONG_POLLS)

    def _disk_ok(self) -> bool:
        if self._disk is None:
            return True
        try:
            return not self._disk.check().low
        except Exception:  # a failing check must not stop the agent
            log.exception("disk check failed")
            return True

    def _poll(self) -> PollResult | None:
        """The poll itself; None when it failed (after logging and waiting) or was broken off."""
        with self._lock:
            # Tentatively a poll that cannot carry jobs, before the capacity is counted: a slot freed from here on
            # breaks that poll off (or keeps it from going out). Counted first, a slot freed between the count and
            # this flag went unseen and left the agent idle for a whole long poll with a job waiting.
            self._zero_poll_in_flight = True
            self._interrupt.clear()
            self._wake.clear()
        free = self._capacity() if self._engine.up() and self._disk_ok() else 0
        with self._lock:
            self._zero_poll_in_flight = free == 0
        # While the engine is away, ask for no jobs and do not hold the poll long: it is checked again soon.
        wait = 0 if self._engine.down else self._settings.long_poll_seconds
        try:
            return self._client.poll(
                free,
                wait_seconds=wait,
                running_job_ids=sorted(self._running_job_ids()),
                free_gpus=self._gpus.free_count(),
                cancel=self._stopping,
                interrupt=self._interrupt if free == 0 else None,
            )
        except PollInterrupted:
            return None
        except MalformedResponse as exc:
            log.error("poll: %s; polling again in %.0f s", exc, MALFORMED_BACKOFF_SECONDS)
            self._stopping.wait(MALFORMED_BACKOFF_SECONDS)
            return None
        except ControlPlaneError as exc:
            if not self._stopping.is_set():
                log.error("poll: %s; polling again in %.0f s", exc, self._settings.poll_interval)
                self._sleep(self._settings.poll_interval)
            return None
        finally:
            with self._lock:
                self._zero_poll_in_flight = False

    def _sleep(self, seconds: float) -> None:
        """Wait between polls; a freed slot or shutdown ends the wait (the next job should not wait for a timer)."""
        self._wake.wait(seconds)
        self._wake.clear()

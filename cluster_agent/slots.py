"""Job slots: the one concurrency limit, deciding both what runs and how much work a poll asks for.

A job holds a slot from the moment it is accepted until its workspace and container are removed (its delivery may
still be going on). Jobs beyond the limit (a server that sends more than it was asked for) wait for a slot in
order of arrival and count as taken meanwhile, so the next poll does not ask for more. A job a restarted agent
adopts takes its slot whatever the limit: its container already runs, and a limit lowered across the restart
only slows the intake of new jobs until enough adopted ones end.
"""

from __future__ import annotations

import threading

__all__ = ["JobSlots"]


class JobSlots:
    """Thread-safe. The poller calls `enter()` when it accepts a job (never blocks), the job's thread
    `wait_turn()` before it starts anything, and `release()` once the job's resources are freed."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._holders: set[str] = set()
        self._waiting: list[str] = []
        self._changed = threading.Condition()

    def enter(self, job_id: str, *, adopted: bool = False) -> None:
        """Count `job_id` from now on: it holds a slot at once when one is free (or it is `adopted`), else it is
        next in line after those already waiting."""
        with self._changed:
            if adopted or (not self._waiting and len(self._holders) < self.capacity):
                self._holders.add(job_id)
            else:
                self._waiting.append(job_id)

    def wait_turn(self, job_id: str) -> None:
        """Block until `job_id` (entered before) holds a slot."""
        with self._changed:
            self._changed.wait_for(lambda: job_id in self._holders or job_id not in self._waiting)

    def release(self, job_id: str) -> None:
        """`job_id` gives its slot (or its place in line) back; the next in line takes it."""
        with self._changed:
            self._holders.discard(job_id)
            if job_id in self._waiting:
                self._waiting.remove(job_id)
            while self._waiting and len(self._holders) < self.capacity:
                self._holders.add(self._waiting.pop(0))
            self._changed.notify_all()

    def free(self) -> int:
        """Slots a poll may ask work for: the limit less the jobs holding or waiting for one."""
        with self._changed:
            return max(0, self.capacity - len(self._holders) - len(self._waiting))

    def held(self) -> int:
        with self._changed:
            return len(self._holders)

"""Every job the agent holds, in one map: from accepted (or found on disk after a restart) until its result is
delivered and its directory removed. A job id the server sends again meanwhile is a duplicate, never a second run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .job_dir import JobDirectory
from .job_runner import JobRun
from .live_job import LiveJob

__all__ = ["JobHandle", "JobTable"]


@dataclass
class JobHandle:
    """One job inside the agent.

    run        its runner; None for a result recovered from disk, which is only delivered
    live       what the control plane sees of it (start call, live log); None when only delivered
    thread     the thread that runs or delivers it
    running    holds a slot: from accepted until its workspace and container are gone
    """

    job_id: str
    directory: JobDirectory
    run: JobRun | None = None
    live: LiveJob | None = None
    thread: threading.Thread | None = None
    running: bool = False
    finished: bool = False  # its result is known (it may still hold its slot while its container is removed)


class JobTable:
    """Thread-safe; every method is one step under the table's lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[str, JobHandle] = {}

    def add(self, handle: JobHandle) -> bool:
        """False (and nothing added) when the job is already here."""
        with self._lock:
            if handle.job_id in self._jobs:
                return False
            self._jobs[handle.job_id] = handle
            return True

    def get(self, job_id: str) -> JobHandle | None:
        with self._lock:
            return self._jobs.get(job_id)

    def running(self) -> list[JobHandle]:
        with self._lock:
            return [handle for handle in self._jobs.values() if handle.running and handle.run is not None]

    def done_running(self, job_id: str) -> None:
        with self._lock:
            handle = self._jobs.get(job_id)
            if handle is not None:
                handle.running = False

    def remove(self, job_id: str) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def all(self) -> list[JobHandle]:
        with self._lock:
            return list(self._jobs.values())

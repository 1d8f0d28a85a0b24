"""Which GPU belongs to which job. A GPU is never given to two jobs; a job waits until all it asks for are free."""

from __future__ import annotations

import threading
from typing import Protocol

from .errors import JobFailed
from .models import FailureReason, GpuInfo

__all__ = ["GpuAllocator", "GpuPool"]


class GpuAllocator(Protocol):
    """What the job runner and the agent ask about GPUs: this host's pool, or a scheduler's
    (executors/slurm/cluster.py)."""

    @property
    def host_gpus(self) -> int:
        """GPUs of this host the agent hands out itself (a job naming no count may get them all); 0 where a
        scheduler allocates the GPUs."""

    @property
    def total(self) -> int: ...
    def free_count(self) -> int: ...
    def check_request(self, job_id: str, count: int) -> None: ...
    def acquire(self, job_id: str, count: int, cancel: threading.Event) -> list[GpuInfo] | None: ...
    def claim(self, job_id: str, uuids: list[str]) -> list[GpuInfo]: ...
    def release(self, job_id: str) -> None: ...


class GpuPool:
    def __init__(self, gpus: list[GpuInfo]) -> None:
        self._gpus = list(gpus)
        self._owner: dict[str, str] = {}  # uuid -> job_id
        self._unhealthy: dict[str, list[str]] = {}  # uuid -> reasons: never given to a new job
        self._changed = threading.Condition()

    @property
    def total(self) -> int:
        return len(self._gpus)

    @property
    def host_gpus(self) -> int:
        return len(self._gpus)

    def free_count(self) -> int:
        with self._changed:
            return len(self._usable())

    def _usable(self) -> list[GpuInfo]:
        return [g for g in self._gpus if g.uuid not in self._owner and g.uuid not in self._unhealthy]

    def owner(self, uuid: str) -> str | None:
        with self._changed:
            return self._owner.get(uuid)

    def set_unhealthy(self, uuid: str, reasons: list[str]) -> None:
        """Health from telemetry: an unhealthy GPU keeps its current job but gets no new one until healthy."""
        with self._changed:
            if reasons:
                self._unhealthy[uuid] = reasons
            elif self._unhealthy.pop(uuid, None) is not None:
                self._changed.notify_all()

    def check_request(self, job_id: str, count: int) -> None:
        if count > len(self._gpus):
            raise JobFailed(
                FailureReason.INVALID_JOB,
                f"job {job_id} asks for {count} GPU(s) but this host has {len(self._gpus)}; "
                "ask for fewer or send it to a cluster with more",
            )

    def acquire(self, job_id: str, count: int, cancel: threading.Event) -> list[GpuInfo] | None:
        """Block until `count` GPUs are free and give them to `job_id`; None if `cancel` is set first."""
        self.check_request(job_id, count)
        if count == 0:
            return []
        with self._changed:
            while True:
                free = self._usable()
                if len(free) >= count:
                    chosen = free[:count]
                    for gpu in chosen:
                        self._owner[gpu.uuid] = job_id
                    return chosen
                if cancel.is_set():
                    return None
                self._changed.wait(timeout=0.5)

    def claim(self, job_id: str, uuids: list[str]) -> list[GpuInfo]:
        """Give `job_id` the GPUs a previous agent gave its container (adoption after a restart), without waiting."""
        with self._changed:
            chosen = [gpu for gpu in self._gpus if gpu.uuid in uuids]
            for gpu in chosen:
                self._owner[gpu.uuid] = job_id
            return chosen

    def release(self, job_id: str) -> None:
        with self._changed:
            for uuid in [u for u, owner in self._owner.items() if owner == job_id]:
                del self._owner[uuid]
            self._changed.notify_all()

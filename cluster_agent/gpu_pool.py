"""Which GPU belongs to which job. A GPU is never given to two jobs; a job waits until all it asks for are free.

A GPU is free only when it is free: a job's GPUs are released into "draining", and go back to the pool once NVML
lists no compute process on them (a `torchrun` grandchild or a container not fully removed can outlive its job).
One still busy after DRAIN_GRACE_SECONDS is held out and reported (heartbeat health, log), and comes back by itself
once its processes are gone.

A unit is a full GPU or a MIG instance (gpus.py): each is given whole to one job. A job asks for full GPUs or for
instances of one MIG profile, never a mix. A MIG instance's health is its parent GPU's: a fault of the parent
holds out every instance on it. A unit the self-test found unusable in a container (node_health.py) is held out
alone until a later self-test passes for it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

from .errors import JobFailed
from .models import FailureReason, GpuInfo

__all__ = ["DRAIN_GRACE_SECONDS", "GpuAllocator", "GpuPool"]

log = logging.getLogger(__name__)

# How long a finished job's GPU may still show compute processes before it is held out (a process's exit and the
# driver's clean-up of its contexts take a moment after the container is gone).
DRAIN_GRACE_SECONDS = 30.0


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
    def check_request(self, job_id: str, count: int, profile: str | None = None) -> None: ...
    def acquire(self, job_id: str, count: int, cancel: threading.Event,
                profile: str | None = None) -> list[GpuInfo] | None: ...
    def claim(self, job_id: str, uuids: list[str]) -> list[GpuInfo]: ...
    def release(self, job_id: str) -> None: ...
    def faults_of(self, job_id: str) -> dict[str, list[str]]: ...
    def usable_gpus(self) -> list[GpuInfo]: ...
    def set_check_failure(self, uuid: str, why: str | None) -> None: ...
    def lend(self, uuid: str, borrower: str) -> bool: ...


class GpuPool:
    """`compute_pids(uuid)`: the PIDs NVML lists as compute processes on a GPU, or None when it cannot tell (then
    the GPU is taken as free); without it (no NVML), released GPUs are free at once."""

    def __init__(self, gpus: list[GpuInfo], *, compute_pids: Callable[[str], list[int] | None] | None = None,
                 drain_grace: float = DRAIN_GRACE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self._gpus = list(gpus)
        self._owner: dict[str, str] = {}  # uuid -> job_id
        self._unhealthy: dict[str, list[str]] = {}  # uuid -> reasons: never given to a new job
        self._unhealthy_since: dict[str, float] = {}  # uuid -> when it last turned unhealthy (clock)
        self._draining: dict[str, tuple[str, float]] = {}  # uuid -> (the job it served, released at)
        self._held: dict[str, str] = {}  # uuid -> why: busy past the grace
        self._failed_check: dict[str, str] = {}  # uuid -> why: the self-test's container did not see it
        self._given_at: dict[str, float] = {}  # job_id -> when it was given its GPUs (clock)
        self._compute_pids = compute_pids
        self._drain_grace = drain_grace
        self._clock = clock
        self._changed = threading.Condition()

    @property
    def total(self) -> int:
        return len(self._gpus)

    @property
    def host_gpus(self) -> int:
        """Full GPUs: what a job naming no count may get (MIG instances go only to jobs naming their profile)."""
        return sum(1 for g in self._gpus if g.mig_profile is None)

    def free_count(self) -> int:
        with self._changed:
            return len(self._usable_any())

    def _usable(self, profile: str | None = None) -> list[GpuInfo]:
        return [g for g in self._usable_any() if g.mig_profile == profile]

    def _usable_any(self) -> list[GpuInfo]:
        return [g for g in self._gpus if g.uuid not in self._owner and g.uuid not in self._unhealthy
                and g.uuid not in self._draining and g.uuid not in self._failed_check]

    def owner(self, uuid: str) -> str | None:
        with self._changed:
            return self._owner.get(uuid)

    def set_unhealthy(self, uuid: str, reasons: list[str]) -> None:
        """Health from telemetry, for a physical GPU (`uuid`: a full GPU or a MIG parent): an unhealthy unit keeps
        its current job but gets no new one until healthy."""
        with self._changed:
            for unit in [g.uuid for g in self._gpus if g.physical_uuid == uuid] or [uuid]:
                if reasons:
                    if unit not in self._unhealthy:
                        self._unhealthy_since[unit] = self._clock()
                    self._unhealthy[unit] = reasons
                elif self._unhealthy.pop(unit, None) is not None:
                    self._changed.notify_all()

    def set_check_failure(self, uuid: str, why: str | None) -> None:
        """The self-test's verdict on one unit: `why` holds it out (its job, if any, keeps it); None returns it."""
        with self._changed:
            if why:
                if uuid not in self._failed_check:
                    log.error("GPU %s: %s; held out until a self-test passes for it", uuid, why)
                self._failed_check[uuid] = why
            elif self._failed_check.pop(uuid, None) is not None:
                log.warning("GPU %s: the self-test passes for it again; back in service", uuid)
                self._changed.notify_all()

    def faults_of(self, job_id: str) -> dict[str, list[str]]:
        """The GPUs `job_id` holds that turned unhealthy since it was given them (a critical XID, fallen off the
        bus, over a health limit), with why. Asked before `release`."""
        with self._changed:
            since = self._given_at.get(job_id, float("inf"))
            return {u: list(self._unhealthy[u]) for u, owner in self._owner.items()
                    if owner == job_id and u in self._unhealthy and self._unhealthy_since.get(u, -1.0) >= since}

    def watch_processes(self, compute_pids: Callable[[str], list[int] | None]) -> None:
        """From now on, released GPUs drain through `compute_pids` (NVML opened after the pool was made)."""
        with self._changed:
            self._compute_pids = compute_pids

    def usable_gpus(self) -> list[GpuInfo]:
        """The GPUs the agent would hand out: all but the unhealthy and the held-out ones (the self-test checks
        these)."""
        with self._changed:
            return [g for g in self._gpus if g.uuid not in self._unhealthy and g.uuid not in self._held]

    def draining(self) -> bool:
        with self._changed:
            return bool(self._draining)

    def lend(self, uuid: str, borrower: str) -> bool:
        """Give one unit to `borrower` (the self-test) if no job holds it and it is neither unhealthy nor draining
        (a unit held out by a failed check may be lent: that is how it is looked at again). True if lent; it comes
        back, and drains, through `release(borrower)`."""
        with self._changed:
            self._check_draining()
            if uuid in self._owner or uuid in self._unhealthy or uuid in self._draining:
                return False
            if not any(g.uuid == uuid for g in self._gpus):
                return False
            self._owner[uuid] = borrower
            self._given_at[borrower] = self._clock()
            return True

    def held(self) -> dict[str, str]:
        """Units held out for the pool's own reasons (a finished job's processes still on them, a failed self-test
        check): uuid -> why."""
        with self._changed:
            return {**self._held, **self._failed_check}

    def units_of(self, uuid: str) -> list[str]:
        """The units on a physical GPU: itself, or its MIG instances."""
        return [g.uuid for g in self._gpus if g.physical_uuid == uuid]

    def profiles(self) -> dict[str, int]:
        """What this host offers: "full" and each MIG profile, with how many units of each."""
        offer: dict[str, int] = {}
        for g in self._gpus:
            offer[g.mig_profile or "full"] = offer.get(g.mig_profile or "full", 0) + 1
        return offer

    def check_request(self, job_id: str, count: int, profile: str | None = None) -> None:
        """JobFailed(invalid_job) when this host can never meet the request: more units of the kind than it has."""
        have = sum(1 for g in self._gpus if g.mig_profile == profile)
        if count <= have:
            return
        offer = self.profiles()
        if profile is None:
            what = f"{count} GPU(s) but this host has {have}"
        else:
            what = f"{count} MIG instance(s) of profile {profile} but this host has {have}"
        if set(offer) - {"full"}:  # say what the host has when MIG makes it more than a count
            what += " (it offers: " + ", ".join(f"{n} x {kind}" for kind, n in offer.items()) + ")"
        raise JobFailed(
            FailureReason.INVALID_JOB,
            f"job {job_id} asks for {what}; ask for fewer{' or another profile' if len(offer) > 1 else ''}, or send "
            "it to a cluster with more",
        )

    def acquire(self, job_id: str, count: int, cancel: threading.Event,
                profile: str | None = None) -> list[GpuInfo] | None:
        """Block until `count` units (full GPUs, or MIG instances of `profile`) are free and give them to `job_id`;
        None if `cancel` is set first."""
        self.check_request(job_id, count, profile)
        if count == 0:
            return []
        with self._changed:
            while True:
                self._check_draining()
                free = self._usable(profile)
                if len(free) >= count:
                    chosen = free[:count]
                    for gpu in chosen:
                        self._owner[gpu.uuid] = job_id
                    self._given_at[job_id] = self._clock()
                    return chosen
                if cancel.is_set():
                    return None
                self._changed.wait(timeout=0.5)

    def claim(self, job_id: str, uuids: list[str]) -> list[GpuInfo]:
        """Give `job_id` the GPUs a previous agent gave its container (adoption after a restart), without waiting."""
        with self._changed:
            chosen = [gpu for gpu in self._gpus if gpu.uuid in uuids]
            if len(chosen) < len(set(uuids)):
                gone = sorted(set(uuids) - {gpu.uuid for gpu in chosen})
                log.warning("job %s was given GPU(s) %s, which this agent does not hand out (no longer found, or MIG "
                            "reconfigured): it keeps running on them; they are not counted here", job_id, ", ".join(gone))
            for gpu in chosen:
                self._owner[gpu.uuid] = job_id
            self._given_at[job_id] = self._clock()
            return chosen

    def release(self, job_id: str) -> None:
        """The job is over: its GPUs drain (see the module docstring) and then go back to the pool."""
        with self._changed:
            self._given_at.pop(job_id, None)
            for uuid in [u for u, owner in self._owner.items() if owner == job_id]:
                del self._owner[uuid]
                if self._compute_pids is not None:
                    self._draining[uuid] = (job_id, self._clock())
            self._check_draining()
            self._changed.notify_all()

    def check_draining(self) -> None:
        """Free the draining GPUs that have no compute process left; hold out those busy past the grace. Called
        by the telemetry's sample loop and by jobs waiting for GPUs."""
        with self._changed:
            self._check_draining()

    def _check_draining(self) -> None:
        for uuid, (job_id, released) in list(self._draining.items()):
            try:
                pids = self._compute_pids(uuid) if self._compute_pids is not None else None
            except Exception:  # noqa: BLE001 - a GPU NVML cannot read is judged by its health, not here
                pids = None
            if not pids:
                del self._draining[uuid]
                if self._held.pop(uuid, None) is not None:
                    log.warning("GPU %s: the processes left by job %s are gone; back in service", uuid, job_id)
                self._changed.notify_all()
            elif uuid not in self._held and self._clock() - released >= self._drain_grace:
                why = (f"compute processes {sorted(pids)} still on it {self._drain_grace:g} s after job {job_id} "
                       "ended: held out until they exit")
                self._held[uuid] = why
                log.error("GPU %s: %s", uuid, why)

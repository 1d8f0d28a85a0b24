"""Bad nodes take no work: the node's self-test, and quarantine after infrastructure failures (issue 17).

The self-test asks whether this node can run a job at all, before the first poll and every --self-test-interval:

    engine     the engine answers, and creates and removes a container (never started) from an image already on
               this host (the trusted self-test image, else the last image a job ran here; only the ping before any
               job ran)
    jobs_dir   a file can be written in --jobs-workdir (free space is the disk guard's: disk.py)
    gpus       each GPU the agent would hand out still has its device node on the host (/dev/nvidia<minor>), and a
               container from the trusted self-test image (--self-test-image, else the agent's own image when it
               runs in a container; never a job's image, which is hostile), given the GPU alone the way a job gets
               it (NVIDIA runtime or CDI), sees its device nodes. Only a free GPU is looked at, lent by the pool for
               the look; one a job holds keeps its last verdict. A GPU NVML no longer answers is already out: the
               telemetry marks it lost. A GPU that fails is held out alone while the others keep working; the check
               fails (and quarantines the node) only when every GPU fails, the mark of a broken runtime or driver.
    token      the control plane accepted the cluster token at the last heartbeat

The node is quarantined after --quarantine-after infrastructure failures in a row (failure_class.py; a job's own
failures reset nothing and count nothing), or when the self-test fails. Quarantined, it asks for no jobs (polls
with max_jobs 0), says so in every heartbeat (`health`) and once in its log, keeps delivering results and
heartbeats, and runs the self-test again with backoff (30 s doubling to 10 min): once it passes, the node takes
work again. A GPU that failed is held out alone by the GPU pool; the others keep working. An operator sees the
state in /healthz (`node`) and clears it with SIGUSR1 (docs/operations.md).
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .clock import SYSTEM_CLOCK, Clock
from .errors import AgentError, ProbeImageMissing
from .gpu_pool import GpuAllocator
from .models import Completion, GpuInfo, JobStatus
from .settings import Settings

__all__ = ["Check", "NodeHealth"]

log = logging.getLogger(__name__)

BACKOFF_FIRST_SECONDS = 30.0
BACKOFF_MAX_SECONDS = 600.0
# The GPU check looks at one GPU at a time (seconds each); past this, the rest wait for the next self-test.
GPU_CHECK_SECONDS = 120.0
# The pool's owner of a GPU while the self-test looks at it: not a job id (JOB_ID_PATTERN has no parentheses), so a
# job named "self-test" cannot have its GPUs released with the borrowed ones.
SELF_TEST_BORROWER = "(self-test)"
MAX_WHY_CHARS = 300
MAX_DETAIL_CHARS = 2000


def device_present(path: str) -> bool:
    """Whether a GPU's device node exists on this host (tests stand in for hosts with GPUs)."""
    return Path(path).exists()


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


class NodeHealth:
    """Thread-safe. `engine_probe(image, start)` returns what it checked and raises (any exception, its message the
    detail) when the engine cannot create and remove a container; `gpus` is the GPU pool (the units it would hand out, lending one for a look,
    holding one out); `gpu_probe(image, gpus)` returns uuid -> why for each GPU a container does not see
    (executors' `probe_gpus`); `probe_image` is the trusted image GPU containers run (None: the GPUs are looked at
    on the host only); `token_rejected()` says the last heartbeat was refused for the token."""

    def __init__(
        self, settings: Settings, *, engine_probe: Callable[[str | None, bool], str | None], gpus: GpuAllocator,
        token_rejected: Callable[[], bool], on_change: Callable[[], None] = lambda: None,
        gpu_probe: Callable[[str | None, list[GpuInfo]], dict[str, str]] = lambda image, gpus: {},
        probe_image: str | None = None, clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._settings = settings
        self._engine_probe = engine_probe
        self._pool = gpus
        self._token_rejected = token_rejected
        self._gpu_probe = gpu_probe
        self._probe_image = probe_image
        self._said_no_image = False
        self._gpus_held: dict[str, str] = {}  # uuid -> why, as the last GPU check found
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._streak: list[str] = []  # infrastructure failures in a row: "job-id: reason"
        self._quarantined: str | None = None  # why
        self._since: float | None = None  # wall clock
        self._failing: list[Check] = []
        self._last_image: str | None = probe_image
        self._wake = threading.Event()
        self._test_now = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what others ask ----------------------------------------------------------------------------------

    @property
    def quarantined(self) -> bool:
        with self._lock:
            return self._quarantined is not None

    def report(self) -> dict[str, Any]:
        """The heartbeat's and /healthz's `health`: state, why, the failing checks, since when (ISO 8601)."""
        with self._lock:
            return {
                "state": "quarantined" if self._quarantined else "healthy",
                "reason": self._quarantined,
                "failing_checks": [{"name": c.name, "detail": c.detail} for c in self._failing],
                "since": datetime.fromtimestamp(self._since, timezone.utc).isoformat() if self._since else None,
                "infrastructure_failures_in_a_row": len(self._streak),
                "gpus_held_out": dict(self._gpus_held),
            }

    # --- what happens ---------------------------------------------------------------------------------------

    def job_finished(self, job_id: str, completion: Completion, image: str | None) -> None:
        """Count a finished job: infrastructure failures in a row quarantine the node; anything else resets."""
        if completion.status is JobStatus.CANCELED:
            return
        limit = self._settings.quarantine_after
        with self._lock:
            if completion.status is JobStatus.FAILED and completion.metrics.failure_class == "infrastructure":
                self._streak.append(f"{job_id}: {completion.failure_reason.value if completion.failure_reason else '?'}")
            else:
                self._streak.clear()
                if completion.metrics.exit_code is not None and image:
                    self._last_image = self._probe_image or image  # present here: it just ran
            streak = list(self._streak)
        if limit and len(streak) >= limit:
            self._enter(f"{len(streak)} infrastructure failures in a row ({'; '.join(streak[-limit:])})", [])

    def clear(self, who: str) -> None:
        """The operator's word (SIGUSR1): take work again now; the self-test runs at once all the same."""
        with self._lock:
            was = self._quarantined
            self._quarantined, self._since, self._failing = None, None, []
            self._streak.clear()
        if was:
            log.warning("quarantine cleared by %s (it was: %s); taking work again", who, was)
            self._on_change()
        self._test_now = True
        self._wake.set()

    def self_test(self) -> list[Check]:
        """Run every check; returns them all. A failure quarantines the node; a pass ends a quarantine."""
        checks = [self._check_engine(), self._check_jobs_dir(), self._check_gpus(), self._check_token()]
        failing = [c for c in checks if not c.ok]
        if failing:
            self._enter("self-test failed: " + "; ".join(f"{c.name}: {c.detail}" for c in failing), failing)
        else:
            with self._lock:
                was = self._quarantined
                self._quarantined, self._since, self._failing = None, None, []
                self._streak.clear()
            if was:
                log.warning("self-test passed: quarantine over (it was: %s); taking work again", was)
                self._on_change()
        return checks

    def _enter(self, why: str, failing: list[Check]) -> None:
        with self._lock:
            first = self._quarantined is None
            self._quarantined = why
            self._failing = failing
            if first:
                self._since = self._clock.wall()
        if first:
            log.error("node quarantined: %s; taking no jobs until the self-test passes (SIGUSR1 clears it)", why)
            self._on_change()
            self._wake.set()  # the loop switches to the backoff schedule (no test at once)

    # --- the checks -----------------------------------------------------------------------------------------

    def _check_engine(self) -> Check:
        with self._lock:
            image = self._last_image
        trusted = image is not None and image == self._probe_image
        try:
            # Only a trusted image is started; a job's is created and removed, never run by the agent.
            detail = self._engine_probe(image, trusted)
        except ProbeImageMissing as exc:
            if trusted:
                return Check("engine", False, str(exc)[:500])
            # The last job's image was removed (pruned, by hand): no fault of the engine's. Forget it, or a
            # quarantined node, which runs no job to name another, would fail this check for ever.
            with self._lock:
                if self._last_image == image:
                    self._last_image = None
            return self._check_engine()
        except AgentError as exc:  # the agent's own words name the fix
            return Check("engine", False, str(exc)[:500])
        except Exception as exc:  # noqa: BLE001 - any failure is the check's verdict
            return Check("engine", False, f"{type(exc).__name__}: {exc}"[:500])
        return Check("engine", True, detail or "answers")

    def _check_jobs_dir(self) -> Check:
        """Writable. Free space is the disk guard's (disk.py): it takes no job while low and resumes the moment
        there is room, which a quarantine's backoff would only delay."""
        root = self._settings.jobs_workdir
        probe = root / f".self-test-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, b"radix self-test\n")
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
        except OSError as exc:
            return Check("jobs_dir", False, f"{root} cannot be written: {exc.strerror or exc}")
        return Check("jobs_dir", True)

    def _check_gpus(self) -> Check:
        gpus = self._pool.usable_gpus()
        if not gpus:
            return Check("gpus", True)
        failed = {gpu.uuid: f"{gpu.device_node} is gone on the host" for gpu in gpus if not device_present(gpu.device_node)}
        looked = set(failed)
        image = self._probe_image
        if image is None and not self._said_no_image:
            self._said_no_image = True
            log.warning("self-test: GPUs are looked at on the host only: set --self-test-image to a trusted image "
                        "with sh (busybox will do) to look at them in a container the way jobs get them")
        deadline = self._clock.monotonic() + GPU_CHECK_SECONDS
        for gpu in gpus:
            if image is None or gpu.uuid in failed or self._clock.monotonic() > deadline:
                continue
            if not self._pool.lend(gpu.uuid, SELF_TEST_BORROWER):
                continue  # a job has it (or it drains): its last verdict stands
            try:
                why = self._gpu_probe(image, [gpu]).get(gpu.uuid)
            except Exception as exc:  # noqa: BLE001 - the engine check says what is wrong with the engine
                log.warning("self-test: the GPUs could not be looked at in a container: %s", exc)
                break
            finally:
                self._pool.release(SELF_TEST_BORROWER)
            looked.add(gpu.uuid)
            if why:
                failed[gpu.uuid] = why[:MAX_WHY_CHARS]
        with self._lock:  # a GPU not looked at keeps what the last look found
            held = {u: w for u, w in self._gpus_held.items() if u not in looked and any(g.uuid == u for g in gpus)}
            held.update(failed)
            self._gpus_held = held
        for gpu in gpus:
            if gpu.uuid in looked:
                self._pool.set_check_failure(gpu.uuid, failed.get(gpu.uuid))
        detail = "; ".join(f"GPU {uuid}: {why}" for uuid, why in held.items())[:MAX_DETAIL_CHARS]
        if len(held) == len(gpus):
            return Check("gpus", False, detail)
        return Check("gpus", True, f"held out: {detail}" if held else "")

    def _check_token(self) -> Check:
        if self._token_rejected():
            return Check("token", False, "the control plane refused the cluster token at the last heartbeat")
        return Check("token", True)

    # --- the loop -------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Self-test every --self-test-interval seconds, and with backoff while quarantined."""
        self._thread = threading.Thread(target=self._loop, name="self-test", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        interval = self._settings.self_test_interval
        first = min(BACKOFF_FIRST_SECONDS, interval) if interval else BACKOFF_FIRST_SECONDS
        backoff = first
        while not self._stop.is_set():
            quarantined = self.quarantined
            if not quarantined:
                backoff = first
            woken = self._wake.wait(backoff if quarantined else (interval or BACKOFF_MAX_SECONDS))
            self._wake.clear()
            if self._stop.is_set():
                return
            asked, self._test_now = self._test_now, False
            if woken and not asked:
                continue  # the state changed: wait again on the schedule it calls for
            if not (asked or quarantined or interval):
                continue  # --self-test-interval 0: only at start, on request (SIGUSR1) and in quarantine
            try:
                self.self_test()
            except Exception:  # the self-test must never take the agent down
                log.exception("self-test failed to run")
            # Backoff doubles only after a test that its own timer ran; one asked for starts it again.
            backoff = first if asked else min(backoff * 2, BACKOFF_MAX_SECONDS)

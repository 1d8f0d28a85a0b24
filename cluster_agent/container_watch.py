"""Watching one job's running container until it ends: its output, its deadline, an engine that goes away.

`ContainerWatch.watch()` returns how the run ended (an `Ending`) and what it printed; judging that is verdict.py's.
A stop asked for from another thread (cancel, shutdown) is a `StopRequest`, which the watch reads to say why the
container ended.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

from .clock import SYSTEM_CLOCK
from .engine_watch import EngineWatch
from .errors import EngineUnavailable, JobFailed
from .executors import STOP_GRACE_SECONDS, ContainerState, Executor
from .models import FailureReason
from .output import OutputCollector
from .verdict import Ending

__all__ = ["ContainerWatch", "StopRequest", "OutputSink"]

log = logging.getLogger(__name__)

# A container that dies of a signal the agent did not send may have been stopped by an engine shutting down
# (dockerd stops its containers first, then exits): watch the engine this long before judging the job.
ENGINE_PROBE_SECONDS = 3.0
# One that died of SIGTERM is what a departing dockerd sends first, and dockerd answers until every container has
# stopped: each is given its stop timeout (10 s by default) within the daemon's --shutdown-timeout (15 s by
# default, dockerd(8)), so one other container that ignores SIGTERM keeps the engine up 10 s or more after the job
# died (seen in the engine-restart test on a busy host). Watch it that long, with room for a loaded host.
ENGINE_SHUTDOWN_PROBE_SECONDS = 20.0
# An adopted container that ended by itself within this much of its timeout (by the engine's own clock) ended in
# time: the engine's start and finish stamps are taken a little apart from the process's real run.
TIMEOUT_SLACK_SECONDS = 1.0
# The longest single wait call: a wait is re-issued, so that a deadline is never missed by an engine's timer.
WAIT_CHUNK_SECONDS = 60.0
# On an engine whose jobs outlive it (Podman's API service), a job's output stream ends when the service stops.
# A container still running this long after its stream ended had its stream cut; one that finished this much after
# its stream ended did too (the stream ends after the exit, a little before the engine records it).
CUT_STREAM_RUNNING_SECONDS = 2.0
CUT_STREAM_SLACK_SECONDS = 0.5
# How long a cut stream waits for the engine to answer again before leaving the job's output to the watch.
CUT_STREAM_ENGINE_SECONDS = 60.0

OutputSink = Callable[[bytes], None]


class StopRequest:
    """Why a job is being stopped; the first reason wins. `lock` also guards the job's container id, so that a
    stop never misses a container being started."""

    def __init__(self) -> None:
        self.lock = threading.RLock()  # re-entered: a job stopped just before its start reads why, under it
        self.event = threading.Event()
        self.reason: FailureReason | None = None
        self.message = ""

    def request(self, reason: FailureReason, message: str) -> None:
        """Call with `lock` held."""
        if self.reason is None:
            self.reason, self.message = reason, message
        self.event.set()


class ContainerWatch:
    """One job's container, watched on the job's thread."""

    def __init__(
        self, executor: Executor, engine: EngineWatch, *, job_id: str, stop: StopRequest, output: OutputSink,
        clock: Callable[[], float],
    ) -> None:
        self._executor = executor
        self._engine = engine
        self._job_id = job_id
        self._stop = stop
        self._output = output
        self._clock = clock
        self._readers: list[threading.Thread] = []  # every output reader started: the watch waits for them all

    def watch(
        self, container_id: str, *, deadline: float, timeout: float, collected: OutputCollector, replay: bool
    ) -> Ending:
        """Until the container ends or `deadline` (this clock) passes; then stop it. `replay`: its output so far
        is read again from the engine (an adopted container)."""
        reader = self._read_output(container_id, collected, replay=replay)
        ending = self._wait_until_done(container_id, deadline, timeout, collected, reader)
        # Each reader: one started after an engine restart (the container survived it) is not `reader`, and what
        # it still delivers must reach the result before the job is judged.
        for started in self._readers:
            started.join(timeout=30)
        if ending.exit_code is None and not ending.timed_out:
            info = self._executor.exit_info(container_id)
            ending.exit_code, ending.oom_killed = info.exit_code, info.oom_killed
            ending.finished_at = info.finished_at
            if info.failure_reason is not None:
                ending.failure, ending.failure_message = info.failure_reason, info.error
            if ending.engine_lost and info.exit_code == 0:
                ending.engine_lost = False  # it finished by itself before the engine went away
            elif ending.failure is None and self._killed_by_a_departing_engine(ending):
                log.warning("job %s: its container died with %s; waiting for it to come back", self._job_id,
                            self._engine.name)
                ending.engine_lost = True
                self.await_engine(container_id)
        return ending

    def _read_output(self, container_id: str, collected: OutputCollector, *, replay: bool) -> threading.Thread:
        output = self._output

        def on_stdout(data: bytes) -> None:
            collected.feed_stdout(data)
            output(data)

        def on_stderr(data: bytes) -> None:
            collected.feed_stderr(data)
            output(data)

        def target() -> None:
            if replay:
                self._executor.replay_output(container_id, on_stdout, on_stderr, skip_stdout=collected.stdout_bytes,
                                             skip_stderr=collected.stderr_bytes)
            else:
                self._executor.stream_output(container_id, on_stdout, on_stderr)
            if not self._executor.jobs_die_with_engine:
                self._resume_if_cut(container_id, on_stdout, on_stderr, collected, ended_at=SYSTEM_CLOCK.wall())

        reader = threading.Thread(target=target, name=f"output-{self._job_id}", daemon=True)
        reader.start()
        self._readers.append(reader)
        return reader

    def _resume_if_cut(self, container_id: str, on_stdout: OutputSink, on_stderr: OutputSink,
                       collected: OutputCollector, *, ended_at: float) -> None:
        """Podman's API service may stop or restart under a running job (socket activation, an upgrade): conmon
        keeps the job running, but the output stream the service carried ends, and the wait may never notice an
        outage. What the job wrote past the cut is read from its log, skipping what was already read."""
        since = self._clock()
        running_since: float | None = None
        while True:
            try:
                state = self._executor.inspect(container_id)
            except EngineUnavailable:
                if self._clock() - since > CUT_STREAM_ENGINE_SECONDS:
                    return  # the watch waits for the engine and reads the rest itself
                SYSTEM_CLOCK.sleep(0.5)
                continue
            if state is None:
                return
            if not state.running:
                if state.finished_at is None or state.finished_at <= ended_at + CUT_STREAM_SLACK_SECONDS:
                    return  # the stream ended with the job
                break
            running_since = self._clock() if running_since is None else running_since
            if self._clock() - running_since >= CUT_STREAM_RUNNING_SECONDS:
                break
            SYSTEM_CLOCK.sleep(0.2)
        log.info("job %s: its output stream was cut (the engine's API service restarted); reading the rest from "
                 "its log", self._job_id)
        self._executor.replay_output(container_id, on_stdout, on_stderr, skip_stdout=collected.stdout_bytes,
                                     skip_stderr=collected.stderr_bytes)

    def _wait_until_done(
        self, container_id: str, deadline: float, timeout: float, collected: OutputCollector, reader: threading.Thread
    ) -> Ending:
        """Wait for the container until its deadline, riding out an engine that goes away."""
        ending = Ending(exit_code=None, timeout=timeout, engine_name=self._executor.engine_name)
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            try:
                if self._executor.wait(container_id, min(remaining, WAIT_CHUNK_SECONDS)):
                    return self._with_stop(ending)
            except EngineUnavailable as exc:
                log.warning("job %s: %s; waiting for the engine to come back", self._job_id, exc)
                state = self.await_engine(container_id)
                if state is None:
                    raise JobFailed(
                        FailureReason.AGENT_ERROR,
                        f"the job's container {container_id[:12]} vanished while {self._executor.engine_name} was "
                        "away; the job may or may not have run to completion: resubmit it",
                    ) from None
                reader.join(timeout=5)  # its stream broke with the engine
                if state.running:
                    log.info("job %s: its container survived the engine restart; still watching it", self._job_id)
                    if not reader.is_alive():  # else it resumes the stream itself (_resume_if_cut)
                        reader = self._read_output(container_id, collected, replay=True)
                    continue
                # Ended while the engine was away: killed with it (dockerd), or by itself (Podman's service is not
                # what runs its containers), which its exit code then judges.
                ending.engine_lost = self._executor.jobs_die_with_engine
                if reader.is_alive():
                    reader.join(timeout=30)  # resuming its cut stream: what it printed meanwhile
                else:
                    self._read_output(container_id, collected, replay=True).join(timeout=30)  # what it printed meanwhile
                return self._with_stop(ending)
        return self._past_deadline(container_id, timeout, ending)

    def _past_deadline(self, container_id: str, timeout: float, ending: Ending) -> Ending:
        with self._stop.lock:
            stopping = self._stop.reason is not None
        if stopping:  # already being stopped for another reason
            self._executor.wait(container_id, STOP_GRACE_SECONDS + 30)
            return self._with_stop(ending)
        state = self._executor.inspect(container_id)
        if state is not None and state.status not in ("created", "pending") and not state.running:
            # It ended while no agent watched (an adopted job whose deadline passed meanwhile): its own times say
            # whether it ran past its timeout; it was not stopped.
            if state.started_at is None or state.finished_at is None or \
                    state.finished_at - state.started_at <= timeout + TIMEOUT_SLACK_SECONDS:
                return self._with_stop(ending)
            log.info("job %s: ran past its timeout of %.0f s while no agent watched it", self._job_id, timeout)
        else:
            log.info("job %s: timed out after %.0f s; stopping it", self._job_id, timeout)
            self._executor.stop(container_id, STOP_GRACE_SECONDS)
        ending.timed_out = True
        ending.exit_code = self._executor.exit_info(container_id).exit_code
        return ending

    def _with_stop(self, ending: Ending) -> Ending:
        with self._stop.lock:
            ending.stop_reason, ending.stop_message = self._stop.reason, self._stop.message
        return ending

    def _killed_by_a_departing_engine(self, ending: Ending) -> bool:
        if ending.stop_reason is not None or ending.oom_killed or (ending.exit_code or 0) <= 128:
            return False
        sigterm = ending.exit_code == 128 + signal.SIGTERM
        return self._engine.took_its_jobs_along(ENGINE_SHUTDOWN_PROBE_SECONDS if sigterm else ENGINE_PROBE_SECONDS)

    def await_engine(self, container_id: str) -> ContainerState | None:
        """Wait until the engine answers, then return the container's state (None: it is gone)."""
        while True:
            self._engine.wait_until_up(self._stop.event)
            try:
                state = self._executor.inspect(container_id)
            except EngineUnavailable:
                continue  # gone again at once
            log.info("job %s: %s is back", self._job_id, self._executor.engine_name)
            return state

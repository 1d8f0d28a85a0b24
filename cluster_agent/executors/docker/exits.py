"""Job containers' exits as the engine announces them: its `die` events, read from one events stream.

Why: after a container's process exits, dockerd emits `die` and then cleans the container up (unmounts its root
filesystem, tears down its network) while holding the container's lock. Until that ends, `wait` does not return
and `inspect` blocks: 40-75 ms per container on a 2-core host (measured with Docker 20.10, 2026-11-30), which
was most of the agent's dead time between a job's end and its result. The `die` event carries the exit code, so a
job that exited by itself is judged at once.

The event alone judges only a plain exit (code 0-128) of a container without a memory limit of its own and
without an `oom` event before its `die`. A process the kernel killed for memory makes an `oom` event; when the
main process itself was killed the code is > 128, but a killed child whose parent carries on ends the container
with any code (a shell, make, a worker pool), and containerd delivers `oom` and the exit separately, so an `oom`
could come late. For those containers (a memory limit set, a signal's code, an `oom` seen) the executor asks
`inspect`, which answers after the engine's clean-up and so after a late `oom` too: correctness first, speed for
the rest. Whenever the stream is down (engine restart,
not yet connected), callers fall back to `wait`/`inspect`: the stream only ever makes an answer earlier.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import docker

from ...clock import Clock
from ..base import LABEL_JOB_ID
from .engine_kind import DOCKER

__all__ = ["ExitEvents", "Exit"]

log = logging.getLogger(__name__)

# Exits remembered for containers nobody asked about yet (another agent's jobs on the same engine, say).
MAX_REMEMBERED = 4096
RECONNECT_SECONDS = 1.0
# Replayed on each (re)connection, so that an exit announced while the stream was away is not missed; the engine
# keeps its recent events in memory for this.
REPLAY_SLACK_SECONDS = 2.0


@dataclass(frozen=True)
class Exit:
    exit_code: int
    at: float  # wall-clock epoch seconds, by the engine's clock
    oom: bool = False  # an `oom` event for the container came before its `die`

    @property
    def plain(self) -> bool:
        """Exited by itself, not by a signal, and nothing of it was killed for memory (as far as events tell)."""
        return 0 <= self.exit_code <= 128 and not self.oom


class ExitEvents:
    """Thread-safe. `start()` once; `wait()` from any job thread."""

    def __init__(self, api: docker.APIClient, *, clock: Clock, filters: dict[str, Any] | None = None) -> None:
        self._api = api
        self._clock = clock
        # The engine's own filter spelling (engine_kind.py): Podman's differs from Docker's. Set before start().
        self.filters: dict[str, Any] = filters or DOCKER.exit_event_filters()
        self._cond = threading.Condition()
        self._exits: OrderedDict[str, Exit] = OrderedDict()
        # Started by this process, after the stream's replay point; True: a plain exit may be judged from its event.
        self._watched: dict[str, bool] = {}
        self._oom: OrderedDict[str, None] = OrderedDict()  # containers with an `oom` event
        self._connected = False
        self._closed = threading.Event()
        self._stream: Any = None
        self._since = clock.wall()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="engine-events", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected

    def wait(self, container_id: str, timeout: float) -> Exit | None:
        """The container's exit once announced. None after `timeout`, or at once while the stream is down (the
        caller asks the engine itself)."""
        with self._cond:
            self._cond.wait_for(
                lambda: container_id in self._exits or not self._connected or self._closed.is_set(),
                timeout=max(0.0, timeout),
            )
            return self._exits.get(container_id)

    def watch(self, container_id: str, *, judge_from_event: bool) -> None:
        """A container this process starts now: its exit is on the stream (or in its replay). `judge_from_event`:
        it has no memory limit of its own, so a plain exit with no `oom` event may be judged from the event."""
        with self._cond:
            self._watched[container_id] = judge_from_event

    def watched(self, container_id: str) -> bool:
        with self._cond:
            return container_id in self._watched

    def judged_from_event(self, container_id: str) -> bool:
        with self._cond:
            return self._watched.get(container_id, False)

    def take(self, container_id: str) -> Exit | None:
        """The announced exit, forgotten once read (each container is judged once)."""
        with self._cond:
            return self._exits.pop(container_id, None)

    def forget(self, container_id: str) -> None:
        with self._cond:
            self._exits.pop(container_id, None)
            self._watched.pop(container_id, None)
            self._oom.pop(container_id, None)

    def close(self) -> None:
        self._closed.set()
        with self._cond:
            stream = self._stream
            self._cond.notify_all()
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001 - closing a broken stream may fail any way
                pass

    def _run(self) -> None:
        while not self._closed.is_set():
            try:
                stream = self._api.events(
                    since=self._since - REPLAY_SLACK_SECONDS,
                    filters=self.filters,
                    decode=True,
                )
                with self._cond:
                    self._stream = stream
                    self._connected = True
                    self._cond.notify_all()
                for event in stream:
                    self._record(event)
            except Exception as exc:  # noqa: BLE001 - the engine went away, or answered oddly: fall back
                log.debug("engine events stream broke off: %s", exc)
            finally:
                with self._cond:
                    self._connected = False
                    self._stream = None
                    self._cond.notify_all()
            self._closed.wait(RECONNECT_SECONDS)

    def _record(self, event: dict[str, Any]) -> None:
        if not isinstance(event, dict) or event.get("status") not in ("die", "oom"):
            return
        container_id = event.get("id")
        attributes = (event.get("Actor") or {}).get("Attributes") or {}
        if "label" not in self.filters and LABEL_JOB_ID not in attributes:
            return  # not a job's container: an engine that cannot filter by label (Podman) sends them all
        if event["status"] == "oom":
            if isinstance(container_id, str):
                with self._cond:
                    self._oom[container_id] = None
                    while len(self._oom) > MAX_REMEMBERED:
                        self._oom.popitem(last=False)
            return
        try:
            exit_code = int(attributes.get("exitCode"))
            at = int(event["timeNano"]) / 1e9
        except (TypeError, ValueError, KeyError):
            return
        with self._cond:
            self._since = max(self._since, at)
            if not isinstance(container_id, str):
                return
            self._exits[container_id] = Exit(exit_code, at, oom=container_id in self._oom)
            while len(self._exits) > MAX_REMEMBERED:
                self._exits.popitem(last=False)
            self._cond.notify_all()

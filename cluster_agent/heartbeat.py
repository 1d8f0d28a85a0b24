"""The heartbeat: its own thread and timer, so a running job, a hung poll or a failing control plane never delays it."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .control_plane import ControlPlaneClient
from .errors import ControlPlaneError, TokenRejected
from .models import Capabilities

__all__ = ["Heartbeat"]

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        client: ControlPlaneClient,
        capabilities: Callable[[], Capabilities],
        interval: float,
    ) -> None:
        self._client = client
        self._capabilities = capabilities
        self._interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()  # ends the wait between two beats early (drain, stop)
        self._status = "active"
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.token_rejected = False  # the last heartbeat was refused for the token (the self-test's token check)

    def beat(self, status: str = "active", *, attempts: int = 3) -> bool:
        """Send one heartbeat; failures are logged, never raised (the next tick is the retry)."""
        try:
            self._client.heartbeat(status, self._capabilities(), cancel=self._stop, attempts=attempts)
        except TokenRejected as exc:
            log.error("%s", exc)  # the message names the endpoint already
            self.token_rejected = True
            return False
        except ControlPlaneError as exc:
            log.warning("heartbeat failed: %s", exc)
            return False
        self.sent += 1
        self.token_rejected = False
        log.debug("heartbeat sent (%s)", status)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            status = self._status
            self.beat(status)
            if self._status != status and not self._stop.is_set():
                # drain() came while this one was in flight and may have landed first: the latest word is draining.
                self.beat(self._status)

    def drain(self) -> None:
        """From now until stop(), heartbeats say `draining`; one goes out at once. A control plane that watches
        heartbeats must not take a host that is finishing its jobs for a lost one."""
        self._status = "draining"
        # On the caller's thread: an agent with nothing to finish exits at once, before the loop's next turn.
        self.beat("draining", attempts=1)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

"""The heartbeat: its own thread and timer, so a running job, a hung poll or a failing control plane never delays it."""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .control_plane import ControlPlaneClient
from .errors import ControlPlaneError, TokenRejected
from .models import Capabilities

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
        self._thread: threading.Thread | None = None
        self.sent = 0

    def beat(self, status: str = "active", *, attempts: int = 3) -> bool:
        """Send one heartbeat; failures are logged, never raised (the next tick is the retry)."""
        try:
            self._client.heartbeat(status, self._capabilities(), cancel=self._stop, attempts=attempts)
        except TokenRejected as exc:
            log.error("heartbeat: %s", exc)
            return False
        except ControlPlaneError as exc:
            log.warning("heartbeat failed: %s", exc)
            return False
        self.sent += 1
        log.debug("heartbeat sent (%s)", status)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.beat("active")

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def send_draining(self) -> bool:
        """The last heartbeat, sent after stop(): one quick attempt with its own cancel event."""
        try:
            self._client.heartbeat("draining", self._capabilities(), cancel=threading.Event(), attempts=1)
            return True
        except ControlPlaneError as exc:
            log.warning("draining heartbeat failed: %s", exc)
            return False

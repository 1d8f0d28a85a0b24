"""What the control plane sees of a running job: the start acknowledgement and the live log stream.

One LiveJob per job, given to the job runner as its observer. Neither hook blocks the job: the start call goes
out on a short-lived thread, output goes into the log streamer's bounded buffer.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .control_plane import ControlPlaneClient
from .errors import ControlPlaneError
from .log_streamer import LogStreamer

__all__ = ["LiveJob"]

log = logging.getLogger(__name__)

# How long a completion waits for the last log chunks when the control plane is not taking them.
LOG_FLUSH_TIMEOUT_SECONDS = 30.0


class LiveJob:
    def __init__(
        self,
        client: ControlPlaneClient,
        job_id: str,
        *,
        on_cancel: Callable[[], None],
        resume_offset: int = 0,
        on_log_acknowledged: Callable[[int], None] | None = None,
    ) -> None:
        self._client = client
        self._job_id = job_id
        self._stop = threading.Event()
        self._start_thread: threading.Thread | None = None
        self.streamer: LogStreamer | None = None
        if client.supports("logs"):
            self.streamer = LogStreamer(
                client, job_id, on_cancel=on_cancel, resume_offset=resume_offset, on_acknowledged=on_log_acknowledged
            )
            self.streamer.start()

    def started(self, container_id: str, started_at: str, gpu_ids: list[str]) -> None:
        if not self._client.supports("start"):
            return
        self._start_thread = threading.Thread(
            target=self._send_start, args=(container_id, started_at, gpu_ids), name=f"start-{self._job_id}", daemon=True
        )
        self._start_thread.start()

    def _send_start(self, container_id: str, started_at: str, gpu_ids: list[str]) -> None:
        try:
            self._client.start(
                self._job_id, started_at=started_at, container_id=container_id, gpu_ids=gpu_ids, cancel=self._stop
            )
        except ControlPlaneError as exc:
            log.warning("job %s: start acknowledgement not delivered: %s", self._job_id, exc)

    def output(self, data: bytes) -> None:
        if self.streamer is not None:
            self.streamer.buffer.append(data)

    def finish(self, timeout: float = LOG_FLUSH_TIMEOUT_SECONDS) -> None:
        """Before the completion: the start call and the final log chunk go first."""
        if self._start_thread is not None:
            self._start_thread.join(timeout)
        if self.streamer is not None and not self.streamer.finish(timeout):
            log.warning("job %s: the control plane did not take the last logs within %.0f s", self._job_id, timeout)

    def abandon(self) -> None:
        self._stop.set()
        if self.streamer is not None:
            self.streamer.abandon()

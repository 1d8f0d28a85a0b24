"""Live logs: the job's combined stdout+stderr, shipped to the control plane in order, by byte offset.

The container is never blocked on the control plane: output goes into a bounded `LogBuffer` and a streamer thread
ships it. When the control plane is slower than the job, the buffer keeps the oldest unsent output and the
latest output and drops the middle, and the stream says how much was dropped. Offsets count bytes of the UTF-8
stream as sent (markers included), so they are contiguous; a chunk is retried with its offset until accepted,
so retries neither duplicate nor skip.
"""

from __future__ import annotations

import codecs
import logging
import threading
from typing import Callable

from .control_plane import ControlPlaneClient
from .errors import ControlPlaneError, ExtensionUnsupported

__all__ = ["LogBuffer", "LogStreamer"]

log = logging.getLogger(__name__)

MAX_CHUNK_BYTES = 1024 * 1024  # contract: at most 1 MiB a request
FLUSH_SECONDS = 1.0  # contract: at least every 2 s while output arrives
BUFFER_BYTES = 4 * 1024 * 1024  # oldest unsent output kept; as much again of the latest
BATCH_SECONDS = 0.25  # output is gathered this long before a request, unless the job ends or a chunk fills


class LogBuffer:
    """Output waiting to be sent. `append` never blocks and memory stays under ~2 x `capacity`."""

    def __init__(self, capacity: int = BUFFER_BYTES) -> None:
        self._capacity = capacity
        self._head = bytearray()  # oldest unsent output, in order
        self._tail = bytearray()  # latest output, after a drop
        self._dropped = 0  # bytes dropped between head and tail
        self._closed = False
        self._ready = threading.Condition()
        self.total_bytes = 0

    def append(self, data: bytes) -> None:
        with self._ready:
            self.total_bytes += len(data)
            # Once the head is full, later output queues in the tail (in order) until the head has been sent.
            if not self._tail and len(self._head) + len(data) <= self._capacity:
                self._head += data
            else:
                self._tail += data
                excess = len(self._tail) - self._capacity
                if excess > 0:
                    del self._tail[:excess]
                    self._dropped += excess
            self._ready.notify_all()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def pending(self) -> int:
        with self._ready:
            return len(self._head) + len(self._tail)

    def wait(self, timeout: float) -> bool:
        """Wait until something is pending or the buffer is closed; True if there is something to do."""
        with self._ready:
            if not (self._head or self._tail or self._closed):
                self._ready.wait(timeout)
            return bool(self._head or self._tail) or self._closed

    def wait_for_batch(self, size: int, timeout: float) -> None:
        """Wait up to `timeout` for `size` bytes to be pending or for the buffer to close, whichever comes first
        (a job that ends must not wait out a batching pause before its last chunk and its result)."""
        with self._ready:
            self._ready.wait_for(
                lambda: self._closed or len(self._head) + len(self._tail) >= size, timeout=timeout
            )

    @property
    def closed(self) -> bool:
        with self._ready:
            return self._closed and not (self._head or self._tail)

    def take(self, limit: int) -> tuple[bytes, int]:
        """Up to `limit` bytes of the next output to send, and the bytes dropped just before them (0 if none)."""
        with self._ready:
            if self._head:
                chunk = bytes(self._head[:limit])
                del self._head[:limit]
                return chunk, 0
            if self._tail:
                dropped, self._dropped = self._dropped, 0
                # The latest output becomes the head: later output queues behind it again.
                self._head, self._tail = self._tail, bytearray()
                chunk = bytes(self._head[:limit])
                del self._head[:limit]
                return chunk, dropped
            return b"", 0


class LogStreamer:
    """Ships one job's log buffer on its own thread."""

    def __init__(
        self,
        client: ControlPlaneClient,
        job_id: str,
        *,
        on_cancel: Callable[[], None],
        buffer: LogBuffer | None = None,
        flush_seconds: float = FLUSH_SECONDS,
        max_chunk: int = MAX_CHUNK_BYTES,
        resume_offset: int = 0,
        on_acknowledged: Callable[[int], None] | None = None,
    ) -> None:
        self.buffer = buffer or LogBuffer()
        self._client = client
        self._job_id = job_id
        self._on_cancel = on_cancel
        self._abandon = threading.Event()  # set to give up (the agent is exiting, or finish() timed out)
        self._flush = flush_seconds
        self._max_chunk = max_chunk
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._carry = ""  # decoded text not yet sent (a chunk never splits a character)
        self.offset = 0  # bytes of the UTF-8 stream the server has
        # After a restart the output is replayed from the start: skip what the server already has.
        self._skip = resume_offset
        self._on_acknowledged = on_acknowledged
        self.sent_chunks = 0
        self._thread = threading.Thread(target=self._run, name=f"logs-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def finish(self, timeout: float) -> bool:
        """Close the buffer and wait until everything is sent; the final chunk goes before the completion.

        After `timeout` (a control plane that takes no logs), give up so the completion is not held back.
        """
        self.buffer.close()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.abandon()
            self._thread.join(5)
            return False
        return True

    def abandon(self) -> None:
        self._abandon.set()

    def _run(self) -> None:
        try:
            while not self._abandon.is_set():
                if not self.buffer.wait(self._flush):
                    continue
                if self.buffer.closed and not self._carry:
                    return
                # Batch briefly, so a chatty job sends one request per flush, not one per line; the end of the
                # job or a full chunk ends the pause at once.
                self.buffer.wait_for_batch(self._max_chunk, min(BATCH_SECONDS, self._flush))
                if self._abandon.is_set():
                    return
                self._send_pending()
        except ExtensionUnsupported:
            return  # said once in the log by the client; drain nothing more
        except ControlPlaneError as exc:
            log.warning("job %s: log streaming stopped: %s", self._job_id, exc)
        finally:
            self._drain_silently()

    def _drain_silently(self) -> None:
        # Nothing more will be sent: release what is buffered.
        while self.buffer.take(self._max_chunk)[0]:
            pass

    def _send_pending(self) -> None:
        while True:
            raw, dropped = self.buffer.take(self._max_chunk)
            if dropped:
                self._carry += self._decoder.decode(b"", final=True)
                self._decoder.reset()
                self._carry += (
                    f"\n[radix-agent: {dropped} bytes of output dropped here: the control plane took them slower "
                    "than the job wrote them]\n"
                )
            if raw:
                self._carry += self._decoder.decode(raw, final=self.buffer.closed and not self.buffer.pending())
            elif self.buffer.closed:
                self._carry += self._decoder.decode(b"", final=True)
            if not self._carry:
                return
            while self._carry:
                text = self._fit(self._carry)
                self._carry = self._carry[len(text):]
                self._ship(text)
            if not raw and not dropped:
                return

    def _fit(self, text: str) -> str:
        """The longest prefix of `text` whose UTF-8 encoding is at most max_chunk bytes."""
        encoded = text.encode("utf-8")
        if len(encoded) <= self._max_chunk:
            return text
        cut = encoded[: self._max_chunk].decode("utf-8", errors="ignore")
        return cut

    def _ship(self, text: str) -> None:
        if self._skip:
            encoded = text.encode("utf-8")
            if len(encoded) <= self._skip:
                self._skip -= len(encoded)
                self.offset += len(encoded)
                return
            text = encoded[self._skip:].decode("utf-8", errors="ignore")
            self.offset += self._skip
            self._skip = 0
            if not text:
                return
        cancel = self._client.logs(self._job_id, offset=self.offset, data=text, cancel=self._abandon)
        self.offset += len(text.encode("utf-8"))
        self.sent_chunks += 1
        if self._on_acknowledged is not None:
            self._on_acknowledged(self.offset)
        if cancel:
            self._on_cancel()

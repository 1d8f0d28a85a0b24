"""httpx transports for the control-plane client: every request has an overall deadline, and the poller's
in-flight request can be broken off by another thread.

Deadline: httpx's timeouts bound each socket operation, not the request, so a server that trickles one byte
just inside the read timeout can hold a request forever. The backend here caps every connect, read, write and
TLS handshake by the deadline of the request running on the calling thread (httpx's sync client runs each
request on its caller's thread; `request_deadline()` sets it). Past it, the operation fails as a timeout.

Interrupt: a blocked socket read cannot be cancelled from another thread in Python, except by shutting the
socket down. The tracking backend keeps its streams (TLS ones included) so that `interrupt()` can do exactly
that. The poller has a client of its own built on it: when a job slot frees while a `max_jobs: 0` long poll is
held, the poll is broken off and a new one asks for the job at once, instead of after the server's hold.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import httpcore
import httpx

__all__ = ["BULK_READ_BYTES", "DeadlineBackend", "LazyClient", "DeadlineTransport", "InterruptibleTransport", "deadline_passed", "request_deadline"]

# Writes are cut into pieces this size so that a server reading slowly cannot stretch one write past the deadline
# (the socket timeout bounds each send, and a send that makes a little progress each time never times out).
_WRITE_PIECE = 64 * 1024
BULK_READ_BYTES = 1024 * 1024  # socket reads of data transfers (DeadlineBackend's read_bytes)

_local = threading.local()


@contextmanager
def request_deadline(seconds: float) -> Iterator[None]:
    """Every socket operation of the requests made inside, on this thread, must end within `seconds` from now."""
    previous = getattr(_local, "deadline", None)
    _local.deadline = time.monotonic() + seconds
    try:
        yield
    finally:
        _local.deadline = previous


def deadline_passed() -> bool:
    """Whether the current thread's request deadline (if any) has passed: tells a deadline from a plain timeout."""
    deadline = getattr(_local, "deadline", None)
    return deadline is not None and time.monotonic() >= deadline


def _capped(timeout: float | None, expired: type[Exception]) -> float | None:
    """`timeout`, shortened to what is left of the thread's deadline; raises `expired` once nothing is left."""
    deadline = getattr(_local, "deadline", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        # A zero socket timeout would mean non-blocking, not "expired": fail as the timeout it is.
        raise expired("the request's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A network stream whose every operation is capped by the calling thread's request deadline."""

    def __init__(self, inner: httpcore.NetworkStream, backend: DeadlineBackend) -> None:
        self._inner = inner
        self._backend = backend
        # The server has begun to answer the request in flight: an interrupt no longer breaks it off, since an
        # answer under way may carry jobs it has handed out (a broken server can answer max_jobs 0 with jobs).
        self.answering = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        max_bytes = max(max_bytes, self._backend.read_bytes)
        data = self._inner.read(max_bytes, _capped(timeout, httpcore.ReadTimeout))
        if data:
            self.answering = True
        return data

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self.answering = False  # a new request on this connection: no answer to it yet
        view = memoryview(buffer)
        piece = self._backend.write_bytes
        while view:
            self._inner.write(bytes(view[:piece]), _capped(timeout, httpcore.WriteTimeout))
            view = view[piece:]

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        # The TLS stream replaces this one (its socket is a new object): it needs the same wrapping and tracking.
        inner = self._inner.start_tls(ssl_context, server_hostname, _capped(timeout, httpcore.ConnectTimeout))
        return self._backend.wrap(inner)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.SyncBackend):
    """The sync socket backend, with every stream capped by the calling thread's request deadline.

    `read_bytes`: the most each socket read takes (httpcore asks for 64 KiB); `write_bytes`: the pieces a write
    is cut into, each within the write timeout. Bulk transfers read and write 1 MiB at a time:
    a gigabyte is then 1,000 trips through the HTTP parser instead of 16,000, the difference between 0.7 and 1.0 of
    curl's throughput on loopback (docs/benchmarks.md)."""

    read_bytes = 0
    write_bytes = _WRITE_PIECE

    def __init__(self, read_bytes: int = 0, write_bytes: int = _WRITE_PIECE) -> None:
        self.read_bytes = read_bytes
        self.write_bytes = write_bytes  # each piece must go within the write timeout (a stall rule)

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        return self.wrap(super().connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        timeout = _capped(timeout, httpcore.ConnectTimeout)
        return self.wrap(super().connect_unix_socket(path, timeout, socket_options))

    def wrap(self, stream: httpcore.NetworkStream) -> httpcore.NetworkStream:
        return _DeadlineStream(stream, self)


class _TrackingBackend(DeadlineBackend):
    """Keeps its streams so that `interrupt()` can shut their sockets down from another thread."""

    def __init__(self) -> None:
        super().__init__()
        self._streams: weakref.WeakSet[httpcore.NetworkStream] = weakref.WeakSet()
        self._lock = threading.Lock()

    def wrap(self, stream: httpcore.NetworkStream) -> httpcore.NetworkStream:
        wrapped = super().wrap(stream)
        with self._lock:
            self._streams.add(wrapped)
        return wrapped

    def interrupt(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            if getattr(stream, "answering", False):
                continue
            sock = stream.get_extra_info("socket")
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed, or a plain socket a TLS one has taken over


class DeadlineTransport(httpx.HTTPTransport):
    """An HTTP transport on `DeadlineBackend`: requests made inside `request_deadline()` end by the deadline."""

    def __init__(self, limits: httpx.Limits = httpx.Limits(), backend: DeadlineBackend | None = None) -> None:
        super().__init__(limits=limits)
        self._backend = backend or DeadlineBackend()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=self._backend,
        )


class InterruptibleTransport(DeadlineTransport):
    """A deadline transport whose in-flight requests another thread can break off."""

    def __init__(self, max_connections: int = 2) -> None:
        self._tracking = _TrackingBackend()
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections, keepalive_expiry=30.0
        )
        super().__init__(limits, self._tracking)

    def interrupt(self) -> None:
        """Break off every request in flight on this transport (they fail with a transport error)."""
        self._tracking.interrupt()


class LazyClient:
    """An httpx client for bulk data, made at its first use (an agent whose jobs move no data pays nothing for it:
    SSL context, pool), on a DeadlineTransport that reads and writes BULK_READ_BYTES per socket call. Thread-safe."""

    def __init__(self, transport: httpx.BaseTransport | None = None, **client: Any) -> None:
        self._transport = transport
        self._options = client
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def get(self) -> httpx.Client:
        with self._lock:
            if self._client is None:
                self._client = httpx.Client(transport=self._transport or DeadlineTransport(
                    backend=DeadlineBackend(read_bytes=BULK_READ_BYTES, write_bytes=BULK_READ_BYTES)), **self._options)
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()

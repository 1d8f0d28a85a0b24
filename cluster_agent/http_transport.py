"""An httpx transport whose in-flight requests another thread can break off.

A blocked socket read cannot be cancelled from another thread in Python, except by shutting the socket down.
This backend keeps its sockets so that `interrupt()` can do exactly that. The poller has a client of its own
built on it: when a job slot frees while a `max_jobs: 0` long poll is held, the poll is broken off and a new
one asks for the job at once, instead of after the server's hold.
"""

from __future__ import annotations

import socket
import threading
import weakref
from typing import Any

import httpcore
import httpx


class _TrackingBackend(httpcore.SyncBackend):
    def __init__(self) -> None:
        self._streams: weakref.WeakSet[httpcore.NetworkStream] = weakref.WeakSet()
        self._lock = threading.Lock()

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        stream = super().connect_tcp(*args, **kwargs)
        with self._lock:
            self._streams.add(stream)
        return stream

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        stream = super().connect_unix_socket(*args, **kwargs)
        with self._lock:
            self._streams.add(stream)
        return stream

    def interrupt(self) -> None:
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            sock = stream.get_extra_info("socket")
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


class InterruptibleTransport(httpx.HTTPTransport):
    def __init__(self, max_connections: int = 2) -> None:
        super().__init__()
        self._backend = _TrackingBackend()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            network_backend=self._backend,
        )

    def interrupt(self) -> None:
        """Break off every request in flight on this transport (they fail with a transport error)."""
        self._backend.interrupt()

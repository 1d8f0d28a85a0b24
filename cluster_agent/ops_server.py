"""The operator's HTTP endpoint: `/metrics` (Prometheus text format) and `/healthz`.

`/healthz` is 200 when the poll loop is alive and the control plane answered recently (within `stale_after`
seconds), else 503; both cases carry a small JSON body saying why. The image's HEALTHCHECK calls it.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .metrics import Metrics

__all__ = ["OpsServer"]

log = logging.getLogger(__name__)


class OpsServer:
    def __init__(
        self, host: str, port: int, metrics: Metrics, *, loop_alive: Callable[[], bool], stale_after: float,
        node: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        ops = self
        self._node = node

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
                pass

            def do_GET(self) -> None:  # noqa: N802 - stdlib naming
                if self.path.split("?")[0] == "/metrics":
                    self._send(200, generate_latest(metrics.registry), CONTENT_TYPE_LATEST)
                elif self.path.split("?")[0] == "/healthz":
                    healthy, body = ops.health()
                    self._send(200 if healthy else 503, json.dumps(body).encode(), "application/json")
                else:
                    self._send(404, b"not found\n", "text/plain")

            def _send(self, status: int, data: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._metrics = metrics
        self._loop_alive = loop_alive
        self._stale_after = stale_after
        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ops-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def healthz_url(self) -> str:
        """Where a process on this host (or in this container) reaches /healthz."""
        host = str(self._server.server_address[0])
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.port}/healthz"

    def health(self) -> tuple[bool, dict[str, object]]:
        age = self._metrics.last_exchange_age()
        alive = self._loop_alive()
        recent = age <= self._stale_after
        body: dict[str, object] = {
            "healthy": alive and recent,
            "poll_loop_alive": alive,
            "last_control_plane_exchange_seconds_ago": None if age == float("inf") else round(age, 1),
            "stale_after_seconds": self._stale_after,
        }
        if self._node is not None:
            # Quarantine is reported, not a liveness failure: restarting the container would not mend the node.
            body["node"] = self._node()
        return alive and recent, body

    def start(self) -> None:
        self._thread.start()
        log.info("metrics and health on http://%s:%d (/metrics, /healthz)", *self._server.server_address[:2])

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

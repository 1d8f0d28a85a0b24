"""The development control plane's server: agent endpoints under /v1/clusters/{id}/, an admin API under /admin/.

Admin API (no auth; bind it to loopback):
  POST /admin/jobs                 submit a job (job_id optional)          -> {"job_id": ...}
  GET  /admin/jobs/{id}?wait=S     a job's record, waiting up to S seconds for its result
  GET  /admin/jobs                 every job's record
  GET  /admin/heartbeats           heartbeats received, oldest first
  GET  /admin/stats                counters (polls, completes by job, ...)
  POST /admin/faults               {"endpoint": "poll|heartbeat|complete|exchange", "responses": [503, ...],
                                    "delay": seconds?, "clear": bool?} the next answers of that endpoint;
                                   status 0 drops the connection, 1 answers 200 with a body that is not JSON
  POST /admin/jobs/{id}/cancel     ask the agent to cancel a job (sent once in a poll answer, and in every logs
                                   answer while it runs)
  POST /admin/config               {"long_poll": bool, "extensions": bool, "cancel_via": "poll"|"logs"}
  POST /admin/raw_poll             {"body": <any JSON>, "trickle_seconds": S?, "trickle_headers": bool?} the next
                                   poll is answered with exactly that body (200, marked as usual), whatever it holds;
                                   each call queues one answer. Jobs in it with a string job_id become assigned
                                   records at once, so their results are taken. With trickle_seconds the body (and, with
                                   trickle_headers, the status line and headers too) goes out one byte every S s.
                                   {"body_text": "...", "job_ids": [...]} sends that exact text instead (JSON no
                                   encoder here would produce: nested past any recursion limit) and takes results
                                   for the listed job ids
  POST /admin/reset                forget everything
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class JobRecord:
    job_id: str
    spec: dict[str, Any]
    state: str = "queued"  # queued -> assigned -> done
    submitted_at: float = field(default_factory=time.time)
    assigned_at: float | None = None
    completed_at: float | None = None
    result: dict[str, Any] | None = None
    deliveries: int = 0  # complete calls received, duplicates included
    idempotency_keys: list[str] = field(default_factory=list)
    started: dict[str, Any] | None = None  # the start call's body, with "at"
    log: bytearray = field(default_factory=bytearray)
    log_requests: list[dict[str, Any]] = field(default_factory=list)  # {"at", "offset", "bytes"} per call
    log_gaps: int = 0  # chunks whose offset was past the end (a gap)
    cancel_requested: bool = False
    cancel_sent_at: float | None = None

    def view(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "spec": self.spec,
            "submitted_at": self.submitted_at,
            "assigned_at": self.assigned_at,
            "completed_at": self.completed_at,
            "result": self.result,
            "deliveries": self.deliveries,
            "idempotency_keys": self.idempotency_keys,
            "started": self.started,
            "log": self.log.decode("utf-8", errors="replace"),
            "log_bytes": len(self.log),
            "log_requests": self.log_requests,
            "log_gaps": self.log_gaps,
            "cancel_requested": self.cancel_requested,
        }


class State:
    def __init__(
        self, cluster_id: str, cluster_token: str, one_time_tokens: list[str], long_poll: bool, extensions: bool = True
    ) -> None:
        self.cluster_id = cluster_id
        self.cluster_token = cluster_token
        self.one_time_tokens = set(one_time_tokens)
        self.long_poll = long_poll
        self.extensions = extensions  # False: 404 on start/logs, like a core-only server
        self.cancel_via = "poll"  # or "logs": deliver cancellations only in logs answers
        self.lock = threading.Condition()
        self.jobs: dict[str, JobRecord] = {}
        self.queue: deque[str] = deque()
        self.heartbeats: list[dict[str, Any]] = []
        self.faults: dict[str, deque[int]] = {}
        self.delays: dict[str, float] = {}
        self.stats: dict[str, int] = {"polls": 0, "heartbeats": 0, "completes": 0, "exchanges": 0}
        self.poll_bodies: deque[dict[str, Any]] = deque(maxlen=50)
        self.raw_polls: deque[dict[str, Any]] = deque()  # queued by /admin/raw_poll, answered before any job
        self.draining = False

    def submit(self, spec: dict[str, Any]) -> str:
        job_id = spec.get("job_id") or f"job-{uuid.uuid4().hex[:12]}"
        spec = {**spec, "job_id": job_id}
        spec.setdefault("command", [])
        spec.setdefault("args", [])
        spec.setdefault("env", {})
        spec.setdefault("input_payload", {})
        spec.setdefault("orchestration", {"num_gpus": 0})
        spec.setdefault("job_kind", "dev")
        with self.lock:
            if job_id in self.jobs and self.jobs[job_id].state != "done":
                raise ValueError(f"job {job_id} already exists")
            self.jobs[job_id] = JobRecord(job_id, spec)
            self.queue.append(job_id)
            self.lock.notify_all()
        return job_id

    def take(self, max_jobs: int) -> list[dict[str, Any]]:
        taken = []
        while self.queue and len(taken) < max_jobs:
            record = self.jobs[self.queue.popleft()]
            record.state, record.assigned_at = "assigned", time.time()
            taken.append(record.spec)
        return taken

    def request_cancel(self, job_id: str) -> bool:
        with self.lock:
            record = self.jobs.get(job_id)
            if record is None:
                # A cancel for a job the agent does not run: still sent, and must be ignored by the agent.
                record = self.jobs[job_id] = JobRecord(job_id, {"job_id": job_id}, state="unknown")
            if record.state == "queued":
                self.queue.remove(job_id)
                record.state = "done"
                record.result = {"status": "canceled", "failure_reason": "canceled", "note": "canceled before assignment"}
            record.cancel_requested = True
            self.lock.notify_all()
            return True

    def take_cancellations(self, running_job_ids: list[str]) -> list[str]:
        """Cancellations to send: once, and again every few seconds while the agent still lists the job as
        running (a cancellation can be lost with a poll answer that never reached its agent)."""
        if self.cancel_via != "poll":
            return []
        now = time.time()
        ids = []
        for record in self.jobs.values():
            if not record.cancel_requested or record.state not in ("assigned", "unknown"):
                continue
            resend = record.job_id in running_job_ids and now - (record.cancel_sent_at or 0) > CANCEL_RESEND_SECONDS
            if record.cancel_sent_at is None or resend:
                record.cancel_sent_at = now
                ids.append(record.job_id)
        return ids

    def register_raw_jobs(self, body: Any) -> None:
        """Jobs in a raw poll answer become assigned records (under the lock), so their results are taken."""
        jobs = body.get("jobs") if isinstance(body, dict) else None
        for job in jobs if isinstance(jobs, list) else []:
            job_id = job.get("job_id") if isinstance(job, dict) else None
            if isinstance(job_id, str) and job_id not in self.jobs:
                self.jobs[job_id] = JobRecord(job_id, job, state="assigned", assigned_at=time.time())

    def next_fault(self, endpoint: str) -> int | None:
        with self.lock:
            queue = self.faults.get(endpoint)
            return queue.popleft() if queue else None


CANCEL_RESEND_SECONDS = 5.0
_AGENT_PATH = re.compile(r"^/v1/clusters/(?P<cluster>[^/]+)/(?P<rest>.+)$")


class Handler(BaseHTTPRequestHandler):
    server: "DevServer"
    protocol_version = "HTTP/1.1"
    # An answer goes out as two writes (headers, then body): with Nagle's algorithm on, the body waits for the
    # client's delayed ACK of the headers, ~40 ms per request on Linux. Production servers (uvicorn, nginx, Go's
    # net/http) set TCP_NODELAY; so does this one, or every latency measured against it would carry that 40 ms.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        if self.server.verbose:
            super().log_message(format, *args)

    # --- plumbing ------------------------------------------------------------------------------------------

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if len(raw) < length:
            self.close_connection = True  # nothing more will come on it
            # The client went away mid-request (an agent breaking off a capacity-0 poll): never read that as an
            # empty body, whose defaults (max_jobs 1) would hand a job to a connection nobody reads.
            raise ValueError(f"body cut short: {len(raw)} of {length} bytes")
        return json.loads(raw) if raw else {}

    def _send(self, status: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body if body is not None else {}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        try:
            body = self._body() if method == "POST" else None
        except ValueError as exc:
            said = str(exc)
            self._send(400, {"error": said if said.startswith("body cut short") else "body is not JSON"})
            return
        if url.path.startswith("/admin/"):
            self._admin(method, url.path, parse_qs(url.query), body)
            return
        match = _AGENT_PATH.match(url.path)
        if method != "POST" or not match:
            self._send(404, {"error": "not found"})
            return
        if unquote(match["cluster"]) != self.server.state.cluster_id:
            self._send(404, {"error": "unknown cluster"})
            return
        self._agent(match["rest"], body)

    # --- the agent-facing protocol -------------------------------------------------------------------------

    def _agent(self, rest: str, body: Any) -> None:
        state = self.server.state
        endpoint = {"auth/exchange": "exchange", "heartbeat": "heartbeat", "jobs/poll": "poll"}.get(rest)
        per_job = re.match(r"^jobs/(?P<job>[^/]+)/(?P<call>complete|start|logs)$", rest)
        if per_job:
            endpoint = per_job["call"]
            if endpoint in ("start", "logs") and not state.extensions:
                self._send(404, {"error": "not found"})
                return
        if endpoint is None:
            self._send(404, {"error": "unknown endpoint"})
            return
        delay = state.delays.get(endpoint)
        if delay:
            time.sleep(delay)
        fault = state.next_fault(endpoint)
        if fault is not None:
            with state.lock:
                state.stats[f"faults_{endpoint}"] = state.stats.get(f"faults_{endpoint}", 0) + 1
            if fault == 1:  # a 200 whose body is not JSON
                data = b"<html>proxy error</html>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            if fault == 0:  # drop the connection without an answer
                self.close_connection = True
                self.connection.shutdown(2)
                return
            self._send(fault, {"error": f"injected fault {fault}"}, {"Retry-After": "0"} if fault in (429, 503) else None)
            return
        if endpoint == "exchange":
            self._exchange()
            return
        if self.headers.get("X-Radix-Cluster-Token") != state.cluster_token:
            self._send(401, {"error": "bad cluster token"})
            return
        if not self.headers.get("X-Radix-Tenant-Id"):
            self._send(400, {"error": "missing X-Radix-Tenant-Id"})
            return
        if endpoint == "heartbeat":
            with state.lock:
                state.stats["heartbeats"] += 1
                state.heartbeats.append({"at": time.time(), **(body or {})})
                # A draining agent is leaving: release its held polls. An active one (re)started.
                state.draining = (body or {}).get("status") == "draining"
                state.lock.notify_all()
            self._send(200, {"ok": True})
        elif endpoint == "poll":
            self._poll(body or {})
        elif endpoint == "start":
            self._start(unquote(per_job["job"]), body or {})
        elif endpoint == "logs":
            self._logs(unquote(per_job["job"]), body or {})
        else:
            self._complete(unquote(per_job["job"]), body)

    def _exchange(self) -> None:
        state = self.server.state
        token = self.headers.get("X-Radix-One-Time-Token")
        with state.lock:
            state.stats["exchanges"] += 1
            if token not in state.one_time_tokens:
                self._send(401, {"error": "unknown or used one-time token"})
                return
            state.one_time_tokens.discard(token)
        self._send(200, {"cluster_token": state.cluster_token})

    def _poll(self, body: dict[str, Any]) -> None:
        state = self.server.state
        max_jobs = body.get("max_jobs", 1)
        running = [j for j in body.get("running_job_ids") or [] if isinstance(j, str)]
        wait = min(float(body.get("wait_seconds") or 0), 60.0) if state.long_poll else 0.0
        deadline = time.monotonic() + wait
        with state.lock:
            state.stats["polls"] += 1
            state.poll_bodies.append({"at": time.time(), **body})
            raw = state.raw_polls.popleft() if state.raw_polls else None
        if raw is not None:
            self._raw_poll(raw)
            return
        with state.lock:
            jobs = state.take(max_jobs)
            cancels = state.take_cancellations(running)
            while not jobs and not cancels and not state.draining and not self.server.closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                state.lock.wait(min(remaining, 0.5))
                jobs = state.take(max_jobs)
                cancels = state.take_cancellations(running)
        headers = {"X-Radix-Long-Poll": "1"} if state.long_poll else None
        answer: dict[str, Any] = {"jobs": jobs}
        if cancels:
            answer["cancel_job_ids"] = cancels
        self._send(200, answer, headers)

    def _raw_poll(self, raw: dict[str, Any]) -> None:
        """Answer a poll with exactly the queued body, trickled if asked (a broken or slow control plane)."""
        text = raw.get("body_text")
        data = text.encode() if isinstance(text, str) else json.dumps(raw["body"]).encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        if self.server.state.long_poll:
            head += "X-Radix-Long-Poll: 1\r\n"
        head_bytes = (head + "\r\n").encode()
        every = float(raw.get("trickle_seconds") or 0)
        self.close_connection = every > 0  # the agent may give up half-way: never reuse this connection
        try:
            if every <= 0:
                self.wfile.write(head_bytes + data)
                return
            if not raw.get("trickle_headers"):
                self.wfile.write(head_bytes)
                head_bytes = b""
            for byte in head_bytes + data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if self.server.closing:
                    return
                time.sleep(every)
        except OSError:
            pass  # the agent cut the answer off: what the trickle is for

    def _start(self, job_id: str, body: dict[str, Any]) -> None:
        state = self.server.state
        with state.lock:
            record = state.jobs.get(job_id)
            if record is None:
                self._send(404, {"error": f"unknown job {job_id}"})
                return
            record.started = {"at": time.time(), **body}
            state.lock.notify_all()
        self._send(200, {"ok": True})

    def _logs(self, job_id: str, body: dict[str, Any]) -> None:
        state = self.server.state
        offset, data = body.get("offset"), body.get("data")
        if not isinstance(offset, int) or not isinstance(data, str):
            self._send(400, {"error": "logs need an integer offset and a string data"})
            return
        chunk = data.encode("utf-8")
        with state.lock:
            record = state.jobs.get(job_id)
            if record is None:
                self._send(404, {"error": f"unknown job {job_id}"})
                return
            record.log_requests.append({"at": time.time(), "offset": offset, "bytes": len(chunk)})
            have = len(record.log)
            if offset > have:
                record.log_gaps += 1
            elif offset + len(chunk) > have:
                record.log += chunk[have - offset:]  # ignore what it already has
            cancel = record.cancel_requested and record.state == "assigned"
        self._send(200, {"cancel": True} if cancel else {"ok": True})

    def _complete(self, job_id: str, body: Any) -> None:
        state = self.server.state
        with state.lock:
            state.stats["completes"] += 1
            record = state.jobs.get(job_id)
            if record is None:
                self._send(404, {"error": f"unknown job {job_id}"})
                return
            record.deliveries += 1
            record.idempotency_keys.append(self.headers.get("Idempotency-Key", ""))
            if record.result is None:
                record.result, record.state, record.completed_at = body, "done", time.time()
                state.lock.notify_all()
        self._send(200, {"ok": True})

    # --- admin ---------------------------------------------------------------------------------------------

    def _admin(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> None:
        state = self.server.state
        parts = path.strip("/").split("/")
        if method == "POST" and parts == ["admin", "jobs"]:
            if not isinstance(body, dict):
                self._send(400, {"error": "a job is a JSON object"})
                return
            try:
                self._send(201, {"job_id": state.submit(body)})
            except ValueError as exc:
                self._send(409, {"error": str(exc)})
        elif method == "GET" and parts == ["admin", "jobs"]:
            with state.lock:
                self._send(200, {"jobs": [r.view() for r in state.jobs.values()]})
        elif method == "GET" and len(parts) == 3 and parts[:2] == ["admin", "jobs"]:
            wait = float(query.get("wait", ["0"])[0])
            deadline = time.monotonic() + wait
            with state.lock:
                record = state.jobs.get(unquote(parts[2]))
                while record is not None and record.result is None and time.monotonic() < deadline:
                    state.lock.wait(min(0.5, deadline - time.monotonic()))
                view = record.view() if record else None
            self._send(200 if view else 404, view or {"error": f"unknown job {unquote(parts[2])} (`python -m devplane jobs` "
                                                              "lists the ones it has)"})
        elif method == "POST" and len(parts) == 4 and parts[:2] == ["admin", "jobs"] and parts[3] == "cancel":
            state.request_cancel(unquote(parts[2]))
            self._send(200, {"ok": True})
        elif method == "POST" and parts == ["admin", "config"]:
            with state.lock:
                for key in ("long_poll", "extensions", "cancel_via"):
                    if key in body:
                        setattr(state, key, body[key])
            self._send(200, {"ok": True})
        elif method == "POST" and parts == ["admin", "raw_poll"]:
            if not isinstance(body, dict) or ("body" not in body and not isinstance(body.get("body_text"), str)):
                self._send(400, {"error": 'give {"body": <the poll answer>, "trickle_seconds"?: S} or {"body_text": ...}'})
                return
            with state.lock:
                # Known at once (not when the poll is answered): a test may ask for the result right away.
                state.register_raw_jobs(body.get("body"))
                for job_id in body.get("job_ids") or []:
                    state.register_raw_jobs({"jobs": [{"job_id": job_id}]})
                state.raw_polls.append(body)
            self._send(200, {"ok": True})
        elif method == "GET" and parts == ["admin", "heartbeats"]:
            with state.lock:
                self._send(200, {"heartbeats": list(state.heartbeats)})
        elif method == "GET" and parts == ["admin", "stats"]:
            with state.lock:
                self._send(200, {**state.stats, "last_polls": list(state.poll_bodies)})
        elif method == "POST" and parts == ["admin", "faults"]:
            with state.lock:
                endpoint = body.get("endpoint", "")
                if body.get("clear"):
                    state.faults.pop(endpoint, None)
                    state.delays.pop(endpoint, None)
                state.faults.setdefault(endpoint, deque()).extend(int(s) for s in body.get("responses", []))
                if "delay" in body:
                    state.delays[endpoint] = float(body["delay"])
            self._send(200, {"ok": True})
        elif method == "POST" and parts == ["admin", "reset"]:
            with state.lock:
                state.jobs.clear(); state.queue.clear(); state.heartbeats.clear()  # noqa: E702
                state.faults.clear(); state.delays.clear(); state.raw_polls.clear()  # noqa: E702
                for key in state.stats:
                    state.stats[key] = 0
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": "unknown admin endpoint"})


class DevServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], state: State, verbose: bool) -> None:
        super().__init__(address, Handler)
        self.state = state
        self.verbose = verbose
        self.closing = False
        self.connections: set[Any] = set()
        self.connections_lock = threading.Lock()

    def cut_connections(self) -> None:
        """An outage: established keep-alive connections die too, not only the listening socket."""
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class DevControlPlane:
    """The server with its own thread: `start()`, `.url`, `.state`, `stop()`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        cluster_id: str = "dev-cluster",
        cluster_token: str = "dev-cluster-token",
        one_time_tokens: list[str] | None = None,
        long_poll: bool = True,
        extensions: bool = True,
        verbose: bool = False,
    ) -> None:
        self.state = State(cluster_id, cluster_token, one_time_tokens or [], long_poll, extensions)
        self._verbose = verbose
        self._server = DevServer((host, port), self.state, verbose)
        self._address = self._server.server_address[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._address
        return f"http://{host}:{port}"

    def start(self) -> "DevControlPlane":
        self._thread = threading.Thread(target=self._server.serve_forever, name="devplane", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def pause(self) -> None:
        """Go down: the port refuses connections until resume(); the state is kept (an outage, not a loss)."""
        self.stop()

    def resume(self) -> None:
        self._server = DevServer(self._address, self.state, self._verbose)
        self.start()

    def stop(self) -> None:
        self._server.closing = True
        with self.state.lock:
            self.state.lock.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._server.cut_connections()

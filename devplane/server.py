"""The development control plane's server: agent endpoints under /v1/clusters/{id}/, an admin API under /admin/,
an object store for job artifacts under /objects/.

Artifacts (an extension; 404 with extensions off): the agent plans uploads with
  POST /v1/clusters/{c}/jobs/{id}/artifacts  {"files": [{"path", "size_bytes", "sha256", "content_type"?}]}
       -> 200 {"uploads": [{"path", "url", "method": "PUT", "headers": {"Content-Type"}}]} (one per file, in order);
       404 unknown job, 409 job not assigned, 400 a bad field (named). Then PUTs each file to its URL:
  PUT  /objects/{id}/{path}?expires=E&signature=S   the signature binds job, path, expiry, size and sha256;
       200 stored; 403 bad signature, expired or another Content-Type; 411 no Content-Length; 413 over
       max_object_bytes (judged on Content-Length, nothing read); 400 size or sha256 mismatch (nothing kept)
  GET  /objects/{id}/{path}?expires=E&signature=S   the bytes, under a URL from DevControlPlane.artifact_url()

Admin API (no auth; bind it to loopback):
  POST /admin/jobs                 submit a job (job_id optional)          -> {"job_id": ...}
  GET  /admin/jobs/{id}?wait=S     a job's record, waiting up to S seconds for its result
  GET  /admin/jobs                 every job's record
  GET  /admin/jobs/{id}/artifacts  {"job_id", "artifacts": [{path, size_bytes, sha256, content_type, stored,
                                   stored_at, puts}]}: planned and stored uploads
  GET  /admin/jobs/{id}/artifacts/{path}  a stored artifact's bytes (streamed; header X-Radix-Sha256)
  GET  /admin/heartbeats           heartbeats received, oldest first
  GET  /admin/stats                counters (polls, completes by job, ...; artifact_puts and artifact_put_attempts:
                                   {"job/path": n} PUTs stored and PUTs received)
  POST /admin/faults               {"endpoint": "poll|heartbeat|complete|exchange|artifacts|objects", "responses":
                                    [503, ...], "delay": seconds?, "clear": bool?} the next answers of that endpoint;
                                   status 0 drops the connection, 1 answers 200 with a body that is not JSON
                                   ("objects": the next PUTs; their bodies are never stored)
  POST /admin/jobs/{id}/cancel     ask the agent to cancel a job (sent once in a poll answer, and in every logs
                                   answer while it runs)
  POST /admin/config               {"long_poll": bool, "extensions": bool, "cancel_via": "poll"|"logs",
                                    "url_ttl_seconds": int (3600), "max_object_bytes": int|null (null),
                                    "max_complete_bytes": int|null (null: a larger complete is a 413, never read),
                                    "artifact_store": "http://host/prefix?query"|null (uploads go there instead:
                                    {prefix}/{job_id}/{path}?query; null: the plane's own store)}
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
import os
import re
import select
import shutil
import socket
import sys
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .artifacts import (
    CHUNK_BYTES, ArtifactError, BodyCutShort, ObjectStore, SignedUpload, Signer, check_files, check_path,
)


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
    # path -> {"path", "size_bytes", "sha256", "content_type", "stored", "stored_at", "puts"}: the declared file
    # until an upload is stored, then what was stored
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)

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
            "artifacts": [dict(entry) for entry in self.artifacts.values()],
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
        self.stats: dict[str, int] = {"polls": 0, "heartbeats": 0, "completes": 0, "exchanges": 0, "artifacts": 0,
                                      "completes_refused": 0}
        self.poll_bodies: deque[dict[str, Any]] = deque(maxlen=50)
        self.raw_polls: deque[dict[str, Any]] = deque()  # queued by /admin/raw_poll, answered before any job
        self.draining = False
        # Artifacts: uploads planned by the agent, PUT to the plane's own object store under signed URLs.
        self.url_ttl_seconds = 3600  # lifetime of the URLs it hands out; 0 makes them expired at once (tests)
        self.max_object_bytes: int | None = None  # a PUT with a larger Content-Length is a 413
        self.max_complete_bytes: int | None = None  # a larger complete is a 413 (a proxy's limit), never read
        # Another object store to send uploads to (a URL prefix; its query string, if any, goes on every URL): how
        # the tests put the agent's uploads on a server the project did not write. None: the plane's own store.
        self.artifact_store: str | None = None
        self.signer = Signer()
        self.signed_uploads: dict[str, SignedUpload] = {}  # by signature: what each PUT URL was signed for
        self.objects = ObjectStore()
        self.artifact_puts: dict[str, int] = {}  # "job/path" -> PUTs stored
        self.artifact_put_attempts: dict[str, int] = {}  # "job/path" -> PUTs received, whatever their answer

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

    def give_back(self, jobs: list[dict[str, Any]]) -> None:
        """Jobs taken for a poll whose agent is gone (its connection closed before the answer): queued again,
        first in line, as if never taken (call under the lock)."""
        for spec in reversed(jobs):
            record = self.jobs.get(spec.get("job_id"))
            if record is not None and record.state == "assigned":
                record.state, record.assigned_at = "queued", None
                self.queue.appendleft(record.job_id)
        self.lock.notify_all()

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

    def plan_uploads(self, job_id: str, files: list[dict[str, Any]], base_url: str) -> list[dict[str, Any]]:
        """One signed PUT per checked file (call under the lock). The signature binds the declared size and
        sha256 too, so a URL cannot store other bytes than the ones planned."""
        record = self.jobs[job_id]
        expires = int(time.time() + self.url_ttl_seconds)
        if self.artifact_store:
            return self._plan_external(job_id, files, self.artifact_store)
        uploads = []
        for file in files:
            path, size, digest = file["path"], file["size_bytes"], file["sha256"]
            known = record.artifacts.get(path)
            if known and known["stored"] and (known["size_bytes"], known["sha256"]) == (size, digest):
                # Already here (an upload whose answer its agent never saw): the agent need not send it again.
                uploads.append({"path": path, "exists": True})
                continue
            signature = self.signer.put(job_id, path, expires, size, digest)
            self.signed_uploads[signature] = SignedUpload(job_id, path, expires, size, digest, file["content_type"])
            entry = record.artifacts.get(path)
            if entry is None or (entry["size_bytes"], entry["sha256"]) != (size, digest):
                # New, or other bytes than the ones stored: not stored until they come.
                record.artifacts[path] = entry = {**file, "stored": False, "stored_at": None,
                                                  "puts": entry["puts"] if entry else 0}
            entry["content_type"] = file["content_type"]
            uploads.append({"path": path, "url": f"{base_url}{object_path(job_id, path)}?expires={expires}"
                                                 f"&signature={signature}",
                            "method": "PUT", "headers": {"Content-Type": file["content_type"]}})
        return uploads

    def _plan_external(self, job_id: str, files: list[dict[str, Any]], store: str) -> list[dict[str, Any]]:
        """PUT URLs on the configured external store: `{prefix}/{job_id}/{path}` plus the prefix's query."""
        prefix, _, query = store.partition("?")
        record = self.jobs[job_id]
        uploads = []
        for file in files:
            record.artifacts[file["path"]] = {**file, "stored": None, "stored_at": None, "puts": 0, "store": prefix}
            url = f"{prefix.rstrip('/')}{object_path(job_id, file['path']).removeprefix('/objects')}"
            uploads.append({"path": file["path"], "url": f"{url}?{query}" if query else url, "method": "PUT",
                            "headers": {"Content-Type": file["content_type"]}})
        return uploads

    def get_url(self, base_url: str, job_id: str, path: str, ttl_seconds: float | None = None) -> str:
        """A signed GET URL for a stored (or future) artifact: what a control plane hands whoever reads results."""
        expires = int(time.time() + (self.url_ttl_seconds if ttl_seconds is None else ttl_seconds))
        signature = self.signer.get(job_id, path, expires)
        return f"{base_url}{object_path(job_id, path)}?expires={expires}&signature={signature}"

    def count_put(self, key: str, stored: bool) -> None:
        """One PUT received (counted as it arrives, whatever its answer) or one stored (counted once it is)."""
        counter = self.artifact_puts if stored else self.artifact_put_attempts
        with self.lock:
            counter[key] = counter.get(key, 0) + 1

    def stored_artifact(self, job_id: str, path: str) -> dict[str, Any] | None:
        with self.lock:
            record = self.jobs.get(job_id)
            entry = record.artifacts.get(path) if record else None
            return dict(entry) if entry and entry["stored"] else None


def object_path(job_id: str, path: str) -> str:
    """The object's URL path: the job id one segment, the path's segments each percent-encoded, slashes kept."""
    return f"/objects/{quote(job_id, safe='')}/{quote(path, safe='/')}"


CANCEL_RESEND_SECONDS = 5.0
_AGENT_PATH = re.compile(r"^/v1/clusters/(?P<cluster>[^/]+)/(?P<rest>.+)$")
_PER_JOB = re.compile(r"^jobs/(?P<job>[^/]+)/(?P<call>complete|start|logs|artifacts)$")
_OBJECT_PATH = re.compile(r"^/objects/(?P<job>[^/]+)/(?P<path>.+)$")
_HOST = re.compile(r"^(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")
LINGER_SECONDS = 10.0  # how long a refused body is still read (and thrown away) so its sender sees the answer


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

    def _refuse(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        """Answer without taking the body, then close. What the client still sends is read and thrown away for a
        while (a lingering close, as nginx does): closing on unread bytes would reset the connection, and the
        client could lose the answer to the reset. Memory stays bounded: nothing is kept."""
        self.close_connection = True
        self._send(status, {"error": error}, {"Connection": "close", **(headers or {})})
        self._discard_body()

    def _discard_body(self) -> None:
        try:
            left = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return
        deadline = time.monotonic() + LINGER_SECONDS
        try:
            self.connection.settimeout(2.0)
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    return
                left -= len(chunk)
        except (OSError, ValueError):
            pass  # gone, or silent: the connection closes either way

    def _content_length(self) -> int | None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _too_large(self) -> str | None:
        """Why this request's body is refused before it is read (413), or None: a complete past
        max_complete_bytes (a control plane whose proxy refuses large results) or a PUT past max_object_bytes."""
        state = self.server.state
        if state.max_complete_bytes is None and state.max_object_bytes is None:
            return None  # the usual case, on every request: nothing to parse
        length = self._content_length() or 0
        if self.command == "POST" and state.max_complete_bytes is not None and length > state.max_complete_bytes:
            match = _AGENT_PATH.match(urlsplit(self.path).path)
            per_job = _PER_JOB.match(match["rest"]) if match else None
            if per_job and per_job["call"] == "complete":
                return f"request body of {length} bytes is over this server's limit of {state.max_complete_bytes}"
        if self.command == "PUT" and state.max_object_bytes is not None and length > state.max_object_bytes:
            return f"object of {length} bytes is over this store's limit of {state.max_object_bytes}"
        return None

    def handle_expect_100(self) -> bool:
        """A client that asks before sending (`Expect: 100-continue`, curl's habit for large bodies) learns of a
        size refusal before it sends anything; nothing to drain then."""
        refusal = self._too_large()
        if refusal is None:
            return super().handle_expect_100()
        self.close_connection = True
        if self.command == "POST":
            with self.server.state.lock:
                self.server.state.stats["completes_refused"] += 1
        else:
            self._count_object_attempt()
        self._send(413, {"error": refusal}, {"Connection": "close"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        if not _OBJECT_PATH.match(urlsplit(self.path).path):
            self._refuse(404, "not found")
            return
        self._put_object()

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        refusal = self._too_large() if method == "POST" else None
        if refusal is not None:
            with self.server.state.lock:
                self.server.state.stats["completes_refused"] += 1
            self._refuse(413, refusal)
            return
        if method == "GET" and _OBJECT_PATH.match(url.path):
            self._get_object()
            return
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
        per_job = _PER_JOB.match(rest)
        if per_job:
            endpoint = per_job["call"]
            if endpoint in ("start", "logs", "artifacts") and not state.extensions:
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
        elif endpoint == "artifacts":
            self._artifacts(unquote(per_job["job"]), body)
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
                if self._peer_gone():
                    return  # its agent died mid-poll: nothing is taken for it
                jobs = state.take(max_jobs)
                cancels = state.take_cancellations(running)
            if jobs and self._peer_gone():
                state.give_back(jobs)  # taken in the same instant the agent went: not lost to a dead connection
                return
        headers = {"X-Radix-Long-Poll": "1"} if state.long_poll else None
        answer: dict[str, Any] = {"jobs": jobs}
        if cancels:
            answer["cancel_job_ids"] = cancels
        try:
            self._send(200, answer, headers)
        except OSError:
            with state.lock:
                state.give_back(jobs)
            raise

    def _peer_gone(self) -> bool:
        """The agent closed its end (killed, or it gave up on the poll): a readable socket with nothing to read."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

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

    # --- artifacts: planning, and the object store --------------------------------------------------------

    def _base_url(self) -> str:
        """Where this request came in (its Host header), so the URLs handed out reach this server the same way;
        the listening address when the header is missing or not a plain host[:port]."""
        host = self.headers.get("Host", "")
        if not _HOST.match(host):
            address, port = self.server.server_address[:2]
            host = f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"
        return f"http://{host}"

    def _artifacts(self, job_id: str, body: Any) -> None:
        state = self.server.state
        with state.lock:
            state.stats["artifacts"] += 1
            record = state.jobs.get(job_id)
            if record is None:
                self._send(404, {"error": f"unknown job {job_id}"})
                return
            if record.state != "assigned":
                self._send(409, {"error": f"job {job_id} is {record.state}: artifacts are taken only while it is "
                                          "assigned"})
                return
            try:
                files = check_files(body)
            except ArtifactError as exc:
                self._send(400, {"error": str(exc)})
                return
            uploads = state.plan_uploads(job_id, files, self._base_url())
        self._send(200, {"uploads": uploads})

    def _object_target(self) -> tuple[str, str, dict[str, list[str]]]:
        """(job id, path, query) of an /objects/ URL; ArtifactError when the path is one no upload could have:
        absolute, '..', empty segments, NUL (percent-encoded or not: checked after decoding)."""
        url = urlsplit(self.path)
        match = _OBJECT_PATH.match(url.path)
        assert match is not None  # routed here because it matched
        job_id, path = unquote(match["job"]), unquote(match["path"])
        check_path(path, "path")
        return job_id, path, parse_qs(url.query)

    def _signed(self, query: dict[str, list[str]]) -> tuple[int, str]:
        """(expires, signature) from the query, or ArtifactError."""
        try:
            expires, signature = int(query["expires"][0]), query["signature"][0]
        except (KeyError, IndexError, ValueError):
            raise ArtifactError("the URL needs an integer expires and a signature") from None
        return expires, signature

    def _count_object_attempt(self) -> None:
        match = _OBJECT_PATH.match(urlsplit(self.path).path)
        if match:
            self.server.state.count_put(f"{unquote(match['job'])}/{unquote(match['path'])}", stored=False)

    def _put_object(self) -> None:
        """Store one planned upload. Everything that can be judged before a byte of the body is read is judged
        first (size limit, path, signature binding job, path, expiry, size and sha256, Content-Type, declared
        size); then the body is streamed to disk and its sha256 checked."""
        state = self.server.state
        self._count_object_attempt()
        delay = state.delays.get("objects")
        if delay:
            time.sleep(delay)
        fault = state.next_fault("objects")
        if fault is not None:
            self._object_fault(fault)
            return
        length = self._content_length()
        if length is None:
            self._refuse(411, "a PUT needs a Content-Length (chunked bodies are not taken)")
            return
        refusal = self._too_large()  # first, like the proxy in front of a real store
        if refusal is not None:
            self._refuse(413, refusal)
            return
        try:
            job_id, path, query = self._object_target()
            expires, signature = self._signed(query)
        except ArtifactError as exc:
            self._refuse(400, str(exc))
            return
        with state.lock:
            signed = state.signed_uploads.get(signature)
        if (signed is None or (signed.job_id, signed.path, signed.expires) != (job_id, path, expires)
                or not state.signer.same(signature, state.signer.put(job_id, path, expires, signed.size_bytes,
                                                                     signed.sha256))):
            self._refuse(403, "signature does not match: not a URL this server handed out for this object")
            return
        if time.time() >= expires:
            self._refuse(403, f"URL expired at {expires} (unix time): plan the upload again")
            return
        if self.headers.get("Content-Type") != signed.content_type:
            self._refuse(403, f"Content-Type {self.headers.get('Content-Type')!r} is not the signed "
                              f"{signed.content_type!r}: send the headers the upload plan gave")
            return
        if length != signed.size_bytes:
            self._refuse(400, f"size mismatch: Content-Length {length}, declared size_bytes {signed.size_bytes}")
            return
        self._store(signed)

    def _store(self, signed: SignedUpload) -> None:
        state = self.server.state
        self.connection.settimeout(60.0)  # a sender silent for a minute has gone: never hold a thread forever
        try:
            received, digest = state.objects.receive(self.rfile, signed.size_bytes)
        except BodyCutShort as exc:
            self._refuse(400, str(exc))
            return
        except OSError as exc:  # the store's disk: full, gone
            self._refuse(500, f"cannot store the object: {exc}")
            return
        finally:
            self.connection.settimeout(None)
        if digest != signed.sha256:
            state.objects.discard(received)
            self._send(400, {"error": f"sha256 mismatch: declared {signed.sha256}, received {digest}"})
            return
        try:
            state.objects.commit(received, signed.job_id, signed.path)
        except OSError as exc:  # a reset cleared the store under this upload
            state.objects.discard(received)
            self._send(500, {"error": f"cannot store the object: {exc}"})
            return
        with state.lock:
            record = state.jobs.get(signed.job_id)
            if record is not None:
                entry = record.artifacts.get(signed.path) or {"puts": 0}
                record.artifacts[signed.path] = {
                    **entry, "path": signed.path, "size_bytes": signed.size_bytes, "sha256": signed.sha256,
                    "content_type": signed.content_type, "stored": True, "stored_at": time.time(),
                    "puts": entry["puts"] + 1,
                }
        state.count_put(f"{signed.job_id}/{signed.path}", stored=True)
        self._send(200, {"ok": True, "path": signed.path, "size_bytes": signed.size_bytes, "sha256": signed.sha256})

    def _object_fault(self, fault: int) -> None:
        """An injected answer to a PUT (`/admin/faults` endpoint "objects"); the body is never stored."""
        state = self.server.state
        with state.lock:
            state.stats["faults_objects"] = state.stats.get("faults_objects", 0) + 1
        if fault == 0:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif fault == 1:
            self.close_connection = True
            data = b"<html>proxy error</html>"
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
            self._discard_body()
        else:
            self._refuse(fault, f"injected fault {fault}", {"Retry-After": "0"} if fault in (429, 503) else None)

    def _get_object(self) -> None:
        """A stored object under a signed GET URL (`DevControlPlane.artifact_url`)."""
        state = self.server.state
        try:
            job_id, path, query = self._object_target()
            expires, signature = self._signed(query)
        except ArtifactError as exc:
            self._send(400, {"error": str(exc)})
            return
        if not state.signer.same(signature, state.signer.get(job_id, path, expires)):
            self._send(403, {"error": "signature does not match: not a URL this server handed out for this object"})
            return
        if time.time() >= expires:
            self._send(403, {"error": f"URL expired at {expires} (unix time)"})
            return
        self._send_object(job_id, path)

    def _send_object(self, job_id: str, path: str) -> None:
        """The stored bytes, streamed from disk in pieces."""
        state = self.server.state
        entry = state.stored_artifact(job_id, path)
        try:
            source = open(state.objects.location(job_id, path), "rb") if entry else None  # noqa: SIM115
        except FileNotFoundError:  # cleared by a reset since
            source = None
        if source is None:
            self._send(404, {"error": f"job {job_id} has no stored artifact {path!r} (`python -m devplane artifacts "
                                      f"{job_id}` lists what it has)"})
            return
        with source:
            size = os.fstat(source.fileno()).st_size
            try:
                self.send_response(200)
                self.send_header("Content-Type", entry["content_type"])
                self.send_header("Content-Length", str(size))
                self.send_header("X-Radix-Sha256", entry["sha256"])
                self.end_headers()
                shutil.copyfileobj(source, self.wfile, CHUNK_BYTES)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

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
        elif method == "GET" and len(parts) == 4 and parts[:2] == ["admin", "jobs"] and parts[3] == "artifacts":
            job_id = unquote(parts[2])
            with state.lock:
                record = state.jobs.get(job_id)
                listing = [dict(entry) for entry in record.artifacts.values()] if record else None
            if listing is None:
                self._send(404, {"error": f"unknown job {job_id} (`python -m devplane jobs` lists the ones it has)"})
            else:
                self._send(200, {"job_id": job_id, "artifacts": listing})
        elif method == "GET" and len(parts) >= 5 and parts[:2] == ["admin", "jobs"] and parts[3] == "artifacts":
            job_id = unquote(parts[2])
            with state.lock:
                known = job_id in state.jobs
            if not known:
                self._send(404, {"error": f"unknown job {job_id} (`python -m devplane jobs` lists the ones it has)"})
            else:
                self._send_object(job_id, unquote("/".join(parts[4:])))
        elif method == "POST" and len(parts) == 4 and parts[:2] == ["admin", "jobs"] and parts[3] == "cancel":
            state.request_cancel(unquote(parts[2]))
            self._send(200, {"ok": True})
        elif method == "POST" and parts == ["admin", "config"]:
            try:
                limits = _limits(body)
            except ValueError as exc:
                self._send(400, {"error": str(exc)})
                return
            store = body.get("artifact_store", state.artifact_store) if isinstance(body, dict) else None
            if store is not None and not (isinstance(store, str) and store.startswith(("http://", "https://"))):
                self._send(400, {"error": "artifact_store: an http(s) URL prefix is needed (or null)"})
                return
            with state.lock:
                state.artifact_store = store
                for key in ("long_poll", "extensions", "cancel_via"):
                    if key in body:
                        setattr(state, key, body[key])
                for key, value in limits.items():
                    setattr(state, key, value)
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
                self._send(200, {**state.stats, "last_polls": list(state.poll_bodies),
                                 "artifact_puts": dict(state.artifact_puts),
                                 "artifact_put_attempts": dict(state.artifact_put_attempts)})
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
                state.signed_uploads.clear(); state.artifact_puts.clear()  # noqa: E702
                state.artifact_put_attempts.clear()
                state.objects.clear()
                for key in state.stats:
                    state.stats[key] = 0
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": "unknown admin endpoint"})


def _limits(body: Any) -> dict[str, Any]:
    """The artifact settings of an /admin/config body, checked: max_object_bytes and max_complete_bytes (an int
    >= 0, or null for no limit) and url_ttl_seconds (an int >= 0; 0 hands out URLs already expired)."""
    limits: dict[str, Any] = {}
    for key in ("max_object_bytes", "max_complete_bytes", "url_ttl_seconds"):
        if not isinstance(body, dict) or key not in body:
            continue
        value = body[key]
        if value is None and key != "url_ttl_seconds":
            limits[key] = None
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            limits[key] = value
        else:
            raise ValueError(f"{key}: a non-negative integer is needed" + ("" if key == "url_ttl_seconds" else
                                                                            " (or null: no limit)"))
    return limits


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

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that went away mid-request (an agent killed during its long poll, `docker rm -f`) is routine: one
        # line when verbose, never a traceback. Anything else is a bug worth the traceback.
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)):
            if self.verbose:
                print(f"devplane: connection from {client_address[0]} closed mid-request: {error}", file=sys.stderr)
            return
        super().handle_error(request, client_address)

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
    """The server with its own thread: `start()`, `.url`, `.state`, `stop()` (which also removes the object
    store's directory), `artifact_url()`."""

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

    def artifact_url(self, job_id: str, path: str, ttl_seconds: float | None = None) -> str:
        """A signed GET URL for an artifact (default lifetime: the plane's url_ttl_seconds)."""
        return self.state.get_url(self.url, job_id, path, ttl_seconds)

    def artifact_file(self, job_id: str, path: str) -> Path | None:
        """Where a stored artifact's bytes lie on disk (for tests), or None if it was never stored."""
        if self.state.stored_artifact(job_id, path) is None:
            return None
        return self.state.objects.location(job_id, path)

    def pause(self) -> None:
        """Go down: the port refuses connections until resume(); the state is kept (an outage, not a loss), stored
        artifacts included."""
        self._halt()

    def resume(self) -> None:
        self._server = DevServer(self._address, self.state, self._verbose)
        self.start()

    def stop(self) -> None:
        self._halt()
        self.state.objects.remove()

    def _halt(self) -> None:
        self._server.closing = True
        with self.state.lock:
            self.state.lock.notify_all()
        self._server.shutdown()
        self._server.server_close()
        self._server.cut_connections()

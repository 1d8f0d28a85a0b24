"""A finished job's artifacts: the workspace files its globs match, uploaded where the control plane says.

Collecting reads a tree the job controlled, as root: every directory is opened relative to its parent with
O_NOFOLLOW, a symbolic link is never followed (one that matches is listed as skipped, not uploaded), anything but a
regular file is skipped (a skip fails no job: it is no file to upload), and the walk is bounded (depth, entries, files, bytes). Each file's size and SHA-256 are taken from
the same descriptor the upload later reads, so what is listed is what is sent.

Progress is spooled in the job's directory (`artifacts.json`, the agent's, never the workspace's): an agent killed
mid-upload is followed by one that adopts the exited container, collects again and uploads only what is not
recorded as done with the same size and digest. A file the store refuses with a 4xx is reported and not retried;
network errors and 5xx are retried with backoff (--transfer-retries).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mimetypes
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ControlPlaneError, ExtensionUnsupported
from ..files import read_json, write_json_atomic
from ..http_transport import LazyClient, request_deadline
from ..models import ArtifactError, ArtifactRecord, Completion, FailureReason, JobStatus
from ..redaction import Redactor
from .urls import redact_url, url_secrets

__all__ = ["ArtifactPlanner", "ArtifactUpload", "Collected", "collect_artifacts"]

log = logging.getLogger(__name__)

MAX_DEPTH = 64
MAX_ENTRIES = 100_000  # directory entries looked at, whatever they are
MAX_REPORTED = 100  # errors and skips listed in a result, then one line counting the rest
# Headers that frame the request are the agent's: a plan's would conflict (two lengths is request smuggling).
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "expect", "te", "upgrade"})
STALL_SECONDS = 60.0  # a transfer that moves under STALL_BYTES (downloads; uploads: a 1 MiB piece) in this long is cut off
STALL_BYTES = 64 * 1024
PLAN_BATCH = 100  # files per planning request: presigned URLs run to ~1.5 KB each, answers stay well under 1 MiB
PARALLEL_UPLOADS = 4
PROGRESS_FILE = "artifacts.json"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class ArtifactPlanner(Protocol):
    """The control plane's half: where each file goes (ControlPlaneClient.plan_artifacts)."""

    def plan_artifacts(self, job_id: str, files: list[dict[str, Any]], *, cancel: threading.Event) -> list[dict[str, Any]]: ...


@dataclass
class Collected:
    path: str
    size_bytes: int
    sha256: str
    content_type: str

    def wire(self) -> dict[str, Any]:
        return {"path": self.path, "size_bytes": self.size_bytes, "sha256": self.sha256, "content_type": self.content_type}


@dataclass
class _Limits:
    files: int
    total_bytes: int
    file_bytes: int


def collect_artifacts(workspace: Path, patterns: list[str], *, max_files: int, max_bytes: int,
                      max_file_bytes: int, exclude: frozenset[str] = frozenset(),
                      ) -> tuple[list[Collected], list[ArtifactError], list[ArtifactError]]:
    """The regular files under `workspace` that match `patterns` (globs relative to /workspace, `**` for any
    depth), with their sizes and digests; the files that could not be taken (limits, unreadable: `errors`); and
    what matched but is no file to upload (links, FIFOs, devices, names that are not UTF-8, `exclude`d paths such
    as cached inputs, whose host side is only an empty mount target: `skipped`, which fails no job).

    Descriptors stay bounded whatever the tree: a directory is opened (component by component, O_NOFOLLOW) only
    when its turn comes, and closed before the next; the pending ones wait as names."""
    limits = _Limits(max_files, max_bytes, max_file_bytes)
    found: list[Collected] = []
    errors: list[ArtifactError] = []
    skipped: list[ArtifactError] = []
    total = 0
    seen = 0
    pending: list[tuple[str, int]] = [("", 0)]  # (directory path relative to the workspace, depth)
    while pending:
        prefix, depth = pending.pop()
        try:
            fd = open_dir_in(workspace, prefix)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):  # gone or swapped for a link: nothing
                errors.append(ArtifactError(path=prefix or ".", error=f"cannot be opened: {exc.strerror or exc}"))
            continue
        try:
            names = sorted(os.listdir(fd))
        except OSError as exc:
            os.close(fd)
            errors.append(ArtifactError(path=prefix or ".", error=f"cannot be listed: {exc.strerror or exc}"))
            continue
        try:
            for name in names:
                seen += 1
                if seen > MAX_ENTRIES:
                    errors.append(ArtifactError(path=prefix or ".", error=f"more than {MAX_ENTRIES} entries in "
                                                "the workspace: the rest was not searched"))
                    return found, _capped(errors), _capped(skipped)
                relative = f"{prefix}{name}"
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if depth + 1 >= MAX_DEPTH:
                        if _could_match(relative, patterns):
                            errors.append(ArtifactError(path=relative, error=f"deeper than {MAX_DEPTH} levels: not searched"))
                    else:
                        pending.append((relative + "/", depth + 1))
                    continue
                if not _globmatch(relative, patterns):
                    continue
                problem = _not_a_file(relative, st, exclude)
                if problem:
                    skipped.append(ArtifactError(path=_printable(relative), error=problem))
                    continue
                problem = _over_limits(st.st_size, len(found), total, limits)
                if problem:
                    errors.append(ArtifactError(path=relative, error=problem))
                    continue
                item = _digest(fd, name, relative)
                if isinstance(item, ArtifactError):
                    errors.append(item)
                    continue
                found.append(item)
                total += item.size_bytes
        finally:
            os.close(fd)
    return found, _capped(errors), _capped(skipped)


def _not_a_file(relative: str, st: os.stat_result, exclude: frozenset[str]) -> str | None:
    if stat.S_ISLNK(st.st_mode):
        return "skipped: a symbolic link (links are never followed)"
    if not stat.S_ISREG(st.st_mode):
        return "skipped: not a regular file"
    if relative in exclude:
        return "skipped: a cached input (mounted read-only into the job; the workspace holds only its mount point)"
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "skipped: the name is not UTF-8, which no control plane can take as a path"
    if any(ord(c) < 0x20 or c == "\x7f" for c in relative):
        return "skipped: the name holds a control character"
    return None


def _printable(relative: str) -> str:
    """The name as bytes, escaped: `bad\\xffname` for a name that is not UTF-8."""
    return os.fsencode(relative).decode("ascii", "backslashreplace")


def _capped(items: list[ArtifactError]) -> list[ArtifactError]:
    """At most MAX_REPORTED entries, then one that counts the rest: a result must stay small."""
    if len(items) <= MAX_REPORTED:
        return items
    return items[:MAX_REPORTED] + [ArtifactError(path="...", error=f"and {len(items) - MAX_REPORTED} more")]


def open_dir_in(workspace: Path, relative: str) -> int:
    """A descriptor of the directory `relative` (ending in "/" or empty) under `workspace`, each component opened
    without following a link."""
    fd = os.open(workspace, _DIR_FLAGS)
    try:
        for part in [p for p in relative.split("/") if p]:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _globmatch(path: str, patterns: list[str]) -> bool:
    """`**` crosses directories, `*` matches dot files too (wcmatch's GLOBSTAR | DOTGLOB). Imported on first use:
    an agent whose jobs declare no artifacts never loads it."""
    from wcmatch import glob as wcglob

    return bool(wcglob.globmatch(path, patterns, flags=wcglob.GLOBSTAR | wcglob.DOTGLOB))


def _could_match(directory: str, patterns: list[str]) -> bool:
    return any(pattern.startswith("**") or pattern.startswith(directory.split("/")[0]) for pattern in patterns)


def _over_limits(size: int, count: int, total: int, limits: _Limits) -> str | None:
    if size > limits.file_bytes:
        return f"{size} bytes, over the limit of {limits.file_bytes} per file (--max-artifact-file-bytes)"
    if count + 1 > limits.files:
        return f"more than {limits.files} files (--max-artifact-files)"
    if total + size > limits.total_bytes:
        return f"the job's artifacts would pass {limits.total_bytes} bytes (--max-artifact-bytes)"
    return None


def _digest(dir_fd: int, name: str, relative: str) -> Collected | ArtifactError:
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        return ArtifactError(path=relative, error=f"cannot be opened: {exc.strerror or exc}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ArtifactError(path=relative, error="not a regular file: not uploaded")
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, 4 * 1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    except OSError as exc:
        return ArtifactError(path=relative, error=f"cannot be read: {exc.strerror or exc}")
    finally:
        os.close(fd)
    content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return Collected(relative, size, digest.hexdigest(), content_type)


def open_in(workspace: Path, relative: str) -> int:
    """A read descriptor for `relative` under `workspace`, each component opened without following a link."""
    parts = relative.split("/")
    fd = os.open(workspace, _DIR_FLAGS)
    try:
        for part in parts[:-1]:
            next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = next_fd
        file_fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(file_fd).st_mode):
        os.close(file_fd)
        raise OSError(f"{relative} is not a regular file")
    return file_fd


class _Retry(Exception):
    pass


class ArtifactUpload:
    """Uploads one job's artifacts and records them in its completion. One per agent; thread-safe.

    Bounds: every attempt has an overall deadline (`attempt_timeout`, whatever the store trickles), a store that
    takes less than STALL_BYTES in STALL_SECONDS is cut off and tried again, an answer's body is never read (only
    its status), and `abandon` (the agent exiting) ends the uploads in flight: the next agent resumes them."""

    def __init__(self, planner: ArtifactPlanner | None, *, retries: int = 5, max_files: int = 1000,
                 max_bytes: int = 20 * 1024**3, max_file_bytes: int = 5 * 1024**3, attempt_timeout: float = 3600.0,
                 backoff_max: float = 30.0, transport: httpx.BaseTransport | None = None,
                 clock: Clock = SYSTEM_CLOCK, abandon: threading.Event | None = None) -> None:
        self._planner = planner
        self._clock = clock
        self._retries = retries
        self._limits = (max_files, max_bytes, max_file_bytes)
        self._backoff_max = backoff_max
        self._attempt_timeout = attempt_timeout
        self.abandon = abandon or threading.Event()
        # A store that takes no 1 MiB piece (the transport writes in such pieces) in STALL_SECONDS has stalled.
        self._client = LazyClient(transport, timeout=httpx.Timeout(300.0, connect=30.0, write=STALL_SECONDS),
                                  headers={"User-Agent": "radix-cluster-agent"}, follow_redirects=False)

    @property
    def _http(self) -> httpx.Client:
        return self._client.get()

    def close(self) -> None:
        self._client.close()

    def finish(self, job_id: str, patterns: list[str], workspace: Path, job_dir: Path,
               completion: Completion, *, exclude: frozenset[str] = frozenset(),
               secrets: Redactor | None = None) -> Completion:
        """`completion` with `artifacts` (uploaded, this run or an earlier one) and `artifact_errors`; a job that
        succeeded but whose artifacts did not all go up is failed/artifact_upload_failed (a job that failed keeps
        its own reason). `exclude`: workspace paths that are no artifact (the cached inputs' mount points).
        `secrets`: the job's secret_env values; a file whose path holds one is not uploaded (its name would reach
        the control plane's plan, the object's URL and the result) and is listed with that part redacted."""
        began = self._clock.monotonic()
        max_files, max_bytes, max_file_bytes = self._limits
        found, errors, skipped = collect_artifacts(workspace, patterns, max_files=max_files, max_bytes=max_bytes,
                                                   max_file_bytes=max_file_bytes, exclude=exclude)
        if secrets is not None and len(secrets):
            hidden = [item for item in found if secrets.redact(item.path) != item.path]
            found = [item for item in found if item not in hidden]
            skipped += [ArtifactError(path=secrets.redact(item.path), error="skipped: its path holds one of the job's "
                                      "secret_env values; not uploaded") for item in hidden]
        matched = [*found, *errors, *skipped]
        for pattern in patterns:
            if not any(_globmatch(entry.path, [pattern]) for entry in matched):
                # A typo in a glob must not pass unseen; it fails no job (a run may rightly produce nothing).
                skipped.append(ArtifactError(path=pattern, error="skipped: the pattern matched no file"))
        if secrets is not None and len(secrets):
            errors = [e.model_copy(update={"path": secrets.redact(e.path)}) for e in errors]
            skipped = [e.model_copy(update={"path": secrets.redact(e.path)}) for e in skipped]
        progress = _Progress(job_dir / PROGRESS_FILE)
        done = [item for item in found if progress.done(item)]
        pending = [item for item in found if not progress.done(item)]
        if done:
            log.info("job %s: %d artifact(s) were uploaded by an earlier agent; not sent again", job_id, len(done))
        if pending and self._planner is None:
            # run-job: no control plane to ask where files go. Not the job's failure: listed, the job stands.
            skipped += [ArtifactError(path=item.path, error="skipped: run-job has no control plane to upload to")
                        for item in pending]
        elif pending:
            errors += self._upload(job_id, pending, workspace, progress)
        uploaded = [ArtifactRecord(path=item.path, size_bytes=item.size_bytes, sha256=item.sha256)
                    for item in found if progress.done(item)]
        log.info("job %s: %d artifact(s) uploaded, %d not", job_id, len(uploaded), len(errors),
                 extra={"job_id": job_id, "event": "artifacts"})
        metrics = completion.metrics.model_copy(update={
            "artifact_seconds": round(self._clock.monotonic() - began, 3),
            "artifact_bytes": sum(item.size_bytes for item in uploaded)})
        errors = _capped(errors)
        update: dict[str, Any] = {"artifacts": uploaded, "artifact_errors": _capped(errors + skipped) or None,
                                  "metrics": metrics}
        if errors and completion.status is JobStatus.SUCCEEDED:
            first = "; ".join(f"{e.path}: {e.error}" for e in errors[:3])
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            update |= {"status": JobStatus.FAILED, "failure_reason": FailureReason.ARTIFACT_UPLOAD_FAILED,
                       "error_message": f"{len(errors)} artifact(s) not uploaded: {first}{more}"}
        return completion.model_copy(update=update)

    def upload_one(self, job_id: str, directory: Path, relative: str, job_dir: Path) -> ArtifactRecord | ArtifactError:
        """Upload one file the agent wrote itself (`directory`/`relative`), recorded in the job's progress."""
        found, errors, _ = collect_artifacts(directory, [relative], max_files=1, max_bytes=2**63, max_file_bytes=2**63)
        if errors or not found:
            return errors[0] if errors else ArtifactError(path=relative, error="not found")
        progress = _Progress(job_dir / PROGRESS_FILE)
        item = found[0]
        if not progress.done(item):
            failed = self._upload(job_id, [item], directory, progress)
            if failed:
                return failed[0]
        return ArtifactRecord(path=item.path, size_bytes=item.size_bytes, sha256=item.sha256)

    def _upload(self, job_id: str, pending: list[Collected], workspace: Path, progress: _Progress) -> list[ArtifactError]:
        if self._planner is None:
            return [ArtifactError(path=item.path, error="no control plane to upload to (run-job)") for item in pending]
        errors: list[ArtifactError] = []
        work: list[tuple[Collected, dict[str, Any]]] = []
        for first in range(0, len(pending), PLAN_BATCH):
            batch = pending[first:first + PLAN_BATCH]
            errors += self._plan(job_id, batch, progress, work)
        queue = list(work)
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    item, plan = queue.pop(0)
                outcome = self._put(item, plan, workspace, progress)
                if outcome is not None:
                    with lock:
                        errors.append(outcome)

        # Daemon threads, not a pool: an exiting agent must not wait for uploads (the next agent resumes them).
        threads = [threading.Thread(target=worker, name=f"upload-{job_id}", daemon=True)
                   for _ in range(min(PARALLEL_UPLOADS, len(work)))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return errors

    def _plan(self, job_id: str, batch: list[Collected], progress: _Progress,
              work: list[tuple[Collected, dict[str, Any]]]) -> list[ArtifactError]:
        assert self._planner is not None
        try:
            plans = self._planner.plan_artifacts(job_id, [item.wire() for item in batch], cancel=self.abandon)
        except ExtensionUnsupported:
            reason = "the control plane has no artifacts endpoint (HTTP 404); it cannot take artifacts"
            return [ArtifactError(path=item.path, error=reason) for item in batch]
        except ControlPlaneError as exc:
            reason = f"the control plane did not say where to upload it: {exc}"
            return [ArtifactError(path=item.path, error=reason) for item in batch]
        by_path: dict[str, dict[str, Any]] = {}
        for plan in plans:
            if isinstance(plan.get("path"), str):
                by_path.setdefault(plan["path"], plan)
        errors = []
        for item in batch:
            plan = by_path.get(item.path)
            if plan is not None and plan.get("exists") is True:
                progress.record(item)  # the store has these bytes already (an upload whose answer was lost)
                continue
            problem = _plan_problem(plan)
            if problem:
                errors.append(ArtifactError(path=item.path, error=problem))
            else:
                work.append((item, plan))  # type: ignore[arg-type]
        return errors

    def _put(self, item: Collected, plan: dict[str, Any], workspace: Path, progress: _Progress) -> ArtifactError | None:
        url = plan["url"]
        headers = {str(k): str(v) for k, v in (plan.get("headers") or {}).items()
                   if str(k).lower() not in FRAMING_HEADERS}
        # Header values may be credentials (x-amz-security-token, Authorization): never quoted in a message.
        redactor = Redactor([*url_secrets(url), *headers.values()])
        headers["Content-Length"] = str(item.size_bytes)
        method = str(plan.get("method") or "PUT").upper()

        def once() -> None:
            if self.abandon.is_set():
                raise _Final("stopped: the agent is exiting (the next agent uploads it)")
            try:
                fd = open_in(workspace, item.path)
            except OSError as exc:
                raise _Final(f"cannot be opened: {exc.strerror or exc}") from None
            with os.fdopen(fd, "rb") as body, request_deadline(self._attempt_timeout):
                try:
                    # Streamed, and only the status read: a store's answer body can be anything, of any size.
                    with self._http.stream(method, url, content=_Body(body, item.size_bytes, self.abandon, self._clock),
                                           headers=headers) as response:
                        status, phrase = response.status_code, response.reason_phrase
                except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                    raise _Retry(redactor.redact(f"{type(exc).__name__}: {exc}")) from None
                except _Stalled as exc:
                    raise _Retry(str(exc)) from None
                except (httpx.HTTPError, ValueError, UnicodeError) as exc:
                    # A request no retry can send (an invalid header or URL from the plan): final, and redacted.
                    raise _Final(redactor.redact(f"cannot be sent: {type(exc).__name__}: {exc}")[:300]) from None
            reason = f"HTTP {status} {phrase}".strip()
            if status in (408, 429) or status >= 500:
                raise _Retry(reason)
            if not 200 <= status < 300:
                raise _Final(f"refused by the store ({reason}); not retried")

        retrying = Retrying(
            stop=stop_after_attempt(self._retries + 1), wait=wait_exponential(multiplier=0.5, max=self._backoff_max),
            retry=retry_if_exception(lambda exc: isinstance(exc, _Retry) and not self.abandon.is_set()), reraise=True,
            sleep=lambda seconds: self.abandon.wait(seconds),
        )
        try:
            retrying(once)
        except _Retry as exc:
            return ArtifactError(path=item.path, error=f"upload to {redact_url(url)} failed: {exc} (gave up after "
                                 f"{self._retries + 1} attempts)")
        except _Final as exc:
            return ArtifactError(path=item.path, error=f"upload to {redact_url(url)}: {exc}")
        except Exception as exc:  # noqa: BLE001 - one file's surprise must not lose the job's result
            log.exception("artifact %s: unexpected upload error", item.path)
            return ArtifactError(path=item.path, error=f"upload to {redact_url(url)}: unexpected error "
                                 f"{type(exc).__name__}")
        progress.record(item)
        return None


class _Final(Exception):
    pass


class _Stalled(Exception):
    pass


class _Body:
    """The file's bytes, at most `size` of them (the digest was taken of exactly these), in 1 MiB chunks. Ends the
    upload when the agent exits, or when the store took under STALL_BYTES in the last STALL_SECONDS."""

    def __init__(self, file: Any, size: int, abandon: threading.Event, clock: Clock) -> None:
        self._file = file
        self._left = size
        self._abandon = abandon
        self._clock = clock

    def __iter__(self):  # type: ignore[no-untyped-def]
        window_start, window_bytes = self._clock.monotonic(), 0
        while self._left > 0:
            if self._abandon.is_set():
                raise _Stalled("stopped: the agent is exiting")
            now = self._clock.monotonic()
            if now - window_start >= STALL_SECONDS:
                if window_bytes < STALL_BYTES:
                    raise _Stalled(f"the store took under {STALL_BYTES} bytes in {STALL_SECONDS:g} s")
                window_start, window_bytes = now, 0
            chunk = self._file.read(min(1024 * 1024, self._left))
            if not chunk:
                return
            self._left -= len(chunk)
            window_bytes += len(chunk)
            yield chunk


def _plan_problem(plan: dict[str, Any] | None) -> str | None:
    if plan is None:
        return "the control plane gave no upload URL for it"
    url = plan.get("url")
    if not isinstance(url, str) or not url.lower().startswith(("http://", "https://")):
        return "the control plane's upload URL is not an http(s) URL"
    try:
        httpx.URL(url)
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return "the control plane's upload URL cannot be parsed"
    method = plan.get("method", "PUT")
    if not isinstance(method, str) or method.upper() not in ("PUT", "POST"):
        return "the control plane asked for an upload method other than PUT or POST"
    headers = plan.get("headers") or {}
    if not isinstance(headers, dict) or not all(
            isinstance(k, str) and isinstance(v, (str, int)) and str(v).isascii() and k.isascii()
            for k, v in headers.items()):
        return "the control plane's upload headers are not a map of ASCII strings"
    return None


class _Progress:
    """artifacts.json in the job's directory: {path: {size_bytes, sha256}} of what is uploaded."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        data = read_json(path)
        self._done: dict[str, Any] = data if isinstance(data, dict) else {}

    def done(self, item: Collected) -> bool:
        record = self._done.get(item.path)
        return isinstance(record, dict) and record.get("sha256") == item.sha256 and record.get("size_bytes") == item.size_bytes

    def record(self, item: Collected) -> None:
        with self._lock:
            self._done[item.path] = {"size_bytes": item.size_bytes, "sha256": item.sha256}
            try:
                write_json_atomic(self._path, self._done, mode=0o600)
            except OSError as exc:
                log.warning("artifact progress not recorded in %s (%s): a restart would upload %s again",
                            self._path, exc, item.path)

"""The dev control plane's artifact rules and object store: what a path may be, what a signature binds, files on disk.

Kept apart from the HTTP handler so the rules read in one place. The store names each object by a hash of
(job id, path): nothing a request sends ever becomes part of a filesystem path, so no request can reach outside
the store's directory, whatever it encodes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

MAX_PATH_BYTES = 1024  # S3's key limit: a path any object store would take
CHUNK_BYTES = 1 << 20  # bodies move in 1 MiB pieces: a 1 GiB artifact never sits in memory
DEFAULT_CONTENT_TYPE = "application/octet-stream"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_TYPE = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,254}$")  # one printable header value, at most 255


class ArtifactError(ValueError):
    """A request the plane refuses; the message names the field (`files[2].sha256: ...`)."""


@dataclass(frozen=True)
class SignedUpload:
    """What one PUT URL was signed for: the PUT must match all of it."""

    job_id: str
    path: str
    expires: int
    size_bytes: int
    sha256: str
    content_type: str


def check_path(path: Any, name: str) -> str:
    """A normalized relative path, or ArtifactError: one spelling per object, and none that could mean 'up'."""
    if not isinstance(path, str) or not path:
        raise ArtifactError(f"{name}: a non-empty string is needed")
    if "\0" in path:
        raise ArtifactError(f"{name}: contains a NUL byte")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise ArtifactError(f"{name}: is not valid UTF-8 (a lone surrogate)") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise ArtifactError(f"{name}: is {len(encoded)} bytes, longer than {MAX_PATH_BYTES}")
    if path.startswith("/"):
        raise ArtifactError(f"{name}: is absolute; give it relative to the job's workspace")
    segments = path.split("/")
    if ".." in segments:
        raise ArtifactError(f"{name}: has a '..' segment")
    if "" in segments or "." in segments:
        raise ArtifactError(f"{name}: has an empty or '.' segment; give a normalized path (a/b, not a//b, ./a or a/)")
    return path


def check_files(body: Any) -> list[dict[str, Any]]:
    """The files of a planning request, each checked, or ArtifactError naming the first bad field."""
    files = body.get("files") if isinstance(body, dict) else None
    if not isinstance(files, list):
        raise ArtifactError('files: a list is needed ({"files": [{"path", "size_bytes", "sha256", "content_type"?}]})')
    checked: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(files):
        name = f"files[{index}]"
        if not isinstance(item, dict):
            raise ArtifactError(f"{name}: an object is needed")
        path = check_path(item.get("path"), f"{name}.path")
        if path in seen:
            raise ArtifactError(f"{name}.path: {path!r} is already files[{seen[path]}]")
        seen[path] = index
        size = item.get("size_bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ArtifactError(f"{name}.size_bytes: a non-negative integer is needed")
        digest = item.get("sha256")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise ArtifactError(f"{name}.sha256: 64 lowercase hex digits are needed")
        content_type = item.get("content_type", DEFAULT_CONTENT_TYPE)
        if content_type is None:
            content_type = DEFAULT_CONTENT_TYPE
        if not isinstance(content_type, str) or not _CONTENT_TYPE.match(content_type):
            raise ArtifactError(f"{name}.content_type: a printable header value of at most 255 characters is needed")
        checked.append({"path": path, "size_bytes": size, "sha256": digest, "content_type": content_type})
    return checked


class Signer:
    """HMAC-SHA256 signatures under a secret born with the plane: only URLs it made verify."""

    def __init__(self) -> None:
        self._secret = secrets.token_bytes(32)

    def _sign(self, message: str) -> str:
        # surrogatepass: a job id is whatever was submitted; signing must never be the thing that crashes.
        return hmac.new(self._secret, message.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def put(self, job_id: str, path: str, expires: int, size_bytes: int, sha256: str) -> str:
        return self._sign(f"PUT\n{job_id}\n{path}\n{expires}\n{size_bytes}\n{sha256}")

    def get(self, job_id: str, path: str, expires: int) -> str:
        return self._sign(f"GET\n{job_id}\n{path}\n{expires}")

    @staticmethod
    def same(a: str, b: str) -> bool:
        return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


class BodyCutShort(Exception):
    """The client sent fewer bytes than its Content-Length (it went away, or stalled past the read timeout)."""


class ObjectStore:
    """Objects on disk in a temporary directory the plane owns (created with it, removed by `remove()`, and at
    interpreter exit if nobody called it). Bodies are written to a temporary file first and renamed into place
    only once verified, so a reader never sees half an object and a failed upload leaves nothing behind."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="devplane-objects-"))
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)

    def location(self, job_id: str, path: str) -> Path:
        key = hashlib.sha256(f"{job_id}\0{path}".encode("utf-8", "surrogatepass")).hexdigest()
        return self.dir / key

    def receive(self, source: BinaryIO, length: int) -> tuple[Path, str]:
        """Copy exactly `length` bytes from source into a new temporary file: (that file, their sha256 hex).
        BodyCutShort (the file removed) when fewer come."""
        fd, name = tempfile.mkstemp(dir=self.dir, prefix=".upload-")
        digest, left = hashlib.sha256(), length
        try:
            with os.fdopen(fd, "wb") as out:
                while left > 0:
                    try:
                        chunk = source.read(min(CHUNK_BYTES, left))
                    except (OSError, ValueError):  # a timeout or a reset; ValueError: the file was closed
                        chunk = b""
                    if not chunk:
                        raise BodyCutShort(f"body cut short: {length - left} of {length} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                    left -= len(chunk)
        except BaseException:
            self.discard(Path(name))
            raise
        return Path(name), digest.hexdigest()

    def commit(self, received: Path, job_id: str, path: str) -> None:
        os.replace(received, self.location(job_id, path))  # atomic: the old object or the new, never a mix

    @staticmethod
    def discard(received: Path) -> None:
        try:
            received.unlink()
        except FileNotFoundError:
            pass

    def clear(self) -> None:
        """Forget every object (an admin reset); the directory stays."""
        for entry in self.dir.iterdir():
            self.discard(entry)

    def remove(self) -> None:
        self._finalizer()  # idempotent: a second call does nothing

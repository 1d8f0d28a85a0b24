"""A content-addressed cache of job inputs: each file stored once under its SHA-256, shared by the jobs that ask
for it, evicted least recently used.

    <cache-dir>/.lock               flock: one agent per cache (another's eviction could pull a file from under
                                    a container being created)
    <cache-dir>/sha256/<hex>        an entry (mode 0444); jobs get it as a read-only bind mount, never a link
    <cache-dir>/sha256/<hex>.json   its stamp: size, inode, mtime and ctime when it was verified, and last use
    <cache-dir>/tmp/                downloads in progress (removed at start)

Why a mount and not the hard link one might expect: a hard link shares the inode, and a job runs as root in its
container, so it could chmod and rewrite its "copy" and with it the next job's input. A read-only bind mount
cannot be written, even by root in the container (EROFS; remounting needs CAP_SYS_ADMIN).

An entry is trusted while its stamp matches (any write or chmod changes the ctime, which no one can set back); a
mismatch re-hashes the file, and a file whose digest is wrong is dropped and fetched again. Entries a running job
uses are pinned: eviction keeps the unpinned entries under `max_bytes`, and the pinned ones may exceed it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ConfigError
from ..files import write_json_atomic

__all__ = ["CacheEntry", "InputCache"]

log = logging.getLogger(__name__)

HASH_CHUNK = 4 * 1024 * 1024


@dataclass
class CacheEntry:
    digest: str
    size: int
    last_used: float
    stamp: tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns


class InputCache:
    """Thread-safe. `acquire` returns a verified entry pinned for a job, fetching it at most once however many
    jobs ask at the same time; `release` unpins a job's entries."""

    def __init__(self, root: Path, max_bytes: int, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries_dir = root / "sha256"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()  # guards _entries, _pins, _digest_locks
        self._entries: dict[str, CacheEntry] = {}
        self._pins: dict[str, set[str]] = defaultdict(set)  # digest -> job ids
        self._digest_locks: dict[str, threading.Lock] = {}
        self._lock_fd: int | None = None

    # --- life cycle ----------------------------------------------------------------------------------------

    def open(self) -> None:
        """Create or take over the cache directory. Raises ConfigError when it cannot be used or another agent
        holds it."""
        if self.root.exists() and not self.root.is_dir():
            raise ConfigError(f"--cache-dir {self.root} is not a directory; give a directory (it is created if missing)")
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.root.chmod(0o700)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"--cache-dir {self.root}: cannot use it ({exc.strerror or exc}); give a directory this "
                              "agent can create and write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise ConfigError(f"--cache-dir {self.root} is in use by another agent; give each agent its own cache "
                              "directory") from None
        self._lock_fd = fd
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._tmp.mkdir(mode=0o700, exist_ok=True)
        self._entries_dir.mkdir(mode=0o700, exist_ok=True)
        self._load()
        with self._lock:
            self._evict_locked(self.max_bytes)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _load(self) -> None:
        for path in self._entries_dir.iterdir():
            if path.suffix == ".json":
                continue
            digest = path.name
            stamp_file = path.with_name(digest + ".json")
            try:
                data = json.loads(stamp_file.read_text())
                entry = CacheEntry(digest, int(data["size"]), float(data["last_used"]), tuple(data["stamp"]))
            except (OSError, ValueError, KeyError, TypeError):
                self._drop_files(digest)  # no stamp: an interrupted insert or a stranger; it is fetched again
                continue
            self._entries[digest] = entry
        for path in self._entries_dir.glob("*.json"):
            if path.stem not in self._entries:
                path.unlink(missing_ok=True)

    # --- use -----------------------------------------------------------------------------------------------

    def acquire(self, job_id: str, digest: str, fetch: Callable[[Path], object], size_hint: int | None = None) -> Path:
        """The path of the verified entry for `digest`, pinned for `job_id` until `release(job_id)`. Missing or
        corrupt: `fetch(tmp_path)` downloads it (it must check the digest and raise on failure; its exceptions
        propagate and nothing is cached). Concurrent calls for one digest fetch once."""
        with self._lock:
            lock = self._digest_locks.setdefault(digest, threading.Lock())
        with lock:
            path = self._entries_dir / digest
            with self._lock:
                present = digest in self._entries
                if present:
                    self._pins[digest].add(job_id)  # pinned before it is checked: no eviction can race the check
            if present and self._verified(digest):
                self._touch(digest)
                return path
            if present:
                self._unpin(job_id, digest)
            with self._lock:
                self._evict_locked(self.max_bytes - (size_hint or 0))
            tmp = self._tmp / f"{digest}.{threading.get_ident()}"
            try:
                fetch(tmp)
                size = self._insert(digest, tmp, job_id)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("input cache: stored %s (%d bytes)", digest[:12], size)
            with self._lock:
                self._evict_locked(self.max_bytes)
            return path

    def pin(self, job_id: str, digests: list[str]) -> None:
        """Pin what an adopted job's container already mounts (a restarted agent must not evict it)."""
        with self._lock:
            for digest in digests:
                if digest in self._entries:
                    self._pins[digest].add(job_id)

    def release(self, job_id: str) -> None:
        """Unpin every entry `job_id` used (its container is gone), then evict down to the limit."""
        with self._lock:
            for digest in list(self._pins):
                self._pins[digest].discard(job_id)
                if not self._pins[digest]:
                    del self._pins[digest]
            self._evict_locked(self.max_bytes)

    def stats(self) -> dict[str, int]:
        """For the heartbeat: bytes and entries held, the limit, and the free space of its filesystem."""
        with self._lock:
            size = sum(entry.size for entry in self._entries.values())
            count = len(self._entries)
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = 0
        return {"size_bytes": size, "entries": count, "max_bytes": self.max_bytes, "free_bytes": free}

    # --- inside --------------------------------------------------------------------------------------------

    def _verified(self, digest: str) -> bool:
        with self._lock:
            entry = self._entries.get(digest)
        if entry is None:
            return False
        path = self._entries_dir / digest
        try:
            stamp = _stamp(path)
        except OSError:
            stamp = None
        if stamp == entry.stamp:
            return True
        if stamp is not None and _sha256(path) == digest:
            entry.stamp = stamp  # touched (chmod, a copy tool) but intact
            self._write_stamp(entry)
            return True
        log.warning("input cache: entry %s is corrupt or gone (its content no longer matches its digest); "
                    "dropping it and fetching it again", digest[:12])
        with self._lock:
            self._entries.pop(digest, None)
        self._drop_files(digest)
        return False

    def _insert(self, digest: str, tmp: Path, job_id: str) -> int:
        os.chmod(tmp, 0o444)
        path = self._entries_dir / digest
        self._clear(path)  # a directory in its place would make every later fetch of this digest fail
        os.replace(tmp, path)
        entry = CacheEntry(digest, path.stat().st_size, self._clock.wall(), _stamp(path))
        self._write_stamp(entry)
        with self._lock:
            self._entries[digest] = entry
            self._pins[digest].add(job_id)
        return entry.size

    def _touch(self, digest: str) -> None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return
            entry.last_used = self._clock.wall()
        self._write_stamp(entry)

    def _unpin(self, job_id: str, digest: str) -> None:
        with self._lock:
            jobs = self._pins.get(digest)
            if jobs is not None:
                jobs.discard(job_id)
                if not jobs:
                    del self._pins[digest]

    def _write_stamp(self, entry: CacheEntry) -> None:
        try:
            write_json_atomic(self._entries_dir / f"{entry.digest}.json",
                              {"size": entry.size, "last_used": entry.last_used, "stamp": list(entry.stamp)},
                              mode=0o600, durable=False)
        except OSError as exc:
            log.warning("input cache: stamp of %s not written (%s)", entry.digest[:12], exc)

    def _evict_locked(self, budget: int) -> None:
        """Drop least recently used unpinned entries until all entries fit in `budget` bytes (or only pinned ones
        are left). Called with _lock held."""
        total = sum(entry.size for entry in self._entries.values())
        for entry in sorted(self._entries.values(), key=lambda e: e.last_used):
            if total <= budget:
                return
            if self._pins.get(entry.digest):
                continue
            del self._entries[entry.digest]
            self._drop_files(entry.digest)
            total -= entry.size
            log.info("input cache: evicted %s (%d bytes, least recently used)", entry.digest[:12], entry.size)

    def _drop_files(self, digest: str) -> None:
        for name in (digest, f"{digest}.json"):
            try:
                self._clear(self._entries_dir / name)
            except OSError as exc:
                log.warning("input cache: %s not removed (%s)", name, exc)

    @staticmethod
    def _clear(path: Path) -> None:
        """Remove whatever is at `path`: a file, or a directory an engine made there (Podman creates a missing
        bind-mount source, as a directory, for a container started after its input was evicted)."""
        if path.is_dir() and not path.is_symlink():
            log.warning("input cache: a directory stood at %s (made by the engine for a late container): removed", path)
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _stamp(path: Path) -> tuple[int, int, int, int]:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(f"{path} is not a regular file")
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _sha256(path: Path) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            while chunk := file.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()

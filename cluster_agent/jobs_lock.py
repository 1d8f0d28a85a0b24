"""One jobs directory, one running agent: an advisory lock the kernel releases when its holder dies.

Two agents on one jobs directory would adopt each other's containers and both deliver a result. The first agent
takes an exclusive flock(2) on `{jobs_workdir}/.radix-agent.lock` and keeps it until it exits; its pid, host and
start time are written into the file for the message a second agent prints. A killed agent (SIGKILL, a crash) holds
nothing: the kernel drops the lock with the process, so a stale file never blocks the next start. An agent that
finds the lock held waits for it up to `--jobs-lock-wait` seconds (an upgrade may start the new agent while the
old one still drains), saying so, then gives up with one line naming the directory and its holder.

On NFS, Linux turns flock(2) into a POSIX lock through the NFS lock manager (lockd/NLM for v3, the protocol itself
for v4), which other clients see: two login nodes sharing a jobs directory exclude each other too. A client that
crashes holds its lock until the server notices: at once after its reboot (NSM/statd, v3), or after the lease
time (v4, 90 s by default). Filesystems mounted with `nolock`/`local_lock=all` keep locks local to one host.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import ConfigError

__all__ = ["JobsDirectoryLock", "claim"]

log = logging.getLogger(__name__)

LOCK_FILE = ".radix-agent.lock"
RETRY_SECONDS = 0.5


class JobsDirectoryLock:
    """Held while the object (and its file descriptor) lives; `release()` ends it early."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def still_held(self) -> bool:
        """Whether the lock file at `path` is still the one this agent locked. A file removed or replaced (by hand,
        by a /tmp cleaner) would let a second agent in: it is locked again at once; False when another agent was
        quicker (this one must then stop)."""
        if self._fd is None:
            return False
        try:
            mine = os.fstat(self._fd)
            there = os.stat(self.path, follow_symlinks=False)
            if (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
                return True
        except FileNotFoundError:
            pass
        try:
            fd = _lock_now(self.path)
        except OSError as exc:
            log.error("the lock file %s was removed or replaced, and another agent holds the new one (%s)",
                      self.path, exc.strerror or exc)
            return False
        os.close(self._fd)
        self._fd = fd
        log.warning("the lock file %s was removed or replaced; this agent locked the jobs directory again", self.path)
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def _lock_now(path: Path) -> int:
    """A new lock file at `path`, locked and noted, or OSError (EWOULDBLOCK: another agent holds it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    _note(fd)
    return fd


def _note(fd: int) -> None:
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                         "agent_version": __version__}).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
    except OSError:
        pass  # the lock holds without the note; only a second agent's message is poorer


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"{}")
    except (OSError, ValueError):
        return "another agent"
    if not isinstance(data, dict):
        return "another agent"
    pid, host, since = data.get("pid"), data.get("host"), data.get("since")
    where = f"pid {pid}" if isinstance(pid, int) else "an agent"
    if isinstance(host, str) and host:
        where += f" on host {host}"
    if isinstance(since, (int, float)):
        where += f", running since {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(since))}"
    return where


def claim(
    jobs_workdir: Path,
    wait_seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> JobsDirectoryLock:
    """Take the jobs directory for this agent, waiting up to `wait_seconds` for another agent to let go.

    Raises ConfigError (one line: the directory, its holder, the fix) when it stays taken."""
    path = jobs_workdir / LOCK_FILE
    where = "--jobs-workdir / RADIX_JOBS_WORKDIR"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot open the lock file {path}: {exc.strerror or exc}") from None
    deadline = clock() + wait_seconds
    said = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise ConfigError(f"{where}: cannot lock {path}: {exc.strerror or exc}") from None
        holder = _holder(fd)
        if clock() >= deadline:
            os.close(fd)
            waited = f" (waited {wait_seconds:g} s, --jobs-lock-wait)" if wait_seconds else ""
            raise ConfigError(
                f"{where}: {jobs_workdir} is in use by {holder} (lock {path}); stop that agent first, or give this one "
                f"its own jobs directory{waited}"
            )
        if not said:
            log.warning("jobs directory %s is in use by %s; waiting up to %g s for it to exit (--jobs-lock-wait)",
                        jobs_workdir, holder, wait_seconds)
            said = True
        sleep(RETRY_SECONDS)
    if said:
        log.info("jobs directory %s is free: taking it over", jobs_workdir)
    _note(fd)
    return JobsDirectoryLock(path, fd)

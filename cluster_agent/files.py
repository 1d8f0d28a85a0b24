"""The agent's own files: atomic writes, private (0600) files, tolerant reads.

Only for paths the agent owns (its job directories, the Slurm state directories, the token file, the image
ledger). Paths a job controls go through safe_fs.py. Even here a write never follows a link or writes through
what is already there: its temporary file is created exclusively, without following links, and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["read_json", "write_atomic", "write_json_atomic", "write_private"]


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, durable: bool = True) -> None:
    """Replace `path` with `data`: readers see the old file or the new one, never half of one; `durable` also
    survives a host crash (fsync). Raises OSError (full disk, permissions)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a temporary file an earlier, killed write left
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
        os.fchmod(fd, mode)  # the umask must not change the mode asked for
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any, mode: int = 0o644, *, durable: bool = True) -> None:
    write_atomic(path, json.dumps(data).encode(), mode, durable=durable)


def write_private(path: Path, data: bytes) -> None:
    """Create `path` readable by the agent's user only (0600): scripts holding a job's env, credentials.
    Fails (FileExistsError) rather than write through anything already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def read_json(path: Path) -> Any | None:
    """The file's JSON, None when it is missing or unreadable (a restart must not trip over a torn file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None

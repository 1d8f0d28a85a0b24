"""A job's directory: with the engine's container labels, the only state the agent keeps.

    {jobs_workdir}/{job_id}/
        input.json       the job's input (mounted at /workspace with the rest)
        job.json         the spec as received: a restarted agent can rebuild the job from it
        container.json   the container's id, once created: a missing container is then known to have vanished
        result.json      the completion, spooled before the first delivery attempt
        log_offset       bytes of the live log the control plane has acknowledged

What a restarted agent finds tells it where the job was (see recovery.py). A directory is removed only after its
result was delivered, and before its container, so a container without a directory is a delivered job's leftover.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from . import __version__

TRASH_PREFIX = ".trash-"


def write_json_atomic(path: Path, data: Any, mode: int = 0o644, *, durable: bool = True) -> None:
    """Readers see the old file or the new one, never half of one; `durable` also survives a host crash (fsync)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """The file's JSON, None when it is missing or unreadable (a restart must not trip over a torn file)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class JobDirectory:
    def __init__(self, root: Path, job_id: str) -> None:
        self.job_id = job_id
        self.path = root / job_id

    def exists(self) -> bool:
        return self.path.is_dir()

    def prepare(self, raw: Any, input_payload: Any) -> None:
        """Create it with input.json and job.json. Raises OSError (full disk, permissions)."""
        self.path.mkdir(parents=True, exist_ok=True)
        # The container may run as any user: it must be able to write output.json into its workspace.
        self.path.chmod(0o777)
        (self.path / "output.json").unlink(missing_ok=True)
        # No fsync for input.json: a host crash ends the container too, and a re-run rewrites it from job.json.
        write_json_atomic(self.path / "input.json", input_payload, durable=False)
        write_json_atomic(self.path / "job.json", {"spec": raw, "agent_version": __version__, "received_at": time.time()})

    def read_spec(self) -> Any | None:
        data = read_json(self.path / "job.json")
        return data.get("spec") if isinstance(data, dict) else None

    def write_container(self, container_id: str) -> None:
        write_json_atomic(self.path / "container.json", {"container_id": container_id})

    def read_container(self) -> str | None:
        data = read_json(self.path / "container.json")
        return data.get("container_id") if isinstance(data, dict) else None

    def write_result(self, body: dict[str, Any]) -> None:
        write_json_atomic(self.path / "result.json", body, mode=0o600)

    def read_result(self) -> dict[str, Any] | None:
        data = read_json(self.path / "result.json")
        return data if isinstance(data, dict) else None

    def write_log_offset(self, offset: int) -> None:
        try:
            write_json_atomic(self.path / "log_offset", offset, durable=False)
        except OSError:
            pass  # resuming logs a little early after a restart is harmless: the server ignores known offsets

    def read_log_offset(self) -> int:
        data = read_json(self.path / "log_offset")
        return data if isinstance(data, int) and data >= 0 else 0

    def remove(self) -> bool:
        """Remove the directory; renamed first, so a half-removed directory is never mistaken for a job."""
        if not self.path.exists():
            return True
        trash = self.path.with_name(f"{TRASH_PREFIX}{self.job_id}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path, trash)
        except OSError:
            trash = self.path
        shutil.rmtree(trash, ignore_errors=True)
        return not trash.exists()

"""A job's directory: with the engine's container labels, the only state the agent keeps.

    {jobs_workdir}/
        .radix-layout          "2": every job directory below has this layout (older agents: see legacy_layout.py)
        .radix-agent.lock      one agent per jobs directory (jobs_lock.py)
        {job_id}/              the agent's, mode 0700, never mounted into a container
            job.json           the spec as received (0600: it may hold registry credentials); rebuilds the job
            container.json     the container's id, once created: a missing container is then known to have vanished
            result.json        the completion (0600), spooled before the first delivery attempt
            log_offset         bytes of the live log the control plane has acknowledged
            stop.json          why the agent was stopping it (canceled, interrupted): a restarted agent judges the
                               job the same way, whatever its container did after the stop signal
            workspace/         the job's: mounted read-write at /workspace (mode 0777, any container user writes)
                input.json     the job's input, written before the container starts
                output.json    the job's output, if it writes one
        .trash-*               a directory being removed

A job controls everything under its workspace and nothing else: the agent writes, reads back and trusts only what
sits beside it, and treats the workspace as untrusted data (read without following links, removed without
following links, see safe_fs.py). What a restarted agent finds tells it where the job was (see recovery.py). A
directory is removed only after its result was delivered, and before its container, so a container without a
directory is a delivered job's leftover.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import __version__
from .files import read_json, write_json_atomic
from .safe_fs import remove_tree, write_new_file

__all__ = ["JobDirectory", "layout_marked", "mark_layout"]

TRASH_PREFIX = ".trash-"
WORKSPACE_DIR = "workspace"
LAYOUT_FILE = ".radix-layout"
LAYOUT_VERSION = "2"


class JobDirectory:
    def __init__(self, root: Path, job_id: str) -> None:
        self.job_id = job_id
        self.path = root / job_id
        self.workspace = self.path / WORKSPACE_DIR

    def exists(self) -> bool:
        return self.path.is_dir()

    def prepare(self, spec: Any, input_payload: Any) -> None:
        """Create it with job.json, then a fresh workspace holding input.json. Raises OSError (full disk,
        permissions).

        A workspace left from before (a job re-run after a restart) is removed first: whatever a container wrote
        there is not carried into the new run."""
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.chmod(0o700)
        # job.json first: an agent killed at any later step leaves a job the next one can run again.
        self.write_spec(spec)
        if os.path.lexists(self.workspace):
            problem = remove_tree(self.workspace)
            if problem is not None:
                raise OSError(f"the previous workspace cannot be removed: {problem}")
        self.workspace.mkdir()
        # The container may run as any user: it must be able to write output.json into its workspace.
        self.workspace.chmod(0o777)
        # No fsync for input.json: a host crash ends the container too, and a re-run rewrites it from job.json.
        write_new_file(self.workspace / "input.json", json.dumps(input_payload).encode())

    def write_spec(self, spec: Any) -> None:
        write_json_atomic(
            self.path / "job.json", {"spec": spec, "agent_version": __version__, "received_at": time.time()}, mode=0o600
        )

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

    def write_stop(self, reason: str, message: str, at: float) -> None:
        """Written before the container is sent its stop, durably: an agent killed during the stop grace must not
        leave the next one to report the job by its exit code (succeeded, or an OOM-like 137). `at`: wall clock."""
        write_json_atomic(self.path / "stop.json", {"reason": reason, "message": message[:1000], "at": at})

    def read_stop(self) -> tuple[str, str, float] | None:
        data = read_json(self.path / "stop.json")
        if isinstance(data, dict) and isinstance(data.get("reason"), str) and isinstance(data.get("message"), str) \
                and isinstance(data.get("at"), (int, float)):
            return data["reason"], data["message"], float(data["at"])
        return None

    def write_log_offset(self, offset: int) -> None:
        try:
            write_json_atomic(self.path / "log_offset", offset, durable=False)
        except OSError:
            pass  # resuming logs a little early after a restart is harmless: the server ignores known offsets

    def read_log_offset(self) -> int:
        data = read_json(self.path / "log_offset")
        return data if isinstance(data, int) and data >= 0 else 0

    def remove_workspace(self) -> str | None:
        """Free the job's data before the next job may use the disk; None when done, else what was left."""
        return remove_tree(self.workspace)

    def remove(self) -> str | None:
        """Remove the directory; renamed first, so a half-removed directory is never mistaken for a job.
        Never raises: None when it is gone, else one line saying what could not be removed."""
        if not os.path.lexists(self.path):
            return None
        trash = self.path.with_name(f"{TRASH_PREFIX}{self.job_id}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(self.path, trash)
        except OSError:
            trash = self.path
        return remove_tree(trash)


def layout_marked(root: Path) -> bool:
    """Whether `root` is known to hold only directories of this layout."""
    return (root / LAYOUT_FILE).is_file()


def mark_layout(root: Path) -> None:
    write_json_atomic(root / LAYOUT_FILE, LAYOUT_VERSION)

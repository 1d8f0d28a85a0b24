"""A job's input files, put in place before its container starts (so their transfer never counts against the
job's timeout): an input with a sha256 comes from the cache when there is one (mounted read-only), any other is
downloaded into the workspace (the job's own copy)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import TransferFailed
from ..models import InputFile
from .cache import InputCache
from .download import Downloader

__all__ = ["StagedInputs", "stage_inputs"]


@dataclass
class StagedInputs:
    """What staging did. `mounts`: (cache entry on the host, path under /workspace), each mounted read-only.
    Bytes: `downloaded_bytes` came over the network for this job, `cached_bytes` were found in the cache."""

    mounts: list[tuple[Path, str]] = field(default_factory=list)
    downloaded_bytes: int = 0
    cached_bytes: int = 0
    seconds: float = 0.0
    digests: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return self.downloaded_bytes + self.cached_bytes


def stage_inputs(
    job_id: str, inputs: list[InputFile], workspace: Path, *, downloader: Downloader, cache: InputCache | None,
    limit: int, cancel: threading.Event, clock: Clock = SYSTEM_CLOCK,
) -> StagedInputs:
    """Place every input under `workspace` (fresh, created by the agent: nothing of the job's is there yet).
    Raises TransferFailed for the first input that cannot be had. `limit` caps the bytes of all inputs."""
    staged = StagedInputs()
    began = clock.monotonic()
    declared = sum(item.size_bytes or 0 for item in inputs)
    if declared > limit:
        raise TransferFailed(f"the job's inputs declare {declared} bytes, over the limit of {limit} bytes per job "
                             "(--max-input-bytes); ask for less or raise the limit", permanent=True)
    for item in inputs:
        target = workspace / item.path
        _make_parents(workspace, item.path)
        remaining = limit - staged.total_bytes
        if cache is not None and item.sha256 is not None:
            fetched_here: list[int] = []

            def fetch(tmp: Path, item: InputFile = item, remaining: int = remaining) -> None:
                result = downloader.fetch(item.url, tmp, limit=remaining, sha256=item.sha256,
                                          size_bytes=item.size_bytes, cancel=cancel, name=f"input {item.path}")
                fetched_here.append(result.size_bytes)

            entry = cache.acquire(job_id, item.sha256, fetch, size_hint=item.size_bytes)
            size = entry.stat().st_size
            if size > remaining:
                raise TransferFailed(f"input {item.path}: {size} bytes, over what is left of the limit of {limit} "
                                     "bytes per job (--max-input-bytes)", permanent=True)
            # The mount target: a plain empty file the engine mounts the entry over.
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444))
            staged.mounts.append((entry, item.path))
            staged.digests.append(item.sha256)
            if fetched_here:
                staged.downloaded_bytes += size
            else:
                staged.cached_bytes += size
        else:
            result = downloader.fetch(item.url, target, limit=remaining, sha256=item.sha256,
                                      size_bytes=item.size_bytes, cancel=cancel, name=f"input {item.path}")
            staged.downloaded_bytes += result.size_bytes
    staged.seconds = clock.monotonic() - began
    return staged


def _make_parents(workspace: Path, relative: str) -> None:
    """Directories on the way to an input, writable by the job (as the workspace itself is)."""
    current = workspace
    for part in relative.split("/")[:-1]:
        current = current / part
        try:
            os.mkdir(current, 0o777)
            os.chmod(current, 0o777)
        except FileExistsError:
            if current.is_symlink() or not current.is_dir():
                raise TransferFailed(f"input {relative}: {part} is not a directory (another input is a file there)", permanent=True) from None

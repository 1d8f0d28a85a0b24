"""Job directories that an agent before layout 2 left behind, moved into today's layout and trusted no further
than a job could have written them.

Before layout 2 the whole `{jobs_workdir}/{job_id}/` directory was mounted at /workspace: the agent's own records
(job.json, container.json, result.json, log_offset) sat where the job could replace them, so a running job could
forge its own result. On the first start of an agent with layout 2 (no `.radix-layout` file yet), every job
directory is first renamed to `.radix-legacy-{job_id}` (atomically, one by one), the layout file is written, and
each renamed directory is then converted; a conversion interrupted by a crash is redone at the next start,
because the `.radix-legacy-` name says it is not done.

Converting one directory: a new agent-owned `{job_id}/` is made, records that can be trusted are written into
it, and the old directory becomes its `workspace/` (a rename: a container that still runs keeps its mount, which
follows the directory). What is trusted:

| found                                    | what the new agent does                                                  |
|------------------------------------------|--------------------------------------------------------------------------|
| the job's container exists, has run      | adopts it; the job is judged again from the container (any result.json   |
|                                          | there is ignored: the job could have written it)                         |
| the job's container exists, never ran    | removes it and runs the job afresh (starting it would mount the new,    |
|                                          | agent-only directory, which is what its old mount path names now)        |
| no container, result.json                | fails the job as agent_error: the result cannot be told from a forgery  |
| no container, container.json             | the container vanished: agent_error, as for today's layout               |
| no container, only job.json              | never started: runs it                                                   |

The spec (job.json) is used only when its job_id is the directory's name, and for an adopted container only for
messages: what the job runs is the container's own configuration.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

from .executors import ContainerState
from .job_dir import JobDirectory, layout_marked, mark_layout
from .models import JOB_ID_PATTERN, Completion, FailureReason
from .json_depth import nesting_depth
from .safe_fs import read_file_nofollow, remove_tree

__all__ = ["migrate"]

log = logging.getLogger(__name__)

LEGACY_PREFIX = ".radix-legacy-"
# The records an older agent kept in the workspace, and their temporary files: removed from the new workspace.
LEGACY_RECORDS = ("job.json", "container.json", "result.json", "log_offset")
SPEC_LIMIT = 64 * 1024 * 1024
SPEC_MAX_DEPTH = 200  # as a poll item may nest (control_plane.POLL_ITEM_MAX_DEPTH): deeper cannot be written back
RECORD_LIMIT = 1024 * 1024


def _legacy_json(directory: Path, name: str, limit: int) -> Any | None:
    data = read_file_nofollow(directory / name, limit)
    if data is None:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # anything the job wrote there: unreadable is all it can be
        return None


def migrate(
    root: Path,
    containers: dict[str, ContainerState],
    *,
    tenant_id: str,
    remove_container: Callable[[str], None],
) -> None:
    """Bring every job directory of `root` into layout 2. Raises OSError when `root` itself cannot be changed."""
    if not layout_marked(root):
        for entry in sorted(root.iterdir()):
            if entry.name.startswith(".") or not JOB_ID_PATTERN.fullmatch(entry.name):
                continue
            if entry.is_symlink() or not entry.is_dir():
                continue
            if not any(os.path.lexists(entry / name) for name in (*LEGACY_RECORDS, "input.json")):
                continue  # no older agent made this: recovery reports it and leaves it alone
            try:
                os.rename(entry, root / f"{LEGACY_PREFIX}{entry.name}")
            except OSError as exc:
                log.error("recovery: cannot set %s aside for conversion (%s); left as it is", entry, exc.strerror)
        mark_layout(root)
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith(LEGACY_PREFIX):
            continue
        job_id = entry.name[len(LEGACY_PREFIX):]
        if not JOB_ID_PATTERN.fullmatch(job_id) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if _convert(root, entry, job_id, containers.get(job_id), tenant_id, remove_container):
                del containers[job_id]  # removed: the job runs afresh
        except Exception:  # noqa: BLE001 - one directory must not stop the others, nor the agent
            log.exception("recovery: cannot convert %s (left by an older agent); left as it is", entry)


def _convert(
    root: Path,
    legacy: Path,
    job_id: str,
    container: ContainerState | None,
    tenant_id: str,
    remove_container: Callable[[str], None],
) -> bool:
    """Convert one directory; True when the job's container was removed (it never ran)."""
    directory = JobDirectory(root, job_id)
    if os.path.lexists(directory.path):
        problem = remove_tree(directory.path)  # an interrupted conversion: start over
        if problem is not None:
            raise OSError(problem)
    raw = _legacy_json(legacy, "job.json", SPEC_LIMIT)
    spec = raw.get("spec") if isinstance(raw, dict) else None
    if not (isinstance(spec, dict) and spec.get("job_id") == job_id) or nesting_depth(spec) > SPEC_MAX_DEPTH:
        spec = None
    container_record = _legacy_json(legacy, "container.json", RECORD_LIMIT)
    had_result = read_file_nofollow(legacy / "result.json", RECORD_LIMIT) is not None
    directory.path.mkdir(mode=0o700)
    removed = False
    if container is not None and container.status == "created":
        log.warning("recovery: job %s: its container %s, created by an older agent, never ran; running the job "
                    "afresh", job_id, container.id[:12])
        remove_container(container.id)
        container, removed = None, True
        container_record = None
        had_result = False
    _write_records(directory, spec, container, container_record, had_result, tenant_id)
    for name in LEGACY_RECORDS:
        for candidate in (name, f".{name}.tmp"):
            try:
                os.unlink(legacy / candidate)
            except OSError:
                pass  # missing, or a directory the job made of that name: job data either way
    os.rename(legacy, directory.workspace)
    log.info("recovery: job %s: moved into the current directory layout", job_id)
    return removed


def _write_records(
    directory: JobDirectory, spec: dict[str, Any] | None, container: ContainerState | None,
    container_record: Any, had_result: bool, tenant_id: str,
) -> None:
    """The current layout's records for a converted job, trusting nothing the job could have written."""
    job_id = directory.job_id
    if container is not None:
        if had_result:
            log.warning("recovery: job %s: ignoring the result.json an older agent left in the job's workspace (the "
                        "job could have written it); judging the job from its container %s", job_id, container.id[:12])
        directory.write_spec(spec or {"job_id": job_id, "image": container.image or "unknown"})
        directory.write_container(container.id)
    elif had_result:
        directory.write_spec(spec or {"job_id": job_id, "image": "unknown"})
        directory.write_result(Completion.not_run(
            tenant_id, FailureReason.AGENT_ERROR,
            "an older agent spooled this job's result inside the job's own workspace and its container is gone, so "
            "the result cannot be told from one the job wrote itself; resubmit the job",
        ).to_wire())
    elif spec is not None:
        directory.write_spec(spec)
        if isinstance(container_record, dict) and isinstance(container_record.get("container_id"), str):
            directory.write_container(container_record["container_id"])
    else:
        # The older agent wrote input.json before job.json: one killed in between left a job known only by its
        # directory's name. It cannot be run again, but it gets its one result.
        directory.write_spec({"job_id": job_id, "image": "unknown"})
        directory.write_result(Completion.not_run(
            tenant_id, FailureReason.AGENT_ERROR,
            "an older agent was stopped before it recorded this job's spec, so the job cannot be run again; "
            "resubmit it",
        ).to_wire())

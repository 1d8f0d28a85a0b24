"""What a restarted agent finds, and what each finding means. The engine (labels) and the jobs directory are
the only state; this module reads both and classifies, the agent acts.

| found                                                  | meaning                         | action                 |
|--------------------------------------------------------|---------------------------------|------------------------|
| result.json in a job directory                         | finished, not (known) delivered | deliver it             |
| job directory + labelled container (any state)         | started by a previous agent     | adopt it               |
| job directory with container.json, no container        | the container vanished          | fail it (agent_error)  |
| job directory without container.json, no container     | accepted, never started         | run it                 |
| labelled container, exited, no job directory           | a delivered job's leftover      | remove it              |
| labelled container, running, no job directory          | cannot be explained             | report, leave alone    |
| a directory without job.json, or not a job id          | cannot be explained             | report, leave alone    |
| .trash-* directory                                     | an interrupted removal          | remove it              |
| directories an older agent left (no .radix-layout yet) | job-writable records            | legacy_layout.py       |

Containers not labelled with this cluster id are never looked at: several agents may share one engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .executors import ContainerState, Executor
from . import legacy_layout
from .job_dir import TRASH_PREFIX, JobDirectory
from .safe_fs import remove_tree
from .models import JOB_ID_PATTERN

__all__ = ["Findings", "scan"]

log = logging.getLogger(__name__)


@dataclass
class Findings:
    spooled: list[tuple[JobDirectory, dict[str, Any], ContainerState | None]] = field(default_factory=list)
    adopt: list[tuple[Any, ContainerState]] = field(default_factory=list)
    vanished: list[tuple[Any, str]] = field(default_factory=list)  # (spec, container id)
    never_started: list[Any] = field(default_factory=list)
    leftovers: list[ContainerState] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.spooled)} result(s) to deliver, {len(self.adopt)} container(s) to adopt, "
            f"{len(self.vanished)} vanished, {len(self.never_started)} never started, "
            f"{len(self.leftovers)} leftover(s) removed, {len(self.unexplained)} unexplained"
        )


def scan(jobs_workdir: Path, cluster_id: str, executor: Executor, *, tenant_id: str = "") -> Findings:
    """Read the engine and the jobs directory. Raises EngineUnavailable (no engine) or OSError (the jobs directory
    itself cannot be read); nothing a job left in a directory can make it raise."""
    findings = Findings()
    containers: dict[str, ContainerState] = {}
    for state in executor.list_jobs(cluster_id):
        if state.job_id:
            containers[state.job_id] = state
        else:
            findings.unexplained.append(f"container {state.id[:12]} has no radix.job_id label")
    if jobs_workdir.is_dir():
        legacy_layout.migrate(jobs_workdir, containers, tenant_id=tenant_id, remove_container=executor.remove)
    seen: set[str] = set()
    entries = sorted(jobs_workdir.iterdir()) if jobs_workdir.is_dir() else []
    for entry in entries:
        try:
            _classify(entry, containers, seen, findings)
        except Exception as exc:  # noqa: BLE001 - one odd entry must not stop the agent from starting
            findings.unexplained.append(f"{entry} could not be examined ({type(exc).__name__}: {exc})")
    for job_id, state in containers.items():
        if job_id in seen:
            continue
        if state.running:
            findings.unexplained.append(f"container {state.id[:12]} of job {job_id} runs but has no job directory")
        else:
            findings.leftovers.append(state)
    for item in findings.unexplained:
        log.warning("recovery: %s; left alone", item)
    return findings


def _classify(entry: Path, containers: dict[str, ContainerState], seen: set[str], findings: Findings) -> None:
    name = entry.name
    if name.startswith(TRASH_PREFIX):
        problem = remove_tree(entry)
        if problem is not None:
            log.warning("recovery: %s", problem)
        return
    if name.startswith("."):
        return  # the agent's and its modes' own files (a job id never starts with a dot)
    if entry.is_symlink() or not entry.is_dir() or not JOB_ID_PATTERN.fullmatch(name):
        findings.unexplained.append(f"{entry} is not a job directory")
        return
    directory = JobDirectory(entry.parent, name)
    spec = directory.read_spec()
    if spec is not None and not (isinstance(spec, dict) and spec.get("job_id") == name):
        findings.unexplained.append(f"{entry}/job.json is for another job")
        return
    container = containers.get(name)
    seen.add(name)
    result = directory.read_result()
    if result is not None:
        findings.spooled.append((directory, result, container))
    elif spec is None:
        findings.unexplained.append(f"{entry} has no readable job.json")
    elif container is not None:
        findings.adopt.append((spec, container))
    elif directory.read_container():
        findings.vanished.append((spec, directory.read_container() or ""))
    else:
        findings.never_started.append(spec)


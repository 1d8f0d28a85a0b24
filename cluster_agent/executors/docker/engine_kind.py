"""Which engine serves the Docker API: Docker itself, or Podman's Docker-compatible service (`podman system
service`). The agent speaks the same API to both; this module owns what differs.

Podman is recognised by its `/version` answer: a component named "Podman Engine" (Docker names its "Engine"),
not by the version number, which Podman fills with its own (4.3.1, 5.x) and which says nothing of the API.

The differences that matter to the agent (each found against Debian's Podman 4.3.1 with the Docker SDK; sources
in docs/operations.md "Podman"):

- Events: Podman's events endpoint matches the `event` filter against its own event names, `died` where Docker
  says `die` (the events themselves come back as `die`), and ignores a `label` filter without a value. A Docker
  filter thus matches nothing, and every job's exit would be found only by the periodic state check.
- GPUs: Podman's compatible API ignores `DeviceRequests` and `HostConfig.Runtime` (containers/podman#22645;
  CDI device requests only from Podman 5.4, containers/podman#25171) and refuses CDI names in `Devices`
  (containers/podman#23560): GPUs reach a job through the agent's CDI translation (devices, mounts, env).
- Init: `init: true` runs catatonit, which exits 1 (not tini's 127) when the job's command cannot be executed.
- OOM: Podman before 5.0 never sets `OOMKilled` and sends no `oom` event: conmon writes its oom file into its
  working directory, where Podman does not look (containers/podman#13102, fixed in 5.0 by #21523; conmon#504). A
  job whose main process the kernel killed still exits 137 and is judged OOM; a killed child whose parent exits
  by itself is judged by that exit code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..base import LABEL_JOB_ID

__all__ = ["EngineKind", "DOCKER", "identify", "limits_ignored"]

# What the agent does differently on Podman, logged once at start-up.
PODMAN_DIFFERENCES = (
    "job exits read from Podman's events (its 'died' filter)",
    "GPUs through the CDI spec translated into devices and mounts (its API ignores device requests)",
    "the init is catatonit (a missing command exits 1, not 127)",
    "before Podman 5.0 no OOM flag: an OOM kill is seen only as the main process's exit code 137",
)


@dataclass(frozen=True)
class EngineKind:
    name: str  # "Docker" or "Podman"
    version: str = ""
    api_version: str = ""

    @property
    def podman(self) -> bool:
        return self.name == "Podman"

    @property
    def engine_name(self) -> str:
        """For messages: "the Docker engine", "the Podman engine"."""
        return f"the {self.name} engine"

    def exit_event_filters(self) -> dict[str, Any]:
        """The server-side filters of the events stream that carries job exits (exits.py)."""
        if self.podman:
            # Podman matches `died`; `die` is kept for a Podman that learns Docker's name (values are ORed).
            # No label filter: Podman ignores one without a value, so the label is checked on each event instead.
            return {"type": "container", "event": ["die", "died", "oom"]}
        return {"type": "container", "event": ["die", "oom"], "label": [LABEL_JOB_ID]}

    def describe(self) -> str:
        text = f"{self.name} {self.version or '(version unknown)'}"
        if self.api_version:
            text += f", Docker API {self.api_version}"
        if self.podman:
            text += "; differences from Docker: " + "; ".join(PODMAN_DIFFERENCES)
        return text


DOCKER = EngineKind("Docker")


def identify(version: dict[str, Any]) -> EngineKind:
    """The engine behind a `/version` answer."""
    components = version.get("Components") or []
    for component in components:
        if isinstance(component, dict) and "podman" in str(component.get("Name", "")).lower():
            return EngineKind("Podman", str(component.get("Version") or version.get("Version") or ""),
                              str(version.get("ApiVersion") or ""))
    return EngineKind("Docker", str(version.get("Version") or ""), str(version.get("ApiVersion") or ""))


def limits_ignored(info: dict[str, Any]) -> bool:
    """A rootless engine on cgroup v1 (from `/info`): it cannot set a container's memory, CPU or pids limits and
    runs it without them (Podman logs "Resource limits are not supported and ignored on cgroups V1 rootless
    systems"; rootless Docker likewise)."""
    rootless = any("name=rootless" in str(option) for option in info.get("SecurityOptions") or [])
    return rootless and str(info.get("CgroupVersion", "")) == "1"

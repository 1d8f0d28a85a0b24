"""The Docker Engine API as the executor uses it: connecting, turning transport failures into EngineUnavailable,
reading container state, and reading a container's multiplexed log stream frame by frame."""

from __future__ import annotations

import struct
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator

import docker
import requests
from docker.errors import APIError, DockerException

from ...errors import EngineUnavailable
from ..base import ContainerState

__all__ = ["STDERR_FRAME", "STDOUT_FRAME", "connect", "engine_call", "explain", "log_frames", "state_of"]

# The stream byte of a frame in the engine's multiplexed output (Docker Engine API: "Stream format").
STDOUT_FRAME = 1
STDERR_FRAME = 2


def connect(docker_host: str | None, timeout: float = 60.0) -> docker.DockerClient:
    """A client for the engine at `docker_host` (default: DOCKER_HOST, else the local socket)."""
    try:
        if docker_host:
            return docker.DockerClient(base_url=docker_host, timeout=int(timeout))
        return docker.from_env(timeout=int(timeout))
    except DockerException as exc:
        raise EngineUnavailable(f"cannot reach the Docker engine: {exc}") from None


@contextmanager
def engine_call(what: str) -> Iterator[None]:
    """Turn transport failures into EngineUnavailable; let API errors through for the caller to classify."""
    try:
        yield
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise EngineUnavailable(f"Docker engine did not answer while trying to {what}: {exc}") from None


def explain(exc: APIError) -> str:
    """The engine's own words for an API error."""
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or exc)


def _epoch(timestamp: str | None) -> float | None:
    """Docker's RFC 3339 timestamp (nanoseconds, Z) as epoch seconds; None for the zero time of a never-started one."""
    if not timestamp or timestamp.startswith("0001-"):
        return None
    main, _, fraction = timestamp.rstrip("Z").partition(".")
    fraction = fraction.split("+")[0].split("-")[0]
    value = datetime.fromisoformat(main + "+00:00").timestamp()
    return value + (float(f"0.{fraction}") if fraction else 0.0)


def state_of(container_id: str, attrs: dict[str, Any]) -> ContainerState:
    """A container's state from its inspect (or list) attributes."""
    state = attrs.get("State") or {}
    return ContainerState(
        id=container_id,
        status=state.get("Status", "unknown"),
        labels=(attrs.get("Config") or {}).get("Labels") or {},
        started_at=_epoch(state.get("StartedAt")),
        image=(attrs.get("Config") or {}).get("Image") or "",
        finished_at=_epoch(state.get("FinishedAt")),
    )


def log_frames(api: docker.APIClient, container_id: str, *, follow: bool) -> Iterator[tuple[int, bytes]]:
    """The container's output from the engine's log driver as (stream, data) frames in the order written: all of
    it, then (with `follow`) what comes next, until the container exits.

    Not attach(logs=True): while the engine still holds the attach of an agent that was killed (it notices only
    when it next writes to it), such an attach replays nothing, and the output written meanwhile would be lost.
    The SDK's public logs() drops the stream of each frame, so the frames are read here, with the SDK's own request
    helpers (docker-py 5-7), from the same multiplexed stream (8-byte header: stream, size)."""
    response = api._get(
        api._url("/containers/{0}/logs", container_id),
        params={"stdout": 1, "stderr": 1, "follow": 1 if follow else 0, "timestamps": 0, "tail": "all"},
        stream=True,
    )
    try:
        api._raise_for_status(response)
        api._disable_socket_timeout(api._get_raw_response_socket(response))
        while True:
            header = response.raw.read(8)
            if len(header) < 8:
                return
            stream, length = struct.unpack(">BxxxL", header)
            if not length:
                continue
            data = response.raw.read(length)
            if not data:
                return
            yield stream, data
    finally:
        response.close()

"""Runs job containers on a Docker engine through the Docker SDK (never the docker CLI).

Traps handled here (see field notes): `wait(timeout=...)` is an HTTP timeout, not a deadline; output is read as
a stream (attach, established before start so no byte is missed) and never loaded whole; pull errors arrive
inside a 200 stream; no `auto_remove`, which races the final inspect; the missing NVIDIA runtime shows up as
`could not select device driver`.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest, Mount
from docker.utils import parse_repository_tag

from ...clock import SYSTEM_CLOCK, Clock
from ...errors import EngineUnavailable, JobFailed
from ...gpu_injection import GpuInjection, NvidiaRuntimeInjection
from ...models import FailureReason
from ..base import LABEL_CLUSTER_ID, WORKSPACE, ContainerSpec, ContainerState, ExitInfo, OutputSink
from .reaper import ContainerReaper

__all__ = ["DockerExecutor", "connect"]

log = logging.getLogger(__name__)

# The stream byte of a frame in the engine's multiplexed output (Docker Engine API: "Stream format").
STDOUT_FRAME = 1
STDERR_FRAME = 2

NVIDIA_RUNTIME_FIX = (
    "the Docker engine has no NVIDIA runtime, so it cannot give GPUs to containers: install the NVIDIA Container "
    "Toolkit on this host and run `nvidia-ctk runtime configure --runtime=docker`, then restart dockerd"
)


def connect(docker_host: str | None, timeout: float = 60.0) -> docker.DockerClient:
    """A client for the engine at `docker_host` (default: DOCKER_HOST, else the local socket)."""
    try:
        if docker_host:
            return docker.DockerClient(base_url=docker_host, timeout=int(timeout))
        return docker.from_env(timeout=int(timeout))
    except DockerException as exc:
        raise EngineUnavailable(f"cannot reach the Docker engine: {exc}") from None


def _epoch(timestamp: str | None) -> float | None:
    """Docker's RFC 3339 timestamp (nanoseconds, Z) as epoch seconds; None for the zero time of a never-started one."""
    if not timestamp or timestamp.startswith("0001-"):
        return None
    main, _, fraction = timestamp.rstrip("Z").partition(".")
    fraction = fraction.split("+")[0].split("-")[0]
    value = datetime.fromisoformat(main + "+00:00").timestamp()
    return value + (float(f"0.{fraction}") if fraction else 0.0)


def _state(container_id: str, attrs: dict[str, Any]) -> ContainerState:
    state = attrs.get("State") or {}
    return ContainerState(
        id=container_id,
        status=state.get("Status", "unknown"),
        labels=(attrs.get("Config") or {}).get("Labels") or {},
        started_at=_epoch(state.get("StartedAt")),
        image=(attrs.get("Config") or {}).get("Image") or "",
        finished_at=_epoch(state.get("FinishedAt")),
    )


class _Skip:
    """Drops the first `count` bytes fed to it, then passes the rest on."""

    def __init__(self, count: int, sink: OutputSink) -> None:
        self._left = count
        self._sink = sink

    def __call__(self, data: bytes) -> None:
        if self._left:
            taken = min(self._left, len(data))
            self._left -= taken
            data = data[taken:]
        if data:
            self._sink(data)


def _explain(exc: APIError) -> str:
    explanation = exc.explanation
    if isinstance(explanation, bytes):
        explanation = explanation.decode(errors="replace")
    return str(explanation or exc)


class _RemovalRefused(EngineUnavailable):
    """The engine answered a removal with an error: the reaper retries, a plain remove() logs it."""


@contextmanager
def _engine(what: str) -> Iterator[None]:
    """Turn transport failures into EngineUnavailable; let API errors through for the caller to classify."""
    try:
        yield
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise EngineUnavailable(f"Docker engine did not answer while trying to {what}: {exc}") from None


class DockerExecutor:
    jobs_die_with_engine = True  # without live-restore, a dockerd restart kills every container
    engine_name = "the Docker engine"

    def __init__(
        self,
        client: docker.DockerClient,
        *,
        gpu_injection: GpuInjection | None = None,
        pull_lock: threading.Lock | None = None,
        pull_timeout: float = 1800.0,
        pull_stall_seconds: float = 120.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._client = client
        self._clock = clock
        self._pull_timeout = pull_timeout
        self._pull_stall = pull_stall_seconds
        self.gpu_injection: GpuInjection = gpu_injection or NvidiaRuntimeInjection()
        self._api = client.api
        self._attached: dict[str, Any] = {}
        self._attached_lock = threading.Lock()
        # Two jobs asking for one missing image pull it once.
        self._pull_lock = pull_lock or threading.Lock()
        self._reaper = ContainerReaper(self._remove_for_sure)

    @property
    def client(self) -> docker.DockerClient:
        return self._client

    def ping(self) -> None:
        try:
            self._api.ping()
        except (DockerException, requests.exceptions.RequestException) as exc:
            raise EngineUnavailable(f"Docker engine does not answer: {exc}") from None

    def info(self) -> dict[str, Any]:
        with _engine("read engine info"):
            return self._api.info()

    # --- images --------------------------------------------------------------------------------------------

    def prepare_image(self, image: str, policy: str = "if-not-present", auth: dict[str, str] | None = None) -> None:
        """Without `auth`, the SDK uses the credentials of the engine user's docker config (DOCKER_CONFIG or
        ~/.docker/config.json) for the image's registry."""
        with self._pull_lock, _engine(f"prepare image {image}"):
            if policy != "always":
                try:
                    self._api.inspect_image(image)
                    return
                except ImageNotFound:
                    if policy == "never":
                        raise JobFailed(
                            FailureReason.IMAGE_UNAVAILABLE,
                            f"image {image} is not on this host and --pull-policy is never: load it onto the host first",
                        ) from None
                except APIError as exc:
                    raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"image {image}: {_explain(exc)}") from None
            self._pull(image, auth)
            try:
                self._api.inspect_image(image)
            except ImageNotFound:
                raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"image {image} is still missing after its pull") from None

    def _pull(self, image: str, auth: dict[str, str] | None) -> None:
        log.info("pulling image %s", image)
        repository, tag = parse_repository_tag(image)
        started = last_report = self._clock.monotonic()
        layers: dict[str, str] = {}
        # docker-py streams pulls with no read timeout, so a stalled registry would hang the job: the stream is
        # read on a worker thread, and this thread waits for each item with the stall limit.
        items: queue.Queue[Any] = queue.Queue(maxsize=1000)
        done = object()

        def read() -> None:
            try:
                for item in self._api.pull(repository, tag=tag or "latest", stream=True, decode=True, auth_config=auth):
                    items.put(item)
                items.put(done)
            except Exception as exc:  # handed to the waiting thread
                items.put(exc)

        threading.Thread(target=read, name=f"pull-{repository}", daemon=True).start()
        while True:
            remaining = self._pull_timeout - (self._clock.monotonic() - started)
            if remaining <= 0:
                raise JobFailed(
                    FailureReason.IMAGE_UNAVAILABLE, f"pulling image {image} took longer than --pull-timeout {self._pull_timeout:g} s"
                )
            try:
                item = items.get(timeout=min(self._pull_stall, remaining))
            except queue.Empty:
                if remaining <= self._pull_stall:
                    continue  # the total timeout above says it
                raise JobFailed(
                    FailureReason.IMAGE_UNAVAILABLE,
                    f"pulling image {image} made no progress for {self._pull_stall:g} s (--pull-stall-seconds): the "
                    "registry is unreachable or stalled",
                ) from None
            if item is done:
                break
            if isinstance(item, APIError):
                raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"cannot pull image {image}: {_explain(item)}")
            if isinstance(item, Exception):
                raise EngineUnavailable(f"the image pull broke off: {item}")
            if not isinstance(item, dict):
                continue
            if item.get("error"):
                raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"cannot pull image {image}: {item['error']}")
            if item.get("id") and item.get("status"):
                layers[item["id"]] = item["status"]
            if self._clock.monotonic() - last_report >= 10:
                complete = sum(1 for status in layers.values() if status in ("Pull complete", "Already exists"))
                log.info("pulling image %s: %d of %d layer(s) done after %.0f s",
                         image, complete, len(layers), self._clock.monotonic() - started)
                last_report = self._clock.monotonic()
        log.info("pulled image %s in %.1f s", image, self._clock.monotonic() - started)

    # --- containers ----------------------------------------------------------------------------------------

    def start(self, spec: ContainerSpec) -> str:
        env = dict(spec.env)
        binds: dict[str, Any] = {}
        host_config: dict[str, Any] = {
            # A mount, not a bind: the engine refuses a missing source instead of creating it (as root), so a
            # container started late, after its workspace was removed, cannot bring the directory back.
            "mounts": [Mount(target=WORKSPACE, source=str(spec.workspace), type="bind", read_only=False)],
            "binds": binds,
            "privileged": False,
            "security_opt": ["no-new-privileges"],
            "init": True,  # reaps the job's zombies and forwards SIGTERM to its main process
        }
        if spec.cpus:
            host_config["nano_cpus"] = int(spec.cpus * 1e9)
        if spec.memory_mb:
            host_config["mem_limit"] = f"{spec.memory_mb}m"
            host_config["memswap_limit"] = f"{spec.memory_mb}m"  # no swap: the limit is the limit
        if spec.shm_mb:
            host_config["shm_size"] = f"{spec.shm_mb}m"
        if spec.pids_limit:
            host_config["pids_limit"] = spec.pids_limit
        if spec.cap_drop:
            host_config["cap_drop"] = list(spec.cap_drop)
        if spec.read_only_rootfs:
            host_config["read_only"] = True
            host_config["tmpfs"] = {"/tmp": "rw,nosuid,nodev,size=1g"}  # programs expect a writable /tmp
        host_config["network_mode"] = spec.network
        if spec.gpus:
            access = self.gpu_injection.access(spec.gpus)
            if access.runtime_uuids:
                host_config["device_requests"] = [DeviceRequest(device_ids=access.runtime_uuids, capabilities=[["gpu"]])]
            if access.devices:
                host_config["devices"] = [f"{host}:{target}:{perms}" for host, target, perms in access.devices]
            for host, target, read_only in access.mounts:
                binds[host] = {"bind": target, "mode": "ro" if read_only else "rw"}
            for name, value in access.env.items():
                if name == "LD_LIBRARY_PATH" and env.get(name):
                    value = f"{value}:{env[name]}"  # the driver's libraries first, then the job's
                env[name] = value
        with _engine(f"create the container {spec.name}"):
            try:
                created = self._api.create_container(
                    spec.image,
                    command=spec.command or None,
                    environment=env,
                    working_dir=WORKSPACE,
                    labels=spec.labels,
                    name=spec.name,
                    detach=True,
                    host_config=self._api.create_host_config(**host_config),
                )
            except ImageNotFound as exc:
                raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, f"image {spec.image}: {_explain(exc)}") from None
            except APIError as exc:
                raise self._classify(exc, "create the container") from None
        container_id: str = created["Id"]
        step = "attach to the container's output"
        try:
            with _engine(f"{step} of {spec.name}"):
                # Attach before start: every byte the job writes is captured, even from a job that exits at once.
                stream = self._api.attach(container_id, stdout=True, stderr=True, stream=True, logs=False, demux=True)
            with self._attached_lock:
                self._attached[container_id] = stream
            step = "start the container"
            with _engine(f"{step} {spec.name}"):
                self._api.start(container_id)
        except APIError as exc:
            self._give_up(container_id)
            raise self._classify(exc, step) from None
        except BaseException:
            # The engine may still act on a call it did not answer in time (a late start): the container the
            # agent gave up on is removed now, or as soon as the engine answers again.
            self._give_up(container_id)
            raise
        return container_id

    def _give_up(self, container_id: str) -> None:
        self._forget(container_id)
        self._reaper.remove(container_id)

    @staticmethod
    def _classify(exc: APIError, what: str) -> JobFailed:
        text = _explain(exc)
        if "could not select device driver" in text:
            return JobFailed(FailureReason.AGENT_ERROR, f"{NVIDIA_RUNTIME_FIX} (engine said: {text})")
        if "bind source path does not exist" in text:
            return JobFailed(FailureReason.AGENT_ERROR, f"the job's workspace vanished before its container started: {text}")
        if "executable file not found" in text or "no such file or directory" in text:
            return JobFailed(FailureReason.INVALID_JOB, f"the job's command cannot run in its image: {text}")
        if exc.status_code is not None and 400 <= exc.status_code < 500 and exc.status_code != 409:
            return JobFailed(FailureReason.INVALID_JOB, f"the engine refused to {what}: {text}")
        return JobFailed(FailureReason.AGENT_ERROR, f"the engine failed to {what}: {text}")

    def _forget(self, container_id: str) -> Any:
        with self._attached_lock:
            return self._attached.pop(container_id, None)

    def wait_started(self, container_id: str, stop: threading.Event) -> float | None:
        return self._clock.wall()  # start() returns once the container runs

    def stream_output(self, container_id: str, on_stdout: OutputSink, on_stderr: OutputSink) -> None:
        stream = self._forget(container_id)
        if stream is None:
            raise EngineUnavailable(f"no output stream attached to container {container_id[:12]}")
        try:
            for out, err in stream:
                if out:
                    on_stdout(out)
                if err:
                    on_stderr(err)
        except (requests.exceptions.RequestException, OSError) as exc:
            log.warning("output stream of container %s broke off: %s", container_id[:12], exc)

    def wait(self, container_id: str, timeout: float) -> bool:
        # The SDK's timeout is an HTTP read timeout: on expiry it raises (ReadTimeout, or ConnectionError
        # wrapping ReadTimeoutError). Check the container's state to tell a deadline from a broken engine.
        try:
            self._api.wait(container_id, timeout=max(1, int(timeout + 0.999)))
            return True
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            with _engine("inspect a container"):
                try:
                    state = self._api.inspect_container(container_id)["State"]
                except NotFound:
                    raise EngineUnavailable(f"container {container_id[:12]} vanished while it ran") from None
            return not state.get("Running", False)
        except NotFound:
            raise EngineUnavailable(f"container {container_id[:12]} vanished while it ran") from None

    def stop(self, container_id: str, grace: float) -> None:
        with _engine("stop a container"):
            try:
                self._api.stop(container_id, timeout=max(0, int(grace)))
            except NotFound:
                pass

    def exit_info(self, container_id: str) -> ExitInfo:
        with _engine("inspect a container"):
            try:
                state = self._api.inspect_container(container_id)["State"]
            except NotFound:
                raise EngineUnavailable(f"container {container_id[:12]} vanished before its exit code was read") from None
        return ExitInfo(
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error") or "",
        )

    def list_jobs(self, cluster_id: str) -> list[ContainerState]:
        with _engine("list job containers"):
            found = self._api.containers(all=True, filters={"label": f"{LABEL_CLUSTER_ID}={cluster_id}"})
            states = []
            for item in found:
                state = self.inspect(item["Id"])
                if state is not None:
                    states.append(state)
            return states

    def inspect(self, container_id: str) -> ContainerState | None:
        with _engine("inspect a container"):
            try:
                return _state(container_id, self._api.inspect_container(container_id))
            except NotFound:
                return None

    def start_created(self, container_id: str) -> None:
        with _engine("attach to a created container's output"):
            stream = self._api.attach(container_id, stdout=True, stderr=True, stream=True, logs=False, demux=True)
        with self._attached_lock:
            self._attached[container_id] = stream
        try:
            with _engine("start a created container"):
                self._api.start(container_id)
        except APIError as exc:
            self._forget(container_id)
            raise self._classify(exc, "start the container") from None
        except BaseException:
            self._forget(container_id)
            raise

    def replay_output(
        self, container_id: str, on_stdout: OutputSink, on_stderr: OutputSink, *, skip_stdout: int = 0, skip_stderr: int = 0
    ) -> None:
        if self._forget(container_id) is not None:
            raise EngineUnavailable("replay_output on a container whose output is already attached")
        sinks = {STDOUT_FRAME: _Skip(skip_stdout, on_stdout), STDERR_FRAME: _Skip(skip_stderr, on_stderr)}
        state = self.inspect(container_id)
        try:
            for stream, data in self._log_frames(container_id, follow=state is not None and state.running):
                sink = sinks.get(stream)
                if sink is not None:
                    sink(data)
        except NotFound:
            return
        except (requests.exceptions.RequestException, OSError) as exc:
            log.warning("output replay of container %s broke off: %s", container_id[:12], exc)

    def _log_frames(self, container_id: str, *, follow: bool) -> Iterator[tuple[int, bytes]]:
        """The container's output from the engine's log driver as (stream, data) frames in the order written:
        all of it, then (with `follow`) what comes next, until the container exits.

        Not attach(logs=True): while the engine still holds the attach of an agent that was killed (it notices
        only when it next writes to it), such an attach replays nothing, and the output written meanwhile would be
        lost. The SDK's public logs() drops the stream of each frame, so the frames are read here, with the SDK's
        own request helpers (docker-py 5-7), from the same multiplexed stream (8-byte header: stream, size)."""
        response = self._api._get(
            self._api._url("/containers/{0}/logs", container_id),
            params={"stdout": 1, "stderr": 1, "follow": 1 if follow else 0, "timestamps": 0, "tail": "all"},
            stream=True,
        )
        try:
            self._api._raise_for_status(response)
            self._api._disable_socket_timeout(self._api._get_raw_response_socket(response))
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

    def _remove_for_sure(self, container_id: str) -> None:
        """Remove, or raise EngineUnavailable (the reaper tries again): an engine error is not a removal."""
        with _engine("remove a container"):
            try:
                self._api.remove_container(container_id, force=True, v=True)
            except NotFound:
                pass
            except APIError as exc:
                if exc.status_code != 409:  # 409: its removal is already under way
                    raise _RemovalRefused(f"could not remove container {container_id[:12]}: {_explain(exc)}") from None

    def remove(self, container_id: str) -> None:
        """Remove the container; one already gone is not an error, one the engine refuses to remove is logged.
        Raises EngineUnavailable when the engine does not answer."""
        try:
            self._remove_for_sure(container_id)
        except _RemovalRefused as exc:
            log.warning("%s", exc)

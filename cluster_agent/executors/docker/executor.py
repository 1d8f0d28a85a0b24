"""Runs job containers on a Docker engine through the Docker SDK (never the docker CLI).

Traps handled here (see field notes): `wait(timeout=...)` is an HTTP timeout, not a deadline; output is read as
a stream (attach, established before start so no byte is missed) and never loaded whole; pull errors arrive
inside a 200 stream; no `auto_remove`, which races the final inspect; the missing NVIDIA runtime shows up as
`could not select device driver`.
"""

from __future__ import annotations

import logging
import shlex
import threading
import uuid
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest, Mount, Ulimit

from ...clock import SYSTEM_CLOCK, Clock
from ...errors import AgentError, EngineUnavailable, ImageGone, JobFailed, ProbeImageMissing
from ...gpu_injection import GpuInjection, NvidiaRuntimeInjection
from ...models import FailureReason, GpuInfo
from ..base import (
    LABEL_AGENT_VERSION, LABEL_CLUSTER_ID, LABEL_GPU_IDS, LABEL_JOB_ID, LABEL_TIMEOUT, WORKSPACE, ContainerSpec,
    ContainerState, ExitInfo, OutputSink,
)
from ..hardening import hardening
from .engine_kind import DOCKER, EngineKind, identify
from .exits import ExitEvents
from .engine_api import STDERR_FRAME, STDOUT_FRAME, connect, engine_call, explain, log_frames, state_of
from .images import ImagePuller
from .reaper import ContainerReaper

__all__ = ["DockerExecutor", "connect"]

log = logging.getLogger(__name__)

LABEL_SELF_TEST = "radix.self_test"  # the self-test's containers ("1"), never a job's
# The labels of a self-test container: its own, and every job label set empty, so that labels its image carries
# (the image may be a job's, which is hostile) cannot make it look like a job a restarted agent would adopt. Jobs'
# containers set LABEL_SELF_TEST empty for the same reason, so an image cannot make one look like a self-test's.
SELF_TEST_LABELS = {LABEL_SELF_TEST: "1", LABEL_CLUSTER_ID: "", LABEL_JOB_ID: "", LABEL_GPU_IDS: "",
                    LABEL_TIMEOUT: "", LABEL_AGENT_VERSION: ""}
# A self-test container's output is a few node names: the engine keeps no more than this of a flood.
SELF_TEST_LOG_CONFIG = {"type": "json-file", "config": {"max-size": "64k", "max-file": "1"}}


def _lacks_shell(engine_words: str) -> bool:
    """Whether a start failed only because the image has no `sh` (the runtime's words for a missing program)."""
    return '"sh"' in engine_words and ("executable file not found" in engine_words
                                       or "no such file or directory" in engine_words)


class _LimitRefused(Exception):
    """The engine could not set a ulimit the container asked for (start failed, container removed)."""

# A self-test container older than this was left by an agent that died mid-test.
SELF_TEST_STALE_SECONDS = 600.0
# The self-test's GPU container runs one `[ -c ... ]` per device node: seconds at most, even on a loaded engine.
GPU_PROBE_SECONDS = 30.0

# How long a wait relies on the engine's events alone before it checks the container's state itself.
EVENTS_WAIT_SECONDS = 30.0

NVIDIA_RUNTIME_FIX = (
    "the Docker engine has no NVIDIA runtime, so it cannot give GPUs to containers: install the NVIDIA Container "
    "Toolkit on this host and run `nvidia-ctk runtime configure --runtime=docker`, then restart dockerd"
)

PODMAN_INIT_FIX = (
    "Podman has no init binary for job containers (the agent runs every job with --init): install catatonit on "
    "this host (apt-get install catatonit, dnf install catatonit), or set init_path in containers.conf"
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


class _RemovalRefused(EngineUnavailable):
    """The engine answered a removal with an error: the reaper retries, a plain remove() logs it."""


class DockerExecutor:
    max_nodes = 1

    def __init__(
        self,
        client: docker.DockerClient,
        *,
        gpu_injection: GpuInjection | None = None,
        pull_timeout: float = 1800.0,
        pull_stall_seconds: float = 120.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._client = client
        self._clock = clock
        self.gpu_injection: GpuInjection = gpu_injection or NvidiaRuntimeInjection()
        self._api = client.api
        self._images = ImagePuller(self._api, clock=clock, pull_timeout=pull_timeout,
                                   pull_stall_seconds=pull_stall_seconds)
        self._attached: dict[str, Any] = {}
        self._attached_lock = threading.Lock()
        self._reaper = ContainerReaper(self._remove_for_sure)
        self._exits = ExitEvents(self._api, clock=clock)  # started with the first job (exits.py says why)
        self.engine: EngineKind = DOCKER  # identify() tells Docker from Podman

    @property
    def client(self) -> docker.DockerClient:
        return self._client

    @property
    def engine_name(self) -> str:
        return self.engine.engine_name

    @property
    def jobs_die_with_engine(self) -> bool:
        # Without live-restore, a dockerd restart kills every container; Podman has no daemon holding them
        # (each has its conmon), so its API service may stop or restart under running jobs.
        return not self.engine.podman

    def identify(self) -> EngineKind:
        """Ask the engine what it is (Docker or Podman) and adapt to it; before the first job."""
        with engine_call("read the engine's version"):
            try:
                self.engine = identify(self._api.version())
            except APIError as exc:
                raise EngineUnavailable(f"the engine does not tell its version: {explain(exc)}") from None
        self._exits.filters = self.engine.exit_event_filters()
        return self.engine

    def close(self) -> None:
        """Stop reading the engine's events (the mode's close)."""
        self._exits.close()

    def ping(self) -> None:
        try:
            self._api.ping()
        except (DockerException, requests.exceptions.RequestException) as exc:
            raise EngineUnavailable(f"Docker engine does not answer: {exc}") from None

    def info(self) -> dict[str, Any]:
        with engine_call("read engine info"):
            return self._api.info()

    def probe(self, image: str | None, start: bool = False) -> str:
        """The self-test's engine check: the engine answers and, given an image on this host, creates and removes
        a container from it (no network); with `start` (a trusted image, never a job's) it also runs `sh -c 'exit
        0'` in it, boxed in as the GPU check's containers are, so an engine whose runtime cannot start any
        container fails the check. Raises EngineUnavailable, or AgentError with the engine's reason (a broken
        storage driver, a full engine root, a runtime that cannot set a limit)."""
        self.ping()
        if image is None:
            return "answers"
        self._sweep_self_tests()
        if not start and self._declares_volumes(image):
            # A job's image: creating a container from it copies the data of each VOLUME it declares into a new
            # volume, as much as its author chose, at every self-test. The engine answered; that is the check.
            return f"answers (no container created from {image}: it declares a VOLUME)"
        container_id = None
        detail = f"created and removed a container from {image}"
        try:
            with engine_call("self-test: create a container"):
                container_id = self._api.create_container(
                    image, entrypoint=["sh", "-c", "exit 0"] if start else None, command=None if start else ["true"],
                    name=f"radix-self-test-{uuid.uuid4().hex[:12]}", labels=SELF_TEST_LABELS,
                    host_config=self._api.create_host_config(**self._boxed_host_config()))["Id"]
            if start and self._run_probe(container_id, image):
                detail = f"ran `exit 0` in a container from {image}"
        except ImageNotFound:
            raise ProbeImageMissing(f"the self-test image {image} is not on this host: load or pull it there, or set "
                                    "--self-test-image to an image that is") from None
        except APIError as exc:
            raise AgentError(f"the engine cannot create a container from {image}: {explain(exc)[:300]}") from None
        finally:
            if container_id is not None:
                try:
                    with engine_call("self-test: remove the container"):
                        self._api.remove_container(container_id, force=True, v=True)  # and the image's VOLUMEs
                except (APIError, EngineUnavailable):
                    pass
        return detail

    def _declares_volumes(self, image: str) -> bool:
        try:
            with engine_call("self-test: inspect the image"):
                config = self._api.inspect_image(image).get("Config") or {}
        except ImageNotFound:
            raise ProbeImageMissing(f"the self-test image {image} is not on this host") from None
        except APIError as exc:
            raise AgentError(f"the engine cannot inspect {image}: {explain(exc)[:300]}") from None
        return bool(config.get("Volumes"))

    def _run_probe(self, container_id: str, image: str) -> bool:
        """True once `exit 0` ran; False when the image has no sh to run it (what could be checked, create, passed)."""
        try:
            with engine_call("self-test: start a container"):
                self._api.start(container_id)
        except APIError as exc:
            words = explain(exc)
            if _lacks_shell(words):
                return False
            raise AgentError(f"the engine created a container from {image} but cannot start it: {words[:300]}") from None
        try:
            code = self._api.wait(container_id, timeout=GPU_PROBE_SECONDS).get("StatusCode")
        except requests.exceptions.RequestException:
            raise AgentError(f"a container from {image} running `exit 0` did not end in {GPU_PROBE_SECONDS:g} s") from None
        if code != 0:
            raise AgentError(f"a container from {image} running `exit 0` exited {code}: the engine cannot run containers")
        return True

    @staticmethod
    def _boxed_host_config() -> dict[str, Any]:
        """The self-test's containers: no network, nothing to escalate with, little to use, a short log."""
        return {"network_mode": "none", "binds": {}, "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"],
                "read_only": True, "pids_limit": 64, "mem_limit": "128m", "memswap_limit": "128m",
                "nano_cpus": 1_000_000_000, "log_config": SELF_TEST_LOG_CONFIG}

    def probe_gpus(self, image: str | None, gpus: list[GpuInfo]) -> dict[str, str]:
        """The self-test's GPU check, made the way a job gets its GPUs: for each GPU, a container from `image`
        given that GPU alone (through the injection jobs use) must see its device nodes. Returns uuid -> why for
        each GPU it did not; {} without an image (nothing to run here yet). An image without `sh` cannot look:
        said once in the log, nothing held out. Raises EngineUnavailable when the engine does not answer."""
        failures: dict[str, str] = {}
        if image is None:
            return failures
        self._sweep_self_tests()
        for gpu in gpus:
            why = self._probe_gpu(image, gpu)
            if why:
                failures[gpu.uuid] = why
        return failures

    _said_no_shell = False

    def _sweep_self_tests(self) -> None:
        """Remove self-test containers left by an agent killed mid-test (by any agent on this engine: a test takes
        seconds, so one older than SELF_TEST_STALE_SECONDS is nobody's)."""
        try:
            with engine_call("self-test: list stale containers"):
                stale = [c["Id"] for c in self._api.containers(all=True, filters={"label": f"{LABEL_SELF_TEST}=1"})
                         if c.get("Created", 0) < self._clock.wall() - SELF_TEST_STALE_SECONDS
                         and any(name.startswith("/radix-self-test-") for name in c.get("Names") or [])]
            for container_id in stale:
                with engine_call("self-test: remove a stale container"):
                    self._api.remove_container(container_id, force=True, v=True)
        except (APIError, EngineUnavailable) as exc:
            log.debug("self-test: stale containers not swept: %s", exc)

    def _probe_gpu(self, image: str, gpu: GpuInfo) -> str | None:
        how = f"{self.gpu_injection.name} injection"
        try:
            nodes = self.gpu_injection.device_nodes(gpu)
            host_config = self._boxed_host_config()
            env: dict[str, str] = {}
            self._give_gpus([gpu], host_config, env)
        except JobFailed as exc:
            return str(exc)
        # Prints each node it lacks; exits 1 if any.
        script = "m=0; " + "; ".join(f"[ -c {shlex.quote(n)} ] || {{ echo {shlex.quote(n)}; m=1; }}" for n in nodes) + "; exit $m"
        name = f"radix-self-test-{uuid.uuid4().hex[:12]}"
        container_id = None
        try:
            with engine_call("self-test: create a GPU container"):
                created = self._api.create_container(
                    image, entrypoint=["sh", "-c", script], environment=env, name=name, labels=SELF_TEST_LABELS,
                    host_config=self._api.create_host_config(**host_config))
            container_id = created["Id"]
            try:
                with engine_call("self-test: start a GPU container"):
                    self._api.start(container_id)
            except APIError as exc:
                words = explain(exc)
                if _lacks_shell(words):
                    if not DockerExecutor._said_no_shell:
                        DockerExecutor._said_no_shell = True
                        log.warning("self-test: image %s has no sh, so the GPUs cannot be looked at in a container; "
                                    "set --self-test-image to an image with a shell (busybox will do)", image)
                    return None
                return f"a container given it through the {how} did not start: {words[:200]}"
            try:
                code = self._api.wait(container_id, timeout=GPU_PROBE_SECONDS).get("StatusCode")
            except requests.exceptions.RequestException:
                return f"a container given it through the {how} did not finish in {GPU_PROBE_SECONDS:g} s"
            if code == 0:
                return None
            with engine_call("self-test: read a GPU container's output"):
                said = self._api.logs(container_id, stdout=True, stderr=True, tail=20).decode(errors="replace")
            # Only the node names asked about are repeated: the rest of what an image prints stays out of the log.
            missing = [node for node in nodes if node in said.splitlines()]
            if missing:
                return f"a container given it through the {how} has no {', '.join(missing)}"
            return f"a container given it through the {how} could not look for its device nodes (exit {code})"
        except APIError as exc:
            return f"a container given it through the {how} could not be made: {explain(exc)[:200]}"
        finally:
            if container_id is not None:
                try:
                    with engine_call("self-test: remove a GPU container"):
                        self._api.remove_container(container_id, force=True, v=True)
                except (APIError, EngineUnavailable):
                    pass

    def prepare_image(self, image: str, policy: str = "if-not-present", auth: dict[str, str] | None = None) -> None:
        self._images.prepare(image, policy, auth)

    # --- containers ----------------------------------------------------------------------------------------

    def _host_config(self, spec: ContainerSpec) -> tuple[dict[str, Any], dict[str, str]]:
        """The engine's host config for `spec` (hardening.py's policy, the job's GPUs) and its final env."""
        policy = hardening(spec)
        env = dict(spec.env)
        binds: dict[str, Any] = {}
        host_config: dict[str, Any] = {
            # A mount, not a bind: the engine refuses a missing source instead of creating it (as root), so a
            # container started late, after its workspace was removed, cannot bring the directory back.
            "mounts": [Mount(target=WORKSPACE, source=str(spec.workspace), type="bind", read_only=False)] + [
                Mount(target=f"{WORKSPACE}/{target}", source=str(source), type="bind", read_only=True)
                for source, target in spec.read_only_files
            ],
            "binds": binds,
            "privileged": False,
            "security_opt": list(policy.security_opt),
            "init": policy.init,
            "network_mode": policy.network,
            "ipc_mode": policy.ipc_mode,
        }
        if policy.ulimits:
            host_config["ulimits"] = [Ulimit(name=name, soft=soft, hard=hard) for name, soft, hard in policy.ulimits]
        if policy.cpus:
            host_config["nano_cpus"] = int(policy.cpus * 1e9)
        if policy.memory_mb:
            host_config["mem_limit"] = host_config["memswap_limit"] = f"{policy.memory_mb}m"
        if policy.shm_mb:
            host_config["shm_size"] = f"{policy.shm_mb}m"
        if policy.pids_limit:
            host_config["pids_limit"] = policy.pids_limit
        if policy.cap_drop:
            host_config["cap_drop"] = list(policy.cap_drop)
        if policy.read_only_rootfs:
            host_config["read_only"] = True
        if policy.tmpfs:
            host_config["tmpfs"] = dict(policy.tmpfs)
        if spec.gpus:
            self._give_gpus(spec.gpus, host_config, env)
        return host_config, env

    def _give_gpus(self, gpus: list[GpuInfo], host_config: dict[str, Any], env: dict[str, str]) -> None:
        """Add what `gpus` need to reach the container (the injection's devices, mounts, env) to `host_config`
        (with a `binds` dict) and `env`. JobFailed when this host cannot inject them."""
        access = self.gpu_injection.access(gpus)
        if access.runtime_uuids:
            host_config["device_requests"] = [DeviceRequest(device_ids=access.runtime_uuids, capabilities=[["gpu"]])]
        if access.devices:
            host_config["devices"] = [f"{host}:{target}:{perms}" for host, target, perms in access.devices]
        for host, target, read_only in access.mounts:
            host_config["binds"][host] = {"bind": target, "mode": "ro" if read_only else "rw"}
        for name, value in access.env.items():
            if name == "LD_LIBRARY_PATH" and env.get(name):
                value = f"{value}:{env[name]}"  # the driver's libraries first, then the job's
            env[name] = value

    def start(self, spec: ContainerSpec) -> str:
        self._exits.start()
        host_config, env = self._host_config(spec)
        try:
            return self._start(spec, host_config, env)
        except _LimitRefused:
            # An engine that cannot raise the memlock hard limit (rootless, or without CAP_SYS_RESOURCE) refuses
            # the container: it runs with the engine's limit instead, which the log says once.
            if not DockerExecutor._said_memlock:
                DockerExecutor._said_memlock = True
                log.warning("the engine cannot raise the memlock limit of GPU containers (rootless, or it lacks "
                            "CAP_SYS_RESOURCE): they run with its own limit, which may be too low for pinned memory "
                            "and RDMA; give the engine CAP_SYS_RESOURCE or raise LimitMEMLOCK in its service")
            host_config["ulimits"] = [u for u in host_config["ulimits"] if u["Name"] != "memlock"]
            return self._start(spec, host_config, env)

    _said_memlock = False

    def _start(self, spec: ContainerSpec, host_config: dict[str, Any], env: dict[str, str]) -> str:
        try:
            created = self._create(spec, host_config, env)
        except ImageNotFound as exc:
            message = f"image {spec.image}: {explain(exc)}"
            if self._images.assumed_present(spec.image):
                # Found present a moment ago and gone since (pruned, removed by hand). Pulling here would hold the
                # caller's stop lock for the whole pull: the job runner makes it present and calls again.
                self._images.forget(spec.image)
                raise ImageGone(FailureReason.IMAGE_UNAVAILABLE, message) from None
            raise JobFailed(FailureReason.IMAGE_UNAVAILABLE, message) from None
        container_id: str = created["Id"]
        # An image whose labels could forge the exit event is judged by the engine's inspect, never by the event.
        self._exits.watch(container_id, judge_from_event=not spec.memory_mb and not self._images.forges_events(spec.image))
        step = "attach to the container's output"
        try:
            with engine_call(f"{step} of {spec.name}"):
                # Attach before start: every byte the job writes is captured, even from a job that exits at once.
                stream = self._api.attach(container_id, stdout=True, stderr=True, stream=True, logs=False, demux=True)
            with self._attached_lock:
                self._attached[container_id] = stream
            step = "start the container"
            with engine_call(f"{step} {spec.name}"):
                self._api.start(container_id)
        except APIError as exc:
            if "setting rlimit" in explain(exc) and any(u["Name"] == "memlock" for u in host_config.get("ulimits", [])):
                self._forget(container_id)
                with engine_call(f"remove {spec.name}"):
                    self._api.remove_container(container_id, force=True, v=True)  # its name is taken again at once
                raise _LimitRefused() from None
            self._give_up(container_id)
            raise self._classify(exc, step) from None
        except BaseException:
            # The engine may still act on a call it did not answer in time (a late start): the container the
            # agent gave up on is removed now, or as soon as the engine answers again.
            self._give_up(container_id)
            raise
        return container_id

    def _create(self, spec: ContainerSpec, host_config: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
        """Create the container; ImageNotFound goes to the caller, other engine errors become JobFailed."""
        with engine_call(f"create the container {spec.name}"):
            try:
                return self._api.create_container(
                    spec.image,
                    command=spec.command or None,
                    environment=env,
                    working_dir=WORKSPACE,
                    labels={**spec.labels, LABEL_SELF_TEST: ""},  # see SELF_TEST_LABELS
                    name=spec.name,
                    detach=True,
                    host_config=self._api.create_host_config(**host_config),
                )
            except ImageNotFound:
                raise
            except APIError as exc:
                raise self._classify(exc, "create the container") from None

    def _give_up(self, container_id: str) -> None:
        self._forget(container_id)
        self._reaper.remove(container_id)

    @staticmethod
    def _classify(exc: APIError, what: str) -> JobFailed:
        text = explain(exc)
        if "could not select device driver" in text:
            return JobFailed(FailureReason.AGENT_ERROR, f"{NVIDIA_RUNTIME_FIX} (engine said: {text})")
        if "container-init binary not found" in text:
            return JobFailed(FailureReason.AGENT_ERROR, f"{PODMAN_INIT_FIX} (engine said: {text})")
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
        """True once the container exited; False if it still runs after `timeout` seconds."""
        deadline = self._clock.monotonic() + timeout
        # A container started by an earlier agent may have exited before the stream's replay point: the engine's
        # own wait for those, and whenever the stream is down.
        while self._exits.watched(container_id):
            remaining = deadline - self._clock.monotonic()
            # In slices: an exit announced while the stream was away, past the engine's replay, is found by the
            # state check within EVENTS_WAIT_SECONDS.
            if self._exits.wait(container_id, min(remaining, EVENTS_WAIT_SECONDS)) is not None:
                return True
            if not self._exits.connected:
                break
            if not self._still_running(container_id):
                return True
            if self._clock.monotonic() >= deadline:
                return False
        return self._engine_wait(container_id, max(0.0, deadline - self._clock.monotonic()))

    def _still_running(self, container_id: str) -> bool:
        with engine_call("inspect a container"):
            try:
                return bool(self._api.inspect_container(container_id)["State"].get("Running", False))
            except NotFound:
                raise EngineUnavailable(f"container {container_id[:12]} vanished while it ran") from None

    def _engine_wait(self, container_id: str, timeout: float) -> bool:
        # The SDK's timeout is an HTTP read timeout: on expiry it raises (ReadTimeout, or ConnectionError
        # wrapping ReadTimeoutError). Check the container's state to tell a deadline from a broken engine.
        try:
            self._api.wait(container_id, timeout=max(1, int(timeout + 0.999)))
            return True
        except (requests.exceptions.ReadTimeout, requests.exceptions.ConnectionError):
            with engine_call("inspect a container"):
                try:
                    state = self._api.inspect_container(container_id)["State"]
                except NotFound:
                    raise EngineUnavailable(f"container {container_id[:12]} vanished while it ran") from None
            return not state.get("Running", False)
        except NotFound:
            raise EngineUnavailable(f"container {container_id[:12]} vanished while it ran") from None

    def stop(self, container_id: str, grace: float) -> None:
        with engine_call("stop a container"):
            try:
                self._api.stop(container_id, timeout=max(0, int(grace)))
            except NotFound:
                pass

    def exit_info(self, container_id: str) -> ExitInfo:
        announced = self._exits.take(container_id)
        if announced is not None and announced.plain and self._exits.judged_from_event(container_id):
            # Judged from the engine's die event, without waiting for its clean-up of the container.
            return ExitInfo(exit_code=announced.exit_code, oom_killed=False, finished_at=announced.at)
        with engine_call("inspect a container"):
            try:
                state = self._api.inspect_container(container_id)["State"]
            except NotFound:
                raise EngineUnavailable(f"container {container_id[:12]} vanished before its exit code was read") from None
        return ExitInfo(
            exit_code=state.get("ExitCode"),
            oom_killed=bool(state.get("OOMKilled")),
            error=state.get("Error") or "",
            finished_at=state_of(container_id, {"State": state}).finished_at,
        )

    def list_jobs(self, cluster_id: str) -> list[ContainerState]:
        with engine_call("list job containers"):
            found = self._api.containers(all=True, filters={"label": f"{LABEL_CLUSTER_ID}={cluster_id}"})
            states = []
            for item in found:
                if (item.get("Labels") or {}).get(LABEL_SELF_TEST):
                    continue  # never a job, whatever else its labels say
                state = self.inspect(item["Id"])
                if state is not None:
                    states.append(state)
            return states

    def inspect(self, container_id: str) -> ContainerState | None:
        with engine_call("inspect a container"):
            try:
                return state_of(container_id, self._api.inspect_container(container_id))
            except NotFound:
                return None
            except APIError as exc:
                # Podman answers 500 "does not exist in database: no such container" for one removed while it
                # is read (listed, then inspected); Docker answers 404.
                if "no such container" in explain(exc):
                    return None
                raise

    def start_created(self, container_id: str) -> None:
        self._exits.start()
        self._exits.watch(container_id, judge_from_event=False)  # its limits are a previous agent's
        with engine_call("attach to a created container's output"):
            stream = self._api.attach(container_id, stdout=True, stderr=True, stream=True, logs=False, demux=True)
        with self._attached_lock:
            self._attached[container_id] = stream
        try:
            with engine_call("start a created container"):
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
            for stream, data in log_frames(self._api, container_id, follow=state is not None and state.running):
                sink = sinks.get(stream)
                if sink is not None:
                    sink(data)
        except NotFound:
            return
        except (requests.exceptions.RequestException, OSError) as exc:
            log.warning("output replay of container %s broke off: %s", container_id[:12], exc)

    def _remove_for_sure(self, container_id: str) -> None:
        """Remove, or raise EngineUnavailable (the reaper tries again): an engine error is not a removal."""
        with engine_call("remove a container"):
            try:
                self._api.remove_container(container_id, force=True, v=True)
            except NotFound:
                pass
            except APIError as exc:
                if exc.status_code != 409:  # 409: its removal is already under way
                    raise _RemovalRefused(f"could not remove container {container_id[:12]}: {explain(exc)}") from None

    def remove(self, container_id: str) -> None:
        """Remove the container; one already gone is not an error, one the engine refuses to remove is logged.
        Raises EngineUnavailable when the engine does not answer."""
        self._exits.forget(container_id)
        try:
            self._remove_for_sure(container_id)
        except _RemovalRefused as exc:
            log.warning("%s", exc)

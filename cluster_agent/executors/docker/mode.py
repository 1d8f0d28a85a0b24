"""The Docker mode's factory: connect to the engine, check the jobs directory's mount, find the GPUs and how they
reach containers, watch their health, and describe the host (capabilities, disk)."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path
from urllib.parse import urlsplit

from ...capabilities import host_capabilities
from ...disk import DiskGuard
from ...errors import ConfigError, EngineUnavailable
from ...gpu_injection import choose_injection
from ...gpu_pool import GpuPool
from ...gpu_telemetry import GpuTelemetry
from ...gpus import detect_gpus
from ...metrics import Metrics
from ...models import Capabilities, GpuInfo
from ...settings import Settings
from ..mode import ExecutionMode
from .engine_kind import limits_ignored
from .executor import DockerExecutor, connect

__all__ = ["check_jobs_mount", "connect_engine", "open_mode"]

log = logging.getLogger(__name__)

ENGINE_FIX = (
    "start dockerd (or Podman's socket: systemctl enable --now podman.socket), or when the agent runs in a "
    "container mount the socket with -v /var/run/docker.sock:/var/run/docker.sock, or point --docker-host / "
    "RADIX_DOCKER_HOST (else DOCKER_HOST) at the engine, e.g. unix:///run/podman/podman.sock"
)


PERMISSION_FIX = (
    "this user may not use the Docker socket: run the agent as root, or as a user in the socket's group "
    "(`ls -l /var/run/docker.sock` shows it; usually `docker`: `usermod -aG docker $USER`, then log in again)"
)


def engine_fix(error: str) -> str:
    """What to do about an engine that cannot be reached, from how it failed."""
    if "Permission denied" in error or "PermissionError" in error:
        return PERMISSION_FIX
    return ENGINE_FIX


def connect_engine(settings: Settings) -> DockerExecutor:
    try:
        executor = DockerExecutor(
            connect(settings.docker_host), pull_timeout=settings.pull_timeout, pull_stall_seconds=settings.pull_stall_seconds
        )
        executor.ping()
        engine = executor.identify()
        info = executor.info()
        runtimes = info.get("Runtimes") or {}
    except EngineUnavailable as exc:
        raise ConfigError(f"{exc}; {engine_fix(str(exc))}") from None
    log.info("engine: %s", engine.describe())
    if limits_ignored(info):
        log.warning(
            "%s is rootless on cgroup v1, where it cannot set memory, CPU or pids limits: jobs run without "
            "resources.memory_mb, cpus and --pids-limit; use cgroup v2 with the controllers delegated to the "
            "engine's user, or a rootful engine", engine.engine_name,
        )
    dirs = [Path(d.strip()) for d in settings.cdi_spec_dirs.split(",") if d.strip()]
    if engine.podman:
        if settings.gpu_mode == "nvidia":
            raise ConfigError(
                "--gpu-mode / RADIX_GPU_MODE nvidia: the engine is Podman, whose Docker-compatible API ignores "
                "device requests and runtimes, so jobs would run without their GPUs; use --gpu-mode cdi (or auto) "
                "with a CDI spec (`nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml`)"
            )
        # Podman may list an nvidia runtime, but its compatible API would not use it: CDI or nothing.
        runtimes = {}
    executor.gpu_injection = choose_injection(settings.gpu_mode, runtimes, dirs)
    return executor


def _own_container_id(dockerenv: Path = Path("/.dockerenv"), containerenv: Path = Path("/run/.containerenv")) -> str | None:
    """This process's container id, when it runs in a Docker or Podman container."""
    if containerenv.exists():
        # Podman writes this file instead of /.dockerenv; rootful and privileged, it names the container
        # (id="..."); otherwise it is empty, and the id is in the mounts or the cgroup.
        try:
            match = re.search(r'^id="([0-9a-f]{64})"$', containerenv.read_text(), re.MULTILINE)
            if match:
                return match.group(1)
        except OSError:
            pass
        return _id_from_proc() or socket.gethostname()
    if not dockerenv.exists():
        return None
    return _id_from_proc() or socket.gethostname()


def _id_from_proc(mountinfo: Path = Path("/proc/self/mountinfo"), cgroup: Path = Path("/proc/self/cgroup")) -> str | None:
    """The container id in this process's mounts (Docker: /var/lib/docker/containers/<id>/hostname; Podman:
    .../overlay-containers/<id>/userdata/hosts) or cgroup (Podman: libpod-<id>). The hostname is no fallback
    with host networking: it is the host's."""
    # Only the mounts of this container's own /etc/hostname or /etc/hosts: on a host the mount table lists other
    # containers' storage too (rootful Podman's shm mounts), which must not be taken for this process's.
    own_files = r"containers/([0-9a-f]{64})/\S* /etc/(?:hostname|hosts) "
    for path, pattern in ((mountinfo, own_files), (cgroup, r"libpod-([0-9a-f]{64})")):
        try:
            match = re.search(pattern, path.read_text())
        except OSError:
            continue
        if match:
            return match.group(1)
    return None


def own_image(executor: DockerExecutor) -> str | None:
    """The image (its id) of the agent's own container, when it runs in one: trusted, on this host, with a shell."""
    container_id = _own_container_id()
    if container_id is None:
        return None
    try:
        return executor.client.api.inspect_container(container_id).get("Image") or None
    except Exception as exc:  # noqa: BLE001 - no self-test image is a warning, never a failed start
        log.debug("own container %s not found through the engine: %s", container_id, exc)
        return None


def check_jobs_mount(executor: DockerExecutor, jobs_workdir: Path, *, setting: str = "--jobs-workdir / RADIX_JOBS_WORKDIR",
                     what: str = "jobs would not see their files") -> None:
    """In a container, the jobs directory (and the input cache, whose entries jobs mount) must be a bind mount at
    the same path as on the host.

    The engine resolves a job's bind mount on the host, so the path the agent writes input.json to must be the
    very path the engine mounts into the job.
    """
    container_id = _own_container_id()
    if container_id is None:
        return
    try:
        mounts = executor.client.api.inspect_container(container_id).get("Mounts", [])
    except Exception:  # not our engine, or a custom hostname: nothing to compare against
        return
    target = str(jobs_workdir.resolve())
    flag = setting.split(" / ")[0]
    best = None
    for mount in mounts:
        dest = mount.get("Destination", "")
        if target == dest or target.startswith(dest.rstrip("/") + "/"):
            if best is None or len(dest) > len(best.get("Destination", "")):
                best = mount
    fix = f"run the agent with -v {target}:{target} (the same path inside and outside) and {flag} {target}"
    if best is None:
        raise ConfigError(f"{setting}: {target} is not mounted from the host, so {what}; {fix}")
    host_path = best.get("Source", "") + target[len(best["Destination"].rstrip("/")):]
    if host_path != target:
        # The host's directory is the one to keep: mount it at its own path inside too.
        raise ConfigError(
            f"{setting}: {target} is mounted from host path {host_path}; the engine would "
            f"mount the host's {target} into jobs instead; run the agent with -v {host_path}:{host_path} (the same "
            f"path inside and outside) and {flag} {host_path}"
        )


def warn_loopback_api_base(executor: DockerExecutor, api_base: str) -> None:
    """In a container with a network of its own, a loopback --api-base is the container itself: say so once at
    start-up (the agent would otherwise retry `Connection refused` forever)."""
    host = (urlsplit(api_base).hostname or "").lower()
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        return
    container_id = _own_container_id()
    if container_id is None:
        return
    try:
        network = executor.client.api.inspect_container(container_id)["HostConfig"].get("NetworkMode", "")
    except Exception:  # not our engine, or a custom hostname: nothing to go by
        return
    if network != "host":
        log.warning(
            "--api-base %s is a loopback address, but this agent runs in a container on %s, where it "
            "means the container itself: use the host's address (e.g. http://<host ip>:<port>, or "
            "host.docker.internal with --add-host host.docker.internal:host-gateway), or run the agent with "
            "--network host", api_base,
            # Docker's NetworkMode for its default bridge is "default" (or "bridge"): name it as users know it.
            "the default bridge network" if network in ("", "default", "bridge") else f"the network {network!r}",
        )


def open_mode(settings: Settings, metrics: Metrics | None = None) -> ExecutionMode:
    """Everything the agent (with `metrics`: GPU health is watched and exported) or run-job needs in Docker mode.
    Raises ConfigError (no engine, a mis-mounted jobs directory)."""
    executor = connect_engine(settings)
    check_jobs_mount(executor, settings.jobs_workdir)
    if settings.cache_dir is not None:
        check_jobs_mount(executor, settings.cache_dir, setting="--cache-dir / RADIX_CACHE_DIR",
                         what="jobs could not mount their cached inputs")
    if settings.api_base:
        warn_loopback_api_base(executor, settings.api_base)
    gpus = detect_gpus()
    pool = GpuPool(gpus)
    telemetry: GpuTelemetry | None = None
    engine = executor.info()
    capabilities = host_capabilities(
        gpus,
        execution_mode=settings.execution_mode,
        max_concurrent_jobs=settings.max_concurrent_jobs,
        engine_version=engine.get("ServerVersion"),
        gpu_injection=executor.gpu_injection.name,
    )
    if gpus:
        log.info("%d GPU(s); they reach containers through: %s", len(gpus), executor.gpu_injection.name)
        if executor.gpu_injection.name == "none":
            log.warning("GPU jobs will fail on this host until it can inject GPUs into containers")
    if metrics is not None:
        telemetry = GpuTelemetry(gpus, pool, max_temperature=settings.gpu_max_temperature)
        if telemetry.open():
            # A finished job's GPUs go back only once NVML sees no compute process left on them.
            pool.watch_processes(telemetry.compute_pids)
            telemetry.start(settings.gpu_health_interval)
            metrics.add_gpu_source(telemetry.latest, telemetry.units)
    engine_root = engine.get("DockerRootDir")
    disk = DiskGuard(
        settings.jobs_workdir, Path(engine_root) if engine_root else None, min_free_gb=settings.min_free_disk_gb,
        prune_to_free_gb=settings.prune_to_free_gb, engine_api=executor.client.api,
    )

    def report() -> Capabilities:
        update: dict[str, object] = {"disk": disk.state.to_wire()}
        if gpus and telemetry is not None:
            update["gpus"] = [GpuInfo(**g) for g in telemetry.report()]
        return capabilities.model_copy(update=update)

    def close() -> None:
        executor.close()
        if telemetry is not None:
            telemetry.close()

    return ExecutionMode(executor=executor, gpus=pool, disk=disk, capabilities=report, close=close,
                         self_test_image=settings.self_test_image or own_image(executor))

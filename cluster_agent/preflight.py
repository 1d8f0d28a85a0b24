"""Start-up checks: each failure is a ConfigError that names the setting and the fix (exit code 2)."""

from __future__ import annotations

import os
import re
import socket
import threading
from pathlib import Path

from .control_plane import ControlPlaneClient
from .errors import ConfigError, ControlPlaneError, EngineUnavailable, TokenRejected
from .executors.docker import DockerExecutor, connect
from .executors.slurm import SlurmExecutor
from .executors.slurm_script import cluster_args
from .files import write_atomic
from .gpu_injection import choose_injection
from .settings import Settings
from .slurm_cli import SlurmCli, SlurmRefused
from .slurm_cluster import check_shared_storage

ENGINE_FIX = (
    "start dockerd, or when the agent runs in a container mount the socket with "
    "-v /var/run/docker.sock:/var/run/docker.sock, or point --docker-host / DOCKER_HOST at the engine"
)


def check_jobs_workdir(path: Path) -> None:
    where = "--jobs-workdir / RADIX_JOBS_WORKDIR"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".radix-write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{where}: cannot write to {path}: {exc.strerror or exc}; create it and give the agent's user write "
            "access, or choose another directory"
        ) from None


def connect_slurm(settings: Settings) -> SlurmExecutor:
    """--execution-mode slurm: the Slurm commands answer, the controller is up, the nodes see the jobs directory."""
    cli = SlurmCli()
    missing = cli.available()
    if missing:
        raise ConfigError(
            f"--execution-mode slurm: {', '.join(missing)} not found on PATH; run the agent on a Slurm login node "
            "(apt-get install slurm-client, with the cluster's slurm.conf and munge key), or use --execution-mode docker"
        )
    args = cluster_args(settings)
    try:
        cli.ping()
        try:
            # Nothing is submitted: Slurm only says whether it would take a job with these settings.
            cli.run("sbatch", "--test-only", "--export=NONE", "--output=/dev/null", *args, "--wrap", "true")
        except SlurmRefused as exc:
            raise ConfigError(
                f"--slurm-partition / --slurm-account / --slurm-qos / --slurm-sbatch-args: Slurm would refuse every job "
                f"({exc}); fix these settings (sinfo and sacctmgr show assoc list what this user may use)"
            ) from None
        check_shared_storage(cli, settings.jobs_workdir, settings.slurm_storage_probe_seconds, args)
    except (EngineUnavailable, SlurmRefused) as exc:
        raise ConfigError(
            f"--execution-mode slurm: {exc}; check that slurmctld runs and that this host's slurm.conf and munge "
            "key match the cluster's (try: scontrol ping)"
        ) from None
    return SlurmExecutor(settings, cli)


def connect_engine(settings: Settings) -> DockerExecutor:
    try:
        executor = DockerExecutor(
            connect(settings.docker_host), pull_timeout=settings.pull_timeout, pull_stall_seconds=settings.pull_stall_seconds
        )
        executor.ping()
        runtimes = executor.info().get("Runtimes") or {}
    except EngineUnavailable as exc:
        raise ConfigError(f"{exc}; {ENGINE_FIX}") from None
    dirs = [Path(d.strip()) for d in settings.cdi_spec_dirs.split(",") if d.strip()]
    executor.gpu_injection = choose_injection(settings.gpu_mode, runtimes, dirs)
    return executor


def _own_container_id() -> str | None:
    """This process's container id, when it runs in a Docker container."""
    if not Path("/.dockerenv").exists():
        return None
    try:
        mountinfo = Path("/proc/self/mountinfo").read_text()
        match = re.search(r"/containers/([0-9a-f]{64})/", mountinfo)
        if match:
            return match.group(1)
    except OSError:
        pass
    return socket.gethostname()


def check_jobs_mount(executor: DockerExecutor, jobs_workdir: Path) -> None:
    """In a container, the jobs directory must be a bind mount at the same path as on the host.

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
    best = None
    for mount in mounts:
        dest = mount.get("Destination", "")
        if target == dest or target.startswith(dest.rstrip("/") + "/"):
            if best is None or len(dest) > len(best.get("Destination", "")):
                best = mount
    fix = f"run the agent with -v {target}:{target} (the same path inside and outside) and --jobs-workdir {target}"
    if best is None:
        raise ConfigError(f"--jobs-workdir / RADIX_JOBS_WORKDIR: {target} is not mounted from the host, so jobs would not see their files; {fix}")
    host_path = best.get("Source", "") + target[len(best["Destination"].rstrip("/")):]
    if host_path != target:
        raise ConfigError(
            f"--jobs-workdir / RADIX_JOBS_WORKDIR: {target} is mounted from host path {host_path}; the engine would "
            f"mount the host's {target} into jobs instead; {fix}"
        )


def resolve_token(settings: Settings, client: ControlPlaneClient, cancel: threading.Event) -> str:
    """The cluster token: the setting, else the token file, else a one-time token exchanged and saved."""
    if settings.cluster_token is not None and settings.cluster_token.get_secret_value():
        return settings.cluster_token.get_secret_value()
    token_file = settings.token_file
    where = "--token-file / RADIX_TOKEN_FILE"
    try:
        saved = token_file.read_text().strip() if token_file.exists() else ""
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {token_file}: {exc.strerror}") from None
    if saved:
        return saved
    if settings.one_time_token is None or not settings.one_time_token.get_secret_value():
        raise ConfigError(
            "no cluster token: give --cluster-token / RADIX_CLUSTER_TOKEN, or --one-time-token / RADIX_ONE_TIME_TOKEN "
            f"on the first start (the exchanged token is then saved in {token_file})"
        )
    # Check the file can be written before spending the one-time token.
    try:
        token_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not os.access(token_file.parent, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot write {token_file.parent}: {exc.strerror}; the exchanged token must be saved") from None
    try:
        token = client.exchange_token(settings.one_time_token.get_secret_value(), cancel=cancel, attempts=0)
    except TokenRejected:
        raise ConfigError(
            "--one-time-token / RADIX_ONE_TIME_TOKEN was rejected by the control plane (it may have been used "
            "already); get a new one, or give the cluster token with --cluster-token"
        ) from None
    except ControlPlaneError as exc:
        raise ConfigError(f"token exchange failed: {exc}") from None
    write_atomic(token_file, (token + "\n").encode(), mode=0o600)
    return token

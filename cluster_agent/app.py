"""Entry point: parse settings, run the start-up checks, wire the parts together, handle signals.

Exit codes: 0 after a clean shutdown (or a succeeded `run-job`), 1 for a failed `run-job`, 2 for a
configuration problem (printed as one line naming the setting and the fix, no traceback).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from . import __version__
from .agent import Agent
from .capabilities import host_capabilities
from .cli import build_parser, load_settings
from .control_plane import ControlPlaneClient
from .errors import ConfigError
from .executors import Executor
from .gpu_pool import GpuAllocator, GpuPool
from .gpus import detect_gpus
from .heartbeat import Heartbeat
from .job_runner import JobRun
from .jobs_lock import claim as claim_jobs_workdir
from .logs import configure, escape_controls
from .redaction import Redactor
from .disk import DiskGuard
from .gpu_telemetry import GpuTelemetry
from .metrics import Metrics
from .ops_server import OpsServer
from .models import Capabilities, FailureReason, GpuInfo
from .preflight import check_jobs_mount, check_jobs_workdir, connect_engine, connect_slurm, resolve_token
from .settings import Settings
from .slurm_cluster import SlurmCluster

log = logging.getLogger("cluster_agent")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Shared by the log formatter and the start-up error line: a server may echo a token into either.
    redactor = Redactor()
    try:
        if argv and argv[0] == "run-job":
            return _run_job(argv[1:], redactor)
        return _run_agent(argv, redactor)
    except ConfigError as exc:
        print(f"radix-cluster-agent: error: {escape_controls(redactor.redact(str(exc)))}", file=sys.stderr)
        return 2


def _parse(argv: list[str], *, job_file: bool) -> tuple[Settings, dict[str, Any]]:
    parser = build_parser()
    if job_file:
        parser.add_argument("job_file", metavar="JOB.json", help="job spec to run")
    namespace = vars(parser.parse_args(argv))
    extra = {"job_file": namespace.pop("job_file")} if job_file else {}
    return load_settings(namespace), extra


def _run_agent(argv: list[str], redactor: Redactor) -> int:
    settings, _ = _parse(argv, job_file=False)
    settings.require_agent_settings()
    assert settings.api_base and settings.cluster_id
    formatter = configure(settings.log_level, settings.log_format, redactor=redactor)
    for secret in (settings.cluster_token, settings.one_time_token):
        formatter.add_secret(secret.get_secret_value() if secret else None)

    check_jobs_workdir(settings.jobs_workdir)
    jobs_lock = claim_jobs_workdir(settings.jobs_workdir, settings.jobs_lock_wait)
    slurm = settings.execution_mode == "slurm"
    executor: Executor
    if slurm:
        executor = slurm_executor = connect_slurm(settings)
    else:
        executor = docker = connect_engine(settings)
        check_jobs_mount(docker, settings.jobs_workdir)

    stop = threading.Event()
    _install_signal_handlers(stop)
    metrics = Metrics()
    client = ControlPlaneClient(settings.api_base, settings.cluster_id, settings.tenant_id, metrics=metrics)
    token = resolve_token(settings, client, stop)
    formatter.add_secret(token)
    client.set_token(token)

    telemetry: GpuTelemetry | None = None
    pool: GpuAllocator
    if slurm:
        # No engine and no GPUs here: Slurm owns both. The heartbeat describes the cluster instead of this host.
        cluster = SlurmCluster(slurm_executor.cli, settings.slurm_partition)
        pool = cluster.gpus()
        disk = DiskGuard(settings.jobs_workdir, None, min_free_gb=settings.min_free_disk_gb, prune_to_free_gb=0,
                         engine_api=None)
        extra = {"execution_mode": "slurm", "max_concurrent_jobs": settings.max_concurrent_jobs}
        view = cluster.view()
        if view is not None:
            log.info("Slurm cluster %s: %d node(s), %d GPU(s) (%d idle)", view.name or "?", view.nodes, view.gpus,
                     view.idle_gpus)

        def report() -> Capabilities:
            return cluster.capabilities(disk=disk.state.to_wire(), **extra)
    else:
        gpus = detect_gpus()
        engine = docker.info()
        capabilities = host_capabilities(
            gpus,
            execution_mode=settings.execution_mode,
            max_concurrent_jobs=settings.max_concurrent_jobs,
            engine_version=engine.get("ServerVersion"),
            gpu_injection=docker.gpu_injection.name,
        )
        if gpus:
            log.info("%d GPU(s); they reach containers through: %s", len(gpus), docker.gpu_injection.name)
            if docker.gpu_injection.name == "none":
                log.warning("GPU jobs will fail on this host until it can inject GPUs into containers")
        pool = GpuPool(gpus)
        telemetry = GpuTelemetry(gpus, pool, max_temperature=settings.gpu_max_temperature)
        if telemetry.open():
            telemetry.start(settings.gpu_health_interval)
            metrics.add_gpu_source(telemetry.latest)

        engine_root = engine.get("DockerRootDir")
        disk = DiskGuard(
            settings.jobs_workdir, Path(engine_root) if engine_root else None, min_free_gb=settings.min_free_disk_gb,
            prune_to_free_gb=settings.prune_to_free_gb, engine_api=docker.client.api,
        )

        def report() -> Capabilities:
            update: dict[str, object] = {"disk": disk.state.to_wire()}
            if gpus and telemetry is not None:
                update["gpus"] = [GpuInfo(**g) for g in telemetry.report()]
            return capabilities.model_copy(update=update)

    disk.check()

    heartbeat = Heartbeat(client, report, settings.heartbeat_interval)
    agent = Agent(settings, client, executor, pool, heartbeat, metrics=metrics, disk=disk)
    agent.stopping = stop
    ops = _start_ops_server(settings, metrics, agent)
    try:
        return agent.run()
    finally:
        if ops is not None:
            ops.stop()
        if telemetry is not None:
            telemetry.close()
        client.close()
        jobs_lock.release()


def _start_ops_server(settings: Settings, metrics: Metrics, agent: Agent) -> OpsServer | None:
    if not settings.metrics_port:
        return None
    # Polls come back at least every long-poll hold or poll interval: a silence of twice that (plus retries) is not.
    stale_after = settings.health_stale_seconds or 2 * max(settings.long_poll_seconds, settings.poll_interval) + 60
    try:
        ops = OpsServer(settings.metrics_host, settings.metrics_port, metrics, loop_alive=agent.poller_alive,
                        stale_after=stale_after)
    except OSError as exc:
        raise ConfigError(
            f"--metrics-port / RADIX_METRICS_PORT: cannot listen on {settings.metrics_host}:{settings.metrics_port} "
            f"({exc.strerror}); choose a free port, or 0 to turn the endpoint off"
        ) from None
    ops.start()
    return ops


def _install_signal_handlers(stop: threading.Event) -> None:
    def handle(signum: int, _frame: object) -> None:
        if stop.is_set():
            # Second signal: the operator wants out now.
            os._exit(130 if signum == signal.SIGINT else 143)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


def _run_job(argv: list[str], redactor: Redactor) -> int:
    """Run one job spec on the local engine, no control plane, and print its completion body."""
    settings, extra = _parse(argv, job_file=True)
    configure(settings.log_level, settings.log_format, redactor=redactor)
    path = Path(extra["job_file"])
    try:
        raw = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"job file {path} is not valid JSON: {exc}") from None
    check_jobs_workdir(settings.jobs_workdir)
    # An agent on the same directory would take this job's directory for one it must recover.
    jobs_lock = claim_jobs_workdir(settings.jobs_workdir, settings.jobs_lock_wait)
    executor: Executor
    pool: GpuAllocator
    if settings.execution_mode == "slurm":
        slurm_executor = connect_slurm(settings)
        executor, pool = slurm_executor, SlurmCluster(slurm_executor.cli, settings.slurm_partition).gpus()
    else:
        executor = docker = connect_engine(settings)
        check_jobs_mount(docker, settings.jobs_workdir)
        pool = GpuPool(detect_gpus())
    run = JobRun(raw, settings=settings, executor=executor, gpu_pool=pool, received_at=time.monotonic())
    stop = threading.Event()
    _install_signal_handlers(stop)
    watcher = threading.Thread(
        target=lambda: stop.wait() and run.stop(FailureReason.INTERRUPTED, "interrupted by a signal"),
        daemon=True,
        name="signals",
    )
    watcher.start()
    completion = run.execute()
    run.cleanup()
    jobs_lock.release()
    print(json.dumps(completion.to_wire(), indent=2))
    return 0 if completion.status.value == "succeeded" else 1


__all__ = ["main", "__version__"]

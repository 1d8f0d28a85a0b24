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
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__, healthcheck
from .agent import Agent
from .cli import build_parser, load_settings
from .control_plane import ControlPlaneClient
from .errors import ConfigError
from .heartbeat import Heartbeat
from .job_runner import JobRun
from .jobs_lock import claim as claim_jobs_workdir
from .logs import configure, escape_controls
from .metrics import Metrics
from .models import Capabilities, FailureReason
from .modes import open_mode
from .node_health import NodeHealth
from .ops_server import OpsServer
from .preflight import check_jobs_workdir, resolve_token
from .received_job import ReceivedJob
from .redaction import Redactor
from .settings import Settings
from .transfer import JobData

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
    metrics = Metrics()
    mode = open_mode(settings, metrics)

    stop = threading.Event()
    _install_signal_handlers(stop)
    client = ControlPlaneClient(settings.api_base, settings.cluster_id, settings.tenant_id, metrics=metrics)
    token = resolve_token(settings, client, stop)
    formatter.add_secret(token)
    client.set_token(token)
    mode.disk.check()

    data = JobData.from_settings(settings, planner=client)
    changed: list[Callable[[], None]] = []
    heartbeat_box: list[Heartbeat] = []
    node = NodeHealth(
        settings, engine_probe=mode.executor.probe, gpus=mode.gpus, gpu_probe=mode.executor.probe_gpus,
        probe_image=mode.self_test_image,
        token_rejected=lambda: bool(heartbeat_box) and heartbeat_box[0].token_rejected,
        on_change=lambda: [call() for call in changed],
    )
    heartbeat = Heartbeat(client, _with_extras(mode.capabilities, data, node), settings.heartbeat_interval)
    heartbeat_box.append(heartbeat)
    agent = Agent(settings, client, mode.executor, mode.gpus, heartbeat, metrics=metrics, disk=mode.disk,
                  redactor=redactor, jobs_dir_held=jobs_lock.still_held, data=data, node=node)
    changed.append(agent.node_changed)
    agent.stopping = stop
    signal.signal(signal.SIGUSR1, lambda _signum, _frame: threading.Thread(
        target=node.clear, args=("the operator (SIGUSR1)",), name="clear-quarantine", daemon=True).start())
    ops = _start_ops_server(settings, metrics, agent, node.report)
    healthcheck.write_beacon(ops.healthz_url if ops is not None else None, settings.health_file)
    try:
        return agent.run()
    finally:
        if ops is not None:
            ops.stop()
        mode.close()
        data.close()
        client.close()
        jobs_lock.release()


def _with_extras(capabilities: Callable[[], Capabilities], data: JobData, node: NodeHealth) -> Callable[[], Capabilities]:
    """The heartbeat's capabilities, with the node's health (self-test, quarantine) and the input cache's size and
    free space when there is a cache."""
    cache = data.cache

    def report() -> Capabilities:
        extras: dict[str, Any] = {"health": node.report()}
        if cache is not None:
            extras["input_cache"] = cache.stats()
        return capabilities().model_copy(update=extras)

    return report


def _start_ops_server(settings: Settings, metrics: Metrics, agent: Agent,
                      node: Callable[[], dict[str, Any]] | None = None) -> OpsServer | None:
    if not settings.metrics_port:
        return None
    # Polls come back at least every long-poll hold or poll interval: a silence of twice that (plus retries) is not.
    stale_after = settings.health_stale_seconds or 2 * max(settings.long_poll_seconds, settings.poll_interval) + 60
    try:
        ops = OpsServer(settings.metrics_host, settings.metrics_port, metrics, loop_alive=agent.poller_alive,
                        stale_after=stale_after, node=node)
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
    if isinstance(raw, dict) and raw.get("job_id") in (None, ""):
        # As the development control plane does: a job file need not name its job.
        raw = {**raw, "job_id": f"job-{uuid.uuid4().hex[:12]}"}
        log.info("%s names no job_id: running it as %s", path, raw["job_id"])
    check_jobs_workdir(settings.jobs_workdir)
    # An agent on the same directory would take this job's directory for one it must recover. A one-shot command
    # does not wait for a running agent to go: it says so at once.
    jobs_lock = claim_jobs_workdir(settings.jobs_workdir, 0)
    mode = open_mode(settings)
    data = JobData.from_settings(settings, planner=None)  # a bad --cache-dir is a start-up error, not a job's
    run = JobRun(ReceivedJob.parse(raw, redactor), settings=settings, executor=mode.executor, gpu_pool=mode.gpus,
                 received_at=time.monotonic(), redactor=redactor, data=data)
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
    mode.close()
    data.close()
    jobs_lock.release()
    print(json.dumps(completion.to_wire(), indent=2))
    return 0 if completion.status.value == "succeeded" else 1


__all__ = ["main", "__version__"]

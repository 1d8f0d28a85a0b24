"""The Slurm executor: each job is one sbatch job whose batch script runs the job's container on the node Slurm
picks. Slurm schedules; the agent submits, watches (one squeue per interval for all its jobs), streams the output
files, cancels with scancel, and reads how it ended.

State lives where a restarted agent finds it: Slurm itself (jobs named `radix-<cluster>-<job>`) and, per job, a
state directory `{jobs_workdir}/.radix-slurm/<job_id>/` on the shared storage (batch script, labels, output files,
and the exit.json the script writes on the node), which also answers for jobs slurmctld has already forgotten.

How Slurm's own ends map to the contract (exit_info):
    TIMEOUT, DEADLINE          -> timeout
    OUT_OF_MEMORY              -> oom
    CANCELLED (not by us)      -> canceled
    PREEMPTED                  -> interrupted  (the scheduler took the resources back; resubmit)
    NODE_FAIL, BOOT_FAIL       -> agent_error  (the node failed, not the job; resubmit)
    exit.json reason           -> image_unavailable / agent_error (the node could not pull or run the container)
    otherwise                  -> the container's exit code, as on Docker
"""

from __future__ import annotations

import base64
import getpass
import json
import logging
import shutil
import threading
from pathlib import Path

from ... import __version__
from ...clock import SYSTEM_CLOCK, Clock
from ...errors import EngineUnavailable, JobFailed, SlurmRefused
from ...files import read_json, write_private
from ...models import MAX_NODES, FailureReason, GpuInfo
from ...settings import Settings
from .cli import QueueView, SlurmCli, SlurmJob
from ..base import LABEL_CLUSTER_ID, LABEL_JOB_ID, STOP_GRACE_SECONDS, ContainerSpec, ContainerState, ExitInfo, OutputSink
from .script import batch_script, node_script, sbatch_args

__all__ = ["SlurmExecutor"]

log = logging.getLogger(__name__)

STATE_DIR_NAME = ".radix-slurm"
OUTPUT_POLL_SECONDS = 0.25
# How long after Slurm says "ended" the output files may still grow (NFS attribute caching, slurmstepd's flush).
OUTPUT_SETTLE_SECONDS = 1.0
READ_CHUNK = 1024 * 1024
MISSING_GRACE_SECONDS = 30.0

SLURM_FAILURES: dict[str, tuple[FailureReason, str]] = {
    "TIMEOUT": (FailureReason.TIMEOUT, "Slurm ended the job at its time limit (--time); raise timeout_seconds if it needs longer"),
    "DEADLINE": (FailureReason.TIMEOUT, "Slurm ended the job at its deadline"),
    "OUT_OF_MEMORY": (FailureReason.OOM, "Slurm killed the job for running out of memory; raise resources.memory_mb"),
    "CANCELLED": (FailureReason.CANCELED, "the Slurm job was cancelled outside the agent (scancel by a user or an administrator)"),
    "PREEMPTED": (FailureReason.INTERRUPTED, "Slurm preempted the job for higher-priority work; resubmit it"),
    "NODE_FAIL": (FailureReason.AGENT_ERROR, "the Slurm node failed while the job ran; the job did not fail by itself: resubmit it"),
    "BOOT_FAIL": (FailureReason.AGENT_ERROR, "the Slurm node failed to boot for the job; resubmit it"),
}
NODE_REASONS = {"image_unavailable": FailureReason.IMAGE_UNAVAILABLE, "agent_error": FailureReason.AGENT_ERROR,
                "invalid_job": FailureReason.INVALID_JOB}
# Why Slurm keeps a job pending that it can never run as asked (slurm.conf's EnforcePartLimits=NO, the default,
# lets sbatch accept it): more nodes than the partition has or allows, a constraint no node meets (squeue(1),
# "JOB REASON CODES"). The agent ends such a job as invalid_job instead of waiting forever.
NEVER_RUN_REASONS = ("PartitionNodeLimit", "PartitionConfig", "BadConstraints")


class SlurmExecutor:
    jobs_die_with_engine = False  # slurmctld restarting does not end jobs
    engine_name = "the Slurm controller"
    max_nodes = MAX_NODES

    def __init__(
        self, settings: Settings, cli: SlurmCli | None = None, *, user: str | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._settings = settings
        self._clock = clock
        self.cli = cli or SlurmCli()
        self._user = user or getpass.getuser()
        self._queue = QueueView(self.cli, self._user, settings.slurm_poll_interval)
        self.state_root = settings.jobs_workdir / STATE_DIR_NAME
        self._job_of: dict[str, str] = {}  # slurm job id -> radix job id
        self._missing_since: dict[str, float] = {}
        self._lock = threading.Lock()

    # --- the engine as a whole -----------------------------------------------------------------------------

    def ping(self) -> None:
        self.cli.ping()

    def probe(self, image: str | None, start: bool = False) -> str:
        """The self-test's engine check: Slurm answers (the nodes' engines are Slurm's to watch)."""
        self.ping()
        return "Slurm answers"

    def probe_gpus(self, image: str | None, gpus: list[GpuInfo]) -> dict[str, str]:
        """Nothing to look at here: the nodes' GPUs are Slurm's (its health check program drains a bad node)."""
        return {}

    def prepare_image(self, image: str, policy: str = "if-not-present", auth: dict[str, str] | None = None) -> None:
        """Nothing to do here: the batch script pulls on the node Slurm picks (the login node needs no engine)."""

    # --- one job -------------------------------------------------------------------------------------------

    def state_dir(self, job_id: str) -> Path:
        return self.state_root / job_id

    def start(self, spec: ContainerSpec) -> str:
        job_id = spec.labels[LABEL_JOB_ID]
        state = self.state_dir(job_id)
        script = batch_script(spec, self._settings, state, grace=STOP_GRACE_SECONDS, version=__version__)
        try:
            self._write_state(state, spec, script)
            if spec.nodes > 1:
                # srun starts it on every node from the shared state directory (sbatch copies only its own script).
                write_private(state / "node.sh", node_script(spec, self._settings, state, grace=STOP_GRACE_SECONDS,
                                                             version=__version__).encode())
        except OSError as exc:
            raise JobFailed(FailureReason.AGENT_ERROR, f"cannot write the job's Slurm state directory {state}: "
                            f"{exc.strerror or exc}; check free space and permissions of --jobs-workdir") from None
        try:
            slurm_id = self.cli.submit(sbatch_args(spec, self._settings, state), script)
        except SlurmRefused as exc:
            raise JobFailed(FailureReason.INVALID_JOB, f"Slurm refused the job: {exc}; fix the job's resources or the "
                            "agent's --slurm-* settings (partition, account, QoS)") from None
        except EngineUnavailable:
            # sbatch may have timed out after slurmctld took the job: a job reported failed must not run anyway.
            slurm_id = self._submitted_as(spec.name)
            if slurm_id is None:
                raise
        (state / "slurm_job_id").write_text(slurm_id)
        with self._lock:
            self._job_of[slurm_id] = job_id
        self._queue.invalidate()
        log.info("job %s: submitted as Slurm job %s", job_id, slurm_id)
        return slurm_id

    def _submitted_as(self, name: str) -> str | None:
        try:
            return next((job.job_id for job in self._queue.jobs(max_age=0).values() if job.name == name), None)
        except EngineUnavailable:
            return None

    @classmethod
    def _write_state(cls, state: Path, spec: ContainerSpec, script: str) -> None:
        # A fresh state directory: files of an earlier attempt (a restarted job) must not be read as this one's.
        shutil.rmtree(state, ignore_errors=True)
        state.mkdir(parents=True, mode=0o700)
        # The script holds the job's env: readable by the agent's user only (sbatch gets it on stdin).
        write_private(state / "batch.sh", script.encode())
        (state / "labels.json").write_text(json.dumps(spec.labels))
        if spec.registry_auth:
            cls._write_auth(state, spec.image, spec.registry_auth)

    @staticmethod
    def _write_auth(state: Path, image: str, auth: dict[str, str]) -> None:
        first = image.split("/", 1)[0]
        # The image's registry as docker names it: a host part has a '.' or a ':' (or is localhost); else Docker Hub.
        default = first if "/" in image and ("." in first or ":" in first or first == "localhost") \
            else "https://index.docker.io/v1/"
        registry = auth.get("serveraddress") or default
        token = base64.b64encode(f"{auth.get('username', '')}:{auth.get('password', '')}".encode()).decode()
        (state / "auth").mkdir(mode=0o700)
        path = state / "auth" / "config.json"
        write_private(path, json.dumps({"auths": {registry: {"auth": token}}}).encode())

    def _job(self, slurm_id: str) -> SlurmJob | None:
        return self._queue.jobs().get(slurm_id)

    def wait_started(self, container_id: str, stop: threading.Event) -> float | None:
        logged = False
        while not stop.is_set():
            job = self._job_or_ended(container_id)
            if job is None or job.terminal:
                return job.start_time if job is not None and job.start_time else None
            if not job.queued and job.state != "UNKNOWN":
                return job.start_time or self._clock.wall()
            if job.reason in NEVER_RUN_REASONS:
                self._refuse(container_id, job.reason)
                return None
            if not logged:
                why = job.reason if job.reason not in ("", "None") else job.state
                log.info("Slurm job %s is queued (%s)", container_id, why)
                logged = True
            stop.wait(self._settings.slurm_poll_interval)
        return None

    def _refuse(self, slurm_id: str, reason: str) -> None:
        """A job Slurm will never start as asked: its failure (invalid_job, Slurm's reason) where the node's would
        be, then scancel."""
        state = self._state_for(slurm_id)
        try:
            if state is None:
                raise FileNotFoundError(slurm_id)
            write_private(state / "node_error.txt", (
                f"Slurm will never start this job as asked (pending: {reason}): it asks for more nodes than the "
                "partition has or allows, or for a constraint no node meets (`scontrol show partition` says what "
                "there is); ask for fewer nodes, or send it to a partition with more (--slurm-partition)\n").encode())
            write_private(state / "exit.json",
                          json.dumps({"exit_code": None, "oom_killed": False, "reason": "invalid_job"}).encode())
        except OSError as exc:
            log.warning("Slurm job %s: its refusal cannot be written (%s): Slurm's cancel will stand for it", slurm_id, exc)
        log.warning("Slurm job %s: pending for %s, which it never leaves: cancelled as invalid_job", slurm_id, reason)
        try:
            self.cli.cancel(slurm_id)
        except (SlurmRefused, EngineUnavailable) as exc:
            log.warning("Slurm job %s: scancel failed: %s", slurm_id, exc)

    def _job_or_ended(self, slurm_id: str) -> SlurmJob | None:
        """The job's state: ended once the node wrote exit.json (the container is gone and its output is in the
        files, even while slurmctld has not heard yet); else the queue's view, else scontrol's (None: nothing)."""
        state = self._state_for(slurm_id)
        written = read_json(state / "exit.json") if state is not None else None
        job = self._job(slurm_id)
        # Not when Slurm signalled the job (scancel, time limit, preemption): only Slurm's final state says which.
        if isinstance(written, dict) and not written.get("signalled") and (job is None or not job.terminal):
            return SlurmJob(job_id=slurm_id, state="COMPLETED", name="", start_time=job.start_time if job else None)
        if job is None:
            job = self.cli.show_job(slurm_id)
        if job is not None:
            with self._lock:
                self._missing_since.pop(slurm_id, None)
            return job
        # Unknown to Slurm. A controller that has just restarted may answer before it has reloaded its jobs:
        # only a job missing for a while is taken as gone (it ended longer ago than MinJobAge, or never existed).
        with self._lock:
            since = self._missing_since.setdefault(slurm_id, self._clock.monotonic())
        if self._clock.monotonic() - since < MISSING_GRACE_SECONDS:
            return SlurmJob(job_id=slurm_id, state="UNKNOWN", name="")
        return None

    def stream_output(self, container_id: str, on_stdout: OutputSink, on_stderr: OutputSink) -> None:
        self.replay_output(container_id, on_stdout, on_stderr)

    def replay_output(
        self, container_id: str, on_stdout: OutputSink, on_stderr: OutputSink, *, skip_stdout: int = 0, skip_stderr: int = 0
    ) -> None:
        """Follow stdout.log and stderr.log (Slurm writes them on the node) until the job ends."""
        state = self._state_for(container_id)
        if state is None:
            return
        offsets = {"stdout.log": skip_stdout, "stderr.log": skip_stderr}
        sinks = {"stdout.log": on_stdout, "stderr.log": on_stderr}
        ended_at: float | None = None
        asked = 0.0
        while True:
            grew = False
            for name, sink in sinks.items():
                offsets[name], more = _read_new(state / name, offsets[name], sink)
                grew = grew or more
            if ended_at is not None:
                if not grew and self._clock.monotonic() - ended_at >= OUTPUT_SETTLE_SECONDS:
                    return
            elif self._clock.monotonic() - asked >= self._settings.slurm_poll_interval:
                # The files are read often (live logs); Slurm is asked at its own pace.
                asked = self._clock.monotonic()
                try:
                    job = self._job_or_ended(container_id)
                except EngineUnavailable:
                    job = SlurmJob(job_id=container_id, state="UNKNOWN", name="")
                if job is None or job.terminal:
                    ended_at = self._clock.monotonic()
            if not grew:
                self._clock.sleep(OUTPUT_POLL_SECONDS)

    def wait(self, container_id: str, timeout: float) -> bool:
        deadline = self._clock.monotonic() + timeout
        while True:
            job = self._job_or_ended(container_id)
            if job is None or job.terminal:
                return True
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return False
            self._clock.sleep(min(remaining, self._settings.slurm_poll_interval))

    def stop(self, container_id: str, grace: float) -> None:
        """scancel: Slurm signals the batch script, which stops the container with its grace; wait for the end."""
        self.cli.cancel(container_id)
        self._queue.invalidate()
        if not self.wait(container_id, grace + 60):
            log.warning("Slurm job %s did not end within %.0f s of scancel", container_id, grace + 60)

    def exit_info(self, container_id: str) -> ExitInfo:
        state = self._state_for(container_id)
        written = read_json(state / "exit.json") if state else None
        if isinstance(written, dict) and written.get("reason") in NODE_REASONS:
            message = _read_text(state / "node_error.txt") if state else ""
            return ExitInfo(exit_code=None, oom_killed=False, failure_reason=NODE_REASONS[written["reason"]],
                            error=message or f"the job could not run on its Slurm node ({written['reason']})")
        job = self.cli.show_job(container_id)
        if job is not None and job.state in SLURM_FAILURES:
            reason, message = SLURM_FAILURES[job.state]
            if job.state == "NODE_FAIL" and job.nodes:
                message = message.replace("the Slurm node", f"Slurm node {job.nodes}")
            code = written.get("exit_code") if isinstance(written, dict) else None
            return ExitInfo(exit_code=code if isinstance(code, int) else None, oom_killed=job.state == "OUT_OF_MEMORY",
                            failure_reason=reason, error=message)
        if isinstance(written, dict) and written.get("failed") and isinstance(written.get("exit_code"), int):
            return _node_failure(written)
        if isinstance(written, dict) and isinstance(written.get("exit_code"), int):
            return ExitInfo(exit_code=written["exit_code"], oom_killed=bool(written.get("oom_killed")))
        if job is not None and job.exit_code is not None:
            # The batch script ended without writing exit.json: it failed before or around the container.
            return ExitInfo(
                exit_code=None, oom_killed=False, failure_reason=FailureReason.AGENT_ERROR,
                error=f"the Slurm batch script ended ({job.state}, exit {job.exit_code}:{job.exit_signal or 0}) without "
                "running the container to its end; see the job's stderr for the node's message",
            )
        return ExitInfo(exit_code=None, oom_killed=False, failure_reason=FailureReason.AGENT_ERROR,
                        error=f"Slurm no longer knows job {container_id} and it left no exit status; resubmit the job")

    def remove(self, container_id: str) -> None:
        job = self._job_or_ended(container_id)
        if job is not None and not job.terminal:
            self.cli.cancel(container_id)
        state = self._state_for(container_id)
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)
        with self._lock:
            self._job_of.pop(container_id, None)

    # --- after a restart -----------------------------------------------------------------------------------

    def list_jobs(self, cluster_id: str) -> list[ContainerState]:
        """This cluster's Slurm jobs by name, and state directories whose job slurmctld has forgotten."""
        prefix = f"radix-{cluster_id}-"
        found: dict[str, ContainerState] = {}
        for job in self._queue.jobs(max_age=0).values():
            if job.name.startswith(prefix):
                found[job.job_id] = self._container_state(job, job.name[len(prefix):])
        if self.state_root.is_dir():
            for state in filter(Path.is_dir, self.state_root.iterdir()):
                slurm_id = _read_text(state / "slurm_job_id")
                if not slurm_id or slurm_id in found:
                    continue
                labels = read_json(state / "labels.json") or {}
                if labels.get(LABEL_CLUSTER_ID) != cluster_id:
                    continue
                job = self.cli.show_job(slurm_id) or SlurmJob(
                    job_id=slurm_id, state="COMPLETED" if (state / "exit.json").exists() else "UNKNOWN", name="")
                found[slurm_id] = self._container_state(job, state.name)
        return list(found.values())

    def inspect(self, container_id: str) -> ContainerState | None:
        job = self._job_or_ended(container_id)
        state = self._state_for(container_id)
        if job is None:
            return None
        return self._container_state(job, state.name if state else "")

    def start_created(self, container_id: str) -> None:
        """Never needed: a submitted Slurm job starts without the agent."""

    def _container_state(self, job: SlurmJob, job_id: str) -> ContainerState:
        state = self.state_dir(job_id) if job_id else None
        labels = (read_json(state / "labels.json") if state else None) or {}
        labels.setdefault(LABEL_JOB_ID, job_id)
        if job_id:
            with self._lock:
                self._job_of[job.job_id] = job_id
        if job.queued:
            status = "pending"
        elif job.state in ("RUNNING", "SUSPENDED", "STOPPED", "RESIZING", "SIGNALING", "STAGE_OUT"):
            status = "running"
        elif job.state == "UNKNOWN":
            # Slurm does not say (yet): watch it; the wait decides once it has been missing long enough.
            status = "exited" if state and (state / "exit.json").exists() else "running"
        else:
            status = "exited"
        return ContainerState(id=job.job_id, status=status, labels=labels, started_at=job.start_time)

    def _state_for(self, slurm_id: str) -> Path | None:
        with self._lock:
            job_id = self._job_of.get(slurm_id)
        if job_id:
            return self.state_dir(job_id)
        if self.state_root.is_dir():
            for state in filter(Path.is_dir, self.state_root.iterdir()):
                if _read_text(state / "slurm_job_id") == slurm_id:
                    with self._lock:
                        self._job_of[slurm_id] = state.name
                    return state
        return None


def _node_failure(written: dict) -> ExitInfo:
    """One node of a multi-node job failed (launch.sh's exit.json: the node's own, with its rank and the job's
    node count): the job failed with that node's exit code, and the message names the node."""
    code = written["exit_code"]
    oom = bool(written.get("oom_killed"))
    where = f"node {written.get('node') or '?'} (rank {written.get('rank', '?')} of {written.get('nodes', '?')} nodes)"
    what = "was killed for running out of memory (raise resources.memory_mb)" if oom else f"exited with code {code}"
    return ExitInfo(exit_code=code, oom_killed=oom, failure_reason=FailureReason.OOM if oom else FailureReason.EXIT_CODE,
                    error=f"the job's container on {where} {what}; the other nodes' containers were stopped")


def _read_new(path: Path, offset: int, sink: OutputSink) -> tuple[int, bool]:
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read(READ_CHUNK)
    except FileNotFoundError:
        return offset, False
    if data:
        sink(data)
    return offset + len(data), bool(data)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""

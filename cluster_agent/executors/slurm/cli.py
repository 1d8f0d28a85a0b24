"""The Slurm commands the agent uses (sbatch, squeue, scontrol, scancel, sinfo), as typed Python calls.

Slurm's command-line tools are its stable interface on a login node (slurmrestd is optional and often absent;
pyslurm must match the installed Slurm exactly), so the agent runs them with a timeout, without a shell, and with
an environment stripped of the agent's own RADIX_* settings (and of SBATCH_* defaults).
A controller that does not answer raises EngineUnavailable; a request Slurm refuses raises SlurmRefused.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Callable, Sequence

from ...errors import EngineUnavailable, SlurmRefused

__all__ = ["QueueView", "SlurmCli", "SlurmJob", "parse_sacct", "parse_scontrol_record", "parse_squeue", "parse_time"]

log = logging.getLogger(__name__)

COMMAND_TIMEOUT_SECONDS = 30.0
# squeue's fields, `|`-separated; the job name comes last because only it may contain the separator.
SQUEUE_FORMAT = "%i|%T|%S|%N|%r|%j"
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
    "DEADLINE", "REVOKED", "SPECIAL_EXIT",
})
QUEUED_STATES = frozenset({"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
UNREACHABLE_HINTS = ("Unable to contact slurm controller", "Socket timed out", "Connection refused", "Zero Bytes were transmitted")


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    state: str  # PENDING, RUNNING, COMPLETED, ... (suffixes such as "CANCELLED by 0" trimmed)
    name: str
    nodes: str = ""
    reason: str = ""
    start_time: float | None = None  # epoch seconds; None while it has not started
    exit_code: int | None = None  # from scontrol: the batch script's exit status
    exit_signal: int | None = None

    @property
    def terminal(self) -> bool:
        # Not COMPLETING: the job's processes (the batch script stopping its container) still run then.
        return self.state in TERMINAL_STATES

    @property
    def queued(self) -> bool:
        return self.state in QUEUED_STATES


def parse_time(text: str) -> float | None:
    """Slurm's local-time timestamps (2026-11-23T06:41:32); N/A, Unknown or None are None."""
    try:
        return datetime.strptime(text.strip(), "%Y-%m-%dT%H:%M:%S").timestamp()
    except ValueError:
        return None


def parse_squeue(text: str) -> list[SlurmJob]:
    jobs = []
    for line in text.splitlines():
        parts = line.split("|", 5)
        if len(parts) != 6:
            continue
        job_id, state, start, nodes, reason, name = (p.strip() for p in parts)
        jobs.append(SlurmJob(job_id=job_id, state=state.split()[0] if state else "", name=name, nodes=nodes,
                             reason=reason, start_time=parse_time(start)))
    return jobs


def parse_sacct(text: str, job_id: str) -> SlurmJob | None:
    """The job's own line of `sacct --parsable2` (not its steps: 12.batch, 12.0)."""
    for line in text.splitlines():
        parts = line.split("|", 5)
        if len(parts) == 6 and parts[0] == job_id:
            code, _, signal = parts[2].partition(":")
            return SlurmJob(job_id=job_id, state=parts[1].split()[0] if parts[1] else "", name=parts[5],
                            nodes=parts[4], start_time=parse_time(parts[3]),
                            exit_code=int(code) if code.isdigit() else None,
                            exit_signal=int(signal) if signal.isdigit() else None)
    return None


def parse_scontrol_record(text: str) -> dict[str, str]:
    """One `scontrol show ... -o` line: Key=Value pairs separated by spaces (values may not contain '=')."""
    fields: dict[str, str] = {}
    key = None
    for token in text.split():
        name, sep, value = token.partition("=")
        if sep and name and name[0].isalpha():
            key = name
            fields[key] = value
        elif key is not None:
            fields[key] += " " + token  # a value with spaces (Reason=..., Comment=...)
    return fields


class SlurmCli:
    def __init__(self, *, timeout: float = COMMAND_TIMEOUT_SECONDS) -> None:
        self._timeout = timeout
        # SBATCH_* would silently add options to every job; SLURM_CONF (a non-default slurm.conf) is kept.
        self._env = {k: v for k, v in os.environ.items() if not k.startswith(("RADIX_", "SBATCH_"))}

    @staticmethod
    def available() -> list[str]:
        """The Slurm commands missing from PATH (sacct is optional: it only answers where accounting runs)."""
        return [c for c in ("sbatch", "squeue", "scontrol", "scancel", "sinfo") if shutil.which(c) is None]

    def run(self, *args: str, input_text: str | None = None) -> str:
        command = list(args)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=self._timeout, env=self._env,
                                  input=input_text)
        except FileNotFoundError:
            raise EngineUnavailable(f"{command[0]} not found: run the agent on a Slurm login node (with the Slurm "
                                    "client commands on PATH)") from None
        except subprocess.TimeoutExpired:
            raise EngineUnavailable(f"{command[0]} did not answer within {self._timeout:g} s (Slurm controller "
                                    "overloaded or unreachable)") from None
        if done.returncode != 0:
            message = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}")[-1000:]
            if any(hint in message for hint in UNREACHABLE_HINTS):
                raise EngineUnavailable(f"Slurm controller unreachable: {message}")
            raise SlurmRefused(message)
        return done.stdout

    # --- the calls -----------------------------------------------------------------------------------------

    def ping(self) -> None:
        try:
            out = self.run("scontrol", "ping")
        except SlurmRefused as exc:  # "Slurmctld(primary) at host is DOWN" comes with a non-zero status
            out = exc.args[0]
        if " is UP" not in out:
            first = next((line.strip() for line in out.splitlines() if line.strip()), "no answer")
            raise EngineUnavailable(f"Slurm controller not up: {first}")

    def submit(self, args: Sequence[str], script: str) -> str:
        """sbatch; the script goes on stdin (it is also kept in the job's state directory). Returns the job id."""
        out = self.run("sbatch", "--parsable", *args, input_text=script).strip()
        job_id = out.split(";", 1)[0]  # "<id>" or "<id>;<cluster>"
        if not job_id.isdigit():
            raise SlurmRefused(f"sbatch answered {out!r}, not a job id")
        return job_id

    def queue(self, user: str) -> list[SlurmJob]:
        """Every job of `user` slurmctld still knows (running, queued, and ended within MinJobAge)."""
        return parse_squeue(self.run("squeue", "--noheader", "--states=all", f"--user={user}", f"--format={SQUEUE_FORMAT}"))

    def show_job(self, job_id: str) -> SlurmJob | None:
        """scontrol's view, with the exit code squeue lacks; once slurmctld forgot the job (MinJobAge), sacct's
        where accounting is kept; else None."""
        try:
            out = self.run("scontrol", "show", "job", "--oneliner", job_id)
        except SlurmRefused as exc:
            if "Invalid job id" in str(exc):
                return self.accounting(job_id)
            raise
        fields = parse_scontrol_record(out.strip().splitlines()[0] if out.strip() else "")
        if not fields.get("JobId"):
            return self.accounting(job_id)
        code, _, signal = fields.get("ExitCode", "").partition(":")
        return SlurmJob(
            job_id=fields["JobId"], state=fields.get("JobState", "").split()[0] if fields.get("JobState") else "",
            name=fields.get("JobName", ""), nodes=fields.get("NodeList", "") if fields.get("NodeList") != "(null)" else "",
            reason=fields.get("Reason", ""), start_time=parse_time(fields.get("StartTime", "")),
            exit_code=int(code) if code.isdigit() else None, exit_signal=int(signal) if signal.isdigit() else None,
        )

    def accounting(self, job_id: str) -> SlurmJob | None:
        """sacct's record of a job slurmctld has forgotten; None where accounting is not kept (no slurmdbd)."""
        try:
            out = self.run("sacct", "--noheader", "--parsable2", f"--jobs={job_id}",
                           "--format=JobID,State,ExitCode,Start,NodeList,JobName")
        except SlurmRefused:
            return None  # "Slurm accounting storage is disabled"
        return parse_sacct(out, job_id)

    def cancel(self, job_id: str) -> None:
        try:
            self.run("scancel", job_id)
        except SlurmRefused as exc:
            if "Invalid job id" in str(exc) or "already completing or completed" in str(exc):
                return
            raise

    def nodes(self) -> list[dict[str, str]]:
        """`scontrol show node` records (NodeName, CPUTot, RealMemory, Gres, GresUsed, State, Partitions, ...)."""
        out = self.run("scontrol", "--details", "show", "node", "--oneliner")
        return [parse_scontrol_record(line) for line in out.splitlines() if line.startswith("NodeName=")]

    def cluster_name(self) -> str:
        for line in self.run("scontrol", "show", "config").splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "ClusterName":
                return value.strip()
        return ""


class QueueView:
    """One squeue call per interval, shared by every thread that asks: the controller sees one agent, not N jobs."""

    def __init__(self, cli: SlurmCli, user: str, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._cli = cli
        self._user = user
        self._interval = interval
        self._clock = clock
        self._jobs: dict[str, SlurmJob] = {}
        self._at: float | None = None
        self._lock = threading.Lock()

    def jobs(self, *, max_age: float | None = None) -> dict[str, SlurmJob]:
        max_age = self._interval if max_age is None else max_age
        with self._lock:
            if self._at is None or self._clock() - self._at >= max_age:
                self._jobs = {job.job_id: job for job in self._cli.queue(self._user)}
                self._at = self._clock()
            return self._jobs

    def invalidate(self) -> None:
        with self._lock:
            self._at = None

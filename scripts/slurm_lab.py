#!/usr/bin/env python3
"""A real two-node Slurm cluster on this machine, for the Slurm tests and `make slurm-lab`.

Debian's slurmctld + slurmd + munge (installed by .ci/run / `make test-deps`), configured here: one controller and
two nodes, each a slurmd of its own on this machine (Slurm's multiple-slurmd setup: `slurmd -N <node>`, its own
port, spool directory and pid file): `node1` (address 127.0.0.2) and `node2` (address 127.0.0.3), both this
machine's loopback, neither the 127.0.0.1 a job would guess. Partition `debug` (the default) is `node1` alone,
partition `multi` both nodes, for multi-node jobs. Each node has two count-only GPUs backed by fake device files (so that Slurm schedules
`--gres=gpu:N`, sets CUDA_VISIBLE_DEVICES and reports GPUs in sinfo, though no GPU exists). Both slurmds share this
machine's network and its one Docker engine: a multi-node job's containers (host network) reach rank 0 at
MASTER_ADDR, the first node's NodeAddr, as on a real cluster, though here every node address is this machine.
Everything lives under one state directory, the configuration too: /etc/slurm is never touched (a developer's
machine may be a real cluster's login node). Daemons and clients find it through SLURM_CONF, which `start` sets
in its own environment (the tests' agents inherit it) and prints for a shell. `stop` kills exactly the daemons
`start` started (their pids are kept).

Usage: scripts/slurm_lab.py start|stop|status [--state DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_STATE = Path(os.environ.get("SLURM_LAB_DIR", "/tmp/radix-slurm-lab"))
MUNGE_KEY = Path("/etc/munge/munge.key")
FAKE_GPUS = 2  # per node
NODE_CPUS = 8
PARTITION = "debug"
MULTI_PARTITION = "multi"
# (name, address): the first is the node of the one-node tests, and rank 0 of a two-node job.
# Not `localhost`: Slurm refuses a NodeName that is another node's NodeHostname ("Duplicated NodeHostName").
NODES = (("node1", "127.0.0.2"), ("node2", "127.0.0.3"))
# slurmctld's port; the nodes' slurmds listen on the next ones. SLURM_LAB_PORT and SLURM_LAB_DIR move a second
# lab out of the way of the first (not RADIX_*: the tests keep those out of their environment).
PORT = int(os.environ.get("SLURM_LAB_PORT", "6817"))


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def slurm_conf(state: Path) -> str:
    # Memory as this machine has it, less a margin. More CPUs than it has (config_overrides lets slurmd accept
    # that): the tests' jobs are tiny, and several must run side by side. DefMemPerCPU: a job that names no memory
    # must not take the whole node. All nodes are this machine (NodeHostname), told apart by address and port.
    memory = max(1024, _memory_mb() - 2048)
    nodes = "\n".join(
        f"NodeName={name} NodeHostname=localhost NodeAddr={address} Port={PORT + 1 + i} CPUs={NODE_CPUS} "
        f"RealMemory={memory} Gres=gpu:{FAKE_GPUS} State=UNKNOWN" for i, (name, address) in enumerate(NODES))
    return f"""\
ClusterName=radixlab
SlurmctldHost=localhost
SlurmctldPort={PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/slurmctld
SlurmdSpoolDir={state}/slurmd/%n
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
ReturnToService=2
MinJobAge=600
KillWait=15
GresTypes=gpu
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd-%n.log
DefMemPerCPU=256
SlurmdParameters=config_overrides
{nodes}
PartitionName={PARTITION} Nodes={NODES[0][0]} Default=YES MaxTime=INFINITE State=UP
PartitionName={MULTI_PARTITION} Nodes={",".join(name for name, _ in NODES)} MaxTime=INFINITE State=UP
"""


def gres_conf(state: Path) -> str:
    return "".join(f"NodeName={name} Name=gpu File={state}/dev/fakegpu[{i * FAKE_GPUS}-{(i + 1) * FAKE_GPUS - 1}]\n"
                   for i, (name, _) in enumerate(NODES))


def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout)


def _alive(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def start(state: Path = DEFAULT_STATE) -> None:
    if os.geteuid() != 0:
        raise SystemExit("slurm_lab: must run as root (it starts munged, slurmctld and slurmd)")
    for tool in ("munged", "slurmctld", "slurmd", "sinfo"):
        if not shutil.which(tool) and not Path("/usr/sbin", tool).exists():
            raise SystemExit(f"slurm_lab: {tool} not found: apt-get install -y slurmctld slurmd slurm-client munge")
    for sub in ("slurmctld", "slurmd", "dev"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    config = slurm_conf(state)
    conf_file = state / "slurm.conf"
    if _alive(state / "slurmctld.pid") and conf_file.exists() and conf_file.read_text() != config:
        # Daemons of an older lab (one node, other ports): nodes cannot be added to a running slurmctld.
        stop(state)
    _start_munge(state)
    for i in range(FAKE_GPUS * len(NODES)):
        device = state / "dev" / f"fakegpu{i}"
        if not device.exists():
            os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))  # a character device that is /dev/null
    conf_file.write_text(config)
    (state / "gres.conf").write_text(gres_conf(state))
    os.environ["SLURM_CONF"] = str(conf_file)
    if not _alive(state / "slurmctld.pid"):
        _run("/usr/sbin/slurmctld")
    for name, _ in NODES:
        (state / "slurmd" / name).mkdir(exist_ok=True)
        if not _alive(state / f"slurmd-{name}.pid"):
            _run("/usr/sbin/slurmd", "-N", name)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = _run("sinfo", "-h", "-N", "-p", MULTI_PARTITION, "-o", "%N %t", check=False).stdout
        states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
        if len(states) == len(NODES) and all(s.rstrip("*") in ("idle", "mix", "alloc") for s in states.values()):
            return
        for name, node_state in states.items():
            if node_state.startswith(("down", "drain")):
                _run("scontrol", "update", f"NodeName={name}", "State=RESUME", check=False)
        time.sleep(0.5)
    raise SystemExit(f"slurm_lab: the nodes did not become idle; see {state}/slurmctld.log and {state}/slurmd-*.log")


def _start_munge(state: Path) -> None:
    if _run("munge", "-n", check=False).returncode == 0:
        return  # a munged answers already
    if not MUNGE_KEY.exists():
        MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        MUNGE_KEY.write_bytes(os.urandom(1024))
        shutil.chown(MUNGE_KEY, "munge", "munge")
        MUNGE_KEY.chmod(0o400)
    run_dir = Path("/run/munge")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    pid_file = state / "munged.pid"
    _run("su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged")
    deadline = time.monotonic() + 10
    while _run("munge", "-n", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit("slurm_lab: munged did not start (see /var/log/munge/munged.log)")
        time.sleep(0.2)
    pid = Path("/run/munge/munged.pid")
    if pid.exists():
        pid_file.write_text(pid.read_text())


def stop_controller(state: Path = DEFAULT_STATE) -> None:
    """slurmctld goes away (SIGTERM: it saves its state, as in an upgrade or a failover); jobs on the node run on,
    and `start` brings it back. (A SIGKILL just after a job started can lose the job in Slurm itself: slurmctld
    then kills the node's "orphan" step, which no agent can prevent.)"""
    pid = _alive(state / "slurmctld.pid")
    if pid:
        os.kill(pid, signal.SIGTERM)
        while _alive(state / "slurmctld.pid"):
            time.sleep(0.1)


def stop(state: Path = DEFAULT_STATE) -> None:
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    for name in (*(f"slurmd-{node}" for node, _ in NODES), "slurmd", "slurmctld", "munged"):
        pid = _alive(state / f"{name}.pid")
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(state / f"{name}.pid") and time.monotonic() < deadline:
                time.sleep(0.1)
        (state / f"{name}.pid").unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state", type=Path, default=DEFAULT_STATE)
    args = parser.parse_args()
    if args.action == "start":
        start(args.state)
        print(_run("sinfo").stdout, end="")
        print(f"export SLURM_CONF={args.state / 'slurm.conf'}   # for your shell and the agent")
    elif args.action == "stop":
        stop(args.state)
    else:
        os.environ["SLURM_CONF"] = str(args.state / "slurm.conf")
        print(_run("sinfo", check=False).stdout or "slurm: not answering")
    return 0


if __name__ == "__main__":
    sys.exit(main())

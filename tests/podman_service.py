"""A real Podman engine for the tests: Debian's `podman system service`, rootful, on a socket and storage of its own.

`PodmanService` starts `podman system service --time=0 unix://<dir>/podman.sock` with its own `--root`,
`--runroot` and `--tmpdir` under a fresh temporary directory, so it shares no containers, images or events with a
Podman the host may run, and the Docker SDK reaches it at `docker_host`. `stop()` removes every container it holds,
stops the service and removes its directory.

What the service is started with, and why (each found on this repository's CI machines, themselves containers):

* a containers.conf of its own (`CONTAINERS_CONF`), so the host's `/etc/containers` settings do not change what the
  tests see;
* `runtime = "runc"`: Debian's crun 1.8 refuses a cgroup v1/v2 hybrid host whose v2 hierarchy has a controller
  ("cgroups in hybrid mode not supported"), and runc is there anyway (Docker's own runtime, a docker.io dependency);
* `cgroup_manager = "cgroupfs"`: systemd need not be PID 1 (it is not in a container);
* `events_logger = "file"`: the default, journald, needs a journal; the agent reads exits from the events stream;
* `default_ulimits` nofile and nproc no higher than this process's hard limits: rootful Podman gives containers
  1048576 of each, which runc cannot set where the engine lacks CAP_SYS_RESOURCE ("error setting rlimit type 6:
  operation not permitted"); Podman itself lowers its own RLIMIT_NPROC to 32768 at start, hence that bound too.

Nothing here is needed by the agent: it talks to any Podman through the Docker-compatible API.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["PodmanService", "find_podman", "INSTALL_HINT"]

INSTALL_HINT = (
    "install Debian's podman with its helpers: apt-get install podman catatonit runc netavark aardvark-dns "
    "fuse-overlayfs (make test-deps does)"
)
# Podman sets its own RLIMIT_NPROC to this at start (strace of podman 4.3), so containers cannot get more.
PODMAN_NPROC = 32768


def find_podman() -> str:
    for candidate in (shutil.which("podman"), "/usr/bin/podman"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(f"no podman binary found: {INSTALL_HINT}")


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
            sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            return b"OK" in sock.recv(4096)
        except OSError:
            return False


class PodmanService:
    def __init__(self, *, start_timeout: float = 60.0) -> None:
        self.podman = find_podman()
        if shutil.which("runc") is None and not os.access("/usr/sbin/runc", os.X_OK):
            raise RuntimeError(f"no runc found: {INSTALL_HINT}")
        self.workdir = Path(tempfile.mkdtemp(prefix="radix-podman-"))
        self.socket = self.workdir / "podman.sock"
        self.log_path = self.workdir / "service.log"
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen | None = None

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def global_args(self) -> list[str]:
        """The `podman` flags that address this service's storage (for the podman CLI in tests)."""
        return [
            "--root", str(self.workdir / "root"), "--runroot", str(self.workdir / "runroot"),
            "--tmpdir", str(self.workdir / "tmp"), "--storage-driver", "overlay",
        ]

    def _environment(self) -> dict[str, str]:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        nofile = 1048576 if nofile == resource.RLIM_INFINITY else min(nofile, 1048576)
        nproc = PODMAN_NPROC if nproc == resource.RLIM_INFINITY else min(nproc, PODMAN_NPROC)
        conf = self.workdir / "containers.conf"
        conf.write_text(
            "[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
        )
        env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "CONTAINER_HOST")}
        env["CONTAINERS_CONF"] = str(conf)
        return env

    def start(self) -> "PodmanService":
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [self.podman, *self.global_args(), "system", "service", "--time=0", self.docker_host],
                stdout=log, stderr=subprocess.STDOUT, env=self._environment(), start_new_session=True,
                cwd=self.workdir,  # conmon without containers/conmon#514 drops an `oom` file into its working directory
            )
        deadline = time.monotonic() + self.start_timeout
        while not _answers(self.socket):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log_text = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"podman system service did not answer on {self.socket}: {log_text}")
            time.sleep(0.1)
        return self

    def restart(self, down_for: float = 0.0) -> None:
        """Stop the API service and start it again on the same socket and storage, as systemd's socket activation
        does after an idle exit or a package upgrade: running containers are conmon's and live on."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGTERM)
        self._proc.wait(15)
        time.sleep(down_for)
        self.socket.unlink(missing_ok=True)
        self.start()

    def podman_cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """The podman CLI on this service's storage (tests only; the agent never runs a CLI)."""
        return subprocess.run([self.podman, *self.global_args(), *args], capture_output=True, text=True,
                              env=self._environment(), check=check, timeout=120)

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            # Containers outlive the service (conmon holds them): remove them first, then stop it.
            with contextlib.suppress(Exception):
                self.podman_cli("rm", "--all", "--force", "--time", "0", check=False)
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        # Anything still mounted under the storage (an overlay a crash left) would make the removal fail.
        with contextlib.suppress(OSError):
            for line in Path("/proc/mounts").read_text().splitlines():
                mount_point = line.split()[1]
                if mount_point.startswith(str(self.workdir) + "/"):
                    subprocess.run(["umount", "-l", mount_point], capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "PodmanService":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

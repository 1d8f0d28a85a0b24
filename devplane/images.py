"""Local job images for tests and the demo; nothing is pulled (no registry is reachable here).

`busybox`: a rootfs of Debian's busybox-static (one binary and a link per applet), imported with the Docker SDK.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
import time

import docker

BUSYBOX_IMAGE = "radix-test/busybox:latest"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def _is_static(path: str) -> bool:
    # A dynamically linked busybox would need its libraries in the image too.
    if not shutil.which("ldd"):
        return True
    info = subprocess.run(["ldd", path], capture_output=True, text=True)
    return "not a dynamic executable" in info.stdout + info.stderr or "statically linked" in info.stdout + info.stderr


def _busybox_path() -> str:
    for path in (shutil.which("busybox"), *BUSYBOX_CANDIDATES):
        if path and shutil.which(path):
            out = subprocess.run([path, "--list"], capture_output=True, text=True)
            if out.returncode == 0 and _is_static(path):
                return path
    raise SystemExit("busybox-static is needed to build the test image: apt-get install busybox-static")


def _rootfs_tar(busybox: str, extra_files: dict[str, str] | None = None) -> bytes:
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True).stdout.split()
    buffer = io.BytesIO()
    now = time.time()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, now
            tar.addfile(info)

        def add_file(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, now
            tar.addfile(info, io.BytesIO(data))

        for name in ("bin", "etc", "tmp", "proc", "sys", "dev", "workspace", "root"):
            add_dir(name, 0o1777 if name == "tmp" else 0o755)
        with open(busybox, "rb") as handle:
            add_file("bin/busybox", handle.read(), 0o755)
        for applet in applets:
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mtime = tarfile.SYMTYPE, "busybox", now
            tar.addfile(info)
        add_file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
        add_file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        for target, source in (extra_files or {}).items():
            with open(source, "rb") as handle:
                add_file(target, handle.read(), 0o755)
    return buffer.getvalue()


def ensure_busybox_image(
    client: docker.DockerClient, name: str = BUSYBOX_IMAGE, extra_files: dict[str, str] | None = None
) -> str:
    """The busybox image `name`, imported once; `extra_files` ({path in image: host file}) are added to it."""
    try:
        client.images.get(name)
        return name
    except docker.errors.ImageNotFound:
        pass
    repository, tag = name.rsplit(":", 1)
    data = _rootfs_tar(_busybox_path(), extra_files)
    client.api.import_image_from_data(
        data, repository=repository, tag=tag, changes=['CMD ["/bin/sh"]', "ENV PATH=/bin"]
    )
    client.images.get(name)
    return name


if __name__ == "__main__":
    print(ensure_busybox_image(docker.from_env()), file=sys.stdout)

#!/usr/bin/env python3
"""Builds a Debian (bookworm) image with Python 3 from Debian's packages, for hosts that cannot pull a base image.

debootstrap writes a minimal rootfs with python3 and python3-venv; the Docker SDK imports it as an image.
Documentation, man pages and translations are left out the way Debian's and Ubuntu's minimized images do it (dpkg
`path-exclude`, copyright files kept): 169 -> ~117 MB, and packages installed on top (the example image) stay small.
Used by `make image`/`make test` when the default base cannot be pulled.
Usage: debian_base_image.py [IMAGE]  (root; ~2 minutes)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import docker

DEFAULT_IMAGE = "radix-build/debian-python3:bookworm-min"
MIRROR = "http://deb.debian.org/debian"
# Source: the "minimize" dpkg configuration of Ubuntu's cloud images (/etc/dpkg/dpkg.cfg.d/excludes).
DPKG_EXCLUDES = """\
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
"""


def minimize(rootfs: Path) -> None:
    """Drop what DPKG_EXCLUDES names from the bootstrapped tree and keep dpkg from installing it again."""
    (rootfs / "etc/dpkg/dpkg.cfg.d/excludes").write_text(DPKG_EXCLUDES)
    for top in ("usr/share/man", "usr/share/info", "usr/share/lintian"):
        shutil.rmtree(rootfs / top, ignore_errors=True)
    for entry in (rootfs / "usr/share/locale").iterdir():
        if entry.name != "locale.alias":
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink()
    for path in (rootfs / "usr/share/doc").rglob("*"):
        if not path.is_dir() and path.name != "copyright":
            path.unlink()


def main() -> int:
    name = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_IMAGE
    client = docker.from_env()
    try:
        client.images.get(name)
        print(f"{name}: present")
        return 0
    except docker.errors.ImageNotFound:
        pass
    if shutil.which("debootstrap") is None:
        print(f"{name}: cannot build it without debootstrap: install it (apt-get install debootstrap), or give the "
              "build a base image that has Python 3.11+ and venv (make image BASE_IMAGE=...)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="radix-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        print(f"{name}: debootstrap into {rootfs}", flush=True)
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
             "bookworm", str(rootfs), MIRROR],
            check=True, stdout=subprocess.DEVNULL,
        )
        minimize(rootfs)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            subprocess.run(["find", str(rootfs / cache), "-type", "f", "-delete"], check=False)
        tarball = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        repository, tag = name.rsplit(":", 1)
        client.api.import_image_from_file(str(tarball), repository=repository, tag=tag, changes=['CMD ["python3"]'])
    print(f"{name}: imported")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Builds the agent's image with the Docker SDK (no docker CLI needed).

Without --base-image the Dockerfile's default base (python:3.11-slim) is used when it is here or can be pulled;
on a machine that cannot pull it, a Debian base with Python is built locally instead (scripts/debian_base_image.py,
debootstrap), and the build says so in one line. pip inside the build trusts the host's CA bundle when there is
one (a proxy that re-signs TLS otherwise breaks it); --ca-bundle names another.

Usage: build_image.py [--tag TAG] [--base-image IMAGE] [--ca-bundle FILE]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

import docker
from debian_base_image import DEFAULT_IMAGE as LOCAL_BASE  # scripts/ is on sys.path (script or importer)

ROOT = Path(__file__).resolve().parents[1]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def default_base() -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert match, "the Dockerfile names its default base in ARG BASE_IMAGE=..."
    return match.group(1)


def usable_base(client: docker.DockerClient) -> str:
    """The Dockerfile's default base if it is here or can be pulled, else the locally built Debian one."""
    base = default_base()
    try:
        client.images.get(base)
        return base
    except docker.errors.ImageNotFound:
        pass
    try:
        client.images.pull(base)
        return base
    except docker.errors.APIError as exc:
        reason = str(getattr(exc, "explanation", None) or exc).splitlines()[0][:160]
    print(f"cannot pull {base} ({reason}): building on a local Debian base, {LOCAL_BASE}, instead", flush=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "debian_base_image.py"), LOCAL_BASE], check=True)
    return LOCAL_BASE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="radix-cluster-agent:dev")
    parser.add_argument("--base-image", default="", help="BASE_IMAGE build argument (default: the Dockerfile's)")
    parser.add_argument("--ca-bundle", default="", help="extra CA bundle for pip during the build")
    args = parser.parse_args()

    client = docker.from_env(timeout=900)
    base = args.base_image or usable_base(client)
    if build(client, ROOT, ROOT / "docker" / "extra-ca", args.tag, base, args.ca_bundle, echo=True):
        return 1
    print(f"built {args.tag}")
    return 0


def build(client: docker.DockerClient, context: Path, extra_ca_dir: Path, tag: str, base: str, ca_bundle: str = "",
          *, echo: bool = False) -> int:
    """Build `context` (a Dockerfile taking BASE_IMAGE and trusting extra-ca/ for pip) as `tag`; 0 or 1."""
    extra_ca = extra_ca_dir / "ca-certificates.crt"
    extra_ca.unlink(missing_ok=True)
    ca_bundle = ca_bundle or (str(HOST_CA_BUNDLE) if HOST_CA_BUNDLE.is_file() else "")
    if ca_bundle:
        shutil.copyfile(ca_bundle, extra_ca)
    try:
        for item in client.api.build(path=str(context), tag=tag, buildargs={"BASE_IMAGE": base}, rm=True,
                                     forcerm=True, decode=True):
            if echo and "stream" in item:
                sys.stdout.write(item["stream"])
            if "error" in item:
                print(f"image build failed: {item['error']}", file=sys.stderr)
                return 1
    finally:
        extra_ca.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Builds the agent's image with the Docker SDK (no docker CLI needed).

Usage: build_image.py [--tag TAG] [--base-image IMAGE] [--ca-bundle FILE]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="radix-cluster-agent:dev")
    parser.add_argument("--base-image", default="", help="BASE_IMAGE build argument (default: the Dockerfile's)")
    parser.add_argument("--ca-bundle", default="", help="extra CA bundle for pip during the build")
    args = parser.parse_args()

    extra_ca = ROOT / "docker" / "extra-ca" / "ca-certificates.crt"
    extra_ca.unlink(missing_ok=True)
    if args.ca_bundle:
        shutil.copyfile(args.ca_bundle, extra_ca)
    build_args = {"BASE_IMAGE": args.base_image} if args.base_image else {}
    client = docker.from_env(timeout=900)
    try:
        for item in client.api.build(path=str(ROOT), tag=args.tag, buildargs=build_args, rm=True, forcerm=True, decode=True):
            if "stream" in item:
                sys.stdout.write(item["stream"])
            if "error" in item:
                print(f"image build failed: {item['error']}", file=sys.stderr)
                return 1
    finally:
        extra_ca.unlink(missing_ok=True)
    print(f"built {args.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""`make example-ml`: a real ML job through the dev control plane and the agent.

Builds examples/sentiment/ (VADER sentiment, a model that ships inside its PyPI package) into
radix-example/sentiment:1 on the same base as the agent's image, then runs examples/sentiment/job.json through
the development control plane and an agent, and prints the result. Needs a Docker engine and PyPI access for the
build (the host's CA bundle is trusted by pip).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import docker  # noqa: E402

import demo  # noqa: E402
from build_image import build, usable_base  # noqa: E402

IMAGE = "radix-example/sentiment:1"
EXAMPLE = ROOT / "examples" / "sentiment"


def main() -> int:
    client = docker.from_env(timeout=900)
    if build(client, EXAMPLE, EXAMPLE / "extra-ca", IMAGE, usable_base(client)):
        return 1
    print(f"== built {IMAGE}")
    return demo.main(jobs=[json.loads((EXAMPLE / "job.json").read_text())])


if __name__ == "__main__":
    sys.exit(main())

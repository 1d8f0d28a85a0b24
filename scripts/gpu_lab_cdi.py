#!/usr/bin/env python3
"""Writes a CDI spec (nvidia.com/gpu) for a host whose NVIDIA driver lives in /usr/local/nvidia, as on the GPU
test machine described in shared/gpu-lab: one device per /dev/nvidiaN, the control nodes, the driver's files
mounted read-only, and its glibc at /lib64 so a busybox image can run nvidia-smi.

On an ordinary host, use `nvidia-ctk cdi generate --output=/etc/cdi/nvidia.yaml` instead.
Usage: gpu_lab_cdi.py OUTPUT.yaml [DRIVER_ROOT]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import yaml


def main() -> int:
    output = Path(sys.argv[1])
    root = Path(sys.argv[2] if len(sys.argv) > 2 else "/usr/local/nvidia")
    gpus = sorted((p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)), key=lambda p: int(p.name[6:]))
    common_nodes = [{"path": str(p)} for p in (Path("/dev/nvidiactl"), Path("/dev/nvidia-uvm"), Path("/dev/nvidia-uvm-tools")) if p.exists()]
    mounts = [{"hostPath": str(root), "containerPath": str(root), "options": ["ro", "nosuid", "nodev", "bind"]}]
    library_path = [str(root / "lib64")]
    if (root / "glibc").is_dir():
        mounts.append({"hostPath": str(root / "glibc"), "containerPath": "/lib64", "options": ["ro", "nosuid", "nodev", "bind"]})
        library_path.insert(0, str(root / "glibc"))
    spec = {
        "cdiVersion": "0.5.0",
        "kind": "nvidia.com/gpu",
        "devices": [{"name": p.name[6:], "containerEdits": {"deviceNodes": [{"path": str(p)}]}} for p in gpus],
        "containerEdits": {
            "deviceNodes": common_nodes,
            "mounts": mounts,
            "env": [f"LD_LIBRARY_PATH={':'.join(library_path)}", f"PATH={root / 'bin'}:/usr/local/bin:/usr/bin:/bin"],
        },
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(yaml.safe_dump(spec, sort_keys=False))
    print(f"wrote {output}: {len(gpus)} GPU device(s), {len(common_nodes)} control node(s), {len(mounts)} mount(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

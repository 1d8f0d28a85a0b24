#!/usr/bin/env bash
# Prepares build/gpu-lab/ on this (networked) machine: everything `make gpu-check` needs on the GPU test machine,
# which has the NVIDIA driver, NVML and Python 3.12 but no Docker engine and no network (shared/gpu-lab/README.md).
#   engine.tar.xz     Debian's Docker engine and a static busybox (shared/gpu-lab/make-engine-bundle.sh), ~40 MB
#   start-engine.sh   starts that engine there
#   wheels/           the agent's requirements as CPython 3.12 (GPU_LAB_PYTHON_VERSION) manylinux x86_64 wheels, ~10 MB
# The whole folder stays under the device tool's 64 MiB carry limit. Then, on the GPU machine, in one call:
#   scripts/gpu_lab_run.sh        (with carry: build/gpu-lab; writes its report under $OUT)
# Usage: scripts/gpu_lab_bundle.sh [SHARED_GPU_LAB_DIR]   (default ../shared/gpu-lab)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lab=$(cd "${1:-$root/../shared/gpu-lab}" && pwd)
out=$root/build/gpu-lab
mkdir -p "$out/wheels"
[ -s "$out/engine.tar.xz" ] || "$lab/make-engine-bundle.sh" "$out"
cp "$lab/start-engine.sh" "$out/start-engine.sh"
pip=${PIP:-$root/.venv/bin/pip}
pyver=${GPU_LAB_PYTHON_VERSION:-3.12}   # the GPU machine's Python; 3.11 to try the bundle on this machine
"$pip" download --quiet --disable-pip-version-check --dest "$out/wheels" --only-binary=:all: \
    --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -r "$root/requirements.txt"
# The same resolution the GPU machine will do, offline, so a missing wheel shows here and not there.
"$pip" install --quiet --disable-pip-version-check --dry-run --ignore-installed --no-index --find-links "$out/wheels" \
    --only-binary=:all: --python-version "$pyver" --implementation cp --abi "cp${pyver/./}" --abi abi3 --abi none \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any --target /tmp/gpu-lab-dry-run \
    -r "$root/requirements.txt"
size=$(du -sm "$out" | cut -f1)
echo "build/gpu-lab: ${size} MiB (the device tool carries at most 64)"
[ "$size" -lt 64 ] || { echo "build/gpu-lab is too big to carry" >&2; exit 1; }

#!/usr/bin/env bash
# On the GPU test machine (no Docker, no network): starts the engine from build/gpu-lab, unpacks the agent's
# wheels onto PYTHONPATH, writes a CDI spec for the driver in /usr/local/nvidia, and runs scripts/gpu_check.py with
# --gpu-mode cdi. Everything it finds goes under $OUT (gpu-check.txt, gpu-check.json, nvidia-smi.txt, dockerd.log)
# for docs/gpu.md's "Recorded runs". Prepare the folder first with scripts/gpu_lab_bundle.sh.
# Exit status: gpu_check.py's (0 when every check holds), or 2 when the set-up failed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lab=$root/build/gpu-lab
out=${OUT:-/tmp/gpu-lab-out}
mkdir -p "$out"
exec > >(tee "$out/gpu-lab-run.txt") 2>&1
setup_failed() { echo "set-up failed: $*"; cp /tmp/dockerd.log "$out/dockerd.log" 2>/dev/null; exit 2; }
[ -s "$lab/engine.tar.xz" ] || setup_failed "no $lab/engine.tar.xz: run scripts/gpu_lab_bundle.sh here first and carry build/gpu-lab"
date -u; nvidia-smi > "$out/nvidia-smi.txt" 2>&1; nvidia-smi -L; nvidia-smi -q | grep -i -A2 "MIG Mode" | tee "$out/mig-mode.txt"
bash "$lab/start-engine.sh" "$lab/engine.tar.xz" || setup_failed "the Docker engine did not start"
export PATH=/opt/engine/bin:$PATH LD_LIBRARY_PATH=/opt/engine/lib
# Wheels are zip files: unpacked onto PYTHONPATH they need neither pip nor venv, which that Python may lack.
python=${GPU_LAB_PYTHON:-python3.12}
site=/tmp/gpu-lab-site
rm -rf "$site"; mkdir -p "$site"
for wheel in "$lab"/wheels/*.whl; do
  "$python" -m zipfile -e "$wheel" "$site" || setup_failed "unpacking $wheel"
done
export PYTHONPATH=$site
"$python" -c 'import docker, httpx, pydantic_settings, pynvml, tenacity, yaml' || setup_failed "importing the agent's dependencies"
mkdir -p /tmp/cdi
"$python" "$root/scripts/gpu_lab_cdi.py" /tmp/cdi/nvidia.yaml || setup_failed "writing the CDI spec"
cp /tmp/cdi/nvidia.yaml "$out/"
cd "$root"
"$python" scripts/gpu_check.py --gpu-mode cdi --cdi-spec-dirs /tmp/cdi \
    --report "$out/gpu-check.json" | tee "$out/gpu-check.txt"
status=${PIPESTATUS[0]}
cp /tmp/dockerd.log "$out/dockerd.log" 2>/dev/null
echo "gpu_check.py exit $status"
exit "$status"

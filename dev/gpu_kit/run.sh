#!/usr/bin/env bash
# The GPU kit's one command on a machine that received the working tree and the prepared .gpu-kit folder
# (python -m dev.gpu_kit.prepare made it): installs the carried wheels into a private folder, then runs every
# measurement (python -m dev.gpu_kit) with the carried ComfyUI tree. Arguments go to python -m dev.gpu_kit:
#   dev/gpu_kit/run.sh --out DIR                                    # on the GPU
#   dev/gpu_kit/run.sh --device cpu --tiny --as-gpu-image --out DIR  # its rehearsal on a CPU
# The wheels are for the GPU image's Python (3.12, x86-64 Linux); another Python uses its own packages.
set -euo pipefail
cd "$(dirname "$0")/../.."
python=${PYTHON:-python3}
kit=.gpu-kit
if [ ! -d "$kit/comfyui" ]; then
    echo "gpu-kit: no prepared kit in $kit: run python -m dev.gpu_kit.prepare --comfyui ~/ComfyUI first (and carry $kit)" >&2
    exit 2
fi
private=$(mktemp -d "${TMPDIR:-/tmp}/facediffuser-gpu-kit.XXXXXX")
trap 'rm -rf "$private"' EXIT
target=$("$python" -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}-{platform.machine()}")')
if [ "$target" = "3.12-x86_64" ] && compgen -G "$kit/wheels/*.whl" > /dev/null; then
    "$python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --target "$private" "$kit"/wheels/*.whl
else
    echo "gpu-kit: the carried wheels are for Python 3.12 on x86-64; this is Python $target: using its own packages" >&2
fi
PYTHONPATH="$private:scripts${PYTHONPATH:+:$PYTHONPATH}" "$python" -m dev.gpu_kit --comfyui "$kit/comfyui" "$@"

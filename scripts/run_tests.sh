#!/usr/bin/env bash
# The one command that sets up and runs the tests on a fresh machine:
#   scripts/run_tests.sh [pytest arguments, test paths relative to tests/]
# It builds .venv with CPU torch 2.13.0 and the test dependencies, then runs pytest.
# With COMFYUI_PATH pointing at a ComfyUI 0.17 checkout it also installs ComfyUI's requirements
# (without letting them replace the CPU torch) and the ComfyUI tier runs; otherwise that tier is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
case $VENV in /*) ;; *) VENV="$PWD/$VENV" ;; esac
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

constraints=$(mktemp)
trap 'rm -f "$constraints" "$constraints.comfy"' EXIT
echo "torch==2.13.0" > "$constraints"

"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -r requirements-test.txt -c "$constraints"

if [ -n "${COMFYUI_PATH:-}" ]; then
    # torchaudio has no build for this torch and only ComfyUI's audio nodes need it.
    grep -vE '^(torch|torchaudio)([<>=~!; ]|$)' "$COMFYUI_PATH/requirements.txt" > "$constraints.comfy"
    "${PIP[@]}" -r "$constraints.comfy" "torchvision==0.28.0" -c "$constraints"
fi

# pytest runs from tests/ (its rootdir): the pack's own __init__.py only imports inside ComfyUI, and
# pytest would otherwise import it as the package around the tests. Test paths are relative to tests/.
cd tests
exec "$PY" -m pytest "$@"

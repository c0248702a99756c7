#!/usr/bin/env bash
# The one command that sets up and runs the tests on a fresh machine:
#   scripts/run_tests.sh [pytest arguments, test paths relative to tests/]
#
# Without COMFYUI_PATH it builds .venv (CPU torch 2.13.0 and the test dependencies) and runs the suite: the
# tests that need no ComfyUI run, the others are skipped with their reason.
# COMFYUI_PATH names one ComfyUI checkout, or several separated by ':' (as in PATH). For each one it builds
# a virtual environment of its own (.venv-comfyui-<version>: ComfyUI versions pin different frontend and
# comfy-kitchen/comfy-aimdo releases, so they cannot share one), installs that ComfyUI's requirements
# without letting them replace the CPU torch, and runs the whole suite, every tier, against it. The exit
# status is non-zero when the run against any checkout failed.
# The tiers are pytest markers (docs/testing.md): the inner loop's fast command, against one checkout, is
#   COMFYUI_PATH=~/ComfyUI scripts/run_tests.sh -m "not slow and not server"
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

VENV=${VENV:-.venv}
case $VENV in /*) ;; *) VENV="$ROOT/$VENV" ;; esac

constraints=$(mktemp)
trap 'rm -f "$constraints" "$constraints.comfy"' EXIT
echo "torch==2.13.0" > "$constraints"

# Creates (or reuses) a virtual environment with CPU torch and the test dependencies; prints its python.
prepare_venv() {
    local venv=$1
    if [ ! -x "$venv/bin/python" ]; then
        "${PYTHON:-python3}" -m venv "$venv" || return 1
    fi
    local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${pip[@]}" torch==2.13.0 >&2 || return 1
    "${pip[@]}" -r requirements-test.txt -c "$constraints" >&2 || return 1
    echo "$venv/bin/python"
}

# pytest runs from tests/ (its rootdir): the pack's own __init__.py only imports inside ComfyUI, and
# pytest would otherwise import it as the package around the tests. Test paths are relative to tests/.
run_pytest() {
    local python=$1
    shift
    (cd "$ROOT/tests" && "$python" -m pytest "$@")
}

if [ -z "${COMFYUI_PATH:-}" ]; then
    set -e
    PY=$(prepare_venv "$VENV")
    run_pytest "$PY" "$@"
    exit
fi

failed=()
IFS=':' read -r -a checkouts <<< "$COMFYUI_PATH"
for checkout in "${checkouts[@]}"; do
    [ -n "$checkout" ] || continue
    checkout=$(cd "$checkout" 2>/dev/null && pwd) || { echo "COMFYUI_PATH: no folder $checkout" >&2; failed+=("$checkout"); continue; }
    if [ ! -f "$checkout/comfy/samplers.py" ] || [ ! -f "$checkout/requirements.txt" ]; then
        echo "COMFYUI_PATH: $checkout is not a ComfyUI checkout (no comfy/samplers.py or requirements.txt)" >&2
        failed+=("$checkout")
        continue
    fi
    version=$(sed -n 's/^__version__ *= *"\(.*\)"/\1/p' "$checkout/comfyui_version.py" 2>/dev/null)
    version=${version:-$(basename "$checkout")}
    echo "=== ComfyUI $version ($checkout) ==="
    if ! PY=$(prepare_venv "$VENV-comfyui-$version"); then
        failed+=("$version (set-up)")
        continue
    fi
    # torchaudio has no build for this torch and only ComfyUI's audio nodes need it (the tests stand it in).
    grep -vE '^(torch|torchaudio)([<>=~!; ]|$)' "$checkout/requirements.txt" > "$constraints.comfy"
    if ! "$PY" -m pip install --quiet --disable-pip-version-check -r "$constraints.comfy" "torchvision==0.28.0" -c "$constraints"; then
        failed+=("$version (requirements)")
        continue
    fi
    COMFYUI_PATH=$checkout run_pytest "$PY" "$@" || failed+=("$version")
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "Tests failed against ComfyUI: ${failed[*]}" >&2
    exit 1
fi

#!/usr/bin/env bash
# The real-ComfyUI tests: in-process node tests (tests/test_nodes.py) and the headless server tests
# (tests/test_comfyui_*.py) against a ComfyUI checkout.
#
#   COMFYUI_PATH=/path/to/ComfyUI bash scripts/comfyui_test.sh [pytest options] [test paths]
#
# Test paths given (tests/test_x.py, tests/test_x.py::test_y) replace the default set.
# Sets up a separate venv for ComfyUI (idempotent: a stamp records what was installed), then runs the tests on the
# CPU, offline. ComfyUI imports torchvision at start-up and its Load Audio node imports torchaudio, so this venv
# gets torch 2.9.1 + torchvision 0.24.1 + torchaudio 2.9.1 (the project's own venv has neither). From PyPI these
# are CUDA builds (several GB); set COMFY_TORCH_INDEX to a CPU wheel index where one is reachable. ComfyUI imports
# requests at start-up without listing it (it used to arrive with huggingface_hub), so it is installed here too.
# Variables: COMFYUI_PATH (required), COMFY_VENV (default: $COMFYUI_PATH/.venv-omnisync), PYTHON (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout (tested with v0.3.64)}"
COMFYUI_PATH="$(cd "$COMFYUI_PATH" && pwd)"
export COMFYUI_PATH
VENV="${COMFY_VENV:-$COMFYUI_PATH/.venv-omnisync}"
PY="${PYTHON:-python3}"
TORCH=(torch==2.9.1 torchvision==0.24.1)
AUDIO=(torch==2.9.1 "torchaudio==2.9.*")
INDEX=()
if [ -n "${COMFY_TORCH_INDEX:-}" ]; then INDEX=(--index-url "$COMFY_TORCH_INDEX"); fi

# ComfyUI's requirements without torch, torchvision and torchaudio (installed above, pinned together).
comfy_reqs="$(grep -v -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*$' "$COMFYUI_PATH/requirements.txt")"
stamp_text="$(printf '%s\n' "${TORCH[*]}" "${AUDIO[*]}" "${INDEX[*]:-}" "$comfy_reqs" "$(cat requirements.txt)" pytest requests)"
stamp="$VENV/.omnisync-setup"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$stamp_text" ]; then
    echo "setting up $VENV for ComfyUI (first time: several minutes, several GB)"
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q "${INDEX[@]}" "${TORCH[@]}"
    "$VENV/bin/python" -m pip install -q "${INDEX[@]}" "${AUDIO[@]}"
    reqs="$(mktemp)"
    printf '%s\n' "$comfy_reqs" > "$reqs"
    "$VENV/bin/python" -m pip install -q -r "$reqs" -r requirements.txt pytest requests
    rm -f "$reqs"
    printf '%s' "$stamp_text" > "$stamp"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
tests=(tests/test_nodes.py tests/test_comfyui_*.py)
for arg in "$@"; do
    case "$arg" in
        -*) ;;
        *) if [ -e "${arg%%::*}" ]; then tests=(); break; fi ;;
    esac
done
exec "$VENV/bin/python" -m pytest -p no:cacheprovider "${tests[@]}" "$@"

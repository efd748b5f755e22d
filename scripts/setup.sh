#!/usr/bin/env bash
# Idempotent set-up shared by the README's commands: a virtual environment in .venv with torch, the runtime
# dependencies and this package (editable). `scripts/setup.sh --test` adds the test-only oracles.
# A second run with nothing changed does no pip work (a stamp in .venv records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${OMNISYNC_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${OMNISYNC_TORCH_SPEC:-torch==2.13.0}"

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
py="$VENV/bin/python"
pip() { "$py" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }

if ! "$py" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC (set OMNISYNC_TORCH_SPEC to choose another build)"
  pip install "$TORCH_SPEC"
  "$py" -c "import torch" || { echo "[setup] torch failed to install" >&2; exit 1; }
fi

stamp_of() { cat "$@" pyproject.toml | sha256sum | cut -c1-16; }

main_stamp="$VENV/.omnisync-main-$(stamp_of requirements.txt)"
if [ ! -f "$main_stamp" ]; then
  echo "[setup] installing runtime dependencies and omnisync (editable)"
  pip install -r requirements.txt
  pip install "setuptools>=77" wheel
  pip install --no-deps --no-build-isolation -e .
  "$py" -c "import av, numpy, safetensors, einops, omnisync_core" || { echo "[setup] runtime install failed" >&2; exit 1; }
  rm -f "$VENV"/.omnisync-main-*; touch "$main_stamp"
fi

if [ "$want_test" = 1 ]; then
  test_stamp="$VENV/.omnisync-test-$(stamp_of requirements-test.txt requirements-test-nodeps.txt)"
  if [ ! -f "$test_stamp" ]; then
    echo "[setup] installing test dependencies"
    pip install -r requirements-test.txt
    pip install --no-deps -r requirements-test-nodeps.txt
    "$py" -c "import pytest, scipy, ctranslate2" || { echo "[setup] test install failed" >&2; exit 1; }
    rm -f "$VENV"/.omnisync-test-*; touch "$test_stamp"
  fi
  # espeak-ng speaks the test sentences; install it where we may (root with apt), else those tests skip.
  if ! command -v espeak-ng >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "[setup] installing espeak-ng (apt)"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng) >/dev/null 2>&1 \
        || echo "[setup] could not install espeak-ng; speech tests will be skipped"
    else
      echo "[setup] espeak-ng not found; speech tests will be skipped (apt-get install espeak-ng)"
    fi
  fi
  # Debian's chromium renders the eval report in the headless-browser test (tests/test_eval_cli.py), else it skips.
  if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "[setup] installing chromium (apt)"
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
        || echo "[setup] could not install chromium; the report's browser test will be skipped"
    else
      echo "[setup] chromium not found; the report's browser test will be skipped (apt-get install chromium)"
    fi
  fi
fi

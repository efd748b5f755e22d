#!/usr/bin/env bash
# The README's test command: set up (idempotent) and run the whole test suite on CPU, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
exec "${OMNISYNC_VENV:-.venv}/bin/python" -m pytest "$@"

#!/usr/bin/env bash
# The README's run command: set up (idempotent), then lip-sync the bundled example clip to the bundled speech with
# the bundled demo model, on the GPU if there is one, else on the CPU. Writes outputs/example_lipsync.mp4.
# Extra arguments go to `omnisync lipsync` (e.g. --device cpu, --steps 20, --seed 3).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p outputs
exec "${OMNISYNC_VENV:-.venv}/bin/omnisync" lipsync --video examples/face.mp4 --audio examples/speech.wav \
  --out outputs/example_lipsync.mp4 "$@"

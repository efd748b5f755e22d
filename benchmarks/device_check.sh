#!/usr/bin/env bash
# One prepared GPU run (well under 8 minutes on one H100/H200) for when a device is lent: random weights at the real
# sizes, no download. Prints the CUDA test paths' results and, per family, one window's forward time, seconds per
# output second, peak VRAM and TFLOP/s (benchmarks/family_window.py), then the demo lip sync on CUDA end to end.
#   bash benchmarks/device_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { bash scripts/setup.sh >/dev/null && PY=.venv/bin/python; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
echo "== one window per family (real size, bf16)"
timeout 300 "$PY" benchmarks/family_window.py --repeats 3 --families omnisync humo latentsync
timeout 150 "$PY" benchmarks/family_window.py --repeats 2 --families infinitetalk
echo "== InfiniteTalk 14B with 20 of its 40 blocks swapped to host memory"
timeout 150 "$PY" benchmarks/family_window.py --repeats 2 --families infinitetalk --swap-blocks 20
echo "== the example lip sync on CUDA"
timeout 60 "$PY" -m omnisync_core.cli lipsync --video examples/face.mp4 --audio examples/speech.wav \
    --out "${OUT:-/tmp}/device_example.mp4" --device cuda

"""Constant memory in the streaming OmniSync Lip Sync (Video) node: the node path of tests/test_memory.py, in a real
ComfyUI in-process (skipped without $COMFYUI_PATH). The peak memory of a 32 s and a 96 s clip (the bundled demo
model, the real face analyzer, one sampler step; benchmarks/memory.py --node measures 10, 60 and 240 s at 8 steps)
differs by the audio only: the host's AUDIO input (4 bytes a sample, subtracted) and the node's own aligned copy
it returns. Both clips are past 30 s, so Whisper encodes full 30 s chunks in both (a shorter clip peaks a little
lower: its one chunk is shorter). The peak is the process's anonymous memory, sampled every 5 ms: a CUDA build of
torch maps ~0.5 GB of libraries whose resident pages alone move the total RSS by tens of MiB from run to run.
Before the track's level was measured block by block, every AudioTrack made of in-memory samples briefly held
three float64 copies of the whole track (24 bytes a sample: 0.5 MiB per second at 22.05 kHz), and the node's peak
grew with the clip by about that much."""

from __future__ import annotations

import sys

from benchmarks_memory import run_node
from comfy_helpers import requires_comfyui

pytestmark = requires_comfyui


def test_streaming_node_peak_memory_does_not_grow_with_length(tmp_path):
    short, long = (run_node(tmp_path, seconds, 1, sys.executable) for seconds in (32.0, 96.0))
    slope = (long["anon_mib"] - short["anon_mib"]) / 64.0
    print(f"\nnode peak anonymous RSS (host audio subtracted): {short['anon_mib']:.1f} MiB at 32 s, "
          f"{long['anon_mib']:.1f} MiB at 96 s: {slope:+.3f} MiB per video second (total RSS {short['rss_mib']:.0f} "
          f"and {long['rss_mib']:.0f} MiB)")
    # the returned aligned audio is 0.08 MiB a second at 22.05 kHz; 0.3 leaves room for allocator noise (a few MiB)
    # and fails the 0.5 of whole-track float64 temporaries
    assert slope <= 0.3, (short, long, slope)
    assert long["anon_mib"] / short["anon_mib"] <= 1.05 and long["rss_mib"] / short["rss_mib"] <= 1.05, (short, long)

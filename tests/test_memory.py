"""Constant memory in video length: the pipeline's peak RSS for a 24 s clip is within 20% of a 2 s clip's
(benchmarks/memory.py measures the same with a model, for 10 s and 60 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks_memory import write_clip, write_tone

CHILD = """
import resource, sys, torch
torch.set_num_threads(1)
from omnisync_core.pipeline import LipSyncOptions, LipSyncPipeline, PassThroughGenerator
options = LipSyncOptions(window=9, overlap=2, crop_size=128)
LipSyncPipeline(PassThroughGenerator(), options=options).run(sys.argv[1], sys.argv[2], sys.argv[3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_rss_kib(tmp_path: Path, seconds: float) -> int:
    clip = write_clip(tmp_path / f"clip{seconds}.mp4", seconds, 320, 240)
    tone = write_tone(tmp_path / f"tone{seconds}.wav", seconds)
    result = subprocess.run([sys.executable, "-c", CHILD, str(clip), str(tone), str(tmp_path / f"out{seconds}.mp4")],
                            capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_length(tmp_path):
    short, long = peak_rss_kib(tmp_path, 2.0), peak_rss_kib(tmp_path, 24.0)
    assert long / short <= 1.2, (short, long)

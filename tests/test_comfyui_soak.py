"""Soak: 20 lip syncs in a row in one process through the nodes, the way a ComfyUI server runs them (ComfyUI
in-process on the CPU, the pack loaded by ComfyUI's own loader; skipped without $COMFYUI_PATH). The streaming Lip
Sync (Video) node and the one-node Lip Sync alternate, each with the real face analyzer (detector "auto": the
face in the first 12 frames of examples/face.mp4 is detected and followed by Face Mesh) and the tiny model. Resident memory after the 20th run stays within 5%
of its value after the 2nd, and no file descriptor is left open (the count after the 2nd run, once ComfyUI and
PyAV have opened what they keep for the process, equals the count after the 20th).

With a tiny model 5% of the process (~850 MiB, mostly torch and ComfyUI) is ~40 MiB, more than keeping every run's
output would cost (~1 MiB a run here), so the test also bounds the growth per run: the least-squares slope of RSS
over runs 2..20 is at most 0.3 MiB per run (measured: ~0.03 clean, ~1.1 with every result kept), and the Python
heap (``sys.getallocatedblocks``) grows by at most 100 blocks a run (measured: ~30, this test's own bookkeeping;
~780 when the face analyzer was rebuilt every run, from safetensors' ``get_tensor`` keeping two small objects a
call)."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections import Counter

import pytest
import torch

from comfy_helpers import REPO, InProcessComfy, requires_comfyui, temp_root
from tiny_models import chirp, write_tiny_bundle

pytestmark = requires_comfyui

RUNS = 20
MAX_SLOPE_MIB = 0.3
MAX_BLOCKS_PER_RUN = 100
RATE = 22050
DEFAULTS = {"crop_size": 32, "window": 9, "overlap": 2, "steps": 2, "tau": 0.92, "shift": 5.0, "audio_before": 1,
            "audio_after": 1}
INPUTS = dict(seed=0, steps=0, guidance="ds-cfg", tau=0.0, window=0, overlap=-1, color_match=False,
              length_policy="pingpong", detector="auto", face_index=-1, box="", crop_size=0, crop_margin=0.3)


def rss_mib() -> float:
    """Resident set size now (not the peak), MiB."""
    with open("/proc/self/status") as status:
        kib = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return kib / 1024


def open_fds() -> dict[int, str]:
    """This process's open file descriptors and what each points at."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:                     # the descriptor os.listdir itself used, closed by now
            pass
    return fds


@pytest.fixture(scope="module")
def cf():
    root = temp_root("omnisync-soak-")
    instance = InProcessComfy(root)
    write_tiny_bundle(root / "models" / "omnisync" / "soak.safetensors", defaults=DEFAULTS)
    return instance


def slope(values: list[float]) -> float:
    """Least-squares slope of ``values`` against their index."""
    x = torch.arange(len(values), dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    return float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())


def _first_frames(count: int) -> torch.Tensor:
    """The first ``count`` frames of the example clip (a real face), float [T, H, W, 3] (a ComfyUI IMAGE)."""
    from omnisync_core.io import VideoReader

    with VideoReader(REPO / "examples" / "face.mp4") as reader:
        return reader.read_all(count).float() / 255


def _write_clip(path, frames: torch.Tensor, fps: int):
    from omnisync_core.io import VideoWriter

    with VideoWriter(path, fps) as writer:
        writer.write((frames * 255).round().to(torch.uint8))
    return path


def test_twenty_lip_syncs_keep_memory_and_file_descriptors_flat(cf):
    from comfy_api.latest import InputImpl

    model = cf.run("OmniSyncModelLoader", model="soak.safetensors", vae="from bundle", audio_encoder="from bundle",
                   precision="auto", download="")[0]
    frames = _first_frames(12)
    clip = _write_clip(cf.root / "input" / "soak.mp4", frames, 25)
    audio = {"waveform": chirp(0.6, channels=1).unsqueeze(0), "sample_rate": RATE}
    rss, fds, blocks, seconds = [], [], [], []
    for run in range(RUNS):
        started = time.perf_counter()
        if run % 2 == 0:
            result = cf.run("OmniSyncLipSyncVideo", model=model, video=InputImpl.VideoFromFile(str(clip)),
                            audio=audio, filename_prefix="soak/video", **dict(INPUTS, seed=run))
        else:
            result = cf.run("OmniSyncLipSync", model=model, images=frames, audio=audio, fps=25.0,
                            **dict(INPUTS, seed=run))
        assert result.args[2] == 15                       # 0.6 s of audio at 25 fps
        del result
        seconds.append(time.perf_counter() - started)
        gc.collect()                                      # reference cycles are not leaks; ComfyUI collects too
        rss.append(rss_mib())
        fds.append(open_fds())
        blocks.append(sys.getallocatedblocks())
    growth = slope(rss[1:])
    print(f"\nsoak: RSS after runs 1, 2, 10, 20: {rss[0]:.1f}, {rss[1]:.1f}, {rss[9]:.1f}, {rss[19]:.1f} MiB "
          f"(slope {growth:+.3f} MiB/run); open fds after runs 1, 2, 20: {len(fds[0])}, {len(fds[1])}, "
          f"{len(fds[19])}; Python heap blocks after runs 2, 20: {blocks[1]}, {blocks[19]}; "
          f"{sum(seconds):.1f} s for {RUNS} runs")
    print("soak: RSS per run " + " ".join(f"{r:.1f}" for r in rss))
    kept = Counter(fds[-1].values()) - Counter(fds[1].values())
    assert not kept and len(fds[-1]) == len(fds[1]), f"file descriptors opened and kept: {dict(kept)}"
    assert rss[-1] <= 1.05 * rss[1], f"RSS grew from {rss[1]:.1f} MiB (run 2) to {rss[-1]:.1f} MiB (run {RUNS})"
    assert growth <= MAX_SLOPE_MIB, f"RSS grows {growth:.2f} MiB per run: {[round(r, 1) for r in rss]}"
    assert slope(blocks[1:]) <= MAX_BLOCKS_PER_RUN, f"the Python heap grows by {slope(blocks[1:]):.0f} blocks a run"
    assert len(list((cf.root / "output" / "soak").glob("*.mp4"))) == RUNS // 2

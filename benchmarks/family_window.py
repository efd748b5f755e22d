"""One window per family, timed with random weights (no download): the denoiser's forward at the window's real
shape, times the guidance passes and steps of the family's defaults.

    .venv/bin/python benchmarks/family_window.py [--families omnisync humo latentsync infinitetalk] [--repeats 3]
        [--swap-blocks N]      (InfiniteTalk: the first N blocks in host memory; the peak VRAM then counts)

On a GPU (bf16, SDPA) it builds each model at its released size and the window at its real size (HuMo 1.7B: 97
frames at 25 fps, 480² crop; LatentSync 1.6: 16 frames at 512²; InfiniteTalk 14B: 81 frames at 512²) and prints
the median forward time, seconds per window and per output second, peak VRAM and TFLOP/s (FLOPs counted by
torch.utils.flop_counter). On a CPU it runs the same windows at a reduced size (the test presets, a 64² crop),
which says nothing of GPU speed but checks that every path runs and how the cost splits. The VAE, audio encoder
and face stages are not in these figures (they run once per window and cost far less than the sampling steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _omnisync(device, dtype, full):
    from omnisync_core.model.dit import OmniSyncDiT, get_config

    cfg = get_config("wan2.1-1.3b" if full else "tiny", audio_dim=384)
    with torch.device(device):
        model = OmniSyncDiT(cfg).to(dtype).eval()
    side = 512 // 8 if full else 8
    frames = 81 if full else 9
    t = (frames - 1) // 4 + 1
    x = torch.randn(1, cfg.in_dim if hasattr(cfg, "in_dim") else 16, t, side, side, device=device, dtype=dtype)
    x = x[:, :cfg.out_dim]
    audio = torch.randn(1, frames, cfg.audio_window, cfg.audio_dim, device=device, dtype=dtype)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)

    def forward():
        return model(x, torch.tensor([0.5], device=device), source=x, audio=audio, text=text)

    return model, forward, frames, 25, {"steps": 50, "passes": 2}


def _humo(device, dtype, full):
    from omnisync_core.model.humo import HumoDiT, humo_config

    cfg = humo_config("humo-1.7b" if full else "tiny")
    with torch.device(device):
        model = HumoDiT(cfg).to(dtype).eval()
    side = 480 // 8 if full else 8
    frames = 97
    t = (frames - 1) // 4 + 1
    x = torch.randn(1, cfg.in_dim, t, side, side, device=device, dtype=dtype)
    ref = torch.randn(1, cfg.in_dim, 1, side, side, device=device, dtype=dtype)
    text = torch.randn(1, cfg.text_len, cfg.text_dim, device=device, dtype=dtype)
    audio = torch.randn(1, t, cfg.audio_window, cfg.whisper_groups, cfg.whisper_dim, device=device, dtype=dtype)

    def forward():
        return model(x, torch.tensor([0.5], device=device), text, audio=audio, reference=ref)

    return model, forward, frames, 25, {"steps": 50, "passes": 3}


def _latentsync(device, dtype, full):
    from omnisync_core.model.latentsync_unet import LATENTSYNC_UNET_PRESETS, LatentSyncUNet

    cfg = LATENTSYNC_UNET_PRESETS["latentsync-1.6" if full else "tiny"]
    with torch.device(device):
        model = LatentSyncUNet(cfg).to(dtype).eval()
    side = 512 // 8 if full else 16
    frames = 16
    x = torch.randn(1, cfg.in_channels, frames, side, side, device=device, dtype=dtype)
    audio = torch.randn(1, frames, 50, cfg.cross_attention_dim, device=device, dtype=dtype)

    def forward():
        return model(x, 500, audio=audio)

    # CFG 1.5 (two passes), 20 DDIM steps; DeepCache (interval 3) makes 2 of every 3 steps a shallow one
    return model, forward, frames, 25, {"steps": 20, "passes": 2}


def _infinitetalk(device, dtype, full):
    from omnisync_core.model.wan_i2v import WanI2VDiT, wan_i2v_config

    cfg = wan_i2v_config("infinitetalk-14b" if full else "tiny")
    with torch.device(device):
        model = WanI2VDiT(cfg).to(dtype).eval()
    side = 512 // 8 if full else 8
    frames = 81
    t = (frames - 1) // 4 + 1
    x = torch.randn(1, 16, t, side, side, device=device, dtype=dtype)
    y = torch.randn(1, 20, t, side, side, device=device, dtype=dtype)
    text = torch.randn(1, min(64, cfg.text_len), cfg.text_dim, device=device, dtype=dtype)
    clip = torch.randn(1, 257, cfg.clip_dim, device=device, dtype=dtype)
    audio = torch.randn(1, frames, cfg.audio_window, cfg.wav2vec_layers, cfg.wav2vec_dim, device=device, dtype=dtype)

    def forward():
        return model(x, torch.tensor([0.5], device=device), text, clip, y, audio=audio)

    return model, forward, frames, 25, {"steps": 40, "passes": 3}


FAMILIES = {"omnisync": _omnisync, "humo": _humo, "latentsync": _latentsync, "infinitetalk": _infinitetalk}


def _flops(forward) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        forward()
    return float(counter.get_total_flops())


@torch.no_grad()
def measure(name: str, device: torch.device, dtype: torch.dtype, full: bool, repeats: int, swap: int = 0) -> dict:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, forward, frames, fps, plan = FAMILIES[name](device, dtype, full)
    params = sum(p.numel() for p in model.parameters())
    if swap:                          # the first `swap` blocks to (pinned) host memory; the peak counts from here
        if not hasattr(model, "set_block_swap"):
            raise SystemExit(f"--swap-blocks: the {name} benchmark model has no block swap")
        model.set_block_swap(swap, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    forward()                                                   # warm-up (kernels, allocator)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        forward()
        _sync(device)
        times.append(time.perf_counter() - start)
    flops = _flops(forward)
    step = statistics.median(times)
    window = step * plan["steps"] * plan["passes"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del model
    return {"family": name + (f" swap {swap}" if swap else ""), "params": params, "frames": frames, "forward_s": step, "window_s": window,
            "s_per_output_s": window / (frames / fps), "peak_vram_gib": peak, "tflops": flops / step / 1e12,
            **plan}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reduced", action="store_true", help="the reduced size even on a GPU")
    parser.add_argument("--swap-blocks", type=int, default=0,
                        help="keep this many transformer blocks in host memory (InfiniteTalk's block swap)")
    args = parser.parse_args()
    device = torch.device(args.device)
    full = device.type == "cuda" and not args.reduced
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"one window per family on {where}, {'real' if full else 'reduced'} size, {dtype}".replace("torch.", ""))
    print(f"{'family':<13}{'params':>9}{'frames':>7}{'forward s':>11}{'passes x steps':>16}{'window s':>10}"
          f"{'s / out s':>11}{'VRAM GiB':>10}{'TFLOP/s':>9}")
    for name in args.families:
        try:
            r = measure(name, device, dtype, full, args.repeats, args.swap_blocks)
        except torch.cuda.OutOfMemoryError:
            print(f"{name:<13} out of GPU memory at this size")
            continue
        size = f"{r['params'] / 1e9:.2f}B" if r["params"] >= 1e8 else f"{r['params'] / 1e6:.2f}M"
        print(f"{r['family']:<13}{size:>9}{r['frames']:>7}{r['forward_s']:>11.3f}"
              f"{r['passes']:>8} x {r['steps']:<5}{r['window_s']:>10.1f}{r['s_per_output_s']:>11.2f}"
              f"{r['peak_vram_gib']:>10.1f}{r['tflops']:>9.2f}")


if __name__ == "__main__":
    main()

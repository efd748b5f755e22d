"""OmniSyncDiT forward benchmark: median time, peak memory, tokens/s and achieved TFLOP/s per preset and window.

    .venv/bin/python benchmarks/model_forward.py                 # tiny, CPU: 5/9/17/33 frames at 256 and 512 crops
    .venv/bin/python benchmarks/model_forward.py --preset wan2.1-1.3b --device cuda --dtype bf16 --size 512

Defaults: preset tiny (plus wan2.1-1.3b when CUDA is available), device/dtype auto, --frames 5,9,17,33,
--size 256,512 (face-crop pixels; the latent is size/8), --runs 3 after one warm-up, batch 1, --threads 1,
with audio and source conditioning and the stored text context (as in sampling). Weights are random: only
shapes matter for timing.

Example output line (tiny, 1 thread of a busy 2-core CPU):
    tiny            33  512   9x64x64   9216     1760.9      5234      64.9     45.68     0.026

Columns: preset, video frames, crop size, latent T x H x W, tokens N = T*(H/2)*(W/2), median forward ms,
tokens/s, peak memory MiB (CUDA: torch.cuda.max_memory_allocated minus what was held before the runs; CPU:
growth of the process's peak RSS (ru_maxrss) over the value after model construction; windows run smallest
first, so it is the peak of each),
GFLOP per forward, achieved TFLOP/s.

FLOPs per forward (analytic; multiply-add = 2 FLOPs), with L layers, width d, FFN f, text length S, audio keys
per latent frame K = 4*A over T latent frames:
    2*N*P_tok + 2*S*P_text_kv + 2*T*K*P_audio_kv + L*(4*N^2*d + 4*N*S*d + 4*N*K*d) + patch embedding and head,
where P_tok = L*(8*d^2 + 2*d*f) are the per-token weights (self-attn q,k,v,o; audio and text q,o; FFN) and
P_text_kv = P_audio_kv = L*2*d^2 the cross-attention k,v run on the context tokens; 4*N^2*d is self-attention
(QK^T and AV). This is the brief's 2*params*tokens + 4*L*N^2*d made exact for cross-attention.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omnisync_core.model.dit import OmniSyncDiT, get_config, video_frames_for  # noqa: E402
from omnisync_core.model.loading import resolve_device, resolve_dtype  # noqa: E402


def forward_flops(cfg, b: int, t: int, h: int, w: int, text_len: int) -> float:
    """Analytic FLOPs of one forward (see the module docstring)."""
    d, L = cfg.dim, cfg.num_layers
    n = t * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    k = cfg.temporal_compression * cfg.audio_window if cfg.enable_audio else 0
    p_tok = L * ((8 if cfg.enable_audio else 6) * d * d + 2 * d * cfg.ffn_dim)
    vol = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    flops = 2 * n * p_tok + 2 * text_len * L * 2 * d * d + 2 * t * k * L * 2 * d * d
    flops += L * (4 * n * n * d + 4 * n * text_len * d + 4 * n * k * d)
    flops += 2 * n * d * vol * (cfg.patch_in_dim + cfg.out_dim)  # patch embedding + head
    return b * flops


def rss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bench_one(model, device, dtype, frames: int, size: int, runs: int, warmup: int, batch: int):
    cfg = model.config
    t, s = 1 + (frames - 1) // cfg.temporal_compression, size // 8
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, cfg.in_dim, t, s, s, generator=g).to(device, dtype)
    source = torch.randn(x.shape, generator=g).to(device, dtype)
    audio = torch.randn(batch, video_frames_for(t, cfg.temporal_compression), cfg.audio_window, cfg.audio_dim,
                        generator=g).to(device, dtype)
    sigma = torch.full((batch,), 0.5, device=device)
    for _ in range(warmup):
        model(x, sigma, source=source, audio=audio)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model(x, sigma, source=source, audio=audio)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else None
    tokens = batch * t * (s // cfg.patch_size[1]) * (s // cfg.patch_size[2])
    return statistics.median(times), peak, tokens, (t, s, s)


def build(preset: str, device, dtype):
    cfg = get_config(preset)
    with torch.device(device):
        model = OmniSyncDiT(cfg).to(dtype).eval()
    g = torch.Generator(device="cpu").manual_seed(0)
    text_len = min(cfg.text_len, 512)
    model.set_text_context(torch.randn(1, text_len, cfg.text_dim, generator=g).to(device, dtype))
    return model, text_len


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="comma list (default: tiny, plus wan2.1-1.3b on CUDA)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    p.add_argument("--frames", default="5,9,17,33", help="comma list of video frames per window (4k+1)")
    p.add_argument("--size", default="256,512", help="comma list of face-crop sizes in pixels (multiples of 16)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: tiny matmuls stall in OpenMP on a busy CPU; 0 = torch's)")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    dtype = resolve_dtype(a.dtype, device)
    presets = a.preset.split(",") if a.preset else ["tiny"] + (["wan2.1-1.3b"] if device.type == "cuda" else [])
    frames = [int(f) for f in a.frames.split(",")]
    sizes = [int(s) for s in a.size.split(",")]
    bad = [f for f in frames if f % 4 != 1] + [s for s in sizes if s % 16]
    if bad:
        p.error(f"frames must be 4k+1 and sizes multiples of 16: {bad}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# torch {torch.__version__}, {name}, {str(dtype).removeprefix('torch.')}, batch {a.batch}, "
          f"median of {a.runs} after {a.warmup} warm-up")
    print(f"{'preset':<12}{'frames':>6}{'size':>5}{'latent':>10}{'tokens':>7}{'ms':>11}{'tok/s':>10}"
          f"{'peak MiB':>10}{'GFLOP':>10}{'TFLOP/s':>10}")
    for preset in presets:
        model, text_len = build(preset, device, dtype)
        rss0 = rss_mib()
        for size, f in sorted(((s, f) for s in sizes for f in frames), key=lambda sf: sf[0] ** 2 * sf[1]):
            sec, peak, tokens, (t, h, w) = bench_one(model, device, dtype, f, size, a.runs, a.warmup, a.batch)
            peak = peak if peak is not None else rss_mib() - rss0
            gflop = forward_flops(model.config, a.batch, t, h, w, text_len) / 1e9
            print(f"{preset:<12}{f:>6}{size:>5}{f'{t}x{h}x{w}':>10}{tokens:>7}{sec * 1e3:>11.1f}"
                  f"{tokens / sec:>10.0f}{peak:>10.1f}{gflop:>10.2f}{gflop / sec / 1e3:>10.3f}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

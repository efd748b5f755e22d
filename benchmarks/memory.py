"""Peak memory of `omnisync lipsync` against clip length: constant memory means the ratio stays near 1.

    .venv/bin/python benchmarks/memory.py [--seconds 10 60] [--size 128x96] [--model PATH] [--device cpu]

Each length runs in its own process (a fresh `omnisync lipsync`), whose summary line reports its peak RSS (and peak
VRAM on CUDA); the script prints them and the ratio of the longest to the shortest. Without --model it uses a tiny
random-weight model bundle (the numbers are then about the pipeline, not the network). The clip is a synthetic
moving picture and the audio an amplitude-modulated tone of the same length.
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
import time
import wave
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from omnisync_core.io import VideoWriter  # noqa: E402


def write_clip(path: Path, seconds: float, width: int, height: int, fps: int = 25) -> Path:
    """A smooth moving picture, written chunk by chunk so that making it takes no memory either."""
    frames = int(round(seconds * fps))
    y = torch.linspace(0, 1, height).view(1, -1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, -1)
    with VideoWriter(path, Fraction(fps), crf=23, preset="veryfast") as writer:
        for start in range(0, frames, 50):
            t = torch.arange(start, min(start + 50, frames), dtype=torch.float32).view(-1, 1, 1)
            r = 0.5 + 0.4 * torch.sin(2 * math.pi * (x + 0.02 * t))
            g = 0.5 + 0.4 * torch.cos(2 * math.pi * (y - 0.015 * t))
            b = (0.5 + 0.3 * torch.sin(0.1 * t)).expand_as(r * g)
            writer.write(torch.stack([r.expand_as(b), g.expand_as(b), b], -1))
    return path


def write_tone(path: Path, seconds: float, rate: int = 16000) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
    with wave.open(str(path), "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes((signal * 32767).astype(np.int16).tobytes())
    return path


def tiny_model(path: Path) -> Path:
    from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig
    from omnisync_core.model.bundle import save_bundle
    from omnisync_core.model.dit import OmniSyncDiT, get_config
    from omnisync_core.model.vae import WanVAE, WanVAEConfig

    torch.manual_seed(0)
    dit = OmniSyncDiT(get_config("tiny", audio_dim=64))
    dit.set_text_context(torch.randn(1, dit.config.text_len, dit.config.text_dim))
    defaults = {"crop_size": 64, "window": 9, "overlap": 2, "steps": 4, "audio_before": 1, "audio_after": 1}
    return save_bundle(path, dit, WanVAE(WanVAEConfig.preset("tiny")),
                       WhisperEncoder(WhisperEncoderConfig(d_model=64, n_heads=2, n_layers=1)), defaults)


def run_once(folder: Path, seconds: float, width: int, height: int, model: Path, device: str) -> dict:
    clip = write_clip(folder / f"clip{seconds}.mp4", seconds, width, height)
    audio = write_tone(folder / f"tone{seconds}.wav", seconds)
    out = folder / f"out{seconds}.mp4"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "omnisync_core.cli", "lipsync", "--video", str(clip), "--audio",
                             str(audio), "--out", str(out), "--model", str(model), "--detector", "none",
                             "--device", device], capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"lipsync failed for {seconds} s: {result.stderr.strip()}")
    found = re.search(r"peak RAM (\d+) MiB(?:, peak VRAM (\d+) MiB)?", result.stdout)
    return {"seconds": seconds, "rss_mib": int(found.group(1)),
            "vram_mib": int(found.group(2)) if found.group(2) else None, "wall_s": time.perf_counter() - started}


def measure(seconds: list[float], width: int = 128, height: int = 96, model: Path | None = None,
            device: str = "cpu") -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = model or tiny_model(folder / "tiny.safetensors")
        return [run_once(folder, s, width, height, model, device) for s in seconds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", nargs="+", type=float, default=[10, 60])
    parser.add_argument("--size", default="128x96", help="frame size WxH")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    rows = measure(sorted(args.seconds), width, height, args.model, args.device)
    print(f"{'clip s':>7} {'peak RSS MiB':>13} {'peak VRAM MiB':>14} {'wall s':>8}")
    for row in rows:
        vram = "-" if row["vram_mib"] is None else str(row["vram_mib"])
        print(f"{row['seconds']:7.0f} {row['rss_mib']:13d} {vram:>14} {row['wall_s']:8.1f}")
    print(f"peak RSS ratio {rows[-1]['seconds']:.0f} s / {rows[0]['seconds']:.0f} s: "
          f"{rows[-1]['rss_mib'] / rows[0]['rss_mib']:.3f}")


if __name__ == "__main__":
    main()

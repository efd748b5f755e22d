"""Tiny random-initialised OmniSync models for the frames and ComfyUI tests (no weights, no network)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from omnisync_core.model.bundle import save_bundle
from omnisync_core.model.dit import OmniSyncDiT, get_config
from omnisync_core.model.pixel_codec import PixelCodec

TINY_DEFAULTS = {"crop_size": 64, "window": 9, "overlap": 2, "steps": 4, "tau": 0.92, "audio_before": 1,
                 "audio_after": 1}


def tiny_parts(seed: int = 0):
    """(dit, codec, whisper) with every weight non-zero, so audio and source latents change the output. The
    codec is the demo model's: the parameter-free pixel codec (4x4 pixels per latent cell, every frame kept)."""
    torch.manual_seed(seed)
    whisper = WhisperEncoder(WhisperEncoderConfig(d_model=64, n_heads=2, n_layers=1)).eval()
    vae = PixelCodec(spatial_factor=4, temporal_factor=1, scale=0.5).eval()
    z = vae.config.z_dim
    dit = OmniSyncDiT(get_config("tiny", audio_dim=64, in_dim=z, out_dim=z, temporal_compression=1))
    dit.init_new_weights()
    for module in dit.modules():
        if hasattr(module, "weight") and module.weight is not None and module.weight.abs().sum() == 0:
            torch.nn.init.normal_(module.weight, std=0.02)
    dit.set_text_context(torch.randn(1, dit.config.text_len, dit.config.text_dim))
    return dit.eval(), vae, whisper


def write_tiny_bundle(path: Path, seed: int = 0, defaults: dict | None = None) -> Path:
    dit, vae, whisper = tiny_parts(seed)
    return save_bundle(path, dit, vae, whisper, dict(TINY_DEFAULTS if defaults is None else defaults))


def talking_pattern(frames: int, height: int = 96, width: int = 128, blob_radius: float = 20.0) -> torch.Tensor:
    """A smooth, codec-friendly moving picture with a face-sized blob in the middle, float 0..1 [T, H, W, 3] (a
    ComfyUI IMAGE)."""
    t = torch.arange(frames, dtype=torch.float32).view(-1, 1, 1)
    y = torch.linspace(0, 1, height).view(1, -1, 1)
    x = torch.linspace(0, 1, width).view(1, 1, -1)
    r = 0.5 + 0.4 * torch.sin(2 * math.pi * (x + 0.02 * t))
    g = 0.5 + 0.4 * torch.cos(2 * math.pi * (y - 0.015 * t))
    blob = torch.exp(-(((x - 0.5) * width) ** 2 + ((y - 0.5) * height) ** 2) / (2 * blob_radius ** 2))
    b = 0.3 + 0.6 * blob.expand(frames, -1, -1)
    return torch.stack([r.expand(frames, height, width), g.expand(frames, height, width), b], -1)


def chirp(seconds: float, rate: int = 22050, channels: int = 2) -> torch.Tensor:
    """A voiced-sounding test signal [C, N] (a vibrato tone with harmonics and an amplitude envelope)."""
    t = torch.arange(int(round(seconds * rate)), dtype=torch.float64) / rate
    f0 = 140 + 30 * torch.sin(2 * math.pi * 3 * t)
    phase = 2 * math.pi * torch.cumsum(f0, 0) / rate
    voice = sum(torch.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t)) * 0.3
    return torch.stack([voice * (0.8 + 0.2 * c) for c in range(channels)]).float()

"""The OmniSync window generator: VAE-encode the crops, start from the noised source (progressive init), sample
with the DiT under DS-CFG on the audio, decode. One call edits one window of face crops."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

from .errors import InputError
from .model.dit import OmniSyncDiT
from .model.vae import WanVAE
from .sampling import (DSCFGGuidance, DSCFGParams, SampleStats, constant_guidance, flow_sigmas, sample,
                       seeded_noise)
from .timeline import valid_window_length

GUIDANCE_MODES = ("ds-cfg", "cfg", "none")


@dataclass
class SamplerOptions:
    """Sampling knobs (DESIGN.md §1). ``guidance``: "ds-cfg" (default), "cfg" (one scale everywhere, the
    ablation), or "none" (audio-conditioned branch only)."""

    steps: int = 50
    shift: float = 5.0
    tau: float = 0.92
    guidance: str = "ds-cfg"
    cfg_scale: float = 4.5
    ds_cfg: DSCFGParams = field(default_factory=DSCFGParams)


def latent_mouths(mouth_xy: Tensor, face_width: Tensor, crop_size: int, latent_hw: tuple[int, int],
                  temporal: int = 4) -> tuple[Tensor, Tensor]:
    """Per-video-frame mouth (crop pixels) -> per-latent-frame mouth and face width in latent cells.

    Latent frame 0 covers video frame 0 and latent frame f >= 1 covers video frames 4f-3 .. 4f (Wan's causal VAE);
    each latent frame takes the mean over its video frames.
    """
    frames = mouth_xy.shape[0]
    latents = 1 + (frames - 1) // temporal
    group = torch.cat([torch.zeros(1, dtype=torch.int64),
                       (torch.arange(1, frames) + temporal - 1) // temporal])
    counts = torch.bincount(group, minlength=latents).clamp_min(1).unsqueeze(1).float()
    mouth = torch.zeros(latents, 2).index_add_(0, group, mouth_xy.float()) / counts
    width = torch.zeros(latents).index_add_(0, group, face_width.float()) / counts[:, 0]
    scale = torch.tensor([latent_hw[1] / crop_size, latent_hw[0] / crop_size])
    return mouth * scale, width * scale[0]


class OmniSyncGenerator:
    """Edits windows of crops with an OmniSync DiT and a Wan VAE. ``device`` and ``dtype`` are where and how the
    models run; crops come and go on the CPU as float 0..1."""

    needs_audio = True

    def __init__(self, dit: OmniSyncDiT, vae: WanVAE, options: Optional[SamplerOptions] = None,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32,
                 step_callback: Optional[Callable[[int, int, Tensor], None]] = None):
        self.options = options or SamplerOptions()
        if self.options.guidance not in GUIDANCE_MODES:
            raise InputError(f"guidance must be one of {', '.join(GUIDANCE_MODES)}, got {self.options.guidance!r}")
        self.device = torch.device(device) if device is not None else next(dit.parameters()).device
        self.dtype = dtype
        self.dit, self.vae = dit.eval(), vae.eval()
        self.step_callback = step_callback
        self.last_stats: Optional[SampleStats] = None

    @property
    def temporal_factor(self) -> int:
        """Video frames per latent frame: 4 for the Wan VAE, the codec's own factor for a pixel codec."""
        return int(getattr(getattr(self.vae, "config", None), "temporal_factor", 4))

    def _guidance(self, mouth_xy: Tensor, face_width: Tensor, crop_size: int, latent_hw: tuple[int, int]):
        opts = self.options
        if opts.guidance == "none":
            return None
        if opts.guidance == "cfg":
            return constant_guidance(opts.cfg_scale)
        mouth, width = latent_mouths(mouth_xy, face_width, crop_size, latent_hw, self.temporal_factor)
        return DSCFGGuidance(mouth.unsqueeze(0).to(self.device), width.unsqueeze(0), latent_hw, opts.tau, opts.ds_cfg)

    @torch.no_grad()
    def denoise(self, z_src: Tensor, noise: Tensor, audio: Tensor, mouth_xy: Tensor, face_width: Tensor,
                crop_size: int, step_callback: Optional[Callable[[int, int, Tensor], None]] = None) -> Tensor:
        """Sample one window's latent: from ``z_src`` noised to tau by ``noise`` (progressive init), under the
        configured guidance. ``audio [n, A, D]``, ``mouth_xy [n, 2]`` and ``face_width [n]`` cover the window's n
        video frames; they are padded like the crops (see :func:`encode_window`)."""
        tail = valid_window_length(audio.shape[0]) - audio.shape[0]
        mouth, width = pad_frames(mouth_xy, tail), pad_frames(face_width, tail)
        guidance = self._guidance(mouth, width, crop_size, tuple(z_src.shape[-2:]))
        tokens = pad_frames(audio, tail).unsqueeze(0).to(self.device, self.dtype)
        z_src_model = z_src.to(self.dtype)

        def velocity(x: Tensor, sigma: Tensor, with_audio: bool) -> Tensor:
            out = self.dit(x.to(self.dtype), sigma.reshape(1), source=z_src_model,
                           audio=tokens if with_audio else None)
            return out.float()

        sigmas = flow_sigmas(self.options.steps, self.options.shift)
        z, self.last_stats = sample(velocity, z_src, noise, sigmas, self.options.tau, guidance,
                                    step_callback if step_callback is not None else self.step_callback)
        return z

    @torch.no_grad()
    def __call__(self, crops: Tensor, audio: Optional[Tensor], mouth_xy: Tensor, face_width: Tensor,
                 seed: int) -> Tensor:
        if audio is None:
            raise InputError("the OmniSync generator needs per-frame audio tokens")
        z_src, noise = encode_window(self.vae, crops, seed, self.device)
        z = self.denoise(z_src, noise, audio, mouth_xy, face_width, crops.shape[1])
        return decode_window(self.vae, z, crops.shape[0])


def pad_frames(t: Tensor, tail: int) -> Tensor:
    """``t`` with its last frame repeated ``tail`` times (windows are padded to 4k + 1 frames)."""
    return torch.cat([t, t[-1:].expand(tail, *t.shape[1:])]) if tail else t


@torch.no_grad()
def encode_window(vae, crops: Tensor, seed: int, device=None) -> tuple[Tensor, Tensor]:
    """A window's crops ``[n, S, S, 3]`` (0..1, padded to 4k + 1 frames by repeating the last) -> the source
    latent and the noise drawn for it from ``seed``."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    video = pad_frames(crops, valid_window_length(crops.shape[0]) - crops.shape[0])
    z_src = vae.encode(video.permute(3, 0, 1, 2).unsqueeze(0).to(device, torch.float32).mul(2).sub(1))
    return z_src, seeded_noise(z_src.shape, seed, device=device)


@torch.no_grad()
def decode_window(vae, z: Tensor, frames: int) -> Tensor:
    """A sampled latent -> the window's first ``frames`` crops ``[frames, S, S, 3]`` float 0..1 on the CPU."""
    return vae.decode(z)[0, :, :frames].permute(1, 2, 3, 0).add(1).div(2).clamp(0, 1).cpu()

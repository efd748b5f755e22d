"""A parameter-free, exactly invertible stand-in for the Wan VAE: pixels folded into latent channels.

Space-to-depth by ``spatial_factor`` and, optionally, Wan's causal temporal grouping by ``temporal_factor``
(latent frame 0 holds video frame 0, latent frame f >= 1 holds video frames t(f-1)+1 .. tf). With no learned
weights, ``decode(encode(x)) == x``, so all image quality is the DiT's job; the bundled demo model uses it
because a 25 MB checkpoint cannot hold a Wan VAE (about 500 MB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ..errors import InputError


@dataclass(frozen=True)
class PixelCodecConfig:
    """Folding factors and the affine map latent = (pixel - shift) / scale (pixels in [-1, 1])."""

    spatial_factor: int = 4
    temporal_factor: int = 1
    channels: int = 3
    shift: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        if self.spatial_factor < 1 or self.temporal_factor < 1 or self.channels < 1:
            raise InputError("The pixel codec's factors and channel count must be positive integers.")
        if not self.scale > 0:
            raise InputError(f"The pixel codec's scale must be positive, got {self.scale!r}.")

    @property
    def z_dim(self) -> int:
        """Latent channels: every pixel value of a latent cell's block of frames and pixels."""
        return self.channels * self.temporal_factor * self.spatial_factor ** 2

    def to_dict(self) -> dict:
        return {"spatial_factor": self.spatial_factor, "temporal_factor": self.temporal_factor,
                "channels": self.channels, "shift": self.shift, "scale": self.scale}


class PixelCodec(nn.Module):
    """Video [B, C, T, H, W] in [-1, 1] <-> latent [B, z_dim, 1 + (T-1)//t, H/s, W/s], with WanVAE's call API.

    Latent channels are ordered (frame-in-group, colour, row-in-block, column-in-block); for latent frame 0
    the group is frame 0 repeated, so every latent frame has the same layout. No parameters, no state.
    """

    def __init__(self, config: "PixelCodecConfig | dict | None" = None, **overrides):
        super().__init__()
        if isinstance(config, dict):
            config = PixelCodecConfig(**config)
        self.config = PixelCodecConfig(**{**(config or PixelCodecConfig()).to_dict(), **overrides})

    def _check_video(self, video: torch.Tensor) -> None:
        c = self.config
        ft, fs = c.temporal_factor, c.spatial_factor
        if video.ndim != 5 or video.shape[1] != c.channels:
            raise InputError(f"The pixel codec expects a video [B, {c.channels}, T, H, W], got {tuple(video.shape)}.")
        t, h, w = video.shape[2:]
        if t % ft != 1 % ft or t == 0:
            raise InputError(f"The pixel codec needs {ft}k+1 frames, got {t}.")
        if h % fs or w % fs or h == 0 or w == 0:
            raise InputError(f"The pixel codec needs height and width that are multiples of {fs}, got {h}x{w}.")

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim or 0 in z.shape:
            raise InputError(f"The pixel codec decodes latents [B, {self.config.z_dim}, T, H, W], "
                             f"got {tuple(z.shape)}.")

    def encode(self, video: torch.Tensor, normalize: bool = True, **_ignored) -> torch.Tensor:
        """Fold ``video`` [B, C, T, H, W] into a float32 latent; ``normalize`` applies (x - shift) / scale.
        Extra WanVAE keyword arguments (chunk, sample, generator) are accepted and have no effect."""
        self._check_video(video)
        c = self.config
        ft, fs = c.temporal_factor, c.spatial_factor
        x = video.float()
        if ft > 1:   # frame 0 fills the whole first group (Wan's causal first latent frame)
            x = torch.cat([x[:, :, :1].expand(-1, -1, ft - 1, -1, -1), x], dim=2)
        z = rearrange(x, "b c (l t) (h p) (w q) -> b (t c p q) l h w", t=ft, p=fs, q=fs)
        return (z - c.shift) / c.scale if normalize else z

    def decode(self, z: torch.Tensor, normalized: bool = True, clamp: bool = True, **_ignored) -> torch.Tensor:
        """Unfold a latent to a float32 video [B, C, 1 + t(L-1), sH, sW] (frame 0 from the first group's last
        slot); ``clamp`` clips to [-1, 1] as the VAE does. Extra WanVAE keyword arguments are ignored."""
        self._check_latent(z)
        c = self.config
        ft, fs = c.temporal_factor, c.spatial_factor
        z = z.float() * c.scale + c.shift if normalized else z.float()
        x = rearrange(z, "b (t c p q) l h w -> b c (l t) (h p) (w q)", t=ft, c=c.channels, p=fs, q=fs)
        x = x[:, :, ft - 1:]
        return x.clamp(-1, 1) if clamp else x

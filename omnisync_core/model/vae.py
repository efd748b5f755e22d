"""Wan2.1 causal 3D VAE (z 16, 4x temporal / 8x spatial compression), original Wan2.1 state-dict key names.

A video of T = 4k+1 frames is encoded chunk by chunk, first frame alone then 4 frames at a time, and decoded one
latent frame at a time (Wan's reference schedule). Every causal temporal conv keeps the last frames of the previous
chunk in a cache, so the result does not depend on the chunking and memory does not grow with T beyond the input and
output tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..errors import InputError
from .vae_keys import diffusers_to_wan_vae, is_diffusers_vae

# Per-channel statistics of Wan2.1 VAE latents (Wan2.1 wan/modules/vae.py, diffusers AutoencoderKLWan config).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

Cache = dict  # module -> last input frames of the previous chunk (or a first-chunk marker)


@dataclass(frozen=True)
class WanVAEConfig:
    """Architecture of the Wan VAE; names follow Wan2.1 (``temperal_downsample`` keeps its original spelling)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    @classmethod
    def preset(cls, name: str) -> "WanVAEConfig":
        """``"wan2.1"`` (the released VAE) or ``"tiny"`` (base dim 8, same topology, for tests)."""
        presets = {"wan2.1": cls(), "tiny": cls(dim=8)}
        if name not in presets:
            raise InputError(f"Unknown VAE preset {name!r}; choose one of {sorted(presets)}.")
        return presets[name]

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> "WanVAEConfig":
        """Infer dim, z_dim, dim_mult, num_res_blocks and temporal downsampling from original-layout weights."""
        try:
            dim = sd["encoder.conv1.weight"].shape[0]
            z_dim = sd["conv2.weight"].shape[0]
        except KeyError as e:
            raise InputError(f"This is not a Wan VAE state dict: key {e.args[0]} is missing.") from None
        blocks: dict[int, set[str]] = {}
        for key in sd:
            if m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(\w+)\..*", key):
                blocks.setdefault(int(m.group(1)), set()).add(m.group(2))
        mult, temporal, n_res = [], [], 0
        for idx in sorted(blocks):
            if "resample" in blocks[idx]:
                temporal.append("time_conv" in blocks[idx])
            elif "residual" in blocks[idx]:
                out_ch = sd[f"encoder.downsamples.{idx}.residual.6.weight"].shape[0]
                if len(mult) == len(temporal):
                    mult.append(out_ch // dim)
                    n_res = 0
                n_res += 1
        if not mult:
            raise InputError("This Wan VAE state dict has no encoder.downsamples blocks.")
        base = cls()
        stats = (base.latents_mean, base.latents_std) if z_dim == len(base.latents_mean) else \
            ((0.0,) * z_dim, (1.0,) * z_dim)
        return cls(dim=dim, z_dim=z_dim, dim_mult=tuple(mult), num_res_blocks=n_res,
                   temperal_downsample=tuple(temporal), latents_mean=stats[0], latents_std=stats[1])

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded only towards the past in time; with a cache, the previous chunk's last frames replace the zeros."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        super().__init__(cin, cout, kernel, stride=stride, padding=(0, ph, pw))  # spatial zero padding by the conv
        self.time_pad = 2 * pt

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        parts, n_zero = [x], self.time_pad
        if cache is not None and self.time_pad:
            prev = cache.get(self)
            if prev is not None:
                parts.insert(0, prev)
                n_zero -= prev.shape[2]
            tail = x if prev is None or x.shape[2] >= self.time_pad else torch.cat(parts, 2)
            cache[self] = tail[:, :, -self.time_pad:].clone()
        if n_zero:
            b, c, _, h, w = x.shape
            parts.insert(0, x.new_zeros(b, c, n_zero, h, w))
        return super().forward(torch.cat(parts, 2) if len(parts) > 1 else x)


class RMSNorm(nn.Module):
    """Channel RMS norm: L2-normalise over channels, times sqrt(dim) and a learned per-channel gain."""

    def __init__(self, dim: int, images: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (2 if images else 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = F.normalize(x, dim=1) (eps 1e-12), in fp32; written out because it is much faster on CPU
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().sum(1, keepdim=True).clamp_min(1e-24))
        return xf.to(x.dtype) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest 2x spatial upsampling (computed in fp32: bf16 nearest interpolation is not supported everywhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class ResidualBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(cin), nn.SiLU(), CausalConv3d(cin, cout, 3, padding=1),
            RMSNorm(cout), nn.SiLU(), nn.Dropout(dropout), CausalConv3d(cout, cout, 3, padding=1))
        self.shortcut = CausalConv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        return self.shortcut(x) + _run(self.residual, x, cache)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        b, _, _, h, _ = x.shape
        y = self.norm(rearrange(x, "b c t h w -> (b t) c h w"))
        q, k, v = rearrange(self.to_qkv(y), "n (three c) h w -> three n 1 (h w) c", three=3)
        y = rearrange(F.scaled_dot_product_attention(q, k, v), "n 1 (h w) c -> n c h w", h=h)
        return x + rearrange(self.proj(y), "(b t) c h w -> b c t h w", b=b)


class Resample(nn.Module):
    """2x spatial down/upsampling, plus 2x temporal for the ``*3d`` modes (causal, cached across chunks)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            # Wan: the first chunk (the first latent frame) is not upsampled in time -> 1 + 4k frames out.
            if self in cache:
                x = rearrange(self.time_conv(x, cache), "b (two c) t h w -> b c (t two) h w", two=2)
            else:
                cache[self] = True
        t = x.shape[2]
        x = self.resample(rearrange(x, "b c t h w -> (b t) c h w"))
        x = rearrange(x, "(b t) c h w -> b c t h w", t=t)
        if self.mode == "downsample3d" and cache is not None:
            # stride-2 conv over [last frame of previous chunk, this chunk]; the very first frame passes through.
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], 2))
        return x


_CACHED = (CausalConv3d, ResidualBlock, AttentionBlock, Resample)


def _run(layers: nn.Sequential, x: torch.Tensor, cache: Cache | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, cache) if isinstance(layer, _CACHED) else layer(x)
    return x


class Encoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig, z_channels: int):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(cin, cout, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(cout, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
                scale /= 2
        self.downsamples = nn.Sequential(*layers)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c, cfg.dropout), AttentionBlock(c),
                                    ResidualBlock(c, c, cfg.dropout))
        self.head = nn.Sequential(RMSNorm(c), nn.SiLU(), CausalConv3d(c, z_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.downsamples, self.middle, self.head):
            x = _run(part, x, cache)
        return x


class Decoder3d(nn.Module):
    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        c = dims[0]
        self.middle = nn.Sequential(ResidualBlock(c, c, cfg.dropout), AttentionBlock(c),
                                    ResidualBlock(c, c, cfg.dropout))
        layers, scale = [], 1.0 / 2 ** (len(cfg.dim_mult) - 2)
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous upsample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                layers.append(ResidualBlock(cin, cout, cfg.dropout))
                if scale in cfg.attn_scales:
                    layers.append(AttentionBlock(cout))
                cin = cout
            if i < len(cfg.dim_mult) - 1:
                layers.append(Resample(cout, "upsample3d" if temperal_upsample[i] else "upsample2d"))
                scale *= 2
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        for part in (self.middle, self.upsamples, self.head):
            x = _run(part, x, cache)
        return x


def _tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def _ramp(size: int, ramp_in: int, ramp_out: int) -> torch.Tensor:
    """1-D blend weight: linear ramps of the given lengths at each end, 1 in between, never 0."""
    w = torch.ones(size)
    if ramp_in:
        w[:ramp_in] = (torch.arange(ramp_in) + 0.5) / ramp_in
    if ramp_out:
        w[size - ramp_out:] = torch.minimum(w[size - ramp_out:], (torch.arange(ramp_out, 0, -1) - 0.5) / ramp_out)
    return w


class WanVAE(nn.Module):
    """Wan2.1 video VAE. ``state_dict()`` uses the original Wan2.1 key names (``encoder.*``, ``conv1``, ``conv2``,
    ``decoder.*``); the latent mean/std are configuration constants, not weights."""

    def __init__(self, config: WanVAEConfig | str = "wan2.1"):
        super().__init__()
        self.config = cfg = WanVAEConfig.preset(config) if isinstance(config, str) else config
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise InputError(f"The VAE latent mean/std need {cfg.z_dim} values each.")
        self.encoder = Encoder3d(cfg, cfg.z_dim * 2)
        self.conv1 = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder3d(cfg)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], config: WanVAEConfig | str | None = None,
                        device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "WanVAE":
        """Build on the meta device and load ``sd`` (original or diffusers key layout) without a random init."""
        if is_diffusers_vae(sd):
            sd = diffusers_to_wan_vae(sd)
        cfg = WanVAEConfig.from_state_dict(sd) if config is None else config
        with torch.device("meta"):
            model = cls(cfg)
        missing, unexpected = model.load_state_dict(dict(sd), strict=False, assign=True)
        if missing or unexpected:
            raise InputError(f"The VAE weights do not fit the Wan2.1 VAE: {len(missing)} missing "
                             f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).")
        return model.to(device=device, dtype=dtype).eval()

    @property
    def _param(self) -> torch.Tensor:
        return self.conv2.weight

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, device=device, dtype=torch.float32).view(shape)
        std = torch.tensor(self.config.latents_std, device=device, dtype=torch.float32).view(shape)
        return mean, std

    def _check_video(self, video: torch.Tensor) -> None:
        ft, fs = self.config.temporal_factor, self.config.spatial_factor
        if video.ndim != 5 or video.shape[1] != 3:
            raise InputError(f"The VAE expects a video tensor [B, 3, T, H, W], got shape {tuple(video.shape)}.")
        t, h, w = video.shape[2:]
        if t % ft != 1:
            raise InputError(f"The VAE needs {ft}k+1 frames (1, {ft + 1}, {2 * ft + 1}, ...), got {t}.")
        if h % fs or w % fs or h == 0 or w == 0:
            raise InputError(f"The VAE needs height and width that are multiples of {fs}, got {h}x{w}.")

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim or 0 in z.shape:
            raise InputError(f"The VAE decodes latents [B, {self.config.z_dim}, T, H, W], "
                             f"got shape {tuple(z.shape)}.")

    @staticmethod
    def _chunks(n_latent: int, chunk: int) -> Iterator[tuple[int, int]]:
        """Latent frame ranges: the first frame alone (Wan's schedule needs it), then ``chunk`` frames each."""
        if chunk < 1:
            raise InputError(f"The VAE chunk size must be at least 1 latent frame, got {chunk}.")
        yield 0, 1
        for l0 in range(1, n_latent, chunk):
            yield l0, min(l0 + chunk, n_latent)

    def encode(self, video: torch.Tensor, normalize: bool = True, chunk: int = 1, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Encode ``video`` [B, 3, T, H, W] in [-1, 1] (T = 4k+1, H and W multiples of 8) to a float32 latent
        [B, z_dim, 1 + (T-1)//4, H/8, W/8] on the video's device.

        normalize: return (mu - mean) / std, what the DiT sees; False gives the raw posterior mean.
        chunk: latent frames per step after the first (1 = Wan's schedule; larger is faster, same result,
            more memory). sample: draw from the posterior instead of returning its mean (deterministic default).
        Gradients flow if enabled: wrap inference in ``torch.inference_mode()``.
        """
        self._check_video(video)
        ft, fs, zc = self.config.temporal_factor, self.config.spatial_factor, self.config.z_dim
        b, _, t, h, w = video.shape
        n_latent = 1 + (t - 1) // ft
        p = self._param
        out = torch.empty(b, zc, n_latent, h // fs, w // fs, device=video.device, dtype=torch.float32)
        cache: Cache = {}
        for l0, l1 in self._chunks(n_latent, chunk):
            frames = video[:, :, max(0, 1 + ft * (l0 - 1)):1 + ft * (l1 - 1)].to(p.device, p.dtype)
            mu, log_var = self.conv1(self.encoder(frames, cache)).float().chunk(2, dim=1)
            if sample:
                std = torch.exp(0.5 * log_var.clamp(-30.0, 20.0))
                mu = mu + std * torch.randn(std.shape, generator=generator, device=std.device, dtype=std.dtype)
            out[:, :, l0:l1] = mu.to(out.device)
        if normalize:
            mean, std = self._stats(out.device)
            out = (out - mean) / std
        return out

    def _decode_tile(self, z: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """Yield (first frame, end frame, pixels) for successive chunks of one latent tile (raw scale)."""
        ft, p = self.config.temporal_factor, self._param
        cache: Cache = {}
        for l0, l1 in self._chunks(z.shape[2], chunk):
            x = self.decoder(self.conv2(z[:, :, l0:l1].to(p.device, p.dtype)), cache)
            yield max(0, 1 + ft * (l0 - 1)), 1 + ft * (l1 - 1), x.float()

    def decode(self, z: torch.Tensor, normalized: bool = True, chunk: int = 1, tile_size: int | None = None,
               tile_overlap: int | None = None, clamp: bool = True) -> torch.Tensor:
        """Decode a latent [B, z_dim, L, h, w] to a float32 video [B, 3, 1 + 4(L-1), 8h, 8w] on the latent's device.

        normalized: ``z`` is in the DiT's normalised scale (as returned by ``encode``); False for raw latents.
        tile_size / tile_overlap: decode in spatial tiles of ``tile_size`` latent cells overlapping by
            ``tile_overlap`` cells (default tile_size // 4), blended linearly in pixel space (bounds memory for
            large frames; approximate, since the middle block's attention sees only its tile). None decodes the
            whole frame at once.
        clamp: clip the output to [-1, 1] as Wan and diffusers do.
        """
        self._check_latent(z)
        ft, fs = self.config.temporal_factor, self.config.spatial_factor
        b, _, n_latent, h, w = z.shape
        z = z.float()
        if normalized:
            mean, std = self._stats(z.device)
            z = z * std + mean
        out = torch.zeros(b, 3, 1 + ft * (n_latent - 1), h * fs, w * fs, device=z.device, dtype=torch.float32)
        if tile_size is None or (tile_size >= h and tile_size >= w):
            for f0, f1, x in self._decode_tile(z, chunk):
                out[:, :, f0:f1] = x.to(out.device)
        else:
            tile_overlap = tile_size // 4 if tile_overlap is None else tile_overlap
            if not 0 <= tile_overlap < tile_size:
                raise InputError(f"The VAE tile overlap must be in [0, tile_size), got {tile_overlap} "
                                 f"for tile size {tile_size}.")
            self._decode_tiled(z, out, chunk, tile_size, tile_overlap)
        return out.clamp_(-1.0, 1.0) if clamp else out

    def _decode_tiled(self, z: torch.Tensor, out: torch.Tensor, chunk: int, tile: int, overlap: int) -> None:
        fs = self.config.spatial_factor
        h, w = z.shape[3:]
        ys, xs = _tile_starts(h, tile, overlap), _tile_starts(w, tile, overlap)
        weight_sum = torch.zeros(out.shape[3:], device=out.device)
        ramp = overlap * fs
        for y0 in ys:
            for x0 in xs:
                th, tw = min(tile, h - y0), min(tile, w - x0)
                wy = _ramp(th * fs, ramp if y0 > 0 else 0, ramp if y0 + th < h else 0)
                wx = _ramp(tw * fs, ramp if x0 > 0 else 0, ramp if x0 + tw < w else 0)
                wmap = (wy[:, None] * wx[None, :]).to(out.device)
                py, px = slice(y0 * fs, (y0 + th) * fs), slice(x0 * fs, (x0 + tw) * fs)
                weight_sum[py, px] += wmap
                for f0, f1, x in self._decode_tile(z[:, :, :, y0:y0 + th, x0:x0 + tw], chunk):
                    out[:, :, f0:f1, py, px] += x.to(out.device) * wmap
        out /= weight_sum


__all__ = ["WanVAE", "WanVAEConfig", "WAN21_LATENTS_MEAN", "WAN21_LATENTS_STD", "CausalConv3d"]

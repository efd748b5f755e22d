"""The Stable Diffusion KL-f8 autoencoder (``stabilityai/sd-vae-ft-mse``, MIT) in plain PyTorch, as LatentSync uses it.

State-dict names are diffusers' ``AutoencoderKL`` (``diffusion_pytorch_model.safetensors``); its older attention names
(``query/key/value/proj_attn``) and the original SD ("LDM") layout (``encoder.down.0.block.0...``, e.g.
``vae-ft-mse-840000-ema-pruned.safetensors``) are mapped onto them when loading.

LatentSync encodes with ``latent_dist.sample(generator)`` (not the mean) and scales by 0.18215 with shift 0
(``scripts/inference.py`` L57-59, ``lipsync_pipeline.py`` L202-229). It runs the VAE on a whole 16-frame window at
once; here encode and decode go ``slice_size`` frames at a time, and a sampled encode draws the noise for the whole
batch first, so slicing never changes the result.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import InputError

__all__ = ["SDVAEConfig", "SD_VAE_PRESETS", "SDVAE", "sd_vae_config_from_shapes", "sd_vae_shapes",
           "normalize_sd_vae_state_dict", "is_sd_vae", "load_sd_vae"]


@dataclass(frozen=True)
class SDVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping) -> "SDVAEConfig":
        names = {f.name for f in fields(SDVAEConfig)}
        return SDVAEConfig(**{k: v for k, v in d.items() if k in names})


SD_VAE_PRESETS = {
    "sd-vae-ft-mse": SDVAEConfig(),
    "tiny": SDVAEConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8),
}


def _config(config) -> SDVAEConfig:
    if isinstance(config, SDVAEConfig):
        return config
    if config not in SD_VAE_PRESETS:
        raise InputError(f"Unknown SD VAE preset {config!r}; choose one of {', '.join(SD_VAE_PRESETS)}.")
    return SD_VAE_PRESETS[config]


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels with a GroupNorm in front and a residual connection."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(ch, ch), nn.Linear(ch, ch), nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch), nn.Identity()])

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        t = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        q, k, v = (p(t)[:, None] for p in (self.to_q, self.to_k, self.to_v))
        o = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])
        return rearrange(o, "b (h w) c -> b c h w", h=h, w=w) + x


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([AttentionBlock(ch, groups)])

    def forward(self, x: Tensor) -> Tensor:
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class _Conv(nn.Module):
    """Holder for a ``.conv`` (diffusers' Downsample2D / Upsample2D names)."""

    def __init__(self, ch: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.down:   # asymmetric padding: one row/column of zeros at the bottom/right only
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    def __init__(self, io: list[tuple[int, int]], groups: int, resample: Optional[str]):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(i, o, groups) for i, o in io])
        if resample == "down":
            self.downsamplers = nn.ModuleList([_Conv(io[-1][1], True)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([_Conv(io[-1][1], False)])

    def forward(self, x: Tensor) -> Tensor:
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, "downsamplers", getattr(self, "upsamplers", [])):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: SDVAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            _Level([(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i]) for j in range(cfg.layers_per_block)], g,
                   "down" if i < n - 1 else None) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for b in self.down_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: SDVAEConfig):
        super().__init__()
        rev, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], g)
        self.up_blocks = nn.ModuleList([
            _Level([(rev[max(i - 1, 0)] if j == 0 else rev[i], rev[i]) for j in range(cfg.layers_per_block + 1)], g,
                   "up" if i < n - 1 else None) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for b in self.up_blocks:
            x = b(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class SDVAE(nn.Module):
    """``encode(pixels in [-1, 1]) -> scaled latents`` and ``decode(scaled latents) -> pixels`` (not clamped).

    Both take ``[N, C, H, W]`` or a window ``[B, C, F, H, W]`` (returned in the same layout) and work ``slice_size``
    images at a time.
    """

    def __init__(self, config: "SDVAEConfig | str" = "sd-vae-ft-mse"):
        super().__init__()
        cfg = self.config = _config(config)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @staticmethod
    def _flat(x: Tensor, what: str) -> tuple[Tensor, Optional[int]]:
        if x.ndim == 5:
            return rearrange(x, "b c f h w -> (b f) c h w"), x.shape[0]
        if x.ndim != 4:
            raise InputError(f"The VAE {what} takes [N, C, H, W] or [B, C, F, H, W], got {list(x.shape)}.")
        return x, None

    @staticmethod
    def _unflat(x: Tensor, b: Optional[int]) -> Tensor:
        return x if b is None else rearrange(x, "(b f) c h w -> b c f h w", b=b)

    def moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance ``[N, latent, H/8, W/8]`` (log-variance clamped to [-30, 20]) of ``x [N, 3, H, W]``."""
        mean, logvar = self.quant_conv(self.encoder(x.to(self.dtype))).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: Optional[torch.Generator] = None, sample: bool = True,
               slice_size: int = 4) -> Tensor:
        """Pixels in [-1, 1] -> ``(z - shift) * scaling``. ``sample=True`` (LatentSync's choice) draws
        ``z = mean + std * noise`` with the noise of the whole batch drawn once from ``generator`` (on its device, in
        the model dtype, as diffusers does), so slices give the same latents as one call; ``sample=False`` uses the
        mean."""
        flat, b = self._flat(x, "encoder")
        if flat.shape[1] != self.config.in_channels:
            raise InputError(f"The VAE encoder takes {self.config.in_channels}-channel images, got {flat.shape[1]}.")
        n, (h, w) = flat.shape[0], flat.shape[-2:]
        noise = None
        if sample:
            gen_dev = generator.device if generator is not None else flat.device
            k = len(self.config.block_out_channels) - 1   # each stride-2 level floors the size
            shape = (n, self.config.latent_channels, h >> k, w >> k)
            noise = torch.randn(shape, generator=generator, device=gen_dev, dtype=self.dtype).to(flat.device)
        out = []
        for i in range(0, n, max(1, slice_size)):
            mean, logvar = self.moments(flat[i:i + slice_size])
            z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise[i:i + slice_size]
            out.append((z - self.config.shift_factor) * self.config.scaling_factor)
        return self._unflat(torch.cat(out), b)

    @torch.no_grad()
    def decode(self, z: Tensor, slice_size: int = 4) -> Tensor:
        """Scaled latents -> pixels (about [-1, 1]), ``slice_size`` images at a time."""
        flat, b = self._flat(z, "decoder")
        if flat.shape[1] != self.config.latent_channels:
            raise InputError(f"The VAE decoder takes {self.config.latent_channels}-channel latents, "
                             f"got {flat.shape[1]}.")
        out = []
        for i in range(0, flat.shape[0], max(1, slice_size)):
            zi = flat[i:i + slice_size].to(self.dtype) / self.config.scaling_factor + self.config.shift_factor
            out.append(self.decoder(self.post_quant_conv(zi)))
        return self._unflat(torch.cat(out), b)


# ---------------------------------------------------------------- checkpoints

_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LDM_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0", "norm": "group_norm"}


def _ldm_key(k: str, n_levels: int) -> str:
    """Original SD (LDM) VAE name -> diffusers name."""
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", k)
    k = re.sub(r"\.mid\.block_(\d)\.", lambda m: f".mid_block.resnets.{int(m.group(1)) - 1}.", k)
    k = re.sub(r"\.mid\.attn_1\.(\w+)\.", lambda m: f".mid_block.attentions.0.{_LDM_ATTN[m.group(1)]}.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.block\.",
               lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m.group(1))}.resnets.", k)
    k = re.sub(r"^decoder\.up\.(\d+)\.upsample\.",
               lambda m: f"decoder.up_blocks.{n_levels - 1 - int(m.group(1))}.upsamplers.0.", k)
    return k.replace(".nin_shortcut.", ".conv_shortcut.")


def normalize_sd_vae_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map any of the three SD VAE layouts to diffusers' current names (attention weights as 2-D linears).

    ComfyUI's ``first_stage_model.`` prefix is stripped."""
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {}
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in sd):   # LDM layout
        n = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        for k, v in sd.items():
            k = _ldm_key(k, n)
            if ".attentions.0.to_" in k and v.ndim == 4:   # 1x1 convs in LDM
                v = v[:, :, 0, 0]
            out[k] = v
        return out
    for k, v in sd.items():
        m = re.match(r"(.*\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$", k)
        out[f"{m.group(1)}.{_OLD_ATTN[m.group(2)]}.{m.group(3)}" if m else k] = v
    return out


def sd_vae_shapes(config) -> dict[str, tuple]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in SDVAE(config).state_dict().items()}


def is_sd_vae(shapes: Mapping) -> bool:
    """True for an SD KL-f8 VAE state dict (diffusers or LDM names), by its keys."""
    keys = set(normalize_sd_vae_state_dict({k: torch.empty(0) for k in shapes}))
    return {"encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.weight",
            "encoder.down_blocks.0.resnets.0.conv1.weight"} <= keys


def sd_vae_config_from_shapes(shapes: Mapping) -> SDVAEConfig:
    """Widths, depth and channels from a (normalised) state dict's shapes; norm groups from the matching preset."""
    s = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    n = len({m.group(1) for k in s if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})
    ch = tuple(s[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n))
    layers = len({m.group(1) for k in s if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))})
    base = next((c for c in SD_VAE_PRESETS.values() if c.block_out_channels == ch), SD_VAE_PRESETS["sd-vae-ft-mse"])
    return replace(base, in_channels=s["encoder.conv_in.weight"][1], out_channels=s["decoder.conv_out.weight"][0],
                   latent_channels=s["post_quant_conv.weight"][0], block_out_channels=ch, layers_per_block=layers)


def load_sd_vae(path_or_sd, device=None, dtype=None, config: "SDVAEConfig | str | None" = None) -> SDVAE:
    """Load the SD VAE from safetensors or a state dict, strictly (meta-device build, eval mode); config from
    ``config``, the file's OmniSync metadata, or the shapes. Raises :class:`CheckpointMismatchError` when the weights
    do not fit."""
    from .loading import (CheckpointError, CheckpointMismatchError, _assign, _best_match, _cast, _target,
                          read_safetensors, validate_state_dict)

    device, dtype = _target(device, dtype)
    if isinstance(path_or_sd, Mapping):
        sd, meta, name = dict(path_or_sd), {}, "state dict"
    else:
        read_dev = device if device is not None and device.type != "meta" else "cpu"
        sd, meta = read_safetensors(path_or_sd, device=read_dev)
        name = str(getattr(path_or_sd, "name", path_or_sd))
    sd = normalize_sd_vae_state_dict(sd)
    if config is None and meta.get("format") == "omnisync" and "config" in meta:
        config = SDVAEConfig.from_dict(json.loads(meta["config"]))
    if config is None:
        if not is_sd_vae(sd):
            raise CheckpointError(f"{name} is not an SD (KL-f8) VAE: it lacks encoder/decoder/quant_conv keys.")
        config = sd_vae_config_from_shapes(sd)
    cfg = _config(config)
    report = validate_state_dict(sd, sd_vae_shapes(cfg))
    if not report.ok:
        report.looks_like = _best_match(sd, {f"SD VAE preset {p!r}": sd_vae_shapes(p) for p in SD_VAE_PRESETS})
        raise CheckpointMismatchError(f"SD VAE ({name})", report)
    with torch.device("meta"):
        model = SDVAE(cfg)
    return _assign(model, _cast(sd, device, dtype))

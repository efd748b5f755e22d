"""LatentSync 1.5/1.6 UNet3D (ByteDance, Apache-2.0) in plain PyTorch: an SD-1.5-sized UNet whose convolutions run per
frame, with AnimateDiff-style temporal (motion) modules and cross-attention on Whisper audio tokens.

State-dict names are upstream's (diffusers UNet2DCondition names plus AnimateDiff's ``motion_modules``), so a converted
``latentsync_unet.pt`` loads as it is: 1246 tensors, 1,267,944,644 elements for the 1.6 config.

Three facts of upstream's model that a port must keep (each is tested):

- The resnets' GroupNorm (and ``conv_norm_out``) normalises the 5-D tensor ``[B, C, F, H, W]``: its statistics span all
  frames of the window, so the model is defined on whole (16-frame) windows, and 8 frames alone give other results than
  the same 8 inside a window. The spatial transformers' and motion modules' GroupNorms are per frame.
- The audio tokens ``[B, F, S, D]`` carry no positional encoding; frame f's pixels attend to frame f's tokens only.
- DeepCache (``cache_interval`` 3, branch 0), as upstream's pipeline runs it through the DeepCache package: on a cached
  step only ``conv_in``, the last layer of the last up block and the output head run; everything else is the previous
  full step's. Here that is explicit: ``forward(..., return_deep_cache=True)`` returns the one tensor a cached step
  needs, ``forward(..., deep_cache=that)`` runs the cached step.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import InputError

__all__ = [
    "LatentSyncUNetConfig", "LATENTSYNC_UNET_PRESETS", "LatentSyncUNet", "latentsync_config_from_shapes",
    "latentsync_unet_shapes", "load_latentsync_unet", "is_latentsync_unet",
]


@dataclass(frozen=True)
class LatentSyncUNetConfig:
    """Architecture of the UNet (upstream's ``configs/unet/stage2_512.yaml`` ``model:`` section, fields renamed).

    ``attention_heads`` is upstream's ``attention_head_dim`` (it is used as the number of heads);
    ``down_cross_attention`` marks the CrossAttnDownBlock3D levels (up blocks mirror them);
    ``motion_norm_groups`` is hard-wired to 32 upstream; ``num_frames`` and ``sample_size`` describe the training
    window (16 frames of 64x64 latents for 1.6) and change nothing in the weights.
    """

    in_channels: int = 13
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_cross_attention: tuple = (True, True, True, False)
    layers_per_block: int = 2
    attention_heads: int = 8
    cross_attention_dim: int = 384
    add_audio_layer: bool = True
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    use_motion_module: bool = True
    motion_module_resolutions: tuple = (1, 2, 4, 8)
    motion_module_mid_block: bool = False
    motion_module_decoder_only: bool = False
    motion_heads: int = 8
    motion_transformer_blocks: int = 1
    motion_attention_blocks: int = 2
    motion_position_encoding: bool = True
    motion_position_encoding_max_len: int = 24
    motion_attention_dim_div: int = 1
    motion_norm_groups: int = 32
    num_frames: int = 16
    sample_size: int = 64

    def __post_init__(self):
        for name in ("block_out_channels", "down_cross_attention", "motion_module_resolutions"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.down_cross_attention) != len(self.block_out_channels):
            raise InputError("down_cross_attention needs one entry per entry of block_out_channels.")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: Mapping) -> "LatentSyncUNetConfig":
        names = {f.name for f in fields(LatentSyncUNetConfig)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"Unknown LatentSync UNet config fields: {', '.join(unknown)}.")
        return LatentSyncUNetConfig(**dict(d))


LATENTSYNC_UNET_PRESETS: dict[str, LatentSyncUNetConfig] = {
    "latentsync-1.6": LatentSyncUNetConfig(),
    "latentsync-1.5": LatentSyncUNetConfig(sample_size=32),   # same architecture, trained at 256x256
    # tests: every structural feature of 1.6 (4 levels, cross-attention in 3, motion modules everywhere but the
    # middle, 2 temporal attentions with position encoding) at 1.6M parameters
    "tiny": LatentSyncUNetConfig(block_out_channels=(32, 32, 32, 32), cross_attention_dim=24, motion_heads=4,
                                 norm_num_groups=8, sample_size=8),
}


def _config(config: "LatentSyncUNetConfig | str") -> LatentSyncUNetConfig:
    if isinstance(config, LatentSyncUNetConfig):
        return config
    if config not in LATENTSYNC_UNET_PRESETS:
        raise InputError(f"Unknown LatentSync UNet preset {config!r}; choose one of "
                         f"{', '.join(LATENTSYNC_UNET_PRESETS)}.")
    return LATENTSYNC_UNET_PRESETS[config]


# ---------------------------------------------------------------- building blocks

def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Tensor:
    """Sinusoidal timestep features ``[B, dim]`` in float32 (diffusers' ``Timesteps``, max period 10000)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if flip_sin_to_cos else emb


class TimestepEmbedding(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class FrameConv(nn.Conv2d):
    """A Conv2d applied to every frame of ``[B, C, F, H, W]`` (upstream's InflatedConv3d; 4-D SD-style weights)."""

    def forward(self, x: Tensor) -> Tensor:
        f = x.shape[2]
        return rearrange(super().forward(rearrange(x, "b c f h w -> (b f) c h w")), "(b f) c h w -> b c f h w", f=f)


class ResnetBlock(nn.Module):
    """SD resnet on a window; its GroupNorms take statistics over all frames of the window together."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = FrameConv(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = FrameConv(cout, cout, 3, padding=1)
        self.conv_shortcut = FrameConv(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Multi-head attention with bias-free q/k/v projections and a biased output projection (``to_out.0``)."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Identity()])

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        context = x if context is None else context
        q, k, v = (rearrange(p(s), "b n (h d) -> b h n d", h=self.heads)
                   for p, s in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        return self.to_out[0](rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x: Tensor) -> Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers' GEGLU FeedForward (``net.0.proj`` C -> 8C, ``net.2`` 4C -> C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class TransformerBlock(nn.Module):
    """Spatial self-attention, cross-attention to the frame's audio tokens, GEGLU feed-forward (pre-LN)."""

    def __init__(self, dim: int, heads: int, audio_dim: Optional[int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        if audio_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, audio_dim)
        else:
            self.attn2 = None
        self.ff = FeedForward(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, audio: Optional[Tensor]) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None and audio is not None:
            x = self.attn2(self.norm2(x), audio) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame transformer on the pixels of a level (upstream's Transformer3DModel with 1x1 conv projections)."""

    def __init__(self, dim: int, heads: int, groups: int, audio_dim: Optional[int]):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(dim, heads, audio_dim)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor, audio: Optional[Tensor]) -> Tensor:
        f, (h, w) = x.shape[2], x.shape[-2:]
        x = rearrange(x, "b c f h w -> (b f) c h w")
        tokens = rearrange(self.proj_in(self.norm(x)), "n c h w -> n (h w) c")
        for block in self.transformer_blocks:
            tokens = block(tokens, audio)
        out = self.proj_out(rearrange(tokens, "n (h w) c -> n c h w", h=h, w=w)) + x
        return rearrange(out, "(b f) c h w -> b c f h w", f=f)


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal frame-position table ``pe [1, max_len, dim]`` (a buffer in the checkpoint)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        pos = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(pos * div)
        pe[0, :, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe)


class TemporalAttention(Attention):
    """Self-attention across the frames at each pixel; the frame-position table is added to its input first."""

    def __init__(self, dim: int, heads: int, pe_len: Optional[int]):
        super().__init__(dim, heads)
        self.pos_encoder = PositionalEncoding(dim, pe_len) if pe_len else None

    def forward(self, x: Tensor, frames: int) -> Tensor:
        s = x.shape[1]
        x = rearrange(x, "(b f) s c -> (b s) f c", f=frames)
        if self.pos_encoder is not None:
            if frames > self.pos_encoder.pe.shape[1]:
                raise InputError(f"The motion modules take at most {self.pos_encoder.pe.shape[1]} frames per window, "
                                 f"got {frames}.")
            x = x + self.pos_encoder.pe[:, :frames]
        return rearrange(super().forward(x), "(b s) f c -> (b f) s c", s=s)


class TemporalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, n_attn: int, pe_len: Optional[int]):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, pe_len) for _ in range(n_attn)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(n_attn)])
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, frames: int) -> Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            x = attn(norm(x), frames) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, dim: int, cfg: LatentSyncUNetConfig):
        super().__init__()
        inner = cfg.motion_heads * (dim // cfg.motion_heads // cfg.motion_attention_dim_div)
        pe_len = cfg.motion_position_encoding_max_len if cfg.motion_position_encoding else None
        self.norm = nn.GroupNorm(cfg.motion_norm_groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, inner)
        self.transformer_blocks = nn.ModuleList([TemporalBlock(inner, cfg.motion_heads, cfg.motion_attention_blocks,
                                                               pe_len) for _ in range(cfg.motion_transformer_blocks)])
        self.proj_out = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        f, (h, w) = x.shape[2], x.shape[-2:]
        x = rearrange(x, "b c f h w -> (b f) c h w")
        tokens = self.proj_in(rearrange(self.norm(x), "n c h w -> n (h w) c"))
        for block in self.transformer_blocks:
            tokens = block(tokens, f)
        out = rearrange(self.proj_out(tokens), "n (h w) c -> n c h w", h=h, w=w) + x
        return rearrange(out, "(b f) c h w -> b c f h w", f=f)


class MotionModule(nn.Module):
    """AnimateDiff's VanillaTemporalModule: one residual temporal transformer."""

    def __init__(self, dim: int, cfg: LatentSyncUNetConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(dim, cfg)

    def forward(self, x: Tensor) -> Tensor:
        return self.temporal_transformer(x)


class Level(nn.Module):
    """One down or up block: ``layers`` x (resnet -> [spatial transformer] -> [motion module]), then resampling.

    An up level's resnet j takes the running tensor concatenated with the skip tensor it pops."""

    def __init__(self, cfg: LatentSyncUNetConfig, resnet_io: list[tuple[int, int]], cross: bool, motion: bool,
                 resample: Optional[str]):
        super().__init__()
        temb, groups, eps = 4 * cfg.block_out_channels[0], cfg.norm_num_groups, cfg.norm_eps
        audio = cfg.cross_attention_dim if cfg.add_audio_layer else None
        self.resnets = nn.ModuleList([ResnetBlock(i, o, temb, groups, eps) for i, o in resnet_io])
        if cross:
            self.attentions = nn.ModuleList([SpatialTransformer(o, cfg.attention_heads, groups, audio)
                                             for _, o in resnet_io])
        if motion:
            self.motion_modules = nn.ModuleList([MotionModule(o, cfg) for _, o in resnet_io])
        out = resnet_io[-1][1]
        if resample == "down":
            self.downsamplers = nn.ModuleList([_Resample(out, stride=2)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([_Resample(out, stride=1)])

    def layer(self, j: int, x: Tensor, temb: Tensor, audio: Optional[Tensor]) -> Tensor:
        x = self.resnets[j](x, temb)
        if hasattr(self, "attentions"):
            x = self.attentions[j](x, audio)
        if hasattr(self, "motion_modules"):
            x = self.motion_modules[j](x)
        return x


class _Resample(nn.Module):
    """Stride-2 3x3 conv (down) or nearest 2x upsampling then a 3x3 conv (up), per frame."""

    def __init__(self, ch: int, stride: int):
        super().__init__()
        self.conv = FrameConv(ch, ch, 3, stride=stride, padding=1)

    def forward(self, x: Tensor, size: Optional[tuple] = None) -> Tensor:
        if self.conv.stride[0] == 2:
            return self.conv(x)
        f = x.shape[2]
        x = rearrange(x, "b c f h w -> (b f) c h w")
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else \
            F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(rearrange(x, "(b f) c h w -> b c f h w", f=f))


class MidBlock(nn.Module):
    def __init__(self, cfg: LatentSyncUNetConfig):
        super().__init__()
        ch, temb = cfg.block_out_channels[-1], 4 * cfg.block_out_channels[0]
        audio = cfg.cross_attention_dim if cfg.add_audio_layer else None
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb, cfg.norm_num_groups, cfg.norm_eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(ch, cfg.attention_heads, cfg.norm_num_groups, audio)])
        if cfg.use_motion_module and cfg.motion_module_mid_block:
            self.motion_modules = nn.ModuleList([MotionModule(ch, cfg)])

    def forward(self, x: Tensor, temb: Tensor, audio: Optional[Tensor]) -> Tensor:
        x = self.attentions[0](self.resnets[0](x, temb), audio)
        if hasattr(self, "motion_modules"):
            x = self.motion_modules[0](x)
        return self.resnets[1](x, temb)


# ---------------------------------------------------------------- the UNet

class LatentSyncUNet(nn.Module):
    """``forward(sample [B, 13, F, h, w], timestep, audio [B, F, S, D]) -> noise prediction [B, 4, F, h, w]``.

    Channels of ``sample``: noisy latent (4), mask (1, 1 = keep), masked-frame latent (4), reference-frame latent (4).
    """

    def __init__(self, config: "LatentSyncUNetConfig | str" = "latentsync-1.6"):
        super().__init__()
        cfg = self.config = _config(config)
        ch = cfg.block_out_channels
        n, L = len(ch), cfg.layers_per_block
        motion = cfg.use_motion_module
        self.conv_in = FrameConv(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], 4 * ch[0])
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            cin = ch[max(i - 1, 0)]
            io = [(cin if j == 0 else ch[i], ch[i]) for j in range(L)]
            self.down_blocks.append(Level(
                cfg, io, cfg.down_cross_attention[i],
                motion and 2 ** i in cfg.motion_module_resolutions and not cfg.motion_module_decoder_only,
                "down" if i < n - 1 else None))
        self.mid_block = MidBlock(cfg)
        self.up_blocks = nn.ModuleList()
        rev, prev = ch[::-1], ch[-1]
        for i in range(n):
            skip_last = rev[min(i + 1, n - 1)]
            io = [((prev if j == 0 else rev[i]) + (skip_last if j == L else rev[i]), rev[i]) for j in range(L + 1)]
            self.up_blocks.append(Level(cfg, io, cfg.down_cross_attention[n - 1 - i],
                                        motion and 2 ** (n - 1 - i) in cfg.motion_module_resolutions,
                                        "up" if i < n - 1 else None))
            prev = rev[i]
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = FrameConv(ch[0], cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def _temb(self, timestep, batch: int, device) -> Tensor:
        t = torch.as_tensor(timestep, device=device)
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)
        emb = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                 self.config.freq_shift)
        return self.time_embedding(emb.to(self.dtype))

    def _check(self, sample: Tensor, audio: Optional[Tensor]) -> Optional[Tensor]:
        cfg = self.config
        if sample.ndim != 5 or sample.shape[1] != cfg.in_channels:
            raise InputError(f"The LatentSync UNet takes [batch, {cfg.in_channels}, frames, h, w] latents, "
                             f"got {list(sample.shape)}.")
        if audio is None:
            return None
        b, _, f = sample.shape[:3]
        if audio.ndim == 4:
            if tuple(audio.shape[:2]) != (b, f) or audio.shape[-1] != cfg.cross_attention_dim:
                raise InputError(f"Audio tokens must be [{b}, {f}, tokens, {cfg.cross_attention_dim}], "
                                 f"got {list(audio.shape)}.")
            audio = rearrange(audio, "b f s d -> (b f) s d")
        elif audio.ndim != 3 or audio.shape[0] != b * f:
            raise InputError(f"Audio tokens must be [batch, frames, tokens, dim], got {list(audio.shape)}.")
        return audio.to(self.dtype)

    def _head(self, x: Tensor) -> Tensor:
        return self.conv_out(F.silu(self.conv_norm_out(x)))

    def forward(self, sample: Tensor, timestep, audio: Optional[Tensor] = None, deep_cache: Optional[Tensor] = None,
                return_deep_cache: bool = False):
        """Predict the noise of ``sample`` at ``timestep`` (int, 0-d or [B]) given per-frame audio tokens.

        ``audio`` None skips the cross-attention (as upstream); CFG's unconditional branch passes zeros instead.
        ``return_deep_cache=True`` returns ``(prediction, cache)``: cache is the input of the last layer of the last up
        block, ``[B, C0, F, h, w]``. ``deep_cache=cache`` runs a DeepCache step: conv_in, that last layer and the
        head only, everything deeper taken from the cached full step (same timestep spacing and conditioning).
        """
        audio = self._check(sample, audio)
        x = sample.to(self.dtype)
        temb = self._temb(timestep, x.shape[0], x.device)
        x = self.conv_in(x)
        last = self.up_blocks[-1]
        j_last = len(last.resnets) - 1
        if deep_cache is not None:
            if deep_cache.shape[0] != x.shape[0] or deep_cache.shape[2:] != x.shape[2:]:
                raise InputError(f"The DeepCache tensor {list(deep_cache.shape)} does not belong to this batch "
                                 f"{list(sample.shape)}.")
            out = self._head(last.layer(j_last, torch.cat([deep_cache.to(x.dtype), x], 1), temb, audio))
            return (out, deep_cache) if return_deep_cache else out
        skips = [x]
        for block in self.down_blocks:
            for j in range(len(block.resnets)):
                x = block.layer(j, x, temb, audio)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)
        x = self.mid_block(x, temb, audio)
        cache = None
        for i, block in enumerate(self.up_blocks):
            for j in range(len(block.resnets)):
                if block is last and j == j_last:
                    cache = x
                x = block.layer(j, torch.cat([x, skips.pop()], 1), temb, audio)
            if hasattr(block, "upsamplers"):
                size = skips[-1].shape[-2:]
                x = block.upsamplers[0](x, None if size == (2 * x.shape[-2], 2 * x.shape[-1]) else tuple(size))
        out = self._head(x)
        return (out, cache) if return_deep_cache else out


# ---------------------------------------------------------------- recognising and loading checkpoints

def latentsync_unet_shapes(config: "LatentSyncUNetConfig | str") -> dict[str, tuple]:
    """Every state-dict key of the model with its shape, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LatentSyncUNet(config).state_dict().items()}


_MOTION = re.compile(r"^(down|up)_blocks\.(\d+)\.motion_modules\.")


def is_latentsync_unet(shapes: Mapping[str, tuple]) -> bool:
    """True if the keys look like a LatentSync UNet: diffusers UNet names, a 13-channel ``conv_in`` (noisy, mask,
    masked and reference latents; an SD UNet has 4 or 9) and audio cross-attention (``attn2``)."""
    conv_in = tuple(getattr(shapes.get("conv_in.weight"), "shape", shapes.get("conv_in.weight")) or ())
    return (len(conv_in) == 4 and conv_in[1] == 13 and "down_blocks.0.resnets.0.conv1.weight" in shapes
            and "conv_out.weight" in shapes and "mid_block.resnets.0.norm1.weight" in shapes
            and any(k.endswith("attn2.to_k.weight") for k in shapes))


def latentsync_config_from_shapes(shapes: Mapping[str, tuple]) -> LatentSyncUNetConfig:
    """The architecture of a LatentSync UNet state dict from its key names and tensor shapes alone.

    Head counts, norm groups and eps are not visible in shapes: they come from the preset with the same widths,
    else from the 1.6 config (SD's 8 heads, 32 groups).
    """
    shapes = {k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()}
    if not is_latentsync_unet(shapes):
        raise InputError("These weights are not a LatentSync UNet (no conv_in / down_blocks / mid_block keys).")

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in shapes)

    n = len({int(m.group(1)) for k in shapes if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    ch = tuple(shapes[f"down_blocks.{i}.resnets.0.conv1.weight"][0] for i in range(n))
    layers = len({int(m.group(1)) for k in shapes if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))})
    cross = tuple(has(f"down_blocks.{i}.attentions.") for i in range(n))
    k_key = next((k for k in shapes if k.endswith("attn2.to_k.weight")), None)
    down_mm = {int(m.group(2)) for k in shapes if (m := _MOTION.match(k)) and m.group(1) == "down"}
    up_mm = {int(m.group(2)) for k in shapes if (m := _MOTION.match(k)) and m.group(1) == "up"}
    res = sorted({2 ** i for i in down_mm} | {2 ** (n - 1 - i) for i in up_mm})
    mm = next((k[: k.index("motion_modules.") + len("motion_modules.0.")] for k in shapes if "motion_modules." in k),
              None)
    base = next((c for c in LATENTSYNC_UNET_PRESETS.values() if c.block_out_channels == ch),
                LATENTSYNC_UNET_PRESETS["latentsync-1.6"])
    kw = dict(in_channels=shapes["conv_in.weight"][1], out_channels=shapes["conv_out.weight"][0],
              block_out_channels=ch, down_cross_attention=cross, layers_per_block=layers,
              add_audio_layer=k_key is not None, use_motion_module=mm is not None,
              motion_module_mid_block=has("mid_block.motion_modules."))
    if k_key is not None:
        kw["cross_attention_dim"] = shapes[k_key][1]
    if mm is not None:
        tt = mm + "temporal_transformer."
        pe = next((shapes[k] for k in shapes if k.startswith(tt) and k.endswith("pos_encoder.pe")), None)
        kw.update(motion_module_resolutions=tuple(res), motion_module_decoder_only=not down_mm and bool(up_mm),
                  motion_transformer_blocks=len({m.group(1) for k in shapes if (m := re.match(
                      re.escape(tt) + r"transformer_blocks\.(\d+)\.", k))}),
                  motion_attention_blocks=len({m.group(1) for k in shapes if (m := re.match(
                      re.escape(tt) + r"transformer_blocks\.0\.attention_blocks\.(\d+)\.", k))}),
                  motion_position_encoding=pe is not None,
                  motion_position_encoding_max_len=pe[1] if pe is not None else base.motion_position_encoding_max_len)
    return replace(base, **kw)


def load_latentsync_unet(path_or_sd, device=None, dtype=None,
                         config: "LatentSyncUNetConfig | str | None" = None) -> LatentSyncUNet:
    """Load the UNet from a safetensors file (or a state dict), strictly: built on the meta device, tensors assigned.

    The config is ``config``, else the file's OmniSync metadata, else read from the shapes. ComfyUI's
    ``model.diffusion_model.`` prefix is stripped. Raises :class:`CheckpointMismatchError` listing missing,
    unexpected and wrong-shape keys when the weights do not fit (upstream's strict=False would hide them).
    """
    from .loading import (CheckpointError, CheckpointMismatchError, _assign, _best_match, _cast, _target,
                          read_safetensors, validate_state_dict)

    device, dtype = _target(device, dtype)
    if isinstance(path_or_sd, Mapping):
        sd, meta, name = dict(path_or_sd), {}, "state dict"
    else:
        read_dev = device if device is not None and device.type != "meta" else "cpu"
        sd, meta = read_safetensors(path_or_sd, device=read_dev)
        name = str(getattr(path_or_sd, "name", path_or_sd))
    prefix = "model.diffusion_model."
    if any(k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if config is None and meta.get("format") == "omnisync":
        if meta.get("kind") not in (None, "latentsync_unet"):
            raise CheckpointError(f"{name} is an OmniSync {meta.get('kind')} checkpoint, not a LatentSync UNet.")
        if "config" in meta:
            config = LatentSyncUNetConfig.from_dict(json.loads(meta["config"]))
    if config is None:
        try:
            config = latentsync_config_from_shapes(sd)
        except InputError as e:
            raise CheckpointError(f"{name}: {e}") from None
    cfg = _config(config)
    report = validate_state_dict(sd, latentsync_unet_shapes(cfg))
    if not report.ok:
        report.looks_like = _best_match(sd, {f"LatentSync UNet preset {p!r}": latentsync_unet_shapes(p)
                                             for p in LATENTSYNC_UNET_PRESETS})
        raise CheckpointMismatchError(f"LatentSync UNet ({name})", report)
    with torch.device("meta"):
        model = LatentSyncUNet(cfg)
    return _assign(model, _cast(sd, device, dtype))

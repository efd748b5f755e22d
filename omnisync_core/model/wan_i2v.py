"""Wan2.1-I2V-14B with the InfiniteTalk audio adapter (MeiGen-AI/InfiniteTalk), in the original Wan key names.

The base is stock Wan2.1 I2V (``wan/modules/multitalk_model.py`` of InfiniteTalk, which is Wan's I2V model plus the
adapter): a 36-channel patch embedding (16 noisy + 4 mask + 16 VAE latent of the reference frame), ``img_emb``
(LayerNorm-Linear-GELU-Linear-LayerNorm, CLIP width 1280 -> dim) and, in every block's cross-attention, ``k_img``,
``v_img``, ``norm_k_img``: the query attends to the text and, separately, to the 257 CLIP tokens, and the two
results are summed before ``o``. ComfyUI's ``WAN21_I2V`` has exactly these keys.

The InfiniteTalk adapter (MeiGen's ``single/infinitetalk.safetensors``, fp32, or Comfy-Org's
``model_patches/wan2.1_infiniteTalk_single_fp16.safetensors``: the same 330 keys, no prefix) adds:

- ``audio_proj``: per latent frame a window of wav2vec2 features (12 layers x 768). Latent frame 0 (video frame 0)
  takes its 5-feature window through ``proj1``; latent frame k >= 1 (video frames 4k-3 .. 4k) takes the first
  frame's window entries [0:3], the centre entry of the two middle frames and the last frame's entries [2:5]
  (8 features) through ``proj1_vf``; then ReLU, ``proj2``, ReLU, ``proj3`` to 32 tokens x 768 and a LayerNorm;
- per block, after the text+CLIP cross-attention and before the FFN, ``norm_x`` (affine LayerNorm) and
  ``audio_cross_attn`` (``q_linear``, ``kv_linear`` with k the first and v the second half of its output,
  ``proj``; no q/k norm, no gate, no timestep modulation) in which each latent frame's tokens attend only to that
  frame's 32 audio tokens. With one speaker upstream's L-RoPE and speaker attention map change nothing, so they are
  left out (two speakers, the ``multi`` weights' use, are not supported).

Upstream's null audio (the "uncond" guidance pass) is zero wav2vec2 windows, which audio_proj's biases and LayerNorm
turn into non-zero tokens: ``audio=None`` means exactly that.

Numerics follow dit.py: the residual stream, norms and modulation are fp32, and so are the time embedding and the
output head (their linears run in fp32, as under upstream's fp32 autocast); other linear layers run in their weight
dtype, or for float8 weights (:class:`~omnisync_core.model.quant.FP8Linear`) in their bias's dtype. (Upstream keeps
the residual stream in the weights' dtype, bf16; fp32 here is the one deliberate difference.)

What each weight option costs on the compute device (parameters: 18.88 B with the adapter; a block is 464.2 M,
of which 464.0 M are Linear weights; outside the blocks 315.6 M, of which 314.7 M are Linear weights):

- bf16/fp16: 18.88 B x 2 B = 37.8 GB.
- fp8 (e4m3, one scale per Linear weight, ComfyUI's ``fp8_scaled``): 18.87 B x 1 B + 7.5 M x 2 B = 18.9 GB, plus
  one Linear weight dequantised to bf16 at a time (the largest, time_projection's 30720 x 5120, is 315 MB, once per
  forward; in the blocks the FFN's 13824 x 5120, 142 MB).
- block swap of N blocks (:mod:`~omnisync_core.model.block_swap`): N blocks stay in pinned host memory and at most
  two of them (the running one and the prefetched next) are on the device: weights on the device
  = outside + (40 - N + min(N, 2)) x block, with block = 0.928 GB (bf16) or 0.464 GB (fp8) and outside = 0.63 GB
  (bf16) or 0.32 GB (fp8). bf16, N = 20: 0.63 + 22 x 0.928 = 21.0 GB; bf16, N = 40: 2.5 GB; fp8, N = 20: 10.5 GB;
  fp8, N = 40: 1.2 GB. Host memory holds N x block (pinned), e.g. 37.1 GB for bf16 N = 40, 18.6 GB for fp8 N = 40.
- activations come on top (estimate, to be measured): an 81-frame 512^2 window is 21 x 32 x 32 = 21,504 tokens; per
  batch item the fp32 residual stream is 21,504 x 5120 x 4 B = 0.44 GB and a block's largest transient, the FFN's
  hidden state and its GELU in bf16, is 2 x 21,504 x 13,824 x 2 B = 1.19 GB, so about 2.5 GB per item and 7.5 GB
  for the three guidance passes in one batch (480p 640^2: 33,600 tokens, x 1.56).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace
from math import prod
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..errors import InputError
from .dit import LayerNorm, RMSNorm, WeightsError, sinusoidal_embedding
from .loading import (
    CheckpointMismatchError, ValidationReport, iter_safetensors, read_header, resolve_device, resolve_dtype,
    validate_state_dict,
)
from .block_swap import BlockSwap
from .quant import FP8_DTYPES, SCALED_FP8_MARKER, FP8Linear, is_fp8, quantize_fp8
from .rope import rope_apply, rope_freqs

__all__ = ["WanI2VConfig", "WAN_I2V_PRESETS", "InfiniteTalkPatchConfig", "WanI2VDiT", "wan_i2v_config",
           "wan_i2v_config_from_shapes", "infinitetalk_patch_config_from_shapes", "is_wan_i2v", "is_infinitetalk_patch",
           "is_infinitetalk_key", "wan_i2v_shapes", "wan_i2v_param_count", "wan_i2v_label", "infinitetalk_patch_label",
           "linear_weight_names", "to_comfy_fp8_scaled", "load_wan_i2v", "strip_comfy_prefix", "audio_windows"]

_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# keys a ComfyUI fp8_scaled file may hold beside the weights: the marker, and per-layer input scales that only
# matter for fp8 matrix products (the weight is dequantised here, so they are read and dropped)
_FP8_EXTRA = re.compile(r"(^scaled_fp8$)|(\.scale_input$)")
_ST_FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class WanI2VConfig:
    """Hyper-parameters (Wan2.1 names; InfiniteTalk's AudioProjModel names in brackets). ``audio=False`` is the
    plain Wan2.1 I2V base, ``audio=True`` the base plus the InfiniteTalk adapter."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36               # 16 noisy + 4 mask + 16 VAE latent of the reference frame
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    clip_dim: int = 1280           # CLIP ViT-H/14 width (img_emb's input)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    audio: bool = True             # the InfiniteTalk adapter
    audio_window: int = 5          # wav2vec2 features around each video frame [audio_window / seq_len]
    vae_scale: int = 4             # video frames per latent frame after the first
    wav2vec_layers: int = 12       # [blocks]
    wav2vec_dim: int = 768         # [channels]
    audio_hidden: int = 512        # [intermediate_dim]
    audio_dim: int = 768           # width of an audio token, the k/v input of the audio attention [output_dim]
    audio_tokens: int = 32         # audio tokens per latent frame [context_tokens]

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise InputError(f"dim {self.dim} must split into {self.num_heads} heads of even size.")
        if self.in_dim <= self.out_dim:
            raise InputError(f"in_dim {self.in_dim} must hold the {self.out_dim} latent channels plus the I2V "
                             f"mask and image latent.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def y_dim(self) -> int:
        """Channels of y (mask + image latent) concatenated to the noisy latent: 20 for Wan2.1 I2V."""
        return self.in_dim - self.out_dim

    @property
    def first_window(self) -> int:
        """Features audio_proj reads for latent frame 0 (5)."""
        return self.audio_window

    @property
    def later_window(self) -> int:
        """Features audio_proj reads for a later latent frame: audio_window + vae_scale - 1 (8)."""
        return self.audio_window + self.vae_scale - 1

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "WanI2VConfig":
        extra = sorted(set(d) - {f.name for f in fields(cls)})
        if extra:
            raise InputError(f"Unknown Wan I2V config fields: {', '.join(extra)}.")
        return cls(**d)


WAN_I2V_PRESETS = {
    # tests (the parity fixture's config): 2 heads of 20 (unequal RoPE bands 8/6/6), narrow CLIP and wav2vec2 widths,
    # InfiniteTalk's real window structure (5 / 8 features, 4 video frames per latent frame)
    "tiny": WanI2VConfig(dim=40, ffn_dim=64, num_heads=2, num_layers=2, text_dim=32, text_len=16, clip_dim=16,
                         wav2vec_layers=3, wav2vec_dim=8, audio_hidden=32, audio_dim=24, audio_tokens=4),
    "wan2.1-i2v-14b": WanI2VConfig(audio=False),
    "infinitetalk-14b": WanI2VConfig(),
}
_LABELS = {"tiny": "Wan2.1 I2V tiny (tests)", "wan2.1-i2v-14b": "Wan2.1 I2V 14B",
           "infinitetalk-14b": "Wan2.1 I2V 14B + InfiniteTalk"}


def wan_i2v_config(preset: "str | WanI2VConfig", **overrides) -> WanI2VConfig:
    """A copy of a preset (by name) or of a config, with field overrides."""
    if isinstance(preset, str):
        if preset not in WAN_I2V_PRESETS:
            raise InputError(f"Unknown Wan I2V preset {preset!r}; choose one of {', '.join(WAN_I2V_PRESETS)}.")
        preset = WAN_I2V_PRESETS[preset]
    return replace(preset, **overrides)


# ---------------------------------------------------------------- layers

def compute_dtype(linear: nn.Module) -> torch.dtype:
    """The dtype a Linear computes in: its weight's, or for a float8 weight its bias's (bf16 without a bias)."""
    w = linear.weight
    if not is_fp8(w):
        return w.dtype
    return linear.bias.dtype if linear.bias is not None else torch.bfloat16


def _lin(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return linear(x.to(compute_dtype(linear)))


def _lin32(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The Linear in fp32 (weights cast up, float8 ones dequantised)."""
    w = linear.dequantized(torch.float32) if isinstance(linear, FP8Linear) else linear.weight.float()
    return F.linear(x.float(), w, None if linear.bias is None else linear.bias.float())


def _attend(q, k, v, heads: int) -> torch.Tensor:
    """SDPA over [B, L, heads*d] inputs (scale d^-0.5) -> [B, Lq, heads*d]."""
    split = lambda t: rearrange(t, "b l (n d) -> b n l d", n=heads)
    return rearrange(F.scaled_dot_product_attention(split(q), split(k), split(v)), "b n l d -> b l (n d)")


class SelfAttention(nn.Module):
    """Wan's self-attention: q/k/v/o, RMS q/k norms over the full width, 3D RoPE."""

    def __init__(self, c: WanI2VConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(c.dim, c.dim) for _ in range(4))
        self.norm_q = RMSNorm(c.dim, c.eps) if c.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(c.dim, c.eps) if c.qk_norm else nn.Identity()

    def forward(self, x, freqs):
        split = lambda t: rearrange(t, "b l (n d) -> b n l d", n=self.num_heads)
        q = rope_apply(split(self.norm_q(_lin(self.q, x))), freqs)
        k = rope_apply(split(self.norm_k(_lin(self.k, x))), freqs)
        y = F.scaled_dot_product_attention(q, k, split(_lin(self.v, x)))
        return _lin(self.o, rearrange(y, "b n l d -> b l (n d)"))


class I2VCrossAttention(nn.Module):
    """Wan's I2V cross-attention: o(attn(q, text) + attn(q, image)), with k_img / v_img / norm_k_img."""

    def __init__(self, c: WanI2VConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(c.dim, c.dim) for _ in range(4))
        self.norm_q = RMSNorm(c.dim, c.eps) if c.qk_norm else nn.Identity()
        self.norm_k = RMSNorm(c.dim, c.eps) if c.qk_norm else nn.Identity()
        self.k_img, self.v_img = nn.Linear(c.dim, c.dim), nn.Linear(c.dim, c.dim)
        self.norm_k_img = RMSNorm(c.dim, c.eps) if c.qk_norm else nn.Identity()

    def forward(self, x, text, image):
        q = self.norm_q(_lin(self.q, x))
        y = _attend(q, self.norm_k(_lin(self.k, text)), _lin(self.v, text), self.num_heads)
        y_img = _attend(q, self.norm_k_img(_lin(self.k_img, image)), _lin(self.v_img, image), self.num_heads)
        return _lin(self.o, y + y_img)


class AudioCrossAttention(nn.Module):
    """InfiniteTalk's single-speaker audio attention (SingleStreamAttention): frame-local, no norms, no RoPE."""

    def __init__(self, c: WanI2VConfig):
        super().__init__()
        self.num_heads = c.num_heads
        self.q_linear = nn.Linear(c.dim, c.dim)
        self.kv_linear = nn.Linear(c.audio_dim, 2 * c.dim)
        self.proj = nn.Linear(c.dim, c.dim)

    def forward(self, x, audio, frames: int):
        """x [B, frames*S, dim]; audio tokens [B, frames, K, audio_dim] -> [B, frames*S, dim] fp32."""
        q = _lin(self.q_linear, rearrange(x, "b (f s) c -> (b f) s c", f=frames))
        k, v = _lin(self.kv_linear, rearrange(audio, "b f k c -> (b f) k c")).chunk(2, dim=-1)
        y = _lin(self.proj, _attend(q, k, v, self.num_heads))
        return rearrange(y, "(b f) s c -> b (f s) c", f=frames).float()


class Block(nn.Module):
    """Wan2.1 I2V attention block (+ InfiniteTalk's audio attention between the cross-attention and the FFN)."""

    def __init__(self, c: WanI2VConfig):
        super().__init__()
        self.norm1 = LayerNorm(c.dim, c.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(c)
        self.norm3 = LayerNorm(c.dim, c.eps, elementwise_affine=True) if c.cross_attn_norm else nn.Identity()
        self.cross_attn = I2VCrossAttention(c)
        self.norm2 = LayerNorm(c.dim, c.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(c.dim, c.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(c.ffn_dim, c.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, c.dim) / c.dim**0.5)
        if c.audio:
            self.audio_cross_attn = AudioCrossAttention(c)
            self.norm_x = LayerNorm(c.dim, c.eps, elementwise_affine=True)

    def forward(self, x, e, freqs, text, image, audio, audio_scale, frames: int):
        """x [B, L, dim] fp32; e [B, 6, dim] fp32; text/image [B, *, dim]; audio [B, frames, K, audio_dim] or None."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e).unsqueeze(2).unbind(1)
        x = x + self.self_attn(self.norm1(x) * (1 + scale1) + shift1, freqs).float() * gate1
        x = x + self.cross_attn(self.norm3(x), text, image).float()
        if audio is not None:
            y = self.audio_cross_attn(self.norm_x(x), audio, frames)
            x = x + (y if audio_scale is None else y * audio_scale)
        h = self.norm2(x) * (1 + scale2) + shift2
        h = _lin(self.ffn[2], self.ffn[1](_lin(self.ffn[0], h)))
        return x + h.float() * gate2


class Head(nn.Module):
    """Output head: AdaLN (2 chunks of the time embedding) + linear to patch pixels, in fp32."""

    def __init__(self, c: WanI2VConfig):
        super().__init__()
        self.norm = LayerNorm(c.dim, c.eps, elementwise_affine=False)
        self.head = nn.Linear(c.dim, c.out_dim * prod(c.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, c.dim) / c.dim**0.5)

    def forward(self, x, e):
        shift, scale = (self.modulation.float() + e[:, None]).unsqueeze(2).unbind(1)
        return _lin32(self.head, self.norm(x) * (1 + scale) + shift)      # fp32, as upstream's autocast


class ImageEmbedding(nn.Module):
    """Wan's MLPProj: LayerNorm(clip_dim) - Linear - GELU - Linear - LayerNorm(dim), torch's eps 1e-5 and exact GELU."""

    def __init__(self, c: WanI2VConfig):
        super().__init__()
        self.proj = nn.Sequential(LayerNorm(c.clip_dim, eps=1e-5), nn.Linear(c.clip_dim, c.clip_dim), nn.GELU(),
                                  nn.Linear(c.clip_dim, c.dim), LayerNorm(c.dim, eps=1e-5))

    def forward(self, clip_features):
        p = self.proj
        return p[4](_lin(p[3], p[2](_lin(p[1], p[0](clip_features)))))


class AudioProj(nn.Module):
    """InfiniteTalk's AudioProjModel: per-video-frame wav2vec2 windows -> ``audio_tokens`` tokens per latent frame."""

    def __init__(self, c: WanI2VConfig):
        super().__init__()
        self.c = c
        per = c.wav2vec_layers * c.wav2vec_dim
        self.proj1 = nn.Linear(c.first_window * per, c.audio_hidden)
        self.proj1_vf = nn.Linear(c.later_window * per, c.audio_hidden)
        self.proj2 = nn.Linear(c.audio_hidden, c.audio_hidden)
        self.proj3 = nn.Linear(c.audio_hidden, c.audio_tokens * c.audio_dim)
        self.norm = LayerNorm(c.audio_dim, eps=1e-5)                     # nn.LayerNorm's default, as upstream

    def latent_windows(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-video-frame windows [B, 1 + s*(T-1), w, L, C] -> (latent frame 0's [B, 1, w*L*C], the later latent
        frames' [B, T-1, (w+s-1)*L*C]): first frame's entries [0 : w//2+1], the middle frames' centre entry,
        the last frame's entries [w//2 :]."""
        c = self.c
        m = c.audio_window // 2
        first = rearrange(audio[:, :1], "b f w l c -> b f (w l c)")
        rest = rearrange(audio[:, 1:], "b (t n) w l c -> b t n w l c", n=c.vae_scale)
        later = torch.cat([rest[:, :, 0, : m + 1], rest[:, :, 1:-1, m], rest[:, :, -1, m:]], dim=2)
        return first, rearrange(later, "b t w l c -> b t (w l c)")

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        """audio [B, 1 + vae_scale*(T-1), audio_window, wav2vec_layers, wav2vec_dim] -> [B, T, audio_tokens,
        audio_dim] fp32."""
        first, later = self.latent_windows(audio)
        h = torch.cat([torch.relu(_lin(self.proj1, first)), torch.relu(_lin(self.proj1_vf, later))], dim=1)
        h = _lin(self.proj3, torch.relu(_lin(self.proj2, h)))
        return self.norm(rearrange(h, "b t (k c) -> b t k c", k=self.c.audio_tokens))


def audio_windows(features: torch.Tensor, start: int, num_frames: int, window: int = 5) -> torch.Tensor:
    """Upstream's per-video-frame windows (``wan/multitalk.py``): features [N, L, C] at the video rate ->
    [num_frames, window, L, C], frame i taking features start+i-window//2 .. start+i+window//2, clamped to [0, N-1]."""
    if features.ndim != 3 or features.shape[0] == 0:
        raise InputError(f"features must be [N > 0, layers, dim], got {tuple(features.shape)}.")
    idx = torch.arange(start, start + num_frames)[:, None] + torch.arange(window)[None] - window // 2
    return features[idx.clamp_(0, features.shape[0] - 1).to(features.device)]


# ---------------------------------------------------------------- model

class WanI2VDiT(nn.Module):
    """Wan2.1 I2V DiT with the optional InfiniteTalk adapter, in the original Wan / InfiniteTalk state-dict keys.

    ``block_swap`` (a :class:`~omnisync_core.model.block_swap.BlockSwap`, or None) runs the blocks it holds from
    host memory; see :meth:`forward`.
    """

    def __init__(self, config: "WanI2VConfig | str"):
        super().__init__()
        c = self.config = wan_i2v_config(config)
        self.patch_embedding = nn.Conv3d(c.in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.head = Head(c)
        self.img_emb = ImageEmbedding(c)
        if c.audio:
            self.audio_proj = AudioProj(c)
        self.block_swap = None
        self.init_weights()

    def init_weights(self):
        """Wan's init: xavier linears with zero bias, N(0, .02) text/time embeddings, zero output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def set_block_swap(self, num_blocks: int, device, **kwargs) -> "BlockSwap | None":
        """Keep the first `num_blocks` blocks in host memory (pinned on CUDA) and the rest on `device`; 0 turns it
        off (every block then moves to `device`). Returns the BlockSwap (None for 0)."""
        if num_blocks <= 0:
            self.blocks.to(device)
            self.block_swap = None
        else:
            self.block_swap = BlockSwap(self.blocks, num_blocks, device, **kwargs)
        return self.block_swap

    # ------------------------------------------------------------ conditioning

    def embed_time(self, sigma: torch.Tensor):
        """sigma [B] -> (e [B, dim], e0 [B, 6, dim]) fp32, timestep = 1000 * sigma (sinusoid in float64). The time MLPs
        run in fp32 whatever the weights' dtype, as upstream's fp32 autocast does (a transient fp32 copy of
        time_projection's weight, 629 MB for the 14B)."""
        with torch.autocast(device_type=sigma.device.type, enabled=False):
            s = sinusoidal_embedding(self.config.freq_dim, sigma * 1000.0)
            e = _lin32(self.time_embedding[2], F.silu(_lin32(self.time_embedding[0], s)))
            e0 = _lin32(self.time_projection[1], F.silu(e))
        return e, e0.unflatten(1, (6, self.config.dim))

    def embed_text(self, text: torch.Tensor) -> torch.Tensor:
        """umT5 features [B, L <= text_len, text_dim], zero-padded to text_len as Wan (the pad rows are attended)."""
        c = self.config
        text = F.pad(text, (0, 0, 0, c.text_len - text.shape[1]))
        t = self.text_embedding
        return _lin(t[2], t[1](_lin(t[0], text)))

    def audio_tokens(self, audio: torch.Tensor) -> torch.Tensor:
        """Per-video-frame wav2vec2 windows -> audio tokens per latent frame [B, T, audio_tokens, audio_dim] fp32."""
        if not self.config.audio:
            raise InputError("This Wan I2V model has no InfiniteTalk adapter; load it with the patch.")
        return self.audio_proj(audio)

    def _inputs(self, x, sigma, text, clip_features, y, audio, audio_tokens):
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.out_dim:
            raise InputError(f"x must be a noisy latent [B, {c.out_dim}, T, H, W], got {tuple(x.shape)}.")
        b, _, t, hh, ww = x.shape
        if any(s % p for s, p in zip(x.shape[2:], c.patch_size)):
            raise InputError(f"Latent size {tuple(x.shape[2:])} is not divisible by the patch {c.patch_size}.")
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
        if sigma.numel() not in (1, b):
            raise InputError(f"sigma must be a scalar or have one value per batch item ({b}), got {sigma.numel()}.")

        def batch(name, v, tail, what):
            if v is None or v.ndim != len(tail) + 1 or v.shape[0] not in (1, b) or any(
                    want is not None and got != want for got, want in zip(v.shape[1:], tail)):
                got = None if v is None else tuple(v.shape)
                raise InputError(f"{name} must be {what}, got {got}.")
            return v.expand(b, *v.shape[1:])

        text = batch("text", text, (None, c.text_dim), f"umT5 features [B or 1, L <= {c.text_len}, {c.text_dim}]")
        if text.shape[1] > c.text_len:
            raise InputError(f"text has {text.shape[1]} tokens; the model takes at most {c.text_len}.")
        clip_features = batch("clip_features", clip_features, (None, c.clip_dim),
                              f"CLIP vision features [B or 1, 257, {c.clip_dim}]")
        y = batch("y", y, (c.y_dim, t, hh, ww), f"the I2V condition [B or 1, {c.y_dim} (mask 4 + image latent), "
                                                f"{t}, {hh}, {ww}]")
        frames = c.vae_scale * (t - 1) + 1
        if not c.audio:
            if audio is not None or audio_tokens is not None:
                raise InputError("This Wan I2V model has no InfiniteTalk adapter, so it takes no audio.")
        elif audio_tokens is not None:
            audio_tokens = batch("audio_tokens", audio_tokens, (t, c.audio_tokens, c.audio_dim),
                                 f"audio tokens [B or 1, {t}, {c.audio_tokens}, {c.audio_dim}]")
        else:
            win = (frames, c.audio_window, c.wav2vec_layers, c.wav2vec_dim)
            if audio is None:                     # upstream's null audio: zero wav2vec2 features
                audio = x.new_zeros(1, *win, dtype=torch.float32)
            audio = batch("audio", audio, win, f"wav2vec2 windows [B or 1, {frames} video frames for {t} latent "
                                               f"frames, {c.audio_window}, {c.wav2vec_layers}, {c.wav2vec_dim}]")
            audio_tokens = self.audio_tokens(audio)
        return sigma.expand(b), text, clip_features, y, audio_tokens

    def forward(self, x, sigma, text, clip_features, y, audio=None, *, audio_tokens=None, audio_scale=None):
        """Velocity v = eps - x0 (Wan's convention) for a noisy latent.

        x: [B, 16, T, H, W] noisy latent; sigma: [B] or scalar in [0, 1] (timestep = 1000 * sigma);
        text: [B or 1, L <= 512, 4096] umT5 features, unpadded (zero-padded to 512 here, as Wan);
        clip_features: [B or 1, 257, 1280] CLIP ViT-H penultimate hidden states of the reference frame;
        y: [B or 1, 20, T, H, W] the I2V condition: 4 mask channels (1 on the known latent frame 0) and the VAE latent
          of the reference frame followed by zero (grey) frames;
        audio: [B or 1, 4*(T-1)+1, 5, 12, 768] wav2vec2 windows per video frame (see :func:`audio_windows`), or None
          for upstream's null audio (zero features; never a skipped attention);
        audio_tokens: [B or 1, T, 32, 768] instead of `audio`, from :meth:`audio_tokens` (compute them once per window);
        audio_scale: None, a float or [B]: multiplies the audio attention's output (None = upstream).
        Batch items may differ in every condition, so the three guidance passes run as one batch.
        Returns [B, 16, T, H, W] in x's dtype.
        """
        c = self.config
        sigma, text, clip_features, y, a_tokens = self._inputs(x, sigma, text, clip_features, y, audio, audio_tokens)
        b, _, t, hh, ww = x.shape
        pt, ph, pw = c.patch_size
        grid = (t // pt, hh // ph, ww // pw)
        w = self.patch_embedding.weight
        tokens = F.conv3d(torch.cat([x, y.to(x.dtype)], dim=1).to(w.dtype), w, self.patch_embedding.bias,
                          stride=c.patch_size)
        tokens = rearrange(tokens, "b c t h w -> b (t h w) c").float()
        e, e0 = self.embed_time(sigma)
        text_ctx, image_ctx = self.embed_text(text), self.img_emb(clip_features)
        freqs = rope_freqs(c.head_dim, grid, device=x.device)
        scale = None
        if audio_scale is not None and a_tokens is not None:
            scale = torch.as_tensor(audio_scale, device=x.device, dtype=torch.float32).reshape(-1)
            scale = scale.expand(b).view(b, 1, 1) if scale.numel() in (1, b) else None
            if scale is None:
                raise InputError(f"audio_scale must be a number or one value per batch item ({b}).")
        args = (e0, freqs, text_ctx, image_ctx, a_tokens, scale, grid[0])
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens, *args) if self.block_swap is None else self.block_swap.run(i, blk, tokens, *args)
        out = self.head(tokens, e)
        out = rearrange(out, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                        t=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw)
        return out.to(x.dtype)


# ---------------------------------------------------------------- key layouts

def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def strip_comfy_prefix(state_dict: Mapping) -> dict:
    """The same mapping without ComfyUI's `model.diffusion_model.` (or `diffusion_model.`) key prefix."""
    for p in _PREFIXES:
        if state_dict and all(k.startswith(p) for k in state_dict if k != SCALED_FP8_MARKER):
            return {(k[len(p):] if k.startswith(p) else k): v for k, v in state_dict.items()}
    return dict(state_dict)


def is_infinitetalk_key(key: str) -> bool:
    """True for the adapter's keys (audio_proj.*, blocks.N.audio_cross_attn.*, blocks.N.norm_x.*)."""
    return key.startswith("audio_proj.") or ".audio_cross_attn." in key or ".norm_x." in key


def _plain(shapes: Mapping) -> dict:
    """Key -> shape without the prefix and without fp8 scales / markers."""
    sd = strip_comfy_prefix(shapes)
    return {k: _shape(v) for k, v in sd.items() if not _FP8_EXTRA.search(k) and not k.endswith(".scale_weight")}


def is_wan_i2v(shapes: Mapping) -> bool:
    """True when the keys (bare or with ComfyUI's prefix) are a Wan2.1 I2V DiT (k_img and img_emb, as ComfyUI)."""
    sd = _plain(shapes)
    return "blocks.0.cross_attn.k_img.weight" in sd and "img_emb.proj.1.weight" in sd


def is_infinitetalk_patch(shapes: Mapping) -> bool:
    """True when the keys are InfiniteTalk's adapter alone (audio_proj and no Wan base), as ComfyUI's
    ModelPatchLoader detects it (``audio_proj.proj1.weight``)."""
    sd = _plain(shapes)
    return "audio_proj.proj1.weight" in sd and "audio_proj.proj1_vf.weight" in sd and "patch_embedding.weight" not in sd


def _layers(sd) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})


def _need(sd, key, what):
    if key not in sd:
        raise WeightsError(f"Cannot read the {what} architecture: tensor {key} is missing.")
    return sd[key]


@dataclass
class InfiniteTalkPatchConfig:
    """What an InfiniteTalk adapter file fixes: the base width and depth it fits, and its audio path."""

    dim: int = 5120
    num_layers: int = 40
    audio_window: int = 5
    vae_scale: int = 4
    wav2vec_layers: int = 12
    wav2vec_dim: int = 768
    audio_hidden: int = 512
    audio_dim: int = 768
    audio_tokens: int = 32

    def apply(self, base: WanI2VConfig) -> WanI2VConfig:
        """The base config with this adapter; raises WeightsError when it does not fit the base."""
        if (self.dim, self.num_layers) != (base.dim, base.num_layers):
            raise WeightsError(f"The InfiniteTalk adapter is for a {self.num_layers}-block, {self.dim}-wide Wan model; "
                               f"the base has {base.num_layers} blocks of width {base.dim}.")
        return replace(base, audio=True, **{f.name: getattr(self, f.name) for f in fields(self)
                                            if f.name not in ("dim", "num_layers")})

    def param_count(self) -> int:
        return sum(prod(s) for k, s in wan_i2v_shapes(self.apply(_base_for(self))).items() if is_infinitetalk_key(k))


def _base_for(p: InfiniteTalkPatchConfig) -> WanI2VConfig:
    same = [c for c in WAN_I2V_PRESETS.values() if c.dim == p.dim]
    base = same[0] if same else WanI2VConfig(dim=p.dim, num_heads=max(1, p.dim // 128))
    return replace(base, num_layers=p.num_layers, audio=False)


def infinitetalk_patch_config_from_shapes(shapes: Mapping) -> InfiniteTalkPatchConfig:
    """Read an adapter's config from its key -> shape mapping (shapes, tensors or TensorInfo; a merged base+adapter
    file works too). The window split is read from proj1 / proj1_vf (window w and w + vae_scale - 1 features, with
    vae_scale 4 as Wan's VAE); the layers x width of one feature (12 x 768 = 9216) is split with the width of a
    preset that divides it (768). Raises WeightsError when the adapter's keys are missing."""
    sd = _plain(shapes)
    if "audio_proj.proj1.weight" not in sd:
        raise WeightsError("Not an InfiniteTalk adapter: it has no audio_proj.proj1.* tensors.")
    what = "InfiniteTalk adapter"
    hidden, first = _need(sd, "audio_proj.proj1.weight", what)
    later = _need(sd, "audio_proj.proj1_vf.weight", what)[1]
    audio_dim = _need(sd, "audio_proj.norm.weight", what)[0]
    dim = _need(sd, "blocks.0.audio_cross_attn.q_linear.weight", what)[0]
    vae_scale = 4
    per, rem = divmod(later - first, vae_scale - 1)
    if rem or per <= 0 or first % per:
        raise WeightsError(f"audio_proj's inputs ({first}, {later}) are not windows of w and w + 3 features.")
    width = next((c.wav2vec_dim for c in WAN_I2V_PRESETS.values() if per % c.wav2vec_dim == 0
                  and c.wav2vec_layers * c.wav2vec_dim == per), None)
    width = width or next((c.wav2vec_dim for c in WAN_I2V_PRESETS.values() if per % c.wav2vec_dim == 0), per)
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.audio_cross_attn", k))}
    tokens = _need(sd, "audio_proj.proj3.weight", what)[0] // audio_dim
    return InfiniteTalkPatchConfig(
        dim=dim, num_layers=len(layers), audio_window=first // per, vae_scale=vae_scale, wav2vec_layers=per // width,
        wav2vec_dim=width, audio_hidden=hidden, audio_dim=audio_dim, audio_tokens=tokens)


def wan_i2v_config_from_shapes(shapes: Mapping, num_heads: "int | None" = None) -> WanI2VConfig:
    """Read a WanI2VConfig from a checkpoint's key -> shape mapping (shapes, tensors or TensorInfo; bare keys or
    ComfyUI's prefix; fp8_scaled files too). A base alone gives ``audio=False``; a merged file holding the adapter
    gives ``audio=True``. Heads: `num_heads`, else a preset of the same width, else dim // 128 (Wan's head dim, as
    ComfyUI). text_len and eps come from a preset of the same width (Wan's values). Raises WeightsError otherwise."""
    sd = _plain(shapes)
    if not is_wan_i2v(sd):
        t2v = "patch_embedding.weight" in sd and "head.modulation" in sd
        raise WeightsError("Not a Wan2.1 I2V DiT: it has no cross_attn.k_img / img_emb tensors"
                           + (" (it looks like a Wan text-to-video DiT)." if t2v else "."))
    what = "Wan2.1 I2V DiT"
    dim, in_dim, *patch = _need(sd, "patch_embedding.weight", what)
    same = [p for p in WAN_I2V_PRESETS.values() if p.dim == dim]
    base = same[0] if same else WanI2VConfig()
    if num_heads is None:
        if not same and dim % 128:
            raise WeightsError(f"Cannot tell the number of heads for width {dim}; pass num_heads.")
        num_heads = base.num_heads if same else dim // 128
    cfg = replace(base, dim=dim, ffn_dim=_need(sd, "blocks.0.ffn.0.weight", what)[0], num_heads=num_heads,
                  num_layers=_layers(sd), in_dim=in_dim, out_dim=_need(sd, "head.head.weight", what)[0] // prod(patch),
                  patch_size=tuple(patch), freq_dim=_need(sd, "time_embedding.0.weight", what)[1],
                  text_dim=_need(sd, "text_embedding.0.weight", what)[1],
                  clip_dim=_need(sd, "img_emb.proj.1.weight", what)[1],
                  qk_norm="blocks.0.self_attn.norm_q.weight" in sd, cross_attn_norm="blocks.0.norm3.weight" in sd,
                  audio=False)
    if "audio_proj.proj1.weight" in sd:
        cfg = infinitetalk_patch_config_from_shapes(sd).apply(cfg)
    return cfg


def wan_i2v_shapes(config: "WanI2VConfig | str") -> dict[str, tuple]:
    """Key -> shape of a WanI2VDiT (built with one block on the meta device, the blocks' keys replicated)."""
    cfg = wan_i2v_config(config)
    with torch.device("meta"):
        one = {k: tuple(v.shape) for k, v in WanI2VDiT(replace(cfg, num_layers=1)).state_dict().items()}
    out = {}
    for k, s in one.items():
        if k.startswith("blocks.0."):
            out.update({f"blocks.{i}.{k[9:]}": s for i in range(cfg.num_layers)})
        else:
            out[k] = s
    return out


def wan_i2v_param_count(config: "WanI2VConfig | str", part: str = "all") -> int:
    """Parameters of the whole model ('all'), the Wan base ('base') or the InfiniteTalk adapter ('adapter')."""
    keep = {"all": lambda k: True, "base": lambda k: not is_infinitetalk_key(k), "adapter": is_infinitetalk_key}[part]
    return sum(prod(s) for k, s in wan_i2v_shapes(config).items() if keep(k))


def wan_i2v_label(config: WanI2VConfig) -> str:
    """'Wan2.1 I2V 14B' / 'Wan2.1 I2V 14B + InfiniteTalk' for the released layouts, else with the parameter count."""
    for name, preset in WAN_I2V_PRESETS.items():
        if preset == config:
            return _LABELS[name]
    tail = " + InfiniteTalk" if config.audio else ""
    return f"Wan2.1 I2V{tail} ({wan_i2v_param_count(config) / 1e9:.2f} B params)"


def infinitetalk_patch_label(config: InfiniteTalkPatchConfig) -> str:
    """'InfiniteTalk adapter for Wan2.1 I2V 14B (2.49 B params)'. The single- and multi-speaker files have the
    same keys and shapes, so the label cannot tell them apart."""
    size = "14B" if (config.dim, config.num_layers) == (5120, 40) else f"{config.num_layers} x {config.dim}"
    return f"InfiniteTalk adapter for Wan2.1 I2V {size} ({config.param_count() / 1e9:.2f} B params)"


def linear_weight_names(model: nn.Module) -> list[str]:
    """State-dict names of every nn.Linear / FP8Linear weight: the tensors ComfyUI's fp8_scaled files store as
    float8 (Conv3d, norms, modulation and biases stay 16-bit)."""
    return [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, FP8Linear))]


def to_comfy_fp8_scaled(state_dict: Mapping[str, torch.Tensor], fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                        other_dtype: torch.dtype = torch.float16, scale_input: bool = True) -> dict[str, torch.Tensor]:
    """A Wan I2V (+ adapter) state dict in Comfy-Org's ``*_fp8_scaled`` layout: every Linear weight float8 with a 0-d
    float32 ``scale_weight`` (amax / 448) and, as Comfy-Org's files hold, a 0-d float32 ``scale_input`` of 1 (what
    ComfyUI assumes when it is absent; it only matters for fp8 matrix products); everything else in
    ``other_dtype``; the ``scaled_fp8`` marker (an empty float8 tensor). Keys stay bare, as in Comfy-Org's files.
    Memory: one float8 copy of the weights beside the input, one tensor converted at a time."""
    sd = strip_comfy_prefix(state_dict)
    cfg = wan_i2v_config_from_shapes(sd)
    with torch.device("meta"):
        linears = set(linear_weight_names(WanI2VDiT(cfg)))
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name in linears:
            stem = name[: -len("weight")]
            out[name], out[stem + "scale_weight"] = quantize_fp8(t, fp8_dtype)
            if scale_input:
                out[stem + "scale_input"] = torch.ones((), dtype=torch.float32)
        else:
            out[name] = t.to(other_dtype) if t.is_floating_point() else t
    out[SCALED_FP8_MARKER] = torch.empty(0, dtype=fp8_dtype)
    return out


# ---------------------------------------------------------------- loading

class _Source:
    """Tensors of one checkpoint (a safetensors path or a state dict): names -> shape/dtype, and a reader."""

    def __init__(self, src):
        self.src = src
        if isinstance(src, Mapping):
            self.name = "state dict"
            raw = {k: (tuple(v.shape), v.dtype) for k, v in src.items()}
        else:
            self.name = Path(src).name
            raw = {k: (i.shape, _ST_FP8.get(i.dtype)) for k, i in read_header(src)[0].items()}
        plain = strip_comfy_prefix(raw)
        self.info = plain                                  # bare name -> (shape, dtype or None)
        self.original = dict(zip(plain, raw))              # bare name -> name in the source

    def read(self, names: Iterable[str], device):
        wanted = {self.original[n]: n for n in names}
        if isinstance(self.src, Mapping):
            for orig, bare in wanted.items():
                yield bare, self.src[orig]
        else:
            for orig, t in iter_safetensors(self.src, device=device, keys=wanted):
                yield wanted[orig], t


def _fp8_in(info) -> bool:
    return info[1] in FP8_DTYPES


def _swap_in_fp8(model: nn.Module, weights: set[str], fp8_dtype) -> None:
    """Replace the nn.Linear owning each weight name with a meta FP8Linear of the same shape."""
    for name in weights:
        path = name[: -len(".weight")]
        parent_name, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, attr)
        if isinstance(old, FP8Linear):
            continue
        with torch.device("meta"):
            setattr(parent, attr, FP8Linear(old.in_features, old.out_features, old.bias is not None, fp8_dtype))


def load_wan_i2v(base, patch=None, *, device=None, dtype=None, config: "WanI2VConfig | str | None" = None,
                 fp8: "bool | str | None" = None, swap_blocks: int = 0) -> WanI2VDiT:
    """Load Wan2.1 I2V (+ the InfiniteTalk adapter) tensor by tensor into a meta-built model (eval mode).

    base: a safetensors path, a list of them (the official 7 shards), or a state dict; original Wan keys, bare or
    with ComfyUI's prefix, 16-bit / fp32 or ComfyUI's fp8_scaled (float8 weights + scale_weight [+ scale_input], the
    ``scaled_fp8`` marker). patch: the adapter (path or state dict) or None; its keys override the base's, as
    upstream's dict update. A single file holding both works as `base` alone.
    dtype: compute/storage dtype of the non-float8 tensors (default: as stored). fp8: None keeps float8 weights
    where the file has them; True or "e4m3fn" / "e5m2" also quantises every 16/32-bit Linear weight as it streams
    in (one scale per tensor); False dequantises float8 weights to `dtype` (needs `dtype`).
    swap_blocks: keep the first N blocks in (pinned, on CUDA) host memory and run them through
    :class:`~omnisync_core.model.block_swap.BlockSwap`; their tensors never touch the device at load.
    Host memory stays bounded: one tensor is in flight from the file's memory map, plus the swapped blocks.
    Raises CheckpointMismatchError (missing / unexpected / wrong-shape keys, one message) before reading tensors.
    """
    dev = resolve_device(device) if device is not None else torch.device("cpu")
    dt = None if dtype is None else resolve_dtype(dtype, dev)
    sources = [_Source(s) for s in (list(base) if isinstance(base, (list, tuple)) else [base])]
    if patch is not None:
        sources.append(_Source(patch))
    info: dict[str, tuple] = {}
    owner: dict[str, _Source] = {}
    for s in sources:
        for k, v in s.info.items():
            info[k], owner[k] = v, s                         # later sources (the patch) win
    names = ", ".join(s.name for s in sources)
    shapes = {k: v[0] for k, v in info.items() if not _FP8_EXTRA.search(k) and not k.endswith(".scale_weight")}
    cfg = wan_i2v_config(config) if config is not None else wan_i2v_config_from_shapes(shapes)
    if isinstance(fp8, str) and fp8 not in ("e4m3fn", "e5m2"):
        raise InputError(f"fp8 must be None, True, False, 'e4m3fn' or 'e5m2', got {fp8!r}.")
    want_fp8 = {True: torch.float8_e4m3fn, "e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}.get(fp8)
    if fp8 is False and dt is None and any(_fp8_in(v) for v in info.values()):
        raise InputError("fp8=False dequantises float8 weights: pass the dtype to dequantise them to.")

    with torch.device("meta"):
        model = WanI2VDiT(cfg)
    linears = set(linear_weight_names(model))
    stored_fp8 = {k for k in linears if k in info and _fp8_in(info[k])}
    missing_scales = sorted(k for k in stored_fp8 if k[:-6] + "scale_weight" not in info)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stand_ins = {k: torch.empty(v, device="meta") for k, v in shapes.items()}   # validate_state_dict reads .shape
    report: ValidationReport = validate_state_dict(stand_ins, expected)
    report.missing += [f"{k[:-6]}scale_weight (float8 weight without its scale)" for k in missing_scales]
    stray = sorted(k for k in info if k.endswith(".scale_weight") and k[:-12] + "weight" not in stored_fp8)
    report.unexpected += stray
    if not report.ok:
        raise CheckpointMismatchError(f"Wan2.1 I2V DiT ({names})", report)

    fp8_kinds = {info[k][1] for k in stored_fp8}
    target_fp8 = (stored_fp8 if fp8 is not False else set()) | (linears if want_fp8 is not None else set())
    if target_fp8:
        _swap_in_fp8(model, target_fp8, want_fp8 or next(iter(fp8_kinds), torch.float8_e4m3fn))

    swapped = tuple(f"blocks.{i}." for i in range(max(0, min(int(swap_blocks), cfg.num_layers))))
    pin = dev.type == "cuda"

    def place(name: str, t: torch.Tensor) -> torch.Tensor:
        if not name.startswith(swapped):
            return t.to(dev)
        t = t.to("cpu")
        return t.pin_memory() if pin else t

    sd: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    to_dequantise: dict[str, torch.Tensor] = {}
    for s in sources:
        mine = [k for k, o in owner.items() if o is s and not _FP8_EXTRA.search(k)]
        for name, t in s.read(mine, device="cpu" if swapped else dev):
            if name.endswith(".scale_weight"):
                scales[name] = t.float()
            elif is_fp8(t) and name not in target_fp8:            # fp8=False: dequantise once the scale is known
                to_dequantise[name] = t.to("cpu")
            elif name in target_fp8 and not is_fp8(t):           # quantise as it streams in, on its device
                q, scale = quantize_fp8(place(name, t), want_fp8)
                sd[name], scales[name[:-6] + "scale_weight"] = place(name, q), scale
            else:
                cast = dt if dt is not None and t.is_floating_point() and not is_fp8(t) else t.dtype
                sd[name] = place(name, t.to(cast))
    for name, q in to_dequantise.items():
        scale = scales.pop(name[:-6] + "scale_weight").cpu()
        sd[name] = place(name, (q.to(torch.float32) * scale).to(dt))
    sd.update({k: place(k, v) for k, v in scales.items()})
    model.load_state_dict(sd, strict=True, assign=True)
    if swapped:
        model.block_swap = BlockSwap(model.blocks, len(swapped), dev, place=False)
    return model.eval().requires_grad_(False)
